"""ocnet's E-MSA beside the public E-MSA TensorFlow code on its own toy (issue 15 items 2, 4).

The public code is LiQianxiao/MaxPrinciple-DeepLearning (Li, Chen, Tai, E, "Maximum
principle based algorithms for deep learning", JMLR 2018): ``msalib/`` (``layers.py``: the
per-layer augmented Hamiltonian; ``network.py``: states and costates; ``train.py``:
``MSATrainer``, one scipy L-BFGS-B maximisation per layer, and ``BPTrainer``;
``scipyoptimizer.py``: a subclass of ``tf.contrib.opt.ScipyOptimizerInterface`` adding
``perturb_init``), ``main_toy.py`` and ``config.yml``. It is not part of this project.
Obtain it with the ``fetch`` tool (``fetch github:LiQianxiao/MaxPrinciple-DeepLearning``) or
``git clone https://github.com/LiQianxiao/MaxPrinciple-DeepLearning`` and export the tree
outside the project::

    mkdir -p /tmp/emsa_public
    git --git-dir=<mirror>/.git archive HEAD | tar -x -C /tmp/emsa_public

It is TensorFlow 1 code; it runs here, unchanged, in a separate environment::

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 tf_keras \\
        scipy pyyaml scikit-learn

Shims (all in this file, applied at import time; no public file is edited):

1. ``TF_USE_LEGACY_KERAS=1`` (with ``tf_keras`` installed), so ``tf.keras.Sequential``
   (``network.Network``) and ``tf.layers`` (``layers.Base``) are the graph-mode Keras 2 /
   legacy ``tf.layers`` classes the code was written for.
2. ``import tensorflow.compat.v1 as tf; tf.disable_v2_behavior()`` (graph mode, sessions,
   placeholders, reference variables), and while the public modules are imported
   ``sys.modules["tensorflow"]`` is that compat.v1 module (restored afterwards), so their
   ``import tensorflow as tf`` finds ``tf.placeholder``, ``tf.Session``, ``tf.layers``,
   ``tf.losses.mean_squared_error``, ``tf.logging``, ``tf.train.AdamOptimizer``.
3. ``tf.contrib`` is gone from TF 2: ``tf.contrib.opt.ScipyOptimizerInterface`` is set to
   :class:`ScipyOptimizerInterface` below, a minimal re-implementation of TF 1's
   ``tensorflow/contrib/opt/python/training/external_optimizer.py`` with exactly what
   ``msalib/scipyoptimizer.py`` uses: ``_loss``, ``_vars``, ``_packed_var``,
   ``_packed_loss_grad``, ``_packing_slices``, ``_update_placeholders``, ``_var_updates``,
   ``_packed_bounds`` (None), ``_equalities``/``_inequalities`` and their packed gradients
   (empty), ``optimizer_kwargs``, ``_make_eval_func`` (feeds the packed vector into the
   variables and runs the session), ``_make_eval_funcs`` and ``_minimize``
   (``scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", options=...)``, the
   gradient cast to float64). The public subclass's ``minimize`` (the perturbed start:
   ``perturb_init * U(-1, 1)`` from the global numpy RNG added to the L-BFGS-B start at every
   call) runs verbatim. The shim also records each call's ``nit``/``nfev`` (for the table).
4. ``tf_keras``'s ``tf_utils.assert_no_legacy_layers`` is made a no-op: since TF 1.13 Keras
   refuses ``tf.layers`` layers inside ``Sequential``; the code (December 2018, TF 1.12)
   adds ``tf.layers.Dense`` subclasses to ``tf.keras.Sequential``.
5. ``tf.keras.Sequential.apply`` = ``__call__`` (TF 1's deprecated alias, gone from
   ``tf_keras``), used by ``network.Network.msa_compute_x``.

With ``input_shape`` on the first layer, ``Sequential`` builds its own graph from its own
input placeholder at ``add`` time; ``msa_compute_x(input)`` then applies the net a second
time to ``input``, and ``layer.input`` / ``network.input`` / ``network.output`` refer to the
first application (node 0). The trainers feed ``network.input``, so every tensor the
algorithm uses is the one consistent graph of that placeholder (as in ``main_toy.py``).

Protocol (config.yml ``toy``; both sides single-threaded: ``tf.ConfigProto`` intra/inter op
1 thread, ``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``):

- data: ``main_toy.generate_datasets`` (``np.random.seed(1)``, 100 train points
  ``x ~ U(-pi, pi)``, then 100 test points, x repeated over the 5 nodes, y = sin x); ocnet:
  ``ocnet.reproduce._emsa_toy()`` (``RandomState(1)``, the same first draw; checked; x
  repeated over the nodes in the data and the features summed in the loss, as here, so
  that ocnet's 20 stages are the public code's 20 layers);
- net: 20 ``layers.ResidualDense`` (5 units, ``x + 0.25 tanh(x W + b)``, kernel
  ``truncated_normal(stddev=0)`` = 0, bias 0), built with the public classes as in
  ``main_toy.run_toy``; output = the sum of the 5 nodes, ``tf.losses.mean_squared_error``;
- public arms (a fresh graph, session and dataset each): ``MSATrainer`` (rho 1, reg 1e-3,
  ``maxiter`` 10, ``perturb_init`` 0.005 as config.yml), the same with ``perturb_init`` 0
  (an ablation: no noise), ``BPTrainer`` Adam lr 0.005; one iteration = one call of the
  public ``Trainer._train_epoch`` (one full batch of 100);
- ocnet arms: E-MSA ``make_solver("emsa", problem, rho=1, scaling="reference",
  inner_iters=10)`` from the all-zero init; E-MSA ``preset="paper"`` (the same plus
  ``perturb_init=0.005``); Adam lr 0.005; and the first E-MSA in float64 (module, data
  drawn again in float64) to see how the escape from the symmetric state depends on the
  rounding; in the ``--seeds`` sweep also E-MSA with ``rho_adapt=True`` (the adaptive rho
  from rho 1, ``AdaptiveRho``'s default thresholds; a declined step counts as an iteration);
- recorded after every iteration: J = MSE + 1e-3/2 |u|^2 (the public ``Trainer.
  _compute_loss`` returns this J, not the MSE: ``self.loss = msa_terminal_loss + sum of
  msa_regularizer``; ocnet's ``problem.objective`` is the same J), the MSE alone (public:
  ``network.msa_terminal_loss``; ocnet: ``ocnet.models.feature_sum_mse``), and the
  node asymmetry ``max over layers of max |W - mean W|`` (and the same for the biases):
  with x repeated over the nodes and an all-zero init every node is identical, so all
  entries of a layer's W are equal (and of b) and stay so under any deterministic
  permutation-equivariant update, up to rounding;
- seconds per step: ``time.process_time`` (CPU time of all threads of the process, so that
  the work of TF's own op thread is counted; with one torch thread it is ocnet's thread
  time) and wall, around the step only (the loss/asymmetry records are outside), median
  over steps 2..N (step 1 holds TF's graph warm-up). Both sides run one after the other in
  the same process slot (public first, in the subprocess).

Usage::

    .venv/bin/python benchmarks/emsa_public.py                 # 500 iterations (minutes)
    .venv/bin/python benchmarks/emsa_public.py --quick         # 3 iterations (seconds)
    .venv/bin/python benchmarks/emsa_public.py --seeds 5       # seeds 1-5 (half an hour),
                                                     # figure docs/figures/emsa_public_seeds.png
    .venv/bin/python benchmarks/emsa_public.py --seeds 5 --public-json \
        benchmarks/results/emsa_public_seeds.json              # ocnet's side again
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
FETCH_HINT = ("fetch github:LiQianxiao/MaxPrinciple-DeepLearning (or git clone "
              "https://github.com/LiQianxiao/MaxPrinciple-DeepLearning) and export its tree to "
              "--public (see this script's docstring)")
TF_HINT = ("python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 "
           "tf_keras scipy pyyaml scikit-learn")
PUBLIC_FILES = ("msalib/layers.py", "msalib/network.py", "msalib/train.py",
                "msalib/scipyoptimizer.py", "msalib/utils.py", "main_toy.py", "config.yml")
MARKS = (10, 50, 100, 500)
ASYM_AT = (1, 3, 5, 10, 15, 20, 30, 50, 100, 500)
ESCAPE = 1e-3  # "escaped the symmetric state": node asymmetry of W above this
ADAPT_LABEL = "ocnet E-MSA zero init, adaptive rho from 1, 10 inner evals (rho_adapt=True)"


# ================================================================ public side (TF python)
def _tf_compat() -> Any:
    """Shims 1-3 of the docstring: the TF1 module the public code imports as ``tensorflow``."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import scipy.optimize
    import tensorflow.compat.v1 as tf

    tf.disable_v2_behavior()
    tf.logging.set_verbosity(tf.logging.ERROR)
    from tf_keras.src.utils import tf_utils

    tf_utils.assert_no_legacy_layers = lambda layers: None  # shim 4 (TF >= 1.13 refuses them)
    tf.keras.Sequential.apply = lambda self, *a, **k: self(*a, **k)  # shim 5 (TF1 alias)

    def pack(ts: list[Any]) -> Any:
        return None if not ts else tf.concat([tf.reshape(t, [-1]) for t in ts], 0)

    class ScipyOptimizerInterface:
        """Minimal TF1 ``tf.contrib.opt.ScipyOptimizerInterface`` (external_optimizer.py)."""

        calls: list[tuple[int, int]] = []  # (nit, nfev) of every _minimize

        def __init__(self, loss: Any, var_list: list[Any] | None = None,
                     equalities: list[Any] | None = None,
                     inequalities: list[Any] | None = None, **optimizer_kwargs: Any) -> None:
            self._loss = loss
            self._vars = list(tf.trainable_variables() if var_list is None else var_list)
            self._equalities, self._inequalities = list(equalities or []), list(inequalities or [])
            self._packed_bounds = None

            def grads(t: Any) -> list[Any]:
                return [tf.zeros_like(v) if g is None else g
                        for v, g in zip(self._vars, tf.gradients(t, self._vars), strict=True)]

            self._update_placeholders = [tf.placeholder(v.dtype.base_dtype) for v in self._vars]
            self._var_updates = [
                v.assign(tf.reshape(ph, v.shape))
                for v, ph in zip(self._vars, self._update_placeholders, strict=True)]
            self._packed_var = pack(self._vars)
            self._packed_loss_grad = pack(grads(loss))
            self._packed_equality_grads = [pack(grads(e)) for e in self._equalities]
            self._packed_inequality_grads = [pack(grads(e)) for e in self._inequalities]
            self.optimizer_kwargs = optimizer_kwargs
            ends = np.cumsum([0] + [int(np.prod(v.shape.as_list())) for v in self._vars])
            self._packing_slices = [slice(int(a), int(b))
                                    for a, b in zip(ends[:-1], ends[1:], strict=True)]

        def _make_eval_func(self, tensors: Any, session: Any, feed_dict: dict, fetches: list,
                            callback: Any = None) -> Any:
            tensors = tensors if isinstance(tensors, list) else [tensors]

            def eval_func(x: Any) -> list[Any]:
                feed = {v: x[s].reshape(v.shape.as_list())
                        for v, s in zip(self._vars, self._packing_slices, strict=True)}
                feed.update(feed_dict)
                vals = session.run(tensors + list(fetches), feed_dict=feed)
                if callable(callback):
                    callback(*vals[len(tensors):])
                return vals[:len(tensors)]

            return eval_func

        def _make_eval_funcs(self, tensors: list[Any], session: Any, feed_dict: dict,
                             fetches: list, callback: Any = None) -> list[Any]:
            return [self._make_eval_func(t, session, feed_dict, fetches, callback)
                    for t in tensors]

        def _minimize(self, initial_val: Any, loss_grad_func: Any, equality_funcs: list,
                      equality_grad_funcs: list, inequality_funcs: list,
                      inequality_grad_funcs: list, packed_bounds: Any, step_callback: Any,
                      optimizer_kwargs: dict) -> Any:
            def fun(x: Any) -> tuple[Any, Any]:
                loss, grad = loss_grad_func(x)
                return loss, grad.astype("float64")  # L-BFGS-B wants float64 gradients

            kw = dict(optimizer_kwargs)
            method = kw.pop("method", "L-BFGS-B")
            cons = ([{"type": "eq", "fun": f, "jac": g}
                     for f, g in zip(equality_funcs, equality_grad_funcs, strict=True)]
                    + [{"type": "ineq", "fun": f, "jac": g}
                       for f, g in zip(inequality_funcs, inequality_grad_funcs, strict=True)])
            extra = {"constraints": cons} if cons else {}
            res = scipy.optimize.minimize(fun, initial_val, jac=True, callback=step_callback,
                                          method=method, bounds=packed_bounds, **extra, **kw)
            ScipyOptimizerInterface.calls.append((int(res.nit), int(res.nfev)))
            return res["x"]

    tf.contrib = types.SimpleNamespace(
        opt=types.SimpleNamespace(ScipyOptimizerInterface=ScipyOptimizerInterface))
    return tf


def _import_public(public: Path, tf: Any) -> dict[str, Any]:
    """The public modules, imported with ``sys.modules["tensorflow"]`` = the compat module."""
    import importlib

    sys.path.insert(0, str(public))
    saved = sys.modules.get("tensorflow")
    sys.modules["tensorflow"] = tf
    try:
        mods = {n: importlib.import_module(m) for n, m in (
            ("layers", "msalib.layers"), ("network", "msalib.network"),
            ("train", "msalib.train"), ("main_toy", "main_toy"))}
    finally:
        if saved is not None:
            sys.modules["tensorflow"] = saved
    return mods


def _public_arm(tf: Any, mods: dict[str, Any], cfg: dict[str, Any], kind: str,
                perturb: float, iters: int) -> dict[str, Any]:
    import numpy as np

    layers, network, train, main_toy = (mods[k] for k in ("layers", "network", "train",
                                                          "main_toy"))
    tf.reset_default_graph()
    tf.set_random_seed(cfg["seed"])
    trainset, testset = main_toy.generate_datasets(cfg)  # np.random.seed(1) first
    inp = tf.placeholder(tf.float32, [None, cfg["num_nodes"]], name="input")
    lab = tf.placeholder(tf.float32, [None, 1], name="output")
    net = network.Network(name="msa_net")
    for n in range(cfg["num_layers"]):  # as main_toy.run_toy builds it
        first = {"input_shape": inp.shape[1:]} if n == 0 else {}
        net.add(layers.ResidualDense(
            units=cfg["num_nodes"], activation=cfg["activation"], msa_rho=cfg["rho"],
            msa_reg=cfg["reg"],
            kernel_initializer=tf.truncated_normal_initializer(stddev=cfg["kernel_init"]),
            bias_initializer=tf.constant_initializer(cfg["bias_init"]),
            delta=cfg["delta"], name=f"residualdense_{n}", **first))
    net.msa_compute_x(inp)
    net.msa_compute_p(lab, main_toy.loss_func)
    if kind == "msa":
        trainer = train.MSATrainer(network=net, name="MSA_trainer", maxiter=cfg["msa_maxiter"],
                                   perturb_init=perturb)
    else:
        trainer = train.BPTrainer(network=net, name="Adam_trainer", method="AdamOptimizer",
                                  args={"learning_rate": cfg["adam_lr"]})
    sess = tf.Session(config=tf.ConfigProto(intra_op_parallelism_threads=1,
                                            inter_op_parallelism_threads=1))
    trainer.initialize(sess)
    feed = {net.input: trainset.data, net.label: trainset.target}
    weights = [(ly.kernel, ly.bias) for ly in net.layers]
    rec: dict[str, list[float]] = {k: [] for k in ("J", "mse", "asym_w", "asym_b", "cpu",
                                                   "wall", "nit", "nfev")}

    def record() -> None:
        rec["J"].append(float(trainer._compute_loss(sess, trainset, cfg["buffer_size"])))
        rec["mse"].append(float(sess.run(net.msa_terminal_loss, feed)))
        vals = sess.run(weights)
        rec["asym_w"].append(max(float(np.abs(w - w.mean()).max()) for w, _ in vals))
        rec["asym_b"].append(max(float(np.abs(b - b.mean()).max()) for _, b in vals))

    calls = tf.contrib.opt.ScipyOptimizerInterface.calls
    record()
    for _ in range(iters):
        n0 = len(calls)
        c0, w0 = time.process_time(), time.perf_counter()
        trainer._train_epoch(sess, trainset, testset, cfg["batch_size"], cfg["buffer_size"],
                             print_step=False)
        rec["wall"].append(time.perf_counter() - w0)
        rec["cpu"].append(time.process_time() - c0)
        rec["nit"].append(sum(c[0] for c in calls[n0:]))
        rec["nfev"].append(sum(c[1] for c in calls[n0:]))
        record()
    sess.close()
    return rec


def public_worker(public: Path, iters: int, out: Path, seeds: list[int] | None = None) -> None:
    """Run the public arms (in the TF python) and write their records to ``out`` (JSON).
    With ``seeds``: only the public MSA in its own configuration, once per seed (config.yml's
    ``seed``, which seeds the data, TensorFlow and the numpy noise of the perturbed start)."""
    t0 = time.perf_counter()
    tf = _tf_compat()
    mods = _import_public(public, tf)
    import numpy as np
    import scipy
    import yaml

    with open(public / "config.yml") as f:
        cfg = yaml.safe_load(f)["toy"]
    if seeds:
        runs = {}
        for s in seeds:
            c = dict(cfg, seed=s)
            runs[str(s)] = _public_arm(tf, mods, c, "msa", c["msa_perturb_init"], iters)
            runs[str(s)]["x_train"] = mods["main_toy"].generate_datasets(c)[0].data[:, 0].tolist()
            print(f"[public] seed {s}: J {runs[str(s)]['J'][-1]:.4g}", file=sys.stderr,
                  flush=True)
        out.write_text(json.dumps({"config": cfg, "runs": runs,
                                   "seconds": time.perf_counter() - t0}))
        return
    trainset, _ = mods["main_toy"].generate_datasets(cfg)
    arms = {
        f"public MSA (perturb_init {cfg['msa_perturb_init']})": ("msa", cfg["msa_perturb_init"]),
        "public MSA, perturb_init 0 (ablation)": ("msa", 0.0),
        f"public Adam (lr {cfg['adam_lr']})": ("adam", 0.0),
    }
    res = {"config": cfg, "x_train": trainset.data[:, 0].tolist(),
           "y_train": trainset.target[:, 0].tolist(), "arms": {},
           "versions": {"tensorflow": tf.VERSION if hasattr(tf, "VERSION") else "?",
                        "numpy": np.__version__, "scipy": scipy.__version__}}
    for label, (kind, pert) in arms.items():
        res["arms"][label] = _public_arm(tf, mods, cfg, kind, pert, iters)
        print(f"[public] {label}: J {res['arms'][label]['J'][-1]:.4g}", file=sys.stderr,
              flush=True)
    res["seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(res))


# ================================================================ ocnet side (this python)
def ocnet_arm(kind: str, iters: int, float64: bool = False, seed: int = 1,
              inner_iters: int = 10, budget: str = "evaluations") -> dict[str, Any]:
    """One ocnet arm on the toy of ``ocnet.reproduce._emsa_toy`` (data of numpy ``seed``)
    from the all-zero init; ``inner_iters`` is the plain E-MSA arm's inner budget."""
    import torch

    from ocnet.models import feature_sum_mse
    from ocnet.reproduce import _emsa_toy
    from ocnet.solvers import make_solver

    problem, x, y = _emsa_toy(dtype=torch.float64 if float64 else torch.float32, seed=seed)
    net = problem.module
    opts: dict[str, Any] = {
        "emsa": {"rho": 1.0, "scaling": "reference", "inner_iters": inner_iters,
                 "inner_budget": budget},
        # the public noise changes with the config seed; ocnet's with perturb_seed
        "emsa-paper": {"preset": "paper", "perturb_seed": seed - 1},
        # the adaptive rho (AdaptiveRho from the public rho 1, its textbook thresholds)
        "emsa-adapt": {"rho": 1.0, "scaling": "reference", "inner_iters": inner_iters,
                       "inner_budget": budget, "rho_adapt": True},
        "adam": {"lr": 0.005},
    }[kind]
    solver = make_solver("adam" if kind == "adam" else "emsa", problem, **opts)
    declined = 0  # steps the adaptive rho turned down (they count as iterations)
    blocks = [m.linear for m in net if hasattr(m, "linear")]
    rec: dict[str, list[float]] = {k: [] for k in ("J", "mse", "asym_w", "asym_b", "cpu",
                                                   "wall", "evals")}

    def record() -> None:
        with torch.no_grad():
            rec["J"].append(float(problem.objective(x, y)))
            rec["mse"].append(float(feature_sum_mse(net(x), y)))
            rec["asym_w"].append(max(float((b.weight - b.weight.mean()).abs().max())
                                     for b in blocks))
            rec["asym_b"].append(max(float((b.bias - b.bias.mean()).abs().max())
                                     for b in blocks))

    record()
    for _ in range(iters):
        e0 = getattr(solver, "evaluations", 0)
        c0, w0 = time.process_time(), time.perf_counter()
        declined += bool(solver.step(x, y).declined)
        rec["wall"].append(time.perf_counter() - w0)
        rec["cpu"].append(time.process_time() - c0)
        rec["evals"].append(getattr(solver, "evaluations", 0) - e0)
        record()
        if not math.isfinite(rec["J"][-1]):
            break
    rec["declined"] = [declined]
    return rec


# ================================================================ report
def _g(v: float) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _at(ls: list[float], k: int) -> float:
    return ls[min(k, len(ls) - 1)]


def _med(ls: list[float]) -> float:
    return statistics.median(ls[1:] or ls) if ls else math.nan


def _escape(asym: list[float]) -> str:
    k = next((i for i, a in enumerate(asym) if a > ESCAPE), None)
    return "never" if k is None else str(k)


def report(pub: dict[str, Any], oc: dict[str, dict[str, Any]], iters: int, x_oc: list[float],
           head: str) -> tuple[str, dict[str, Any]]:
    """The markdown tables and the summary record."""
    arms = {**pub["arms"], **oc}
    marks = sorted({k for k in MARKS if k <= iters} | {iters})
    lines = [head, ""]
    dx = max(abs(a - b) for a, b in zip(pub["x_train"], x_oc, strict=True))
    p0 = next(iter(pub["arms"].values()))
    o0 = next(iter(oc.values()))
    agree = {"max |x_public - x_ocnet|": dx,
             "initial MSE public": p0["mse"][0], "initial MSE ocnet": o0["mse"][0],
             "|initial MSE difference|": abs(p0["mse"][0] - o0["mse"][0]),
             "initial J public": p0["J"][0], "initial J ocnet": o0["J"][0]}
    lines += ["### Same data, same init", "",
              f"max |x_public - x_ocnet| over the 100 training points = {dx:.2e} (ocnet's x is "
              "float32); initial MSE public "
              f"{p0['mse'][0]:.8g}, ocnet {o0['mse'][0]:.8g} (difference "
              f"{agree['|initial MSE difference|']:.2e}); initial J public {p0['J'][0]:.8g}, "
              f"ocnet {o0['J'][0]:.8g} (all weights 0, so J = MSE).", ""]
    for q, name in (("mse", "MSE (mean squared error only)"),
                    ("J", "J = MSE + 1e-3/2 |u|^2 (what the public `_compute_loss` prints)")):
        lines += [f"### {name} after iteration k", "",
                  "| arm | " + " | ".join(f"k={k}" for k in marks)
                  + " | max over k >= 5 (at k) |", "|---|" + "---|" * (len(marks) + 1)]
        for label, r in arms.items():
            tail = r[q][5:]
            spike = "n/a"
            if tail:
                kmax = 5 + max(range(len(tail)), key=lambda i: tail[i]
                               if math.isfinite(tail[i]) else math.inf)
                spike = f"{_g(tail[kmax - 5])} ({kmax})"
            lines.append(f"| {label} | " + " | ".join(_g(_at(r[q], k)) for k in marks)
                         + f" | {spike} |")
        lines.append("")
    at = [k for k in ASYM_AT if k <= iters]
    lines += ["### Node asymmetry max_layers max_ij |W_ij - mean W| (and b) after iteration k",
              "",
              f"0 in the symmetric state (all nodes equal). 'escape' = first k with W asymmetry "
              f"> {ESCAPE:g}.", "",
              "| arm | " + " | ".join(f"k={k}" for k in at) + " | max over the run | escape k |",
              "|---|" + "---|" * (len(at) + 2)]
    for label, r in arms.items():
        lines.append(f"| {label}: W | " + " | ".join(f"{_at(r['asym_w'], k):.1e}" for k in at)
                     + f" | {max(r['asym_w']):.1e} | {_escape(r['asym_w'])} |")
        lines.append(f"| {label}: b | " + " | ".join(f"{_at(r['asym_b'], k):.1e}" for k in at)
                     + f" | {max(r['asym_b']):.1e} | |")
    lines.append("")
    lines += ["### Seconds per step (median over steps 2..N; one thread)", "",
              "| arm | CPU s/step | wall s/step | evaluations/step (median) |", "|---|---|---|---|"]
    sec = {}
    for label, r in arms.items():
        sec[label] = {"cpu": _med(r["cpu"]), "wall": _med(r["wall"])}
        ev = r.get("nfev") or r.get("evals") or []
        evs = (f"{statistics.median(ev):g}" + (" (scipy nfev, summed over the 20 layers)"
                                               if "nfev" in r else " (all layers at once)")
               if ev and max(ev) > 0 else "1 gradient")
        lines.append(f"| {label} | {sec[label]['cpu']:.4g} | {sec[label]['wall']:.4g} | {evs} |")
    pl = list(pub["arms"])
    ol = list(oc)
    ratios = {
        "public MSA / public Adam (CPU)": sec[pl[0]]["cpu"] / sec[pl[2]]["cpu"],
        "public MSA perturb 0 / public Adam (CPU)": sec[pl[1]]["cpu"] / sec[pl[2]]["cpu"],
        "ocnet E-MSA / ocnet Adam (CPU)": sec[ol[0]]["cpu"] / sec[ol[2]]["cpu"],
        "ocnet E-MSA paper / ocnet Adam (CPU)": sec[ol[1]]["cpu"] / sec[ol[2]]["cpu"],
        "ocnet E-MSA / public MSA perturb 0 (CPU)": sec[ol[0]]["cpu"] / sec[pl[1]]["cpu"],
        "ocnet E-MSA paper / public MSA 0.005 (CPU)": sec[ol[1]]["cpu"] / sec[pl[0]]["cpu"],
        "ocnet Adam / public Adam (CPU)": sec[ol[2]]["cpu"] / sec[pl[2]]["cpu"],
        "ocnet E-MSA / public MSA perturb 0 (wall)": sec[ol[0]]["wall"] / sec[pl[1]]["wall"],
        "ocnet Adam / public Adam (wall)": sec[ol[2]]["wall"] / sec[pl[2]]["wall"],
    }
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3g} |" for k, v in ratios.items()]
    lines.append("")
    summary = {"agreement": agree, "seconds": sec, "ratios": ratios,
               "marks": {label: {q: {k: _at(r[q], k) for k in marks} for q in ("mse", "J")}
                         for label, r in arms.items()},
               "spike_J": {label: max(r["J"][5:], default=math.nan) for label, r in arms.items()},
               "escape": {label: _escape(r["asym_w"]) for label, r in arms.items()}}
    return "\n".join(lines), summary


def _save_png(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    from ocnet._atomic import atomic_write

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())


def figure(arms: dict[str, dict[str, Any]], path: Path) -> None:
    """Semilogy MSE curves and node asymmetry of every arm, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, r in arms.items():
        ls = "--" if label.startswith("public") else "-"
        a1.semilogy(r["mse"], ls, label=label, lw=1.2)
        a2.semilogy([max(a, 1e-18) for a in r["asym_w"]], ls, label=label, lw=1.2)
    a1.set_xlabel("iteration")
    a1.set_ylabel("training MSE")
    a1.set_title("E-MSA toy (config.yml 'toy'): public TF code (dashed) vs ocnet")
    a2.set_xlabel("iteration")
    a2.set_ylabel("max_layers max |W - mean W|")
    a2.set_title("node asymmetry (0 = all nodes equal)")
    a2.legend(fontsize=7)
    _save_png(fig, path)


SWEEP_INNER = (10, 15, 20)


def figure_seeds(curves: dict[str, dict[str, list[float]]], path: Path,
                 arms: tuple[str, ...] | None = None) -> None:
    """The seed sweep's J curves: per arm the median over the seeds and the band from the
    smallest to the largest seed, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    for ax, last in zip(axes, (60, None), strict=True):
        for label, per in curves.items():
            if arms is not None and label not in arms:
                continue
            n = min(len(c) for c in per.values())
            n = n if last is None else min(n, last + 1)
            cols = list(zip(*(c[:n] for c in per.values()), strict=True))
            med = [statistics.median(c) for c in cols]
            line, = ax.semilogy(med, "--" if label.startswith("public") else "-", lw=1.3,
                                label=f"{label} (median of {len(per)})")
            ax.fill_between(range(n), [min(c) for c in cols], [max(c) for c in cols],
                            color=line.get_color(), alpha=0.12, lw=0)
        for k in MARKS:
            if last is None or k <= last:
                ax.axvline(k, color="0.85", lw=0.6, zorder=0)
        ax.set_ylim(5e-3, 1e2)
        ax.set_xlim(0, last)
        ax.set_xlabel("iteration (one inner maximisation each; a declined step counts)")
        ax.set_ylabel("J = MSE + 1e-3/2 |u|^2")
    axes[0].set_title("the first 60 iterations")
    axes[1].set_title("E-MSA public toy, seeds 1-5: median and min-max band")
    axes[1].legend(fontsize=6.5)
    _save_png(fig, path)


#: the arms drawn in the seed sweep's figure
SEED_FIGURE_ARMS = ("ocnet E-MSA zero init, 10 inner evals",
                    'ocnet E-MSA preset="paper" (perturb_seed = seed - 1)', "ocnet Adam (lr 0.005)")


def seed_sweep(args: argparse.Namespace, public: Path, iters: int, env: dict[str, str],
               t0: float, load0: float) -> dict[str, Any]:
    """Seeds 1..N: the public MSA (its configuration, noise included) against ocnet's E-MSA
    from the all-zero init without noise at the inner budgets ``SWEEP_INNER`` (evaluations;
    the public code's 10 L-BFGS-B iterations take a median of 13.5-15 evaluations per
    layer, benchmarks/results/emsa_public.md), with 10 iterations (``inner_budget=
    "iterations"``: the public configuration without its noise), its paper preset
    (``perturb_seed`` = seed - 1: a noise realisation per seed, as the public code has) and
    Adam, on the same data."""
    import torch

    from ocnet._atomic import atomic_write

    seeds = list(range(1, args.seeds + 1))
    if args.public_json:  # the public side of an earlier sweep (it is deterministic)
        pub = json.loads(Path(args.public_json).read_text())
        pub = pub.get("public", pub)
        have = sorted(int(s) for s in pub.get("runs", {}))
        if any(s not in have for s in seeds) or any(
                len(pub["runs"][str(s)]["J"]) != iters + 1 for s in seeds):
            sys.exit(f"emsa_public.py: {args.public_json} holds the public runs of seeds "
                     f"{have}, not {iters} iterations of seeds {seeds}: rerun without "
                     f"--public-json")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            jpath = Path(tmp) / "public.json"
            proc = subprocess.run([args.tf_python, str(Path(__file__).resolve()), "--public",
                                   str(public), "--iterations", str(iters), "--_public-worker",
                                   str(jpath), "--_seed-list", ",".join(map(str, seeds))],
                                  env=env, cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"emsa_public.py: the public side failed (rc {proc.returncode}):\n"
                         f"{proc.stderr[-4000:]}")
            pub = json.loads(jpath.read_text())
    t_pub = time.perf_counter() - t0
    pub_label = f"public MSA (perturb_init {pub['config']['msa_perturb_init']})"
    labels = {f"ocnet E-MSA zero init, {n} inner evals": ("emsa", n, "evaluations")
              for n in SWEEP_INNER}
    labels["ocnet E-MSA zero init, 10 inner iterations (the preset without noise)"] = (
        "emsa", 10, "iterations")
    labels['ocnet E-MSA preset="paper" (perturb_seed = seed - 1)'] = ("emsa-paper", 10, "")
    labels[ADAPT_LABEL] = ("emsa-adapt", 10, "evaluations")
    labels["ocnet Adam (lr 0.005)"] = ("adam", 10, "")
    runs: dict[str, dict[str, Any]] = {pub_label: pub["runs"]}
    for label, (kind, n, budget) in labels.items():
        runs[label] = {}
        for s in seeds:
            runs[label][str(s)] = ocnet_arm(kind, iters, seed=s, inner_iters=n, budget=budget)
            print(f"[ocnet] {label} seed {s}: J {runs[label][str(s)]['J'][-1]:.4g}",
                  file=sys.stderr, flush=True)
    from ocnet.reproduce import _emsa_toy

    dx = max((max(abs(a - b) for a, b in zip(pub["runs"][str(s)]["x_train"],
                                             _emsa_toy(seed=s)[1][:, 0].tolist(), strict=True))
              for s in seeds if "x_train" in pub["runs"][str(s)]), default=None)
    marks = sorted({k for k in MARKS if k <= iters} | {iters})
    lines = [f"## ocnet E-MSA vs the public E-MSA code on its toy, seeds "
             f"{seeds[0]}..{seeds[-1]} ({iters} iterations)", "",
             f"Seed s = config.yml's `seed` (the data, TF's seed and the numpy noise of the "
             f"public perturbed start); ocnet draws the same data (max |x_public - x_ocnet| "
             f"over all seeds {'not in the reused JSON' if dx is None else f'{dx:.1e}'}). "
             f"ocnet's E-MSA arms start from all zeros with no "
             f"noise (rho 1, reference scaling); 'inner evals' counts evaluations (all layers at "
             f"once; the public 10 L-BFGS-B iterations take 13.5-15 evaluations per layer), "
             f"'inner iterations' accepted steps per layer with scipy's stops "
             f"(`inner_budget=\"iterations\"`, as the paper preset). Public side "
             + ((f"reused from {args.public_json} (" + (pub["note"] if pub.get("note")
                                                          else f"its {pub['seconds']:.0f} s")
                 + ")") if args.public_json else f"{t_pub:.0f} s")
             + f", all {time.perf_counter() - t0:.0f} s; load {load0:.2f} at the "
             f"start, {os.getloadavg()[0]:.2f} at the end (on {os.cpu_count()} CPUs); torch "
             f"{torch.__version__}, 1 thread each.", "",
             "### J after iteration k, per seed", "",
             "| arm | seed | " + " | ".join(f"k={k}" for k in marks) + " | max J, k >= 5 |",
             "|---|---|" + "---|" * (len(marks) + 1)]
    for label, per in runs.items():
        for s in seeds:
            r = per[str(s)]
            lines.append(f"| {label} | {s} | " + " | ".join(_g(_at(r['J'], k)) for k in marks)
                         + f" | {_g(max(r['J'][5:], default=math.nan))} |")
    med = {label: {k: statistics.median(_at(per[str(s)]["J"], k) for s in seeds)
                   for k in marks} for label, per in runs.items()}
    wins = {label: {k: sum(1 for s in seeds if _at(per[str(s)]["J"], k)
                           <= _at(pub["runs"][str(s)]["J"], k)) for k in marks}
            for label, per in runs.items() if label != pub_label}
    sec = {label: statistics.median(_med(per[str(s)]["cpu"]) for s in seeds)
           for label, per in runs.items()}
    adam = sec["ocnet Adam (lr 0.005)"]
    lines += ["", f"### Median over the {len(seeds)} seeds, seeds at or below the public code "
                  "(same seed), CPU seconds per step", "",
              "| arm | " + " | ".join(f"median J k={k}" for k in marks)
              + " | seeds <= public at " + "/".join(map(str, marks))
              + " | CPU s/step | / ocnet Adam |", "|---|" + "---|" * (len(marks) + 3)]
    for label in runs:
        w = "/".join(str(wins[label][k]) for k in marks) if label in wins else "-"
        lines.append(f"| {label} | " + " | ".join(_g(med[label][k]) for k in marks)
                     + f" | {w} | {sec[label]:.4g} | {sec[label] / adam:.3g} |")
    if ADAPT_LABEL in runs:
        dec = [runs[ADAPT_LABEL][str(s)]["declined"][0] for s in seeds]
        mono = all(all(b <= a for a, b in zip(r["J"], r["J"][1:], strict=False))
                   for r in runs[ADAPT_LABEL].values())
        lines += ["", f"Adaptive rho (`rho_adapt=True`: `AdaptiveRho(1)`, its default thresholds "
                      f"0.25/0.75, factor 2, accept 1e-4, not tuned here): steps declined per "
                      f"seed {'/'.join(map(str, dec))} of {iters} (each counts as an "
                      f"iteration: it costs an inner maximisation); J "
                      f"{'never increases' if mono else 'increases somewhere'} along every "
                      f"curve; largest J after iteration 5, median over the seeds: "
                      + _g(statistics.median(max(runs[ADAPT_LABEL][str(s)]["J"][5:],
                                                 default=math.nan) for s in seeds))
                      + " (public: " + _g(statistics.median(
                          max(runs[pub_label][str(s)]["J"][5:], default=math.nan)
                          for s in seeds)) + ")."]
    text = "\n".join(lines)
    print(text, flush=True)
    out = Path(args.out or ("runs/bench/emsa_public_seeds_quick.md" if args.quick
                            else ROOT / "benchmarks" / "results" / "emsa_public_seeds.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, text + "\n")
    record = {"iterations": iters, "seeds": seeds, "public_config": pub["config"],
              "median_J": med, "seeds_at_or_below_public": wins, "cpu_s_per_step": sec,
              "curves": {label: {s: r["J"] for s, r in per.items()}
                         for label, per in runs.items()},
              "public": pub}  # whole, so that --public-json can reuse it
    atomic_write(out.with_suffix(".json"), json.dumps(record, indent=1))
    fig = Path(args.figure or ("runs/bench/emsa_public_seeds_quick.png" if args.quick
                               else ROOT / "docs" / "figures" / "emsa_public_seeds.png"))
    figure_seeds(record["curves"], fig, (pub_label, ADAPT_LABEL, *SEED_FIGURE_ARMS))
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options; run the public side in the TF python, ocnet here; write the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--public", default="/tmp/emsa_public",
                    help="the exported LiQianxiao/MaxPrinciple-DeepLearning tree")
    ap.add_argument("--tf-python", default="/tmp/tfenv/bin/python",
                    help="a python with tensorflow(-cpu) 2.x, tf_keras, scipy, pyyaml, sklearn")
    ap.add_argument("--iterations", type=int, default=None, help="default 500 (quick: 3)")
    ap.add_argument("--quick", action="store_true", help="3 iterations (seconds)")
    ap.add_argument("--out", default=None, help="markdown report (a .json is written beside)")
    ap.add_argument("--figure", default=None)
    ap.add_argument("--_public-worker", dest="worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seeds", type=int, default=None,
                    help="the seed sweep: seeds 1..N (config.yml's seed: data, TF, noise), "
                         "the public MSA in its configuration against ocnet's E-MSA from "
                         f"zero at inner budgets {'/'.join(map(str, SWEEP_INNER))} and its "
                         "paper preset; writes emsa_public_seeds.md/.json")
    ap.add_argument("--public-json", default=None,
                    help="with --seeds: take the public runs from this JSON (an earlier "
                         "sweep's output, or its worker's) instead of running TensorFlow")
    ap.add_argument("--_seed-list", dest="seed_list", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    iters = args.iterations or (3 if args.quick else 500)
    public = Path(args.public)
    if args.worker:
        seeds = [int(v) for v in args.seed_list.split(",")] if args.seed_list else None
        public_worker(public, iters, Path(args.worker), seeds)
        return {}
    if args.seeds is not None and args.seeds < 1:
        sys.exit(f"emsa_public.py: --seeds must be >= 1, got {args.seeds}")
    missing = [f for f in PUBLIC_FILES if not (public / f).is_file()]
    if missing:
        sys.exit(f"emsa_public.py: the public code is not at {public} (missing "
                 f"{', '.join(missing)}): {FETCH_HINT}")
    if not Path(args.tf_python).is_file():
        sys.exit(f"emsa_public.py: no TF python at {args.tf_python}: {TF_HINT}")
    out = Path(args.out or ("runs/bench/emsa_public_quick.md" if args.quick
                            else ROOT / "benchmarks" / "results" / "emsa_public.md"))
    fig = Path(args.figure or ("runs/bench/emsa_public_quick.png" if args.quick
                               else ROOT / "docs" / "figures" / "emsa_public.png"))
    sys.path.insert(0, str(ROOT))
    import torch

    from ocnet._atomic import atomic_write

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_USE_LEGACY_KERAS="1",
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONHASHSEED="0")
    env.pop("PYTHONPATH", None)
    if args.seeds:
        return seed_sweep(args, public, iters, env, t0, load0)
    with tempfile.TemporaryDirectory() as tmp:
        jpath = Path(tmp) / "public.json"
        proc = subprocess.run([args.tf_python, str(Path(__file__).resolve()), "--public",
                               str(public), "--iterations", str(iters), "--_public-worker",
                               str(jpath)], env=env, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"emsa_public.py: the public side failed (rc {proc.returncode}):\n"
                     f"{proc.stderr[-4000:]}")
        pub = json.loads(jpath.read_text())
    t_pub = time.perf_counter() - t0
    oc = {
        "ocnet E-MSA (rho 1, reference, 10 inner evals)": ocnet_arm("emsa", iters),
        "ocnet E-MSA preset=paper (+ perturb_init 0.005)": ocnet_arm("emsa-paper", iters),
        "ocnet Adam (lr 0.005)": ocnet_arm("adam", iters),
        "ocnet E-MSA float64 (as the first)": ocnet_arm("emsa", iters, float64=True),
    }
    from ocnet.reproduce import _emsa_toy

    x_oc = _emsa_toy()[1][:, 0].tolist()
    t_all = time.perf_counter() - t0
    head = (f"## ocnet E-MSA vs the public E-MSA TF code on its toy ({iters} iterations"
            f"{', quick' if args.quick else ''})\n\npublic: LiQianxiao/MaxPrinciple-DeepLearning "
            f"from {public}, tensorflow {pub['versions']['tensorflow']} (compat.v1, legacy "
            f"Keras, shimmed tf.contrib.opt.ScipyOptimizerInterface), scipy "
            f"{pub['versions']['scipy']}, 1 thread; ocnet: torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread. Wall time: public side {t_pub:.0f} s, all "
            f"{t_all:.0f} s; 1-minute load average {load0:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end (on {os.cpu_count()} CPUs).")
    text, summary = report(pub, oc, iters, x_oc, head)
    print(text, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, text + "\n")
    record = {"iterations": iters, "quick": args.quick, "public_config": pub["config"],
              "x_train_public": pub["x_train"], "x_train_ocnet": x_oc,
              "versions": pub["versions"], "summary": summary,
              # curves: J per iteration (index 0 = the init); records: everything per arm
              "curves": {k: v["J"] for k, v in {**pub["arms"], **oc}.items()},
              "records": {**pub["arms"], **oc}}
    atomic_write(out.with_suffix(".json"), json.dumps(record, indent=1))
    figure({**pub["arms"], **oc}, fig)
    return record


if __name__ == "__main__":
    main()
