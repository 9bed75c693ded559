"""CasADi <-> torch, both ways, with derivatives.

Two adapters, and the one place their tensors cross libraries:

- :func:`casadi_apply` (a ``torch.autograd.Function``) evaluates a CasADi ``Function`` on
  torch tensors. Its backward pass is CasADi's reverse mode: for ``F: x -> y`` the function
  ``F.reverse(1): (x, y, ybar) -> xbar = (dy/dx)^T ybar``. Inputs with one more (leading)
  dimension than the CasADi input are a batch: the function is evaluated once per sample by
  ``F.map(B)``; inputs without it are shared by the batch (``reduce_in``, so their adjoints
  are summed over the batch, as autograd's broadcasting rule requires).
- :class:`TorchCallback` (a ``casadi.Callback``) evaluates a torch function inside CasADi,
  e.g. a trained ``nn.Module`` in a CasADi model or optimisation problem. Its derivatives
  come from ``torch.func``: reverse mode from ``vjp`` (``has_reverse``/``get_reverse``) and
  the full Jacobian from ``jacrev`` (``has_jacobian``/``get_jacobian``). Both derivative
  functions are themselves ``TorchCallback`` s, so their derivatives (the Hessians IPOPT
  asks for) are exact too, to any order.

Layout. A CasADi matrix of size (r, c) is a torch tensor of shape ``()`` if r = c = 1,
``(r,)`` if c = 1, else ``(r, c)``, with the same indexing (``t[i, j] == M(i, j)``).
Jacobian blocks follow CasADi's column-major ``vec``; :class:`TorchCallback` permutes
torch's row-major Jacobians accordingly.

Conversions go through float64 NumPy arrays on the CPU in :func:`to_numpy` and
:func:`from_numpy` only; the latter restores the device and dtype of a reference tensor.
Built CasADi functions (maps and their reverse modes) are cached by
``(function, batch size, shared inputs)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import casadi as ca
import numpy as np
import torch
from torch import Tensor

from ..ocp.errors import ShapeError

__all__ = [
    "TorchCallback",
    "casadi_apply",
    "clear_cache",
    "from_numpy",
    "to_numpy",
    "torch_shape",
]


# ---------------------------------------------------------------------------- conversions
def to_numpy(t: Tensor) -> np.ndarray:
    """A float64 NumPy copy of ``t`` on the CPU (detached). The only torch -> NumPy exit."""
    return t.detach().to(device="cpu", dtype=torch.float64).numpy().copy()


def from_numpy(a: np.ndarray | ca.DM, like: Tensor | None = None, *,
               device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
    """A tensor from a NumPy array or CasADi ``DM`` on ``like``'s device and dtype (or those
    given; default CPU float64). The only NumPy -> torch entry."""
    if isinstance(a, ca.DM):
        a = np.asarray(a.full())
    if like is not None:
        device = like.device if device is None else device
        dtype = like.dtype if dtype is None else dtype
    a = np.asarray(a, dtype=np.float64)  # (np.ascontiguousarray would make 0-d arrays 1-d)
    t = torch.from_numpy(a if a.flags.c_contiguous else a.copy(order="C"))
    return t.to(device=device or "cpu", dtype=dtype or torch.float64)


def torch_shape(sp: ca.Sparsity | tuple[int, int]) -> tuple[int, ...]:
    """The torch shape of a CasADi (r, c) matrix: () for 1x1, (r,) for a column, else (r, c)."""
    r, c = (sp.size1(), sp.size2()) if isinstance(sp, ca.Sparsity) else sp
    if r == 1 and c == 1:
        return ()
    if c == 1:
        return (r,)
    return (r, c)


def _casadi_size(shape: Sequence[int], what: str) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    if len(shape) == 2:
        return shape
    raise ShapeError(
        f"{what} has shape {shape}; CasADi holds matrices, so give tensors of at most 2 "
        "dimensions (reshape it, e.g. flatten it to a vector)"
    )


def _to_dm_batch(a: np.ndarray, r: int, c: int, batch: int | None) -> ca.DM:
    """(B, r, c) samples side by side as CasADi's map wants them: an (r, B c) matrix."""
    if batch is None:
        return ca.DM(a.reshape(r, c))
    return ca.DM(a.reshape(batch, r, c).transpose(1, 0, 2).reshape(r, batch * c))


def _from_dm_batch(m: ca.DM, r: int, c: int, batch: int | None) -> np.ndarray:
    a = np.asarray(m.full(), dtype=np.float64)
    shape = torch_shape((r, c))
    if batch is None:
        return a.reshape(shape)
    return a.reshape(r, batch, c).transpose(1, 0, 2).reshape((batch,) + shape)


# ---------------------------------------------------------------------------- CasADi in torch
@functools.lru_cache(maxsize=256)
def _built(fn: ca.Function, batch: int | None, shared: tuple[int, ...]
           ) -> tuple[ca.Function, ca.Function]:
    """(F, F.reverse(1)) for one batch size; ``shared`` inputs are not mapped (reduce_in)."""
    if batch is None:
        mapped = fn
    else:
        mapped = fn.map(f"{fn.name()}_map{batch}", "serial", batch, list(shared), [])
    return mapped, mapped.reverse(1)


def clear_cache() -> None:
    """Forget the cached maps and reverse-mode functions of :func:`casadi_apply`."""
    _built.cache_clear()


class _CasadiFunction(torch.autograd.Function):
    """y = F(x) by CasADi; xbar = F.reverse(1)(x, y, ybar) in the backward pass."""

    @staticmethod
    def forward(ctx: Any, fn: ca.Function, *inputs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        if len(inputs) != fn.n_in():
            raise ShapeError(
                f"CasADi function {fn.name()} takes {fn.n_in()} inputs, got {len(inputs)}"
            )
        sizes = [(fn.size1_in(i), fn.size2_in(i)) for i in range(fn.n_in())]
        batch: int | None = None
        batched = []
        for i, (x, (r, c)) in enumerate(zip(inputs, sizes, strict=True)):
            base = len(torch_shape((r, c)))
            # a batch: one more leading dimension, each sample r x c; else one sample
            is_batched = x.dim() == base + 1 and x.shape[0] * r * c == x.numel()
            if is_batched:
                if batch is not None and x.shape[0] != batch:
                    raise ShapeError(
                        f"{fn.name()}: batched inputs disagree on the batch size "
                        f"({batch} vs {x.shape[0]} at input {i})"
                    )
                batch = x.shape[0]
            elif x.numel() != r * c:
                raise ShapeError(
                    f"input {i} ({fn.name_in(i)}) of {fn.name()} must have {r}x{c} entries "
                    f"(torch shape {torch_shape((r, c))}) or a leading batch dimension; got "
                    f"shape {tuple(x.shape)}"
                )
            batched.append(is_batched)
        if batch is None:
            shared: tuple[int, ...] = ()
        else:
            shared = tuple(i for i, b in enumerate(batched) if not b)
        mapped, rev = _built(fn, batch, shared)
        args = [
            _to_dm_batch(to_numpy(x), r, c, batch if b else None)
            for x, (r, c), b in zip(inputs, sizes, batched, strict=True)
        ]
        outs = mapped.call(args)
        like = inputs[0] if inputs else None
        results = tuple(
            from_numpy(_from_dm_batch(o, fn.size1_out(k), fn.size2_out(k), batch), like)
            for k, o in enumerate(outs)
        )
        ctx.fn, ctx.rev, ctx.args, ctx.batch, ctx.batched = fn, rev, args, batch, batched
        ctx.sizes = sizes
        # where each gradient goes back to (not the tensors themselves: no reference cycles)
        ctx.likes = [torch.empty(0, device=x.device, dtype=x.dtype) for x in inputs]
        ctx.shapes = [x.shape for x in inputs]
        return results

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        fn, batch = ctx.fn, ctx.batch
        seeds = [
            _to_dm_batch(to_numpy(g), fn.size1_out(k), fn.size2_out(k), batch)
            for k, g in enumerate(grads)
        ]
        nominal_out = [ca.DM() for _ in range(fn.n_out())]  # not needed: 0x0 = not given
        adj = ctx.rev.call(ctx.args + nominal_out + seeds)
        out: list[Tensor | None] = [None]
        for i, (a, (r, c), b, x, shape) in enumerate(
            zip(adj, ctx.sizes, ctx.batched, ctx.likes, ctx.shapes, strict=True)
        ):
            if not ctx.needs_input_grad[i + 1]:
                out.append(None)
                continue
            g = _from_dm_batch(a, r, c, batch if b else None)
            out.append(from_numpy(g, x).reshape(shape))
        return tuple(out)


def casadi_apply(fn: ca.Function, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
    """Evaluate the CasADi ``fn`` on torch tensors, differentiably (reverse mode by CasADi).

    Each input is either one sample (``torch_shape`` of the CasADi input, or any shape with
    as many entries) or a batch of them (one more, leading, dimension). With any batched
    input, ``fn`` is mapped over the batch and the unbatched inputs are shared. Outputs are
    on the first input's device and dtype; a single output is returned as a tensor.
    """
    outs = _CasadiFunction.apply(fn, *inputs)
    return outs[0] if len(outs) == 1 else outs


# ---------------------------------------------------------------------------- torch in CasADi
TorchFn = Callable[..., Tensor | Sequence[Tensor]]


def _as_tuple(fn: TorchFn) -> Callable[..., tuple[Tensor, ...]]:
    def wrapped(*args: Tensor) -> tuple[Tensor, ...]:
        out = fn(*args)
        return (out,) if isinstance(out, Tensor) else tuple(out)

    return wrapped


def _vec_jacobian(j: Tensor, out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> Tensor:
    """A torch Jacobian of shape out_shape + in_shape as CasADi's (numel_out, numel_in)
    block in column-major ``vec`` order (2-D shapes are transposed before flattening)."""
    no, ni = len(out_shape), len(in_shape)
    perm = list(reversed(range(no))) + [no + k for k in reversed(range(ni))]
    n_out = int(np.prod(out_shape)) if out_shape else 1
    n_in = int(np.prod(in_shape)) if in_shape else 1
    return j.permute(perm).reshape(n_out, n_in)


class TorchCallback(ca.Callback):
    """A torch function ``fn(*tensors) -> tensor | tuple`` as a CasADi function.

    Args:
        name: the CasADi function's name.
        fn: the torch function (e.g. a trained ``nn.Module``, or ``lambda x: stage.f(x, u)``).
            It must be differentiable by ``torch.func`` (no in-place ops on inputs, no
            ``.item()``).
        in_shapes: the torch shape of each input (at most 2-D; see the module layout rule).
        device, dtype: where ``fn`` runs (default CPU, float64).
        exact_derivatives: give CasADi the ``torch.func`` derivatives (default). With
            ``False`` CasADi has none of its own, which with ``opts={"enable_fd": True}``
            makes it use finite differences: the reference the tests check against.
        opts: CasADi ``Function`` options.

    Keep the object alive while CasADi functions built from it are in use (CasADi holds
    no Python reference to a callback).
    """

    def __init__(self, name: str, fn: TorchFn, in_shapes: Sequence[Sequence[int]], *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float64,
                 exact_derivatives: bool = True, opts: dict[str, Any] | None = None,
                 _in_sparsity: Sequence[ca.Sparsity] | None = None,
                 _out_sparsity: Sequence[ca.Sparsity] | None = None,
                 _names: tuple[Sequence[str], Sequence[str]] | None = None) -> None:
        ca.Callback.__init__(self)
        self._fn = _as_tuple(fn)
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self.exact_derivatives = exact_derivatives
        if _in_sparsity is None:
            sizes = [_casadi_size(s, f"input {i} of {name}") for i, s in enumerate(in_shapes)]
            self._in_sp = [ca.Sparsity.dense(r, c) for r, c in sizes]
        else:
            self._in_sp = list(_in_sparsity)
        self._in_shapes = [torch_shape(sp) for sp in self._in_sp]
        if _out_sparsity is None:
            zeros = [torch.zeros(s, device=self.device, dtype=dtype) for s in self._in_shapes]
            with torch.no_grad():
                outs = self._fn(*zeros)
            sizes = [_casadi_size(o.shape, f"output {k} of {name}") for k, o in enumerate(outs)]
            self._out_sp = [ca.Sparsity.dense(r, c) for r, c in sizes]
        else:
            self._out_sp = list(_out_sparsity)
        self._out_shapes = [torch_shape(sp) for sp in self._out_sp]
        self._names = _names
        self._children: list[TorchCallback] = []  # keeps derivative callbacks alive
        self.construct(name, dict(opts or {}))

    # ------------------------------------------------------------------ signature
    def get_n_in(self) -> int:
        return len(self._in_sp)

    def get_n_out(self) -> int:
        return len(self._out_sp)

    def get_sparsity_in(self, i: int) -> ca.Sparsity:
        return self._in_sp[i]

    def get_sparsity_out(self, i: int) -> ca.Sparsity:
        return self._out_sp[i]

    def get_name_in(self, i: int) -> str:
        return self._names[0][i] if self._names else f"i{i}"

    def get_name_out(self, i: int) -> str:
        return self._names[1][i] if self._names else f"o{i}"

    # ------------------------------------------------------------------ evaluation
    def _tensors(self, arg: Sequence[ca.DM]) -> list[Tensor]:
        out = []
        for a, sp, shape in zip(arg, self._in_sp, self._in_shapes, strict=True):
            if sp.nnz() == 0:  # a structurally zero input (a nominal output of a derivative)
                out.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
            else:
                dense = ca.densify(a)
                out.append(from_numpy(np.asarray(dense.full()).reshape(shape),
                                      device=self.device, dtype=self.dtype))
        return out

    def eval(self, arg: Sequence[ca.DM]) -> list[ca.DM]:
        with torch.no_grad():
            outs = self._fn(*self._tensors(arg))
        res = []
        for o, sp in zip(outs, self._out_sp, strict=True):
            if sp.nnz() == 0:
                res.append(ca.DM(sp))
            else:
                res.append(ca.DM(to_numpy(o).reshape(sp.size1(), sp.size2())))
        return res

    # ------------------------------------------------------------------ derivatives
    def _live(self) -> list[int]:
        return [i for i, sp in enumerate(self._in_sp) if sp.nnz() > 0]

    def has_jacobian(self) -> bool:
        return self.exact_derivatives

    def get_jacobian(self, name: str, inames: list[str], onames: list[str],
                     opts: dict[str, Any]) -> ca.Function:
        n_in, live = len(self._in_sp), self._live()
        fn, in_shapes, out_shapes = self._fn, self._in_shapes, self._out_shapes

        def jac(*args: Tensor) -> tuple[Tensor, ...]:
            xs = args[:n_in]
            blocks = torch.func.jacrev(fn, argnums=tuple(live))(*xs)
            out = []
            for k in range(len(out_shapes)):
                for i in range(n_in):
                    if i in live:
                        j = blocks[k][live.index(i)]
                        out.append(_vec_jacobian(j, out_shapes[k], in_shapes[i]))
                    else:
                        out.append(torch.zeros(0))
            return tuple(out)

        in_sp = self._in_sp + [ca.Sparsity(sp.size1(), sp.size2()) for sp in self._out_sp]
        out_sp = [
            ca.Sparsity.dense(so.numel(), si.numel()) if si.nnz() > 0
            else ca.Sparsity(so.numel(), si.numel())
            for so in self._out_sp for si in self._in_sp
        ]
        child = TorchCallback(name, jac, (), device=self.device, dtype=self.dtype, opts=opts,
                              _in_sparsity=in_sp, _out_sparsity=out_sp,
                              _names=(inames, onames))
        self._children.append(child)
        return child

    def has_reverse(self, nadj: int) -> bool:
        return self.exact_derivatives

    def get_reverse(self, nadj: int, name: str, inames: list[str], onames: list[str],
                    opts: dict[str, Any]) -> ca.Function:
        n_in, n_out, live = len(self._in_sp), len(self._out_sp), self._live()
        fn, in_sp, out_sp = self._fn, self._in_sp, self._out_sp

        def rev(*args: Tensor) -> tuple[Tensor, ...]:
            xs = args[:n_in]
            seeds = args[n_in + n_out:]
            live_x = [xs[i] for i in live]

            def f_live(*lx: Tensor) -> tuple[Tensor, ...]:
                full = list(xs)
                for i, v in zip(live, lx, strict=True):
                    full[i] = v
                return fn(*full)

            _, pullback = torch.func.vjp(f_live, *live_x)
            per_dir: list[tuple[Tensor, ...]] = []
            for d in range(nadj):
                cot = []
                for sp, s, shape in zip(out_sp, seeds, self._out_shapes, strict=True):
                    r, c = sp.size1(), sp.size2()
                    block = s.reshape(r, nadj * c)[:, d * c:(d + 1) * c]
                    cot.append(block.reshape(shape))
                per_dir.append(pullback(tuple(cot)))
            out = []
            for i, sp in enumerate(in_sp):
                r, c = sp.size1(), sp.size2()
                if i not in live:
                    out.append(torch.zeros(0))
                    continue
                k = live.index(i)
                cols = [per_dir[d][k].reshape(r, c) for d in range(nadj)]
                out.append(torch.cat(cols, dim=1).reshape(torch_shape((r, nadj * c))))
            return tuple(out)

        r_in = (in_sp + [ca.Sparsity(sp.size1(), sp.size2()) for sp in out_sp]
                + [ca.Sparsity.dense(sp.size1(), nadj * sp.size2()) for sp in out_sp])
        r_out = [
            ca.Sparsity.dense(sp.size1(), nadj * sp.size2()) if sp.nnz() > 0
            else ca.Sparsity(sp.size1(), nadj * sp.size2())
            for sp in in_sp
        ]
        child = TorchCallback(name, rev, (), device=self.device, dtype=self.dtype, opts=opts,
                              _in_sparsity=r_in, _out_sparsity=r_out, _names=(inames, onames))
        self._children.append(child)
        return child
