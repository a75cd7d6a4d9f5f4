"""Throughput of one quantized model called from several Python threads (a server's worker pool)
against one caller using every core, batch 1, same process, same run.

    python benchmarks/bench_threads.py                 # ResNet-18, MobileNetV2, MNIST CNN, MiniLM dynamic
    python benchmarks/bench_threads.py --seconds 4 --models mnist_cnn

Rows per model (each a throughput in calls/s, median of ``--reps`` interleaved windows):
- ``1 caller x 2 threads``: one Python thread, ``torch.set_num_threads(2)`` (oneDNN's OpenMP team
  of 2 inside each op);
- ``2 callers x 1 thread``: two Python threads, each ``torch.set_num_threads(1)``, calling the
  same model object at once (quanta's native kernels run concurrently; the GIL is released inside
  them);
the same two rows for torch fp32 eager. Outputs of the threaded rows are checked bit-identical to
the single caller's. Writes results/threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_models import CASES, calibration  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2,mnist_cnn,minilm")
    p.add_argument("--seconds", type=float, default=1.5, help="length of one timed window")
    p.add_argument("--reps", type=int, default=5)
    return p.parse_args()


def _throughput(run, example: tuple, callers: int, threads_each: int, seconds: float) -> float:  # noqa: ANN001
    """Calls per second of ``callers`` Python threads running ``run(example)`` for ``seconds``."""
    counts, start, stop = [0] * callers, threading.Barrier(callers + 1), threading.Event()

    def worker(i: int) -> None:
        torch.set_num_threads(threads_each)
        with torch.no_grad():
            run(example)  # this thread's OpenMP team, warmed up
            start.wait()
            while not stop.is_set():
                run(example)
                counts[i] += 1

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(callers)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - t0)


def _check_threads_agree(run, example: tuple) -> bool:  # noqa: ANN001
    with torch.no_grad():
        want = run(example)
    got: list = [None, None]

    def worker(i: int) -> None:
        torch.set_num_threads(1)
        with torch.no_grad():
            for _ in range(5):
                got[i] = run(example)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return all(torch.equal(g, want) for g in got)


def main() -> None:
    args = _args()
    import quanta

    torch.manual_seed(0)
    results = []
    for key in args.models.split(","):
        case = CASES[key]
        model = case.build()
        example = case.inputs(1, 7)
        if case.is_transformer:
            q = quanta.quantize(model, mode="dynamic")
            label = "quanta dynamic int8"
        else:
            q = quanta.quantize(model, calibration(case), show_progress=False)
            label = "quanta static int8"
        runners = {"torch fp32 eager": lambda x, m=model: m(*x), label: lambda x, m=q: m(*x)}
        with torch.no_grad():
            q(*example)  # builds the graph runtime
        configs = {"1 caller x 2 threads": (1, 2), "2 callers x 1 thread": (2, 1)}
        samples: dict[tuple[str, str], list[float]] = {(r, c): [] for r in runners for c in configs}
        for _ in range(args.reps):
            for (row, cfg) in samples:
                callers, each = configs[cfg]
                samples[(row, cfg)].append(_throughput(runners[row], example, callers, each, args.seconds))
        torch.set_num_threads(2)
        agree = _check_threads_agree(runners[label], example)
        for (row, cfg), values in samples.items():
            results.append({"model": case.name, "row": row, "config": cfg,
                            "calls_per_s": round(statistics.median(values), 1),
                            "threads_bit_identical": agree if row == label else None})
        print(case.name, {f"{r} / {c}": round(statistics.median(v), 1) for (r, c), v in samples.items()},
              f"threaded outputs bit-identical: {agree}", flush=True)
    meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "seconds": args.seconds, "reps": args.reps, "batch": 1,
            "load_after": round(os.getloadavg()[0], 2)}
    from quanta.kernels import cpu

    meta["isa"] = cpu.isa_summary()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "threads.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
