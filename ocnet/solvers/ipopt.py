"""An IPOPT reference solve: the exact optimum of a small training problem.

Single shooting. With all controls stacked in one vector w (``flatten_controls`` order),
the states are functions of w, and the training problem is the unconstrained NLP

    minimise_w  J(w) = Phi(x_T(w), y) + sum_{t<T} l_t(x_t(w), u_t(w)),
    x_0 given,  x_{t+1}(w) = f_t(x_t(w), u_t(w)).

Each stage's f_t and l_t is written as a CasADi expression of (X_t, u_t), with the batch
of states as a (B, n) matrix X_t (rows are samples, as in torch), by
:mod:`ocnet.bridge.transcription` (a stage with an affine description is written from it;
other stage types register their expression there). IPOPT (a primal-dual
interior-point method; here without constraints, i.e. Newton's method on grad J = 0 with
an inertia-corrected exact Hessian and a filter line search) solves it to the tolerance
``tol`` on the scaled KKT error ``|grad J|_inf / s_d``. CasADi supplies the exact gradient
and Hessian of J by algorithmic differentiation of the expression graph.

Supported (transcribed symbolically; anything else raises a ConfigError naming the stage):

- stages: ``ModuleStage`` from ``ocnet.bridge.to_problem`` with an ``nn.Linear`` or an
  ``ocnet.dynamics.AffineModule`` (``ResidualBlock``) and elementwise layers (Identity,
  Tanh, ReLU, Sigmoid, Softplus, ELU, GELU, LeakyReLU, SiLU), ``PadFeatures`` and
  ``nn.Flatten`` on flat states, with their weight decay l_t = wd/2 |u_t|^2;
  ``ocnet.dynamics`` ``Dense``, ``Residual``, ``ZeroPad``, ``Flatten`` (flat states),
  ``EulerStage`` of an ``ActivationField`` or ``AntisymmetricField`` (without running
  cost), and ``LinearQuadratic`` (dynamics and cost);
- terminal costs: cross-entropy (``nn.CrossEntropyLoss``, ``F.cross_entropy``, class
  indices or class probabilities), mean squared error (``nn.MSELoss``, ``F.mse_loss``), the
  ``quadratic`` loss and :class:`~ocnet.ocp.losses.QuadraticCost`;
- no costs coupling stages (``Problem.couplings``): they are refused with a clear error.

``step`` solves to optimality once and writes the optimum back into the problem's own
control tensors (on their device and dtype; the conversions happen in
``ocnet.bridge.casadi``). It is a host-side reference, not a training algorithm: it
synchronises with the device by design.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import casadi as ca
import numpy as np
import torch
from torch import Tensor

from ..bridge.casadi import TorchCallback, from_numpy
from ..bridge.derivatives import objective_gradient, unflatten_controls
from ..bridge.placement import place
from ..bridge.transcription import (
    Transcription,
    stage_expression,
    terminal_expression,
    terminal_target,
    transcribe,
)
from ..ocp.errors import ConfigError
from ..ocp.losses import QuadraticCost
from ..ocp.problem import Problem
from .base import Solver, StepInfo, grad_norm, register

__all__ = ["IpoptReference", "QuadraticCost", "Transcription", "stage_expression",
           "terminal_expression", "terminal_target", "transcribe"]

def _torch_hessian_of_lagrangian(problem: Problem, x0: Tensor, y: Tensor | None
                                 ) -> tuple[ca.Function, TorchCallback]:
    """IPOPT's ``hess_lag(x, p, lam_f, lam_g) = lam_f triu(d^2 J/dw^2)`` with the Hessian
    from ``torch.func.hessian`` on a float64 CPU copy of the problem (no constraints)."""
    twin = place(copy.deepcopy(problem), "cpu", torch.float64)
    like = twin.controls
    xc = x0.detach().to("cpu", torch.float64)
    yc = None if y is None else y.detach().to(
        "cpu", torch.float64 if y.is_floating_point() else y.dtype)

    def objective(w: Tensor) -> Tensor:
        return twin.objective(xc, yc, unflatten_controls(w, like))

    n = twin.num_controls()
    call = TorchCallback("torch_hessian", torch.func.hessian(objective), [(n,)])
    w = ca.MX.sym("x", n)
    lam_f = ca.MX.sym("lam_f")
    h = lam_f * ca.triu(call(w))
    fn = ca.Function("nlp_hess_l", [w, ca.MX.sym("p", 0), lam_f, ca.MX.sym("lam_g", 0)], [h],
                     ["x", "p", "lam_f", "lam_g"], ["triu_hess_gamma_x_x"])
    return fn, call


# ---------------------------------------------------------------------------- the solver
class IpoptReference(Solver):
    """Solve the whole training problem to optimality with IPOPT (see the module docstring).

    Args:
        problem: a small problem of supported stages (a few hundred to a few thousand
            controls; the expression graph grows with batch size times width).
        lr: ignored (the factory signature every solver shares).
        tol: IPOPT's tolerance on the scaled KKT error (default 1e-10).
        max_iter: IPOPT's iteration limit.
        print_level: IPOPT's print level (0, silent, by default).
        hessian: ``"exact"`` (CasADi differentiates the expression graph twice; building it
            grows fast with the number of controls: ~25 s for 400), ``"torch"`` (the exact
            dense Hessian by ``torch.func.hessian`` on a float64 CPU copy of the problem,
            handed to IPOPT through a :class:`~ocnet.bridge.casadi.TorchCallback`: fast for
            a few hundred controls) or ``"limited-memory"`` (IPOPT's L-BFGS: cheap
            iterations, slow final convergence).
        symbolic: how the NLP is written (see :func:`transcribe`): ``"MX"`` (default),
            ``"SX"`` or ``"map"``.
        max_controls: refuse problems with more controls than this (the NLP is dense in
            the controls; ``None`` lifts the limit).
        **ipopt_options: any other IPOPT option (e.g. ``mu_strategy="adaptive"``).

    ``step(x0, y)`` returns StepInfo with the objective and gradient norm at the start, and
    in ``extra``: ``objective`` (after, a tensor), ``status`` (IPOPT's return status),
    ``iterations``, ``success``, ``ipopt_objective`` (IPOPT's own value, a float),
    ``grad_norm_after`` (the autograd gradient norm at the solution, a tensor).

    Presets: none (``preset="paper"`` is refused). This is an exact reference, not a
    published training method: there is no paper configuration to reproduce, and its
    defaults (tol 1e-10, exact Hessian) are chosen for exactness tests (docs/ipopt.md).
    """

    name = "ipopt"

    def __init__(self, problem: Problem, lr: float | None = None, *, tol: float = 1e-10,
                 max_iter: int = 3000, print_level: int = 0, hessian: str = "exact",
                 symbolic: str = "MX", max_controls: int | None = 3000,
                 **ipopt_options: Any) -> None:
        super().__init__(problem)
        n = problem.num_controls()
        if max_controls is not None and n > max_controls:
            raise ConfigError(
                f"ipopt: the problem has {n} controls; the IPOPT reference transcribes the "
                f"whole training problem into one dense NLP, which is too slow beyond "
                f"max_controls={max_controls}. It is meant for small problems (a few hundred "
                "controls); pass max_controls=None to insist"
            )
        if hessian not in ("exact", "torch", "limited-memory"):
            raise ConfigError(
                f"hessian must be 'exact', 'torch' or 'limited-memory', got {hessian!r}"
            )
        if not problem.parameters():
            raise ConfigError(f"{problem!r} has no controls to optimise")
        self.tol, self.max_iter, self.print_level = float(tol), int(max_iter), int(print_level)
        self.hessian, self.symbolic = hessian, symbolic
        self.ipopt_options = dict(ipopt_options)
        self.last_stats: dict[str, Any] = {}

    def solver_options(self) -> dict[str, Any]:
        """The options handed to ``casadi.nlpsol``."""
        opts: dict[str, Any] = {
            "print_time": False,
            "ipopt.tol": self.tol,
            "ipopt.max_iter": self.max_iter,
            "ipopt.print_level": self.print_level,
            "ipopt.sb": "yes",
            "ipopt.hessian_approximation": "limited-memory"
            if self.hessian == "limited-memory" else "exact",
        }
        opts.update({f"ipopt.{k}": v for k, v in self.ipopt_options.items()})
        return opts

    def _step(self, x0: Tensor, y: Tensor | None) -> StepInfo:
        problem = self.problem
        loss, grads, _ = problem.value_and_gradients(x0, y)
        gnorm = grad_norm(grads)
        start = time.perf_counter()
        nlp = transcribe(problem, x0, y, symbolic=self.symbolic)
        opts = self.solver_options()
        keep_alive = None
        if self.hessian == "torch":
            opts["hess_lag"], keep_alive = _torch_hessian_of_lagrangian(problem, x0, y)
        solver = ca.nlpsol("ipopt_reference", "ipopt", {"x": nlp.w, "f": nlp.objective}, opts)
        built = time.perf_counter()
        sol = solver(x0=nlp.w0)
        solved = time.perf_counter()
        del keep_alive  # the callback must outlive the solve
        stats = solver.stats()
        self.last_stats = stats
        w_star = np.asarray(sol["x"].full()).reshape(-1)
        flat = from_numpy(w_star, problem.parameters()[0])  # the problem's device and dtype
        problem.set_controls(unflatten_controls(flat, problem.controls))
        with torch.no_grad():
            after = problem.objective(x0, y)
        extra = {
            "objective": after,
            "ipopt_objective": float(sol["f"]),
            "status": str(stats.get("return_status")),
            "iterations": int(stats.get("iter_count", -1)),
            "success": bool(stats.get("success", False)),
            "grad_norm_after": torch.linalg.vector_norm(objective_gradient(problem, x0, y)),
            "build_seconds": built - start,
            "solve_seconds": solved - built,
        }
        return StepInfo(loss=loss.detach(), accepted=extra["success"], grad_norm=gnorm,
                        extra=extra)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_status": str(self.last_stats.get("return_status"))}


register("ipopt", lambda problem, lr=None, **kw: IpoptReference(problem, lr, **kw),
         "IPOPT on the single-shooting NLP (CasADi): the exact optimum of a small problem",
         solver_class=IpoptReference, default_lr=None, cost="nlp-dense", max_controls=3000,
         host_sync=True, on_device=False, reference=True, presets={})
