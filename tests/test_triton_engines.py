"""Serving `specdeploy build` engines, several verify/draft instances, and a per-task policy.

One small engine bundle for the module (SmolLM2: int8 weight-only target, a 2-layer draft
built as its own engine). The in-process tests check the writer and the served weights;
the server tests run the real tritonserver (CPU) over a repository with 2 instances of
every model and a policy.json, and compare with the in-process engine over the same files.
"""
from __future__ import annotations

import json
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from specdeploy.cli import main
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.errors import SpecDeployError
from specdeploy.triton_repo.writer import MARKER, RepoSpec, write_repository

MAX = 8
PROMPTS = {
    "qa": "What is the capital of France?",
    "list": "List the days of the week.",
    "code": "Write a Python function that returns the square of a number.",
    "chat": "Repeat exactly: red, green, blue, red, green, blue",
}
POLICY = {"tasks": {"chat": {"method": "none", "k": "off"}, "code": {"method": "ngram", "k": 2}}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    """`specdeploy build --target smollm2 --draft layerskip:2 --target-quant int8_wo --draft-quant none`."""
    from specdeploy.build.engine import BuildConfig, build_torch_engines

    out = tmp_path_factory.mktemp("engines") / "build"
    return build_torch_engines("smollm2", out, draft="layerskip:2", target_quant="int8_wo", draft_quant="none",
                               config=BuildConfig(progress=False))


def _manifest(repo: Path) -> dict:
    return json.loads((repo / MARKER).read_text())


# ----------------------------------------------------------------------------- in-process


def test_repo_from_engines_names_every_engine_file(engines, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["repo", "--engines", str(engines), "--method", "draft", "--k", "3", "--out", str(repo)]) == 0
    assert f"engines {engines}" in capsys.readouterr().out
    m = _manifest(repo)
    assert m["target"]["engine"] == str((engines / "target").resolve()) and m["target"]["quant"] == "int8_wo"
    assert m["draft"]["engine"] == str((engines / "draft").resolve())
    for entry, folder in ((m["target"], "target"), (m["draft"], "draft")):
        names = {Path(f).name for f in entry["files"]}
        assert {"model.safetensors", "config.json", "manifest.json", "tokenizer.json"} <= names, folder
    config = (repo / "verify" / "config.pbtxt").read_text()
    assert "sequence_batching" in config and str(engines / "target" / "model.safetensors") in config
    # --target checks the engines were built from it
    assert main(["repo", "--engines", str(engines), "--target", "smollm2", "--method", "ngram", "--out", str(repo)]) == 0


def test_served_engine_weights_equal_generate_engine(engines, tmp_path):
    """verify/draft load the built weights: the served loop's greedy output equals `generate --engine`."""
    from specdeploy.build.engine import load_engine
    from specdeploy.triton_repo.decoder import SpecDecoder
    from specdeploy.triton_repo.kvstore import SequenceCaches
    from specdeploy.triton_repo.runner import LocalTransport
    from specdeploy.triton_repo.weights import load_weights

    m = _manifest(write_repository(tmp_path / "repo", RepoSpec(spec=SpecConfig(method="draft", k=3), engines=str(engines))))
    caches = {"verify": SequenceCaches(load_weights(m["target"])), "draft": SequenceCaches(load_weights(m["draft"]))}
    reference = load_engine(engines, SpecConfig(method="none"))
    decoder = SpecDecoder(method="draft", k=3, eos_ids=reference.eos_ids, max_length=8192, vocab_size=49152,
                          transport=LocalTransport(caches), decode=reference._decode, draft_model="draft")
    for prompt in (PROMPTS["qa"], PROMPTS["chat"]):
        ids = reference.encode(prompt)
        out = decoder.run(decoder.make_job(ids, max_tokens=MAX))
        assert out.generation.token_ids == reference.generate_ids(ids, SamplingParams(max_new_tokens=MAX)).token_ids
        assert out.generation.stats.proposed > 0


def test_missing_or_corrupt_engine_file_is_named(engines, tmp_path):
    from specdeploy.triton_repo.weights import load_weights

    copy = tmp_path / "build"
    shutil.copytree(engines, copy)
    entry = _manifest(write_repository(tmp_path / "repo", RepoSpec(spec=SpecConfig(method="ngram"), engines=str(copy))))["target"]
    weights = copy / "target" / "model.safetensors"
    with weights.open("r+b") as f:  # one flipped byte
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(SpecDeployError, match=f"model file corrupt: {weights}"):
        load_weights(entry)
    (copy / "target" / "manifest.json").unlink()
    with pytest.raises(SpecDeployError, match=f"model file missing: {copy / 'target' / 'manifest.json'}"):
        load_weights(entry)
    with pytest.raises(SpecDeployError, match="no manifest.json here"):
        write_repository(tmp_path / "repo2", RepoSpec(spec=SpecConfig(method="ngram"), engines=str(copy / "target")))


def test_unusable_engines_are_refused(engines, tmp_path):
    def repo(**kw):
        return write_repository(tmp_path / "r", RepoSpec(**kw))

    with pytest.raises(SpecDeployError, match="no draft engine here"):  # the target engine alone has no draft
        repo(spec=SpecConfig(method="draft"), engines=str(engines / "target"))
    other = tmp_path / "other"
    shutil.copytree(engines, other)
    dm = json.loads((other / "draft" / "manifest.json").read_text())
    (other / "draft" / "manifest.json").write_text(json.dumps(dm | {"tokenizer_hash": "0" * 64}))
    with pytest.raises(SpecDeployError, match="another tokenizer"):
        repo(spec=SpecConfig(method="draft"), engines=str(engines), draft_engine=str(other))
    tm = json.loads((other / "target" / "manifest.json").read_text())
    (other / "target" / "manifest.json").write_text(json.dumps(tm | {"tokenizer_hash": "0" * 64}))
    with pytest.raises(SpecDeployError, match="another tokenizer"):  # the tokenizer files beside it changed
        repo(spec=SpecConfig(method="ngram"), engines=str(other))
    (other / "target" / "manifest.json").write_text(json.dumps(tm | {"source_hash": "f" * 64}))
    with pytest.raises(SpecDeployError, match="was built from"):
        repo(spec=SpecConfig(method="ngram"), engines=str(other), target="smollm2")
    (other / "target" / "manifest.json").write_text(json.dumps(tm | {"kind": "onnx"}))
    with pytest.raises(SpecDeployError, match="serves torch engines"):
        repo(spec=SpecConfig(method="ngram"), engines=str(other))


# ----------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def served(engines, tmp_path_factory):
    """tritonserver over the engines: method draft, k=3, 2 instances of every model, a policy."""
    from specdeploy.triton_repo.server import Ports, TritonServer, tritonserver_available
    from specdeploy.triton_repo.writer import InstanceSpec, load_policy

    if not tritonserver_available():
        pytest.skip('tritonserver not installed: pip install -e ".[triton]" (nvidia-pytriton)')
    root = tmp_path_factory.mktemp("triton-engines")
    (root / "policy.json").write_text(json.dumps(POLICY))
    spec = SpecConfig(method="draft", k=3)
    repo = write_repository(root / "repo", RepoSpec(spec=spec, engines=str(engines), instances=InstanceSpec("cpu", 2),
                                                    policy=load_policy(root / "policy.json", spec)))
    srv = TritonServer(repo, Ports.free(), model_control="explicit", log_path=root / "server.log", exit_timeout_s=5)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(served):
    """Greedy texts of the in-process engine over the same engine files (the `latency` command's engine)."""
    from specdeploy.client.latency import engine_from_manifest

    engine = engine_from_manifest(served.repo, "cpu")
    cache: dict = {}

    def text(prompt: str, max_tokens: int = MAX) -> str:
        if (prompt, max_tokens) not in cache:
            cache[prompt, max_tokens] = engine.generate(prompt, SamplingParams(max_new_tokens=max_tokens)).text
        return cache[prompt, max_tokens]

    return text


def test_two_instances_serve_concurrent_requests_losslessly(served, reference):
    """16 concurrent clients over 2 instances of verify and draft: each sequence stays on its instance."""
    from specdeploy.client import SpecClient

    log = served.log_path.read_text()
    assert log.count("verify ready on cpu") == 2 and log.count("draft ready on cpu") == 2
    http, grpc = SpecClient(served.http_url, "http"), SpecClient(served.grpc_url, "grpc")
    tasks = ["qa", "list", "qa", "list"]  # not off in the policy: both draft engines are used
    start = threading.Barrier(16)

    def run(i: int):
        task = tasks[i % len(tasks)]
        start.wait(timeout=60)
        return task, (http if i % 2 else grpc).generate(PROMPTS[task], task=task, max_tokens=MAX - i % 3)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    for i, (task, r) in enumerate(results):
        assert r.text == reference(PROMPTS[task], MAX - i % 3), (i, task)
        assert r.draft_tokens > 0 and r.decision == {"task": task, "method": "draft", "k": 3, "reason": "default"}
    log = served.log_path.read_text()
    assert "unknown sequence_id" not in log
    for model in ("verify", "draft"):  # the sequence batcher spread the sequences over both instances
        assert len(set(re.findall(rf"instance ({model}_\S+) started its first sequence", log))) == 2, model


def test_concurrent_streams_arrive_in_order(served, reference):
    """2 postprocessing instances may finish a stream's pieces out of order; preserve_ordering keeps them in order."""
    from specdeploy.client import SpecClient

    clients = [SpecClient(served.http_url, "http"), SpecClient(served.grpc_url, "grpc")]
    prompt = PROMPTS["chat"] + ", red, green, blue"

    def run(i: int) -> list[str]:
        return list(clients[i % 2].stream(prompt, task="repeat", max_tokens=16))

    with ThreadPoolExecutor(4) as pool:
        streams = list(pool.map(run, range(8)))
    assert all(len(pieces) > 4 for pieces in streams)
    assert ["".join(pieces) for pieces in streams] == [reference(prompt, 16)] * 8


def test_policy_turns_a_task_off_and_sets_k(served, reference):
    from specdeploy.client import SpecClient
    from specdeploy.client.monitor import fetch_metrics

    client = SpecClient(served.http_url, "http")
    off = client.generate(PROMPTS["chat"], task="chat", max_tokens=MAX)
    assert off.text == reference(PROMPTS["chat"]) and off.draft_tokens == 0
    assert off.decision == {"task": "chat", "method": "none", "k": "off", "reason": "policy"}
    code = client.generate(PROMPTS["code"], task="code", max_tokens=MAX)
    assert code.text == reference(PROMPTS["code"]) and code.decision["method"] == "ngram" and code.decision["k"] == 2
    forced = client.generate(PROMPTS["chat"], task="chat", max_tokens=MAX, num_draft_tokens=2)
    assert forced.text == off.text and forced.draft_tokens > 0 and forced.decision["reason"] == "request"
    metrics = fetch_metrics(served.metrics_url)
    assert metrics["chat"].decisions == {"off": 1, "draft k=2": 1} and metrics["code"].decisions == {"ngram k=2": 1}


def test_corrupt_engine_fails_the_load_naming_the_file(served, tmp_path):
    """A served model over a damaged engine copy refuses to load; the error names the file."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    m = _manifest(served.repo)
    engine = Path(m["target"]["engine"])
    copy = tmp_path / "target"
    shutil.copytree(engine, copy)
    (copy / "model.safetensors").write_bytes(b"not the weights")
    broken = served.repo / "verify_broken"
    shutil.copytree(served.repo / "verify", broken)
    config = (broken / "config.pbtxt").read_text().replace('name: "verify"', 'name: "verify_broken"')
    (broken / "config.pbtxt").write_text(config.replace(str(engine), str(copy)))
    admin = httpclient.InferenceServerClient(served.http_url.split("://")[1])
    try:
        with pytest.raises(InferenceServerException, match=f"model file corrupt: {copy / 'model.safetensors'}"):
            admin.load_model("verify_broken")
    finally:
        admin.unload_model("verify_broken")  # a failed model stays listed and would hold up shutdown
        admin.close()
        shutil.rmtree(broken)
