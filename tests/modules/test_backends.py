"""Fast path (oneDNN / float per op) vs the integer reference on whole models, and the backend
choice: recorded in the plan and report, overridable in the config, safe on CPUs without VNNI."""

import copy

import pytest
import torch
import torch.nn as nn

import quanta
from quanta.config import Override, QuantConfig
from quanta.debug.report import report
from quanta.debug.sqnr import sqnr
from quanta.kernels import cpu
from quanta.modules import backends
from quanta.modules.quantized import QuantizedModule
from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn
from quanta.zoo.vision import BasicBlock

pytestmark = pytest.mark.skipif(not cpu.onednn_available(), reason="oneDNN int8 kernels unavailable")
# The two model-level comparisons depend on the CPU's int8 kernels (marked isa: .ci/run also runs
# them under scripts/as-avx2); the others test plan decisions and caches, the same on every CPU.


def _reference_twin(qmodel: nn.Module) -> nn.Module:
    twin = copy.deepcopy(qmodel)
    backends.select_backends(twin, twin._quanta.plan, "reference")
    return twin


def _last_output_scale(qmodel: nn.Module) -> float:
    last = [m for m in qmodel.modules() if isinstance(m, QuantizedModule)][-1]
    return float(last.output_scale)


def _within_one_quantum(fast: torch.Tensor, ref: torch.Tensor, quantum: float) -> float:
    """Fraction of elements that differ by at most one output quantum."""
    return float(((fast - ref).abs() <= quantum * 1.001).float().mean())


def _resnet_like() -> nn.Module:
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        BasicBlock(16, 16), BasicBlock(16, 32, stride=2, downsample=down),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as in a trained model
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


@pytest.mark.isa
def test_mnist_cnn_fast_matches_reference():
    train, _ = load_mnist("train")
    x = load_mnist("test")[0][:50]  # 50 images: also runs under emulation (scripts/as-avx2)
    model = load_pretrained_mnist_cnn()
    qmodel = quanta.quantize(model, [train[i * 25:(i + 1) * 25] for i in range(2)], show_progress=False)
    ref_model = _reference_twin(qmodel)
    with torch.no_grad():
        fast, ref = qmodel(x), ref_model(x)
        single_fast = torch.cat([qmodel(x[i:i + 1]) for i in range(10)])  # batch 1: float per call on VNNI
    quantum = _last_output_scale(qmodel)
    assert _within_one_quantum(fast, ref, quantum) >= 0.999
    assert _within_one_quantum(single_fast, ref[:10], quantum) >= 0.999
    assert float((fast.argmax(1) == ref.argmax(1)).float().mean()) >= 0.99
    rows = {r["name"]: r for r in report(qmodel).to_dict()["layers"]}
    assert rows["block1.conv1"]["backend"] == "onednn"
    # per call on VNNI (float for small batches); on AVX2 int8 at every row count (kernels/dispatch.py)
    reason = rows["classifier"]["reason"]
    assert rows["classifier"]["backend"] == "onednn" and ("per call" in reason or "every row count" in reason)
    assert all(r["backend"] == "reference" for r in report(ref_model).to_dict()["layers"]
               if r["precision"] == "int8")


@pytest.mark.isa
def test_resnet_block_fast_matches_reference():
    model = _resnet_like()
    calib = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    qmodel = quanta.quantize(model, calib, show_progress=False)
    ref_model = _reference_twin(qmodel)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        fast, ref, float_out = qmodel(x), ref_model(x), model(x)
    assert _within_one_quantum(fast, ref, _last_output_scale(qmodel)) >= 0.999
    cos = torch.nn.functional.cosine_similarity(fast.flatten(), float_out.flatten(), dim=0)
    assert float(cos) >= 0.99
    plan = qmodel._quanta.plan
    adds = [lp for lp in plan.layers.values() if lp.kind == "site" and lp.precision == "int8"]
    assert adds and all(lp.backend == "onednn" and lp.backend_reason for lp in adds)
    assert plan.layers["3.conv1"].backend == "onednn"
    rows = {r["name"]: r for r in report(qmodel).to_dict()["layers"]}
    # the Linear head: per call by rows on VNNI, int8 at every row count on AVX2 (kernels/dispatch.py)
    assert "chosen per call by rows" in rows["7"]["reason"] or "every row count" in rows["7"]["reason"]
    assert "onednn" in str(report(qmodel))


def test_override_forces_backend_and_round_trips():
    model = _resnet_like()
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    config = QuantConfig(overrides=(Override("0", backend="onednn"), Override("3", backend="reference")))
    assert QuantConfig.from_dict(config.to_dict()) == config
    qmodel = quanta.quantize(model, calib, config=config, show_progress=False)
    plan = qmodel._quanta.plan
    assert plan.layers["0"].backend == "onednn" and "override '0'" in plan.layers["0"].backend_reason
    assert plan.layers["3.conv1"].backend == "reference"
    assert plan.layers["4.conv1"].backend == "onednn"
    with pytest.raises(ValueError, match="backend"):
        Override("0", backend="cuda")
    config = QuantConfig(backend="reference")
    everything_ref = quanta.quantize(model, calib, config=config, show_progress=False)
    assert {m.backend for m in everything_ref.modules() if isinstance(m, QuantizedModule)} == {"reference"}


EIGHT_BIT = QuantConfig(weight=quanta.QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=8))


def test_weights_wider_than_the_cpu_tolerates_never_reach_onednn(monkeypatch):
    """A model with 8-bit weights (what a VNNI CPU makes by default) on a CPU whose int8 kernels
    are exact only for |w| <= 64: every layer takes the exact float fallback, even where oneDNN
    is forced, the report says why, and the kernels themselves refuse such weights."""
    model = _resnet_like()
    x = torch.randn(8, 3, 32, 32)
    qmodel = quanta.quantize(model, [torch.randn(8, 3, 32, 32)], config=EIGHT_BIT, show_progress=False)
    assert all(m.weight_bits == 8 and cpu.weight_magnitude(m.weight) > 64
               for m in qmodel.modules() if isinstance(m, QuantizedModule))
    ref = _reference_twin(qmodel)(x)
    monkeypatch.setattr(cpu, "exact_weight_limit", lambda: cpu.NARROW_LIMIT)  # AVX2 without VNNI
    backends.select_backends(qmodel, qmodel._quanta.plan, "onednn")
    chosen = {m.backend for m in qmodel.modules() if isinstance(m, QuantizedModule)}
    assert chosen == {"float"}
    rows = [r for r in report(qmodel).to_dict()["layers"]
            if r["precision"] == "int8" and r["kind"] == "module"]
    assert rows and all("exact float fallback" in r["reason"] and "|w| <= 64" in r["reason"] for r in rows)
    with torch.no_grad():
        fast = qmodel(x)
    assert _within_one_quantum(fast, ref, _last_output_scale(qmodel)) >= 0.999
    with pytest.raises(cpu.WeightRangeError, match=r"\|w\| = 12[78].*\|w\| <= 64"):
        qmodel.get_submodule("0")._pack()


def test_copy_load_state_dict_and_compile_keep_results():
    model = _resnet_like()
    qmodel = quanta.quantize(model, [torch.randn(8, 3, 32, 32)], show_progress=False)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = qmodel(x)
        twin = copy.deepcopy(qmodel)  # packed oneDNN weights are caches: rebuilt on the copy
        assert torch.equal(twin(x), expected)
        twin.load_state_dict(qmodel.state_dict())
        assert torch.equal(twin(x), expected)
        compiled = torch.compile(qmodel)
        assert torch.equal(compiled(x), expected)


@pytest.mark.isa  # which kernel oneDNN picks depends on the ISA: run it capped at AVX2 too
def test_grouped_conv_on_oneDNN_reference_kernel_runs_float():
    """A grouped conv with 2 input channels per group has no fast oneDNN int8 kernel on some CPUs
    (AVX2: "ref:any", 10-27x slower than float). quanta asks oneDNN which kernel it picked and
    runs such a layer in float on its dequantized weights, saying why; a conv with a fast kernel
    stays int8. A CPU where oneDNN has a fast kernel for it keeps it int8."""
    from quanta.kernels.native import ops as native_ops

    if not native_ops.available():
        pytest.skip("native oneDNN kernels unavailable: oneDNN's kernel choice cannot be read")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 32, 3, padding=1, groups=32), nn.ReLU(), nn.Conv2d(32, 16, 1)).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    qmodel = quanta.quantize(model, calib, show_progress=False)
    plan = qmodel._quanta.plan
    grouped = qmodel.get_submodule("2")
    name = grouped._packed_kernel().implementation()
    dense = qmodel.get_submodule("0")._packed_kernel().implementation()
    assert dense and not dense.startswith("ref")  # oneDNN reports its kernel: a real name here
    if name.startswith("ref"):
        assert grouped.backend == "float" and plan.layers["2"].backend == "float"
        assert "scalar reference kernel (ref:any)" in plan.layers["2"].backend_reason
        assert "groups=32" in plan.layers["2"].backend_reason
    else:
        assert grouped.backend == "onednn"
    assert plan.layers["0"].backend == "onednn" and plan.layers["4"].backend == "onednn"
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) >= 30.0
    forced = quanta.quantize(model, calib, config=QuantConfig(backend="onednn"), show_progress=False)
    assert forced.get_submodule("2").backend == "onednn"  # asked for: oneDNN, however slow
