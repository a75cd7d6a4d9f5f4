"""QAT: fake-quant numerics match convert, training tools work, bad input is handled.

The model-level consistency checks use the real MNIST CNN (Conv+BN+ReLU, residual adds) and
a small Conv1d/Linear+BN model with a concatenation that covers the other fused paths.
"""

import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quanta
from quanta.config import QuantConfig, QuantSpec
from quanta.modules.backends import resolve_weight_bits
from quanta.modules.qat import FakeQuantize, QATConv2d, QATModule
from quanta.modules.quantized import QuantizedConv2d, QuantizedLinear
from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn


def _quiet_prepare(model, example, config=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return quanta.prepare_qat(model, example, config)


def _train_steps(model, x, y, steps, lr=1e-3, seed=0, opt=None, clip=None):
    g = torch.Generator().manual_seed(seed)
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return opt


def _within_one_quantum(qat, qmodel, x, layer):
    qat.eval()
    with torch.no_grad():
        fake, real = qat(x), qmodel(x)
    quantum = qmodel._quanta.plan.layers[layer].output_qparams[0]
    return float(((fake - real).abs() <= quantum).float().mean())


@pytest.fixture(scope="module")
def mnist():
    torch.manual_seed(0)
    train_x, train_y = load_mnist("train")
    test_x, _ = load_mnist("test")
    return load_pretrained_mnist_cnn(), train_x[:1000], train_y[:1000], test_x[:300]


class ConvCatNet(nn.Module):
    """Conv1d+BN+ReLU6, a biased Conv1d, a cat site, Linear+BN1d+ReLU, plain Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(3, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm1d(8)
        self.b = nn.Conv1d(3, 8, 5, padding=2)
        self.fc = nn.Linear(16 * 12, 32)
        self.bn_fc = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu6(self.bn_a(self.a(x))), F.relu(self.b(x))], dim=1)
        h = F.relu(self.bn_fc(self.fc(h.flatten(1))))
        return self.out(h)


def _conv_cat_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 3, 12, generator=g)
    y = (x[:, 0].mean(1) > 0).long() + 2 * (x[:, 1, :6].sum(1) > 0).long()
    return x, y


def test_mnist_fake_quant_matches_int8_within_one_quantum(mnist):
    model, x, y, test_x = mnist
    qat = _quiet_prepare(model, x[:64])
    _train_steps(qat, x, y, steps=8)  # move weights, BN statistics and ranges off the checkpoint
    qmodel = quanta.convert(qat.eval())
    assert _within_one_quantum(qat, qmodel, test_x, "classifier") >= 0.99
    layers = dict(qmodel.named_modules())
    assert isinstance(layers["conv1"], QuantizedConv2d) and isinstance(layers["fc1"], QuantizedLinear)
    assert qmodel._quanta.plan.layers["conv1"].quantized_type == "QuantizedConv2d"


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_conv1d_linear_bn_and_cat_match_int8(bits):
    torch.manual_seed(0)
    x, y = _conv_cat_data()
    config = QuantConfig(weight=QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=bits))
    qat = quanta.prepare_qat(ConvCatNet().train(), x[:64], config)
    _train_steps(qat, x, y, steps=20, lr=1e-2)
    plan = qat._quanta.plan
    assert plan.layers["bn_a"].precision == "folded" and plan.layers["bn_fc"].precision == "folded"
    assert [lp.precision for lp in plan.layers.values() if lp.float_type == "cat"] == ["int8"]
    qmodel = quanta.convert(qat.eval())
    assert _within_one_quantum(qat, qmodel, x, "out") >= 0.99
    assert int(qmodel.a.weight.abs().max()) <= 2 ** (bits - 1)


def test_weight_bits_resolved_at_prepare(mnist):
    model, x, _, _ = mnist
    qat = _quiet_prepare(model, x[:32])  # default weight spec: bits=None (pick for this CPU)
    expected = resolve_weight_bits(QuantConfig().weight, "auto").bits
    assert qat.conv1.weight_spec.bits == expected
    assert qat._quanta.plan.layers["conv1"].weight_bits == expected
    assert quanta.convert(qat).conv1.weight_bits == expected


def test_site_outputs_and_gradients_follow_fake_quantization(mnist):
    model, x, y, _ = mnist
    qat = _quiet_prepare(model, x[:32])
    site = qat._quanta.sites["block1:add#0"]
    seen, original = [], site.run

    def recording_run(func, args, kwargs):  # sites are called through run(), not forward()
        seen.append(original(func, args, kwargs))
        return seen[-1]

    site.run = recording_run
    loss = F.cross_entropy(qat(x[:32]), y[:32])
    loss.backward()
    scale, zero_point = site.observer.calculate_qparams()
    grid = seen[0].detach() / scale + zero_point
    assert torch.allclose(grid, grid.round(), atol=1e-3)  # the add's output is on its int8 grid
    grads = [p.grad for p in qat.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert qat.conv1.float_module.weight.grad.abs().sum() > 0


def test_freeze_stops_observers_and_batchnorm_statistics(mnist):
    model, x, y, _ = mnist
    qat = _quiet_prepare(model, x[:64])
    _train_steps(qat, x, y, steps=2)
    quanta.freeze(qat, observers=True, batchnorm=True)
    fq = [m for m in [*qat.modules(), *qat._quanta.modules()] if isinstance(m, FakeQuantize)]
    assert len(fq) == 2 * 8 + 2  # input and output of 8 conv/linear layers, 2 residual adds
    ranges = [(m.min_val.clone(), m.max_val.clone()) for m in fq]
    bn_stats = qat.conv1.bn.running_mean.clone()
    weight = qat.conv1.float_module.weight.detach().clone()
    _train_steps(qat, x, y, steps=3)
    for m, (lo, hi) in zip(fq, ranges, strict=True):
        assert torch.equal(m.min_val, lo) and torch.equal(m.max_val, hi), m.layer
    assert torch.equal(qat.conv1.bn.running_mean, bn_stats)
    assert not torch.equal(qat.conv1.float_module.weight, weight)  # weights still train
    # With everything frozen, train mode computes exactly what eval mode (and int8) computes.
    with torch.no_grad():
        train_out = qat.train()(x[:64])
        eval_out = qat.eval()(x[:64])
    assert torch.equal(train_out, eval_out)


def test_state_dict_resume_equals_uninterrupted_training(mnist):
    model, x, y, test_x = mnist
    torch.manual_seed(0)
    straight = _quiet_prepare(model, x[:64])
    opt = _train_steps(straight, x, y, steps=3, clip=1.0)
    _train_steps(straight, x, y, steps=3, seed=1, opt=opt, clip=1.0)

    first = _quiet_prepare(model, x[:64])
    opt = _train_steps(first, x, y, steps=3, clip=1.0)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)  # weights_only: plain tensors and dicts
    resumed = _quiet_prepare(model, x[:64])
    resumed.load_state_dict(checkpoint["model"])
    opt = torch.optim.SGD(resumed.parameters(), lr=1e-3, momentum=0.9)
    opt.load_state_dict(checkpoint["optimizer"])
    _train_steps(resumed, x, y, steps=3, seed=1, opt=opt, clip=1.0)

    with torch.no_grad():
        assert torch.equal(straight.eval()(test_x), resumed.eval()(test_x))
        assert torch.equal(quanta.convert(straight)(test_x), quanta.convert(resumed)(test_x))


def test_whole_module_checkpoint_round_trip(mnist):
    model, x, y, test_x = mnist
    qat = _quiet_prepare(model, x[:64])
    _train_steps(qat, x, y, steps=2)
    buffer = io.BytesIO()
    torch.save(qat, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.training
    _train_steps(loaded, x, y, steps=1)  # trains after loading; the shared input qparams survive
    assert loaded.block1.conv1.input_source is loaded.conv1.output_observer
    with torch.no_grad():
        assert torch.equal(loaded.eval()(test_x), loaded(test_x))
    assert _within_one_quantum(loaded, quanta.convert(loaded), test_x, "classifier") >= 0.99


def test_prepare_qat_on_eval_model_warns_and_switches_to_train(mnist):
    model, x, _, _ = mnist
    assert not model.training
    with pytest.warns(UserWarning, match="eval mode"):
        qat = quanta.prepare_qat(model, x[:8])
    assert qat.training and all(m.training for m in qat.modules())
    assert not model.training and isinstance(model.conv1, nn.Conv2d)  # original untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quanta.prepare_qat(ConvCatNet().train(), torch.randn(4, 3, 12))  # train mode: no warning


def test_convert_of_train_mode_qat_model_uses_running_statistics(mnist):
    model, x, y, test_x = mnist
    qat = _quiet_prepare(model, x[:64])
    _train_steps(qat, x, y, steps=2)
    assert qat.training
    from_train = quanta.convert(qat)
    assert qat.training and isinstance(qat.conv1, QATConv2d)  # the QAT model is left as it was
    assert not from_train.training
    from_eval = quanta.convert(qat.eval())
    with torch.no_grad():
        assert torch.equal(from_train(test_x), from_eval(test_x))


def test_bad_input_errors(mnist):
    model, x, _, _ = mnist
    with pytest.raises(quanta.UnsupportedModelError, match="prepare_qat"):
        quanta.freeze(quanta.prepare(model, x[:8]))
    qat = _quiet_prepare(model, x[:8])
    with pytest.raises(quanta.UnsupportedModelError, match="already prepared"):
        quanta.prepare_qat(qat, x[:8])
    with pytest.raises(quanta.UnsupportedModelError, match="not been prepared"):
        quanta.freeze(model)
    with pytest.raises(quanta.UnsupportedModelError, match="prepare_qat"):
        quanta.freeze(quanta.convert(qat))
    with pytest.raises(quanta.UnsupportedModelError, match="example_inputs"):
        _quiet_prepare(model, torch.randn(2, 3))
    no_stats = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(quanta.UnsupportedModelError, match="running statistics"):
        quanta.prepare_qat(no_stats.train(), torch.randn(2, 1, 8, 8))
    assert all(not isinstance(m, QATModule) for m in model.modules())
