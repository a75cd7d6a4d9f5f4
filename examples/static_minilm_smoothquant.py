"""Static int8 of the real all-MiniLM-L6-v2 sentence encoder, plain and with SmoothQuant.

Every Linear runs int8 in both; SmoothQuant moves each Linear's input outliers into its weights
before calibration (alpha chosen per layer). Calibrates on 64 sentences, measures the embedding
cosine to float on the other 136.

Run: python examples/static_minilm_smoothquant.py
"""

import torch

import quanta
from quanta.ptq import corrections_of
from quanta.zoo.minilm import embed, load_minilm, load_polarity_sentences, tokenize


def main() -> None:
    torch.set_num_threads(2)
    model, tokenizer = load_minilm()
    sentences, _ = load_polarity_sentences()
    calibration, held_out = sentences[:64], sentences[64:]
    batches = [tokenize(tokenizer, calibration[i:i + 8]) for i in range(0, len(calibration), 8)]
    reference = embed(model, tokenizer, held_out)
    configs = {"plain": quanta.QuantConfig(), "smoothquant": quanta.QuantConfig(smoothquant=True)}
    for name, config in configs.items():
        qmodel = quanta.quantize(model, batches, config=config)
        rows = quanta.report(qmodel).to_dict()["layers"]
        int8 = sum(r["op"] == "Linear" and r["precision"] == "int8" for r in rows)
        cos = (reference * embed(qmodel, tokenizer, held_out)).sum(1)
        print(f"{name}: {int8} of 36 Linear layers int8; cosine to float over {len(held_out)} held-out "
              f"sentences: min {cos.min():.4f}, mean {cos.mean():.4f}")
        if corrections_of(qmodel) is not None:
            print(corrections_of(qmodel).summary())


if __name__ == "__main__":
    main()
