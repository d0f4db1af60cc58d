"""How often each token id occurs in the answers (the target's own outputs) of distillation data folders.

    python results/cpu/draft_vocab/freq_counts.py OUT.safetensors DATA_DIR [DATA_DIR ...]

DATA_DIR: what `specdeploy train collect` writes (tokens.safetensors: ids, offsets, prompt_lens). Prints the
share of answer tokens the N most frequent ids cover, against the first N ids."""
import sys

import torch
from safetensors.torch import load_file, save_file

counts = None
for folder in sys.argv[2:]:
    d = load_file(f"{folder}/tokens.safetensors")
    offsets, prompt_lens, ids = d["offsets"], d["prompt_lens"], d["ids"].long()
    answer = torch.zeros(ids.numel(), dtype=torch.bool)
    for i in range(prompt_lens.numel()):
        answer[offsets[i] + prompt_lens[i] : offsets[i + 1]] = True
    c = torch.bincount(ids[answer], minlength=49152)
    counts = c if counts is None else counts + c
total = counts.sum().item()
ranked = counts.sort(descending=True).values.cumsum(0)
print(f"answer tokens {total}, distinct ids {(counts > 0).sum().item()} of {counts.numel()}")
for n in (4096, 8192, 12288, 16384, 24576, 32768):
    print(f"{n:>6}: most frequent {ranked[n - 1].item() / total:.5f}, first ids {counts[:n].sum().item() / total:.5f}")
save_file({"counts": counts}, sys.argv[1])
