"""Classification data sets that are generated or bundled locally (never downloaded).

Every set is returned by :func:`load` as a :class:`Dataset` of flat float features
``(N, D)`` and int64 labels ``(N,)``. Generated sets draw from
``numpy.random.default_rng(seed)``: the same seed gives identical data, another seed
another draw (and another train/test split).

Generated 2-D sets (REFERENCE.md §4, the neural-ODE / optimal-control literature):

``swissroll``
    Haber & Ruthotto 2017 (Meganet ``setupSwissRoll``): two spirals of 2n+1 points
    each (n = 256) at angles ``linspace(0, 4 pi)``, radius ``linspace(0, 1)`` for
    class 0 and ``linspace(0.2, 1.2)`` for class 1, no noise, features padded with
    zeros to 4 dimensions. The curves are fixed; the seed chooses the stratified
    train/test split (Meganet alternates points; the default 513/513 keeps its sizes).
``peaks``
    MATLAB ``peaks`` surface on ``[-3, 3]^2``, points uniform on the square, 5 classes
    by level sets of z whose thresholds are the 20/40/60/80 % area quantiles of z
    (fixed, computed on a fine grid); class 0 is the lowest. Classes are exactly
    balanced (uniform sampling conditioned on the class). 1000/1000.
``donut``
    Benning et al. 2019: class 0 a Gaussian blob at the origin (std 0.1), class 1 a
    ring of radius 0.5 with radial Gaussian noise 0.1. 1000/1000.
``spirals``
    Benning et al. 2019: two interleaved one-turn spirals, ``r = 0.1 + 0.9 t``,
    angle ``2 pi t`` (+ pi for class 1), ``t ~ U[0, 1]``, Gaussian noise 0.02. 1000/1000.
``squares``
    Benning et al. 2019: uniform on ``[-1, 1]^2``, label ``x1 * x2 > 0``, exactly
    balanced. 1000/1000.
``circles``, ``moons``
    ``sklearn.datasets.make_circles`` (noise 0.1, factor 0.5) and ``make_moons``
    (noise 0.1), exactly balanced. 1000/1000.

Bundled / locally generated benchmark sets (REFERENCE.md §7):

``digits``
    ``sklearn.datasets.load_digits``: 1797 8x8 images, 64 features, 10 classes,
    ``image_shape = (1, 8, 8)``. Stratified seeded split, 25 % test by default
    (or what ``n_train`` leaves).
``wine``
    ``sklearn.datasets.load_wine``: 178 samples, 13 features, 3 classes. Stratified
    seeded split, 25 % test by default (or what ``n_train`` leaves).
``mnist1d``
    MNIST-1D (Greydanus 2020) generated with ``mnist1d.data.make_dataset`` with its
    default arguments and ``seed`` as the generator seed (the published frozen set
    is seed 42): 4000/1000 by default, 40 features, 10 classes,
    ``image_shape = None`` (1-D signals, not images). Generation is cached in-process.

Standardisation (default) fits the mean and the population std on the training
features only and applies them to both splits; constant features are divided by 1.
"""

from __future__ import annotations

import difflib
import functools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from .ocp import errors as _errors
from .solvers.loop import minibatches

__all__ = ["DATASETS", "DataError", "Dataset", "batches", "check_finite", "load"]


DataError = _errors.DataError  # defined in ocnet.ocp.errors (Problem raises it on bad batches)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test classification split with flat float features and int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    image_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 2 or not x.is_floating_point():
                raise DataError(
                    f"{self.name}: x_{split} must be a float tensor of shape (N, D), "
                    f"got {x.dtype} {tuple(x.shape)}; flatten images and use image_shape"
                )
            if y.ndim != 1 or y.dtype != torch.int64 or y.shape[0] != x.shape[0]:
                raise DataError(
                    f"{self.name}: y_{split} must be int64 of shape ({x.shape[0]},), "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise DataError(
                f"{self.name}: x_train has {self.x_train.shape[1]} features but x_test "
                f"has {self.x_test.shape[1]}"
            )
        if self.image_shape is not None and math.prod(self.image_shape) != self.n_features:
            raise DataError(
                f"{self.name}: image_shape {self.image_shape} does not hold "
                f"{self.n_features} features"
            )

    @property
    def n_features(self) -> int:
        """Number of flat input features D."""
        return int(self.x_train.shape[1])

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Dataset:
        """A copy with float tensors cast to ``dtype`` and all tensors on ``device``."""
        if dtype is not None:
            _check_float_dtype(dtype)
        return replace(
            self,
            x_train=self.x_train.to(device=device, dtype=dtype),
            y_train=self.y_train.to(device=device),
            x_test=self.x_test.to(device=device, dtype=dtype),
            y_test=self.y_test.to(device=device),
        )

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, n_classes={self.n_classes}, "
            f"image_shape={self.image_shape}, dtype={self.x_train.dtype}, "
            f"device={self.x_train.device})"
        )


# --------------------------------------------------------------------------- checks


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise :class:`DataError` if ``x`` holds NaN or inf, naming ``what`` and the first bad row."""
    if not x.is_floating_point() and not x.is_complex():
        return
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    if x.ndim == 0:
        where = "the scalar"
    else:
        bad_rows = bad.reshape(x.shape[0], -1).any(dim=1)
        first = int(torch.nonzero(bad_rows)[0, 0])
        where = f"{int(bad_rows.sum())} of {x.shape[0]} rows (first bad row index {first})"
    raise DataError(
        f"{what} is not finite: {n_nan} NaN and {n_inf} inf values in {where}; "
        "remove or impute those rows before training"
    )


def _check_float_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DataError(f"dtype must be a floating torch dtype such as torch.float32, got {dtype}")


def _check_size(value: int | None, what: str, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{what} must be an int or None, got {value!r}")
    if value < minimum:
        raise DataError(f"{what} must be at least {minimum} (one sample per class), got {value}")


# --------------------------------------------------------------------------- batches


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches ``(x[idx], y[idx])`` covering every sample once per call.

    The permutation is drawn with ``torch.randperm(generator=generator)`` when this
    function is called (not lazily), so saving ``generator.get_state()`` before the
    call and restoring it reproduces the epoch exactly. (The iterator is
    :func:`ocnet.solvers.loop.minibatches`, which the training loop and DWR share.)
    """
    return minibatches(x, y, batch_size, generator=generator, shuffle=shuffle,
                       drop_last=drop_last)  # type: ignore[return-value]


# --------------------------------------------------------------------------- generators

# Each generator takes an rng and per-class counts and returns shuffled (X, y) numpy arrays.
_Generator = Callable[[np.random.Generator, list[int]], tuple[np.ndarray, np.ndarray]]


def _class_counts(n: int, k: int) -> list[int]:
    """Split ``n`` samples over ``k`` classes as evenly as possible."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _stack_shuffle(
    rng: np.random.Generator, parts: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate(parts, axis=0)
    y = np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(parts)])
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


def _rejection_balanced(
    rng: np.random.Generator,
    counts: list[int],
    label: Callable[[np.ndarray], np.ndarray],
    low: float,
    high: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform points on ``[low, high]^2`` conditioned to give exactly ``counts[k]`` per class."""
    parts: list[list[np.ndarray]] = [[] for _ in counts]
    need = list(counts)
    while any(need):
        pts = rng.uniform(low, high, size=(2 * sum(need) + 16, 2))
        lab = label(pts)
        for k in range(len(counts)):
            if need[k]:
                take = pts[lab == k][: need[k]]
                parts[k].append(take)
                need[k] -= len(take)
    return _stack_shuffle(rng, [np.concatenate(p, axis=0) for p in parts])


def _peaks_z(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """MATLAB ``peaks`` surface."""
    return (
        3 * (1 - x) ** 2 * np.exp(-(x**2) - (y + 1) ** 2)
        - 10 * (x / 5 - x**3 - y**5) * np.exp(-(x**2) - y**2)
        - np.exp(-((x + 1) ** 2) - y**2) / 3
    )


@functools.lru_cache(maxsize=1)
def _peaks_thresholds(n_classes: int = 5, grid: int = 1001) -> tuple[float, ...]:
    """Area quantiles of z on ``[-3, 3]^2`` splitting it into equally likely level sets."""
    g = np.linspace(-3.0, 3.0, grid)
    xx, yy = np.meshgrid(g, g)
    z = _peaks_z(xx, yy).ravel()
    return tuple(float(q) for q in np.quantile(z, np.arange(1, n_classes) / n_classes))


def _peaks_label(pts: np.ndarray) -> np.ndarray:
    z = _peaks_z(pts[:, 0], pts[:, 1])
    return np.searchsorted(np.asarray(_peaks_thresholds()), z).astype(np.int64)


def _gen_peaks(rng: np.random.Generator, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return _rejection_balanced(rng, counts, _peaks_label, -3.0, 3.0)


def _gen_squares(rng: np.random.Generator, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    def label(pts: np.ndarray) -> np.ndarray:
        return (pts[:, 0] * pts[:, 1] > 0).astype(np.int64)

    return _rejection_balanced(rng, counts, label, -1.0, 1.0)


def _gen_donut(rng: np.random.Generator, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    blob = rng.normal(0.0, 0.1, size=(counts[0], 2))
    phi = rng.uniform(0.0, 2 * np.pi, size=counts[1])
    r = 0.5 + rng.normal(0.0, 0.1, size=counts[1])
    ring = np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
    return _stack_shuffle(rng, [blob, ring])


_SPIRAL_NOISE = 0.02


def _gen_spirals(rng: np.random.Generator, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    for k, c in enumerate(counts):
        t = rng.uniform(0.0, 1.0, size=c)
        r = 0.1 + 0.9 * t
        phi = 2 * np.pi * t + k * np.pi
        pts = np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
        parts.append(pts + rng.normal(0.0, _SPIRAL_NOISE, size=pts.shape))
    return _stack_shuffle(rng, parts)


def _sklearn_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _gen_circles(rng: np.random.Generator, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_circles

    x, y = make_circles(
        n_samples=(counts[0], counts[1]), noise=0.1, factor=0.5, random_state=_sklearn_seed(rng)
    )
    return x, y.astype(np.int64)


def _gen_moons(rng: np.random.Generator, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=(counts[0], counts[1]), noise=0.1, random_state=_sklearn_seed(rng))
    return x, y.astype(np.int64)


# name -> (generator, n_classes, default n_train, default n_test)
_GENERATED: dict[str, tuple[_Generator, int, int, int]] = {
    "circles": (_gen_circles, 2, 1000, 1000),
    "donut": (_gen_donut, 2, 1000, 1000),
    "moons": (_gen_moons, 2, 1000, 1000),
    "peaks": (_gen_peaks, 5, 1000, 1000),
    "spirals": (_gen_spirals, 2, 1000, 1000),
    "squares": (_gen_squares, 2, 1000, 1000),
}

_SWISSROLL_N = 256  # Haber & Ruthotto: 2n+1 points per class
_SWISSROLL_FEATURES = 4


def _swissroll(
    rng: np.random.Generator, n_train: int, n_test: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    m = -(-(n_train + n_test) // 2)  # points per class on each curve
    theta = np.linspace(0.0, 4 * np.pi, m)
    train_counts = _class_counts(n_train, 2)
    test_counts = [m - c for c in train_counts]
    while sum(test_counts) > n_test:  # odd total: drop one leftover point
        test_counts[int(np.argmax(test_counts))] -= 1
    tr_parts, te_parts = [], []
    for k, (r0, r1) in enumerate([(0.0, 1.0), (0.2, 1.2)]):
        r = np.linspace(r0, r1, m)
        pts = np.zeros((m, _SWISSROLL_FEATURES))
        pts[:, 0], pts[:, 1] = r * np.cos(theta), r * np.sin(theta)
        perm = rng.permutation(m)
        tr_parts.append(pts[perm[: train_counts[k]]])
        te_parts.append(pts[perm[train_counts[k] : train_counts[k] + test_counts[k]]])
    x_tr, y_tr = _stack_shuffle(rng, tr_parts)
    x_te, y_te = _stack_shuffle(rng, te_parts)
    return x_tr, y_tr, x_te, y_te


# --------------------------------------------------------------------------- bundled sets


def _split_bundled(
    name: str, x: np.ndarray, y: np.ndarray, seed: int, n_train: int | None, n_test: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    n = len(y)
    n_classes = len(np.unique(y))
    for what, value in (("n_train", n_train), ("n_test", n_test)):
        if value is not None and value > n - n_classes:
            raise DataError(
                f"{name} has {n} samples, so {what}={value} is too many: the other split "
                f"needs at least one sample per class; use --{what.replace('_', '-')} at "
                f"most {n - n_classes} (n_train + n_test <= {n})"
            )
    if n_test is not None:
        n_te = n_test
    elif n_train is not None:  # 25 % test, or what is left after n_train
        n_te = min(math.ceil(0.25 * n), n - n_train)
    else:
        n_te = math.ceil(0.25 * n)
    n_tr = n_train if n_train is not None else n - n_te
    if n_tr + n_te > n:
        raise DataError(
            f"{name} has {n} samples but n_train={n_tr} + n_test={n_te} = {n_tr + n_te}; "
            "ask for fewer samples"
        )
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, train_size=n_tr, test_size=n_te, stratify=y, random_state=seed
        )
    except ValueError as exc:
        raise DataError(f"{name}: cannot make a stratified split of this size: {exc}") from exc
    return x_tr, y_tr, x_te, y_te


_MNIST1D_TRAIN, _MNIST1D_TEST = 4000, 1000


@functools.lru_cache(maxsize=8)
def _mnist1d_pool(seed: int, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """All ``num_samples`` MNIST-1D samples (shuffled) for ``seed``; global RNGs left untouched."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float64)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _mnist1d(
    seed: int, n_train: int | None, n_test: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n_tr = _MNIST1D_TRAIN if n_train is None else n_train
    n_te = _MNIST1D_TEST if n_test is None else n_test
    total = max(_MNIST1D_TRAIN + _MNIST1D_TEST, 10 * -(-(n_tr + n_te) // 10))
    x, y = _mnist1d_pool(int(seed), total)
    # The default sizes reproduce make_dataset's own 80/20 split exactly.
    return x[:n_tr], y[:n_tr], x[total - n_te :], y[total - n_te :]


# --------------------------------------------------------------------------- load

_N_CLASSES = {**{k: v[1] for k, v in _GENERATED.items()}, "swissroll": 2}
_N_CLASSES.update({"digits": 10, "wine": 3, "mnist1d": 10})
DATASETS: tuple[str, ...] = tuple(sorted(_N_CLASSES))


def _unknown(name: object) -> DataError:
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name.lower(), DATASETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    return DataError(f"unknown dataset {name!r}{hint}; valid names are: {', '.join(DATASETS)}")


def _standardize(x_tr: np.ndarray, x_te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return (x_tr - mean) / std, (x_te - mean) / std


def load(
    name: str,
    *,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    standardize: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load data set ``name`` (one of :data:`DATASETS`) as a seeded train/test :class:`Dataset`.

    ``n_train``/``n_test`` override the default sizes (totals over all classes);
    ``standardize`` fits mean/std on the training split only.
    """
    if name not in _N_CLASSES:
        raise _unknown(name)
    _check_float_dtype(dtype)
    n_classes = _N_CLASSES[name]
    _check_size(n_train, "n_train", n_classes)
    _check_size(n_test, "n_test", n_classes)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative int, got {seed!r}")
    seed = int(seed)
    image_shape: tuple[int, ...] | None = None

    if name in _GENERATED:
        gen, _, d_train, d_test = _GENERATED[name]
        rng = np.random.default_rng(seed)
        x_tr, y_tr = gen(rng, _class_counts(d_train if n_train is None else n_train, n_classes))
        x_te, y_te = gen(rng, _class_counts(d_test if n_test is None else n_test, n_classes))
    elif name == "swissroll":
        d = 2 * _SWISSROLL_N + 1
        rng = np.random.default_rng(seed)
        x_tr, y_tr, x_te, y_te = _swissroll(
            rng, d if n_train is None else n_train, d if n_test is None else n_test
        )
    elif name in ("digits", "wine"):
        from sklearn.datasets import load_digits, load_wine

        x, y = (load_digits if name == "digits" else load_wine)(return_X_y=True)
        x_tr, y_tr, x_te, y_te = _split_bundled(name, x, y, seed, n_train, n_test)
        image_shape = (1, 8, 8) if name == "digits" else None
    else:  # mnist1d
        x_tr, y_tr, x_te, y_te = _mnist1d(seed, n_train, n_test)
        image_shape = None

    x_tr = np.asarray(x_tr, dtype=np.float64)
    x_te = np.asarray(x_te, dtype=np.float64)
    check_finite(torch.from_numpy(x_tr.copy()), f"{name} x_train (raw)")
    check_finite(torch.from_numpy(x_te.copy()), f"{name} x_test (raw)")
    if standardize:
        x_tr, x_te = _standardize(x_tr, x_te)

    ds = Dataset(
        name=name,
        x_train=torch.tensor(x_tr, dtype=dtype),
        y_train=torch.tensor(np.asarray(y_tr), dtype=torch.int64),
        x_test=torch.tensor(x_te, dtype=dtype),
        y_test=torch.tensor(np.asarray(y_te), dtype=torch.int64),
        n_classes=n_classes,
        image_shape=image_shape,
    )
    check_finite(ds.x_train, f"{name} x_train")
    check_finite(ds.x_test, f"{name} x_test")
    return ds
