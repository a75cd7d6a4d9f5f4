"""Static int8 all-MiniLM-L6-v2 with float or int8 attention matmuls (QuantConfig.activation_matmul).

Rows: fp32 eager; quanta static int8 with the attention matmuls (Q.K^T, P.V) in float (the
default); the same with them int8; and, with ``--onnx``, both quanta models exported to ONNX and
run by ONNX Runtime. Accuracy: cosine of the mean-pooled sentence embedding against fp32 on the
200 polarity sentences (min and mean). Latency: median over interleaved rounds (every row once
per round) at batch 1 and 8, for a short sentence (its own length) and 184 tokens (eight
sentences joined). Calibration: 20 sentences, as tests/models/test_minilm_static.py. The ONNX
files leave batch and sequence free (``export_onnx(..., dynamic_dims=(0, 1))``).

    python benchmarks/bench_attention.py --onnx       # writes results/attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import quanta
from quanta.kernels.cpu import model_name, weight_bits_for_cpu
from quanta.zoo import minilm

RESULTS = Path(__file__).parent / "results" / "attention.json"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30, help="interleaved rounds per shape")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--onnx", action="store_true", help="also ONNX Runtime on quanta's two exports")
    p.add_argument("--json", default=str(RESULTS))
    return p.parse_args()


def _ort_runner(qmodel: torch.nn.Module, example: dict[str, torch.Tensor], path: Path, threads: int):
    import onnxruntime as ort

    quanta.export_onnx(qmodel, (example["input_ids"], example["attention_mask"]), path, dynamic_dims=(0, 1))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # its threads would otherwise spin after each call and slow the torch row timed next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]  # input_0, input_1: ids and mask, in that order
    return lambda batch: session.run(None, {n: batch[k].numpy() for n, k in
                                            zip(names, ("input_ids", "attention_mask"), strict=True)})[0]


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    model, tokenizer = minilm.load_minilm()
    sentences, _ = minilm.load_polarity_sentences()
    calib = [minilm.tokenize(tokenizer, sentences[i:i + 100:10]) for i in (0, 100)]
    quantized = {
        "quanta static int8, attention matmuls float": quanta.QuantConfig(),
        "quanta static int8, attention matmuls int8": quanta.QuantConfig(activation_matmul="int8"),
    }
    reference = minilm.embed(model, tokenizer, sentences)
    results: dict[str, dict] = {"fp32 eager": {}}
    runners = {"fp32 eager": lambda batch: model(**batch)}
    exports = tempfile.TemporaryDirectory()
    example = minilm.tokenize(tokenizer, [" ".join(sentences[:8])])
    for name, config in quantized.items():
        qmodel = quanta.quantize(model, calib, config=config, show_progress=False)
        cos = (reference * minilm.embed(qmodel, tokenizer, sentences)).sum(1)
        rows = quanta.report(qmodel).to_dict()["layers"]
        results[name] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                         "int8_linears": sum(r["op"] == "Linear" and r["precision"] == "int8" for r in rows),
                         "int8_matmuls": sum(r["op"] == "matmul" and r["precision"] == "int8" for r in rows)}
        runners[name] = qmodel
        if args.onnx:
            ort_name = name.replace("quanta static", "ONNX Runtime on quanta's export,")
            runners[ort_name] = _ort_runner(qmodel, example, Path(exports.name) / f"{len(runners)}.onnx",
                                            args.threads)
            results[ort_name] = {}
    shapes = {"b1 short": sentences[:1], "b1 x 184": [" ".join(sentences[:8])],
              "b8 short": sentences[:8], "b8 x 184": [" ".join(sentences[:8])] * 8}
    with torch.inference_mode():
        for shape, texts in shapes.items():
            batch = minilm.tokenize(tokenizer, texts)
            fits = runners  # the exports leave batch and sequence free (dynamic_dims=(0, 1))
            times: dict[str, list[float]] = {name: [] for name in fits}
            for run in fits.values():
                run(**batch) if isinstance(run, torch.nn.Module) else run(batch)
            for _ in range(args.reps):
                for name, run in fits.items():
                    start = time.perf_counter()
                    run(**batch) if isinstance(run, torch.nn.Module) else run(batch)
                    times[name].append(time.perf_counter() - start)
            fp32 = statistics.median(times["fp32 eager"])
            for name, ts in times.items():
                median = statistics.median(ts)
                results[name][shape] = {"ms": median * 1e3, "vs_fp32": fp32 / median,
                                        "tokens": list(batch["input_ids"].shape)}
    print(f"{'row':58s}" + "".join(f"{s:>18s}" for s in shapes) + "   min / mean cosine")
    for name, r in results.items():
        cells = "".join(f"{r[s]['ms']:9.2f} ms {r[s]['vs_fp32']:4.2f}x" if s in r else f"{'-':>18s}"
                        for s in shapes)
        acc = f"   {r['min_cosine']:.4f} / {r['mean_cosine']:.4f}" if "min_cosine" in r else ""
        print(f"{name:58s}{cells}{acc}")
    meta = {"cpu_model": model_name(), "weight_bits": weight_bits_for_cpu(), "threads": args.threads,
            "reps": args.reps}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
