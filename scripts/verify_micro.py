"""Host+GPU time of one `verify` call (what a loop step waits for after its verify forward), this
tree's verify.py against another version of it, on random logits of SmolLM2's vocabulary.

    python scripts/verify_micro.py [--old path/to/verify.py] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch

from specdeploy.config import SamplingParams
from specdeploy.runtime import verify as new_verify
from specdeploy.runtime.types import Draft


def load(path: str):
    spec = importlib.util.spec_from_file_location("old_verify", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tree(k: int, width: int = 8) -> torch.Tensor:
    """Parents of a k-node tree, `width` children per node, breadth first."""
    return torch.tensor([-1 if i < width else (i - width) // width for i in range(k)], dtype=torch.long)


def time_it(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1e3 * (time.perf_counter() - t) / reps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old")
    ap.add_argument("--out")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    dev, vocab = "cuda", 49152
    impls = {"this": new_verify, **({"old": load(args.old)} if args.old else {})}
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for t in (0.0, 0.7):
        params = SamplingParams(temperature=t, seed=0 if t else None)
        for name, k, kind in [("plain", 0, "chain"), ("chain k=4", 4, "chain"), ("chain k=8", 8, "chain"),
                              ("chain k=4 with probs", 4, "probs"), ("tree 63", 63, "tree")]:
            logits = torch.randn(k + 1, vocab, device=dev) * 3
            tokens = torch.randint(0, vocab, (k,), device=dev)
            probs = torch.softmax(torch.randn(k, vocab, device=dev) * 3, -1) if kind == "probs" else None
            draft = Draft(tokens=tokens, parents=tree(k).to(dev)) if kind == "tree" else Draft(tokens=tokens, probs=probs)
            for impl, mod in impls.items():
                ms = time_it(lambda: mod.verify(draft, logits, params, gen), args.reps)
                rows.append({"temperature": t, "draft": name, "impl": impl, "ms": round(ms, 4)})
                print(rows[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
