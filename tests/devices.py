"""Devices to parametrise solver tests over, and a guard against hidden host synchronisation.

Use it to run every solver test on every device and to make a host synchronisation inside
a sweep fail the test::

    from devices import DEVICES, no_host_sync

    @pytest.mark.parametrize("device", DEVICES)
    def test_solver_step(device):
        problem = place(make_problem(), device, torch.float64)
        x0, y = to_device(x, y, device=device, dtype=torch.float64)
        solver = MySolver(problem)
        solver.step(x0, y)               # warm-up: lazy CUDA init, optimizer state, caches
        with no_host_sync(device):
            info = solver.step(x0, y)    # must not wait for the device
        assert float(info.loss) > 0      # reading results is fine outside the guard

- ``DEVICES``: ``"cpu"`` always, ``"cuda"`` as a parameter skipped when CUDA is absent (so
  the skip is reported); ``AVAILABLE_DEVICES`` the plain names present on this machine.
- ``no_host_sync(device)``: on CUDA, ``torch.cuda.set_sync_debug_mode("error")`` for the
  duration (restored afterwards), so ``.item()``, ``.cpu()``, ``.tolist()``, ``bool(t)`` or
  a ``nonzero`` on a CUDA tensor raises. On the CPU it does nothing, unless
  ``emulate_on_cpu=True``: then the tensor methods that synchronise on a GPU (``item``,
  ``tolist``, ``numpy``, ``cpu``, ``__bool__``, ``__float__``, ``__int__``) raise
  :class:`HostSyncError`, which finds the same mistakes on a machine without a GPU. The
  emulation is stricter than CUDA (it also flags scalars that live on the host anyway, e.g.
  the ``step`` counter ``torch.optim.Adam`` keeps on the CPU and reads with ``.item()``),
  so use it on code paths that do not go through ``torch.optim``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

CUDA = torch.cuda.is_available()

#: parametrise over these: cpu always, cuda (reported as skipped when absent)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA is not available")),
]
#: the devices present on this machine (plain strings)
AVAILABLE_DEVICES = ["cpu"] + (["cuda"] if CUDA else [])

_SYNCING_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


class HostSyncError(RuntimeError):
    """A tensor was read on the host inside a ``no_host_sync`` block (CPU emulation)."""


def _raiser(name: str):  # noqa: ANN202
    def method(self: torch.Tensor, *args: object, **kwargs: object) -> None:
        raise HostSyncError(
            f"Tensor.{name}() inside no_host_sync: on a GPU this waits for the device. "
            "Keep the value a tensor (torch.where, masks) or read it after the sweep"
        )

    return method


@contextlib.contextmanager
def no_host_sync(device: str | torch.device, *, emulate_on_cpu: bool = False) -> Iterator[None]:
    """Make host synchronisations inside the block fail (see the module docstring)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.synchronize(dev)  # pending work must not be blamed on the block
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return
    if not emulate_on_cpu:
        yield
        return
    saved = {name: getattr(torch.Tensor, name) for name in _SYNCING_METHODS}
    try:
        for name in _SYNCING_METHODS:
            setattr(torch.Tensor, name, _raiser(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
