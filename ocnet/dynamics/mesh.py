"""TimeMesh: a DG(0) time mesh, and explicit Euler turning a vector field into stages.

A mesh 0 = t_0 < t_1 < ... < t_N = T carries piecewise-constant controls u_m on
(t_m, t_{m+1}]. Explicit Euler on it is the residual network

    x_{m+1} = x_m + h_m F(x_m, u_m, t_m),     h_m = t_{m+1} - t_m,

one stage per interval: refining the mesh inserts layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..ocp.errors import ShapeError
from ..ocp.stage import Controls, Stage
from ..ocp.structure import Affine
from .fields import VectorField


class TimeMesh:
    """Interval lengths h_0..h_{N-1} of a horizon starting at ``t0`` (host-side metadata)."""

    def __init__(self, lengths: Sequence[float], t0: float = 0.0) -> None:
        lengths = [float(h) for h in lengths]
        if not lengths:
            raise ShapeError("a TimeMesh needs at least one interval")
        if any(not h > 0 for h in lengths):
            raise ShapeError(f"TimeMesh interval lengths must be positive, got {lengths}")
        self.lengths: tuple[float, ...] = tuple(lengths)
        self.t0 = float(t0)

    @classmethod
    def uniform(cls, T: float, n: int, t0: float = 0.0) -> TimeMesh:  # noqa: N803
        """``n`` equal intervals of [t0, t0 + T]."""
        if n < 1:
            raise ShapeError(f"TimeMesh.uniform needs n >= 1 intervals, got {n}")
        return cls([T / n] * n, t0)

    @classmethod
    def from_nodes(cls, nodes: Sequence[float]) -> TimeMesh:
        nodes = [float(t) for t in nodes]
        return cls([b - a for a, b in zip(nodes[:-1], nodes[1:], strict=True)], nodes[0])

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def T(self) -> float:  # noqa: N802
        return sum(self.lengths)

    @property
    def nodes(self) -> list[float]:
        """t_0..t_N."""
        out = [self.t0]
        for h in self.lengths:
            out.append(out[-1] + h)
        return out

    def refine(self, marked: Sequence[int] | Sequence[bool] | Tensor) -> tuple[TimeMesh, list[int]]:
        """Bisect the marked intervals. Returns the new mesh and, for each new interval, its
        parent's index (so controls can be prolongated with :meth:`prolongate`)."""
        if hasattr(marked, "tolist"):  # a tensor or numpy array: to Python bools / ints
            marked = marked.tolist()
        marked = list(marked)
        if marked and all(isinstance(m, bool) for m in marked):
            if len(marked) != len(self):
                raise ShapeError(f"refine: {len(marked)} flags for a mesh of {len(self)} intervals")
            marked = [i for i, m in enumerate(marked) if m]
        chosen = set(int(i) for i in marked)
        bad = [i for i in chosen if not 0 <= i < len(self)]
        if bad:
            raise ShapeError(f"refine: interval indices {bad} are outside 0..{len(self) - 1}")
        lengths, parent = [], []
        for i, h in enumerate(self.lengths):
            if i in chosen:
                lengths += [h / 2, h / 2]
                parent += [i, i]
            else:
                lengths.append(h)
                parent.append(i)
        return TimeMesh(lengths, self.t0), parent

    @staticmethod
    def prolongate(controls: Sequence[Controls], parent: Sequence[int]) -> list[Controls]:
        """Piecewise-constant controls on the refined mesh: each child copies its parent,
        so the control function u(t) is unchanged."""
        return [tuple(u.detach().clone() for u in controls[i]) for i in parent]

    def __repr__(self) -> str:
        return f"TimeMesh(N={len(self)}, T={self.T:g})"


class EulerStage(Stage):
    """x+ = x + h F(x, u, t): one explicit-Euler step of a field over one mesh interval."""

    def __init__(self, field: VectorField, h: float, t: float, controls: Controls,
                 cost: Callable[[Tensor, Controls], Tensor] | None = None, *,
                 name: str | None = None) -> None:
        self.field, self.h, self.t = field, float(h), float(t)
        self.in_features = self.out_features = field.width
        self._cost_fn = cost
        super().__init__(controls, name or f"euler(t={t:.4g},h={h:.4g},{field.name})")

    def f(self, x: Tensor, u: Controls) -> Tensor:
        return x + self.h * self.field(x, u, self.t)

    def cost(self, x: Tensor, u: Controls) -> Tensor | None:
        return None if self._cost_fn is None else self._cost_fn(x, u)

    @property
    def has_cost(self) -> bool:
        return self._cost_fn is not None

    def affine(self) -> Affine | None:
        """x + h act(x K^T + b) when the field describes an affine part (else ``None``)."""
        return self.field.affine(self.h)


def euler_stages(field: VectorField, mesh: TimeMesh, controls: Sequence[Controls] | None = None,
                 *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None,
                 running_cost: Callable[[Tensor, Controls], Tensor] | None = None
                 ) -> list[EulerStage]:
    """One :class:`EulerStage` per mesh interval; fresh controls when ``controls`` is None.

    ``running_cost`` is a cost rate l(x, u) (a scalar, reduced over the batch); stage m
    gets h_m l(x_m, u_m), the left-point rule for the integral of l over the horizon.
    """
    if controls is None:
        controls = [field.init_controls(generator=generator, dtype=dtype, device=device)
                    for _ in range(len(mesh))]
    if len(controls) != len(mesh):
        raise ShapeError(f"euler_stages: {len(controls)} control sets for {len(mesh)} intervals")
    nodes = mesh.nodes

    def scaled(h: float) -> Callable[[Tensor, Controls], Tensor] | None:
        if running_cost is None:
            return None
        return lambda x, u: h * running_cost(x, u)

    return [EulerStage(field, h, nodes[m], tuple(controls[m]), scaled(h))
            for m, h in enumerate(mesh.lengths)]
