"""Dynamic int8 on all-MiniLM-L6-v2: quanta vs fp32 eager, torch.ao and ONNX Runtime.

Rows (batch 1 and 8, sequence 128, 2 threads): fp32 eager; quanta dynamic int8 (per tensor,
and per row); torch.ao ``quantize_dynamic`` (peer only); torchao's pt2e dynamic int8 compiled by
inductor (peer only); ONNX Runtime fp32 and ``onnxruntime.quantization.quantize_dynamic``.
Latency is the median over interleaved repetitions (every variant runs once per round, rounds
repeat), so background load hits all variants alike. Error is the relative L2 distance of the
last hidden state to fp32 eager.

    python benchmarks/bench_dynamic.py                 # real weights, writes results/dynamic.json
    python benchmarks/bench_dynamic.py --quick         # fewer repetitions

The script re-executes itself with GLIBC_TUNABLES set (no malloc trimming / mmap churn) before
torch is imported, as the other benchmarks do.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"
RESULTS = Path(__file__).parent / "results" / "dynamic.json"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15, help="interleaved rounds per batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--random", action="store_true", help="random weights instead of the real model")
    p.add_argument("--quick", action="store_true", help="5 rounds")
    p.add_argument("--no-pt2e", action="store_true", help="skip torchao's pt2e row (compiles per batch size)")
    p.add_argument("--json", default=str(RESULTS))
    return p.parse_args()


ARGS = _parse()
if os.environ.get("GLIBC_TUNABLES") != _TUNABLES:
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": _TUNABLES})

import numpy as np  # noqa: E402
import torch  # noqa: E402

import quanta  # noqa: E402
from quanta.config import QuantConfig  # noqa: E402
from quanta.kernels.cpu import has_vnni, model_name, weight_bits_for_cpu  # noqa: E402
from quanta.zoo import minilm  # noqa: E402

Runner = Callable[[dict[str, torch.Tensor]], np.ndarray]


def _state_bytes(module: torch.nn.Module) -> int:
    """Bytes of a model's saved state (torch.ao packs weights, so serialize to count them)."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes


def _torch_runner(model: torch.nn.Module) -> Runner:
    def run(batch: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.no_grad():
            return model(**batch).numpy()
    return run


def _export_onnx(model: torch.nn.Module, batch: dict[str, torch.Tensor], path: Path) -> None:
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names} | {"hidden": {0: "batch", 1: "seq"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(batch[n] for n in names), str(path), input_names=names,
                          output_names=["hidden"], dynamic_axes=axes, opset_version=17, dynamo=False)


def _ort_runner(path: Path, threads: int) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    # idle ORT threads must not spin: they would steal the cores from the torch rows that follow
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(batch: dict[str, torch.Tensor]) -> np.ndarray:
        return session.run(None, {k: v.numpy() for k, v in batch.items()})[0]
    return run


def build_variants(model: torch.nn.Module, example: dict[str, torch.Tensor], workdir: Path,
                   threads: int) -> dict[str, tuple[Runner, int]]:
    """name -> (runner, model bytes)."""
    variants: dict[str, tuple[Runner, int]] = {"fp32 eager": (_torch_runner(model), _state_bytes(model))}
    q = quanta.quantize(model, mode="dynamic", config=QuantConfig(mode="dynamic", dynamic_per_row=False))
    variants["quanta dynamic int8 (per tensor)"] = (_torch_runner(q), _state_bytes(q))
    q_row = quanta.quantize(model, mode="dynamic")  # per row: the default since 4805490
    variants["quanta dynamic int8 (per row)"] = (_torch_runner(q_row), _state_bytes(q_row))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic as ao_quantize_dynamic

        ao = ao_quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    variants["torch.ao dynamic (peer)"] = (_torch_runner(ao), _state_bytes(ao))
    try:
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic
    except ImportError:
        print("onnxruntime not installed: skipping ONNX Runtime rows")
        return variants
    fp32_path, int8_path = workdir / "minilm.onnx", workdir / "minilm.int8.onnx"
    _export_onnx(model, example, fp32_path)
    ort_quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    variants["ORT fp32"] = (_ort_runner(fp32_path, threads), fp32_path.stat().st_size)
    variants["ORT quantize_dynamic"] = (_ort_runner(int8_path, threads), int8_path.stat().st_size)
    return variants


def pt2e_dynamic_variant(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Runner, int] | None:
    """torchao's pt2e dynamic int8 (X86InductorQuantizer, is_dynamic=True) compiled by inductor
    with freezing: the graph is exported for this batch's shape, so one build per batch size."""
    import copy

    from bench_peers import compile_frozen

    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        print("torchao not installed: skipping the pt2e row")
        return None
    args = tuple(batch[n] for n in ("input_ids", "attention_mask", "token_type_ids"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(copy.deepcopy(model), args, strict=True).module()
        config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=True)
        prepared = prepare_pt2e(exported, xiq.X86InductorQuantizer().set_global(config))
        with torch.no_grad():
            prepared(*args)
        converted = convert_pt2e(prepared)
        size = _state_bytes(converted)
        compiled = compile_frozen(converted, args)

    def run(b: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.no_grad():
            return compiled(*(b[n] for n in ("input_ids", "attention_mask", "token_type_ids"))).numpy()
    return run, size


def make_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def measure(variants: dict[str, tuple[Runner, int]], batch: dict[str, torch.Tensor], reps: int) -> list[dict]:
    reference = variants["fp32 eager"][0](batch)
    outputs = {}
    for name, (run, _) in variants.items():  # warm-up (oneDNN/ORT pick kernels on first calls)
        for _ in range(3):
            outputs[name] = run(batch)
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(reps):
        for name, (run, _) in variants.items():
            t = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - t)
    fp32_ms = statistics.median(times["fp32 eager"]) * 1e3
    rows = []
    for name, (_, size) in variants.items():
        ms = statistics.median(times[name]) * 1e3
        err = float(np.linalg.norm(outputs[name] - reference) / np.linalg.norm(reference))
        rows.append({"variant": name, "batch": int(batch["input_ids"].shape[0]),
                     "seq": int(batch["input_ids"].shape[1]), "median_ms": round(ms, 3),
                     "speedup_vs_fp32": round(fp32_ms / ms, 3), "rel_l2_error": err,
                     "model_mb": round(size / 1e6, 2)})
    return rows


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    model = minilm.minilm_encoder_random() if ARGS.random else minilm.load_minilm()[0]
    reps = 5 if ARGS.quick else ARGS.reps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(model, make_batch(1, ARGS.seq), Path(tmp), ARGS.threads)
        for b in ARGS.batches:
            batch = make_batch(b, ARGS.seq)
            pt2e = None if ARGS.no_pt2e else pt2e_dynamic_variant(model, batch)
            extra = {} if pt2e is None else {"torchao pt2e dynamic + inductor (peer)": pt2e}
            rows += measure({**variants, **extra}, batch, reps)
    meta = {"model": "all-MiniLM-L6-v2" + (" (random weights)" if ARGS.random else ""),
            "threads": ARGS.threads, "reps": reps, "torch": torch.__version__, "vnni": has_vnni(),
            "weight_bits": weight_bits_for_cpu(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count(),
            "cpu_model": model_name()}
    out = Path(ARGS.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out.with_suffix(".tmp")
    tmp_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp_path.replace(out)  # atomic
    print(f"{meta['model']}, seq {ARGS.seq}, {ARGS.threads} threads, median of {reps} interleaved rounds, "
          f"VNNI={meta['vnni']}, load average {meta['load_average_at_end']} on {meta['cpu_count']} CPUs")
    print("| batch | variant | median ms | speed-up vs fp32 | rel. L2 error | model MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['variant']} | {r['median_ms']:.2f} | {r['speedup_vs_fp32']:.2f}x | "
              f"{r['rel_l2_error']:.4f} | {r['model_mb']:.1f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
