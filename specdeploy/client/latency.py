"""`specdeploy latency`: the same greedy requests in-process, over HTTP and over gRPC.

Starts the server on a repository (free loopback ports), builds the in-process engine the
repository's manifest describes (same target file, method, k, dtype), and times each
path on the same prompts. Greedy outputs are checked to be identical, so the token
count is shared and the server's cost per token is a plain difference:

    overhead per token = (served latency - in-process latency) / generated tokens
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from specdeploy.errors import SpecDeployError

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Repeat exactly: red, green, blue, red, green, blue, red, green, blue",
    "Write a Python function that returns the square of a number.",
    "List the days of the week.",
)


@dataclass(frozen=True)
class LatencyRow:
    path: str  # in-process | http | grpc | grpc stream
    requests: int
    tokens: int  # generated tokens over all timed requests
    mean_ms: float  # per request
    ms_per_token: float
    overhead_ms_per_token: float | None  # vs in-process
    first_piece_ms: float | None = None  # streaming: time to the first text piece
    mismatches: int = 0  # greedy texts differing from in-process


def engine_from_manifest(repo: Path, device: str):
    """The in-process SpecEngine over the weights, method, k, dtype and policy the repository serves."""
    from specdeploy.config import SpecConfig
    from specdeploy.runtime.engine import SpecEngine
    from specdeploy.runtime.policy import Policy
    from specdeploy.triton_repo.writer import MARKER

    try:
        m = json.loads((repo / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise SpecDeployError(f"{repo} is not a repository written by specdeploy repo ({MARKER}: {e})") from None
    draft = m.get("draft") or {}
    spec = SpecConfig(method=m["method"], k=m["k"],
                      draft=draft.get("source_path") if m["method"] == "draft" else None,
                      layerskip_layers=draft.get("layerskip_layers"))
    policy = Policy.from_dict(m["policy"]) if m.get("policy") else None
    if device == "cpu":  # as many torch threads as each served model process uses
        import torch

        torch.set_num_threads(int(m.get("cpu_threads", 1)))
    if m["target"].get("engine") or draft.get("engine"):
        return _engine_over_built(repo, m, spec, device, policy)
    return SpecEngine.load(spec, m["target"]["source_path"], device=device, dtype=m["dtype"], policy=policy)


def _engine_over_built(repo: Path, m: dict, spec, device: str, policy):
    """SpecEngine over the repository's `specdeploy build` engines, loaded as verify and draft load them."""
    from transformers import AutoTokenizer

    from specdeploy.models.loader import LoadedModel
    from specdeploy.runtime.engine import SpecEngine
    from specdeploy.triton_repo.weights import load_weights

    tokenizer = AutoTokenizer.from_pretrained(repo / "preprocessing" / "1" / "tokenizer")

    def loaded(entry: dict) -> LoadedModel:
        return LoadedModel(load_weights(entry, device, m["dtype"]), tokenizer, entry["source"], entry["sha256"])

    draft = loaded(m["draft"]) if spec.method == "draft" else None
    return SpecEngine(loaded(m["target"]), spec, draft, policy=policy)


def measure(repo: str | Path, prompts: tuple[str, ...] = DEFAULT_PROMPTS, max_tokens: int = 32, repeats: int = 2,
            device: str = "cpu", server=None) -> list[LatencyRow]:
    """Time every path; `server` (a started TritonServer) is reused when given."""
    from specdeploy.client.client import SpecClient
    from specdeploy.config import SamplingParams
    from specdeploy.triton_repo.server import Ports, TritonServer

    repo = Path(repo).resolve()
    engine = engine_from_manifest(repo, device)
    params = SamplingParams(max_new_tokens=max_tokens)
    own = server is None
    server = server or TritonServer(repo, Ports.free()).start()
    try:
        http, grpc = SpecClient(server.http_url, "http"), SpecClient(server.grpc_url, "grpc")
        reference = {p: engine.generate(p, params) for p in prompts}  # also the warm-up
        tokens = sum(len(r.token_ids) for r in reference.values()) * repeats

        def in_process(p):
            return engine.generate(p, params).text, None

        def served(client):
            return lambda p: (client.generate(p, max_tokens=max_tokens).text, None)

        def streamed(p):
            start, first, pieces = time.perf_counter(), None, []
            for piece in grpc.stream(p, max_tokens=max_tokens):
                first = first if first is not None else time.perf_counter() - start
                pieces.append(piece)
            return "".join(pieces), first

        rows, base = [], None
        for name, call in (("in-process", in_process), ("http", served(http)), ("grpc", served(grpc)),
                           ("grpc stream", streamed)):
            if name != "in-process":
                call(prompts[0])  # warm-up
            times, firsts, mismatches = [], [], 0
            for _ in range(repeats):
                for p in prompts:
                    t = time.perf_counter()
                    text, first = call(p)
                    times.append(time.perf_counter() - t)
                    mismatches += text != reference[p].text
                    if first is not None:
                        firsts.append(first)
            total_ms = sum(times) * 1000
            per_token = total_ms / max(tokens, 1)
            base = per_token if base is None else base
            rows.append(LatencyRow(name, len(times), tokens, statistics.mean(times) * 1000, per_token,
                                   None if name == "in-process" else per_token - base,
                                   statistics.mean(firsts) * 1000 if firsts else None, mismatches))
        return rows
    finally:
        if own:
            server.stop()


def print_rows(rows: list[LatencyRow], as_json: bool = False) -> None:
    if as_json:
        for r in rows:
            print(json.dumps(asdict(r)))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="latency: in-process vs served (greedy, same outputs)")
    for col in ("path", "requests", "tokens", "ms/request", "ms/token", "overhead ms/token", "first piece ms", "diff"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in rows:
        table.add_row(r.path, str(r.requests), str(r.tokens), f"{r.mean_ms:.1f}", f"{r.ms_per_token:.2f}",
                      "-" if r.overhead_ms_per_token is None else f"{r.overhead_ms_per_token:+.2f}",
                      "-" if r.first_piece_ms is None else f"{r.first_piece_ms:.1f}", str(r.mismatches))
    Console().print(table)
