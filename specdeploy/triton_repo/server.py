"""Start and stop the real `tritonserver` from the nvidia-pytriton wheel.

The wheel ships the server binary and the Python backend, but not a backend folder the
server can use as is: the stub for the running Python lives elsewhere. `backend_dir()`
assembles one from symlinks (PLATFORM.md). `TritonServer` runs the server in its own
process group on loopback, waits until it is ready and, on exit, shuts it down
gracefully (SIGTERM to the server), then ends whatever of its group is left and
removes the Python backend's shared-memory regions it had mapped.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from specdeploy.errors import SpecDeployError
from specdeploy.models.loader import cache_root

SHM_PREFIX = "triton_python_backend_shm_region_"
_PY_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


def pytriton_root() -> Path:
    """The server folder (bin/, backends/, python_backend_stubs/): $SPECDEPLOY_TRITONSERVER,
    else `pytriton/tritonserver` of the installed nvidia-pytriton wheel."""
    override = os.environ.get("SPECDEPLOY_TRITONSERVER")
    if override:
        root = Path(override)
        if not (root / "bin" / "tritonserver").is_file():
            raise SpecDeployError(f"SPECDEPLOY_TRITONSERVER={override}: no bin/tritonserver there")
        return root
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SpecDeployError('tritonserver is not installed: pip install nvidia-pytriton "tritonclient[all]" (or .[triton])')
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise SpecDeployError(f"the nvidia-pytriton wheel has no server binary at {root / 'bin' / 'tritonserver'}")
    return root


def tritonserver_available() -> bool:
    try:
        pytriton_root()
    except SpecDeployError:
        return False
    return True


def backend_dir(python_version: str | None = None) -> Path:
    """A backend folder whose python/ holds the wheel's backend and the stub for this Python.

    Symlinks, not copies: a symlinked stub finds its libraries through its RPATH, a copied
    one needs LD_LIBRARY_PATH. Made once per Python version under the cache folder.
    """
    root = pytriton_root()
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise SpecDeployError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version} ({stub})")
    links = {name: root / "backends" / "python" / name for name in _PY_BACKEND_FILES}
    links["triton_python_backend_stub"] = stub
    out = cache_root() / "triton" / f"backends-py{version}"
    py = out / "python"
    py.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        link = py / name
        if link.is_symlink() and os.readlink(link) == str(target):
            continue
        tmp = py / f".{name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(link)  # atomic: concurrent builders never see a half-made folder
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> "Ports":
        while True:  # three distinct free ports
            ports = {free_port(host) for _ in range(3)}
            if len(ports) == 3:
                return cls(*sorted(ports))


def server_env() -> dict[str, str]:
    """The server's environment: ours, without an active venv's bin/ on PATH.

    The Python backend stub embeds the system's libpython and, not finding its own home, takes
    the home of the first `python3` on PATH. An activated venv of another build of the same
    version (pyenv's 3.11.7 over Debian's 3.11.2 here) then hands it a stdlib whose extension
    modules need symbols its libpython lacks (`import ssl` failed in every model)."""
    env = dict(os.environ)
    if sys.prefix != sys.base_prefix:
        venv_bin = str(Path(sys.prefix) / "bin")
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p.rstrip("/") != venv_bin)
    return env


class TritonServer:
    """A running tritonserver over a model repository, as a context manager.

    ``with TritonServer(repo, Ports.free()) as server: server.http_url ...``
    `model_control="explicit"` loads every model at start and lets clients load and
    unload models later (the tests use it to take the draft model away).
    """

    def __init__(self, repo: str | os.PathLike, ports: Ports | None = None, host: str = "127.0.0.1", *,
                 model_control: str = "none", log_path: str | os.PathLike | None = None,
                 ready_timeout_s: float = 180.0, exit_timeout_s: int = 15, extra_args: tuple[str, ...] = ()) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise SpecDeployError(f"model repository not found: {self.repo}")
        self.ports = ports or Ports()
        self.host = host
        self.model_control = model_control
        self.ready_timeout_s = ready_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = tuple(extra_args)
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self._shm_seen: set[str] = set()

    # -- addresses -----------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.host)}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.ports.metrics}/metrics"

    def command(self) -> list[str]:
        root = pytriton_root()
        args = [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={backend_dir()}",
            f"--http-address={self.host}", f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}", f"--grpc-port={self.ports.grpc}",
            "--allow-metrics=true", f"--metrics-address={self.host}", f"--metrics-port={self.ports.metrics}",
            f"--model-control-mode={self.model_control}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
        ]
        if self.model_control == "explicit":
            args.append("--load-model=*")
        return args + list(self.extra_args)

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "TritonServer":
        if self.process is not None:
            raise SpecDeployError("server already started")
        with open(self.log_path, "wb") as log:
            # own session = own process group: the stubs it spawns can be ended together
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=server_env(),
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        url = f"{self.http_url}/v2/health/ready"
        while True:
            code = self.process.poll()
            if code is not None:
                raise SpecDeployError(f"tritonserver exited with code {code} before it was ready; log tail:\n{self.log_tail()}")
            if _http_ok(url):
                return
            if time.monotonic() > deadline:
                raise SpecDeployError(f"tritonserver not ready after {self.ready_timeout_s:.0f} s; log tail:\n{self.log_tail()}")
            self._note_shm()
            time.sleep(0.25)

    def stop(self) -> int | None:
        """Graceful shutdown, then the rest of the process group; returns the server's exit code."""
        proc = self.process
        if proc is None:
            return None
        self._note_shm()
        pgid = proc.pid  # start_new_session: the group id is the server's pid
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                proc.wait()
        # stubs left behind (a server killed hard) get the same treatment
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            _signal_group(pgid, signal.SIGKILL)
        for name in self._shm_seen:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")
        self.process = None
        return proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _note_shm(self) -> None:
        """Remember the shared-memory regions this server's processes map (to clean up after a crash)."""
        if self.process is None:
            return
        for pid in _group_pids(self.process.pid):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/maps") as f:
                    for line in f:
                        if SHM_PREFIX in line:
                            self._shm_seen.add(line.rsplit("/", 1)[-1].split()[0])


def shm_regions() -> set[str]:
    return {os.path.basename(p) for p in glob.glob(f"/dev/shm/{SHM_PREFIX}*")}


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            pids.append(int(entry))
    return pids


def _group_alive(pgid: int) -> bool:
    return bool(_group_pids(pgid))


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
