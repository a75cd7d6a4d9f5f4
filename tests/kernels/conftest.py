"""Shared fixtures for the kernel tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def two_threads():
    """The native passes split their work across OpenMP threads: every kernel test runs on at least
    two, whatever the session's setting (one per pytest-xdist worker), so the splits are checked."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(2, previous))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["native", "torch.ops"])
def kernel_path(request, monkeypatch):
    """Runs a test once on each way PackedLinear / PackedConv reach oneDNN: quanta's native kept
    primitives (kernels/native) and the ``torch.ops.onednn`` fallback."""
    from quanta.kernels.native import ops as native_ops

    if request.param == "native":
        if not native_ops.available():
            from quanta.kernels import native

            pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    else:
        monkeypatch.setattr(native_ops, "available", lambda: False)
    return request.param


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under emulation (.ci/run sets QUANTA_EMULATED_SAMPLE=N for scripts/as-avx2), a kernel test
    parametrized into more than 20 cases keeps every N-th case: the full sweeps already run natively
    and with oneDNN capped at AVX2 (the same JIT code), and QEMU is 10-200x slower."""
    import os

    every = int(os.environ.get("QUANTA_EMULATED_SAMPLE", "0") or 0)
    if every <= 1:
        return
    groups: dict[str, list[pytest.Item]] = {}
    for item in items:
        if "tests/kernels/" in item.nodeid:
            groups.setdefault(item.nodeid.split("[")[0], []).append(item)
    dropped = {id(item) for group in groups.values() if len(group) > 20
               for i, item in enumerate(group) if i % every}
    if dropped:
        config.hook.pytest_deselected(items=[item for item in items if id(item) in dropped])
        items[:] = [item for item in items if id(item) not in dropped]
