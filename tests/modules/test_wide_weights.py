"""Models with full 8-bit weights (what a VNNI CPU makes by default) on every CPU: on one whose
int8 kernels add u8 x s8 exactly only for |w| <= 64 (AVX2 without VNNI) the wide layers take the
exact float fallback; everywhere the model stays within 1 dB SQNR of quanta's integer reference,
also after a save and a load. Run natively and under ``scripts/as-avx2`` (see .ci/run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quanta
from quanta.config import QuantConfig, QuantSpec
from quanta.debug.sqnr import sqnr
from quanta.kernels import cpu
from quanta.zoo import audio
from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn

pytestmark = pytest.mark.isa
EIGHT_BIT = QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=8)
NARROW = cpu.exact_weight_limit() == cpu.NARROW_LIMIT  # this CPU saturates full-range weights


def _backends(model: torch.nn.Module) -> dict[str, str]:
    return {r["name"]: r["backend"] for r in quanta.report(model).to_dict()["layers"]
            if r["precision"] == "int8" and r["kind"] == "module"}


def _check(model: torch.nn.Module, reference: torch.nn.Module, float_model: torch.nn.Module,
           inputs: torch.Tensor, run=lambda m, x: m(x)) -> tuple[float, float]:  # noqa: ANN001
    with torch.no_grad():
        want = run(float_model, inputs)
        got, ref = run(model, inputs), run(reference, inputs)
    fast, exact = sqnr(want, got), sqnr(want, ref)
    print(f"SQNR vs float: this CPU {fast:.2f} dB, integer reference {exact:.2f} dB ({cpu.isa_summary()})")
    assert fast >= exact - 1.0, (fast, exact)
    return fast, exact


def test_static_eight_bit_model_and_its_file(tmp_path: Path) -> None:
    train, _ = load_mnist("train")
    x, _ = load_mnist("test")
    float_model = load_pretrained_mnist_cnn()
    calib = [train[:16]]  # small: fp32 convs (the exact fallback) are ~1000x slower under QEMU
    q = quanta.quantize(float_model, calib, config=QuantConfig(weight=EIGHT_BIT), show_progress=False)
    ref = quanta.quantize(float_model, calib, config=QuantConfig(weight=EIGHT_BIT, backend="reference"),
                          show_progress=False)
    layers = [m for m in q.modules() if hasattr(m, "weight_scale")]
    assert layers and all(cpu.weight_magnitude(m.weight) > cpu.NARROW_LIMIT for m in layers)
    backends = _backends(q)
    assert set(backends.values()) == ({"float"} if NARROW else {"onednn"}), backends
    _check(q, ref, float_model, x[:16])
    path = quanta.save(q, tmp_path / "mnist8.quanta.safetensors")
    loaded = quanta.load(path, float_model)
    assert _backends(loaded) == backends
    _check(loaded, ref, float_model, x[:16])
    with torch.no_grad():
        assert torch.equal(loaded(x[:8]), q(x[:8]))


def test_dynamic_eight_bit_model_and_its_file(tmp_path: Path) -> None:
    pytest.importorskip("silero_vad")
    wav = audio.load_speech()[:16000]  # one second of real speech (fp32 convs are slow under QEMU)
    float_model = audio.load_silero_vad()
    q = quanta.quantize(float_model, mode="dynamic", config=QuantConfig(mode="dynamic", weight=EIGHT_BIT))
    ref = quanta.quantize(float_model, mode="dynamic",
                          config=QuantConfig(mode="dynamic", weight=EIGHT_BIT, backend="reference"))
    assert _backends(q) == {"rnn": "float" if NARROW else "onednn"}
    (row,) = [r for r in quanta.report(q).to_dict()["layers"] if r["name"] == "rnn"]
    assert ("exact float fallback" in row["reason"]) == NARROW, row["reason"]
    _check(q, ref, float_model, wav, run=audio.speech_probs)
    path = quanta.save(q, tmp_path / "vad8.quanta.safetensors")
    loaded = quanta.load(path, float_model)
    assert _backends(loaded) == _backends(q)
    _check(loaded, ref, float_model, wav, run=audio.speech_probs)
