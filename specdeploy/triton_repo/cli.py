"""CLI: `specdeploy repo`, `serve`, `client`, `latency` and `monitor` (the Triton side of specdeploy)."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from specdeploy.errors import SpecDeployError


def add_cli(sub) -> None:
    r = sub.add_parser("repo", help="write a Triton model repository for speculative generation")
    r.add_argument("--target", help="'smollm2' (default), a .gguf file or a Hugging Face directory; "
                                    "with --engines, the model they must have been built from")
    r.add_argument("--engines", help="a `specdeploy build` output: serve its target (and draft) engines")
    r.add_argument("--draft-engine", help="with --engines: engine folder of the draft (its draft, else its target)")
    r.add_argument("--method", default="none", help="none | ngram | draft | layerskip")
    r.add_argument("--draft", help="draft model for --method draft")
    r.add_argument("--k", type=int, default=4, help="draft tokens per step (1..64)")
    r.add_argument("--ngram-min", type=int, default=1)
    r.add_argument("--ngram-max", type=int, default=4)
    r.add_argument("--layerskip-layers", type=int, help="layers in the layerskip draft (default: a quarter)")
    r.add_argument("--draft-confidence", type=float,
                   help="draft/layerskip: draft no token where the draft's path probability falls below this "
                        "(0: always k; default 0.1)")
    r.add_argument("--instance-kind", default="cpu", help="cpu | gpu (where verify and draft run)")
    r.add_argument("--instance-count", type=int, default=1,
                   help="instances of every model (verify/draft: per GPU with --instance-kind gpu)")
    r.add_argument("--gpus", help="GPU ids for --instance-kind gpu, e.g. 0,1 (default: all visible)")
    r.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on cpu, bfloat16 on gpu")
    r.add_argument("--policy", help="policy.json (from `specdeploy advise`): method and k, or off, per task")
    r.add_argument("--python-path", action="append", default=[],
                   help="folder to put first on the models' sys.path (repeatable), e.g. a numpy<2 target dir")
    r.add_argument("--out", required=True, help="repository folder to write")
    r.set_defaults(func=cmd_repo)

    s = sub.add_parser("serve", help="run tritonserver over a model repository")
    s.add_argument("--repo", required=True)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--model-control", default="none", choices=["none", "explicit", "poll"])
    s.add_argument("--log", help="server log file (default: a temporary file)")
    s.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for readiness")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("client", help="send a prompt to a served repository")
    c.add_argument("--url", help="server address (default: http://127.0.0.1:8000, or 127.0.0.1:8001 with --protocol grpc)")
    c.add_argument("--protocol", default="http", choices=["http", "grpc"])
    c.add_argument("--prompt", required=True)
    c.add_argument("--task", default="default")
    c.add_argument("--stream", action="store_true", help="print text as it is generated")
    c.add_argument("--max-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--seed", type=int)
    c.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    c.add_argument("--num-draft-tokens", type=int, help="k for this request (0 = plain decoding)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=cmd_client)

    lat = sub.add_parser("latency", help="time the same greedy requests in-process, over HTTP and over gRPC")
    lat.add_argument("--repo", required=True, help="a repository written by `specdeploy repo`")
    lat.add_argument("--device", default="cpu", help="device of the in-process engine (cpu or cuda)")
    lat.add_argument("--max-tokens", type=int, default=32)
    lat.add_argument("--repeats", type=int, default=2)
    lat.add_argument("--prompt", action="append", default=[], help="prompt (repeatable; default: four built-in ones)")
    lat.add_argument("--json", action="store_true", help="one JSON object per row")
    lat.set_defaults(func=cmd_latency)

    m = sub.add_parser("monitor", help="α and acceptance length per task from the server's metrics")
    m.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics")
    m.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    m.add_argument("--alpha-threshold", type=float, default=0.2, help="flag tasks whose α is below this")
    m.add_argument("--once", action="store_true", help="print one table and exit (exit 1 if a task is flagged)")
    m.set_defaults(func=cmd_monitor)


def cmd_repo(args: argparse.Namespace) -> int:
    from specdeploy.config import SpecConfig
    from specdeploy.triton_repo.writer import InstanceSpec, RepoSpec, load_policy, write_repository

    spec = SpecConfig(method=args.method, k=args.k, draft=args.draft, ngram_min=args.ngram_min,
                      ngram_max=args.ngram_max, layerskip_layers=args.layerskip_layers,
                      draft_confidence=args.draft_confidence)
    try:
        gpus = tuple(int(g) for g in args.gpus.split(",") if g.strip()) if args.gpus else ()
    except ValueError:
        raise SpecDeployError(f"--gpus takes comma-separated integers, got {args.gpus!r}") from None
    rs = RepoSpec(target=args.target, spec=spec, instances=InstanceSpec(args.instance_kind, args.instance_count, gpus),
                  dtype=args.dtype, policy=load_policy(args.policy, spec) if args.policy else None,
                  engines=args.engines, draft_engine=args.draft_engine, extra_python_path=tuple(args.python_path))
    out = write_repository(args.out, rs)
    models = sorted(p.name for p in out.iterdir() if p.is_dir())
    weights = f"engines {args.engines}" if args.engines else (args.target or "smollm2")
    extra = f", policy {args.policy}" if args.policy else ""
    print(f"wrote {out}: {', '.join(models)} ({weights}, method {spec.method}, k={spec.k}, {rs.torch_dtype}, "
          f"{rs.instances.count}x {rs.instances.kind}{extra})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from specdeploy.triton_repo.server import Ports, TritonServer

    server = TritonServer(args.repo, Ports(args.http_port, args.grpc_port, args.metrics_port), args.host,
                          model_control=args.model_control, log_path=args.log, ready_timeout_s=args.ready_timeout)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting tritonserver on {args.repo} (log: {server.log_path})", flush=True)
        server.start()
        print(f"ready  HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}", flush=True)
        while not stop.wait(0.5):
            if server.process.poll() is not None:
                raise SpecDeployError(f"tritonserver exited with code {server.process.returncode}; log tail:\n{server.log_tail()}")
        print("stopping tritonserver", flush=True)
    finally:
        code = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"tritonserver stopped (exit code {code})", flush=True)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    import json

    from specdeploy.client import SpecClient

    url = args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "http://127.0.0.1:8000")
    client = SpecClient(url, protocol=args.protocol)
    kw = dict(task=args.task, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), num_draft_tokens=args.num_draft_tokens)
    if args.stream:
        stream = client.stream(args.prompt, **kw)
        for piece in stream:
            if not args.json:
                print(piece, end="", flush=True)
        if not args.json:
            print(flush=True)
        result = stream.result
    else:
        result = client.generate(args.prompt, **kw)
        if not args.json:
            print(result.text, flush=True)
    if result is not None:
        if args.json:
            print(json.dumps(result.as_json()), flush=True)
        else:
            print(result.summary(), file=sys.stderr, flush=True)
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    from specdeploy.client.latency import DEFAULT_PROMPTS, measure, print_rows

    rows = measure(args.repo, tuple(args.prompt) or DEFAULT_PROMPTS, args.max_tokens, args.repeats, args.device)
    print_rows(rows, args.json)
    return 1 if any(r.mismatches for r in rows) else 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from specdeploy.client.monitor import run_monitor

    return run_monitor(args.metrics_url, args.interval, args.alpha_threshold, once=args.once)
