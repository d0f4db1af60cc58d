"""Stress the real tritonserver (CPU) with bursts of concurrent clients until it dies or the rounds run out.

Each round sends 16 requests at once (half HTTP, half gRPC; greedy, top-k, a stop word, plain
decoding), then 16 streams at once, and checks that every text equals the same request sent
alone. It exits 1 with the server's exit code and log tail if the server stops answering.
It found the Python backend crash of Triton 2.51 under concurrent BLS calls and metric
updates (the IPC lock of models/spec_decode.py).

    python scripts/triton_stress.py --rounds 30 --out results/cpu/triton_stress
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from specdeploy.client import SpecClient
from specdeploy.config import SpecConfig
from specdeploy.triton_repo.server import Ports, TritonServer
from specdeploy.triton_repo.writer import RepoSpec, write_repository

CASES = [
    dict(prompt="What is the capital of France?", task="qa", max_tokens=6, num_draft_tokens=3),
    dict(prompt="List the days of the week.", task="list", max_tokens=5, num_draft_tokens=0),
    dict(prompt="Write a Python function that returns the square of a number.", task="code", max_tokens=4, top_k=5),
    dict(prompt="What is the capital of France?", task="qa2", max_tokens=6, stop=("Paris",)),
]
CLIENTS = 16


def burst(clients: tuple[SpecClient, SpecClient], stream: bool) -> list[str]:
    """CLIENTS requests released together; texts in job order."""
    start = threading.Barrier(CLIENTS)

    def run(i: int) -> str:
        client, case = clients[i % 2], CASES[i % len(CASES)]
        start.wait(timeout=60)
        return "".join(client.stream(**case)) if stream else client.generate(**case).text

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(run, range(CLIENTS)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", type=Path, required=True, help="folder for the repository, server.log and stress.log")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "stress.log", "w") as log:
        return stress(args.out, args.rounds, log)


def stress(out: Path, rounds: int, log) -> int:
    """The rounds against a server over a fresh repository in `out`; 0 when every request was served right."""

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    repo = write_repository(out / "repo", RepoSpec(spec=SpecConfig(method="layerskip", k=2)))
    with TritonServer(repo, Ports.free(), model_control="explicit", log_path=out / "server.log") as server:
        clients = (SpecClient(server.grpc_url, "grpc"), SpecClient(server.http_url, "http"))
        solo = [clients[i % 2].generate(**CASES[i % len(CASES)]).text for i in range(CLIENTS)]
        for r in range(rounds):
            t0 = time.perf_counter()
            try:
                texts = [burst(clients, stream) for stream in (False, True)]
            except Exception as e:  # noqa: BLE001 - report what the server did
                say(f"round {r}: FAILED {type(e).__name__}: {e}; server exit code {server.process.poll()}")
                say(server.log_tail(60))
                return 1
            wrong = sum(t != s for batch in texts for t, s in zip(batch, solo))
            say(f"round {r}: {2 * CLIENTS} requests, {wrong} texts differ from solo, {time.perf_counter() - t0:.1f} s")
            if wrong:
                return 1
    say(f"{rounds} rounds: the server served every request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
