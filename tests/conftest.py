"""Shared fixtures: the devices to parametrise over, and seeding.

``DEVICES`` always holds ``"cpu"``; ``"cuda"`` is in it too, skipped when CUDA is absent,
so a test parametrised over it reports the skip instead of silently not running.
Use ``device`` (a fixture parametrised over ``DEVICES``) or
``@pytest.mark.parametrize("device", DEVICES)``.

Every test runs seeded (``_seed_everything`` is autouse). Tests that measure numerical
errors may record them with the ``record_error`` fixture; set ``OCNET_REPORT_ERRORS=1``
to print the table of the largest recorded error per case at the end of the run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA is not available")),
]
#: the devices present on this machine (plain strings)
AVAILABLE_DEVICES = ["cpu"] + (["cuda"] if CUDA else [])

SEED = 0
_ERRORS: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed torch, numpy and random before every test."""
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)


@pytest.fixture
def seed() -> int:
    """The seed every test starts from (torch is already seeded with it)."""
    torch.manual_seed(SEED)
    return SEED


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU torch.Generator seeded with ``SEED``."""
    return torch.Generator().manual_seed(SEED)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each device of ``DEVICES`` in turn (cuda skipped when absent)."""
    return request.param


@pytest.fixture
def devices() -> list[str]:
    """The devices available on this machine."""
    return list(AVAILABLE_DEVICES)


@pytest.fixture
def record_error() -> Callable[[str, float], None]:
    """``record_error(case, value)`` keeps the largest value per case for the summary."""

    def record(case: str, value: float) -> None:
        _ERRORS[case] = max(float(value), _ERRORS.get(case, 0.0))

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if not _ERRORS or not os.environ.get("OCNET_REPORT_ERRORS"):
        return
    tr = terminalreporter
    tr.write_sep("-", "largest measured errors per case")
    tr.write_line("| case | max error |")
    tr.write_line("| --- | --- |")
    for case, value in sorted(_ERRORS.items()):
        tr.write_line(f"| {case} | {value:.2e} |")


@pytest.fixture
def temp_names():  # noqa: ANN201
    """Solver names a test registers, unregistered afterwards (append to the list)."""
    from ocnet.solvers import solver_names, unregister

    names: list[str] = []
    yield names
    for name in names:
        if name in solver_names():
            unregister(name)
