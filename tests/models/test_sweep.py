"""The model sweep on small inputs: 32 architectures across families (pytorchcv, and
efficientnet-pytorch's same-padded Conv2d subclasses), random weights with BatchNorm statistics
from the calibration images. Per model: int8 coverage (>= 95 % of conv/linear MACs on every CNN),
the fast kernels against quanta's integer reference, and the logits' SQNR against float no worse
than the reference's (speed: benchmarks/bench_sweep.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import quanta
from quanta.debug.sqnr import sqnr
from quanta.modules import backends
from quanta.zoo import architectures as arches
from quanta.zoo.vision import calibrate_batchnorm

# .ci/run repeats it with oneDNN capped at AVX2 (isa; too slow for emulation)
pytestmark = [pytest.mark.skipif(not arches.available(), reason="pytorchcv / efficientnet-pytorch missing"),
              pytest.mark.isa, pytest.mark.slow]


@pytest.mark.parametrize("arch", arches.SWEEP, ids=[a.name for a in arches.SWEEP])
def test_architecture_runs_int8_with_coverage_and_fidelity(arch: arches.Architecture) -> None:
    model = arches.build(arch, small=True)
    calib = [arches.images(arch, 4, small=True, seed=s) for s in range(2)]
    calibrate_batchnorm(model, calib)
    q = quanta.quantize(model, calib, show_progress=False)
    cov = quanta.report(q).coverage
    if arch.cnn:
        assert cov.share >= 0.95, cov.headline()
    reference = copy.deepcopy(q)
    backends.select_backends(reference, reference._quanta.plan, "reference")
    x = arches.images(arch, 2, small=True, seed=9)
    with torch.no_grad():
        want, exact = model(x), reference(x)
        q(x)  # builds the graph runtime
        fast = q(x)
    assert fast.shape == want.shape
    # the fast kernels are as accurate as the integer spec they implement. (They differ from it
    # only at rounding ties, ~5e-6 of elements, but random-weight nets 50 layers deep amplify
    # any perturbation: fast vs reference measured 14-60 dB, as far apart as each is from float.)
    assert sqnr(want, fast) >= sqnr(want, exact) - 1.0, (sqnr(want, fast), sqnr(want, exact))
