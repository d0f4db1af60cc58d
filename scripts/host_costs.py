"""Host time of the calls on a compiled speculative step's critical path (GPU machine).

    python scripts/host_costs.py --out DIR [--target GGUF_OR_DIR]

Where the GPU waits for the host: with EAGLE trees drafted ahead, the host reads step n's verdict
while the GPU drafts step n + 1's tree (~0.3 ms); everything the host does between that read and
the launch of step n + 1's verify forward is GPU idle time once it outlasts the draft. This script
measures (1) the host microseconds of each call on that path, one at a time with the GPU idle
(median of many), and (2) in `speculative_generate` itself, the host time from the verdict's read
to the next verify graph's replay, split at the loop's calls. Without --target it runs a randomly
initialised model of SmolLM2-135M's shape (host costs do not depend on the weights; acceptance
does, so (2) then commits about one token a step). Writes DIR/host_costs.json and .md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from specdeploy.config import SamplingParams
from specdeploy.runtime import loop as loop_module
from specdeploy.runtime import verify as verify_module
from specdeploy.runtime.cuda_runner import CapturedFn, CudaGraphRunner, LeanLlama
from specdeploy.runtime.runner import ids_on, to_host
from specdeploy.runtime.types import Context, Draft


def smollm2_shaped(device: str, dtype: torch.dtype = torch.bfloat16):
    """(random LlamaForCausalLM of SmolLM2-135M's shape, its EAGLE head), in eval mode: for timings that
    depend on the shapes, not the weights (no GGUF to carry to the GPU machine)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdeploy.models.eagle import EagleHead

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                      max_position_embeddings=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device, dtype).eval()
    return model, EagleHead.init_from_target(model).to(device, dtype).eval()


def host_us(fn, reps: int = 200, sync: bool = True) -> float:
    """Median host microseconds of fn(), the GPU idle before each call."""
    times = []
    for _ in range(reps):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return 1e6 * statistics.median(times)


def micro(model, head) -> dict[str, float]:
    from specdeploy.runtime.eagle_graphs import GraphEagleProposer
    from specdeploy.runtime.verify import DeviceVerdict

    dev = torch.device("cuda")
    runner = CudaGraphRunner(LeanLlama.from_hf(model), max_length=2048, output_hidden=True)
    prompt = torch.randint(0, 1000, (100,))
    step = runner.forward(prompt)
    base = runner.length
    parents = torch.tensor([-1] * 8 + [i // 8 for i in range(56)], device=dev)[:48]
    tree_tokens = torch.randint(0, 1000, (48,), device=dev)
    one = torch.tensor([5], device=dev)
    out: dict[str, float] = {}

    def fwd_chain():
        runner.rollback(base)
        runner.forward(one)

    def fwd_tree():
        runner.rollback(base)
        runner.forward(torch.cat([one, tree_tokens]), tree_parents=torch.cat([parents.new_full((1,), -1), parents + 1]))

    out["runner.forward, 1 token"] = host_us(fwd_chain)
    out["runner.forward, 49-token tree (cat of pending + tree, parents built)"] = host_us(fwd_tree)
    g1, g64 = runner._fn(1, 256), runner._fn(64, 256)
    out["verify graph replay q=1 (alone)"] = host_us(g1)
    out["verify graph replay q=64 (alone)"] = host_us(g64)
    out["tree ancestry replay q=64 (alone)"] = host_us(runner._tree_fn(64))
    out["runner._set_tree (48 device parents)"] = host_us(lambda: runner._set_tree(parents, 48))
    logits = torch.randn(64, 49152, device=dev, dtype=torch.bfloat16)
    out["logits[:49].to(float32, copy=True)"] = host_us(lambda: logits[:49].to(torch.float32, copy=True))

    def keep():
        runner._length = base + 49
        runner.keep_path(base + 1, [base + 3, base + 9, base + 30])

    out["runner.keep_path (3 entries moved)"] = host_us(keep)
    out["ids_on(1 id)"] = host_us(lambda: ids_on(dev, [7]))
    out["ids_on(4 ids)"] = host_us(lambda: ids_on(dev, [7, 8, 9, 10]))
    small = torch.zeros(4, device=dev, dtype=torch.long)
    out["torch.cat of two small tensors"] = host_us(lambda: torch.cat([small, small]))
    out["tiny in-place add (one launch)"] = host_us(lambda: small.add_(1))
    out["index_select of 4 rows"] = host_us(lambda: step.hidden.index_select(0, small.clamp(0, 3)))
    out["to_host(8) then read"] = host_us(lambda: to_host(small)())
    greedy = SamplingParams()
    draft = Draft(tokens=tree_tokens, parents=parents, max_depth=4)
    full_logits = torch.randn(49, 49152, device=dev)
    out["DeviceVerdict(...) greedy, 48-node tree"] = host_us(lambda: DeviceVerdict(draft, full_logits, greedy))
    verdicts = [DeviceVerdict(draft, full_logits, greedy) for _ in range(200)]
    torch.cuda.synchronize()
    it = iter(verdicts)
    out["DeviceVerdict.verdict() (copy done)"] = host_us(lambda: next(it).verdict())

    prop = GraphEagleProposer.from_head(head, model.get_input_embeddings(), model.get_output_embeddings(),
                                        tree_size=48, topk=8, max_depth=4, max_length=2048)
    hidden = step.hidden
    ctx = Context(token_ids=prompt.tolist(), prompt_len=100, params=greedy, target_hidden=hidden[:-1])
    prop.propose(ctx, 4)
    out["GraphEagleProposer draft replay depth 4 (alone)"] = host_us(prop._fn("draft", 4, 256))

    def ahead():
        prop._fed_host = len(ctx.token_ids) - 1
        prop._ahead = None
        prop.draft_ahead(ctx, hidden[:49], verdicts[0], 4)

    out["GraphEagleProposer.draft_ahead (sync + draft)"] = host_us(ahead)
    runner.close()
    prop.close()
    return out


class Stamps:
    """Host timestamps of the loop's calls, per step."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []

    def wrap(self, name: str, fn, at_exit: bool = False):
        def timed(*a, **kw):
            if not at_exit:
                self.events.append((name, time.perf_counter()))
            r = fn(*a, **kw)
            if at_exit:
                self.events.append((name, time.perf_counter()))
            return r
        return timed


def loop_gaps(model, head, steps_prompts: int = 6, max_new: int = 128) -> dict:
    """Per step of eagle:4 (drafted ahead) and plain: host ms from the verdict's read to the next verify
    replay, split at keep_path / forward entry."""
    from specdeploy.runtime.eagle_graphs import GraphEagleProposer
    from specdeploy.runtime.loop import StopCondition, speculative_generate
    from specdeploy.runtime.proposers import NGramProposer

    runner = CudaGraphRunner(LeanLlama.from_hf(model), max_length=2048, output_hidden=True)
    prop = GraphEagleProposer.from_head(head, model.get_input_embeddings(), model.get_output_embeddings(),
                                        tree_size=48, topk=8, max_depth=4, max_length=2048)
    stop = StopCondition(eos_ids=frozenset(), max_new_tokens=max_new)
    params = SamplingParams(max_new_tokens=max_new)
    results = {}
    for name, proposer, k in (("eagle:4", prop, 4), ("none", NGramProposer(3, 3), 0)):
        speculative_generate(runner, proposer, list(range(10, 60)), params, stop, k=k)  # warm
        stamps = Stamps()
        old = {q: f for q, f in runner._fns.items()}
        for key, f in old.items():
            if isinstance(f, CapturedFn):
                runner._fns[key] = stamps.wrap("replay", f)
        orig_verdict = verify_module.DeviceVerdict.verdict
        orig_verify = loop_module.verify
        orig_keep, orig_fwd = runner.keep_path, runner.forward
        def first_read(self, _read=stamps.wrap("read", orig_verdict, at_exit=True)):
            return orig_verdict(self) if self._verdict is not None else _read(self)

        verify_module.DeviceVerdict.verdict = first_read
        loop_module.verify = stamps.wrap("read", orig_verify, at_exit=True)
        runner.keep_path = stamps.wrap("keep", orig_keep)
        runner.rollback = stamps.wrap("keep", runner.rollback)
        runner.forward = stamps.wrap("forward", orig_fwd)
        wall = 0.0
        n_steps = 0
        try:
            for p in range(steps_prompts):
                torch.cuda.synchronize()
                t = time.perf_counter()
                g = speculative_generate(runner, proposer, list(range(10 + p, 70 + p)), params, stop, k=k)
                wall += time.perf_counter() - t
                n_steps += g.stats.target_forwards
        finally:
            verify_module.DeviceVerdict.verdict = orig_verdict
            loop_module.verify = orig_verify
            del runner.keep_path, runner.forward, runner.rollback
            runner._fns.update(old)
        gaps = defaultdict(list)
        last_read = None
        marks = {}
        for what, t in stamps.events:
            if what == "read":
                last_read, marks = t, {}
            elif last_read is not None and what not in marks:
                marks[what] = t
                if what == "replay":
                    gaps["read -> replay"].append(t - last_read)
                    if "keep" in marks:
                        gaps["read -> keep_path"].append(marks["keep"] - last_read)
                    if "forward" in marks:
                        gaps["forward -> replay"].append(t - marks["forward"])
                        if "keep" in marks:
                            gaps["keep_path -> forward"].append(marks["forward"] - marks["keep"])
                    last_read = None
        results[name] = {"ms_per_step": 1e3 * wall / n_steps, "steps": n_steps,
                         **{f"{k} ms (median)": 1e3 * statistics.median(v) for k, v in gaps.items() if v}}
        print(name, results[name], flush=True)
    runner.close()
    prop.close()
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--target", default=None, help="a GGUF or HF folder (default: random weights of SmolLM2's shape)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.target:
        from specdeploy.models import eagle
        from specdeploy.models.loader import load_model

        loaded = load_model(args.target, device="cuda", dtype=torch.bfloat16)
        model, head = loaded.model, eagle.load(None, loaded)[0]
    else:
        model, head = smollm2_shaped("cuda")
    with torch.no_grad():
        calls = micro(model, head)
    for k, v in calls.items():
        print(f"{v:8.1f} us  {k}", flush=True)
    gaps = loop_gaps(model, head)
    result = {"device": torch.cuda.get_device_name(), "target": args.target or "random SmolLM2-135M shape",
              "host_us_per_call": calls, "loop": gaps}
    (args.out / "host_costs.json").write_text(json.dumps(result, indent=1))
    lines = ["| call (GPU idle before it) | host µs |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in calls.items()]
    lines += ["", "| loop | " + " | ".join(next(iter(gaps.values())).keys()) + " |", "|---" * (1 + len(next(iter(gaps.values())))) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |"
              for n, r in gaps.items()]
    (args.out / "host_costs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
