"""Settings for the whole test session."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (the README's ``-n 2``) two workers share the machine's cores: each runs
    torch on one thread, so two OpenMP pools never oversubscribe the CPU (on 2 cores the suite
    took 9 minutes this way, 20 in one process at 2 threads). The kernel tests still run their
    threaded passes on two threads (tests/kernels/conftest.py)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
