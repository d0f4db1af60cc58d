"""Counting what a piece of the runtime launches, under Triton's interpreter (CPU): every Triton kernel launch and
every aten operator that computes (views, allocations and the interpreter's own tensor traffic left out). Shared by
`count_launches.py` and `results/cpu/step_launches/count_step_launches.py`. Import it before running anything: it
sets TRITON_INTERPRET and the fused kernels."""
import os
from typing import Callable

os.environ["TRITON_INTERPRET"] = "1"
os.environ["SPECDEPLOY_KERNELS"] = "fused"
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from specdeploy.runtime import _triton_kernels as tk  # noqa: E402

VIEWS = {"view", "expand", "slice", "select", "t", "_unsafe_view", "alias", "unsqueeze", "reshape", "as_strided",
         "detach", "squeeze", "permute", "empty", "empty_like", "new_empty", "empty_strided", "lift_fresh",
         "_local_scalar_dense", "is_pinned", "set_"}  # no kernel


class _Launch:
    def __init__(self, name: str, fn, count: Callable[[str, str], None]) -> None:
        self.name, self.fn, self.count = name, fn, count

    def __getitem__(self, grid):
        def run(*a, **kw):
            self.count("triton", self.name)
            with _disable_current_modes():
                return self.fn[grid](*a, **kw)
        return run


class _Ops(TorchDispatchMode):
    def __init__(self, count: Callable[[str, str], None]) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEWS:
            self.count("aten", func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def install(count: Callable[[str, str], None]) -> TorchDispatchMode:
    """Route every Triton launch to count("triton", kernel name) from now on, and return the dispatch mode that,
    while entered, routes every computing aten operator to count("aten", op name)."""
    for name in dir(tk):
        if name.endswith("_kernel"):
            setattr(tk, name, _Launch(name, getattr(tk, name), count))
    return _Ops(count)
