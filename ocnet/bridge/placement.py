"""Where tensors live: the one place that moves a problem or data across devices and dtypes."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..ocp.errors import ConfigError
from ..ocp.problem import Problem


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None -> CUDA when present, else CPU; otherwise the named device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown device {device!r} ({err}); use 'cpu', 'cuda', 'cuda:N' "
                          "or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available on this "
                          "machine; use 'cpu' or 'auto'")
    return dev


def host_view(t: Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's storage (no copy, no graph; a contiguous copy only if
    ``t`` is not contiguous), for CPU kernels that work on arrays (``ocnet.solvers.novas_fused``).
    Writes through the view change the tensor. A tensor on another device is refused: moving
    it would wait for the device, and the caller should have kept its tensor path."""
    if t.device.type != "cpu":
        raise ConfigError(f"host_view takes CPU tensors; this one is on {t.device}: keep the "
                          "tensor path for device tensors (or move it with to_device first)")
    return t.detach().contiguous().numpy()


def _move_(t: Tensor, device: torch.device | None, dtype: torch.dtype | None) -> None:
    # Rebinding .data keeps the tensor object (and every reference to it, e.g. a module's
    # Parameter) while moving its storage.
    target_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    if (device is None or t.device == device) and target_dtype == t.dtype:
        return
    t.data = t.data.to(device=device, dtype=target_dtype)


def place(problem: Problem, device: str | torch.device | None = None,
          dtype: torch.dtype | None = None) -> Problem:
    """Move a problem's controls and buffers (and its module and loss) in place; returns it."""
    dev = None if device is None else resolve_device(device)
    module = getattr(problem, "module", None)
    if isinstance(module, nn.Module):
        module.to(device=dev, dtype=dtype)
    if isinstance(problem.terminal_cost, nn.Module):
        problem.terminal_cost.to(device=dev, dtype=dtype)
    for stage in problem.stages:
        for t in (*stage.controls, *stage.buffers()):
            _move_(t, dev, dtype)
    return problem


def to_device(*tensors: Tensor, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None) -> tuple[Tensor, ...]:
    """Copies of ``tensors`` on ``device``; floating tensors also cast to ``dtype``."""
    dev = None if device is None else resolve_device(device)
    return tuple(
        t.to(device=dev, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
        for t in tensors
    )
