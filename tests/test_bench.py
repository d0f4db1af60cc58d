"""`specdeploy bench` on a tiny run: the bench.json schema, bench.md, plots, the README renderer."""
from __future__ import annotations

import gc
import importlib.util
import json
import re
from pathlib import Path

import pytest

from specdeploy.cli import main

ROW_TYPES = {"system": str, "method": str, "k": int, "task": str, "temperature": float, "batch": int,
             "tokens_per_s": float, "alpha": (float, type(None)), "acceptance_length": (float, type(None)),
             "speedup_vs_plain": float, "greedy_mismatches": int}
TOP_TYPES = {"device": str, "dtype": str, "date": str, "command": str, "rows": list}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory, smollm2):
    tmp = tmp_path_factory.mktemp("bench")
    prompts = tmp / "p.jsonl"
    prompts.write_text('{"task": "code", "prompt": "Write x = 1 in Python."}\n{"task": "qa", "prompt": "Say hi."}\n')
    out = tmp / "out"
    assert main(["bench", "--prompts", str(prompts), "--methods", "none,ngram,medusa,eagle,policy", "--k", "1,2", "--max-new-tokens", "4",
                 "--peers", "hf", "--batch", "1,2", "--temperature", "0,0.7", "--out", str(out)]) == 0
    return out


def test_bench_json_schema(bench_dir):
    result = json.loads((bench_dir / "bench.json").read_text())
    for key, typ in TOP_TYPES.items():
        assert isinstance(result[key], typ), key
    assert result["command"].startswith("specdeploy bench ") and result["dtype"] == "float32"
    assert "--batch-passes 3" in result["command"]  # batch > 1 rows: three passes on one engine by default
    rows = result["rows"]
    for row in rows:
        for key, typ in ROW_TYPES.items():
            assert isinstance(row[key], typ) and not (typ is int and isinstance(row[key], bool)), (key, row)
        assert row["system"] in ("specdeploy", "hf")
    configs = {(r["system"], r["method"], r["k"]) for r in rows}
    assert {("specdeploy", "none", 0), ("specdeploy", "ngram", 1), ("specdeploy", "ngram", 2),
            ("hf", "generate", 0), ("hf", "prompt_lookup", 2)} <= configs
    assert {r["task"] for r in rows} == {"code", "qa", "all"}
    batched = {(r["method"], r["batch"]) for r in rows if r["batch"] > 1}
    assert {("none", 2), ("ngram", 2), ("ngram (auto)", 2), ("eagle", 2)} <= batched  # the batched engine, switch on and auto
    sampled = {(r["method"], r["batch"]) for r in rows if r["batch"] > 1 and r["temperature"] == 0.7}
    assert {("none", 2), ("ngram", 2), ("eagle", 2)} <= sampled  # and sampling
    ours = [r for r in rows if r["system"] == "specdeploy"]
    assert all(r["greedy_mismatches"] == 0 for r in ours)  # float32: lossless
    assert all(r["speedup_vs_plain"] == 1.0 for r in ours if r["method"] == "none")
    ngram = next(r for r in ours if r["method"] == "ngram" and r["k"] == 2 and r["task"] == "all")
    assert ngram["acceptance_length"] >= 1.0 and len(ngram["acceptance_by_position"] or []) <= 2
    assert ngram["latency_p50_s"] > 0 and "expected_speedup" in ngram and "predicted_speedup" in ngram
    plain = next(r for r in ours if r["method"] == "none" and r["task"] == "all")
    assert plain["alpha"] is None and plain["acceptance_length"] == 1.0
    assert "switched_off" not in plain  # plain decoding has no speculation to switch off
    hf = [r for r in rows if r["system"] == "hf"]
    assert all(r["alpha"] is None and r["acceptance_length"] is None for r in hf)
    assert set(result["costs"]) >= {"none", "ngram"}
    if importlib.util.find_spec("specdeploy.models.artifacts") and not any(
            r["method"] == "medusa" for r in rows):  # no shipped Medusa heads: skipped with a note
        assert any("medusa" in s["what"] for s in result["skipped"])


def test_policy_rows_are_timed_paired_with_plain(bench_dir):
    """The policy row's speedup is against plain requests run just before its own, prompt by prompt."""
    result = json.loads((bench_dir / "bench.json").read_text())
    pol = [r for r in result["rows"] if r["method"] == "policy"]
    assert {r["task"] for r in pol} == {"code", "qa", "all"} and result["policy"]["tasks"]
    for r in pol:
        assert r["greedy_mismatches"] == 0 and r["speedup_vs_plain"] > 0
        assert isinstance(r["plain_drift"], float) and r["plain_drift"] > -1
    first = next(r for r in result["rows"] if r["method"] == "none" and r["task"] == "all")
    assert first["speedup_vs_plain"] == 1.0 and "plain_drift" not in first
    md = (bench_dir / "bench.md").read_text()
    assert "timed paired with plain" in md
    # the ≥ 3x aim's line gives the policy's figure beside each method's at its best k
    code = next(r for r in pol if r["task"] == "code")
    assert f"the advisor's policy (method and k per task): code {code['speedup_vs_plain']:.2f}x" in md


def test_batched_rows_are_timed_paired_with_plain(bench_dir):
    """A speculative row at batch > 1 alternates its passes with a plain engine's and is measured against it."""
    result = json.loads((bench_dir / "bench.json").read_text())
    rows = [r for r in result["rows"] if r["batch"] > 1 and r["system"] == "specdeploy"]
    for r in rows:
        if r["method"] == "none":
            assert r["speedup_vs_plain"] == 1.0 and "plain_drift" not in r
        else:
            assert isinstance(r["plain_drift"], float) and r["plain_drift"] > -1 and r["greedy_mismatches"] == 0
    assert any(r["method"] != "none" for r in rows) and "paired plain" in (bench_dir / "bench.md").read_text()
    # each batched row reports its engine's caches; EAGLE's add the head's cache and the kept hidden states
    mib = {r["method"]: float(r["notes"].split("caches ")[1].split(" MiB")[0]) for r in rows if r["task"] == "all"}
    assert 0 < mib["none"] <= mib["ngram"] < mib["eagle"]


def test_failed_graph_captures_are_recorded_and_reported(bench_dir):
    """A capture that fails leaves its function running eagerly: the bench records each failure and bench.md
    says so above the results (none on a CPU)."""
    from specdeploy.bench.report import render_markdown

    result = json.loads((bench_dir / "bench.json").read_text())
    assert result["graph_capture_failures"] == []
    result["graph_capture_failures"] = ["beginAllocateToPool: already recording to mempool_id"] * 2
    md = render_markdown(result)
    assert "**2 CUDA graph capture(s) failed in this run**" in md and "already recording" in md
    assert md.index("capture(s) failed") < md.index("## Summary")


def test_jobs_run_with_the_collector_paused(tmp_path, monkeypatch, smollm2):
    """Each job runs with Python's cyclic collector paused (collected between jobs): a pass that frees a dropped
    engine's CUDA graphs must not land in a timed run; the collector is back on after."""
    from specdeploy.bench import run as bench_run

    seen, loop = [], bench_run.Bench.loop

    def recording_loop(self, *args, **kw):
        seen.append(gc.isenabled())
        return loop(self, *args, **kw)

    monkeypatch.setattr(bench_run.Bench, "loop", recording_loop)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"task": "qa", "prompt": "Say hi."}\n')
    assert main(["bench", "--prompts", str(prompts), "--methods", "none,ngram", "--k", "1", "--max-new-tokens", "2",
                 "--batch", "1", "--temperature", "0", "--out", str(tmp_path / "out")]) == 0
    assert seen == [False, False] and gc.isenabled()


def test_k_sweep_runs_after_the_peers_and_batched_rows(bench_dir):
    """A time budget cuts the last jobs: at each temperature the k values other than peer_k run after every
    method at peer_k, the HF peers and the batched rows, so a budget takes the sweep before those."""
    result = json.loads((bench_dir / "bench.json").read_text())
    rows = [r for r in result["rows"] if r["task"] == "all"]
    for t in (0.0, 0.7):
        at = [r for r in rows if r["temperature"] == t]
        sweep = [i for i, r in enumerate(at) if r["system"] == "specdeploy" and r["k"] not in (0, result["peer_k"])]
        rest = [i for i, r in enumerate(at) if r["system"] == "hf" or r["batch"] > 1 or r["method"] == "policy"]
        assert sweep and rest and max(rest) < min(sweep), (t, [(r["system"], r["method"], r["k"], r["batch"]) for r in at])


def test_bench_md_and_plots(bench_dir):
    md = (bench_dir / "bench.md").read_text()
    assert "| task | plain tok/s |" in md and "ngram k=" in md and "HF generate" in md
    assert "capture(s) failed" not in md
    assert "## Summary (batch 1, greedy)" in md and "## Summary (batch 1, temperature 0.7)" in md
    for name in ("speedup_by_task", "alpha_by_task", "speedup_vs_k", "speedup_vs_batch"):
        for suffix in ("", "_t0.7"):  # one set per temperature
            assert (bench_dir / f"{name}{suffix}.png").stat().st_size > 1000


def test_readme_block_is_rendered_from_json(bench_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("render", ROOT / "scripts" / "render_readme_results.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n<!-- bench-results -->\nstale 9.99x\n<!-- /bench-results -->\n\nafter\n")
    assert render.main(["--bench", str(bench_dir), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.endswith("<!-- /bench-results -->\n\nafter\n")
    assert "specdeploy bench" in text and "speedup_vs_k.png" in text
    assert render.main(["--bench", str(bench_dir), "--readme", str(readme), "--check"]) == 0
    linked = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert len(linked) == 8 and all((tmp_path / link).exists() for link in linked), linked
    readme.write_text(text.replace("speedup_vs_k.png", "x.png"))
    assert render.main(["--bench", str(bench_dir), "--readme", str(readme), "--check"]) == 1


def test_readme_block_renders_each_bench_folder(bench_dir, tmp_path):
    """A greedy run and a sampled one (as the README's two device runs): one block each, in the order given,
    the sampled one with its own summary (the policy's slowest task) and plots."""
    spec = importlib.util.spec_from_file_location("render", ROOT / "scripts" / "render_readme_results.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    full = json.loads((bench_dir / "bench.json").read_text())
    for name, t in (("greedy", 0.0), ("sampled", 0.7)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "bench.json").write_text(json.dumps({**full, "rows": [r for r in full["rows"] if r["temperature"] == t]}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench-results -->\n<!-- /bench-results -->\n")
    folders = ["--bench", str(tmp_path / "greedy"), "--bench", str(tmp_path / "sampled")]
    assert render.main(folders + ["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.count("Measured by `specdeploy bench") == 2
    assert text.index("## Summary (batch 1, greedy)") < text.index("## Summary (batch 1, temperature 0.7)")
    sampled = text[text.index("## Summary (batch 1, temperature 0.7)"):]
    assert "advisor's policy" in sampled and "(aim: no task < 1x)" in sampled and "(aim: ≥ 2x)" not in sampled
    assert "](sampled/speedup_by_task_t0.7.png)" in sampled and (tmp_path / "sampled" / "speedup_by_task_t0.7.png").exists()
    assert not (tmp_path / "sampled" / "speedup_by_task.png").exists()
    assert render.main(folders + ["--readme", str(readme), "--check"]) == 0
    assert render.main(folders[:2] + ["--readme", str(readme), "--check"]) == 1  # a folder left out: stale


def test_partial_runs_get_their_summary_and_plots(bench_dir, tmp_path):
    """A run of plain and the policy alone still states the policy's aim; a run of batched rows alone still
    gets its speedup-against-batch plot; the README links exactly the plots written."""
    from specdeploy.bench.plots import make_plots, planned
    from specdeploy.bench.report import render_markdown, render_readme_block

    full = json.loads((bench_dir / "bench.json").read_text())
    policy_only = {**full, "rows": [r for r in full["rows"] if r["method"] in ("none", "policy") and r["temperature"] == 0.7]}
    md = render_markdown(policy_only)
    assert "## Summary (batch 1, temperature 0.7)" in md and "(aim: no task < 1x)" in md
    batched = {**full, "rows": [r for r in full["rows"] if r["batch"] > 1 and r["temperature"] == 0]}
    assert [p.name for p in make_plots(batched, tmp_path)] == ["speedup_vs_batch.png"]
    for result in (policy_only, batched):
        links = re.findall(r"\]\(x/([^)]+\.png)\)", render_readme_block(result, "x"))
        assert links == [name for name, _, _ in planned(result)] and links
