"""Self-distillation data: the target answers the training prompts, greedy and sampled.

Drafts learn the target's own distribution on the kind of text it writes, so the data is
the target's answers (Medusa-2 / EAGLE practice) to offline prompts of the ten task types
(`prompt_sources.training_prompts`, disjoint from the evaluation prompts). Each prompt is
answered once per mode: "greedy" (what temperature-0 serving sees) and "sampled"
(temperature 0.7, for variety). Generation is batched (left padding), with a progress bar.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from specdeploy.bench.tasks import TASKS
from specdeploy.errors import SpecDeployError
from specdeploy.models.artifacts import tokenizer_hash, write_json
from specdeploy.models.loader import LoadedModel
from specdeploy.models.tokenizers import encode_prompt
from specdeploy.training.common import DATA_MANIFEST, TOKENS_FILE

log = logging.getLogger(__name__)
MODES = {"greedy": 0.0, "sampled": None}  # None: the --temperature given


@torch.inference_mode()
def answer(target: LoadedModel, prompts: list[list[int]], temperature: float, max_new_tokens: int,
           batch_size: int, seed: int, desc: str = "answering") -> list[list[int]]:
    """The target's answer to each prompt (ids, EOS included when it ended), batched with left padding."""
    from tqdm import tqdm

    device = next(target.model.parameters()).device
    stop = target.stop_ids()
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else stop[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    out: list[list[int]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", file=sys.stderr):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 else {"do_sample": False}
        gen = target.model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                    eos_token_id=stop, pad_token_id=pad, **sampling)
        for r, i in enumerate(rows):
            new = gen[r, width:].tolist()
            cut = next((j + 1 for j, t in enumerate(new) if t in stop), len(new))
            out[i] = new[:cut]
    return out


def make_data(target: LoadedModel, out: Path, n_per_task: int, seed: int = 0, modes: tuple[str, ...] = ("greedy", "sampled"),
              temperature: float = 0.7, max_new_tokens: int = 256, max_prompt_tokens: int = 384, batch_size: int = 128,
              command: str = "") -> dict:
    """Write tokens.safetensors + manifest.json under `out`; returns the manifest."""
    from specdeploy.training.prompt_sources import build_manifest_sources, training_prompts

    if not modes or any(m not in MODES for m in modes):
        raise SpecDeployError(f"modes must be among {', '.join(MODES)}, got {modes}")
    start = time.perf_counter()
    prompts = training_prompts(n_per_task, seed)
    encoded = [encode_prompt(target.tokenizer, p.prompt) for p in prompts]
    kept = [i for i, ids in enumerate(encoded) if len(ids) <= max_prompt_tokens]
    if not kept:
        raise SpecDeployError("no training prompt fits max_prompt_tokens")
    seqs, prompt_lens, tasks, mode_ids, finished = [], [], [], [], 0
    stop = set(target.stop_ids())
    for m, mode in enumerate(modes):
        temp = MODES[mode] if MODES[mode] is not None else temperature
        answers = answer(target, [encoded[i] for i in kept], temp, max_new_tokens, batch_size, seed + m, desc=mode)
        for i, ans in zip(kept, answers):
            seqs.append(encoded[i] + ans)
            prompt_lens.append(len(encoded[i]))
            tasks.append(TASKS.index(prompts[i].task))
            mode_ids.append(m)
            finished += bool(ans) and ans[-1] in stop
    lengths = torch.tensor([len(s) for s in seqs])
    tensors = {
        "ids": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "prompt_lens": torch.tensor(prompt_lens, dtype=torch.int32),
        "task": torch.tensor(tasks, dtype=torch.int32),
        "mode": torch.tensor(mode_ids, dtype=torch.int32),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / TOKENS_FILE))
    answer_tokens = int(lengths.sum()) - sum(prompt_lens)
    manifest = {
        "kind": "distill_data",
        "target": target.source,
        "target_hash": target.source_hash,
        "tokenizer_hash": tokenizer_hash(target.tokenizer),
        "n_per_task": n_per_task,
        "seed": seed,
        "modes": list(modes),
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "max_prompt_tokens": max_prompt_tokens,
        "num_prompts": len(prompts),
        "prompts_dropped_too_long": len(prompts) - len(kept),
        "num_sequences": len(seqs),
        "num_tokens": int(lengths.sum()),
        "answer_tokens": answer_tokens,
        "answers_ended_by_eos": finished,
        "counts": {t: n for t, n in sorted(Counter(TASKS[i] for i in tasks).items())},
        "sources": build_manifest_sources(n_per_task, seed),
        "sha256": hashlib.sha256((out / TOKENS_FILE).read_bytes()).hexdigest(),
        "seconds": round(time.perf_counter() - start, 1),
        "device": str(next(target.model.parameters()).device),
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / DATA_MANIFEST, manifest)
    return manifest
