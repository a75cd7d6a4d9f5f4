"""Weight op call sites: a conv/linear call on a model parameter is quantized wherever it is made
(a Conv2d subclass with its own forward, a functional call, a weight shared by two calls), and
matches quanta's integer reference like a quantized module does."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import quanta
from quanta.debug.sqnr import sqnr
from quanta.modules import backends

# ISA-sensitive (oneDNN kernels against the reference); .ci/run repeats them with oneDNN capped at
# AVX2, not under emulation (too slow there)
pytestmark = [pytest.mark.isa, pytest.mark.slow]


class SamePadConv(nn.Conv2d):
    """efficientnet-pytorch's Conv2dStaticSamePadding: the 'same' padding computed for an image
    size up front, applied in forward, then the functional conv."""

    def __init__(self, *args, image_size: int = 20, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-image_size // self.stride[0]) - 1) * self.stride[0] + kh - image_size, 0)
        pw = max((-(-image_size // self.stride[1]) - 1) * self.stride[1] + kw - image_size, 0)
        self.pads = [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class DynamicSamePadConv(nn.Conv2d):
    """timm's Conv2dSame / efficientnet-pytorch's Conv2dDynamicSamePadding: padding from the
    input's shape in every call (Python arithmetic on sizes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Functional(nn.Module):
    """A subclass stem with BatchNorm, a functional conv and depthwise conv on parameters, one
    weight read by two calls, a functional linear and a matmul on a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = SamePadConv(3, 16, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.w = nn.Parameter(torch.randn(16, 16, 3, 3) * 0.08)
        self.b = nn.Parameter(torch.randn(16) * 0.1)
        self.dw = nn.Parameter(torch.randn(16, 1, 3, 3) * 0.3)
        self.proj = nn.Parameter(torch.randn(16, 24) * 0.2)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(F.conv2d(x, self.w, self.b, padding=1))
        x = F.relu(F.conv2d(x, self.w, self.b, padding=1)) + x  # the same weight, a second call
        x = F.relu6(F.conv2d(x, self.dw, None, padding=1, groups=16))
        x = x.mean((2, 3)) @ self.proj
        return F.linear(F.relu(x), self.head.weight, self.head.bias)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = Functional().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 20, 20, generator=g) for _ in range(4)]


def _reference_twin(qmodel: nn.Module) -> nn.Module:
    twin = copy.deepcopy(qmodel)
    backends.select_backends(twin, twin._quanta.plan, "reference")
    return twin


def test_every_weight_op_call_runs_int8_and_matches_the_reference() -> None:
    model = _model()
    q = quanta.quantize(model, _calib(), show_progress=False)
    plan = q._quanta.plan
    sites = {lp.name: lp for lp in plan.op_sites()}
    assert set(sites) == {"stem:conv2d#0", "model:conv2d#0", "model:conv2d#1", "model:conv2d#2",
                          "model:matmul#0", "model:linear#0"}
    assert sites["stem:conv2d#0"].fused == ["bn", "model:relu#0"]  # BatchNorm and ReLU folded in
    assert plan.layers["bn"].precision == "folded" and plan.opened == ["stem"]
    assert sites["model:conv2d#2"].activation == "relu6" and sites["model:conv2d#2"].call["groups"] == 16
    assert sites["model:conv2d#1"].input_from == "model:conv2d#0"  # int8 flows between call sites
    x = torch.randn(6, 3, 20, 20)
    ref = _reference_twin(q)
    with torch.no_grad():
        fast, exact, want = q(x), ref(x), model(x)
        fast = q(x)  # the graph runtime, built on the first call
    assert quanta.runtime_status(q).startswith("graph")
    quantum = float(q._quanta.sites_by_key["model:linear#0"].output_scale)
    assert float((fast - exact).abs().max()) <= 0.05 * float(exact.abs().max())
    assert sqnr(want, fast) >= 25.0 and abs(sqnr(want, fast) - sqnr(want, exact)) <= 1.0
    assert quantum > 0
    cov = quanta.report(q).coverage
    assert cov.share > 0.99, cov.headline()


def test_parameters_read_only_by_call_sites_are_stored_once_as_int8(tmp_path: Path) -> None:
    model = _model()
    q = quanta.quantize(model, _calib(), show_progress=False)
    state = q.state_dict()
    assert not any(t.is_floating_point() and t.dim() >= 2 for t in state.values())  # no float weight
    int8 = [k for k, t in state.items() if t.dtype == torch.int8]
    # w is read by two call sites and stored once; the stem's weight lives with its call site
    assert sorted(int8) == sorted(f"_quanta.op_sites.{k}.weight" for k in
                                  ("stem:conv2d#0", "model:conv2d#0", "model:conv2d#2", "model:matmul#0",
                                   "model:linear#0"))
    a, b = (q._quanta.sites_by_key[k] for k in ("model:conv2d#0", "model:conv2d#1"))
    assert a.weight is b.weight and a.weight_scale is b.weight_scale
    assert q.w.dtype == torch.int8 and q.w.shape == (16, 16, 3, 3)  # the parameter's name, its shape
    x = torch.randn(4, 3, 20, 20)
    path = quanta.save(q, tmp_path / "sites.quanta.safetensors")
    loaded = quanta.load(path, _model())
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    c, d = (loaded._quanta.sites_by_key[k] for k in ("model:conv2d#0", "model:conv2d#1"))
    assert c.weight is d.weight


def test_coverage_equals_an_independent_count_of_float_macs() -> None:
    """The report's coverage against torch's own FLOP counter: every conv/linear/matmul the
    quantized model still runs in float (aten level), over the float model's total."""
    model = _model()
    x = _calib()[0]
    cases = {"all": [], "skip stem": ["stem"], "skip a module": ["head"], "skip convs": ["conv2d"]}
    for skip in cases.values():
        q = quanta.quantize(model, [x], skip=skip, show_progress=False,
                            config=quanta.QuantConfig(runtime="eager"))
        with torch.no_grad(), FlopCounterMode(display=False) as total:
            model(x)
        with torch.no_grad(), FlopCounterMode(display=False) as left:
            q(x)
        independent = 1 - left.get_total_flops() / total.get_total_flops()
        cov = quanta.report(q).coverage
        assert cov.total_macs * 2 == total.get_total_flops()
        assert cov.share == pytest.approx(independent, abs=1e-9), (skip, cov.headline())
    skipped = quanta.quantize(model, [x], skip=["stem"], show_progress=False)
    assert quanta.report(skipped).coverage.share < 0.99


def test_low_coverage_warns_with_the_largest_float_layers() -> None:
    model = _model()
    with pytest.warns(quanta.QuantaWarning, match=r"only \d+\.\d % .*model:conv2d#0"):
        quanta.quantize(model, _calib(), skip=["conv2d"], show_progress=False)


def test_call_sites_in_onnx_match_the_reference_in_onnxruntime(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _model()
    q = quanta.quantize(model, _calib(), config=quanta.QuantConfig(backend="reference"), show_progress=False)
    x = torch.randn(6, 3, 20, 20)
    path = quanta.export_onnx(q, x[:1], tmp_path / "sites.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = q(x).numpy()
    assert float((got == ref).mean()) >= 0.99, float(abs(got - ref).max())


def test_qat_trains_call_site_weights_and_converts_exactly() -> None:
    model = _model()
    x = _calib()[0]
    qat = quanta.prepare_qat(model, x)
    before = qat.stem.weight.detach().clone()
    opt = torch.optim.SGD(qat.parameters(), lr=1e-2)
    for batch in _calib():
        loss = qat(batch).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(before, qat.stem.weight.detach())  # the site's weight is the parameter
    qat.eval()
    q = quanta.convert(qat)
    with torch.no_grad():
        simulated, real = qat(x), q(x)
    assert sqnr(simulated, real) >= 40.0


def test_shape_dependent_padding_is_quantized_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(DynamicSamePadConv(3, 8, 3, stride=2), nn.ReLU(),
                          DynamicSamePadConv(8, 8, 3)).eval()
    calib = _calib()
    q = quanta.quantize(model, calib, show_progress=False)
    assert [lp.name for lp in q._quanta.plan.op_sites()] == ["0:conv2d#0", "2:conv2d#0"]
    assert quanta.report(q).coverage.share == 1.0
    for size in (20, 17):  # other input sizes pad differently
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            fast, exact, want = q(x), _reference_twin(q)(x), model(x)
        assert fast.shape == want.shape and sqnr(want, fast) >= 30.0
        assert float((fast - exact).abs().max()) <= 0.02 * float(exact.abs().max())
