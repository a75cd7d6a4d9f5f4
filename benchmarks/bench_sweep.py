"""The model sweep (quanta.zoo.architectures): per architecture, int8 coverage, SQNR of the logits
against float, batch 1 and 8 latency of quanta static int8 against torch fp32 eager and ONNX
Runtime (fp32, and its own static int8 QDQ), graph or eager runtime and why.

    python benchmarks/bench_sweep.py                  # all architectures, 224x224 (Inception 299)
    python benchmarks/bench_sweep.py --models resnet18,mobilenetv2_w1 --reps 3

Random weights (seeded); BatchNorm statistics set from the calibration images, as a trained net
has them; calibration: 4 batches of 4 random images. Rows of one (model, batch) are timed
interleaved, median of ``--reps`` chunks of ~0.15 s; every ratio is against torch fp32 eager of
the same run, 2 threads. Writes results/sweep.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from types import SimpleNamespace

_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"
if os.environ.get("GLIBC_TUNABLES") != _TUNABLES:  # same allocator settings as run_all.py
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": _TUNABLES})

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_openvino import openvino_fp32, openvino_nncf_int8  # noqa: E402
from bench_peers import ort_fp32, ort_static  # noqa: E402

import quanta  # noqa: E402
from quanta.debug.sqnr import sqnr  # noqa: E402
from quanta.zoo import architectures as arches  # noqa: E402
from quanta.zoo.vision import calibrate_batchnorm  # noqa: E402

BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"
CASE = SimpleNamespace(is_transformer=False)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated architecture names (default: all)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime rows")
    p.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO rows")
    return p.parse_args()


def _time(run, x: tuple, budget: float = 0.15) -> float:  # noqa: ANN001
    calls, start = 0, time.perf_counter()
    while True:
        run(x)
        calls += 1
        if time.perf_counter() - start >= budget or calls >= 50:
            return (time.perf_counter() - start) / calls


def _rows(model: torch.nn.Module, calib: list, example: tuple, peers: dict) -> tuple[dict, dict, object]:
    q = quanta.quantize(model, calib, show_progress=False)
    with torch.no_grad():
        q(*example)  # builds the graph runtime
    runners = {"torch fp32 eager": lambda x: model(*x), "quanta static int8": lambda x: q(*x)}
    errors = {}
    for name, build in peers.items():
        try:
            runners[name] = build(model, calib, example, CASE)[0]
        except Exception as exc:  # noqa: BLE001 - the row says why
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return runners, errors, q


def bench(arch: arches.Architecture, batches: list[int], reps: int, peers: dict) -> dict:
    model = arches.build(arch)
    calib = [(arches.images(arch, 4, seed=s),) for s in range(4)]
    calibrate_batchnorm(model, [c[0] for c in calib])
    row: dict = {"model": arch.name, "family": arch.family, "size": arch.size}
    test = arches.images(arch, 8, seed=99)
    runners, errors, q = _rows(model, calib, (test[:1],), peers)
    with torch.no_grad():
        row["sqnr_db"] = round(sqnr(model(test), q(test)), 2)
    cov = quanta.report(q).coverage
    row.update(coverage=round(cov.share, 4), macs=cov.total_macs, runtime=quanta.runtime_status(q),
               errors=errors, float_layers=cov.float_layers[:3])
    for batch in batches:
        x = (test[:batch],)
        times: dict[str, list[float]] = {n: [] for n in runners}
        with torch.no_grad():
            for run in runners.values():
                run(x)
            for rep in range(reps):
                order = list(runners)
                for name in order[rep % len(order):] + order[:rep % len(order)]:
                    times[name].append(_time(runners[name], x))
        base = statistics.median(times["torch fp32 eager"])
        row[f"b{batch}"] = {n: {"ms": round(statistics.median(t) * 1e3, 3),
                                "x_fp32": round(base / statistics.median(t), 2)} for n, t in times.items()}
    return row


def _cell(row: dict, batch: str, name: str) -> str:
    got = row.get(batch, {}).get(name)
    return f"{got['x_fp32']}x" if got else ("failed" if name in row["errors"] else "-")


_SHORT = {"quanta": "quanta static int8", "ORT fp32": "ORT fp32", "ORT int8": "ORT static int8",
          "OV fp32": "OpenVINO fp32", "OV int8": "OpenVINO int8 (NNCF)"}


def _table(rows: list[dict], meta: dict) -> str:
    lines = [f"CPU: {meta['cpu']} ({meta['isa']}); torch {meta['torch']}, 2 threads, median of "
             f"{meta['reps']} interleaved chunks; run took {meta['minutes']} min. Ratios: x fp32 eager.", "",
             "| model | coverage | SQNR dB | b1 fp32 ms | "
             + " | ".join(f"b{b} {n}" for b in (1, 8) for n in _SHORT) + " | runtime |",
             "|---|---|---|---|" + "---|" * (2 * len(_SHORT)) + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} |" + " |" * (3 + 2 * len(_SHORT)))
            continue
        runtime = r["runtime"].split(" (")[0] if r["runtime"].startswith("graph") else r["runtime"][:40]
        fp32 = r.get("b1", {}).get("torch fp32 eager", {}).get("ms", "-")
        cells = [_cell(r, f"b{b}", n) for b in (1, 8) for n in _SHORT.values()]
        lines.append(f"| {r['model']} | {100 * r['coverage']:.1f} % | {r['sqnr_db']} | {fp32} | "
                     + " | ".join(cells) + f" | {runtime} |")
    return "\n".join(lines)


def main() -> None:
    args = _args()
    torch.set_num_threads(2)
    wanted = set(args.models.split(",")) if args.models else None
    rows, started = [], time.time()
    peers = {} if args.no_ort else {"ORT fp32": ort_fp32, "ORT static int8": ort_static}
    if not args.no_openvino:
        peers.update({"OpenVINO fp32": openvino_fp32, "OpenVINO int8 (NNCF)": openvino_nncf_int8})
    for arch in arches.SWEEP:
        if wanted and arch.name not in wanted:
            continue
        try:
            row = bench(arch, [int(b) for b in args.batches.split(",")], args.reps, peers)
        except Exception as exc:  # noqa: BLE001 - the table says which model failed and how
            traceback.print_exc(limit=3)
            row = {"model": arch.name, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "float_layers"}), flush=True)
    from quanta.kernels import cpu

    meta = {"cpu": cpu.model_name(), "isa": cpu.isa_summary(),
            "torch": torch.__version__, "reps": args.reps, "minutes": round((time.time() - started) / 60, 1)}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "sweep.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    readme = os.path.join(HERE, "README.md")
    text = open(readme).read()
    if BEGIN not in text:
        text += f"\n## Model sweep (`bench_sweep.py`)\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    with open(readme + ".tmp", "w") as f:
        f.write(f"{head}{BEGIN}\n{_table(rows, meta)}\n{END}{tail}")
    os.replace(readme + ".tmp", readme)


if __name__ == "__main__":
    main()
