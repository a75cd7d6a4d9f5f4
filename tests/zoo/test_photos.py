"""quanta.zoo.photos: natural photos from installed wheels, deterministic crops."""

import pytest
import torch

from quanta.zoo.photos import IMAGENET_MEAN, IMAGENET_STD, load_photos, photo_crops, photo_paths


def test_photos_and_crops_are_real_and_deterministic():
    paths = photo_paths()
    assert len(paths) >= 12 and paths[-1].name == "grace_hopper.jpg"
    photos = load_photos()
    assert all(p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) >= 256 for p in photos)
    a, b = photo_crops(24, 64, seed=0), photo_crops(24, 64, seed=0)
    assert a.shape == (24, 3, 64, 64) and torch.equal(a, b)
    assert not torch.equal(a, photo_crops(24, 64, seed=1))
    # normalized natural images: roughly zero mean, unit spread, every crop different
    assert abs(float(a.mean())) < 0.6 and 0.6 < float(a.std()) < 1.6
    flat = a.reshape(24, -1)
    assert torch.cdist(flat, flat).add(torch.eye(24) * 1e9).min() > 1.0
    raw = a * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5
    with pytest.raises(ValueError, match="n >= 1"):
        photo_crops(0)
