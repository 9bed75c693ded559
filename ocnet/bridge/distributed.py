"""Data parallelism: the one module that talks to ``torch.distributed``.

Every rank holds the same controls and a shard of each global batch. The objective is a
batch MEAN, so with equal shards (B_local = B / W on each of W ranks)

    J(global batch)      = (1/W) sum_r J_r          (J_r: the mean over rank r's shard)
    dJ/du (global batch) = (1/W) sum_r dJ_r/du

and every quantity a solver reduces over the batch (gradients, curvature statistics,
DDPNOpt's feedback weight-gradients and gain terms, E-MSA's Hamiltonian terms) is a batch
mean on each rank, combined by :meth:`Comm.all_reduce_mean`. Each call flattens its tensors
into one buffer (per dtype), so a call is one collective. Since every rank receives the
same reduced bits, decisions taken from them (line searches, accept/reject, braking
events) are identical on every rank and the controls stay identical without any
parameter broadcast after the start.

A solver has ``comm = None`` by default (single process: nothing changes, bit for bit);
``ocnet.train`` sets ``solver.comm`` to a :class:`Comm` under ``torchrun``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..ocp.errors import ConfigError

__all__ = [
    "Comm",
    "check_config_agreement",
    "env_world_size",
    "init_from_env",
    "shard",
]


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (set by ``torchrun``), 1 if unset."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; "
                          "launch with torchrun --nproc-per-node N") from None


class Comm:
    """All-reduces and broadcasts over the default process group, with a byte counter.

    ``bytes_reduced`` / ``calls`` count the payload of every all-reduce this object made
    (the per-rank buffer size; a ring all-reduce moves about 2 (W-1)/W times that per rank).
    """

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("Comm needs an initialised torch.distributed process group; "
                              "use init_from_env() under torchrun")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bytes_reduced = 0
        self.calls = 0

    # ------------------------------------------------------------------ reductions
    def _all_reduce(self, tensors: Sequence[Tensor], mean: bool) -> list[Tensor]:
        tensors = list(tensors)
        out: list[Tensor | None] = [None] * len(tensors)
        by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault((t.dtype, t.device), []).append(i)
        for idx in by_dtype.values():
            buf = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
            self.bytes_reduced += buf.numel() * buf.element_size()
            self.calls += 1
            if mean:
                buf.div_(self.world_size)
            k = 0
            for i in idx:
                n = tensors[i].numel()
                out[i] = buf[k:k + n].view(tensors[i].shape)
                k += n
        return out  # type: ignore[return-value]

    def all_reduce_mean(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The mean over ranks of each tensor (new tensors; one collective per dtype)."""
        return self._all_reduce(tensors, mean=True)

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The sum over ranks of each tensor (new tensors; one collective per dtype)."""
        return self._all_reduce(tensors, mean=False)

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank (a host decision, e.g. a stop)."""
        t = torch.tensor([1.0 if flag else 0.0])
        if dist.get_backend(self.group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    @torch.no_grad()
    def broadcast_(self, tensors: Iterable[Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values (one collective)."""
        tensors = list(tensors)
        if not tensors:
            return
        buf = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(buf, src=src, group=self.group)
        k = 0
        for t in tensors:
            t.copy_(buf[k:k + t.numel()].view(t.shape))
            k += t.numel()

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def __repr__(self) -> str:
        return (f"Comm(rank={self.rank}, world_size={self.world_size}, "
                f"backend={dist.get_backend(self.group)})")


def init_from_env(backend: str | None = None) -> Comm | None:
    """A :class:`Comm` when launched by ``torchrun`` with ``WORLD_SIZE > 1``, else None.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (the ``env://`` method).
    The backend defaults to NCCL when CUDA is available, else gloo. An already initialised
    process group is reused.
    """
    if dist.is_available() and dist.is_initialized():
        return Comm() if dist.get_world_size() > 1 else None
    if env_world_size() <= 1:
        return None
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {missing} are not; launch with "
                          "torchrun --nproc-per-node N -m ocnet train ...")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    return Comm()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def check_config_agreement(comm: Comm, config: dict[str, Any],
                           ignore: Sequence[str] = ()) -> None:
    """Raise ``ConfigError`` on every rank when the ranks' configurations differ.

    Each rank all-gathers a hash per key; a mismatch names the differing keys with rank 0's
    value and the differing ranks' values.
    """
    mine = {k: v for k, v in config.items() if k not in ignore}
    hashes = {k: _digest(v) for k, v in mine.items()}
    gathered: list[Any] = [None] * comm.world_size
    dist.all_gather_object(gathered, (hashes, mine), group=comm.group)
    ref_h, ref = gathered[0]
    problems = []
    for r, (h, cfg) in enumerate(gathered[1:], start=1):
        for k in sorted(set(ref_h) | set(h)):
            if ref_h.get(k) != h.get(k):
                problems.append(f"{k}: rank 0 has {ref.get(k)!r}, rank {r} has {cfg.get(k)!r}")
    if problems:
        raise ConfigError("the ranks disagree on the configuration (" + "; ".join(problems)
                          + "); launch every rank with the same options")


def shard(x: Tensor, y: Tensor | None, rank: int, world_size: int
          ) -> tuple[Tensor, Tensor | None]:
    """Rank ``rank``'s contiguous equal share of the global batch ``(x, y)``."""
    n = x.shape[0]
    if n % world_size:
        raise ConfigError(
            f"a global batch of {n} samples does not divide among {world_size} ranks; use a "
            f"batch size (and a training-set size modulo the batch size) divisible by "
            f"{world_size}, e.g. --batch-size {max(world_size, n - n % world_size)}"
        )
    b = n // world_size
    sl = slice(rank * b, (rank + 1) * b)
    return x[sl], None if y is None else y[sl]
