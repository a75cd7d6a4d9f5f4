"""Models with Python control flow, and bad input: clear errors naming problem and layer."""

import pytest
import torch
import torch.nn as nn

import quanta
from quanta.debug.sqnr import sqnr


class Branchy(nn.Module):
    """Control flow on shapes and on values, and a loop with a data-dependent count."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.small = nn.Linear(8, 4)
        self.big = nn.Linear(8, 4)
        self.refine = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 8:
            x = x[..., ::2, ::2]
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        y = self.big(h) if x.mean() > 0 else self.small(h)
        for _ in range(int(x.shape[0] > 2) + 1):
            y = y + self.refine(y)
        return y


def _calib(n=6):
    torch.manual_seed(0)
    big = [torch.randn(4, 3, 16, 16) + 0.5 for _ in range(n)]
    return big + [torch.randn(2, 3, 8, 8) - 0.5 for _ in range(n)]


def test_python_control_flow_quantizes_and_runs():
    model = Branchy().eval()
    qmodel = quanta.quantize(model, _calib(), show_progress=False)
    inputs = (torch.randn(4, 3, 16, 16) + 0.5, torch.randn(2, 3, 8, 8) - 0.5, torch.randn(3, 3, 16, 16) + 0.5)
    for x in inputs:
        assert sqnr(model(x), qmodel(x)) >= 25.0
    rows = {r["name"]: r for r in quanta.report(qmodel).to_dict()["layers"]}
    assert rows["big"]["precision"] == rows["small"]["precision"] == "int8"  # both branches calibrated
    assert type(qmodel.conv).__name__ == "QuantizedConv2d"


def _mlp():
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)).eval()


def test_nan_in_calibration_names_the_layer():
    data = [torch.randn(4, 10), torch.full((4, 10), float("nan"))]
    with pytest.raises(quanta.CalibrationError, match=r"NaN .*layer|NaN found while calibrating 0"):
        quanta.quantize(_mlp(), data, show_progress=False)


def test_inf_in_calibration_names_the_layer():
    data = [torch.randn(4, 10), torch.tensor([[float("inf")] * 10])]
    with pytest.raises(quanta.CalibrationError, match="Inf found while calibrating 0"):
        quanta.quantize(_mlp(), data, show_progress=False)


def test_convert_without_calibration_names_unobserved_layers():
    prepared = quanta.prepare(_mlp(), torch.randn(2, 10))
    with pytest.raises(quanta.CalibrationError, match=r"never calibrated: 0, 2.*quanta.calibrate"):
        quanta.convert(prepared)


def test_empty_calibration_data():
    with pytest.raises(quanta.CalibrationError, match="empty"):
        quanta.quantize(_mlp(), [], show_progress=False)
    prepared = quanta.prepare(_mlp(), torch.randn(2, 10))
    with pytest.raises(quanta.CalibrationError, match="empty"):
        quanta.calibrate(prepared, iter([]))


def test_single_tensor_as_calibration_data_is_rejected_clearly():
    with pytest.raises(quanta.CalibrationError, match="iterable of batches"):
        quanta.quantize(_mlp(), torch.randn(4, 10), show_progress=False)


def test_wrong_dtype_and_rank_at_inference():
    qmodel = quanta.quantize(_mlp(), [torch.randn(4, 10)], show_progress=False)
    with pytest.raises(quanta.QuantizedInputError, match="input 0: expected a float32 tensor.*got int64"):
        qmodel(torch.ones(4, 10, dtype=torch.long))
    with pytest.raises(quanta.QuantizedInputError, match="expected rank 2.*got shape \\(10,\\)"):
        qmodel(torch.randn(10))
    with pytest.raises(quanta.QuantizedInputError, match=r"^0 \(QuantizedLinear\) expects a floating point"):
        qmodel[0](torch.ones(4, 10, dtype=torch.uint8))


@pytest.mark.parametrize("runtime", ["graph", "eager"])
def test_input_sizes_that_do_not_fit_the_weights_name_the_layer(runtime):
    """Wrong channel or feature counts are refused before any kernel reads the weights."""
    mlp = quanta.quantize(_mlp(), [torch.randn(4, 10)], config=quanta.QuantConfig(runtime=runtime),
                          show_progress=False)
    conv = quanta.quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), [torch.randn(2, 3, 8, 8)],
                           config=quanta.QuantConfig(runtime=runtime), show_progress=False)
    with torch.no_grad():
        mlp(torch.randn(4, 10)), conv(torch.randn(2, 3, 8, 8))  # builds the graph runtime
        with pytest.raises(quanta.QuantizedInputError, match=r"^0 \(QuantizedLinear\) expects 10 input "
                           r"features in the last dimension, got shape \(4, 12\)"):
            mlp(torch.randn(4, 12))
        with pytest.raises(quanta.QuantizedInputError, match=r"^0 \(QuantizedConv2d\) expects 3 input "
                           r"channels, got shape \(2, 1, 8, 8\)"):
            conv(torch.randn(2, 1, 8, 8))


def test_example_inputs_that_do_not_fit_the_model():
    with pytest.raises(quanta.UnsupportedModelError, match="failed on example_inputs"):
        quanta.prepare(_mlp(), torch.randn(2, 7))


def test_skip_keeps_named_layer_float_with_reason():
    qmodel = quanta.quantize(_mlp(), [torch.randn(4, 10)], skip=["2"], show_progress=False)
    assert isinstance(qmodel[2], nn.Linear)
    row = {r["name"]: r for r in quanta.report(qmodel).to_dict()["layers"]}["2"]
    assert row["precision"] == "float" and "excluded by config" in row["reason"]


def test_generator_calibration_data_keeps_every_batch():
    batches = [torch.randn(4, 10) for _ in range(3)]
    prepared_counts = []

    def gen():
        yield from batches

    qmodel = quanta.quantize(_mlp(), gen(), show_progress=False)
    prepared_counts.append(qmodel is not None)
    assert prepared_counts == [True]


def test_branch_never_reached_stays_float_with_reason():
    model = Branchy().eval()
    calib = [torch.randn(4, 3, 16, 16) + 0.5 for _ in range(3)]  # x.mean() > 0: `small` never runs
    qmodel = quanta.quantize(model, calib, show_progress=False)
    assert isinstance(qmodel.small, nn.Linear) and type(qmodel.big).__name__ == "QuantizedLinear"
    row = {r["name"]: r for r in quanta.report(qmodel).to_dict()["layers"]}["small"]
    assert row["precision"] == "float" and row["reason"] == "never called during calibration"
    x = torch.randn(2, 3, 8, 8) - 0.5  # the uncalibrated branch runs, in float
    out = qmodel(x)
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    h = torch.randn(5, 8)
    assert torch.equal(qmodel.small(h), model.small(h))


class _Residual(nn.Module):
    """Conv -> residual add (an int8 call site) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.conv(x) + x).flatten(1))


@pytest.mark.parametrize("runtime", ["graph", "eager"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_nan_and_inf_inputs_raise_or_propagate_as_configured(runtime: str, backend: str):
    """A NaN or Inf input never comes back as a plausible finite answer: by default a clear error
    names the layer and the batch rows; with nonfinite='propagate' the rows float would make
    NaN are NaN, the other rows stay close to float."""
    torch.manual_seed(0)
    model = _Residual().eval()
    calib = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    x = torch.randn(3, 3, 8, 8)
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[1, 0, 2, 2] = bad
        strict = quanta.quantize(model, calib, config=quanta.QuantConfig(runtime=runtime, backend=backend),
                                 show_progress=False)
        strict(x)  # the first call builds the graph runtime
        with pytest.raises(quanta.QuantizedInputError, match=r"conv .*NaN/Inf.*batch rows \[1\].*propagate"):
            strict(xb)
        assert torch.isfinite(strict(x)).all()  # a bad call does not switch the runtime off
        assert quanta.runtime_status(strict).startswith("graph" if runtime == "graph" else "eager")
        config = quanta.QuantConfig(runtime=runtime, backend=backend, nonfinite="propagate")
        loose = quanta.quantize(model, calib, config=config, show_progress=False)
        loose(x)
        with torch.no_grad():
            got, want = loose(xb), model(xb)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
        assert sqnr(want[[0, 2]], got[[0, 2]]) >= 25.0


class _AddOfInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) + y)  # the operator: torch turns a TypeError inside it into NotImplemented


@pytest.mark.parametrize("runtime", ["graph", "eager"])
def test_nan_at_an_operator_site_names_that_site(runtime: str):
    """The int8 add of `a(x) + y` gets a NaN in its float input y: the error names the add. (It
    used to become NotImplemented inside Tensor.__add__, so Python retried y.__radd__, a second
    add that shifted the site keys, and the NaN surfaced at the next layer instead.)"""
    torch.manual_seed(0)
    calib = [(torch.randn(4, 8), torch.randn(4, 8)) for _ in range(3)]
    q = quanta.quantize(_AddOfInput().eval(), calib, config=quanta.QuantConfig(runtime=runtime),
                        show_progress=False)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    q(x, y)
    y[0, 0] = float("nan")
    with pytest.raises(quanta.QuantizedInputError, match=r"call site model:add#0 \(add\).*NaN/Inf"):
        q(x, y)


@pytest.mark.parametrize("nonfinite", ["raise", "propagate"])
def test_nan_input_in_dynamic_mode(nonfinite: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    q = quanta.quantize(model, mode="dynamic", config=quanta.QuantConfig(mode="dynamic", nonfinite=nonfinite))
    x = torch.randn(4, 16)
    x[2, 3] = float("nan")
    if nonfinite == "raise":
        with pytest.raises(quanta.QuantizedInputError, match=r"0 \(DynamicQuantizedLinear\).*NaN"):
            q(x)
        return
    with torch.no_grad():
        got, want = q(x), model(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))


def test_config_rejects_unknown_nonfinite_mode():
    with pytest.raises(ValueError, match="nonfinite"):
        quanta.QuantConfig(nonfinite="ignore")
