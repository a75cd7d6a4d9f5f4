"""Issue 14 probe: how far per-layer AdaRound's held-out figures trail its own calibration crops.

    python benchmarks/probe_calibration_size.py --calib 256    # 2 h here in session 28 (1 thread, shared)
    python benchmarks/probe_calibration_size.py --calib 1024   # more crops, same 2,048 rows

EfficientNet-Lite1, static int8 with 8-bit activations and ``--bits`` weights, calibrated on
``--calib`` crops of seed 1, then ``quanta.ptq.adaround`` (what the ``adaround`` flag runs) with a
fixed ``--iterations`` per layer and ``--rows`` sampled output rows per layer. Logit SQNR and top-1
agreement against float on two held-out sets (256 crops of seed 0, 768 of seed 2) and on the
first 256 calibration crops, before and after AdaRound. Appends one JSON line to ``--out``.

``--then learn_ranges:STEPS`` and ``--then bias_correction`` (repeatable) score each follow-up
correction on a copy of the AdaRound model. ``--save PATH`` writes the AdaRound model
(``quanta.save``); ``--load PATH`` reads it back instead of running AdaRound again.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import time

import torch

import quanta
from quanta.debug.sqnr import sqnr
from quanta.ptq.adaround import adaround
from quanta.ptq.bias_correction import correct_bias
from quanta.ptq.range_learning import learn_ranges
from quanta.zoo.efficientnet_lite import load_efficientnet_lite1, photo_inputs

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--calib", type=int, default=256, help="calibration crops (seed 1)")
parser.add_argument("--rows", type=int, default=2048, help="sampled output rows per layer")
parser.add_argument("--iterations", type=int, default=800, help="AdaRound iterations per layer")
parser.add_argument("--bits", type=int, default=8, help="weight bits")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--then", action="append", default=[],
                    help="follow-up after AdaRound: learn_ranges:STEPS or bias_correction")
parser.add_argument("--save", help="write the AdaRound model here")
parser.add_argument("--load", help="read the AdaRound model from here instead of running AdaRound")
parser.add_argument("--out", default="calibration_size.jsonl", help="JSON lines appended here")
args = parser.parse_args()
torch.set_num_threads(args.threads)
model = load_efficientnet_lite1()
calib = list(torch.split(photo_inputs(args.calib, seed=1), 16))
sets = {"seed0_256": photo_inputs(256, seed=0), "seed2_768": photo_inputs(768, seed=2),
        "calibration_first_256": torch.cat(calib)[:256]}


def logits(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([m(b) for b in torch.split(x, 32)])


references = {name: logits(model, x) for name, x in sets.items()}  # float: once, for both scores


def score(qmodel: torch.nn.Module) -> dict:
    """Logit SQNR (dB) and top-1 agreement against float on each set."""
    scores = {}
    for name, x in sets.items():
        ref, out = references[name], logits(qmodel, x)
        agreement = float((out.argmax(1) == ref.argmax(1)).float().mean())
        scores[name] = (round(sqnr(ref, out), 2), round(agreement, 4))
    return scores


base = quanta.QuantConfig()
config = dataclasses.replace(base, weight=dataclasses.replace(base.weight, bits=args.bits))
qmodel = quanta.quantize(model, calib, config=config)
plain = score(qmodel)
print("round to nearest", plain, flush=True)
start = time.time()
if args.load:
    qmodel = quanta.load(args.load, model)
else:
    adaround(model, qmodel, calib, iterations=args.iterations, rows=args.rows)
    if args.save:
        quanta.save(qmodel, args.save)
seconds = round(time.time() - start)  # AdaRound (or loading it), not the scoring below
record = dict(vars(args), plain=plain, adaround_seconds=seconds, adaround=score(qmodel),
              int8_mac_share=quanta.report(qmodel).coverage.to_dict()["share"])
print(json.dumps(record), flush=True)
for follow_up in args.then:
    name, _, steps = follow_up.partition(":")
    start = time.time()
    if name == "learn_ranges":
        followed, _ = learn_ranges(model, copy.deepcopy(qmodel), calib, seconds=0.0, steps=int(steps))
    elif name == "bias_correction":
        followed = copy.deepcopy(qmodel)
        correct_bias(model, followed, calib)
    else:
        raise SystemExit(f"--then {follow_up!r}: expected learn_ranges:STEPS or bias_correction")
    record[follow_up] = dict(score(followed), seconds=round(time.time() - start),
                             int8_mac_share=quanta.report(followed).coverage.to_dict()["share"])
    print(follow_up, record[follow_up], flush=True)
record["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
with open(args.out, "a") as f:
    f.write(json.dumps(record) + "\n")
