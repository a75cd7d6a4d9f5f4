"""An EfficientNet/MobileNetV3-style block stays int8 end to end: Swish and hard-swish fold into
the convs (recognized by what the activation module computes), and the squeeze-excite gate's
multiply is an int8 call site, so the depthwise output, the pooled squeeze and the gated tensor
all travel as uint8. Checked against quanta's integer reference and float."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quanta
from quanta.debug.sqnr import sqnr
from quanta.modules import backends
from quanta.zoo.vision import calibrate_batchnorm

# ISA-sensitive (oneDNN kernels against the reference); .ci/run repeats them with oneDNN capped at
# AVX2, not under emulation (too slow there)
pytestmark = [pytest.mark.isa, pytest.mark.slow]


class Swish(nn.Module):
    """efficientnet-pytorch's Swish: a class quanta does not know, fused by what it computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class HSwish(nn.Module):
    """pytorchcv's HSwish."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0, inplace=True) / 6.0


class MBConv(nn.Module):
    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        self.expand = nn.Conv2d(16, 64, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(64)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.se_reduce = nn.Conv2d(64, 8, 1)
        self.se_expand = nn.Conv2d(8, 64, 1)
        self.project = nn.Conv2d(64, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn0(self.expand(x)))
        h = self.act(self.bn1(self.dw(h)))
        s = torch.sigmoid(self.se_expand(self.act(self.se_reduce(F.adaptive_avg_pool2d(h, 1)))))
        return self.bn2(self.project(h * s)) + x


def _model(act: type[nn.Module]) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), MBConv(act), MBConv(act)).eval()
    calib = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    calibrate_batchnorm(model, calib)
    return model, calib


@pytest.mark.parametrize("act", [Swish, HSwish, nn.SiLU])
def test_block_runs_int8_through_the_gate(act: type[nn.Module]) -> None:
    model, calib = _model(act)
    q = quanta.quantize(model, calib, show_progress=False)
    layers = q._quanta.plan.layers
    kind = "hardswish" if act is HSwish else "silu"
    assert layers["1.expand"].activation == kind and layers["1.dw"].activation == kind
    assert layers["1.se_reduce"].activation == kind
    assert isinstance(q[1].act, nn.Identity)  # every call of the module is fused
    assert layers["1:mul#0"].precision == "int8" and layers["1:mul#0"].backend == "onednn"
    assert layers["1.dw"].output_int8  # read by the (int8) pool and the int8 gate
    assert layers["1.project"].input_from == "1:mul#0"
    reference = copy.deepcopy(q)
    backends.select_backends(reference, reference._quanta.plan, "reference")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want, exact = model(x), reference(x)
        q(x)
        fast = q(x)
    assert quanta.runtime_status(q).startswith("graph")
    assert sqnr(want, fast) >= 20.0 and sqnr(want, fast) >= sqnr(want, exact) - 0.5
    assert sqnr(exact, fast) >= 35.0


def test_gated_block_exports_to_onnx_like_the_reference(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, calib = _model(HSwish)
    q = quanta.quantize(model, calib, config=quanta.QuantConfig(backend="reference"), show_progress=False)
    x = torch.randn(4, 3, 32, 32)
    path = quanta.export_onnx(q, x[:1], tmp_path / "mbconv.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = q(x)
    # ORT computes hard-swish and the float gate with its own float kernels: rounding ties differ
    assert sqnr(ref, torch.from_numpy(got)) >= 30.0


class Fire(nn.Module):
    """SqueezeNet's fire module: two expand convs joined by a cat."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(channels, 8, 1)
        self.e1 = nn.Conv2d(8, 16, 1)
        self.e3 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.e1(s)), self.relu(self.e3(s))], 1)


def test_concatenated_producers_write_at_the_cat_qparams() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
                          Fire(16), Fire(32), nn.Conv2d(32, 10, 1)).eval()
    calib = [torch.randn(4, 3, 24, 24) for _ in range(3)]
    q = quanta.quantize(model, calib, show_progress=False)
    layers = q._quanta.plan.layers
    cat = layers["3:cat#0"]
    assert layers["3.e1"].output_from == layers["3.e3"].output_from == "3:cat#0"
    assert layers["3.e1"].output_qparams == layers["3.e3"].output_qparams == cat.output_qparams
    assert not layers["4.squeeze"].output_from  # read by two convs
    x = torch.randn(4, 3, 24, 24)
    reference = copy.deepcopy(q)
    backends.select_backends(reference, reference._quanta.plan, "reference")
    with torch.no_grad():
        want, exact = model(x), reference(x)
        q(x)
        fast = q(x)
    assert sqnr(want, fast) >= 25.0 and sqnr(exact, fast) >= 35.0
