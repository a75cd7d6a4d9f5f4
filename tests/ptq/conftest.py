"""The real MNIST CNN and its data, shared by the post-training correction tests."""

from __future__ import annotations

import pytest
import torch

from quanta.zoo import mnist


@pytest.fixture(scope="module")
def mnist_data() -> dict:
    """The pretrained CNN, 2 calibration batches of 100 training images, 1,000 test images, their
    labels and the float model's outputs on them."""
    train, _ = mnist.load_mnist("train")
    x, y = mnist.load_mnist("test")
    model = mnist.load_pretrained_mnist_cnn()
    with torch.no_grad():
        ref = model(x[:1000])
    calib = [train[i * 100:(i + 1) * 100] for i in range(2)]
    return {"model": model, "calib": calib, "x": x[:1000], "y": y[:1000], "ref": ref}
