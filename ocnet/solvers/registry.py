"""The solver registry: one :class:`SolverRecord` per solver, the source of every list.

A solver registers itself at the bottom of its own module::

    register("adam", factory, "Adam on costate gradients", solver_class=GradientSolver,
             default_lr=1e-3, data_parallel=True, cost="first-order")

and everything that needs a fact about solvers reads the record: ``make_solver`` (the
valid options), ``ocnet solvers`` (the summaries), ``ocnet train`` under torchrun (the
data-parallel ones), ``ocnet compare`` and the demo (the default learning rate, which
solvers are exact references not run there), the device tests (which solvers make host
decisions). Nothing else keeps a list of solver names.

Options are checked against the signatures of the callables named in the record
(``options``, by default the solver class) *before* the factory is called, so an unknown
option is a :class:`~ocnet.ocp.errors.ConfigError` that lists the valid ones, and a
``TypeError`` raised inside a constructor is a bug that surfaces as itself.

Presets: a record may carry named sets of options (``presets={"paper": {...}}``, the values
beside the solver's ``register`` call, listed in its class docstring). ``make_solver(name,
problem, preset="paper", **options)`` starts from the preset and lets the explicit options
win; the merged options are then checked like any others.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..ocp.errors import ConfigError, unknown_name

if TYPE_CHECKING:  # base.py imports this module; only the type checker needs the classes
    from ..ocp.problem import Problem
    from .base import Solver

__all__ = [
    "BASE_OPTIONS",
    "COST_CLASSES",
    "SolverFactory",
    "SolverRecord",
    "make_solver",
    "register",
    "solver_entry",
    "solver_names",
    "solver_presets",
    "solver_records",
    "solver_summaries",
    "unregister",
    "valid_options",
]

SolverFactory = Callable[..., "Solver"]

#: what one step costs, by class (``SolverRecord.cost``)
COST_CLASSES: dict[str, str] = {
    "first-order": "one forward and one backward sweep per step (a gradient)",
    "first-order-feedback": "a gradient sweep plus a layer-wise feedback forward pass",
    "inner-iterations": "inner_iters evaluations of each layer's Hamiltonian per step (with "
                        "inner_budget='iterations': up to inner_max_evals)",
    "second-order-dense": "a dense factorisation per stage, cubic in the stage's controls",
    "nlp-dense": "one dense NLP over all controls and samples, solved to optimality",
}


@dataclass(frozen=True)
class SolverRecord:
    """Everything the framework knows about one registered solver.

    Attributes:
        name: the registry key (``--solver NAME``).
        factory: ``factory(problem, lr=None, **options) -> Solver``.
        summary: one line for ``ocnet solvers``.
        solver_class: the class the factory builds (None: not known; then the factory's
            own signature defines the options).
        default_lr: the learning rate (step size) taken for ``lr=None``, or None for a
            solver without one (it is not swept by ``ocnet compare``).
        lr_defaults: ``(option, {value: lr})`` when the default depends on an option
            (DDPNOpt's ``base``, E-MSA's ``inner``); :meth:`lr` resolves it.
        data_parallel: the solver all-reduces its batch statistics through ``solver.comm``
            and may run under ``torchrun`` (``ocnet train``).
        cost: the cost class of a step, a key of :data:`COST_CLASSES`.
        max_controls: the size limit the solver enforces (its constructor raises
            ``ConfigError`` beyond it), or None; per stage or for the whole problem as
            ``limit_per`` says.
        limit_per: ``"stage"`` or ``"problem"``.
        host_sync: the step makes host decisions with its default options (an accept
            loop read on the host): it cannot run without device-to-host syncs.
        on_device: False for a solver that solves on the host by design (CasADi/IPOPT):
            its problem may live anywhere, the solve happens on CPU.
        reference: an exact reference for small problems rather than a training method;
            ``ocnet compare`` and the demo do not run it.
        options: the callables whose keyword parameters are the solver's options (the
            first parameter of each, the problem or the parameters, is not an option);
            default ``(solver_class,)`` (or ``(factory,)``). When the last one takes
            ``**kwargs`` any option is passed on (e.g. IPOPT's own options).
        fixed: parameters of those callables the factory sets itself (not options).
        presets: named option sets, e.g. ``{"paper": {"trust": 0.0, ...}}``: the
            configuration of the solver's paper or public code (``make_solver(...,
            preset="paper")``; explicit options win). Empty: the solver has no preset (a
            ``preset=`` then raises ``ConfigError`` saying so).
    """

    name: str
    factory: SolverFactory
    summary: str
    solver_class: type | None = None
    default_lr: float | None = None
    lr_defaults: tuple[str, Mapping[str, float]] | None = None
    data_parallel: bool = False
    cost: str = "first-order"
    max_controls: int | None = None
    limit_per: str = "problem"
    host_sync: bool = False
    on_device: bool = True
    reference: bool = False
    options: tuple[Callable[..., Any], ...] = ()
    fixed: tuple[str, ...] = field(default=())
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cost not in COST_CLASSES:
            raise unknown_name("cost class", self.cost, list(COST_CLASSES))
        if self.limit_per not in ("stage", "problem"):
            raise ConfigError(f"solver {self.name!r}: limit_per must be 'stage' or 'problem', "
                              f"got {self.limit_per!r}")
        if not self.options:
            default = self.factory if self.solver_class is None else self.solver_class
            object.__setattr__(self, "options", (default,))
        # a copy, so that the module's dict and the record cannot drift apart
        object.__setattr__(self, "presets", {k: dict(v) for k, v in self.presets.items()})

    def lr(self, options: Mapping[str, Any] | None = None) -> float | None:
        """The default learning rate with these options (``lr_defaults`` resolved)."""
        if self.lr_defaults is not None:
            key, table = self.lr_defaults
            value = (options or {}).get(key)
            if value is not None and value in table:
                return float(table[value])
        return self.default_lr

    def skip_reason(self) -> str:
        """Why ``ocnet compare`` and the demo do not run a reference solver."""
        limit = f" (it refuses more than {self.max_controls} controls)" if self.max_controls \
            else ""
        return (f"exact reference ({self.summary}): {COST_CLASSES[self.cost]}, far too slow "
                f"for networks with thousands of weights{limit}; see docs/ipopt.md for where "
                "it is used")


_REGISTRY: dict[str, SolverRecord] = {}


def register(name: str, factory: SolverFactory, summary: str, *,
             solver_class: type | None = None, **facts: Any) -> SolverRecord:
    """Add a solver to the registry behind ``make_solver`` and ``--solver``.

    ``facts`` are the other :class:`SolverRecord` fields (``presets={"paper": {...}}``
    among them). Registering a name twice is an error (:func:`unregister` first to replace
    a solver on purpose).
    """
    if name in _REGISTRY:
        old = _REGISTRY[name].solver_class or _REGISTRY[name].factory
        raise ConfigError(
            f"solver {name!r} is already registered (by {old.__module__}.{old.__qualname__}); "
            f"choose another name, or unregister({name!r}) first to replace it"
        )
    record = SolverRecord(name=name, factory=factory, summary=summary,
                          solver_class=solver_class, **facts)
    _REGISTRY[name] = record
    return record


def unregister(name: str) -> SolverRecord:
    """Remove ``name`` from the registry (tests, replacing a solver); returns its record."""
    record = solver_entry(name)
    del _REGISTRY[name]
    return record


def solver_names() -> list[str]:
    """The valid ``--solver`` names."""
    return sorted(_REGISTRY)


def solver_records() -> list[SolverRecord]:
    """Every registered record, by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def solver_summaries() -> dict[str, str]:
    """Each registered solver's one-line summary, by name."""
    return {k: _REGISTRY[k].summary for k in sorted(_REGISTRY)}


def solver_entry(name: str) -> SolverRecord:
    """The registered record of ``name``; unknown names list the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_name("solver", name, solver_names()) from None


def solver_presets(name: str) -> dict[str, dict[str, Any]]:
    """The presets of solver ``name`` (a copy): ``{preset name: {option: value}}``."""
    return {k: dict(v) for k, v in solver_entry(name).presets.items()}


def _preset_options(name: str, record: SolverRecord, preset: str) -> dict[str, Any]:
    """The options of ``record``'s preset ``preset``; an unknown one lists the valid ones."""
    if not record.presets:
        raise ConfigError(
            f"solver {name!r} has no presets, so preset={preset!r} cannot be applied (its "
            "class docstring and docs/writing_a_solver.md, 'Paper presets', say why); give "
            "its options explicitly instead"
        )
    if preset not in record.presets:
        raise unknown_name(f"{name} preset", preset, list(record.presets))
    return dict(record.presets[preset])


def valid_options(record: SolverRecord) -> tuple[list[str], bool]:
    """(the option names a solver takes, whether it passes any other keyword on)."""
    names: set[str] = set()
    open_ended = False
    for fn in record.options:
        params = list(inspect.signature(fn).parameters.values())[1:]  # not problem/params
        open_ended = False
        for p in params:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                open_ended = True
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL and not p.name.startswith("_"):
                names.add(p.name)
    return sorted(names - set(record.fixed)), open_ended


#: options every solver takes (attributes of :class:`~ocnet.solvers.base.Solver` that
#: ``make_solver`` sets after building it): ``check_inputs`` (check each batch: finite, not
#: empty, placed like the problem) and ``guard`` (undo steps that are not finite)
BASE_OPTIONS: dict[str, tuple[type, ...]] = {"check_inputs": (bool,), "guard": (bool, str)}
_GUARD_MODES = (True, False, "device", "host")


def _annotations(record: SolverRecord) -> dict[str, list[str]]:
    """Each option's annotations (as written, in every callable that declares it)."""
    found: dict[str, list[str]] = {}
    for fn in record.options:
        for p in list(inspect.signature(fn).parameters.values())[1:]:
            if p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
                continue
            ann = p.annotation
            text = "" if ann is inspect.Parameter.empty else (
                ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann)))
            found.setdefault(p.name, []).append(text)
    return found


def _check_option_types(name: str, record: SolverRecord, options: Mapping[str, Any]) -> None:
    """A text value (``--solver-opt rho=abc``) for an option that takes no text is refused
    here, naming the option and the type it takes, instead of failing inside the solver."""
    annotations = _annotations(record)
    for key, value in options.items():
        if not isinstance(value, str):
            continue
        anns = annotations.get(key)
        if not anns or any(a in ("", "Any") or "str" in a or "Any" in a for a in anns):
            continue
        raise ConfigError(
            f"solver {name!r}: option {key}={value!r} is text, but {key} takes "
            f"{anns[0]}; give a number (e.g. --solver-opt {key}=0.5)"
        )


def make_solver(name: str, problem: Problem, *, preset: str | None = None,
                **options: Any) -> Solver:
    """The solver registered as ``name`` on ``problem``.

    Unknown names list the valid ones; unknown options list the solver's valid options
    (checked before the solver is built), and a text value for a numeric option is refused
    naming the option. Every solver also takes the base options ``check_inputs`` (bool)
    and ``guard`` (True, False, "device" or "host"): see :meth:`Solver.step`. Errors inside
    the constructor propagate as they are.

    ``preset`` (e.g. ``"paper"``, see :func:`solver_presets`) starts from the options of
    that preset; the explicit ``options`` win over it (``lr=None`` counts as not given, so a
    preset's ``lr`` stays). The merged options are checked like explicit ones. An unknown
    preset, or any preset for a solver that has none, is a ``ConfigError``.
    """
    record = solver_entry(name)
    if preset is not None:
        merged = _preset_options(name, record, preset)
        if "lr" in merged and options.get("lr", None) is None:
            options.pop("lr", None)
        options = {**merged, **options}
    base = {k: options.pop(k) for k in list(options) if k in BASE_OPTIONS}
    valid, open_ended = valid_options(record)
    unknown = sorted(set(options) - set(valid))
    if unknown and not open_ended:
        raise ConfigError(
            f"solver {name!r} does not take these options: {', '.join(unknown)}; its valid "
            f"options are: {', '.join(valid)} (and {', '.join(BASE_OPTIONS)}, which every "
            "solver takes)"
        )
    if "check_inputs" in base and not isinstance(base["check_inputs"], bool):
        raise ConfigError(f"check_inputs must be True or False, got {base['check_inputs']!r}")
    if "guard" in base and not any(base["guard"] is m or (isinstance(m, str) and
                                                           base["guard"] == m)
                                   for m in _GUARD_MODES):
        raise ConfigError(f"guard must be one of True, False, 'device', 'host', got "
                          f"{base['guard']!r}")
    _check_option_types(name, record, options)
    solver = record.factory(problem, **options)
    for key, value in base.items():
        setattr(solver, key, value)
    return solver
