"""QuantConfig.numerics: a model quantizes float inputs and rounds its int8 adds as the config says
(ONNX Runtime's or XNNPACK's way) in both runtimes and on every backend, and the choice survives
save/load."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import quanta
from quanta.kernels import cpu, reference
from quanta.qtensor import QTensor


class _TwoBranches(nn.Module):
    """Two int8 convs whose outputs meet in an int8 add call site that feeds a third conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) + self.b(x))


def _make_ties(q: nn.Module) -> None:
    """Both add inputs at one scale and the output at twice it: ``(a - zp) / 2 + (b - zp) / 2`` is
    an exact tie for half the pairs, which float32 rounds to even and fixed point up."""
    state = q.state_dict()
    (key,) = [k for k in state if k.endswith("output_scale") and "sites" in k]
    state["b.output_scale"] = state["a.output_scale"]
    state["b.output_zero_point"] = state["a.output_zero_point"]
    state[key] = 2 * state["a.output_scale"]
    q.load_state_dict(state)


def other_numerics(numerics: str) -> str:
    return "onnxruntime" if numerics == "xnnpack" else "xnnpack"


def _expected(q: nn.Module, x: torch.Tensor, numerics: str) -> tuple[torch.Tensor, ...]:
    """(the add's int8 output as the last conv got it, reference.add of the convs' int8 outputs,
    the same with the other arithmetic)."""
    seen: dict[str, QTensor] = {}
    hooks = [q.a.register_forward_hook(lambda m, i, o: seen.setdefault("a", o)),
             q.b.register_forward_hook(lambda m, i, o: seen.setdefault("b", o)),
             q.c.register_forward_pre_hook(lambda m, i: seen.setdefault("sum", i[0]))]
    q(x)
    for h in hooks:
        h.remove()
    (site,) = q._quanta.sites.values()
    a, b, got = seen["a"], seen["b"], seen["sum"]
    assert all(isinstance(t, QTensor) for t in (a, b, got))
    args = (a.int_data, a.scale, a.zero_point, b.int_data, b.scale, b.zero_point, *site.qparams())
    return (got.int_data, reference.add(*args, numerics=numerics),
            reference.add(*args, numerics=other_numerics(numerics)))


@pytest.mark.parametrize("numerics", reference.NUMERICS)
@pytest.mark.parametrize("runtime", ["graph", "eager"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_model_rounds_as_configured(numerics: str, runtime: str, backend: str) -> None:
    if backend == "auto" and not cpu.onednn_available():
        pytest.skip("oneDNN int8 kernels unavailable")
    torch.manual_seed(0)
    config = quanta.QuantConfig(backend=backend, runtime=runtime, numerics=numerics)
    calibration = [torch.randn(2, 4, 96, 96) for _ in range(2)]  # 147k outputs: native/oneDNN sizes
    q = quanta.quantize(_TwoBranches().eval(), calibration, config=config, show_progress=False)
    (site,) = q._quanta.sites.values()
    assert site.numerics == numerics and site.converted and q.a.numerics == numerics
    _make_ties(q)
    got, want, other = _expected(q, torch.randn(2, 4, 96, 96), numerics)
    assert torch.equal(got, want)
    assert (want != other).float().mean() > 0.05  # the data tells the two add roundings apart
    # the model input: values next to rounding ties of the first convs' input scale
    scale, zero_point = float(q.a.input_scale), int(q.a.input_zero_point)
    k = torch.randint(-100, 100, (2, 4, 96, 96), generator=torch.Generator().manual_seed(1)) + 0.5
    x = (k.double() * scale).float()
    x = (x.view(torch.int32) + torch.randint_like(x.view(torch.int32), -3, 4)).view(torch.float32)
    want = reference.quantize_per_tensor(x, scale, zero_point, numerics=numerics)
    assert torch.equal(q.a.quantize_input(x), want)
    other = reference.quantize_per_tensor(x, scale, zero_point, numerics=other_numerics(numerics))
    assert not torch.equal(want, other)


def test_numerics_survive_save_and_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _TwoBranches().eval()
    config = quanta.QuantConfig(backend="reference", numerics="xnnpack")
    q = quanta.quantize(model, [torch.randn(2, 4, 16, 16)], config=config, show_progress=False)
    quanta.save(q, tmp_path / "m.quanta.safetensors")
    loaded = quanta.load(tmp_path / "m.quanta.safetensors", model)
    assert [s.numerics for s in loaded._quanta.sites.values()] == ["xnnpack"]
    assert loaded.a.numerics == "xnnpack"
    x = torch.randn(2, 4, 16, 16)
    assert torch.equal(loaded(x), q(x))


def test_bad_numerics_are_named() -> None:
    with pytest.raises(ValueError, match="numerics must be one of"):
        quanta.QuantConfig(numerics="fixed_point")
