"""The model sweep: architectures across families, built with random weights, offline.

Sources (installed with ``pip install --no-deps``, see scripts/setup.sh): ``pytorchcv==0.0.74``
(imported per family: its ``model_provider`` pulls torchvision, which does not import beside
the CPU torch) and ``efficientnet-pytorch==0.7.1`` (same-padded ``nn.Conv2d`` subclasses with
their own forward, memory-efficient Swish). ``pretrained=False`` everywhere: nothing downloads.
Random weights are fine for coverage, speed and SQNR against the float model; BatchNorm
statistics are set from the calibration images (``zoo.vision.calibrate_batchnorm``) as a trained
network would have them.

``small=True`` builds for the tests' small inputs: pytorchcv's fixed 7x7 (Xception: 10x10) final
average pool becomes the adaptive pool it equals at full size.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Architecture:
    name: str  # the constructor's name
    family: str  # pytorchcv module, or "efficientnet_pytorch"
    size: int = 224  # input side for benchmarks
    small: int = 64  # input side for tests
    cnn: bool = True  # coverage target 95 % applies
    kwargs: tuple[tuple[str, object], ...] = ()


SWEEP: tuple[Architecture, ...] = (
    Architecture("resnet18", "resnet"),
    Architecture("resnext14_16x4d", "resnext"),
    Architecture("seresnet18", "seresnet"),
    Architecture("mobilenetv2_w1", "mobilenetv2"),
    Architecture("mobilenetv3_large_w1", "mobilenetv3"),
    Architecture("mobilenetv3_small_w1", "mobilenetv3"),
    Architecture("efficientnet_b0", "efficientnet"),
    Architecture("efficientnet-b0", "efficientnet_pytorch", kwargs=(("image_size", 224),)),
    Architecture("efficientnet-b0 (dynamic same padding)", "efficientnet_pytorch"),
    Architecture("efficientnet_edge_small_b", "efficientnetedge"),  # TF same padding, ReLU, no SE
    Architecture("mnasnet_b1", "mnasnet"),
    Architecture("fbnet_cb", "fbnet"),
    Architecture("proxylessnas_mobile", "proxylessnas"),
    Architecture("mixnet_s", "mixnet"),
    Architecture("regnetx002", "regnet"),
    Architecture("regnety002", "regnet"),
    Architecture("densenet121", "densenet"),
    Architecture("inceptionv3", "inceptionv3", size=299, small=139),
    Architecture("shufflenetv2_w1", "shufflenetv2"),
    Architecture("ghostnet", "ghostnet"),
    Architecture("squeezenet_v1_1", "squeezenet"),
    Architecture("vgg11", "vgg", small=224),
    Architecture("hrnet_w18_small_v1", "hrnet"),
    Architecture("cbam_resnet18", "cbamresnet"),
    Architecture("sknet50", "sknet"),
    Architecture("resnestabc14", "resnesta"),
    Architecture("darknet53", "darknet53"),
    Architecture("dla34", "dla"),
    Architecture("xception", "xception", size=299, small=96),
    Architecture("peleenet", "peleenet"),
    Architecture("hardnet39ds", "hardnet"),
    Architecture("vovnet27s", "vovnet"),
    Architecture("selecsls42b", "selecsls"),
)


def available() -> bool:
    """Whether the architecture packages are installed (the tests skip the sweep otherwise)."""
    try:
        importlib.import_module("pytorchcv.models.resnet")
        importlib.import_module("efficientnet_pytorch")
    except ImportError:
        return False
    return True


def build(arch: Architecture, small: bool = False, seed: int = 0) -> nn.Module:
    """The float model of ``arch`` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    if arch.family == "efficientnet_pytorch":
        from efficientnet_pytorch import EfficientNet

        kwargs = dict(arch.kwargs)
        if "image_size" in kwargs and small:
            kwargs["image_size"] = arch.small
        model = EfficientNet.from_name(arch.name.split(" ")[0], **kwargs)
    else:
        module = importlib.import_module(f"pytorchcv.models.{arch.family}")
        model = getattr(module, arch.name)(pretrained=False, **dict(arch.kwargs))
        if small:
            _adaptive_final_pool(model)
    return model.eval()


def _adaptive_final_pool(model: nn.Module) -> None:
    """Global average pools written as fixed 7x7 (10x10, 8x8) windows become adaptive ones."""
    for name, m in list(model.named_modules()):
        kernel = m.kernel_size if isinstance(m, nn.AvgPool2d) else 0
        side = min(kernel) if isinstance(kernel, tuple) else kernel
        if kernel and (name.endswith("final_pool") or side >= 7):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, nn.AdaptiveAvgPool2d(1))


def images(arch: Architecture, batch: int, small: bool = False, seed: int = 0) -> torch.Tensor:
    side = arch.small if small else arch.size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, side, side, generator=g)
