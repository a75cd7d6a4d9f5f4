"""Run every end-to-end benchmark: quanta vs torch fp32 (eager, compile), torch.ao, torchao pt2e
and ONNX Runtime, on ResNet-18, MobileNetV2, a MiniLM-size encoder and the MNIST CNN.

    python benchmarks/run_all.py            # native ISA, batch 1 and 8, writes JSON + README table
    python benchmarks/run_all.py --quick    # fewer reps, no torch.compile rows
    python benchmarks/run_all.py --isa avx2 # oneDNN/MKL/ATen capped at AVX2 (no VNNI): 7-bit weights

Timing: 2 threads; all rows of one (model, batch) are built first, then timed interleaved
(one timed chunk per row per repetition, row order rotated), median per row; every ratio is
against torch fp32 eager of the same run. The script re-executes itself with
GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000 so glibc's
page-fault churn on large allocations does not distort any row (same allocator for all).
OpenMP keeps its default (spin-waiting) policy, what users get: OMP_WAIT_POLICY=PASSIVE
(``--omp-passive``; ORT then allow_spinning=0) puts threads to sleep after every parallel
region and adds ~150-200 us per op at 2 threads (measured: oneDNN int8 conv 16->16 at 14x14
50 -> 244 us, fp32 24 -> 183 us), which dominates batch-1 rows. Spinning threads stall when
other jobs load the machine (ResNet-18 fp32 2.1 s vs 0.14 s per call at load 9): run it when
the load average is below ~1.5 (recorded before/after each block in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"
_AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
HERE = os.path.dirname(os.path.abspath(__file__))


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2,minilm,mnist_cnn")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="5 reps, skip the torch.compile fp32 row")
    p.add_argument("--isa", choices=("native", "avx2"), default="native")
    p.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--json", default="", help="results file (default: results/end_to_end_<isa>.json)")
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE for a loaded machine (default: spin-waiting, see above)")
    return p.parse_args()


ARGS = _args()
_want = {"GLIBC_TUNABLES": _TUNABLES, **(_AVX2_ENV if ARGS.isa == "avx2" else {})}
if ARGS.omp_passive:  # on a shared, oversubscribed machine spinning OpenMP threads stall 10x
    _want["OMP_WAIT_POLICY"] = "PASSIVE"
_drop = [] if ARGS.omp_passive else ["OMP_WAIT_POLICY"]  # an inherited policy changes every row
if any(os.environ.get(k) != v for k, v in _want.items()) or any(k in os.environ for k in _drop):
    _env = {k: v for k, v in {**os.environ, **_want}.items() if k not in _drop}
    os.execve(sys.executable, [sys.executable, *sys.argv], _env)

import torch  # noqa: E402

sys.path.insert(0, HERE)
from bench_models import CASES, calibration, rel_l2  # noqa: E402
from bench_peers import ROWS  # noqa: E402
from readme_table import write_readme  # noqa: E402

from quanta.kernels.cpu import model_name  # noqa: E402

DYNAMIC_ONLY = {"quanta dynamic int8", "torch.ao dynamic", "ORT dynamic"}
# ``--isa avx2`` caps oneDNN, MKL and ATen through their environment variables; these engines
# ask the CPU themselves and keep its full ISA (VNNI, AVX-512), so under --isa avx2 their rows
# are not AVX2 measurements and say so (only scripts/as-avx2's emulation caps them, too slow to time)
NOT_CAPPED = {
    "torch fp32 compile": "inductor's generated code uses the host ISA",
    "torch.ao static (x86)": "fbgemm picks the host ISA",
    "torch.ao dynamic": "fbgemm picks the host ISA",
    "torchao pt2e + inductor": "oneDNN ops capped, inductor's generated code uses the host ISA",
    "ORT fp32": "ONNX Runtime's MLAS picks the host ISA",
    "ORT static U8S8": "ONNX Runtime's MLAS picks the host ISA (VNNI: no saturation)",
    "ORT dynamic": "ONNX Runtime's MLAS picks the host ISA",
    "OpenVINO fp32": "OpenVINO's CPU plugin picks the host ISA",
    "OpenVINO int8 (NNCF)": "OpenVINO's CPU plugin picks the host ISA (VNNI/AMX: no saturation)",
    "OpenVINO on quanta ONNX": "OpenVINO's CPU plugin picks the host ISA",
}


def _rows_for(key: str) -> list[str]:
    names = [r for r in ROWS if ARGS.quick is False or r != "torch fp32 compile"]
    if key != "minilm":
        names = [r for r in names if r not in DYNAMIC_ONLY]
    if ARGS.rows:
        keep = set(ARGS.rows.split(",")) | {"torch fp32 eager"}
        names = [r for r in names if r in keep]
    return names


def _time_chunk(run, x: tuple, budget_s: float) -> float:  # noqa: ANN001
    calls, start = 0, time.perf_counter()
    while True:
        run(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s or calls >= 50:
            return elapsed / calls


def bench_case(key: str, batch: int, reps: int) -> list[dict]:
    case = CASES[key]
    model = case.build()
    calib = calibration(case)
    example = case.inputs(batch, 7)
    with torch.no_grad():
        ref = model(*example)
    rows, runners = [], {}
    for name in _rows_for(key):
        row = {"model": case.name, "key": key, "batch": batch, "row": name}
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                run, size, note = ROWS[name](model, calib, example, case)
                out = run(example)
            if ARGS.isa == "avx2" and name in NOT_CAPPED:
                note = f"NOT CAPPED at AVX2 ({NOT_CAPPED[name]}); {note}"
            row.update(size_bytes=size, note=note, rel_l2=rel_l2(out, ref))
            runners[name] = run
        except Exception as e:  # noqa: BLE001
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            traceback.print_exc(limit=2, file=sys.stderr)
        row["build_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"  built {name}: {row.get('error', 'ok')} ({row['build_s']} s)", flush=True)
    times: dict[str, list[float]] = {n: [] for n in runners}
    order = list(runners)
    with torch.no_grad():
        for name in order:  # warm-up
            for _ in range(3):
                runners[name](example)
        for rep in range(reps):
            for name in order[rep % len(order):] + order[:rep % len(order)]:
                times[name].append(_time_chunk(runners[name], example, 0.15))
    base = statistics.median(times["torch fp32 eager"]) if "torch fp32 eager" in times else None
    fp32_size = next((r["size_bytes"] for r in rows if r["row"] == "torch fp32 eager"), None)
    for row in rows:
        if row["row"] in times:
            ms = statistics.median(times[row["row"]]) * 1e3
            row["ms"] = round(ms, 3)
            row["ms_iqr"] = [round(q * 1e3, 3) for q in statistics.quantiles(times[row["row"]], n=4)[::2]]
            row["speedup_vs_fp32"] = round(base * 1e3 / ms, 2) if base else None
        if row.get("size_bytes") and fp32_size:
            row["size_ratio"] = round(row["size_bytes"] / fp32_size, 3)
    return rows


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    reps = 5 if ARGS.quick else ARGS.reps
    results, started = [], time.time()
    for key in ARGS.models.split(","):
        for batch in (int(b) for b in ARGS.batches.split(",")):
            load = os.getloadavg()[0]
            print(f"{key} batch {batch} (load {load:.1f})", flush=True)
            rows = bench_case(key, batch, reps)
            for r in rows:
                r["load_before"] = round(load, 2)
                r["load_after"] = round(os.getloadavg()[0], 2)
                print(f"    {r['row']:<26} {r.get('ms', '-'):>9} ms  x{r.get('speedup_vs_fp32', '-')}  "
                      f"err {r.get('rel_l2', '-')}  size {r.get('size_ratio', '-')}", flush=True)
            results.extend(rows)
    meta = {
        "isa": ARGS.isa, "threads": 2, "reps": reps, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_model": model_name(),
        "cpu_flags": _cpu_flags(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "quick": ARGS.quick,
        "minutes": round((time.time() - started) / 60, 1),
        "env": {k: os.environ[k] for k in (*_AVX2_ENV, "OMP_WAIT_POLICY") if k in os.environ},
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = ARGS.json or os.path.join(HERE, "results", f"end_to_end_{ARGS.isa}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path} ({meta['minutes']} min)")
    if not ARGS.no_readme:
        write_readme(HERE)


def _cpu_flags() -> dict:
    from quanta.kernels import cpu

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    model = cpu.model_name()
    keys = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
    return {"model": model, **{k: k in flags for k in keys}}


if __name__ == "__main__":
    main()
