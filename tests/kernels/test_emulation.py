""".ci/run's emulated step sets QUANTA_EXPECT_AVX2=1: this fails there unless the process running
the tests really sees an AVX2 CPU without VNNI (a pytest-xdist worker started outside QEMU would
run every "emulated" test natively and prove nothing)."""

import os

import pytest
import torch

from quanta.kernels import cpu

pytestmark = pytest.mark.isa


@pytest.mark.skipif(os.environ.get("QUANTA_EXPECT_AVX2") != "1", reason="only in .ci/run's emulated step")
def test_this_process_runs_as_on_an_avx2_cpu_without_vnni() -> None:
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert not torch.cpu._is_vnni_supported()
    assert cpu.exact_weight_limit() == cpu.NARROW_LIMIT
