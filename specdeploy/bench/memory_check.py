"""The memory estimate (build/estimate.py) against the peak memory measured on the GPU.

Input: `gpu_bench` JSON files (results/gpu/run*_spec.json, SmolLM2-135M in bfloat16 on an H100).
Each "fused" record is one `BatchSpeculator` configuration; the bench measured (gpu_bench.py):

- peak_mem_bytes = torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), taken
  just before the engine was built. It counts every block torch's caching allocator handed
  out: weights, KV caches, the working set of the forward passes (eager warm-ups and the
  CUDA-graph pool during capture) and cuBLAS workspaces (allocated through the caching
  allocator, one per (handle, stream), 32 MiB each on an H100). It does not count the CUDA
  context and kernel images (outside the allocator) nor cached-but-free blocks.
- resident_before_bytes = memory_allocated() at that moment: the HF model (whose bf16
  parameters are the lean runner's weights, counted once below), the lean runner's fused
  q/k/v and gate/up copies (a bench artifact: a deployment drops the unfused tensors) and the
  workspaces of streams earlier configurations created.
- static_bytes: the engine's weights and KV caches, byte for byte.

So the configuration's own memory, what the estimate predicts less its workspace term, is

    measured = target weights + draft weights extra + (peak - resident_before) - new workspaces

where the new workspaces are read off the data: the growth of resident_before from this
configuration to the next, in whole 32 MiB units (run 2's code made a fresh stream per captured
graph, and torch recycles a pool of 32 streams per device, c10/cuda/CUDAStream.cpp: the first
two configurations created all 32, 16 each; later ones none). The workspace term itself is
checked against that growth. Run 1 was recorded before the bench freed each configuration's
graphs (commit eedb521): it has no resident_before and its peaks include earlier
configurations, so only its static terms (weights, KV caches) are compared.

The engine's shape comes from the record and the bench's command line: context = the cache
positions per slot (`cache_positions`), the target's largest forward = max(prefill chunk,
batch * (k + 1)), the draft's = max(prefill chunk, batch * CATCHUP) (its catch-up pass).

    python -m specdeploy.bench.memory_check results/gpu/run1_spec.json results/gpu/run2_spec.json \
        --out results/estimate_vs_measured.md
"""
from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from specdeploy.build.estimate import WORKSPACE_BYTES, EngineShape, MemoryEstimate, estimate_memory, load_config
from specdeploy.models.layerskip import layerskip_layers

TOTAL_TOLERANCE = 0.05  # |estimate - measured| / measured, weights + KV + working set (see results/estimate_vs_measured.md)
WORKING_SET_SLACK = WORKSPACE_BYTES  # |estimated - measured| working set: kernels' temporaries the formula does not itemise
LEFTOVER_LIMIT = 8 * 2**20  # what a configuration may leave resident besides whole workspaces (small buffers)


@dataclass(frozen=True)
class Comparison:
    """One measured configuration and the estimate for the same shape (bytes)."""

    run: str
    name: str
    method: str
    batch: int
    k: int
    switch: str
    context: int  # KV positions per slot
    estimate: MemoryEstimate
    unchunked: MemoryEstimate  # the same with the estimator's default: every slot prefilled whole at once
    static: dict  # the record's static_bytes
    peak: int
    resident_before: int | None  # None: run 1 (no baseline)
    new_workspaces: int | None  # cuBLAS workspaces this configuration created (from resident growth)
    leftover: int | None  # resident growth besides whole workspaces

    @property
    def comparable(self) -> bool:
        return self.resident_before is not None and self.new_workspaces is not None

    @property
    def measured_working_set(self) -> int:
        """Peak over resident, less the KV caches and the workspaces created here."""
        kv = self.static["target_kv_cache"] + self.static["draft_kv_cache"]
        return self.peak - self.resident_before - kv - self.new_workspaces * WORKSPACE_BYTES

    @property
    def measured(self) -> int:
        """Weights + KV caches + working set of the configuration, as measured."""
        s = self.static
        return s["target_weights"] + s["draft_weights_extra"] + s["target_kv_cache"] + s["draft_kv_cache"] \
            + self.measured_working_set

    @property
    def estimated(self) -> int:
        """The estimate less its workspace term (compared separately)."""
        return self.estimate.total - self.estimate.overhead_bytes

    @property
    def rel_error(self) -> float:
        return (self.estimated - self.measured) / self.measured

    @property
    def unchunked_total(self) -> int:
        """The unchunked estimate less its workspace term."""
        return self.unchunked.total - self.unchunked.overhead_bytes


def _bench_args(command: str) -> argparse.Namespace:
    from specdeploy.bench.gpu_bench import build_parser

    words = shlex.split(command)
    start = words.index("specdeploy.bench.gpu_bench") + 1 if "specdeploy.bench.gpu_bench" in words else 2
    return build_parser().parse_args(words[start:])


def _estimate(rec: dict, args: argparse.Namespace, config: dict) -> tuple[MemoryEstimate, MemoryEstimate, int]:
    """The estimate for the record's engine shape, the unchunked one, and the cache positions per slot."""
    from specdeploy.runtime.batch import CATCHUP, PREFILL_BUCKETS, cache_positions

    batch, k = int(rec["batch"]), int(rec["k"])
    context = cache_positions(args.max_length, k)
    chunk = max(PREFILL_BUCKETS)
    draft = None
    if rec["method"] == "draft":  # the layerskip draft: the target's first layers, its weights shared
        layers = layerskip_layers(int(config["num_hidden_layers"]), args.layerskip_layers)
        draft = {**config, "num_hidden_layers": layers}
    engine = EngineShape(k=k, max_num_tokens=max(chunk, batch * (k + 1)), draft_max_num_tokens=max(chunk, batch * CATCHUP))
    shape = dict(dtype=rec["dtype"], batch=batch, context=context, draft_config=draft, draft_shares_weights=draft is not None)
    return estimate_memory(config, engine=engine, **shape), estimate_memory(config, engine=EngineShape(k=k), **shape), context


def compare_file(path: str | Path, config_name: str = "smollm2-135m") -> list[Comparison]:
    """One Comparison per fused record of a gpu_bench JSON file (only layerskip drafts, whose
    shape the bench states; a trained draft's record would need its artifact's config)."""
    payload = json.loads(Path(path).read_text())
    args = _bench_args(payload["meta"]["command"])
    config = load_config(config_name)
    recs = [r for r in payload["records"] if r.get("path") == "fused"]  # in the order they ran
    out = []
    for i, rec in enumerate(recs):
        if rec["method"] == "draft" and rec["name"] != "specdeploy layerskip":
            continue
        est, unchunked, context = _estimate(rec, args, config)
        before = rec.get("resident_before_bytes")
        new = leftover = None
        if before is not None:  # the last configuration: nothing after it to grow into (counted as none)
            nxt = recs[i + 1].get("resident_before_bytes") if i + 1 < len(recs) else before
            new, leftover = divmod(nxt - before, WORKSPACE_BYTES)
        out.append(Comparison(run=Path(path).stem, name=rec["name"], method=rec["method"], batch=int(rec["batch"]),
                              k=int(rec["k"]), switch=rec.get("switch", ""), context=context, estimate=est, unchunked=unchunked,
                              static=rec["static_bytes"], peak=int(rec["peak_mem_bytes"]), resident_before=before,
                              new_workspaces=new, leftover=leftover))
    return out


def _mb(x: int | float) -> str:
    return f"{x / 2**20:.1f}"


def render(rows: list[Comparison], sources: list[str]) -> str:
    """A markdown report of the comparisons."""
    lines = [
        "# Memory estimate vs measured peak (H100, SmolLM2-135M bfloat16)",
        "",
        "Generated by `python -m specdeploy.bench.memory_check " + " ".join(sources) + " --out "
        "results/estimate_vs_measured.md` (do not edit by hand). How each figure is measured and reconstructed: the "
        "docstring of `specdeploy/bench/memory_check.py`; the formulas: `specdeploy/build/estimate.py`. MiB = 2^20 bytes.",
        "",
        "## Static terms (every fused record of both runs)",
        "",
        "| run | configuration | batch | k | context | weights est / meas | target KV est / meas | draft KV est / meas |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, s = r.estimate, r.static
        dkv = e.draft.kv_cache_bytes if e.draft else 0
        lines.append(f"| {r.run} | {r.name} {r.switch} | {r.batch} | {r.k} | {r.context} | "
                     f"{e.weights_bytes:,} / {s['target_weights'] + s['draft_weights_extra']:,} | "
                     f"{e.target.kv_cache_bytes:,} / {s['target_kv_cache']:,} | {dkv:,} / {s['draft_kv_cache']:,} |")
    comp = [r for r in rows if r.comparable]
    lines += [
        "",
        f"## Configuration memory (run 2): weights + KV + working set, tolerance ±{TOTAL_TOLERANCE:.0%}",
        "",
        "measured = weights + (peak − resident before) − new cuBLAS workspaces × 32 MiB; the working set is "
        "what remains after the KV caches.",
        "",
        "| configuration | batch | k | peak | resident before | new workspaces | working set est / meas | "
        "total est / meas (MiB) | error | unchunked est |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in comp:
        e = r.estimate
        lines.append(f"| {r.name} {r.switch} | {r.batch} | {r.k} | {_mb(r.peak)} | {_mb(r.resident_before)} | "
                     f"{r.new_workspaces} | {_mb(e.activation_bytes)} / {_mb(r.measured_working_set)} | "
                     f"{_mb(r.estimated)} / {_mb(r.measured)} | {r.rel_error:+.1%} | {_mb(r.unchunked_total)} |")
    worst = max(comp, key=lambda r: abs(r.rel_error))
    created = sum(r.new_workspaces for r in comp)
    ws1 = [r.measured_working_set for r in comp if r.batch == 1]
    gap = max(abs(r.estimate.activation_bytes - r.measured_working_set) for r in comp)
    over32 = [(r.unchunked_total - r.measured) / r.measured for r in comp if r.batch == 32]
    lines += [
        "",
        "## What this shows",
        "",
        f"- Weights and KV caches: the estimate equals the engine's allocation byte for byte in all {len(rows)} records.",
        "- cuBLAS workspaces: run 2's resident memory grew after "
        + ", ".join(f"{r.name} batch {r.batch} by {r.new_workspaces} × 32 MiB + {_mb(r.leftover)} MiB"
                    for r in comp if r.new_workspaces)
        + f", and by less than one workspace after every other configuration: {created} workspaces in all, as many "
        "streams as torch's pool recycles (the run's code took a fresh stream per captured graph, so later "
        f"configurations reused streams whose workspaces existed). The estimate's term is {WORKSPACE_BYTES // 2**20} MiB per stream, "
        f"{EngineShape.streams} streams (the default one and one capture stream per engine, as the code now does).",
        f"- Configuration memory: largest error {worst.rel_error:+.1%} ({worst.name} {worst.switch}, batch {worst.batch}, "
        f"k {worst.k}), within ±{TOTAL_TOLERANCE:.0%}. The working set is the uncertain part: at batch 1 the measured "
        f"one ({_mb(min(ws1))}–{_mb(max(ws1))} MiB: attention masks and temporaries of a prefill chunk over "
        f"{comp[0].context} positions, which the formula does not itemise) exceeds the formula's; at batch 32 the "
        "formula's float32 logits exceed the engine's bfloat16 ones. The largest gap is "
        f"{_mb(gap)} MiB, under one workspace ({WORKING_SET_SLACK // 2**20} MiB).",
        "- Without the engine's largest forward (the estimator's default: every slot prefilled whole at once, "
        f"'unchunked est') the estimate is {min(over32):.0%}–{max(over32):.0%} over at batch 32; at batch 1 a "
        "whole-context prefill is small and it stays close.",
        "- Not in either figure: the CUDA context and kernel images (outside torch's allocator) and the bench's "
        "unfused copies of q/k/v and gate/up (resident before, not part of a deployment).",
        "- Run 1's peaks include earlier configurations' graphs (recorded before commit eedb521), so only its static "
        "terms are compared.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specdeploy.bench.memory_check", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="gpu_bench JSON files")
    p.add_argument("--out", help="write the markdown report here (default: print it)")
    args = p.parse_args(argv)
    rows = [r for f in args.files for r in compare_file(f)]
    text = render(rows, args.files)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
