"""Where the time goes: quanta static int8 against OpenVINO int8 (NNCF), per op kind, one model at
a time, batch 1 (issue 17, item 1).

    python benchmarks/profile_layers.py                          # the five CNNs of issue 17
    python benchmarks/profile_layers.py --models mobilenetv2_w1 --batch 8

quanta side: wall time per forward (median), and oneDNN's own execution time per primitive
(``ONEDNN_VERBOSE=profile_exec``, read in a child process), summed per kind (dense conv,
depthwise conv, matmul, other); the rest of the wall time is quanta's glue: Python per op,
native elementwise kernels (residual add, Hardswish/Swish/Sigmoid, SE scale) and torch ops.
OpenVINO side: its per-node profile (``PERF_COUNT``), summed per node type and execution type
(which kernel ran), and its wall time per request. Random pytorchcv weights, BatchNorm set
from the calibration images (as in bench_sweep.py), 2 threads, glibc's allocator tuned as in
run_all.py (no page-fault churn on large outputs). Writes results/profile_b<batch>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"
if os.environ.get("GLIBC_TUNABLES") != _TUNABLES:  # same allocator settings as run_all.py
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": _TUNABLES})

HERE = os.path.dirname(os.path.abspath(__file__))
_BLOCK = 5  # timed calls per runtime in a row (head_to_head)
MODELS = "resnet18,mobilenetv2_w1,mobilenetv3_large_w1,mnasnet_b1,efficientnet_b0"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=MODELS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: quanta side, one model
    return p.parse_args()


def _setup(name: str, batch: int) -> tuple:
    import torch

    from quanta.zoo import architectures as arches
    from quanta.zoo.vision import calibrate_batchnorm

    torch.set_num_threads(2)
    arch = next(a for a in arches.SWEEP if a.name == name)
    model = arches.build(arch)
    calib = [(arches.images(arch, 4, seed=s),) for s in range(4)]
    calibrate_batchnorm(model, [c[0] for c in calib])
    return model, calib, (arches.images(arch, batch, seed=99),)


def _quanta_child(name: str, batch: int, reps: int) -> None:
    """Runs with ONEDNN_VERBOSE=profile_exec: prints a marker line before each timed forward."""
    import torch

    import quanta

    model, calib, x = _setup(name, batch)
    q = quanta.quantize(model, calib, show_progress=False)
    with torch.no_grad():
        for _ in range(3):
            q(*x)
        for _ in range(reps):
            print("PROFILE_FORWARD", flush=True)
            q(*x)
        print("PROFILE_END", flush=True)
    print("PROFILE_STATUS", quanta.runtime_status(q), flush=True)


def _kind(line: str) -> str:
    parts = line.split(",")
    prim, shape = parts[5], parts[-2]
    if prim == "convolution":
        # depthwise: groups = channels (oneDNN writes g<N> in the shape)
        return "depthwise conv" if shape.startswith("g") or "_g" in shape else "conv"
    return prim


def quanta_profile(name: str, batch: int, reps: int) -> dict:
    env = {**os.environ, "ONEDNN_VERBOSE": "profile_exec"}
    cmd = [sys.executable, __file__, "--child", name, "--batch", str(batch), "--reps", str(reps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    per_forward: list[collections.Counter] = []
    for line in out:
        if line.startswith("PROFILE_FORWARD"):
            per_forward.append(collections.Counter())
        elif line.startswith("PROFILE_END"):
            break
        elif line.startswith("onednn_verbose") and ",exec," in line and per_forward:
            per_forward[-1][_kind(line)] += float(line.rsplit(",", 1)[1])
    kinds = sorted({k for c in per_forward for k in c})
    status = next((line.split(" ", 1)[1] for line in out if line.startswith("PROFILE_STATUS")), "")
    return {"onednn_ms": {k: round(statistics.median(c[k] for c in per_forward), 3) for k in kinds},
            "runtime": status}


def openvino_int8(model: Any, calib: list, x: tuple, profile: bool) -> Any:
    """An NNCF-quantized OpenVINO infer request, per-node profiling on or off."""
    import nncf
    import openvino as ov

    sys.path.insert(0, HERE)
    from bench_openvino import _convert

    ov_model = _convert(model, x)
    data = nncf.Dataset(calib, lambda b: [t.numpy() for t in b])
    int8 = nncf.quantize(ov_model, data, subset_size=len(calib))
    config = {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": profile}
    return ov.Core().compile_model(int8, "CPU", config).create_infer_request()


def head_to_head(model: Any, calib: list, x: tuple, reps: int) -> dict[str, float]:
    """Median wall ms of torch fp32, quanta int8 and OpenVINO int8 (NNCF, profiling off), run in
    alternating blocks of _BLOCK timed calls (each after one untimed call that warms the caches the
    other runtimes evicted), so the machine's drift hits all three alike. quanta gets a new input
    tensor each call, as in use (one equal tensor every call would let it reuse the quantized
    stem input, which a sibling-layer cache keys on tensor identity)."""
    import torch

    import quanta

    q = quanta.quantize(model, calib, show_progress=False)
    request = openvino_int8(model, calib, x, profile=False)
    inputs = [t.numpy() for t in x]
    fresh = [tuple(t.clone() for t in x) for _ in range(reps)]
    times: dict[str, list[float]] = {"fp32": [], "quanta": [], "openvino": []}
    with torch.no_grad():
        for _ in range(3):
            q(*x), model(*x), request.infer(inputs)
        calls = {"quanta": (q, fresh), "openvino": (request.infer, [(inputs,)] * reps),
                 "fp32": (model, [x] * reps)}
        for block in range(0, reps, _BLOCK):
            for key, (run, args) in calls.items():
                for i in range(block - 1, min(block + _BLOCK, reps)):  # the first call warms up
                    t0 = time.perf_counter()
                    run(*args[max(i, 0)])
                    if i >= block:
                        times[key].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}


def openvino_profile(model: Any, calib: list, x: tuple, reps: int) -> dict:
    request = openvino_int8(model, calib, x, profile=True)
    inputs = [t.numpy() for t in x]
    for _ in range(3):
        request.infer(inputs)
    by_type: list[collections.Counter] = []
    kernels: set[str] = set()
    for _ in range(reps):
        request.infer(inputs)
        c: collections.Counter = collections.Counter()
        for info in request.get_profiling_info():
            us = info.real_time.total_seconds() * 1e6
            if us > 0:
                c[info.node_type] += us / 1e3
                if info.node_type == "Convolution":
                    kernels.add(info.exec_type)
        by_type.append(c)
    types = sorted({k for c in by_type for k in c})
    return {"node_ms": {k: round(statistics.median(c[k] for c in by_type), 3) for k in types},
            "kernels": sorted(kernels)}


def main() -> None:
    args = _args()
    if args.child:
        return _quanta_child(args.child, args.batch, args.reps)
    from quanta.kernels.cpu import isa_summary, model_name

    results = []
    for name in args.models.split(","):
        model, calib, x = _setup(name, args.batch)  # the child process builds the same seeded model
        walls = head_to_head(model, calib, x, args.reps)
        prof = quanta_profile(name, args.batch, args.reps)
        ov = openvino_profile(model, calib, x, args.reps)
        onednn = sum(prof["onednn_ms"].values())
        row = {"model": name, "batch": args.batch, "torch_fp32_ms": walls["fp32"],
               "quanta": {"wall_ms": walls["quanta"], **prof, "glue_ms": round(walls["quanta"] - onednn, 3)},
               "openvino_int8": {"wall_ms": walls["openvino"], **ov},
               "quanta_over_openvino": round(walls["quanta"] / walls["openvino"], 3)}
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    import torch

    path = os.path.join(HERE, "results", f"profile_b{args.batch}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"cpu": model_name(), "isa": isa_summary(), "machine": platform.machine(),
                   "torch": torch.__version__, "threads": 2, "results": results}, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
