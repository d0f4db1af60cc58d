"""`specdeploy train data|draft|medusa|eagle|vocab`: self-distillation data and trained drafts.

Typical run for the embedded target (on a GPU; see docs/training.md):

    specdeploy train data   --device cuda --out artifacts/distill
    specdeploy train draft  --device cuda --data artifacts/distill
    specdeploy train medusa --device cuda --data artifacts/distill
    specdeploy train eagle  --device cuda --data artifacts/distill

Without --out, a trained draft of the embedded target replaces the shipped default
(specdeploy/models/artifacts/smollm2-*); for any other target --out is required.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from specdeploy.config import DRAFT_VOCAB_COVERAGE
from specdeploy.errors import SpecDeployError

DEFAULT_DATA = "artifacts/distill"
VOCAB_KINDS = {"draft": "draft_lm", "medusa": "medusa", "eagle": "eagle"}  # train vocab --method -> artifact kind


def add_cli(sub) -> None:
    train = sub.add_parser("train", help="make self-distillation data and train drafts (draft LM, Medusa, EAGLE)")
    tsub = train.add_subparsers(dest="train_command", required=True, parser_class=type(train))

    d = tsub.add_parser("data", help="the target answers the offline training prompts (greedy and sampled)")
    _model_args(d)
    d.add_argument("--out", default=DEFAULT_DATA, help=f"data folder (default {DEFAULT_DATA})")
    d.add_argument("--n-per-task", type=int, default=300, help="training prompts per task type (10 types)")
    d.add_argument("--modes", default="greedy,sampled", help="answer modes: greedy, sampled (comma-separated)")
    d.add_argument("--temperature", type=float, default=0.7, help="temperature of the sampled answers")
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--max-prompt-tokens", type=int, default=384, help="longer prompts are left out")
    d.add_argument("--batch-size", type=int, default=128, help="prompts answered together")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_data)

    for name, helptext in (("draft", "a small Llama distilled from the target (KL on its logits)"),
                           ("medusa", "Medusa-1 heads on the frozen target, with a sparse token tree"),
                           ("eagle", "an EAGLE head (feature regression + cross-entropy)")):
        p = tsub.add_parser(name, help=helptext)
        _model_args(p)
        p.add_argument("--data", nargs="+", default=[DEFAULT_DATA],
                       help="folder(s) made by `specdeploy train data` (several: trained on all, e.g. runs with different seeds)")
        p.add_argument("--out", help="artifact folder (default: the shipped artifact, for the embedded target)")
        p.add_argument("--steps", type=int, default=3000, help="most optimisation steps")
        p.add_argument("--minutes", type=float, help="wall-clock budget; the schedule is fitted to it")
        p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
        p.add_argument("--seq-len", type=int, default=512)
        p.add_argument("--lr", type=float, default=1e-3 if name == "medusa" else 5e-4)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--init", metavar="DIR",
                       help="start from this trained artifact of the same kind (continue training; default: from the target)")
        p.set_defaults(func=cmd_train, kind=name)
        if name == "draft":
            p.add_argument("--layers", type=int, default=2, help="decoder layers in the draft")
            p.add_argument("--init-layers", help="target layers to start from, e.g. 0,29 (default: the first ones)")
        if name == "medusa":
            p.add_argument("--heads", type=int, default=4)
            p.add_argument("--tree-size", type=int, default=48, help="nodes in the sparse token tree")
        if name == "eagle":
            p.add_argument("--ce-weight", type=float, default=0.1, help="weight of the token cross-entropy")
            p.add_argument("--noise", type=float, default=0.2, help="uniform noise width on input features")
            p.add_argument("--unroll", type=int, default=2,
                           help="passes per batch: 2 or more also trains on the head's own predictions (HASS)")
        _vocab_arg(p)

    v = tsub.add_parser("vocab", help="give a trained draft a draft vocabulary from distillation data (no training)")
    _model_args(v)
    v.add_argument("--method", choices=sorted(VOCAB_KINDS), default="eagle", help="the kind of draft (default eagle)")
    v.add_argument("--draft", help="its artifact folder, rewritten in place (default: the shipped one)")
    v.add_argument("--data", nargs="+", default=[DEFAULT_DATA], help="folder(s) made by `specdeploy train data`")
    _vocab_arg(v)
    v.set_defaults(func=cmd_vocab)


def _vocab_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-vocab-coverage", type=float, default=DRAFT_VOCAB_COVERAGE,
                   help="the draft scores only the fewest ids covering this share of the data's answer tokens "
                        f"(FR-Spec; default {DRAFT_VOCAB_COVERAGE}); 0: the whole vocabulary")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="smollm2", help="'smollm2', a .gguf file or a Hugging Face directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="target dtype (default: bfloat16 on cuda for data, float32 for training)")


def _command() -> str:
    argv = sys.argv[1:]
    if argv[:1] != ["train"]:  # run as `python -m specdeploy.training.cli`
        argv = ["train"] + argv
    return "specdeploy " + " ".join(shlex.quote(a) for a in argv)


def _load_target(args, default_dtype: str):
    from specdeploy.models.loader import load_model
    from specdeploy.runtime.engine import resolve_device

    device, dtype = resolve_device(args.device, args.dtype or (default_dtype if args.device != "cpu" else "float32"))
    return load_model(args.target, device=device, dtype=dtype)


def cmd_data(args: argparse.Namespace) -> int:
    from specdeploy.training.data import make_data

    target = _load_target(args, "bfloat16")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    m = make_data(target, Path(args.out), args.n_per_task, args.seed, modes, args.temperature, args.max_new_tokens,
                  args.max_prompt_tokens, args.batch_size, command=_command())
    print(f"{m['num_sequences']} sequences, {m['num_tokens']} tokens ({m['answer_tokens']} in answers) "
          f"in {m['seconds']} s -> {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from specdeploy.models.artifacts import ARTIFACTS_DIR, DEFAULTS
    from specdeploy.models.loader import EMBEDDED
    from specdeploy.training.common import DistillData, TrainConfig

    kind = {"draft": "draft_lm"}.get(args.kind, args.kind)
    if args.out:
        out = Path(args.out)
    elif args.target in EMBEDDED:
        out = ARTIFACTS_DIR / DEFAULTS[kind]
    else:
        raise SpecDeployError("--out is required when the target is not the embedded default")
    data = DistillData.load_all(args.data)
    target = _load_target(args, "float32")  # fp32 weights; autocast runs bf16 matmuls on GPU
    _check_data(data, target, args.data)
    cfg = TrainConfig(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, seq_len=args.seq_len,
                      lr=args.lr, seed=args.seed)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.kind == "draft":
        from specdeploy.training.draft_lm import train_draft

        layers = [int(x) for x in args.init_layers.split(",")] if args.init_layers else None
        m = train_draft(target, data, out, cfg, args.layers, layers, _command(), log, init=args.init,
                        draft_vocab_coverage=args.draft_vocab_coverage)
    elif args.kind == "medusa":
        from specdeploy.training.medusa import train_medusa

        m = train_medusa(target, data, out, cfg, args.heads, args.tree_size, command=_command(), log=log, init=args.init,
                         draft_vocab_coverage=args.draft_vocab_coverage)
    else:
        from specdeploy.training.eagle import train_eagle

        m = train_eagle(target, data, out, cfg, args.ce_weight, args.noise, args.unroll, _command(), log, init=args.init,
                        draft_vocab_coverage=args.draft_vocab_coverage)
    print(f"{args.kind}: {m['training']['steps_done']} steps, final {m['final_losses']} -> {out}")
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from specdeploy.training.common import DistillData, set_draft_vocab

    data = DistillData.load_all(args.data) if args.draft_vocab_coverage else None  # coverage 0: none needed
    target = _load_target(args, "float32")
    if data is not None:
        _check_data(data, target, args.data)
    folder, m = set_draft_vocab(VOCAB_KINDS[args.method], args.draft, target, data, args.draft_vocab_coverage, _command())
    vocab = m["draft_vocab"]
    print(f"{args.method}: draft vocabulary of {vocab['size']} ids, {vocab['covered']:.2%} of {vocab['answer_tokens']} "
          f"answer tokens" if vocab else f"{args.method}: drafts from the whole vocabulary", f"-> {folder}")
    return 0


def _check_data(data, target, folders: list[str]) -> None:
    if data.manifest.get("target_hash") != target.source_hash:
        raise SpecDeployError(f"{' '.join(folders)} was made by another target ({str(data.manifest.get('target_hash'))[:12]}); "
                              f"make data with this target first")


def main(argv: list[str] | None = None) -> int:
    """`python -m specdeploy.training.cli data|draft|medusa|eagle ...`: the same as `specdeploy train ...`."""
    from specdeploy.cli import main as specdeploy_main

    return specdeploy_main(["train"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
