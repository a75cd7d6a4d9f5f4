"""Fuzzing quanta.load: mutated files either load correctly or raise FormatError.

Byte-level mutations (flips, truncation, insertion in header and data) must never load a
model that differs from the saved one (checksums catch data corruption). Crafted manifests
(fields deleted, changed, type-swapped, then re-encoded) must load or raise FormatError; a
model that loads must run or fail with a quanta error, never anything else.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quanta
from quanta.io import format as fmt
from tests.io.file_edit import read_parts

BYTE_CASES = 2000
MANIFEST_CASES = 1000


class TinyNet(nn.Module):
    """Conv+BN+ReLU, a residual add, pooling and a Linear: every kind of saved entry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyNet().eval()
    q = quanta.quantize(model, [torch.randn(4, 3, 8, 8) for _ in range(2)], show_progress=False)
    path = tmp_path_factory.mktemp("fuzz") / "tiny.quanta.safetensors"
    quanta.save(q, path)
    x = torch.randn(2, 3, 8, 8)
    return path, x, q(x)


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    header_end = 8 + int.from_bytes(data[:8], "little")
    region = (0, header_end) if rng.random() < 0.6 else (header_end, len(data))
    pos = rng.randrange(*region)
    kind = rng.choice(["flip", "truncate", "insert", "delete", "length"])
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(*region)] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del buf[pos:]
    elif kind == "insert":
        buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "delete":
        del buf[pos:pos + rng.randint(1, 16)]
    else:
        buf[:8] = rng.randrange(2**64).to_bytes(8, "little")
    return bytes(buf)


def _odd_value(rng: random.Random) -> Any:
    return rng.choice([None, True, False, 0, -1, 7, 2**63, 1e308, -0.5, float("nan"), "", "relu",
                       "x" * 50, [], [1, 2], {}, {"a": 1}, [["int8", [1], 0]]])


def _mutate_manifest(manifest: dict, rng: random.Random) -> None:
    """Delete, replace or type-swap one field somewhere in the manifest tree."""
    node: Any = manifest
    for _ in range(rng.randint(0, 4)):
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        children = [(k, v) for k, v in children if isinstance(v, (dict, list)) and v]
        if not children:
            break
        node = rng.choice(children)[1]
    keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
    if not keys:
        return
    key = rng.choice(keys)
    if isinstance(node, dict) and rng.random() < 0.3:
        del node[key]
    elif isinstance(node[key], (int, float)) and not isinstance(node[key], bool) and rng.random() < 0.5:
        node[key] = node[key] + rng.choice([1, -1, 1000, 0.5])
    else:
        node[key] = _odd_value(rng)


def _run(model: nn.Module, x: torch.Tensor) -> None:
    try:
        model(x)
    except quanta.QuantaError:
        pass


def _try_load(target: Path, outcomes: dict[str, int]) -> nn.Module | None:
    """Load a mutated file, counting the outcome: the model, or None on FormatError (anything
    else escapes and fails the test)."""
    try:
        model = quanta.load(target, TinyNet())
    except quanta.FormatError:
        outcomes["FormatError"] += 1
        return None
    outcomes["loaded"] += 1
    return model


def test_byte_mutations_load_correctly_or_raise_format_error(tmp_path: Path, saved) -> None:
    path, x, expected = saved
    data = path.read_bytes()
    rng = random.Random(1234)
    target = tmp_path / "mutated.st"
    outcomes = {"loaded": 0, "FormatError": 0}
    slowest = 0.0
    for _ in range(BYTE_CASES):
        target.write_bytes(_mutate_bytes(data, rng))
        start = time.perf_counter()
        model = _try_load(target, outcomes)
        if model is not None:
            assert torch.equal(model(x), expected)
        slowest = max(slowest, time.perf_counter() - start)
    print("byte mutations:", outcomes)
    assert outcomes["FormatError"] > BYTE_CASES * 0.9
    assert slowest < 5.0


def test_manifest_mutations_load_or_raise_format_error(tmp_path: Path, saved) -> None:
    path, x, _ = saved
    meta, blobs = read_parts(path)
    manifest = fmt.decode_manifest(meta["manifest"])
    rng = random.Random(99)
    target = tmp_path / "crafted.st"
    outcomes = {"loaded": 0, "FormatError": 0}
    for _ in range(MANIFEST_CASES):
        crafted = copy.deepcopy(manifest)
        for _ in range(rng.randint(1, 3)):
            _mutate_manifest(crafted, rng)
        try:
            text = fmt.encode_manifest(crafted)
        except ValueError:  # NaN is not valid JSON: put it in as raw text instead
            import json
            text = fmt.encode_manifest({}) if rng.random() < 0.5 else _raw(json.dumps(crafted))
        target.write_bytes(_save(blobs, {**meta, "manifest": text}))
        model = _try_load(target, outcomes)
        if model is not None:
            _run(model, x)
    print("manifest mutations:", outcomes)
    assert outcomes["FormatError"] > 0 and outcomes["loaded"] > 0


def _raw(text: str) -> str:
    import base64
    import zlib

    return base64.b64encode(zlib.compress(text.encode())).decode()


def _save(blobs: dict, meta: dict) -> bytes:
    import safetensors.torch

    return safetensors.torch.save(blobs, metadata=meta)
