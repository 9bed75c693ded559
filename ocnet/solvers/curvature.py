"""Base optimizers as curvature objects with explicit state: ``init`` / ``update`` / ``inverse``.

Each base optimizer is a preconditioner P ~ lr M^-1 (M its curvature model) plus the
statistics it keeps. The gradient solvers step with ``update``; DDPNOpt takes its
feed-forward step k_t from ``update`` and applies the same inverse curvature to its
feedback with ``inverse`` (Q_uu ~ M / lr). The state is a dict of tensors (the step count
too, so a step can be undone on the device), checkpointed as it is::

    sgd        k = -lr g                                   M = I
    momentum   b <- mu b + (1 - d) g (b_1 = g),  k = -lr b  (nesterov: -lr (g + mu b))
    rmsprop    v <- a v + (1 - a) g^2,  k = -lr g / (sqrt(v) + eps)      M = sqrt(v) + eps
    adam       m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
               k = -lr mhat / (sqrt(vhat) + eps)           M = sqrt(vhat) + eps
    kronecker  A <- ema A + (1 - ema) E[a a^T],  G <- ema G + (1 - ema) E[zeta zeta^T],
               k = -lr (G + lam/pi I)^-1 [gW, gb] (A + pi lam I)^-1   (per stage)

The four first-order ones equal ``torch.optim`` SGD / RMSprop / Adam (tests check 1e-12).
Modelled on optax's ``GradientTransformation(init, update)``, with in-place updates of the
state tensors (``torch._foreach_*``: one kernel per operation for all tensors).
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..ocp.errors import ConfigError, unknown_name

State = dict[str, Any]


class Curvature(abc.ABC):
    """A base optimizer: ``state = init(params)``; ``k, state = update(grads, state)`` (a new
    state; the old one is left as it was, so a rejected step can keep it);
    ``inverse_diagonal(state)`` its lr M^-1 (a float for M = I)."""

    name: str = "curvature"

    def __init__(self, lr: float) -> None:
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"{self.name}: lr must be a positive number, got {lr!r}")
        self.lr = float(lr)

    @abc.abstractmethod
    def init(self, params: Sequence[Tensor]) -> State:
        """The initial state for these parameter tensors."""

    @abc.abstractmethod
    def update(self, grads: Sequence[Tensor], state: State) -> tuple[list[Tensor], State]:
        """The base update k (add it to the parameters) and the next state (new tensors:
        ``state`` itself is not changed)."""

    def diagonal(self, state: State) -> list[Tensor] | None:
        """The diagonal curvature M at the current state (``None`` when M is the identity)."""
        return None

    def update_with_diagonal(self, grads: Sequence[Tensor], state: State
                             ) -> tuple[list[Tensor], State, list[Tensor] | None]:
        """``update`` and the diagonal M of the new state, which the update has computed
        already for the adaptive bases (DDPNOpt's feedback reuses it instead of a second
        pass over the statistics)."""
        k, new = self.update(grads, state)
        return k, new, self.diagonal(new)

    def inverse_diagonal(self, state: State) -> list[Tensor] | float:
        """lr M^-1 elementwise (a float when M is the identity), at the current state."""
        diag = self.diagonal(state)
        if diag is None:
            return self.lr
        inv = torch._foreach_reciprocal(diag)
        torch._foreach_mul_(inv, self.lr)
        return inv

    def hyperparameters(self) -> dict[str, Any]:
        """The options that define the curvature (for messages and tests)."""
        return {"lr": self.lr}


def _zeros(params: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]


def _counter(params: Sequence[Tensor]) -> Tensor:
    # on the parameters' device, so bias corrections never read the host
    device = params[0].device if params else None
    return torch.zeros((), dtype=torch.float64 if device is None or device.type != "mps"
                       else torch.float32, device=device)


class SGD(Curvature):
    """Gradient descent, with heavy-ball momentum when ``momentum > 0`` (torch.optim.SGD)."""

    name = "sgd"

    def __init__(self, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False) -> None:
        super().__init__(lr)
        if not 0 <= momentum < 1 or not 0 <= dampening <= 1:
            raise ConfigError(f"sgd: need 0 <= momentum < 1 and 0 <= dampening <= 1, got "
                              f"momentum={momentum!r}, dampening={dampening!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("sgd: nesterov needs momentum > 0 and dampening 0")
        self.momentum, self.dampening, self.nesterov = float(momentum), float(dampening), \
            bool(nesterov)

    def init(self, params: Sequence[Tensor]) -> State:
        state: State = {"step": _counter(params)}
        if self.momentum:
            state["momentum_buffer"] = _zeros(params)
        return state

    def update(self, grads: Sequence[Tensor], state: State) -> tuple[list[Tensor], State]:
        grads = list(grads)
        step = state["step"] + 1
        if not self.momentum:
            return torch._foreach_mul(grads, -self.lr), {"step": step}
        buf = torch._foreach_mul(state["momentum_buffer"], self.momentum)
        if self.dampening:  # torch starts the buffer at g, not (1 - d) g
            first = (state["step"] == 0).to(grads[0].dtype)
            coef = 1 - self.dampening + self.dampening * first
            torch._foreach_add_(buf, torch._foreach_mul(grads, coef))
        else:  # buf starts at 0, so mu * 0 + g = g on the first step
            torch._foreach_add_(buf, grads)
        k = torch._foreach_add(grads, buf, alpha=self.momentum) if self.nesterov else buf
        return torch._foreach_mul(k, -self.lr), {"step": step, "momentum_buffer": buf}

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "nesterov": self.nesterov}


class RMSprop(Curvature):
    """RMSprop (torch.optim.RMSprop): M = sqrt(v) + eps (centered: sqrt(v - m^2) + eps)."""

    name = "rmsprop"

    def __init__(self, lr: float, alpha: float = 0.99, eps: float = 1e-8,
                 momentum: float = 0.0, centered: bool = False) -> None:
        super().__init__(lr)
        if not 0 <= alpha < 1 or not eps >= 0 or not 0 <= momentum < 1:
            raise ConfigError(f"rmsprop: need 0 <= alpha < 1, eps >= 0, 0 <= momentum < 1; got "
                              f"alpha={alpha!r}, eps={eps!r}, momentum={momentum!r}")
        self.alpha, self.eps = float(alpha), float(eps)
        self.momentum, self.centered = float(momentum), bool(centered)

    def init(self, params: Sequence[Tensor]) -> State:
        state: State = {"step": _counter(params), "square_avg": _zeros(params)}
        if self.centered:
            state["grad_avg"] = _zeros(params)
        if self.momentum:
            state["momentum_buffer"] = _zeros(params)
        return state

    def _denominator(self, state: State) -> list[Tensor]:
        if self.centered:
            var = torch._foreach_addcmul(state["square_avg"], state["grad_avg"],
                                         state["grad_avg"], value=-1)
            avg = torch._foreach_sqrt(var)
        else:
            avg = torch._foreach_sqrt(state["square_avg"])
        torch._foreach_add_(avg, self.eps)
        return avg

    def update(self, grads: Sequence[Tensor], state: State) -> tuple[list[Tensor], State]:
        return self.update_with_diagonal(grads, state)[:2]

    def update_with_diagonal(self, grads: Sequence[Tensor], state: State
                             ) -> tuple[list[Tensor], State, list[Tensor]]:
        grads = list(grads)
        sq = torch._foreach_mul(state["square_avg"], self.alpha)
        torch._foreach_addcmul_(sq, grads, grads, value=1 - self.alpha)
        new: State = {"step": state["step"] + 1, "square_avg": sq}
        if self.centered:
            new["grad_avg"] = torch._foreach_lerp(state["grad_avg"], grads, 1 - self.alpha)
        avg = self._denominator(new)
        if self.momentum:
            buf = torch._foreach_mul(state["momentum_buffer"], self.momentum)
            torch._foreach_addcdiv_(buf, grads, avg)
            new["momentum_buffer"] = buf
            return torch._foreach_mul(buf, -self.lr), new, avg
        k = torch._foreach_div(grads, avg)
        torch._foreach_mul_(k, -self.lr)
        return k, new, avg

    def diagonal(self, state: State) -> list[Tensor]:
        return self._denominator(state)

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "alpha": self.alpha, "eps": self.eps, "momentum": self.momentum,
                "centered": self.centered}


class Adam(Curvature):
    """Adam (torch.optim.Adam): M = sqrt(vhat) + eps with bias-corrected moments."""

    name = "adam"

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 amsgrad: bool = False) -> None:
        super().__init__(lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1 and eps >= 0):
            raise ConfigError(f"adam: need 0 <= beta1, beta2 < 1 and eps >= 0; got "
                              f"betas={betas!r}, eps={eps!r}")
        self.betas, self.eps, self.amsgrad = (float(b1), float(b2)), float(eps), bool(amsgrad)

    def init(self, params: Sequence[Tensor]) -> State:
        state: State = {"step": _counter(params), "exp_avg": _zeros(params),
                        "exp_avg_sq": _zeros(params)}
        if self.amsgrad:
            state["max_exp_avg_sq"] = _zeros(params)
        return state

    def _denominator(self, state: State, like: Tensor) -> list[Tensor]:
        step = state["step"].to(like.dtype)
        bc2_sqrt = torch.sqrt(1 - self.betas[1] ** step)
        v = state["max_exp_avg_sq"] if self.amsgrad else state["exp_avg_sq"]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, self.eps)
        return denom

    def update(self, grads: Sequence[Tensor], state: State) -> tuple[list[Tensor], State]:
        return self.update_with_diagonal(grads, state)[:2]

    def update_with_diagonal(self, grads: Sequence[Tensor], state: State
                             ) -> tuple[list[Tensor], State, list[Tensor]]:
        grads = list(grads)
        b1, b2 = self.betas
        m = torch._foreach_lerp(state["exp_avg"], grads, 1 - b1)
        v = torch._foreach_mul(state["exp_avg_sq"], b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        new: State = {"step": state["step"] + 1, "exp_avg": m, "exp_avg_sq": v}
        if self.amsgrad:
            new["max_exp_avg_sq"] = torch._foreach_maximum(state["max_exp_avg_sq"], v)
        denom = self._denominator(new, grads[0])
        step_size = -self.lr / (1 - b1 ** new["step"].to(grads[0].dtype))
        k = torch._foreach_div(m, denom)
        torch._foreach_mul_(k, step_size)
        return k, new, denom

    def diagonal(self, state: State) -> list[Tensor]:
        return self._denominator(state, state["exp_avg"][0])

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "amsgrad": self.amsgrad}


class Kronecker:
    """Kronecker-factored Gauss-Newton curvature per affine stage (K-FAC, pi-damping).

    ``update_factors(t, A, G)`` folds the batch factors A = E[a a^T] (inputs of the affine
    map, with a column of ones for the bias) and G = E[zeta zeta^T] (zeta = B dJ/dz, the
    per-sample output gradients) into exponential averages; ``apply(t, grads)`` returns
    lr (G + lam/pi I)^-1 [gW, gb] (A + pi lam I)^-1, the inverses refreshed every
    ``every`` steps (Martens & Grosse 2015).
    """

    name = "kronecker"

    def __init__(self, lr: float, damping: float = 1e-3, ema: float = 0.95,
                 every: int = 1) -> None:
        if not (lr > 0 and damping > 0 and 0 <= ema < 1 and int(every) >= 1):
            raise ConfigError(f"kronecker: need lr > 0, damping > 0, 0 <= ema < 1, every >= 1; "
                              f"got {lr}, {damping}, {ema}, {every}")
        self.lr, self.damping, self.ema, self.every = float(lr), float(damping), float(ema), \
            int(every)

    def init(self, stages: int) -> list[dict[str, Tensor]]:
        return [{} for _ in range(stages)]

    def update_factors(self, state: list[dict[str, Tensor]], t: int, A: Tensor, G: Tensor,  # noqa: N803
                       refresh: bool) -> None:
        st = state[t]  # entries are reassigned, never changed in place (see Solver guard)
        if "A" not in st:
            st["A"], st["G"] = A, G
        else:
            st["A"] = torch.lerp(st["A"], A, 1 - self.ema)
            st["G"] = torch.lerp(st["G"], G, 1 - self.ema)
        if "Ainv" not in st or refresh:
            a_, g_ = st["A"], st["G"]
            pi = torch.sqrt((torch.trace(a_) / a_.shape[0]) / (torch.trace(g_) / g_.shape[0])
                            .clamp_min(1e-30)).clamp(1e-4, 1e4)
            lam = math.sqrt(self.damping)
            st["Ainv"] = torch.linalg.inv(a_ + pi * lam * torch.eye(a_.shape[0], dtype=a_.dtype,
                                                                     device=a_.device))
            st["Ginv"] = torch.linalg.inv(g_ + lam / pi * torch.eye(g_.shape[0], dtype=g_.dtype,
                                                                     device=g_.device))

    def apply(self, state: list[dict[str, Tensor]], t: int, grads: Sequence[Tensor],
              has_bias: bool) -> tuple[Tensor, ...]:
        """lr (G+)^-1 [gW, gb] (A+)^-1 for stage t (the Kronecker inverse curvature times lr)."""
        st = state[t]
        gw = grads[0].reshape(grads[0].shape[0], -1)
        mat = torch.cat([gw, grads[1][:, None]], dim=1) if has_bias else gw
        sol = self.lr * (st["Ginv"] @ mat @ st["Ainv"])
        out = [sol[:, :gw.shape[1]].reshape(grads[0].shape)]
        if has_bias:
            out.append(sol[:, -1])
        return tuple(out)


#: first-order base optimizers by name, with the options each takes
FIRST_ORDER = {"sgd": SGD, "momentum": SGD, "rmsprop": RMSprop, "adam": Adam}


def make_curvature(name: str, lr: float, **options: Any) -> Curvature:
    """The first-order base optimizer ``name`` (``momentum`` is SGD with momentum 0.9 unless
    given); options are those of its ``torch.optim`` twin."""
    if name not in FIRST_ORDER:
        raise unknown_name("base optimizer", name, list(FIRST_ORDER))
    if "weight_decay" in options:
        raise ConfigError(
            f"{name}: weight decay belongs to the problem, so that every solver minimises the "
            "same J: use to_problem(module, loss, weight_decay=...) (--weight-decay), not an "
            "optimizer option"
        )
    if name == "momentum":
        options.setdefault("momentum", 0.9)
    cls = FIRST_ORDER[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "lr")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"{name} does not take the options {unknown}; its options are: "
                          f"{', '.join(valid)}")
    return cls(lr, **options)


def state_to_dict(state: State) -> dict[str, Any]:
    """A copy of a curvature state for a checkpoint (tensors cloned)."""
    return {k: (v.clone() if isinstance(v, Tensor) else [t.clone() for t in v])
            for k, v in state.items()}


def load_state(state: State, saved: dict[str, Any]) -> None:
    """Copy a saved curvature state into ``state`` in place (shapes must agree)."""
    missing = set(state) - set(saved)
    if missing:
        raise ConfigError(f"the saved optimizer state lacks {sorted(missing)}; was it saved "
                          "with other optimizer options?")
    with torch.no_grad():
        for k, v in state.items():
            if isinstance(v, Tensor):
                v.copy_(saved[k])
            else:
                if len(v) != len(saved[k]):
                    raise ConfigError(f"the saved optimizer state {k!r} has {len(saved[k])} "
                                      f"tensors, the problem {len(v)}")
                for a, b in zip(v, saved[k], strict=True):
                    a.copy_(b)
