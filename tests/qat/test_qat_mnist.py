"""Acceptance: one epoch of QAT on real MNIST from the bundled float checkpoint.

Recipe (plain, nothing tuned on the test set): SGD momentum 0.9, lr 1e-3, batch 64, one
pass over the 4,000 training images, no freezing (``freeze`` is tested in test_qat.py).
Accuracy is measured on the 1,000 held-out images: one image is 0.1 points, about the
seed-to-seed spread of one epoch, so these margins are tight by construction.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import quanta
from quanta.config import QuantConfig, QuantSpec
from quanta.zoo.mnist import evaluate, load_mnist, load_pretrained_mnist_cnn

pytestmark = pytest.mark.slow


def qat_one_epoch(model, train_x, train_y, config=None, seed=0, batch_size=64):
    """prepare_qat -> one epoch of SGD -> convert."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the checkpoint is in eval mode
        qat = quanta.prepare_qat(model, train_x[:250], config)
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3, momentum=0.9)
    order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed))
    for start in range(0, train_x.shape[0], batch_size):
        idx = order[start:start + batch_size]
        loss = F.cross_entropy(qat(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return quanta.convert(qat.eval())


def weight_bits(bits):
    return QuantConfig(weight=QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=bits))


@pytest.fixture(scope="module")
def mnist():
    torch.manual_seed(0)
    model = load_pretrained_mnist_cnn()
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    calib = [train_x[i:i + 250] for i in range(0, 1000, 250)]
    return model, train_x, train_y, test_x, test_y, calib


def test_qat_int8_matches_ptq_and_float(mnist):
    model, train_x, train_y, test_x, test_y, calib = mnist
    float_acc = evaluate(model, test_x, test_y)
    ptq_acc = evaluate(quanta.quantize(model, calib, show_progress=False), test_x, test_y)
    qat_acc = evaluate(qat_one_epoch(model, train_x, train_y), test_x, test_y)
    print(f"MNIST 8-bit: float {float_acc:.1f}  PTQ {ptq_acc:.1f}  QAT {qat_acc:.1f}")
    assert float_acc >= 98.5
    assert qat_acc >= ptq_acc - 0.1 - 1e-6, (ptq_acc, qat_acc)  # 1e-6: 99.2 - 0.1 > 99.1 in floats
    assert qat_acc >= float_acc - 0.3 - 1e-6, (float_acc, qat_acc)


def test_qat_recovers_what_ptq_loses_with_3bit_weights(mnist):
    model, train_x, train_y, test_x, test_y, calib = mnist
    config = weight_bits(3)
    float_acc = evaluate(model, test_x, test_y)
    ptq = quanta.quantize(model, calib, config=config, show_progress=False)
    assert int(ptq.conv2.weight.abs().max()) <= 4  # 3-bit weights in [-4, 3] reach the int8 kernels
    ptq_acc = evaluate(ptq, test_x, test_y)
    qat_acc = evaluate(qat_one_epoch(model, train_x, train_y, config), test_x, test_y)
    print(f"MNIST 3-bit weights: float {float_acc:.1f}  PTQ {ptq_acc:.1f}  QAT {qat_acc:.1f}")
    assert float_acc - ptq_acc >= 2.0, "PTQ is expected to lose clearly with 3-bit weights"
    assert qat_acc - ptq_acc >= 0.75 * (float_acc - ptq_acc), (float_acc, ptq_acc, qat_acc)
