"""Natural photographs that ship inside installed wheels, and deterministic crops of them.

Color and grayscale photos bundled with scikit-image (``skimage/data``: astronaut, cat, coffee,
rocket, motorcycle, Hubble deep field, retina, coins, moon, textures, ...) and matplotlib's
``grace_hopper.jpg``. Files are read from the installed packages (neither package is imported,
nothing is downloaded). Random crops and horizontal flips of them, resized to a square and
normalized, give as many natural-image inputs as a vision model's agreement test needs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# photographs (not drawings, charts or binary masks) in skimage/data
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "camera.png", "coins.png",
                  "moon.png", "brick.png", "grass.png", "gravel.png", "immunohistochemistry.png", "ihc.png")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"quanta.zoo.photos reads the sample photos shipped with {name}: "
                          f"pip install {'scikit-image' if name == 'skimage' else name}")
    return Path(list(spec.submodule_search_locations)[0])


def photo_paths() -> list[Path]:
    """Paths of the bundled photographs, in a fixed order."""
    data = _package_dir("skimage") / "data"
    paths = [data / name for name in SKIMAGE_PHOTOS if (data / name).is_file()]
    paths.append(_package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample photo not found: {missing[0]}")
    return paths


def load_photos() -> list[np.ndarray]:
    """Every bundled photo as an RGB uint8 array [H, W, 3]."""
    from PIL import Image

    out = []
    for path in photo_paths():
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def photo_crops(n: int, size: int = 224, seed: int = 0, min_scale: float = 0.35,
                mean: tuple[float, ...] = IMAGENET_MEAN,
                std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """``n`` normalized crops [n, 3, size, size]: photo ``i % photos``, a random square of
    ``min_scale``..1 of its shorter side at a random place, flipped half the time (seeded)."""
    from PIL import Image

    if n < 1 or size < 8:
        raise ValueError(f"photo_crops needs n >= 1 and size >= 8, got n={n}, size={size}")
    photos = load_photos()
    gen = torch.Generator().manual_seed(seed)
    batch = torch.empty(n, 3, size, size)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        r = torch.rand(4, generator=gen).tolist()
        side = max(8, int(min(h, w) * (min_scale + (1 - min_scale) * r[0])))
        top, left = int((h - side) * r[1]), int((w - side) * r[2])
        crop = Image.fromarray(img[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float() / 255.0
        batch[i] = t.flip(-1) if r[3] < 0.5 else t
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
