"""spec_decode: decoupled Python BLS model running the runtime's speculative loop.

Inputs (names as in Triton's TensorRT-LLM backend where they correspond):
    input_ids INT64 [n], max_tokens INT32 [1]; optional temperature FP32, top_p FP32,
    top_k INT32, random_seed UINT64, stop_words STRING [-1], stream BOOL, task STRING,
    num_draft_tokens INT32 (0 = plain decoding for this request)
Outputs, per response:
    output_ids INT64 [all generated so far], previous_length INT32 [1] (how many the
    previous responses carried), stop_words (echoed for postprocessing), finish_reason STRING [1] ("" until the last response),
    acceptance_rate FP32, total_accepted_draft_tokens INT32, total_draft_tokens INT32,
    acceptance_length FP32, decision STRING [1] (JSON: task, method, k or "off", reason;
    see decoder.SpecDecoder.decide) -- statistics and decision are filled in the last response only

Each request runs on a worker thread, so requests interleave their BLS calls; the
counters of `specdeploy.triton_repo.metrics` are exported through pb_utils.MetricFamily.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from specdeploy.errors import SpecDeployError
from specdeploy.runtime.policy import Decision
from specdeploy.runtime.stats import SpecStats
from specdeploy.triton_repo.decoder import Outcome, RequestCancelled, SpecDecoder
from specdeploy.triton_repo.metrics import COUNTERS, DECISIONS, PER_POSITION
from specdeploy.triton_repo.models.common import array, error_response, logger, scalar, settings, string_tensor, strings, tokenizer_from
from specdeploy.triton_repo.runner import bls_transport
from specdeploy.triton_repo.text import decode

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Counters:
    """The spec-decode counters, one Metric per (counter, labels), made on first use.

    Making and incrementing a Metric are messages to the server, so `record` holds the
    model's IPC lock.
    """

    def __init__(self, ipc: threading.Lock) -> None:
        self.families = {name: pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.COUNTER)
                         for name, text in COUNTERS.items()}
        self._metrics: dict[tuple, object] = {}
        self._ipc = ipc

    def add(self, name: str, value: int, **labels: str) -> None:
        if value <= 0:
            self._metric(name, labels)  # make the series appear at 0
            return
        self._metric(name, labels).increment(value)

    def _metric(self, name: str, labels: dict):
        key = (name, tuple(sorted(labels.items())))
        if key not in self._metrics:
            self._metrics[key] = self.families[name].Metric(labels=labels)
        return self._metrics[key]

    def record(self, task: str, stats: SpecStats, fallback: bool, decision: Decision) -> None:
        with self._ipc:
            self._record(task, stats, fallback, decision)

    def _record(self, task: str, stats: SpecStats, fallback: bool, decision: Decision) -> None:
        self.add("spec_decode_num_requests", 1, task=task)
        d = decision.as_dict()
        self.add(DECISIONS, 1, task=task, method=d["method"], k=str(d["k"]), reason=d["reason"])
        self.add("spec_decode_num_drafts", stats.proposed_at[0] if stats.proposed_at else 0, task=task)
        self.add("spec_decode_num_draft_tokens", stats.proposed, task=task)
        self.add("spec_decode_num_accepted_tokens", stats.accepted, task=task)
        for pos, n in enumerate(stats.accepted_at):
            self.add(PER_POSITION, n, task=task, position=str(pos))
        self.add("spec_decode_num_emitted_tokens", stats.emitted, task=task)
        self.add("spec_decode_num_target_forwards", stats.target_forwards, task=task)
        self.add("spec_decode_fallbacks", int(fallback), task=task)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        s = settings(args)
        self.log = logger("spec_decode")
        self.tokenizer = tokenizer_from(s)
        # One message between this stub and the server at a time: concurrent BLS calls,
        # response sends and metric updates from several threads crash the Python backend of Triton 2.51
        # (SIGSEGV / boost lock_exception in libtriton_python.so; upstream server issue 8882).
        # verify and draft run one request at a time anyway, so little is lost.
        self._ipc = threading.Lock()
        self.counters = Counters(self._ipc)
        self.decoder = SpecDecoder.from_settings(s, self._transport, lambda ids: decode(self.tokenizer, ids),
                                                 on_fallback=self._fallback)
        self.pool = ThreadPoolExecutor(max_workers=int(s.get("max_concurrency", 64)), thread_name_prefix="spec_decode")
        self.log.info("spec_decode ready: method=%s k=%d target=%s draft=%s policy=%s", s["method"], s["k"], s["target_model"],
                      s.get("draft_model"), "yes" if s.get("policy") else "no")

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._serve, request, request.get_response_sender())
        return None  # decoupled: the workers send the responses

    def finalize(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)

    def _transport(self, model, request):
        with self._ipc:
            return bls_transport(model, request)

    def _send(self, sender, build, flags: int = 0) -> None:
        """Build the response (its tensors live in shared memory too) and send it, under the IPC lock."""
        with self._ipc:
            sender.send(build(), flags=flags)

    def _fallback(self, task: str, error: BaseException) -> None:
        self.log.warning("draft model failed (task %s), finishing the request with plain decoding: %s", task, error)

    def _serve(self, request, sender) -> None:
        try:
            self._serve_one(request, sender)
        except Exception as e:  # noqa: BLE001 - never leave a request without its final response
            self.log.error("request failed: %s", e)
            message = f"spec_decode: {e}"
            try:
                self._send(sender, lambda: error_response(message), FINAL)
            except Exception:  # noqa: BLE001 - already completed or cancelled
                pass

    def _serve_one(self, request, sender) -> None:
        try:
            job = self.decoder.make_job(
                array(request, "input_ids").reshape(-1).tolist(),
                max_tokens=scalar(request, "max_tokens", required=True),
                temperature=scalar(request, "temperature", 0.0), top_p=scalar(request, "top_p", 1.0),
                top_k=scalar(request, "top_k", 0), seed=scalar(request, "random_seed"),
                stop=strings(request, "stop_words"), task=scalar(request, "task"),
                k=scalar(request, "num_draft_tokens"), stream=bool(scalar(request, "stream", False)),
            )
        except (SpecDeployError, UnicodeDecodeError, TypeError, ValueError) as e:
            message = f"spec_decode: {e}"
            self._send(sender, lambda: error_response(message), FINAL)
            return
        sent = 0

        def partial(generated: list[int]) -> None:
            nonlocal sent
            self._send(sender, lambda: self._response(generated, sent, job.params.stop))
            sent = len(generated)

        def cancelled() -> bool:
            with self._ipc:
                return request.is_cancelled()

        try:
            outcome = self.decoder.run(job, partial, cancelled)
        except RequestCancelled as e:
            self.log.info("request %s", e)
            message = f"spec_decode: request {e}"
            self._send(sender, lambda: error_response(message), FINAL)
            return
        self._send(sender, lambda: self._response(outcome.generation.token_ids, sent, job.params.stop, outcome), FINAL)
        self.counters.record(job.task, outcome.generation.stats, outcome.fallback is not None, outcome.decision)

    @staticmethod
    def _response(ids: list[int], previous: int, stop: tuple[str, ...], outcome: Outcome | None = None):
        stats = outcome.generation.stats if outcome else None
        alpha = (stats.alpha or 0.0) if stats else 0.0
        length = (stats.acceptance_length or 0.0) if stats else 0.0
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int64)),
            pb_utils.Tensor("previous_length", np.array([previous], dtype=np.int32)),
            pb_utils.Tensor("stop_words", np.array([w.encode("utf-8") for w in stop], dtype=np.object_)),
            pb_utils.Tensor("acceptance_rate", np.array([alpha], dtype=np.float32)),
            pb_utils.Tensor("total_accepted_draft_tokens", np.array([stats.accepted if stats else 0], dtype=np.int32)),
            pb_utils.Tensor("total_draft_tokens", np.array([stats.proposed if stats else 0], dtype=np.int32)),
            pb_utils.Tensor("acceptance_length", np.array([length], dtype=np.float32)),
            string_tensor("finish_reason", outcome.generation.finish_reason if outcome else ""),
            string_tensor("decision", json.dumps(outcome.decision.as_dict()) if outcome else ""),
        ])
