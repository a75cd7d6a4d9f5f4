"""Shared material of the debugging tests: the pretrained MNIST CNN and a tiny float model."""

import pytest
import torch
from torch import nn

import quanta
from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn


@pytest.fixture(scope="package")
def mnist_debug():
    """(float model, int8 model, 200 held-out images, their labels); 2 calibration batches."""
    model = load_pretrained_mnist_cnn()
    train_x, _ = load_mnist("train")
    test_x, test_y = load_mnist("test")
    qmodel = quanta.quantize(model, [train_x[:100], train_x[100:200]], show_progress=False)
    return model, qmodel, test_x[:200], test_y[:200]


class Tiny(nn.Module):
    """Three Linear layers with a ReLU between each (sites "a", "b", "c")."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture
def tiny():
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(64, 16, generator=gen) for _ in range(3)]
    return Tiny().eval(), data
