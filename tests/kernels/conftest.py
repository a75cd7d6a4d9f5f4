"""Shared fixtures for the kernel tests."""

from __future__ import annotations

import pytest


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
