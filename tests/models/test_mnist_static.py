"""Acceptance: the bundled MNIST CNN (BatchNorm, residual add, ReLU) on real held-out images."""

import pytest
import torch

import quanta
from quanta.zoo.mnist import evaluate, load_mnist, load_pretrained_mnist_cnn


@pytest.fixture(scope="module")
def mnist():
    model = load_pretrained_mnist_cnn()
    train_x, _ = load_mnist("train")
    test_x, test_y = load_mnist("test")
    calib = [train_x[i:i + 100] for i in range(0, 1000, 100)]
    qmodel = quanta.quantize(model, calib, show_progress=False)
    return model, qmodel, test_x, test_y


def test_static_int8_accuracy_within_half_a_point(mnist):
    model, qmodel, test_x, test_y = mnist
    float_acc = evaluate(model, test_x, test_y)
    int8_acc = evaluate(qmodel, test_x, test_y)
    assert float_acc >= 97.0
    assert int8_acc >= float_acc - 0.5, (float_acc, int8_acc)


def test_every_conv_and_linear_is_int8(mnist):
    model, qmodel, *_ = mnist
    weighted = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    rows = {r["name"]: r for r in quanta.report(qmodel).to_dict()["layers"]}
    assert weighted and all(rows[n]["precision"] == "int8" for n in weighted)
    converted = dict(qmodel.named_modules())
    assert all(type(converted[n]).__name__.startswith("Quantized") for n in weighted)
    # BatchNorms folded, the residual adds run in int8
    assert all(r["precision"] == "folded" for r in rows.values() if r["op"].startswith("BatchNorm"))
    assert [r["precision"] for r in rows.values() if r["op"] == "add"] == ["int8", "int8"]


def test_original_model_is_untouched(mnist):
    model, *_ = mnist
    assert isinstance(model.conv1, torch.nn.Conv2d) and isinstance(model.bn1, torch.nn.BatchNorm2d)
    assert not hasattr(model, "_quanta")


def test_per_layer_sqnr_on_real_images(mnist):
    model, qmodel, test_x, _ = mnist
    per_layer = quanta.layer_sqnr(model, qmodel, test_x[:200])
    assert {"block1.conv1", "block2.conv2", "fc1", "classifier", "<output>"} <= set(per_layer)
    assert min(per_layer.values()) >= 25.0, per_layer
    assert per_layer["<output>"] >= 30.0
