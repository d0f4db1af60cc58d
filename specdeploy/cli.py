"""The `specdeploy` command. Each subcommand module registers itself with `add_cli(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import NoReturn

from specdeploy.config import METHODS, SpecConfig
from specdeploy.errors import SpecDeployError

# modules that add their own subcommands: each has add_cli(subparsers)
COMMAND_MODULES: list[str] = ["specdeploy.build.estimate", "specdeploy.triton_repo.cli", "specdeploy.build.cli",
                              "specdeploy.training.cli", "specdeploy.bench.run", "specdeploy.bench.advisor",
                              "specdeploy.bench.gpu_bench"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line on stderr, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="smollm2", help="'smollm2', a .gguf file or a Hugging Face directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on cpu, bfloat16 on cuda")


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="ngram", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--draft", help="draft model (HF directory or .gguf) or draft artifact (medusa/eagle/draft); "
                                   "default: the shipped artifact")
    p.add_argument("--k", type=int, default=4, help="draft tokens per step (1..64)")
    p.add_argument("--ngram-min", type=int, default=1)
    p.add_argument("--ngram-max", type=int, default=4)
    p.add_argument("--layerskip-layers", type=int, help="layers in the layerskip draft (default: a quarter)")
    p.add_argument("--tree-size", type=int, help="nodes per token tree (medusa, eagle, multi, specinfer); 0 = a chain of k "
                                                 "(default: medusa the artifact's tree, eagle 48, 63 on the compiled GPU "
                                                 "runner; chains on a CPU, where every verified token costs)")
    p.add_argument("--tree-topk", type=int, default=SpecConfig.tree_topk, help="EAGLE-2 tree: nodes expanded per depth (1..64)")
    p.add_argument("--draft-confidence", type=float,
                   help="draft, layerskip and medusa: draft no token where the draft's probability of the path "
                        "falls below this (0: always k tokens / the whole tree; default: draft and layerskip 0.1, "
                        "medusa 0.005)")
    p.add_argument("--switch", choices=["on", "auto"], default="on",
                   help="auto: decode plain steps wherever a request's measured acceptance does not pay for drafting")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")


def _sampling(args: argparse.Namespace):
    from specdeploy.config import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, stop=tuple(args.stop))


def _spec(args: argparse.Namespace, method: str | None = None):
    return SpecConfig(method=method or args.method, k=args.k, draft=args.draft, ngram_min=args.ngram_min,
                      ngram_max=args.ngram_max, layerskip_layers=args.layerskip_layers,
                      tree_size=args.tree_size, tree_topk=args.tree_topk, switch=args.switch,
                      draft_confidence=args.draft_confidence)


def cmd_generate(args: argparse.Namespace) -> int:
    from specdeploy.bench.tasks import Prompt, load_prompts

    params, spec = _sampling(args), _spec(args)  # validate before any loading
    prompts = load_prompts(args.prompts) if args.prompts else [Prompt(args.task, args.prompt)]
    if args.prompts and args.task != "default":
        prompts = [Prompt(args.task, p.prompt) for p in prompts]
    if not args.prompts and not args.prompt.strip():
        raise SpecDeployError("empty prompt")
    if args.batch < 1:
        raise SpecDeployError(f"--batch must be >= 1, got {args.batch}")
    if args.json or not args.prompts or args.batch > 1:
        return _generate_each(args, spec, params, prompts)
    return _generate_table(args, spec, params, prompts)


def _generate_each(args, spec, params, prompts, engine=None, label: str | None = None) -> int:
    """One result per prompt (JSON line, or text + a stats line on stderr); all prompts encoded first.
    --batch N > 1: the prompts go through the batched engine, N at a time, then print in order."""
    import time

    from specdeploy.runtime.engine import SpecEngine

    engine = engine or SpecEngine.load(spec, args.target, args.device, args.dtype, policy=args.policy)
    encoded = [engine.encode(p.prompt, args.raw, params.max_new_tokens) for p in prompts]
    batch = args.batch
    start = time.perf_counter()
    if batch > 1:
        results = engine.generate_batch(encoded, params, [p.task for p in prompts], batch)
    else:
        results = (engine.generate_ids(ids, params, p.task) for p, ids in zip(prompts, encoded))  # printed as they end
    for r in results:
        if args.json:
            print(json.dumps(r.as_json()), flush=True)
        else:
            s = r.stats
            print(r.text, flush=True)
            alpha = "-" if s.alpha is None else f"{s.alpha:.2f}"
            print(f"[{label or spec.method}] α={alpha} acceptance_length={s.acceptance_length:.2f} "
                  f"tokens={s.emitted} tokens/s={s.tokens_per_s:.1f} finish={r.finish_reason}", file=sys.stderr)
    if batch > 1:
        tokens, wall = sum(len(r.token_ids) for r in results), time.perf_counter() - start
        print(f"[{label or spec.method}] batch {batch}: {len(results)} requests, {tokens} tokens in {wall:.2f} s, "
              f"{tokens / wall:.1f} tokens/s", file=sys.stderr)
    return 0


def _generate_table(args, spec, params, prompts) -> int:
    from rich.console import Console

    from specdeploy.bench.compare import compare_methods, task_table
    from specdeploy.runtime.engine import SpecEngine

    engine = SpecEngine.load(spec, args.target, args.device, args.dtype, policy=args.policy)
    engines = [("none", SpecEngine(engine.target, _spec(args, "none"), runner=engine.runner))]
    if spec.method != "none":
        engines.append((spec.method, engine))
    runs = compare_methods(engines, prompts, params, args.raw)
    Console().print(task_table(runs))
    return 0


def _default_demo_methods() -> str:
    """n-gram, plus each trained draft shipped in specdeploy/models/artifacts (layerskip is opt-in: untrained, it rarely pays)."""
    from specdeploy.models.artifacts import ARTIFACTS_DIR, DEFAULTS, MANIFEST

    shipped = {"draft_lm": "draft", "medusa": "medusa", "eagle": "eagle"}
    return ",".join(["ngram"] + [m for kind, m in shipped.items() if (ARTIFACTS_DIR / DEFAULTS[kind] / MANIFEST).is_file()])


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default on the built-in suite of ten task types: α and speedup per task."""
    from datetime import date

    from rich.console import Console

    from specdeploy.bench.compare import compare_methods, task_table
    from specdeploy.bench.tasks import builtin_prompts
    from specdeploy.runtime.engine import SpecEngine

    params = _sampling(args)
    methods = [m.strip() for m in (args.methods or _default_demo_methods()).split(",") if m.strip()]
    specs = [_spec(args, m) for m in ["none"] + [m for m in methods if m != "none"]]
    prompts = builtin_prompts("demo")
    console = Console()
    console.print(f"specdeploy demo — target {args.target}, device {args.device}, k={args.k}, "
                  f"max_new_tokens={params.max_new_tokens}, {len(prompts)} prompts, {date.today()}")
    base = SpecEngine.load(specs[0], args.target, args.device, args.dtype)
    engines = [(s.method, SpecEngine(base.target, s, runner=base.runner) if s.method != "draft" else SpecEngine.load(s, args.target, args.device, args.dtype)) for s in specs]
    runs = compare_methods(engines, prompts, params, args.raw)
    console.print(task_table(runs, title="α and speedup per task (greedy, lossless)"))
    mismatches = sum(a.token_ids != b.token_ids for run in runs[1:] for a, b in zip(run.results, runs[0].results))
    console.print(f"greedy outputs differing from plain decoding: {mismatches}" if params.greedy else "")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specdeploy", description="Lossless speculative decoding: export, build, serve, measure.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text with speculative decoding")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="JSONL file: {\"prompt\": ..., \"task\": ...} per line")
    g.add_argument("--task", default="default", help="task label for stats")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.add_argument("--policy", help="policy.json (from `specdeploy advise`): method and k, or off, per task")
    g.add_argument("--batch", type=int, default=1,
                   help="N > 1: decode the prompts N at a time in the batched engine (none, ngram, layerskip, draft or "
                        "eagle chains; greedy or sampled, --seed seeding the whole run; fast on cuda)")
    _add_model_args(g)
    _add_spec_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="run the embedded default on ten task types and print α and speedup")
    d.add_argument("--methods", default=None,
                   help="comma-separated methods to compare with none (default: ngram, plus the shipped trained drafts)")
    _add_model_args(d)
    _add_spec_args(d)
    _add_sampling_args(d, max_new_tokens=64)
    d.set_defaults(func=cmd_demo)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SPECDEPLOY_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return int(args.func(args) or 0)
    except SpecDeployError as e:
        print(f"specdeploy: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
