"""`specdeploy train data|draft|medusa|eagle|vocab` end to end at toy size (CPU): data with a manifest,
artifacts with manifests and loss curves, and each trained draft decoding losslessly."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from specdeploy.bench.tasks import Prompt
from specdeploy.cli import main
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.models import artifacts
from specdeploy.runtime.engine import SpecEngine
from specdeploy.training.common import DistillData


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import specdeploy.training.prompt_sources as ps

    out = tmp_path_factory.mktemp("distill")
    real = ps.training_prompts
    ps.training_prompts = lambda n, seed=0: [Prompt("code", "Write a Python function that adds two numbers."),
                                             Prompt("qa", "Why is the sky blue?")]
    try:
        assert main(["train", "data", "--out", str(out), "--n-per-task", "1", "--max-new-tokens", "6"]) == 0
    finally:
        ps.training_prompts = real
    return out


def test_data_has_tokens_and_manifest(data_dir, smollm2):
    data = DistillData.load(data_dir)
    m = data.manifest
    assert len(data) == 4 and m["modes"] == ["greedy", "sampled"] and m["num_sequences"] == 4
    assert m["target_hash"] == smollm2.source_hash and m["counts"] == {"code": 2, "qa": 2}
    assert m["sources"]["generator"] == "specdeploy.training.prompt_sources"
    seq = data.sequence(0)
    assert int(data.prompt_lens[0]) < seq.numel() <= int(data.prompt_lens[0]) + 6


@pytest.mark.parametrize("kind, method, extra", [
    ("draft", "draft", ["--layers", "1"]),
    ("medusa", "medusa", ["--heads", "2", "--tree-size", "5"]),
    ("eagle", "eagle", ["--unroll", "3"]),
])
def test_train_then_decode_losslessly(data_dir, tmp_path, smollm2, kind, method, extra):
    out = tmp_path / kind
    argv = ["train", kind, "--data", str(data_dir), "--out", str(out), "--steps", "2", "--batch-size", "2", "--seq-len", "32"]
    assert main(argv + extra) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["target_hash"] == smollm2.source_hash and m["training"]["steps_done"] == 2
    assert m["data"]["num_sequences"] == 4 and m["final_losses"] and m["loss_curve"]
    assert (out / "loss.png").stat().st_size > 0 and (out / "weights.safetensors").is_file()
    # continued training starts from the artifact (same weights before its first step) and records it
    more = tmp_path / f"{kind}-more"
    assert main(argv[:5] + [str(more), "--init", str(out), "--steps", "1", "--lr", "0"] + argv[8:] + extra) == 0
    m2 = json.loads((more / "manifest.json").read_text())
    assert m2["init_from"]["steps_before"] == 2 and m2["init_from"]["path"] == str(out) and m2["training"]["steps_done"] == 1
    assert (more / "weights.safetensors").read_bytes() == (out / "weights.safetensors").read_bytes()  # lr 0: unchanged
    vocab = m["draft_vocab"]  # a draft vocabulary by default: the ids of the data's answers
    assert 0 < vocab["size"] <= 4 * 6 and vocab["covered"] >= vocab["coverage"] == 0.995
    for folder in (out, more):
        engine = SpecEngine(smollm2, SpecConfig(method=method, k=3, draft=str(folder)))
        ids = engine.encode("What is 2 + 2?")
        got = engine.generate_ids(ids, SamplingParams(max_new_tokens=8)).token_ids
        plain = SpecEngine(smollm2, SpecConfig(method="none")).generate_ids(ids, SamplingParams(max_new_tokens=8)).token_ids
        assert got == plain


@pytest.mark.parametrize("method, kind", [("eagle", "eagle"), ("medusa", "medusa"), ("draft", "draft_lm")])
def test_train_vocab_sets_and_removes_a_drafts_vocabulary(data_dir, tmp_path, smollm2, method, kind):
    """`specdeploy train vocab` rewrites a trained draft's vocabulary in place, its weights untouched;
    coverage 0 gives the whole vocabulary back. Decoding stays the target's own."""
    from safetensors.torch import load_file

    folder = tmp_path / kind
    shutil.copytree(artifacts.resolve(kind), folder)
    before = load_file(str(folder / "weights.safetensors"))
    before.pop("draft_vocab", None)
    counts = DistillData.load(data_dir).answer_counts(smollm2.model.config.vocab_size)
    plain = SpecEngine(smollm2, SpecConfig(method="none"))
    ids = plain.encode("Write a Python function that adds two numbers.")
    want = plain.generate_ids(ids, SamplingParams(max_new_tokens=8)).token_ids
    for coverage in ("1", "0.5", "0"):
        data = ["--data", str(data_dir)] if coverage != "0" else ["--data", str(tmp_path / "none")]  # 0: none read
        argv = ["train", "vocab", "--method", method, "--draft", str(folder), *data, "--draft-vocab-coverage", coverage]
        assert main(argv) == 0
        vocab = json.loads((folder / "manifest.json").read_text())["draft_vocab"]
        after = load_file(str(folder / "weights.safetensors"))
        ids_saved = after.pop("draft_vocab", None)
        if coverage == "0":
            assert vocab is None and ids_saved is None
        else:
            assert ids_saved.tolist() == sorted(set(ids_saved.tolist())) and vocab["size"] == ids_saved.numel()
            assert int(counts[ids_saved].sum()) >= float(coverage) * int(counts.sum())
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        engine = SpecEngine(smollm2, SpecConfig(method=method, k=3, draft=str(folder)))
        assert engine.generate_ids(ids, SamplingParams(max_new_tokens=8)).token_ids == want
    assert main(["train", "vocab", "--method", method, "--draft", str(folder), "--data", str(data_dir),
                 "--draft-vocab-coverage", "1.5"]) == 2


def test_train_refuses_data_of_another_target(data_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokens.safetensors").write_bytes((data_dir / "tokens.safetensors").read_bytes())
    m = json.loads((data_dir / "manifest.json").read_text())
    m["target_hash"] = "0" * 64
    (bad / "manifest.json").write_text(json.dumps(m))
    assert main(["train", "eagle", "--data", str(bad), "--out", str(tmp_path / "x"), "--steps", "1"]) == 2


def test_several_data_folders_train_as_one(data_dir, tmp_path):
    second = tmp_path / "second"
    second.mkdir()
    one = DistillData.load(data_dir)
    # a second run's data: the same format, other sequences (here the first run's, reversed token by token)
    from safetensors.torch import load_file, save_file

    t = load_file(str(data_dir / "tokens.safetensors"))
    save_file({**t, "ids": t["ids"].flip(0).contiguous()}, str(second / "tokens.safetensors"))
    m = json.loads((data_dir / "manifest.json").read_text())
    (second / "manifest.json").write_text(json.dumps({**m, "sha256": "f" * 64, "seed": 7}))
    both = DistillData.load_all([data_dir, second])
    assert len(both) == 2 * len(one) and both.manifest["num_tokens"] == 2 * one.manifest["num_tokens"]
    assert [p["seed"] for p in both.manifest["parts"]] == [m["seed"], 7] and both.summary()["parts"]
    for i in range(len(one)):
        assert both.sequence(i).tolist() == one.sequence(i).tolist()
        assert both.sequence(len(one) + i).tolist() == t["ids"].flip(0)[int(one.offsets[i]):int(one.offsets[i + 1])].tolist()
    assert both.prompt_lens.tolist() == one.prompt_lens.tolist() * 2
    assert DistillData.load_all([data_dir]).manifest == one.manifest  # one folder: as `load`
    out = tmp_path / "eagle"
    assert main(["train", "eagle", "--data", str(data_dir), str(second), "--out", str(out), "--steps", "1",
                 "--batch-size", "2", "--seq-len", "32"]) == 0
    assert json.loads((out / "manifest.json").read_text())["data"]["num_sequences"] == 2 * len(one)
    (second / "manifest.json").write_text(json.dumps({**m, "target_hash": "0" * 64}))
    assert main(["train", "eagle", "--data", str(data_dir), str(second), "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert not (tmp_path / "x").exists()


def test_train_without_out_needs_the_embedded_target(data_dir, tmp_path, capsys):
    assert main(["train", "eagle", "--data", str(data_dir), "--target", str(tmp_path)]) == 2
    assert "--out is required" in capsys.readouterr().err


@pytest.mark.parametrize("unroll", [1, 2, 4])
def test_eagle_unrolled_passes_see_what_a_drafted_chain_sees(unroll):
    """Pass p's row j is the head's p-th drafted token from t_0 .. t_{j+1}, fed the true next tokens:
    the same attention (true entries 0 .. j, its chain's own entries) at the same positions."""
    import torch

    from specdeploy.models.eagle import EagleConfig, EagleHead
    from specdeploy.training.eagle import unrolled_predictions

    torch.manual_seed(0)
    head = EagleHead(EagleConfig(32, 64, 4, 2, 8, 1e-5, 10000.0)).eval()
    t = 9
    feats, embeds = torch.randn(2, t - 1, 32), torch.randn(2, t, 32)
    with torch.no_grad():
        preds = unrolled_predictions(head, feats, embeds, unroll)
        assert [p.shape[1] for p in preds] == [t - p for p in range(1, unroll + 1)]
        for j in range(t - unroll):
            out, cache = head(feats[:, : j + 1], embeds[:, 1 : j + 2], torch.arange(j + 1))
            x = out[:, j : j + 1]
            assert torch.allclose(preds[0][:, j], x[:, 0], atol=1e-5)
            for p in range(2, unroll + 1):  # the chain's p-th token, attending to everything cached
                width = cache[0].shape[2] + 1
                x, cache = head(x, embeds[:, j + p : j + p + 1], torch.tensor([j + p - 1]),
                                torch.ones(1, width, dtype=torch.bool), cache)
                assert torch.allclose(preds[p - 1][:, j], x[:, 0], atol=1e-5), (p, j)


def test_train_loop_reads_metrics_in_batches_with_the_same_averages():
    """The loop keeps each step's metrics on the device and reads them once per logged window; the
    curve and the final averages are those of the per-step values."""
    import torch

    from specdeploy.training.common import TrainConfig, _average, _to_floats, train_loop

    data = DistillData(torch.arange(40, dtype=torch.int32), torch.tensor([0, 10, 20, 30, 40]),
                       torch.ones(4, dtype=torch.int32), {})
    w = torch.nn.Parameter(torch.tensor(1.0))
    seen = []

    def loss_fn(batch):
        loss = (w - batch.ids.float().mean() / 40) ** 2
        seen.append(float(loss.detach()))
        return loss, {"loss": loss, "const": 0.5}

    cfg = TrainConfig(steps=7, batch_size=2, seq_len=8, log_every=3, val_fraction=0.25, warmup=1)
    result, _ = train_loop([w], loss_fn, data, cfg, torch.device("cpu"))
    assert [p["step"] for p in result.curve] == [3, 6, 7]
    assert result.curve[0]["loss"] == pytest.approx(sum(seen[:3]) / 3) and result.curve[2]["loss"] == pytest.approx(sum(seen[4:]) / 3)
    assert result.final == pytest.approx({"loss": seen[-1], "const": 0.5})
    rows = _to_floats([{"a": torch.tensor(2.0), "b": 1.0}, {"a": torch.tensor([4.0]), "b": 3.0}])
    assert rows == [{"a": 2.0, "b": 1.0}, {"a": 4.0, "b": 3.0}] and _average(rows) == {"a": 3.0, "b": 2.0}


def test_a_time_bound_run_spends_its_budget_and_ends_its_cosine(monkeypatch):
    """With --minutes, the cosine follows the time spent, so a run whose first steps are slow (as on a
    GPU) still trains until its budget is spent and ends its decay there."""
    import torch

    from specdeploy.training import common

    clock = [0.0]
    monkeypatch.setattr(common, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    data = DistillData(torch.arange(40, dtype=torch.int32), torch.tensor([0, 10, 20, 30, 40]),
                       torch.ones(4, dtype=torch.int32), {})
    w = torch.nn.Parameter(torch.tensor(1.0))
    calls = []

    def loss_fn(batch):
        calls.append(1)
        clock[0] += 2.0 if len(calls) <= 5 else 1.0  # five slow steps, then one a second
        return (w - 0.5) ** 2, {}

    cfg = common.TrainConfig(steps=10_000, minutes=1.0, batch_size=2, seq_len=8, log_every=1, warmup=1,
                             val_fraction=0.25)
    result, _ = common.train_loop([w], loss_fn, data, cfg, torch.device("cpu"))
    assert result.steps == 55 and result.seconds == 60.0  # 5 x 2 s + 50 x 1 s
    assert [p["seconds"] for p in result.curve][:6] == [2.0, 4.0, 6.0, 8.0, 10.0, 11.0]  # the slow steps show
    lrs = [p["lr"] for p in result.curve]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(cfg.lr) and lrs[-1] < 0.001 * cfg.lr


def test_batches_group_similar_lengths_and_see_each_sequence_once_a_pass():
    """Length-grouped batches: far less padding than random batches (pool=1 is random batching), and a
    pass still yields every sequence at most once, in full batches."""
    import torch

    from specdeploy.training.common import batches

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 513, (640,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.repeat_interleave(torch.arange(640, dtype=torch.int32), lengths)  # each token names its sequence
    data = DistillData(ids, offsets, torch.ones(640, dtype=torch.int32), {})
    indices = list(range(600))

    def one_pass(pool: int) -> list:
        stream = batches(data, indices, 8, 512, torch.device("cpu"), seed=1, pool=pool)
        return [next(stream) for _ in range(75)]  # 600 / 8

    padding = {}
    for pool in (1, 64):
        got = one_pass(pool)
        assert all(b.ids.shape[0] == 8 for b in got)
        assert sorted(int(i) for b in got for i in b.ids[:, 0]) == indices  # every sequence, once
        padding[pool] = 1 - sum(int(b.valid.sum()) for b in got) / sum(b.valid.numel() for b in got)
    assert padding[1] > 0.3 and padding[64] < 0.05, padding
