"""The Triton serving path without a server: the same loop through TritonRunner and an
in-process transport, the repository writer, text streaming and the metrics parser."""
from __future__ import annotations

import json

import pytest
import torch

from specdeploy.cli import main
from specdeploy.config import SamplingParams, SpecConfig
from specdeploy.errors import SpecDeployError
from specdeploy.models.layerskip import layerskip_model
from specdeploy.models.tokenizers import encode_prompt
from specdeploy.runtime.engine import SpecEngine
from specdeploy.triton_repo.decoder import SpecDecoder
from specdeploy.triton_repo.kvstore import SequenceCaches
from specdeploy.triton_repo.runner import LocalTransport, failing_transport
from specdeploy.triton_repo.text import text_delta
from specdeploy.triton_repo.weights import check_files
from specdeploy.triton_repo.writer import MARKER, RepoSpec, write_repository

PROMPTS = ["What is the capital of France?", "Repeat exactly: red, green, blue, red, green, blue"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _decoder(smollm2, method: str, transport, k: int = 4) -> SpecDecoder:
    engine = SpecEngine(smollm2, SpecConfig(method="none"))
    return SpecDecoder(method=method, k=k, eos_ids=engine.eos_ids, max_length=8192,
                       vocab_size=smollm2.model.config.vocab_size, transport=transport, decode=engine._decode,
                       draft_model="draft" if method == "layerskip" else None)


@pytest.mark.parametrize("method", ["none", "ngram", "layerskip"])
def test_served_loop_equals_engine(smollm2, method):
    """TritonRunner + SequenceCaches reproduce SpecEngine exactly: tokens and acceptance counts."""
    caches = {"verify": SequenceCaches(smollm2.model), "draft": SequenceCaches(layerskip_model(smollm2.model))}
    transport = LocalTransport(caches)
    decoder = _decoder(smollm2, method, transport)
    engine = SpecEngine(smollm2, SpecConfig(method=method, k=4))
    params = SamplingParams(max_new_tokens=8)
    for prompt in PROMPTS if method == "ngram" else PROMPTS[:1]:
        ids = encode_prompt(smollm2.tokenizer, prompt)
        assert ids == engine.encode(prompt)
        ref = engine.generate_ids(ids, params)
        out = decoder.run(decoder.make_job(ids, max_tokens=8))
        assert out.generation.token_ids == ref.token_ids
        assert (out.generation.stats.proposed, out.generation.stats.accepted) == (ref.stats.proposed, ref.stats.accepted)
    assert all(len(c) == 0 for c in caches.values())  # every request released its caches
    if method == "layerskip":
        assert transport.calls["draft"] > 0


def test_runner_starts_and_ends_one_sequence(smollm2):
    """A runner's calls form one Triton sequence: START (keep = RESET) once, then keep/rollback,
    END on release; a reset after the start keeps 0 entries instead of starting again."""
    from specdeploy.triton_repo.runner import RESET, TritonRunner

    caches = SequenceCaches(smollm2.model)
    sent = []

    def transport(model, request):
        sent.append((request.keep, request.release, int(request.tokens.size)))
        return caches.step(request)

    runner = TritonRunner("verify", smollm2.model.config.vocab_size, 8192, transport)
    runner.reset()
    first = runner.forward(torch.tensor([1, 2, 3])).logits
    runner.rollback(1)
    runner.forward(torch.tensor([2, 3]))
    runner.reset()
    again = runner.forward(torch.tensor([1, 2, 3])).logits
    runner.release()
    assert sent == [(RESET, False, 3), (1, False, 2), (0, False, 3), (0, True, 0)]
    assert torch.equal(first, again) and len(caches) == 0


def test_draft_failure_falls_back_to_plain_decoding(smollm2):
    caches = SequenceCaches(smollm2.model)
    good = LocalTransport({"verify": caches})
    broken = failing_transport("draft model unavailable")
    failures = []

    def transport(model, request):
        return good(model, request) if model == "verify" else broken(model, request)

    decoder = _decoder(smollm2, "layerskip", transport)
    decoder.on_fallback = lambda task, e: failures.append((task, str(e)))
    ids = encode_prompt(smollm2.tokenizer, PROMPTS[0])
    out = decoder.run(decoder.make_job(ids, max_tokens=8, task="qa"))
    ref = SpecEngine(smollm2, SpecConfig(method="none")).generate_ids(ids, SamplingParams(max_new_tokens=8))
    assert out.generation.token_ids == ref.token_ids
    assert out.fallback is not None and failures == [("qa", "draft model unavailable")]
    assert out.generation.stats.proposed == 0


@pytest.mark.parametrize("bad", [
    dict(max_tokens=0), dict(max_tokens=9000), dict(temperature=-1.0), dict(top_p=1.5), dict(top_k=-2),
    dict(task="no spaces please"), dict(k=65), dict(temperature=float("nan")),
])
def test_bad_requests_are_refused(smollm2, bad):
    decoder = _decoder(smollm2, "ngram", failing_transport("unused"))
    kw = {"max_tokens": 8} | bad
    with pytest.raises(SpecDeployError):
        decoder.make_job([1, 2, 3], **kw)


def test_streamed_pieces_add_up_to_the_final_text(smollm2):
    tok = smollm2.tokenizer
    ids = tok("Héllo wörld — ünïcode ✓ done. END here", add_special_tokens=False)["input_ids"]
    for stop in [(), ("END",), ("wörld",)]:
        sent, pieces = 0, []
        for n in range(1, len(ids)):
            pieces.append(text_delta(tok, ids[:n], sent, stop, final=False))
            sent = n
        pieces.append(text_delta(tok, ids, sent, stop, final=True))
        full = tok.decode(ids, skip_special_tokens=True)
        cut = min((full.find(s) for s in stop if s in full), default=-1)
        assert "".join(pieces) == (full[:cut] if cut >= 0 else full)
        assert all("\ufffd" not in p for p in pieces)


def test_writer_refuses_foreign_dirs_and_rewrites_its_own(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["repo", "--method", "ngram", "--out", str(foreign)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"

    repo = tmp_path / "repo"
    write_repository(repo, RepoSpec(spec=SpecConfig(method="ngram", k=3)))
    manifest = json.loads((repo / MARKER).read_text())
    assert manifest["method"] == "ngram" and manifest["models"] == ["ensemble", "postprocessing", "preprocessing", "spec_decode", "verify"]
    write_repository(repo, RepoSpec(spec=SpecConfig(method="layerskip", k=2)))  # its own: rewritten
    assert (repo / "draft" / "config.pbtxt").is_file()
    ensemble = (repo / "ensemble" / "config.pbtxt").read_text()
    for name in ("text_input", "max_tokens", "temperature", "top_p", "top_k", "random_seed", "stop_words", "stream",
                 "task", "num_draft_tokens", "text_output", "acceptance_rate", "total_accepted_draft_tokens",
                 "total_draft_tokens", "acceptance_length"):
        assert f'name: "{name}"' in ensemble
    assert "decoupled: true" in (repo / "spec_decode" / "config.pbtxt").read_text()


def test_writer_gpu_instances(tmp_path):
    from specdeploy.triton_repo.writer import InstanceSpec

    repo = write_repository(tmp_path / "gpu", RepoSpec(spec=SpecConfig(method="layerskip"),
                                                      instances=InstanceSpec("gpu", 2, (1, 0))))
    for name in ("verify", "draft"):  # count instances on each GPU; the sequence batcher keeps a sequence on one
        config = (repo / name / "config.pbtxt").read_text()
        assert "kind: KIND_GPU\n    count: 2\n    gpus: [ 1, 0 ]" in config and '\\"dtype\\": \\"bfloat16\\"' in config
        assert "oldest {\n    max_candidate_sequences: 256" in config and "kind: CONTROL_SEQUENCE_CORRID" in config
    assert "kind: KIND_CPU\n    count: 2" in (repo / "spec_decode" / "config.pbtxt").read_text()
    with pytest.raises(SpecDeployError, match="--gpus needs"):
        InstanceSpec("cpu", 1, (0,))


def test_missing_and_corrupt_weight_files_are_named(tmp_path):
    good = tmp_path / "w.safetensors"
    good.write_bytes(b"weights")
    from specdeploy.models.loader import file_sha256

    files = {str(good): file_sha256(good), str(tmp_path / "gone.safetensors"): "0" * 64}
    with pytest.raises(SpecDeployError, match="model file missing: .*gone.safetensors"):
        check_files(files)
    good.write_bytes(b"w3ights")
    with pytest.raises(SpecDeployError, match="model file corrupt: .*w.safetensors"):
        check_files({str(good): files[str(good)]})


METRICS = """# HELP spec_decode_num_draft_tokens Draft tokens proposed to the target
# TYPE spec_decode_num_draft_tokens counter
spec_decode_num_draft_tokens{task="code"} 40
spec_decode_num_draft_tokens{task="chat"} 20
# HELP spec_decode_num_accepted_tokens Draft tokens the target accepted
# TYPE spec_decode_num_accepted_tokens counter
spec_decode_num_accepted_tokens{task="code"} 30
spec_decode_num_accepted_tokens{task="chat"} 2
# TYPE spec_decode_num_accepted_tokens_per_pos counter
spec_decode_num_accepted_tokens_per_pos{position="0",task="code"} 10
spec_decode_num_accepted_tokens_per_pos{position="1",task="code"} 8
# TYPE spec_decode_num_emitted_tokens counter
spec_decode_num_emitted_tokens{task="code"} 40
# TYPE spec_decode_num_target_forwards counter
spec_decode_num_target_forwards{task="code"} 10
# TYPE nv_inference_count counter
nv_inference_count{model="verify",version="1"} 7
"""


def test_metrics_parser_and_alpha_flag():
    pytest.importorskip("prometheus_client", reason="the triton extra is not installed")
    from specdeploy.client.monitor import flagged, parse_metrics

    tasks = parse_metrics(METRICS)
    assert set(tasks) == {"code", "chat"}
    assert tasks["code"].alpha == 0.75 and tasks["code"].acceptance_length == 4.0
    assert tasks["code"].accepted_per_pos == {0: 10, 1: 8}
    assert flagged(tasks["chat"], None, 0.2)[0] and not flagged(tasks["code"], None, 0.2)[0]
    assert torch.isclose(torch.tensor(tasks["chat"].alpha), torch.tensor(0.1))


def test_policy_decides_method_and_k_per_task(smollm2, tmp_path):
    """policy.json (runtime format) per task: off = plain decoding (0 draft tokens), k per task,
    the repository's method for unnamed tasks; the output stays the greedy one."""
    from specdeploy.triton_repo.writer import check_policy, load_policy

    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"tasks": {"chat": {"method": "none", "k": "off"}, "code": {"method": "ngram", "k": 6},
                                          "qa": {"method": "layerskip", "k": 2, "alpha": 0.1}}}))
    spec = SpecConfig(method="layerskip", k=3)
    policy = load_policy(path, spec)
    check_policy(policy, spec)
    caches = {"verify": SequenceCaches(smollm2.model), "draft": SequenceCaches(layerskip_model(smollm2.model))}
    decoder = _decoder(smollm2, "layerskip", LocalTransport(caches), k=3)
    decoder.policy = policy
    job = lambda task, k=None: decoder.make_job([1, 2], max_tokens=4, task=task, k=k)  # noqa: E731
    assert [(d.method, d.k, d.reason) for d in map(decoder.decide, [job("chat"), job("code"), job("other")])] == \
        [("none", 0, "policy"), ("ngram", 6, "policy"), ("layerskip", 3, "default")]
    assert (decoder.decide(job("chat", k=2)).k, decoder.decide(job("chat", k=2)).reason) == (2, "request")
    ids = encode_prompt(smollm2.tokenizer, PROMPTS[1])
    ref = SpecEngine(smollm2, SpecConfig(method="none")).generate_ids(ids, SamplingParams(max_new_tokens=8))
    for task in ("chat", "code", "qa"):
        out = decoder.run(decoder.make_job(ids, max_tokens=8, task=task))
        assert out.generation.token_ids == ref.token_ids, task
        assert (out.generation.stats.proposed == 0) == (task == "chat") and out.decision.task == task
    assert policy.summary()["chat"]["decisions"] == {"off": 2}  # decide() above and run()

    with pytest.raises(SpecDeployError, match="method 'layerskip' is not served"):
        check_policy(policy, SpecConfig(method="ngram"))
    path.write_text(json.dumps({"tasks": {"chat": {"enabled": False}}}))
    with pytest.raises(SpecDeployError, match='"enabled" is not a policy key'):
        load_policy(path, spec)


def test_auto_switch_is_kept_per_task_across_requests(smollm2, monkeypatch):
    """With the policy's auto switch, the requests of one task share one SpecSwitch (its evidence
    carries over, as in SpecEngine); other tasks, k and temperatures get their own; outputs stay greedy."""
    from specdeploy.runtime.policy import Policy
    from specdeploy.runtime.switch import SpecSwitch
    from specdeploy.triton_repo import decoder as decoder_module

    seen = []
    real = decoder_module.speculative_generate
    monkeypatch.setattr(decoder_module, "speculative_generate", lambda *a, **kw: seen.append(kw["switch"]) or real(*a, **kw))
    decoder = _decoder(smollm2, "ngram", LocalTransport({"verify": SequenceCaches(smollm2.model)}))
    decoder.policy = Policy.from_dict({"default": {"method": "ngram", "k": 4}, "switch": "auto"})
    ids = encode_prompt(smollm2.tokenizer, PROMPTS[1])
    ref = SpecEngine(smollm2, SpecConfig(method="none")).generate_ids(ids, SamplingParams(max_new_tokens=8)).token_ids
    steps = []
    for task, k in (("code", None), ("code", None), ("qa", None), ("code", 2)):
        gen = decoder.run(decoder.make_job(ids, max_tokens=8, task=task, k=k)).generation
        assert gen.token_ids == ref
        steps.append(gen.stats.target_forwards)
    assert all(isinstance(sw, SpecSwitch) and sw.mode == "auto" for sw in seen[:3])
    assert seen[0] is seen[1] and seen[2] is not seen[0]
    assert seen[3] == "on"  # a request's own num_draft_tokens runs with the repository's switch
    assert seen[0].spec_steps + seen[0].plain_steps == steps[0] + steps[1]  # both requests' steps in the one switch


def test_cancelled_request_stops_and_releases_its_caches(smollm2):
    from specdeploy.triton_repo.decoder import RequestCancelled

    caches = {"verify": SequenceCaches(smollm2.model)}
    decoder = _decoder(smollm2, "ngram", LocalTransport(caches))
    seen = []
    job = decoder.make_job(encode_prompt(smollm2.tokenizer, PROMPTS[1]), max_tokens=20, stream=True)
    with pytest.raises(RequestCancelled):
        decoder.run(job, on_tokens=lambda ids: seen.append(len(ids)), cancelled=lambda: len(seen) >= 3)
    assert seen[:3] == [1, 2, 3] and len(caches["verify"]) == 0


def test_metric_updates_hold_the_ipc_lock(monkeypatch):
    """spec_decode's metric calls are messages to the server: made under the lock its BLS calls and
    response sends take (unlocked, they crashed tritonserver 2.51 under concurrent requests)."""
    import importlib
    import sys
    import threading
    import types

    from specdeploy.runtime.policy import Decision
    from specdeploy.runtime.stats import SpecStats

    ipc, held = threading.Lock(), []

    class Metric:
        def __init__(self, labels: dict) -> None:
            held.append(ipc.locked())

        def increment(self, value: int) -> None:
            held.append(ipc.locked())

    class MetricFamily:
        COUNTER = "counter"

        def __init__(self, name: str, description: str, kind: str) -> None:
            pass

        def Metric(self, labels: dict) -> Metric:  # noqa: N802 - pb_utils' name
            return Metric(labels)

    fake = types.ModuleType("triton_python_backend_utils")
    fake.MetricFamily, fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = MetricFamily, 1
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    names = ("specdeploy.triton_repo.models.spec_decode", "specdeploy.triton_repo.models.common")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    try:  # imported against the fake, then forgotten
        spec_decode = importlib.import_module(names[0])
        stats = SpecStats(requests=1)
        stats.record_step(proposed=3, accepted=2)
        spec_decode.Counters(ipc).record("qa", stats, False, Decision("qa", "ngram", 3, "default"))
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    assert len(held) > 10 and all(held), held
