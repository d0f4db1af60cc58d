"""What every draft trainer shares: the distillation data on disk, batches, the target's
features, the optimisation loop (AdamW, warm-up + cosine, a wall-clock budget), loss curves
and the artifact manifest.

Data folder (written by `specdeploy train data`): ``tokens.safetensors`` holds every
sequence (prompt + the target's answer) back to back: ``ids`` [total] int32, ``offsets``
[n + 1] int64, ``prompt_lens`` [n] int32, ``task`` [n] int32 (index in bench.tasks.TASKS),
``mode`` [n] int32 (index in `manifest["modes"]`); ``manifest.json`` says how it was made.
The target's hidden states are not stored: trainers recompute them (one forward of a
135M target costs less than reading them back).
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from specdeploy.errors import SpecDeployError
from specdeploy.models import artifacts
from specdeploy.models.artifacts import tokenizer_hash
from specdeploy.models.draft_vocab import KEY as VOCAB_KEY
from specdeploy.models.draft_vocab import draft_vocab_tensors, frequent_ids
from specdeploy.models.loader import LoadedModel

TOKENS_FILE, DATA_MANIFEST = "tokens.safetensors", "manifest.json"


@dataclass
class DistillData:
    ids: torch.Tensor  # [total] int32
    offsets: torch.Tensor  # [n + 1] int64
    prompt_lens: torch.Tensor  # [n] int32
    manifest: dict

    @classmethod
    def load(cls, folder: str | Path) -> "DistillData":
        folder = Path(folder)
        if not (folder / TOKENS_FILE).is_file():
            raise SpecDeployError(f"{folder}: no {TOKENS_FILE}; make the data first with `specdeploy train data`")
        t = load_file(str(folder / TOKENS_FILE))
        return cls(t["ids"], t["offsets"], t["prompt_lens"], json.loads((folder / DATA_MANIFEST).read_text()))

    @classmethod
    def load_all(cls, folders: list[str | Path]) -> "DistillData":
        """Several data folders as one (each made by `specdeploy train data`, all by one target): a
        larger set from runs with different seeds. One folder loads as `load` does."""
        parts = [cls.load(f) for f in folders]
        if len(parts) == 1:
            return parts[0]
        targets = {p.manifest.get("target_hash") for p in parts}
        if len(targets) > 1:
            raise SpecDeployError(f"{', '.join(map(str, folders))}: made by different targets; train on one target's data")
        shifts = torch.tensor([0] + [int(p.offsets[-1]) for p in parts[:-1]]).cumsum(0).tolist()
        offsets = torch.cat([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)])
        summaries = [p.summary() for p in parts]
        manifest = {"kind": "distill_data", "target_hash": targets.pop(), "num_sequences": sum(len(p) for p in parts),
                    "num_tokens": int(offsets[-1]),
                    "sha256": hashlib.sha256(" ".join(str(m.get("sha256")) for m in summaries).encode()).hexdigest(),
                    "parts": summaries}
        return cls(torch.cat([p.ids for p in parts]), offsets, torch.cat([p.prompt_lens for p in parts]), manifest)

    def __len__(self) -> int:
        return int(self.offsets.numel()) - 1

    def sequence(self, i: int) -> torch.Tensor:
        return self.ids[int(self.offsets[i]) : int(self.offsets[i + 1])].long()

    def answer_counts(self, vocab_size: int) -> torch.Tensor:
        """[vocab_size] int64: how often the target emitted each id in the answers (prompts left out)."""
        pos = torch.arange(int(self.offsets[-1]))
        seq = torch.searchsorted(self.offsets, pos, right=True) - 1
        answer = pos - self.offsets[seq] >= self.prompt_lens.long()[seq]
        ids = self.ids[answer].long()
        if ids.numel() and int(ids.max()) >= vocab_size:
            raise SpecDeployError(f"the data holds token id {int(ids.max())}, over the target's vocabulary of {vocab_size}")
        return torch.bincount(ids, minlength=vocab_size)

    def split(self, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """Train and validation sequence indices (at least one validation sequence)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, int(len(order) * val_fraction))
        return order[n_val:], order[:n_val]

    def summary(self) -> dict:
        """What an artifact's manifest records about its training data."""
        keep = ("kind", "target_hash", "num_sequences", "num_tokens", "n_per_task", "seed", "modes",
                "max_new_tokens", "counts", "sha256", "command", "parts")
        return {k: self.manifest[k] for k in keep if k in self.manifest}


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor  # [B, T] int64, right-padded
    valid: torch.Tensor  # [B, T] bool, True on real tokens


def batches(data: DistillData, indices: list[int], batch_size: int, seq_len: int, device: torch.device,
            seed: int, pool: int = 64) -> Iterator[Batch]:
    """Endless shuffled batches of whole sequences (cut to seq_len), padded on the right.

    Sequences of similar length share a batch: each run of `pool` batches' worth of shuffled
    sequences is sorted by length and cut into batches, and those batches are shuffled. A batch is
    as long as its longest sequence, so random batches of sequences of varied length are largely padding,
    which every vocabulary-sized loss tensor pays for. Right padding needs no attention mask: with
    causal attention, real tokens never see it.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = (data.offsets[1:] - data.offsets[:-1]).clamp(max=seq_len).tolist()
    chunk = pool * batch_size
    while True:
        order = [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]
        groups = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
            groups += [part[b : b + batch_size] for b in range(0, len(part) - batch_size + 1, batch_size)]
        for g in torch.randperm(len(groups), generator=gen).tolist():
            yield make_batch(data, groups[g], seq_len, device)
        if len(order) < batch_size:
            yield make_batch(data, order, seq_len, device)


def make_batch(data: DistillData, rows: list[int], seq_len: int, device: torch.device) -> Batch:
    seqs = [data.sequence(i)[:seq_len] for i in rows]
    t = max(s.numel() for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    valid = torch.zeros(len(seqs), t, dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, : s.numel()] = s
        valid[r, : s.numel()] = True
    return Batch(ids.to(device), valid.to(device))


@torch.no_grad()
def target_features(target: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """The target's last hidden state after its final norm (the input of lm_head): [B, T, H]."""
    return target.model.model(input_ids=ids, use_cache=False).last_hidden_state


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T] over positions where mask [B, T] is True."""
    return (x * mask).sum() / mask.sum().clamp_min(1)


CURVE_KEYS = ("step", "lr", "seconds")  # a loss-curve point's keys besides its metrics


@dataclass
class TrainConfig:
    steps: int = 2000  # upper bound; the wall-clock budget may end training sooner
    minutes: float | None = None  # wall-clock budget for the optimisation loop
    batch_size: int = 16  # sequences per step
    seq_len: int = 512
    lr: float = 5e-4
    warmup: int = 50
    weight_decay: float = 0.0
    val_fraction: float = 0.02
    val_batches: int = 4
    log_every: int = 25
    seed: int = 0


@dataclass
class TrainResult:
    steps: int
    seconds: float
    curve: list[dict] = field(default_factory=list)  # {"step", metric: value} every log_every steps
    final: dict = field(default_factory=dict)  # metrics averaged over the last 10% of steps
    val: dict = field(default_factory=dict)


def train_loop(params: list[torch.nn.Parameter], loss_fn: Callable[[Batch], tuple[torch.Tensor, dict]],
               data: DistillData, cfg: TrainConfig, device: torch.device) -> tuple[TrainResult, list[int]]:
    """AdamW with warm-up and cosine decay; stops at cfg.steps or when cfg.minutes are spent.

    The cosine follows the run's progress: the larger of steps done / cfg.steps and time spent /
    cfg.minutes, so a time-bound run ends its decay as its budget ends. (Planning a step count from
    early step times ended runs at about half of their budget: on an H200 the first few hundred
    steps ran about twice as slow as the rest, results/gpu/session19.) Returns the result and the
    validation indices.
    """
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    train_idx, val_idx = data.split(cfg.val_fraction, cfg.seed)
    stream = batches(data, train_idx, cfg.batch_size, cfg.seq_len, device, cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    budget = cfg.minutes * 60 if cfg.minutes else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    curve, window = [], []
    start = time.perf_counter()
    step = 0

    def progress() -> float:
        done = step / cfg.steps
        return min(1.0, max(done, (time.perf_counter() - start) / budget) if budget else done)

    bar = tqdm(total=None if budget else cfg.steps, desc="training", unit="step", mininterval=5, file=sys.stderr)
    p = progress()
    while p < 1.0:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * p))
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast:
            loss, metrics = loss_fn(next(stream))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        window.append({k: v.detach() if torch.is_tensor(v) else float(v) for k, v in metrics.items()})
        p = progress()
        if step % cfg.log_every == 0 or p >= 1.0:
            window[-cfg.log_every :] = _to_floats(window[-cfg.log_every :])
            # seconds: when the window's metrics reached the host, so the curve also shows step times
            point = {"step": step, "lr": lr, "seconds": round(time.perf_counter() - start, 3),
                     **_average(window[-cfg.log_every :])}
            curve.append(point)
            bar.set_postfix({k: f"{v:.3f}" for k, v in point.items() if k not in CURVE_KEYS})
    bar.close()
    seconds = time.perf_counter() - start
    final = _average(window[-max(1, step // 10) :])
    return TrainResult(steps=step, seconds=seconds, curve=curve, final=final), val_idx


@torch.no_grad()
def evaluate(loss_fn: Callable[[Batch], tuple[torch.Tensor, dict]], data: DistillData, val_idx: list[int],
             cfg: TrainConfig, device: torch.device) -> dict:
    """Metrics averaged over up to cfg.val_batches validation batches."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    out = []
    for start in range(0, min(len(val_idx), cfg.val_batches * cfg.batch_size), cfg.batch_size):
        with autocast:
            _, metrics = loss_fn(make_batch(data, val_idx[start : start + cfg.batch_size], cfg.seq_len, device))
        out.append({k: float(v) for k, v in metrics.items()})
    return _average(out)


def _to_floats(rows: list[dict]) -> list[dict]:
    """Metric rows with their tensors read to the host in one copy: reading each step's metrics as it
    ends would wait for the GPU every step, and the trainer's host launches are its bottleneck
    (results/gpu/session18/train_step)."""
    tensors = [(i, k) for i, r in enumerate(rows) for k, v in r.items() if torch.is_tensor(v)]
    if not tensors:
        return rows
    values = torch.stack([rows[i][k].float().reshape(()) for i, k in tensors]).tolist()
    out = [dict(r) for r in rows]
    for (i, k), v in zip(tensors, values):
        out[i][k] = v
    return out


def _average(rows: list[dict]) -> dict:
    keys = rows[0].keys() if rows else []
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def plot_curve(curve: list[dict], path: Path, title: str) -> None:
    """Loss curves (one panel per metric) saved as a PNG next to the artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in (curve[0] if curve else {}) if k not in CURVE_KEYS]
    cols = min(3, max(1, len(metrics)))
    rows = max(1, -(-len(metrics) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    steps = [p["step"] for p in curve]
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, metrics):
        ax.plot(steps, [p[m] for p in curve])
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def init_record(init: str | Path, prior: dict) -> dict:
    """What a continued training started from: the artifact's path, its data and its steps (all
    runs before it included)."""
    steps = int(prior["training"]["steps_done"]) + int((prior.get("init_from") or {}).get("steps_before", 0))
    return {"path": str(init), "steps_before": steps, "data_sha256": prior["data"].get("sha256"),
            "created": prior.get("created")}


def choose_draft_vocab(target: LoadedModel, data: DistillData | None, coverage: float) -> tuple[torch.Tensor | None, dict | None]:
    """The fewest ids covering `coverage` of the answer tokens in `data` (0: none, the whole vocabulary),
    and what a manifest records of them (models/draft_vocab.py)."""
    if coverage == 0:
        return None, None
    vocab = int(target.model.get_output_embeddings().weight.shape[0])
    counts = data.answer_counts(vocab)
    ids = frequent_ids(counts, coverage)
    return ids, {"size": int(ids.numel()), "vocab_size": vocab, "coverage": coverage,
                 "covered": round(float(counts[ids].sum()) / float(counts.sum()), 6),
                 "answer_tokens": int(counts.sum()), "data_sha256": data.manifest.get("sha256")}


def set_draft_vocab(kind: str, folder: str | Path | None, target: LoadedModel, data: DistillData | None,
                    coverage: float, command: str = "") -> tuple[Path, dict]:
    """Give the trained draft artifact of `kind` in `folder` (None: the shipped one) the draft vocabulary `data`
    yields at `coverage` (0: remove it, no data needed), in place; its weights are untouched. Returns the
    folder and its new manifest."""
    folder = artifacts.resolve(kind, folder)
    manifest = artifacts.read_manifest(folder, kind)
    artifacts.check_target(manifest, folder, target.source_hash, target.tokenizer)
    ids, record = choose_draft_vocab(target, data, coverage)
    weights = load_file(str(folder / artifacts.WEIGHTS))
    weights.pop(VOCAB_KEY, None)
    save_file(weights | draft_vocab_tensors(ids), str(folder / artifacts.WEIGHTS))
    manifest = {**manifest, "draft_vocab": record and {**record, "command": command}}
    artifacts.write_json(folder / artifacts.MANIFEST, manifest)
    return folder, manifest


def artifact_manifest(target: LoadedModel, data: DistillData, cfg: TrainConfig, result: TrainResult,
                      command: str, **extra) -> dict:
    """The manifest fields every trained draft records."""
    import transformers

    from specdeploy import __version__

    return {
        "target": target.source,
        "target_hash": target.source_hash,
        "tokenizer_hash": tokenizer_hash(target.tokenizer),
        "data": data.summary(),
        "training": {**{k: v for k, v in vars(cfg).items()}, "steps_done": result.steps,
                     "seconds": round(result.seconds, 1), "device": _device_name(),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "final_losses": result.final,
        "validation": result.val,
        "loss_curve": result.curve,
        "command": command,
        "specdeploy": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
