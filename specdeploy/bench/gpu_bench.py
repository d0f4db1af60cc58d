"""GPU benchmark: Hugging Face peers and specdeploy's compiled paths, side by side, in one process.

Rows (greedy, the eval prompts of the ten task types, max_new_tokens 256 by default):
- HF `generate` eager (batch 1, and padded batches of 8 and 32), HF assisted generation with
  the layerskip draft as the assistant, HF prompt lookup: the slow peers run on
  `--hf-prompts-per-task` prompts each and stop starting new prompts after `--hf-time-cap` s;
- specdeploy "fused" (`BatchSpeculator`: CUDA graphs, acceptance on the GPU, one host copy a
  step) for plain, ngram, layerskip and a trained draft if one is shipped, at batch 1 (per task)
  and batch 8 / 32 (aggregate, speculation always on and "auto");
- specdeploy "loop" (`speculative_generate` + `CudaGraphRunner` + the stock proposers), and the
  head methods (`--head-methods`: Medusa, EAGLE, lookup-first multi (n-gram chains or EAGLE
  trees), specinfer (both merged into one tree)) verified through the same graphs, built by
  `compiled_for` as `SpecEngine.load` does on CUDA).
`--parts lossless` reruns the fused paths (and the head methods' loop rows) in float32 and counts
outputs differing from the same engine's plain greedy (must be 0), and batch-vs-alone differences.

Everything lands in one JSON (raw numbers, the command) and a markdown table; `--render A.json
B.json` merges the JSON of several calls (the device's 10-minute limit) into one table.
Usage: python -m specdeploy.bench.gpu_bench --target FILE.gguf --out DIR --parts spec,lossless
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from specdeploy.bench.tasks import TASKS, Prompt, builtin_prompts
from specdeploy.config import HEAD_METHODS, SamplingParams, SpecConfig, draft_confidence_for
from specdeploy.models.layerskip import layerskip_layers
from specdeploy.models.tokenizers import encode_prompt
from specdeploy.runtime.batch import BatchRequest, BatchSpeculator
from specdeploy.runtime.cuda_runner import CudaGraphRunner, LeanLlama, compiled_for
from specdeploy.runtime.loop import StopCondition, speculative_generate
from specdeploy.runtime.proposers import DraftModelProposer, NGramProposer, NoProposer
from specdeploy.runtime.stats import SpecStats, TaskStats, merged

PARTS = ("micro", "spec", "loop", "hf", "lossless")


def per_task(prompts: list[Prompt], stats: list[SpecStats]) -> dict:
    """Sum stats per task: tokens, seconds, tokens/s, α, acceptance length."""
    by = TaskStats()
    for p, s in zip(prompts, stats):
        by.add(p.task, s)
    return {t: _stat_row(s) for t, s in by.by_task.items()}


def _stat_row(s: SpecStats) -> dict:
    return {"requests": s.requests, "tokens": s.emitted, "wall_s": round(s.wall_s, 4), "tokens_per_s": round(s.tokens_per_s, 1),
            "alpha": None if s.alpha is None else round(s.alpha, 4),
            "acceptance_length": None if s.acceptance_length is None else round(s.acceptance_length, 3)}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.records: list[dict] = []
        self.outputs: dict[str, list[list[int]]] = {}  # config name -> generated ids per prompt
        self.errors: list[dict] = []
        self.kernels: str | None = None  # the lean target's layer kernels, once a part has loaded it

    # ---- setup -------------------------------------------------------------------------
    def load(self, dtype: torch.dtype):
        from specdeploy.models.loader import load_model

        t = time.perf_counter()
        loaded = load_model(self.args.target, device=self.args.device, dtype=dtype)
        print(f"loaded {self.args.target} as {dtype} in {time.perf_counter() - t:.1f}s", flush=True)
        return loaded

    def prompts(self, tokenizer, per_task_n: int) -> tuple[list[Prompt], list[list[int]]]:
        all_prompts = builtin_prompts("eval")
        counts: dict[str, int] = defaultdict(int)
        chosen = []
        for p in all_prompts:
            if counts[p.task] < per_task_n:
                counts[p.task] += 1
                chosen.append(p)
        enc = [encode_prompt(tokenizer, p.prompt) for p in chosen]
        return chosen, enc

    def drafts(self, loaded, lean: LeanLlama) -> dict[str, LeanLlama]:
        """The LeanLlama drafts to bench: layerskip, plus the shipped trained draft if present."""
        out = {"layerskip": lean.truncated(layerskip_layers(lean.num_layers, self.args.layerskip_layers))}
        try:
            from specdeploy.models import artifacts, draft_lm

            folder = artifacts.ARTIFACTS_DIR / artifacts.DEFAULTS["draft_lm"]
            if (folder / artifacts.MANIFEST).is_file():
                out["draft"] = LeanLlama.from_hf(draft_lm.load(None, loaded))
        except Exception as e:  # noqa: BLE001 - a broken artifact must not stop the benchmark
            print(f"trained draft not loaded: {type(e).__name__}: {e}", flush=True)
        return out

    # ---- rows ---------------------------------------------------------------------------
    def record(self, rec: dict) -> None:
        self.records.append(rec)
        tot = rec["total"]
        print(f"{rec['name']:<44} batch {rec['batch']:>2}  {tot['tokens_per_s']:>8.1f} tok/s  α={tot.get('alpha')}  "
              f"acc.len={tot.get('acceptance_length')}  peak={rec.get('peak_mem_bytes', 0) / 2**20:.0f} MiB  "
              f"mismatch={rec.get('mismatches_vs_plain')}", flush=True)

    def guarded(self, what: str, fn, *args, **kw):
        """Run one configuration; a failure is recorded and the benchmark goes on."""
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - one broken configuration must not lose the others
            import traceback

            traceback.print_exc()
            self.errors.append({"config": what, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"})
            _sync_quiet()
            return None

    def fused(self, *args, **kw):
        return self.guarded(f"{args[0]} b{args[4]} {args[5]} {args[9]}", self._fused, *args, **kw)

    def loop(self, *args, **kw):
        return self.guarded(args[0], self._loop, *args, **kw)

    def hf(self, *args, **kw):
        return self.guarded(args[0], self._hf, *args, **kw)

    def hf_batched(self, *args, **kw):
        return self.guarded(f"HF generate batch {args[-1]}", self._hf_batched, *args, **kw)

    def _fused(self, name: str, lean: LeanLlama, method: str, draft: LeanLlama | None, batch: int, switch: str,
              prompts: list[Prompt], enc: list[list[int]], eos: list[int], dtype_name: str, plain_key: str | None,
              k: int | None = None) -> list[list[int]]:
        a = self.args
        k = a.k if k is None else k
        _sync()
        _empty_cache()
        _reset_peak()
        resident = _allocated()  # the HF model, the fused weights: what the process holds before the engine
        t = time.perf_counter()
        eng = BatchSpeculator(lean, method=method, draft=draft, k=k, max_batch=batch, max_length=a.max_length,
                              eos_ids=eos, switch=switch)
        capture_s = time.perf_counter() - t
        eng.run([BatchRequest(enc[0], 16)])  # warm-up
        reqs = [BatchRequest(ids, a.max_new_tokens, p.task) for p, ids in zip(prompts, enc)]
        _sync()
        t = time.perf_counter()
        res = eng.run(reqs)
        _sync()
        wall = time.perf_counter() - t
        stats = [r.stats for r in res]
        tot = merged(stats)
        total = _stat_row(tot)
        total["wall_s"] = round(wall, 3)
        total["tokens_per_s"] = round(tot.emitted / wall, 1)  # aggregate: all tokens over the run's wall time
        outs = [r.token_ids for r in res]
        key = f"{name}|{dtype_name}|b{batch}|{switch}"
        self.outputs[key] = outs
        rec = {
            "name": name, "path": "fused", "method": method, "batch": batch, "switch": switch, "k": k if method != "none" else 0,
            "dtype": dtype_name, "prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
            "per_task": per_task(prompts, stats), "total": total,
            "peak_mem_bytes": _peak(), "resident_before_bytes": resident,
            "static_bytes": {"target_weights": lean.weight_bytes, "target_kv_cache": eng.tcache.nbytes,
                             "draft_kv_cache": eng.dcache.nbytes if eng.dcache is not None else 0,
                             "draft_weights_extra": _extra_weights(lean, draft)},
            "graphs": eng.num_graphs, "capture_s": round(capture_s, 2),
            "capture_errors": sorted({f.error for f in eng._fns.values() if f.error}),
            "switch_steps": {"spec": eng.switch.spec_steps, "plain": eng.switch.plain_steps},
            "finish": {r: sum(x.finish_reason == r for x in res) for r in ("eos", "length")},
        }
        if plain_key and plain_key in self.outputs:
            ref = self.outputs[plain_key]
            rec["mismatches_vs_plain"] = sum(o != r for o, r in zip(outs, ref))
            rec["first_divergence"] = _divergences(outs, ref)
            rec["compared_with"] = plain_key
        self.record(rec)
        eng.close()
        del eng
        return outs

    def _loop(self, name: str, lean: LeanLlama, method: str, draft: LeanLlama | None, prompts, enc, eos, plain_key,
              loaded=None, dtype_name: str = "bfloat16") -> None:
        a = self.args
        _empty_cache()
        _reset_peak()
        if method in HEAD_METHODS:  # as SpecEngine.load on CUDA: target graphs with hidden states + trees
            runner, proposer = compiled_for(SpecConfig(method=method, k=a.k), loaded, max_length=a.max_length)
            k = a.k
        else:
            runner = CudaGraphRunner(lean, max_length=a.max_length)
        if method == "none":
            proposer, k = NoProposer(), 0
        elif method == "ngram":
            proposer, k = NGramProposer(1, 4), a.k
        elif method == "draft":
            proposer, k = DraftModelProposer(CudaGraphRunner(draft, max_length=a.max_length), draft_confidence_for("draft")), a.k
        params = SamplingParams(max_new_tokens=a.max_new_tokens)
        stop = StopCondition(frozenset(eos), a.max_new_tokens)
        speculative_generate(runner, proposer, enc[0], SamplingParams(max_new_tokens=16), StopCondition(frozenset(eos), 16), k=k)
        stats, outs = [], []
        for ids in enc:
            _sync()
            g = speculative_generate(runner, proposer, ids, params, stop, k=k)
            stats.append(g.stats)
            outs.append(g.token_ids)
        rec = {"name": name, "path": "loop", "method": method, "batch": 1, "k": k, "dtype": dtype_name,
               "prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "per_task": per_task(prompts, stats),
               "total": _stat_row(merged(stats)), "peak_mem_bytes": _peak()}
        runner.close()
        if hasattr(proposer, "runner"):
            proposer.runner.close()
        elif hasattr(proposer, "close"):  # GraphEagleProposer's graphs, also behind a lookup-first proposer
            proposer.close()
        if plain_key in self.outputs:
            ref = self.outputs[plain_key]
            rec["mismatches_vs_plain"] = sum(o != r for o, r in zip(outs, ref))
            rec["compared_with"] = plain_key + " (same prompts)"
        self.record(rec)

    def _hf(self, name: str, model, tokenizer, prompts, enc, eos, extra: dict, time_cap: float) -> None:
        a = self.args
        _empty_cache()
        _reset_peak()
        kwargs = dict(max_new_tokens=a.max_new_tokens, do_sample=False, pad_token_id=eos[0], **extra)
        warm = torch.tensor([enc[0]], device=self.args.device)
        model.generate(warm, attention_mask=torch.ones_like(warm), **{**kwargs, "max_new_tokens": 8})
        stats, done = [], []
        start = time.perf_counter()
        for p, ids in zip(prompts, enc):
            if time.perf_counter() - start > time_cap:
                break
            x = torch.tensor([ids], device=self.args.device)
            _sync()
            t = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
            _sync()
            s = SpecStats(requests=1)
            s.emitted = _count_generated(out[0, len(ids):].tolist(), eos)
            s.wall_s = time.perf_counter() - t
            stats.append(s)
            done.append(p)
        rec = {"name": name, "path": "hf", "method": name, "batch": 1, "dtype": "bfloat16", "prompts": len(done),
               "max_new_tokens": a.max_new_tokens, "per_task": per_task(done, stats), "total": _stat_row(merged(stats)),
               "peak_mem_bytes": _peak(),
               "notes": f"{len(done)} of {len(prompts)} prompts (time cap {time_cap:.0f}s)"}
        self.record(rec)

    def _hf_batched(self, model, prompts, enc, eos, batch: int) -> None:
        a = self.args
        _empty_cache()
        _reset_peak()
        sel = enc[:batch]
        width = max(len(x) for x in sel)
        ids = torch.full((len(sel), width), eos[0], dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(sel):  # left padding
            ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        ids, mask = ids.to(self.args.device), mask.to(self.args.device)
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=eos[0])
        _sync()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=a.max_new_tokens, do_sample=False, pad_token_id=eos[0])
        _sync()
        wall = time.perf_counter() - t
        tokens = sum(_count_generated(row[width:].tolist(), eos) for row in out)
        rec = {"name": "HF generate eager", "path": "hf", "method": "hf_generate", "batch": batch, "dtype": "bfloat16",
               "prompts": len(sel), "max_new_tokens": a.max_new_tokens, "per_task": {},
               "total": {"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1)},
               "peak_mem_bytes": _peak(), "notes": "one padded batch (left padding)"}
        self.record(rec)

    # ---- parts -------------------------------------------------------------------------
    def setup(self, dtype: torch.dtype):
        """(loaded target, eval prompts, their ids, stop ids, lean target, lean drafts) in `dtype`."""
        loaded = self.load(dtype)
        prompts, enc = self.prompts(loaded.tokenizer, self.args.prompts_per_task)
        lean = LeanLlama.from_hf(loaded.model)
        self.kernels = lean.kernels
        return loaded, prompts, enc, loaded.stop_ids(), lean, self.drafts(loaded, lean)

    def loop_prompts(self, loaded, prompts: list[Prompt], plain_key: str):
        """The loop rows' prompts (the first of each task), their ids, and the key of the fused
        plain outputs of those same prompts (their greedy reference)."""
        lp, lenc = self.prompts(loaded.tokenizer, self.args.loop_prompts_per_task)
        self.outputs[plain_key + "|loop"] = [self.outputs[plain_key][prompts.index(p)] for p in lp]
        return lp, lenc, plain_key + "|loop"

    def part_spec(self) -> None:
        a = self.args
        loaded, prompts, enc, eos, lean, drafts = self.setup(torch.bfloat16)
        plain1 = "specdeploy plain|bfloat16|b1|on"
        self.fused("specdeploy plain", lean, "none", None, 1, "on", prompts, enc, eos, "bfloat16", None)
        self.fused("specdeploy ngram", lean, "ngram", None, 1, "on", prompts, enc, eos, "bfloat16", plain1)
        for dname, d in drafts.items():
            self.fused(f"specdeploy {dname}", lean, "draft", d, 1, "on", prompts, enc, eos, "bfloat16", plain1)
            self.fused(f"specdeploy {dname}", lean, "draft", d, 1, "auto", prompts, enc, eos, "bfloat16", plain1)
        for k in a.extra_ngram_k:
            self.fused(f"specdeploy ngram k={k}", lean, "ngram", None, 1, "on", prompts, enc, eos, "bfloat16", plain1, k=k)
        for b in a.batches:
            pb = f"specdeploy plain|bfloat16|b{b}|on"
            self.fused("specdeploy plain", lean, "none", None, b, "on", prompts, enc, eos, "bfloat16", plain1)
            for switch in ("on", "auto"):
                self.fused("specdeploy ngram", lean, "ngram", None, b, switch, prompts, enc, eos, "bfloat16", pb)
                for dname, d in drafts.items():
                    self.fused(f"specdeploy {dname}", lean, "draft", d, b, switch, prompts, enc, eos, "bfloat16", pb)
            for k in a.extra_ngram_k:
                self.fused(f"specdeploy ngram k={k}", lean, "ngram", None, b, "auto", prompts, enc, eos, "bfloat16", pb, k=k)
        if "loop" in a.parts:
            lp, lenc, ref = self.loop_prompts(loaded, prompts, plain1)
            self.loop("specdeploy plain (loop)", lean, "none", None, lp, lenc, eos, ref)
            self.loop("specdeploy ngram (loop)", lean, "ngram", None, lp, lenc, eos, ref)
            self.loop("specdeploy layerskip (loop)", lean, "draft", drafts["layerskip"], lp, lenc, eos, ref)
            for method in a.head_methods:
                self.loop(f"specdeploy {method} (loop)", lean, method, None, lp, lenc, eos, ref, loaded)
            print(f"loop rows on {len(lp)} prompts", flush=True)

    def part_micro(self) -> None:
        """Milliseconds per step: HF eager forward, the lean forward eager, and its CUDA-graph replay."""
        from transformers import DynamicCache

        from specdeploy.runtime.runner import _cache_kwarg

        a = self.args
        loaded = self.load(torch.bfloat16)
        lean = LeanLlama.from_hf(loaded.model)
        layerskip = lean.truncated(layerskip_layers(lean.num_layers, a.layerskip_layers))
        rows = []
        ids = torch.randint(0, 1000, (1, 100), device=self.args.device)
        with torch.no_grad():
            cache = DynamicCache(config=loaded.model.config)
            kw = _cache_kwarg(loaded.model)
            loaded.model(ids, **{kw: cache})
            one = ids[:, :1]
            ms = gpu_time_ms(lambda: (loaded.model(one, **{kw: cache}), cache.crop(-1)))
        rows.append({"what": "HF eager forward, 1 token, batch 1", "ms": ms})
        for b in a.batches_micro:
            for method, draft in (("none", None), ("ngram", None), ("draft", layerskip)):
                for graphs in ((True, False) if _cuda() else (False,)):
                    if not graphs and b != 1:
                        continue
                    self.guarded(f"micro {method} b{b} graphs={graphs}", self._micro_engine, rows, lean, method, draft, b, graphs)
        if a.head_methods:
            self.guarded("micro trees", self._micro_trees, rows, loaded, lean)
        for r in rows:
            print(f"{r['ms']:8.3f} ms  {r['what']}", flush=True)
        self.records.append({"name": "micro", "path": "micro", "batch": 0, "dtype": "bfloat16", "rows": rows,
                             "total": {"tokens_per_s": 0.0}, "prompts": 0, "max_new_tokens": a.max_new_tokens})

    def _micro_trees(self, rows, loaded, lean) -> None:
        """The token-tree path: the target's verify step (chain of k + 1 vs an EAGLE tree) through
        CudaGraphRunner, and EAGLE drafting eager (EagleProposer) vs static + graphs."""
        from specdeploy.models import eagle
        from specdeploy.runtime.eagle_graphs import GraphEagleProposer
        from specdeploy.runtime.head_proposers import EagleProposer
        from specdeploy.runtime.types import Context

        a = self.args
        ids = torch.randint(0, 1000, (100,))
        head, _ = eagle.load(None, loaded)
        embed, lm_head = loaded.model.get_input_embeddings(), loaded.model.get_output_embeddings()
        with torch.no_grad():
            hidden = loaded.model.model(ids[None].to(a.device)).last_hidden_state[0]
        ctx = Context(token_ids=ids.tolist(), prompt_len=100, params=SamplingParams(), target_hidden=hidden[:-1])
        drafters = {"eager": EagleProposer.from_head(head, embed, lm_head, tree_size=48),
                    "static cache + graphs": GraphEagleProposer.from_head(head, embed, lm_head, tree_size=48, max_depth=a.k,
                                                                          max_length=a.max_length)}
        for name, p in drafters.items():
            tree = p.propose(ctx, a.k)  # the first call feeds the prompt; later calls draft one tree each
            ms = gpu_time_ms(lambda: p.propose(ctx, a.k))
            rows.append({"what": f"EAGLE draft, tree of {tree.k} nodes (top-8, depth {a.k}), {name}", "ms": ms})
        runner = CudaGraphRunner(lean, max_length=a.max_length, output_hidden=True)
        runner.forward(ids[:-1])
        feed = torch.cat([ids[-1:], tree.tokens.cpu()])
        parents = torch.cat([torch.tensor([-1]), tree.parents.cpu() + 1])
        for what, step in ((f"chain of {a.k + 1}", lambda: runner.forward(feed[: a.k + 1])),
                           (f"tree of {feed.numel()}", lambda: runner.forward(feed, tree_parents=parents))):
            ms = gpu_time_ms(lambda: (step(), runner.rollback(99)))
            rows.append({"what": f"target verify, {what} tokens, CudaGraphRunner ({'graph' if runner.num_graphs else 'eager'})",
                         "ms": ms})
        runner.close()
        drafters["static cache + graphs"].close()

    def _micro_engine(self, rows, lean, method, draft, b, graphs) -> None:
        a = self.args
        eng = BatchSpeculator(lean, method=method, draft=draft, k=a.k, max_batch=b, max_length=a.max_length, use_graphs=graphs)
        kv = 512 if 512 in eng.kv_buckets else eng.kv_buckets[-1]
        for spec in ((False, True) if method != "none" else (False,)):
            fn = eng._step_fn(spec, kv)
            ms = gpu_time_ms(fn)
            what = (f"step {'spec ' + method if spec else 'plain'} k={a.k if spec else 0}, batch {b}, kv {kv}, "
                    f"{'graph' if fn.graph is not None else 'eager'}")
            rows.append({"what": what, "ms": ms})
        eng.close()

    def part_hf(self) -> None:
        from specdeploy.models.layerskip import layerskip_model

        a = self.args
        loaded = self.load(torch.bfloat16)
        model = loaded.model
        prompts, enc = self.prompts(loaded.tokenizer, a.hf_prompts_per_task)
        eos = loaded.stop_ids()
        self.hf("HF generate eager", model, loaded.tokenizer, prompts, enc, eos, {}, a.hf_time_cap)
        self.hf("HF prompt lookup", model, loaded.tokenizer, prompts, enc, eos,
                {"prompt_lookup_num_tokens": a.k, "max_matching_ngram_size": 4}, a.hf_time_cap)
        shallow = layerskip_model(model, a.layerskip_layers)
        shallow.generation_config = copy.deepcopy(model.generation_config)
        shallow.generation_config.num_assistant_tokens = a.k
        shallow.generation_config.num_assistant_tokens_schedule = "constant"
        self.hf("HF assisted (layerskip assistant)", model, loaded.tokenizer, prompts, enc, eos,
                {"assistant_model": shallow}, a.hf_time_cap)
        all_prompts, all_enc = self.prompts(loaded.tokenizer, 8)
        for b in a.batches:
            self.hf_batched(model, all_prompts, all_enc, eos, b)

    def part_lossless(self) -> None:
        a = self.args
        loaded, prompts, enc, eos, lean, drafts = self.setup(torch.float32)
        plain = "specdeploy plain|float32|b1|on"
        self.fused("specdeploy plain", lean, "none", None, 1, "on", prompts, enc, eos, "float32", None)
        self.fused("specdeploy ngram", lean, "ngram", None, 1, "on", prompts, enc, eos, "float32", plain)
        for dname, d in drafts.items():
            self.fused(f"specdeploy {dname}", lean, "draft", d, 1, "on", prompts, enc, eos, "float32", plain)
        b = max(a.batches)
        self.fused("specdeploy ngram", lean, "ngram", None, b, "auto", prompts, enc, eos, "float32", plain)
        self.fused("specdeploy layerskip", lean, "draft", drafts["layerskip"], b, "on", prompts, enc, eos, "float32", plain)
        if a.head_methods:  # token trees through the graphs, against the fused plain outputs of the same prompts
            lp, lenc, ref = self.loop_prompts(loaded, prompts, plain)
            for method in a.head_methods:
                self.loop(f"specdeploy {method} (loop)", lean, method, None, lp, lenc, eos, ref, loaded, "float32")


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync_quiet() -> None:
    try:
        _sync()
    except Exception:  # noqa: BLE001
        pass


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _empty_cache() -> None:
    import gc

    gc.collect()  # graphs of finished configurations hold memory until their reference cycles go
    if _cuda():
        torch.cuda.empty_cache()


def _reset_peak() -> None:
    if _cuda():
        torch.cuda.reset_peak_memory_stats()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if _cuda() else 0


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if _cuda() else 0


def gpu_time_ms(fn, warmup: int = 5, reps: int = 50) -> float:
    """Median milliseconds of fn() on the GPU, by CUDA events (host clock on CPU)."""
    if not _cuda():
        warmup, reps = 1, 3
    for _ in range(warmup):
        fn()
    times = []
    if not _cuda():
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return round(sorted(times)[len(times) // 2], 4)
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return round(times[len(times) // 2], 4)


def _extra_weights(lean: LeanLlama, draft: LeanLlama | None) -> int:
    if draft is None:
        return 0
    mine = {t.data_ptr() for w in lean.layers for t in (w.wqkv, w.wo, w.w_gate_up, w.w_down)}
    return sum(t.numel() * t.element_size() for w in draft.layers for t in (w.wqkv, w.wo, w.w_gate_up, w.w_down)
               if t.data_ptr() not in mine)


def _count_generated(ids: list[int], eos: list[int]) -> int:
    for i, t in enumerate(ids):
        if t in eos:
            return i + 1
    return len(ids)


def _divergences(outs: list[list[int]], ref: list[list[int]]) -> list[dict]:
    out = []
    for i, (o, r) in enumerate(zip(outs, ref)):
        if o != r:
            at = next((j for j, (x, y) in enumerate(zip(o, r)) if x != y), min(len(o), len(r)))
            out.append({"prompt": i, "at_token": at, "len": len(o), "ref_len": len(r)})
    return out


# ---- report -------------------------------------------------------------------------------
def render(payloads: list[dict]) -> str:
    micro = [r for p in payloads for r in p["records"] if r["path"] == "micro"]
    recs = [r for p in payloads for r in p["records"] if r["path"] != "micro"]
    lines = ["# GPU benchmark: specdeploy compiled paths vs Hugging Face", ""]
    for p in payloads:
        m = p["meta"]
        kernels = f", layer kernels {m['kernels']}" if m.get("kernels") else ""
        lines.append(f"- `{m['command']}` — {m['device']}, torch {m['torch']}, transformers {m['transformers']}, {m['date']}, "
                     f"parts {m['parts']}{kernels}")
    lines += ["", "Greedy decoding, bfloat16 unless marked, eval prompts (8 per task unless a row says fewer), "
              f"max_new_tokens {recs[0]['max_new_tokens'] if recs else '-'}. tokens/s at batch 1 = a task's tokens over "
              "the sum of its requests' wall times (prefill included); at batch > 1 = all tokens over the run's wall time. "
              "α = accepted / proposed draft tokens; acc. len = tokens per target forward.", ""]
    b1 = [r for r in recs if r["batch"] == 1 and r["dtype"] == "bfloat16"]
    if b1:
        base = next((r for r in b1 if r["name"] == "HF generate eager"), None)
        lines += ["## Batch 1, tokens/s per task", ""]
        lines.append("| task | " + " | ".join(_label(r) for r in b1) + " |")
        lines.append("|---" * (len(b1) + 1) + "|")
        for t in [*TASKS, "all"]:
            cells = []
            for r in b1:
                row = r["total"] if t == "all" else r["per_task"].get(t)
                cells.append("-" if not row else f"{row['tokens_per_s']:.0f}")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        if base:
            lines.append("| speedup vs HF eager (all) | " + " | ".join(
                f"{r['total']['tokens_per_s'] / base['total']['tokens_per_s']:.1f}x" for r in b1) + " |")
        lines += ["", "## Batch 1, α / acceptance length per task (speculative rows)", ""]
        spec = [r for r in b1 if r.get("k")]
        lines.append("| task | " + " | ".join(_label(r) for r in spec) + " |")
        lines.append("|---" * (len(spec) + 1) + "|")
        for t in [*TASKS, "all"]:
            cells = []
            for r in spec:
                row = r["total"] if t == "all" else r["per_task"].get(t)
                cells.append("-" if not row or row.get("alpha") is None else f"{row['alpha']:.2f} / {row['acceptance_length']:.2f}")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "## All configurations (aggregate)", "",
              "| config | path | dtype | batch | switch | prompts | tokens | tokens/s | α | acc. len | peak GPU MiB (resident before) | outputs ≠ plain | notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        t = r["total"]
        mism = r.get("mismatches_vs_plain")
        steps = r.get("switch_steps")
        note = r.get("notes", "")
        if steps and r.get("switch") == "auto":
            note = f"spec steps {steps['spec']}, plain steps {steps['plain']}"
        lines.append(f"| {r['name']} | {r['path']} | {r['dtype']} | {r['batch']} | {r.get('switch', '-')} | {r['prompts']} | "
                     f"{t.get('tokens', '-')} | {t['tokens_per_s']:.1f} | {_f(t.get('alpha'))} | {_f(t.get('acceptance_length'))} | "
                     f"{r.get('peak_mem_bytes', 0) / 2**20:.0f}{_resident(r)} | {'-' if mism is None else str(mism) + '/' + str(r['prompts'])} | {note} |")
    for m in micro:
        lines += ["", "## Milliseconds per step (median of 50, CUDA events)", "", "| step | ms |", "|---|---|"]
        lines += [f"| {r['what']} | {r['ms']:.3f} |" for r in m["rows"]]
    lines.append("")
    return "\n".join(lines)


def _resident(r: dict) -> str:
    b = r.get("resident_before_bytes")
    return "" if b is None else f" ({b / 2**20:.0f})"


def _label(r: dict) -> str:
    return r["name"] + (" (auto)" if r.get("switch") == "auto" else "") + (f" ({r['prompts']} prompts)" if r["path"] == "hf" or r["path"] == "loop" else "")


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specdeploy gpu-bench", description=__doc__.split("\n")[0])
    add_args(p)
    return p


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="smollm2", help="'smollm2', a .gguf file or an HF directory")
    p.add_argument("--out", default="results/gpu", help="folder for the JSON and markdown")
    p.add_argument("--tag", default="gpu_bench", help="file name stem")
    p.add_argument("--parts", default="spec,loop,hf,lossless", help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run of the script")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512, help="context per request of the compiled engines")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--layerskip-layers", type=int, default=None)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--batches-micro", default="1,8,32")
    p.add_argument("--extra-ngram-k", default="8", help="more n-gram draft lengths to bench (comma-separated)")
    p.add_argument("--prompts-per-task", type=int, default=8)
    p.add_argument("--loop-prompts-per-task", type=int, default=2)
    p.add_argument("--head-methods", default=",".join(HEAD_METHODS),
                   help="methods drafting from the target's hidden states to bench as loop rows (comma-separated; '' for none)")
    p.add_argument("--hf-prompts-per-task", type=int, default=1)
    p.add_argument("--hf-time-cap", type=float, default=75.0, help="seconds per HF peer before it starts no new prompt")
    p.add_argument("--render", nargs="*", help="only merge these JSON files into one markdown table")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        payloads = [json.loads(Path(f).read_text()) for f in args.render]
        (out / f"{args.tag}.md").write_text(render(payloads))
        print(f"wrote {out / (args.tag + '.md')}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-bench needs a CUDA device (--device cpu for a dry run)", file=sys.stderr)
        return 2
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.batches = [int(x) for x in str(args.batches).split(",") if x.strip()]
    args.batches_micro = [int(x) for x in str(args.batches_micro).split(",") if x.strip()]
    args.extra_ngram_k = [int(x) for x in str(args.extra_ngram_k).split(",") if x.strip()]
    args.head_methods = [x.strip() for x in str(args.head_methods).split(",") if x.strip()]
    unknown = sorted(set(args.head_methods) - set(HEAD_METHODS))
    if unknown:
        print(f"--head-methods: unknown {', '.join(unknown)}; choose from {', '.join(HEAD_METHODS)}", file=sys.stderr)
        return 2
    import transformers

    bench = Bench(args)
    meta = {"command": "python -m specdeploy.bench.gpu_bench " + " ".join(shlex.quote(a) for a in argv),
            "device": torch.cuda.get_device_name() if _cuda() else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "parts": args.parts}
    t = time.perf_counter()
    try:
        for part in ("micro", "spec", "hf", "lossless"):
            if part in args.parts:
                getattr(bench, f"part_{part}")()
    finally:
        meta["wall_s"] = round(time.perf_counter() - t, 1)
        meta["kernels"] = bench.kernels
        payload = {"meta": meta, "records": bench.records, "errors": bench.errors}
        (out / f"{args.tag}.json").write_text(json.dumps(payload, indent=1) + "\n")
        (out / f"{args.tag}.md").write_text(render([payload]))
        print(render([payload]), flush=True)
    return 0


def add_cli(subparsers) -> None:
    """`specdeploy gpu-bench`."""
    p = subparsers.add_parser("gpu-bench", help="benchmark the compiled GPU paths against Hugging Face (needs CUDA)")
    add_args(p)
    p.set_defaults(func=lambda args: run(args, sys.argv[2:]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
