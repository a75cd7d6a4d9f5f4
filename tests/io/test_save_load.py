"""quanta.save / quanta.load: round trips in a fresh process, file sizes, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import quanta
from quanta.io import atomic
from quanta.zoo.mnist import MnistCNN, load_mnist, load_pretrained_mnist_cnn
from tests.io.file_edit import rewrite


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist("test")


@pytest.fixture(scope="module")
def static_file(tmp_path_factory: pytest.TempPathFactory, mnist) -> tuple[Path, torch.nn.Module]:
    x, _ = mnist
    q = quanta.quantize(load_pretrained_mnist_cnn(), [x[i:i + 100] for i in range(0, 300, 100)],
                        show_progress=False)
    path = tmp_path_factory.mktemp("static") / "mnist.quanta.safetensors"
    quanta.save(q, path)
    return path, q


def _qat_model(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    prepared = quanta.prepare_qat(load_pretrained_mnist_cnn(), x[:8])
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    for i in range(3):
        loss = torch.nn.functional.cross_entropy(prepared(x[i * 64:(i + 1) * 64]), y[i * 64:(i + 1) * 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return quanta.convert(prepared.eval())


_CHILD = """
import sys, torch, safetensors.torch, quanta
from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn
x, _ = load_mnist("test")
outs = {}
for name in sys.argv[2:]:
    model = quanta.load(f"{sys.argv[1]}/{name}.quanta.safetensors", load_pretrained_mnist_cnn())
    with torch.no_grad():
        outs[name] = model(x[:500]).contiguous()
safetensors.torch.save_file(outs, f"{sys.argv[1]}/outputs.safetensors")
"""


def test_round_trip_in_fresh_process_is_bit_identical(tmp_path: Path, static_file, mnist) -> None:
    x, y = mnist
    _, static = static_file
    models = {"static": static, "dynamic": quanta.quantize_dynamic(load_pretrained_mnist_cnn()),
              "qat": _qat_model(*load_mnist("train"))}
    expected = {}
    for name, model in models.items():
        quanta.save(model, tmp_path / f"{name}.quanta.safetensors")
        with torch.no_grad():
            expected[name] = model(x[:500])
    subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), *models], check=True, timeout=300,
                   cwd=Path(__file__).parents[2])
    got = safetensors.torch.load_file(str(tmp_path / "outputs.safetensors"))
    for name in models:
        assert torch.equal(got[name], expected[name]), name
    accuracy = (got["static"].argmax(1) == y[:500]).float().mean().item()
    assert accuracy > 0.95


def _float_size(model: torch.nn.Module, path: Path) -> int:
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def test_mnist_file_is_at_most_27_percent_of_float(tmp_path: Path, static_file) -> None:
    path, _ = static_file
    ratio = path.stat().st_size / _float_size(load_pretrained_mnist_cnn(), tmp_path / "f.safetensors")
    assert ratio <= 0.27


@pytest.mark.slow
def test_resnet18_file_is_at_most_27_percent_of_float(tmp_path: Path) -> None:
    from quanta.zoo.vision import resnet18

    model = resnet18().eval()
    torch.manual_seed(0)
    q = quanta.quantize(model, [torch.randn(2, 3, 64, 64)], show_progress=False)
    quanta.save(q, tmp_path / "r18.quanta.safetensors")
    ratio = (tmp_path / "r18.quanta.safetensors").stat().st_size / _float_size(model, tmp_path / "f.st")
    assert ratio <= 0.27
    loaded = quanta.load(tmp_path / "r18.quanta.safetensors", resnet18())
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), q(x))


@pytest.mark.slow
def test_minilm_dynamic_file_is_at_most_27_percent_of_float(tmp_path: Path) -> None:
    from quanta.zoo.minilm import load_minilm

    model, _ = load_minilm()
    q = quanta.quantize_dynamic(model)
    quanta.save(q, tmp_path / "minilm.quanta.safetensors")
    ratio = (tmp_path / "minilm.quanta.safetensors").stat().st_size / _float_size(model, tmp_path / "f.st")
    assert ratio <= 0.27


def test_not_a_quanta_file(tmp_path: Path) -> None:
    _float_size(load_pretrained_mnist_cnn(), tmp_path / "float.safetensors")
    with pytest.raises(quanta.FormatError, match="not a quanta file"):
        quanta.load(tmp_path / "float.safetensors", MnistCNN())
    (tmp_path / "junk.bin").write_bytes(b"hello world, not safetensors at all")
    with pytest.raises(quanta.FormatError, match="not a safetensors file"):
        quanta.load(tmp_path / "junk.bin", MnistCNN())


def test_truncated_and_corrupted_files(tmp_path: Path, static_file) -> None:
    path, _ = static_file
    data = path.read_bytes()
    (tmp_path / "cut.st").write_bytes(data[: len(data) - 100])
    with pytest.raises(quanta.FormatError, match="truncated"):
        quanta.load(tmp_path / "cut.st", MnistCNN())
    flipped = bytearray(data)
    flipped[-10] ^= 0x40
    (tmp_path / "flip.st").write_bytes(bytes(flipped))
    with pytest.raises(quanta.FormatError, match="checksum"):
        quanta.load(tmp_path / "flip.st", MnistCNN())


def test_newer_format_version(tmp_path: Path, static_file) -> None:
    path, _ = static_file
    newer = rewrite(path, tmp_path / "v2.st", edit_meta=lambda m: m.update(format_version="2"))
    with pytest.raises(quanta.FormatError, match="format version 2, newer"):
        quanta.load(newer, MnistCNN())


def test_architecture_mismatch_names_the_first_module(static_file) -> None:
    from quanta.zoo.vision import resnet18

    path, _ = static_file
    with pytest.raises(quanta.FormatError, match="'maxpool'"):
        quanta.load(path, resnet18(num_classes=10))
    with pytest.raises(quanta.FormatError, match=r"classifier\.weight.*\[10, 64\].*\[5, 64\]"):
        quanta.load(path, MnistCNN(num_classes=5))


def test_missing_and_extra_tensors(tmp_path: Path, static_file) -> None:
    path, _ = static_file

    def drop(manifest: dict) -> None:
        manifest["tensors"].pop("_quanta.sites.block1:add#0.output_zero_point")

    def add(manifest: dict) -> None:
        manifest["tensors"]["extra.zero"] = ["int32", [3], None]

    with pytest.raises(quanta.FormatError, match="missing 1 tensor"):
        quanta.load(rewrite(path, tmp_path / "drop.st", drop), MnistCNN())
    with pytest.raises(quanta.FormatError, match="extra.zero"):
        quanta.load(rewrite(path, tmp_path / "add.st", add), MnistCNN())


def test_wrong_dtype_in_manifest(tmp_path: Path, static_file) -> None:
    path, _ = static_file

    def retype(manifest: dict) -> None:
        manifest["tensors"]["block1.conv1.weight_zero_point"][0] = "int8"

    with pytest.raises(quanta.FormatError, match="block1.conv1.weight_zero_point.*int8.*int32"):
        quanta.load(rewrite(path, tmp_path / "dtype.st", retype), MnistCNN())


def test_interrupted_save_keeps_the_old_file(tmp_path: Path, static_file, monkeypatch) -> None:
    path, q = static_file
    target = tmp_path / "model.quanta.safetensors"
    quanta.save(q, target)
    before = target.read_bytes()

    def fail_midway(fd: int, data: bytes) -> None:
        os.write(fd, memoryview(data)[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(atomic, "_write_all", fail_midway)
    with pytest.raises(OSError, match="simulated"):
        quanta.save(q, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    x, _ = load_mnist("test")
    assert torch.equal(quanta.load(target, load_pretrained_mnist_cnn())(x[:50]), q(x[:50]))


def test_save_rejects_unconverted_models(tmp_path: Path, mnist) -> None:
    x, _ = mnist
    prepared = quanta.prepare(load_pretrained_mnist_cnn(), x[:4])
    with pytest.raises(quanta.UnsupportedModelError, match="convert"):
        quanta.save(prepared, tmp_path / "p.st")
    with pytest.raises(quanta.UnsupportedModelError):
        quanta.save(load_pretrained_mnist_cnn(), tmp_path / "f.st")


def test_save_into_a_missing_folder_or_onto_a_folder_names_the_target(tmp_path: Path, static_file) -> None:
    _, q = static_file
    target = tmp_path / "no" / "such" / "model.quanta.safetensors"
    with pytest.raises(FileNotFoundError, match=r"cannot write .*safetensors: the folder .*such"):
        quanta.save(q, target)
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        quanta.save(q, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written, no temporary left


def test_state_classes_stay_where_older_pickles_name_them() -> None:
    """Models torch.save'd before ``modules/state.py`` existed name ``quanta.modules.sites``."""
    from quanta.modules import sites, state

    assert sites.QuantaState is state.QuantaState and sites._EagerCall is state._EagerCall
