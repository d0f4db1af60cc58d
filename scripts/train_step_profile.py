"""Where an EAGLE training step's GPU time goes (GPU machine).

    python scripts/train_step_profile.py --out DIR [--batch-size 16] [--seq-len 512] [--unroll 2]

The step `specdeploy train eagle` runs (training/eagle.py `eagle_loss`, backward, AdamW, bf16 autocast
over the float32 target), on a randomly initialised model of SmolLM2-135M's shape and random tokens:
the time depends on the shapes, not the values. Prints ms per step and the CUDA ops that take the
most GPU time under torch.profiler; writes DIR/train_step_profile.json and .md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from specdeploy.models.loader import LoadedModel
from specdeploy.training.common import Batch
from specdeploy.training.eagle import eagle_loss


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--unroll", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from torch.profiler import ProfilerActivity, profile

    from host_costs import smollm2_shaped  # this folder is on sys.path when run as a script

    model, head = smollm2_shaped("cuda", torch.float32)  # as training loads the target: float32, bf16 autocast
    model.requires_grad_(False)
    head.train()
    target = LoadedModel(model, None, "random SmolLM2-135M shape", "")
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device="cuda")
    batch = Batch(ids, torch.ones_like(ids, dtype=torch.bool))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = eagle_loss(target, head, batch, unroll=args.unroll)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t) / args.steps
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    result = {"device": torch.cuda.get_device_name(), "batch_size": args.batch_size, "seq_len": args.seq_len,
              "unroll": args.unroll, "ms_per_step": ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps(result), flush=True)
    print(table)
    (args.out / "train_step_profile.json").write_text(json.dumps(result, indent=1))
    (args.out / "train_step_profile.md").write_text(f"```\n{json.dumps(result)}\n\n{table}\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
