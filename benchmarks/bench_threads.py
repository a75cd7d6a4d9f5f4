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

Each (model, configuration) runs in a fresh process, int8 and fp32 windows interleaved: with
OpenMP's default spin-waiting, the idle pool of one calling thread spins against another
thread's pool in the same process (measured: ResNet-18 fp32 from a second thread 41 vs 31 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
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
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p.parse_args()


def _throughput(run, example: tuple, callers: int, threads_each: int, seconds: float) -> float:  # noqa: ANN001
    """Calls per second of ``callers`` Python threads running ``run(example)`` for ``seconds``
    (one caller runs in this, the main, thread)."""
    if callers == 1:
        torch.set_num_threads(threads_each)
        calls, t0 = 0, time.perf_counter()
        with torch.no_grad():
            run(example)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                run(example)
                calls += 1
        return calls / (time.perf_counter() - t0)
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


def _measure(key: str, cfg: str, seconds: float, reps: int) -> dict:
    """One process: build the rows of ``key`` and time them in configuration ``cfg``."""
    import quanta

    torch.manual_seed(0)
    case = CASES[key]
    model = case.build()
    example = case.inputs(1, 7)
    if case.is_transformer:
        q, label = quanta.quantize(model, mode="dynamic"), "quanta dynamic int8"
    else:
        q, label = quanta.quantize(model, calibration(case), show_progress=False), "quanta static int8"
    runners = {"torch fp32 eager": lambda x, m=model: m(*x), label: lambda x, m=q: m(*x)}
    with torch.no_grad():
        q(*example)  # builds the graph runtime
    callers, each = CONFIGS[cfg]
    samples: dict[str, list[float]] = {r: [] for r in runners}
    for _ in range(reps):
        for row, run in runners.items():
            samples[row].append(_throughput(run, example, callers, each, seconds))
    torch.set_num_threads(2)
    return {"model": case.name, "config": cfg, "label": label,
            "calls_per_s": {r: round(statistics.median(v), 1) for r, v in samples.items()},
            "threads_bit_identical": _check_threads_agree(runners[label], example),
            "runtime": quanta.runtime_status(q)}


CONFIGS = {"1 caller x 2 threads": (1, 2), "2 callers x 1 thread": (2, 1)}


def main() -> None:
    args = _args()
    if args.child:
        key, cfg = args.child.split("|")
        print(json.dumps(_measure(key, cfg, args.seconds, args.reps)))
        return
    results = []
    for key in args.models.split(","):
        for cfg in CONFIGS:
            done = subprocess.run([sys.executable, __file__, "--child", f"{key}|{cfg}", "--seconds",
                                   str(args.seconds), "--reps", str(args.reps)],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(row)
            print(row, flush=True)
    from quanta.kernels import cpu

    meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "seconds": args.seconds, "reps": args.reps, "batch": 1, "isa": cpu.isa_summary(),
            "load_after": round(os.getloadavg()[0], 2)}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "threads.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
