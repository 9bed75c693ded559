"""The compiled path: a solver's pure tensor update under ``torch.compile`` (static shapes).

On small layers a step is dominated by the launch (or, on the CPU, the dispatch) of many
small kernels: an Adam update over L tensors is ~10 foreach operations, each one kernel per
tensor; DDPNOpt's feedback adds ~15 per stage. The solvers that take ``compile=`` hand
exactly those pieces, functions of tensors with no host reads, to ``torch.compile``
(``fullgraph=True, dynamic=False``): the base optimizer's update (the gradient solvers and
DDPNOpt) and DDPNOpt's per-stage feedback. The sweep itself (one autograd call per stage)
stays eager. ``compile="reduce-overhead"`` adds inductor's CUDA graphs on a GPU, which is
where the compiled path is meant to pay; on the CPU the generated code runs each piece in
one C++ kernel but the guard checks cost about as much as they save at DIGITS sizes
(``benchmarks/speed.py --compile`` measures it).

The compiled and the eager path compute the same quantities in the same order up to the
fusion of elementwise operations, so they agree to rounding (the tests check 1e-12 in
float64). Shapes are static: a new batch size (a last partial batch) compiles once more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..ocp.errors import ConfigError

#: ``compile=`` values: False (eager, the default), True (= "default") or an inductor mode
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compile_mode(value: bool | str, solver: str) -> str | None:
    """The inductor mode of a ``compile=`` option (``None``: eager), or a ConfigError."""
    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ConfigError(f"{solver}: compile must be False, True or one of {list(COMPILE_MODES)}, "
                      f"got {value!r}")


class Compiled:
    """``fn`` under ``torch.compile`` that says what to do when compilation fails.

    torch.compile needs a working backend (a C++ compiler for the CPU, triton for CUDA);
    where it has none, the first call raises a :class:`ConfigError` that names the solver
    and the fix (``compile=False``) instead of inductor's traceback.
    """

    #: dynamo keeps the compiled code per Python function, and every solver instance (each
    #: its own hyper-parameters and parameter shapes) adds an entry: the default limit of 8
    #: would send the ninth solver of a process (a benchmark, a sweep) back to eager, which
    #: fullgraph=True refuses, so it is raised to this
    RECOMPILE_LIMIT = 64

    def __init__(self, fn: Callable[..., Any], mode: str, solver: str) -> None:
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, name) and getattr(config, name) < self.RECOMPILE_LIMIT:
                setattr(config, name, self.RECOMPILE_LIMIT)
        self.fn = fn
        self.solver = solver
        self.mode = mode
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False,
                                      mode=None if mode == "default" else mode)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.compiled(*args, **kwargs)
        except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported,
                torch._dynamo.exc.TorchRuntimeError) as err:
            raise ConfigError(
                f"{self.solver}: compile={self.mode!r} could not compile its update "
                f"({type(err).__name__}: {str(err).splitlines()[0][:300]}). The compiled path "
                "needs torch.compile with a working backend (a C++ compiler on the CPU, "
                "triton on CUDA); pass compile=False for the eager path") from err


def maybe_compile(fn: Callable[..., Any], value: bool | str, solver: str) -> Callable[..., Any]:
    """``fn`` itself for ``compile=False``, else :class:`Compiled` (checked option)."""
    mode = compile_mode(value, solver)
    return fn if mode is None else Compiled(fn, mode, solver)
