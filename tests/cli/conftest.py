"""Fixtures shared by the command-line tests."""

from __future__ import annotations

import pytest

from tests.helpers.processes import FROZEN, fit_quickstart


@pytest.fixture(scope="session")
def one_process(tmp_path_factory) -> dict[str, float]:
    """The figures the quickstart logs on one process with frozen weights: what every
    multi-process launcher must reproduce (test_multiprocess.py, test_launchers.py)."""
    return fit_quickstart(tmp_path_factory.mktemp("one"), *FROZEN)
