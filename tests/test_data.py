"""Tests of ocnet.data: shapes, seeding, standardisation, errors and mini-batching."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ocnet import data
from ocnet.data import DATASETS, DataError, Dataset, batches, check_finite, load

GENERATED_2D = ("circles", "donut", "moons", "peaks", "spirals", "squares")

# name -> (n_train, n_test, n_features, n_classes, image_shape) at the default sizes
EXPECTED = {
    "circles": (1000, 1000, 2, 2, None),
    "donut": (1000, 1000, 2, 2, None),
    "moons": (1000, 1000, 2, 2, None),
    "peaks": (1000, 1000, 2, 5, None),
    "spirals": (1000, 1000, 2, 2, None),
    "squares": (1000, 1000, 2, 2, None),
    "swissroll": (513, 513, 4, 2, None),
    "digits": (1347, 450, 64, 10, (1, 8, 8)),
    "wine": (133, 45, 13, 3, None),
    "mnist1d": (4000, 1000, 40, 10, None),
}


def test_dataset_names_are_sorted_and_complete():
    assert DATASETS == tuple(sorted(EXPECTED))


@pytest.mark.parametrize("name", DATASETS)
def test_default_shapes_dtypes_and_classes(name):
    ds = load(name, seed=0)
    n_train, n_test, n_features, n_classes, image_shape = EXPECTED[name]
    assert isinstance(ds, Dataset) and ds.name == name
    assert ds.x_train.shape == (n_train, n_features)
    assert ds.x_test.shape == (n_test, n_features)
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert ds.n_features == n_features and ds.n_classes == n_classes
    assert ds.image_shape == image_shape
    for y in (ds.y_train, ds.y_test):
        assert set(y.tolist()) == set(range(n_classes))
    assert torch.isfinite(ds.x_train).all() and torch.isfinite(ds.x_test).all()
    if image_shape is not None:
        assert ds.x_train.reshape(-1, *image_shape).shape == (n_train, *image_shape)


@pytest.mark.parametrize("name", (*GENERATED_2D, "swissroll"))
def test_generated_sets_are_balanced(name):
    ds = load(name, seed=3)
    for y in (ds.y_train, ds.y_test):
        counts = torch.bincount(y, minlength=ds.n_classes)
        assert int(counts.max() - counts.min()) <= 1


@pytest.mark.parametrize("name", ("digits", "wine"))
def test_bundled_split_is_stratified(name):
    ds = load(name, seed=1)
    y_all = torch.cat([ds.y_train, ds.y_test])
    p_all = torch.bincount(y_all).double() / len(y_all)
    for y in (ds.y_train, ds.y_test):
        p = torch.bincount(y, minlength=ds.n_classes).double() / len(y)
        assert torch.allclose(p, p_all, atol=0.03)


@pytest.mark.parametrize("name", DATASETS)
def test_same_seed_same_data_other_seed_other_data(name):
    sizes = {} if name in ("digits", "wine") else {"n_train": 200, "n_test": 100}
    a = load(name, seed=7, **sizes)
    b = load(name, seed=7, **sizes)
    c = load(name, seed=8, **sizes)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_test, c.x_test)


@pytest.mark.parametrize("name", DATASETS)
def test_custom_sizes(name):
    ds = load(name, seed=0, n_train=60, n_test=30)
    assert ds.x_train.shape[0] == ds.y_train.shape[0] == 60
    assert ds.x_test.shape[0] == ds.y_test.shape[0] == 30


def test_bundled_n_train_alone_leaves_the_rest_for_test():
    ds = load("digits", seed=0, n_train=1500)
    assert ds.x_train.shape[0] == 1500 and ds.x_test.shape[0] == 1797 - 1500
    with pytest.raises(DataError, match="the other split needs at least one sample per class"):
        load("digits", seed=0, n_train=1790)  # 7 test samples < 10 classes


def test_train_and_test_do_not_overlap():
    for name in ("swissroll", "digits", "wine", "mnist1d"):
        ds = load(name, seed=2, standardize=False)
        train = {tuple(r) for r in ds.x_train.double().tolist()}
        test = [tuple(r) for r in ds.x_test.double().tolist()]
        # digits has genuinely duplicated images; everything else must be disjoint
        overlap = sum(r in train for r in test)
        assert overlap <= (2 if name == "digits" else 0), name


@pytest.mark.parametrize("name", DATASETS)
def test_standardisation_uses_train_statistics(name):
    ds = load(name, seed=0, dtype=torch.float64)
    x = ds.x_train
    std = x.std(dim=0, unbiased=False)
    varying = std > 1e-9
    assert varying.any()
    assert torch.allclose(x.mean(dim=0), torch.zeros(ds.n_features, dtype=x.dtype), atol=1e-9)
    assert torch.allclose(std[varying], torch.ones_like(std[varying]), atol=1e-9)
    assert torch.isfinite(ds.x_test).all()


def test_digits_constant_pixels_give_no_nan():
    raw = load("digits", seed=0, standardize=False)
    ds = load("digits", seed=0)
    constant = raw.x_train.std(dim=0) == 0
    assert constant.any()  # e.g. the always-zero corner pixels
    assert not torch.isnan(ds.x_train).any() and not torch.isnan(ds.x_test).any()
    # divided by 1, so constant features are just centred
    mean = raw.x_train[:, constant].mean(dim=0)
    assert torch.allclose(ds.x_test[:, constant], raw.x_test[:, constant] - mean)


def test_natural_scale_without_standardisation():
    sq = load("squares", seed=0, standardize=False)
    assert sq.x_train.abs().max() <= 1.0
    assert torch.equal(sq.y_train, (sq.x_train[:, 0] * sq.x_train[:, 1] > 0).long())

    pk = load("peaks", seed=0, standardize=False, dtype=torch.float64)
    assert pk.x_train.abs().max() <= 3.0
    xx, yy = pk.x_train[:, 0], pk.x_train[:, 1]
    z = (
        3 * (1 - xx) ** 2 * torch.exp(-(xx**2) - (yy + 1) ** 2)
        - 10 * (xx / 5 - xx**3 - yy**5) * torch.exp(-(xx**2) - yy**2)
        - torch.exp(-((xx + 1) ** 2) - yy**2) / 3
    )
    for k in range(pk.n_classes - 1):  # level sets: class k lies below class k+1
        assert z[pk.y_train == k].max() < z[pk.y_train == k + 1].min()

    dn = load("donut", seed=0, standardize=False, dtype=torch.float64)
    r = dn.x_train.norm(dim=1)
    assert r[dn.y_train == 0].mean() < 0.2
    assert abs(float(r[dn.y_train == 1].mean()) - 0.5) < 0.03

    sp = load("spirals", seed=0, standardize=False)
    r = sp.x_train.norm(dim=1)
    assert r.min() > 0.0 and r.max() < 1.15

    sr = load("swissroll", seed=0, standardize=False, dtype=torch.float64)
    assert torch.equal(sr.x_train[:, 2:], torch.zeros(len(sr.x_train), 2, dtype=torch.float64))
    r = sr.x_train[:, :2].norm(dim=1)
    assert r[sr.y_train == 0].max() <= 1.0 + 1e-12
    assert r[sr.y_train == 1].min() >= 0.2 - 1e-12


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError) as info:
        load("cifar10")
    msg = str(info.value)
    assert "cifar10" in msg
    for name in DATASETS:
        assert name in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_train": 0},
        {"n_test": 1},  # fewer than one sample per class
        {"n_train": 170, "n_test": 20},  # wine has only 178 samples
        {"dtype": torch.int64},
        {"seed": -1},
    ],
)
def test_invalid_arguments_raise_data_error(kwargs):
    with pytest.raises(DataError):
        load("wine", **kwargs)


def test_dtype_argument_and_to():
    ds = load("wine", seed=0, dtype=torch.float64)
    assert ds.x_train.dtype == torch.float64

    ds32 = load("moons", seed=0)
    ds64 = ds32.to(dtype=torch.float64)
    assert ds64.x_train.dtype == ds64.x_test.dtype == torch.float64
    assert ds64.y_train.dtype == ds64.y_test.dtype == torch.int64
    assert torch.equal(ds64.x_train.float(), ds32.x_train)
    assert ds32.x_train.dtype == torch.float32  # original untouched
    assert ds64.name == ds32.name and ds64.image_shape == ds32.image_shape
    moved = ds32.to(device="cpu")
    assert moved.x_train.device.type == "cpu" and moved.x_train.dtype == torch.float32
    with pytest.raises(DataError):
        ds32.to(dtype=torch.int32)


def test_dataset_validates_shapes():
    x = torch.zeros(4, 2)
    y4, y3 = torch.zeros(4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(DataError):
        Dataset("bad", x, y3, x, y4, 2, None)  # label count differs
    with pytest.raises(DataError):
        Dataset("bad", x, torch.zeros(4), x, y4, 2, None)  # float labels
    with pytest.raises(DataError):
        Dataset("bad", x, y4, x, y4, 2, (1, 3))  # image_shape holds 3 != 2 features
    with pytest.raises(DataError):
        Dataset("bad", x.long(), y4, x, y4, 2, None)  # integer features


def test_check_finite_reports_nan_and_inf():
    x = torch.zeros(6, 3)
    check_finite(x, "clean")  # no error
    check_finite(torch.arange(5), "ints")  # integers are always finite
    x[2, 1] = float("nan")
    x[4, 0] = float("inf")
    x[4, 2] = float("-inf")
    with pytest.raises(DataError) as info:
        check_finite(x, "my features")
    msg = str(info.value)
    assert "my features" in msg
    assert "1 NaN" in msg and "2 inf" in msg
    assert "first bad row index 2" in msg
    assert "remove or impute those rows before training" in msg


def test_check_finite_only_inf():
    x = torch.ones(3, 2, dtype=torch.float64)
    x[1, 1] = float("inf")
    with pytest.raises(DataError, match=r"0 NaN and 1 inf.*first bad row index 1"):
        check_finite(x, "x")


def _epoch(x, y, batch_size, generator, **kw):
    xs, ys = zip(*batches(x, y, batch_size, generator=generator, **kw), strict=True)
    return torch.cat(xs), torch.cat(ys), [len(b) for b in ys]


def test_batches_cover_every_sample_once():
    n = 103
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    y = torch.arange(n)
    g = torch.Generator().manual_seed(0)
    xs, ys, sizes = _epoch(x, y, 10, g)
    assert sizes == [10] * 10 + [3]
    assert sorted(ys.tolist()) == list(range(n))
    assert torch.equal(xs[:, 0].long(), ys)  # x and y stay aligned
    assert not torch.equal(ys, y)  # actually shuffled

    _, ys, sizes = _epoch(x, y, 10, g, drop_last=True)
    assert sizes == [10] * 10 and len(set(ys.tolist())) == 100

    _, ys, _ = _epoch(x, y, 10, None, shuffle=False)
    assert torch.equal(ys, y)


def test_batches_reproduce_from_generator_state():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    y = torch.arange(50)
    g = torch.Generator().manual_seed(123)
    _, first, _ = _epoch(x, y, 8, g)
    state = g.get_state()
    _, second, _ = _epoch(x, y, 8, g)
    assert not torch.equal(first, second)  # epochs differ

    g.set_state(state)
    _, again, _ = _epoch(x, y, 8, g)
    assert torch.equal(again, second)

    fresh = torch.Generator().manual_seed(123)
    _, first_again, _ = _epoch(x, y, 8, fresh)
    assert torch.equal(first_again, first)


def test_batches_draws_permutation_at_call_time():
    x, y = torch.zeros(20, 1), torch.arange(20)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    it = batches(x, y, 4, generator=g)
    assert not torch.equal(g.get_state(), state)  # consumed eagerly, before iteration
    g.set_state(state)
    expected = torch.randperm(20, generator=g)
    assert torch.equal(torch.cat([b for _, b in it]), expected)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_batches_rejects_bad_batch_size(batch_size):
    with pytest.raises(DataError):
        batches(torch.zeros(4, 1), torch.zeros(4), batch_size)


def test_batches_rejects_mismatched_lengths():
    with pytest.raises(DataError, match="4 samples but y has 3"):
        batches(torch.zeros(4, 1), torch.zeros(3), 2)


def test_mnist1d_leaves_global_rngs_alone_and_is_cached():
    data._mnist1d_pool.cache_clear()
    np.random.seed(11)
    random.seed(11)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(11)
    random.seed(11)
    a = load("mnist1d", seed=4, n_train=50, n_test=20)
    assert np.random.rand() == expected_np and random.random() == expected_py
    b = load("mnist1d", seed=4, n_train=50, n_test=20)
    assert data._mnist1d_pool.cache_info().hits >= 1
    assert torch.equal(a.x_train, b.x_train)
    # a subset of the default split: the same first training samples
    full = load("mnist1d", seed=4, standardize=False)
    small = load("mnist1d", seed=4, n_train=50, n_test=20, standardize=False)
    assert torch.equal(small.x_train, full.x_train[:50])
    assert torch.equal(small.x_test, full.x_test[-20:])
