"""The native executor (modules/native_program.py, kernels/native/program.c): a converted
model's forward as one C call, equal bit for bit to the generated Python forward and to eager
mode, on real models, with the Python forward wherever a call does not fit the program."""

from __future__ import annotations

import copy
import dataclasses
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn

import quanta
from quanta.errors import QuantizedInputError
from quanta.kernels import eltwise, native
from quanta.modules import native_program
from quanta.zoo import architectures as arches
from quanta.zoo import mnist
from quanta.zoo.vision import calibrate_batchnorm

pytestmark = pytest.mark.skipif(native.load() is None, reason="native kernels unavailable")


def _eager(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    other._quanta.config = dataclasses.replace(other._quanta.config, runtime="eager")
    return other


def _python(model: nn.Module):
    """The model's generated Python forward (what runs without the native program)."""
    return model._quanta._graph.fn


def _program(model: nn.Module, shape: torch.Size | None = None) -> native_program.NativeProgram | None:
    """The program for ``shape`` (default: the building call's)."""
    programs = model._quanta._graph.native
    return programs.by_shape.get(shape) if shape else next(iter(programs.by_shape.values()), None)


def _sweep_model(name: str, batch: int = 1):
    arch = next(a for a in arches.SWEEP if a.name == name)
    model = arches.build(arch, small=True)
    calib = [arches.images(arch, 4, small=True, seed=s) for s in range(2)]
    calibrate_batchnorm(model, calib)
    q = quanta.quantize(model, calib, show_progress=False)
    return q, [arches.images(arch, batch, small=True, seed=10 + s) for s in range(3)]


@pytest.mark.skipif(not arches.available(), reason="pytorchcv missing")
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_large_w1", "efficientnet_b0"])
def test_cnns_run_as_one_call_equal_to_the_python_forward_and_eager(name: str) -> None:
    """Residual adds with ReLU (ResNet), squeeze-excite gates, Hardswish and a float-output
    classifier conv with a view (MobileNetV3), Swish and dropout (EfficientNet)."""
    q, xs = _sweep_model(name)
    with torch.no_grad():
        q(xs[0])
        program = _program(q)
        assert program is not None, quanta.runtime_status(q)
        assert f"native program {program.count} steps in one C call" in quanta.runtime_status(q)
        python, eager = _python(q), _eager(q)
        for x in xs:
            got = q(x)
            assert torch.equal(got, python(x)) and torch.equal(got, eager(x))
            assert got.stride() == python(x).stride()


def test_mnist_cnn_on_real_digits() -> None:
    """The pretrained MNIST CNN: max pooling, and a flatten of a 7x7 NHWC map in NCHW order (a
    reorder step) before its int8 Linears; every test digit equal to eager mode."""
    train, _ = mnist.load_mnist("train")
    images, labels = mnist.load_mnist("test")
    q = quanta.quantize(mnist.load_pretrained_mnist_cnn(), [train[i * 100:(i + 1) * 100] for i in range(2)],
                        show_progress=False)
    eager = _eager(q)
    with torch.no_grad():
        q(images[:250])
        program = _program(q)
        assert program is not None, quanta.runtime_status(q)
        assert native_program.Kind.TO_NCHW in {native_program.Kind(s.kind) for s in program.steps}
        for i in range(0, 2000, 250):
            assert torch.equal(q(images[i:i + 250]), eager(images[i:i + 250]))
        assert torch.equal(q(images[:1]), eager(images[:1]))
        accuracy = mnist.evaluate(q, images, labels)
    assert accuracy == mnist.evaluate(eager, images, labels) >= 98.5
    assert quanta.report(q).coverage.share == 1.0  # every conv/linear MAC int8


class _Tail(nn.Module):
    """An unfused ReLU6 (its input has another reader: a clamp step), a residual add, max and
    global-average pooling between int8 convs, and a float head with a flatten view."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU6()
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        s = y + self.b(self.act(y))
        return self.head(self.gap(self.pool(self.c(s)))).flatten(1)


def _tail_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    calib = [torch.randn(2, 3, 16, 16) * 2 for _ in range(3)]
    q = quanta.quantize(_Tail().eval(), calib, show_progress=False)
    return q, torch.randn(2, 3, 16, 16) * 2


@pytest.mark.isa  # small: also under scripts/as-avx2 (the kernels' AVX2 paths)
@pytest.mark.parametrize("table_add", [False, True], ids=["native add", "table add"])
def test_clamp_pool_and_add_steps(table_add: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if table_add:  # the lookup-table add: what runs where the native loop is not exact
        monkeypatch.setattr(eltwise, "_native_add", lambda *args: None)
    q, x = _tail_model()
    with torch.no_grad():
        q(x)
        program = _program(q)
        assert program is not None, quanta.runtime_status(q)
        kinds = {native_program.Kind(s.kind) for s in program.steps}
        add = native_program.Kind.ADD_TABLE if table_add else native_program.Kind.ADD
        assert {add, native_program.Kind.MAX_POOL, native_program.Kind.AVG_POOL, native_program.Kind.CLAMP,
                native_program.Kind.QUANTIZE} <= kinds, kinds
        x2 = torch.randn(2, 3, 16, 16) * 3  # clamps and saturates more
        assert torch.equal(q(x2), _python(q)(x2)) and torch.equal(q(x2), _eager(q)(x2))


@pytest.mark.isa
def test_other_shapes_threads_nan_and_training_take_the_python_forward() -> None:
    q, x = _tail_model()
    eager = _eager(q)
    with torch.no_grad():
        q(x)
        program = _program(q)
        other = torch.randn(3, 3, 12, 12)
        assert program(other) is None
        for _ in range(2):  # another shape: its own program, built on its first call
            assert torch.equal(q(other), eager(other))
        assert _program(q, other.shape) is not None
        assert "(and 1 more input shapes)" in quanta.runtime_status(q)
        assert program(x.to(torch.float64)) is None
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(QuantizedInputError):
            q(bad)  # eager mode's own error for the layer
        results: list[bool] = []

        def call() -> None:
            with torch.no_grad():
                for _ in range(20):
                    results.append(torch.equal(q(x), eager(x)))
        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 60 and all(results)
    q.train()
    assert q(x).shape == eager(x).shape  # training mode runs eagerly, outside the program


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTA_NATIVE_PROGRAM", "0")
    q, x = _tail_model()
    with torch.no_grad():
        q(x)
    assert _program(q) is None
    assert "native program off (QUANTA_NATIVE_PROGRAM=0" in quanta.runtime_status(q)


def test_an_op_without_a_native_step_is_named() -> None:
    class _Sigmoid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.conv(x)).mean(dim=(2, 3))

    torch.manual_seed(0)
    q = quanta.quantize(_Sigmoid().eval(), [torch.randn(2, 3, 8, 8)], show_progress=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = _eager(q)(x)
        q(x)
        assert torch.equal(q(x), want)
    assert _program(q) is None
    assert "native program off: " in quanta.runtime_status(q)


class _Joins(nn.Module):
    """Zero padding of the float input (deferred to its quantization) and of int8 data, and an
    int8 channel cat of two branches at their own qparams (requantized by table) before a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.pad_in = nn.ZeroPad2d((1, 2, 0, 1))
        self.stem = nn.Conv2d(3, 8, 3)
        self.left = nn.Conv2d(8, 6, 1)
        self.right = nn.Conv2d(8, 10, 3, padding=1)
        self.pad = nn.ZeroPad2d(1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(self.pad_in(x)))
        joined = torch.cat([self.left(y), y, self.right(y)], dim=1)  # y keeps the stem's qparams
        return self.head(self.gap(self.pad(joined))).flatten(1)


@pytest.mark.isa
def test_pad_and_cat_steps() -> None:
    torch.manual_seed(0)
    q = quanta.quantize(_Joins().eval(), [torch.randn(2, 3, 12, 12) for _ in range(3)], show_progress=False)
    eager = _eager(q)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        q(x)
    program = _program(q)
    assert program is not None, quanta.runtime_status(q)
    kinds = [native_program.Kind(s.kind) for s in program.steps]
    assert kinds.count(native_program.Kind.PAD) == 2 and native_program.Kind.CAT in kinds, kinds
    parts = next(t for t in program.keep if isinstance(t, np.ndarray) and t.dtype == np.int64)
    assert (parts[:, 2] == 0).any() and (parts[:, 2] != 0).any(), parts  # copied and requantized parts
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 3, 12, 12) * 2
            assert torch.equal(q(x), eager(x)) and torch.equal(q(x), _python(q)(x))


class _OwnIdentity(nn.Module):
    """A library's own identity class (efficientnet-lite's static padding of 0 is one)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - as such libraries name it
        return input


class _NotIdentity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


@pytest.mark.isa
def test_a_library_identity_passes_int8_through() -> None:
    """An identity module of another class is recognized by its code: the conv before it emits
    int8, the graph and the program pass the data through; a look-alike that computes stays float."""
    from quanta.capture.activations import returns_its_input

    assert returns_its_input(_OwnIdentity()) and returns_its_input(nn.Identity())
    assert not returns_its_input(_NotIdentity()) and not returns_its_input(nn.ReLU())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _OwnIdentity(), nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1),
                          nn.Conv2d(4, 3, 1), nn.Flatten())
    q = quanta.quantize(model.eval(), [torch.randn(2, 3, 10, 10) for _ in range(2)], show_progress=False)
    plan = q._quanta.plan.layers
    assert plan["1"].precision == "native" and plan["2"].input_from == "0", (plan["1"], plan["2"])
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        q(x)
        assert _program(q) is not None, quanta.runtime_status(q)
        assert torch.equal(q(x), _eager(q)(x)) and torch.equal(q(x), _python(q)(x))
