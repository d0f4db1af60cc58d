"""SpecClient: prompts in, text and acceptance statistics out, from the served `ensemble`.

protocol "http": Triton's generate extension, `/v2/models/ensemble/generate` (one JSON
response) and `/generate_stream` (server-sent events). protocol "grpc": tritonclient's
bidirectional stream, the way to call a decoupled model over gRPC. Both speak to the
same ensemble, whose inputs are named as in Triton's TensorRT-LLM backend.

    client = SpecClient("http://127.0.0.1:8000")
    result = client.generate("What is 12 + 7?", task="math", max_tokens=32)
    stream = client.stream("Tell me a story", max_tokens=64)
    for piece in stream: print(piece, end="")
    stream.result.acceptance_rate
"""
from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from specdeploy.errors import SpecDeployError


class TritonRequestError(SpecDeployError):
    """The server answered the request with an error (bad input, failed model, ...)."""


@dataclass(frozen=True)
class GenerationResult:
    text: str
    task: str
    finish_reason: str  # eos | stop | length
    acceptance_rate: float  # α = accepted / proposed draft tokens (0 when nothing was proposed)
    accepted: int  # total_accepted_draft_tokens
    draft_tokens: int  # total_draft_tokens
    acceptance_length: float  # tokens per target forward, the +1 included
    decision: dict | None = None  # the method and k spec_decode ran: {"task", "method", "k", "reason"}

    def as_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        d = self.decision
        how = f" {d['method']} k={d['k']} ({d['reason']})" if d else ""
        return (f"[{self.task}]{how} α={self.acceptance_rate:.2f} ({self.accepted}/{self.draft_tokens} draft tokens) "
                f"acceptance_length={self.acceptance_length:.2f} finish={self.finish_reason}")


@dataclass(frozen=True)
class Request:
    """The ensemble's inputs for one prompt."""

    prompt: str
    task: str = "default"
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    num_draft_tokens: int | None = None
    stream: bool = False

    def as_json(self) -> dict:
        """Fields for the generate endpoints (names of the ensemble's inputs)."""
        body = {"text_input": self.prompt, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "task": self.task, "stream": self.stream}
        if self.seed is not None:
            body["random_seed"] = self.seed
        if self.stop:
            body["stop_words"] = list(self.stop)
        if self.num_draft_tokens is not None:
            body["num_draft_tokens"] = self.num_draft_tokens
        return body

    def grpc_inputs(self) -> list:
        import tritonclient.grpc as grpcclient

        def tensor(name: str, value, dtype: str, np_dtype) -> "grpcclient.InferInput":
            arr = np.array(value if isinstance(value, list) else [value], dtype=np_dtype)
            t = grpcclient.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr)
            return t

        inputs = [
            tensor("text_input", [self.prompt.encode("utf-8")], "BYTES", np.object_),
            tensor("max_tokens", self.max_tokens, "INT32", np.int32),
            tensor("temperature", self.temperature, "FP32", np.float32),
            tensor("top_p", self.top_p, "FP32", np.float32),
            tensor("top_k", self.top_k, "INT32", np.int32),
            tensor("task", [self.task.encode("utf-8")], "BYTES", np.object_),
            tensor("stream", self.stream, "BOOL", bool),
        ]
        if self.seed is not None:
            inputs.append(tensor("random_seed", self.seed, "UINT64", np.uint64))
        if self.stop:
            inputs.append(tensor("stop_words", [s.encode("utf-8") for s in self.stop], "BYTES", np.object_))
        if self.num_draft_tokens is not None:
            inputs.append(tensor("num_draft_tokens", self.num_draft_tokens, "INT32", np.int32))
        return inputs


class TextStream:
    """Text pieces as they arrive; `.result` holds the GenerationResult once the stream ends."""

    def __init__(self, pieces: Iterator[dict], task: str) -> None:
        self._pieces = pieces
        self.task = task
        self.result: GenerationResult | None = None
        self._text: list[str] = []

    def __iter__(self) -> Iterator[str]:
        for out in self._pieces:
            piece = out.get("text_output", "")
            self._text.append(piece)
            if out.get("finish_reason"):
                self.result = _result(out, self.task, "".join(self._text))
            if piece:
                yield piece

    def close(self) -> None:
        """Stop early: closes the connection, which cancels the request on the server."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SpecClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", protocol: str = "http", model: str = "ensemble",
                 timeout_s: float = 600.0) -> None:
        if protocol not in ("http", "grpc"):
            raise SpecDeployError(f"protocol must be http or grpc, got {protocol!r}")
        self.protocol = protocol
        self.model = model
        self.timeout_s = timeout_s
        host = url.split("://", 1)[-1].rstrip("/")
        self.url = f"http://{host}" if protocol == "http" else host

    def generate(self, prompt: str, **kw) -> GenerationResult:
        """One prompt, the whole text at once."""
        req = Request(prompt, **kw)
        if self.protocol == "http":
            out = self._post(f"/v2/models/{self.model}/generate", req.as_json())
            return _result(out, req.task, out.get("text_output", ""))
        stream = TextStream(self._grpc_stream(req), req.task)
        text = "".join(stream)
        return stream.result or GenerationResult(text, req.task, "", 0.0, 0, 0, 0.0)

    def stream(self, prompt: str, **kw) -> TextStream:
        """Text pieces as the target commits tokens (gRPC stream, or SSE over HTTP)."""
        req = Request(prompt, stream=True, **kw)
        pieces = self._sse(f"/v2/models/{self.model}/generate_stream", req.as_json()) if self.protocol == "http" \
            else self._grpc_stream(req)
        return TextStream(pieces, req.task)

    def ready(self) -> bool:
        if self.protocol == "http":
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=5) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False
        import tritonclient.grpc as grpcclient

        try:
            return grpcclient.InferenceServerClient(self.url).is_server_ready()
        except Exception:  # noqa: BLE001 - unreachable is "not ready"
            return False

    # -- HTTP ------------------------------------------------------------------------
    def _open(self, path: str, body: dict):
        data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            raise TritonRequestError(_error_text(e.read())) from None
        except (urllib.error.URLError, OSError) as e:
            raise SpecDeployError(f"cannot reach {self.url}: {e}") from None

    def _post(self, path: str, body: dict) -> dict:
        with self._open(path, body) as r:
            return json.loads(r.read())

    def _sse(self, path: str, body: dict) -> Iterator[dict]:
        with self._open(path, body) as r:
            for raw in r:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                out = json.loads(line[5:])
                if "error" in out:
                    raise TritonRequestError(out["error"])
                yield out

    # -- gRPC ------------------------------------------------------------------------
    def _grpc_stream(self, req: Request) -> Iterator[dict]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.url)
        responses: queue.Queue = queue.Queue()
        done = False
        try:
            client.start_stream(callback=lambda result, error: responses.put((result, error)))
            client.async_stream_infer(self.model, req.grpc_inputs(), request_id=uuid.uuid4().hex,
                                      enable_empty_final_response=True)
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise SpecDeployError(f"no response from {self.url} in {self.timeout_s:.0f} s") from None
                if error is not None:
                    raise TritonRequestError(error.message() if isinstance(error, InferenceServerException) else str(error))
                out = _grpc_outputs(result)
                if out:
                    yield out
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    done = True
                    return
        except InferenceServerException as e:
            raise TritonRequestError(e.message()) from None
        finally:
            client.stop_stream(cancel_requests=not done)  # cancel only a request that has not finished
            client.close()


_OUTPUTS = ("text_output", "finish_reason", "acceptance_rate", "total_accepted_draft_tokens", "total_draft_tokens",
            "acceptance_length", "decision")


def _grpc_outputs(result) -> dict:
    out = {}
    for name in _OUTPUTS:
        a = result.as_numpy(name)
        if a is None:
            continue
        v = a.reshape(-1)[0]
        out[name] = v.decode("utf-8") if isinstance(v, bytes) else v.item()
    return out


def _result(out: dict, task: str, text: str) -> GenerationResult:
    return GenerationResult(
        text=text, task=task, finish_reason=str(out.get("finish_reason", "")),
        acceptance_rate=float(out.get("acceptance_rate", 0.0)),
        accepted=int(out.get("total_accepted_draft_tokens", 0)), draft_tokens=int(out.get("total_draft_tokens", 0)),
        acceptance_length=float(out.get("acceptance_length", 0.0)),
        decision=json.loads(out["decision"]) if out.get("decision") else None,
    )


def _error_text(body: bytes) -> str:
    try:
        return json.loads(body).get("error", body.decode(errors="replace"))
    except ValueError:
        return body.decode(errors="replace")
