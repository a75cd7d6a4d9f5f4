"""Dynamic int8 quantization of the real all-MiniLM-L6-v2 sentence encoder.

Run: python examples/dynamic_minilm.py
"""

import torch

import quanta
from quanta.zoo.minilm import embed, load_minilm, load_polarity_sentences


def main() -> None:
    torch.set_num_threads(2)
    model, tokenizer = load_minilm()
    sentences, _ = load_polarity_sentences()
    qmodel = quanta.quantize(model, mode="dynamic", config=quanta.QuantConfig(mode="dynamic",
                                                                              dynamic_per_row=True))
    summary = quanta.report(qmodel).to_dict()["summary"]
    print(f"int8 layers: {summary['int8']}, float layers: {summary['float']}")
    cos = (embed(model, tokenizer, sentences) * embed(qmodel, tokenizer, sentences)).sum(1)
    print(f"cosine(float, int8) over {len(sentences)} sentences: min {cos.min():.4f}, mean {cos.mean():.4f}")


if __name__ == "__main__":
    main()
