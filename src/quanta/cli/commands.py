"""What each ``quanta`` subcommand does, given its parsed arguments."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

import quanta
from quanta.cli.specs import (
    CommandError,
    Factory,
    UsageError,
    example_from,
    load_calib,
    load_callable,
    load_config,
    load_factory,
    parse_shape,
)


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _api(name: str) -> Any:
    fn = getattr(quanta, name, None)
    if fn is None:
        raise CommandError(f"quanta.{name} is not available in this quanta build")
    return fn


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def float_safetensors_bytes(model: nn.Module) -> int:
    """Size of the float model's state_dict as a safetensors file (computed in memory)."""
    import safetensors.torch

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return len(safetensors.torch.save(state))


def config_from_args(args: argparse.Namespace) -> quanta.QuantConfig:
    """``--config`` with the flags that set its fields (--equalize, --adaround, ...) applied."""
    config = load_config(args.config, args.mode)
    switches = ("equalize", "bias_correction", "rotate", "gptq")
    fields: dict[str, Any] = {k: True for k in switches if getattr(args, k)}
    if args.adaround is not None:
        fields.update(adaround=True, adaround_seconds=args.adaround)
    if args.learn_ranges is not None:
        fields.update(learn_ranges=True, learn_ranges_seconds=args.learn_ranges)
    if args.adaround_iterations is not None:
        fields.update(adaround=True, adaround_iterations=args.adaround_iterations)
    if args.learn_ranges_steps is not None:
        fields.update(learn_ranges=True, learn_ranges_steps=args.learn_ranges_steps)
    if args.smoothquant is not None:
        try:
            alpha = None if args.smoothquant == "auto" else float(args.smoothquant)
        except ValueError:
            raise UsageError(f"--smoothquant takes a number in (0, 1), got {args.smoothquant!r}") from None
        fields.update(smoothquant=True, smoothquant_alpha=alpha)
    if args.numerics is not None:
        fields["numerics"] = args.numerics
    if args.activation_matmul is not None:
        fields["activation_matmul"] = args.activation_matmul
    try:
        return dataclasses.replace(config, **fields)
    except ValueError as e:
        raise UsageError(str(e)) from e


def quantize(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.nproc > 1:
        if args.max_drop is not None:
            raise UsageError("--max-drop evaluates many variants in one process: drop --nproc")
        return _quantize_nproc(args, config)
    factory = load_factory(args.model)
    calib = load_calib(args.calib, args.batch_size) if args.calib else factory.calib
    skip = tuple(args.skip or ())
    started = time.perf_counter()
    target = _target_args(args, factory)
    if args.mode == "static":
        if calib is None:
            raise UsageError("static mode needs calibration data: pass --calib DATA "
                             "(MODULE:function, or a .pt/.npy tensor) or return it from the factory")
        qmodel = quanta.quantize(factory.model, calib, mode="static", config=config, skip=skip,
                                 example_inputs=factory.example_inputs, max_batches=args.batches, **target)
    elif args.mode in ("dynamic", "weight_only"):
        qmodel = _quantize_weights(args, factory, calib, config, skip)
    else:
        qmodel = _quantize_qat(args, factory, calib, config, skip)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    _api("save")(qmodel, out)
    _print_summary(factory.model, qmodel, out, args.mode, seconds)
    result = quanta.target_of(qmodel)
    if result is not None:
        _console().print(str(result), markup=False, soft_wrap=True)
    corrections = quanta.ptq.corrections_of(qmodel)
    if corrections is not None:
        _console().print(corrections.summary(), markup=False, soft_wrap=True)
    return 0


def _quantize_weights(args: argparse.Namespace, factory: Factory, calib: Any, config: quanta.QuantConfig,
                      skip: tuple[str, ...]) -> nn.Module:
    """Dynamic or weight-only mode; the rewrites that learn from data (--smoothquant, --gptq) get
    the calibration batches, --rotate one example."""
    learned = [f for f, on in (("--smoothquant", config.smoothquant), ("--gptq", config.gptq)) if on]
    if learned and calib is None:
        raise UsageError(f"{' and '.join(learned)} in {args.mode} mode needs calibration data: pass --calib "
                         "DATA (MODULE:function, or a .pt/.npy tensor) or return it from the factory")
    example = example_from(factory, calib, None) if config.rotate else None
    if config.rotate and example is None:
        raise UsageError("--rotate needs an example input: pass --calib DATA or return 'example_inputs' "
                         "or 'calib' from the factory")
    return quanta.quantize(factory.model, calib if learned else None, mode=args.mode, config=config,
                           skip=skip, example_inputs=example, max_batches=args.batches)


def _quantize_nproc(args: argparse.Namespace, config: quanta.QuantConfig) -> int:
    from quanta.cli.nproc import quantize_nproc

    started = time.perf_counter()
    lines = quantize_nproc(args, config)  # rank 0 saved the file and summarized it
    _print_saved(Path(args.out), f"static, {args.nproc} processes", time.perf_counter() - started, lines)
    return 0


def _target_args(args: argparse.Namespace, factory: Factory) -> dict[str, Any]:
    """``quantize``'s accuracy-target arguments from --max-drop/--eval/--order."""
    if args.max_drop is None:
        if args.eval:
            raise UsageError("--eval is the metric of an accuracy target: pass --max-drop too")
        return {}
    if args.mode != "static":
        raise UsageError(f"--max-drop works in static mode, not {args.mode}")
    eval_fn = load_callable(args.eval, "--eval") if args.eval else factory.eval
    if eval_fn is None:
        raise UsageError("--max-drop needs a metric: pass --eval MODULE:function (eval(model) -> float, "
                         "higher is better) or return {'model': ..., 'eval': fn} from the factory")

    def checked(model: nn.Module) -> float:
        try:
            value = eval_fn(model)
        except Exception as e:
            raise CommandError(f"the eval function raised {type(e).__name__}: {e}") from e
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise CommandError(f"the eval function returned {type(value).__name__}: expected a number")
        return float(value)

    return {"eval_fn": checked, "max_drop": args.max_drop, "order": args.order}


def _quantize_qat(args: argparse.Namespace, factory: Factory, calib: Any, config: Any,
                  skip: tuple[str, ...]) -> nn.Module:
    train = load_callable(args.train, "--train") if args.train else factory.train
    if train is None:
        raise UsageError("qat mode needs a train function: return {'model': ..., 'train': train_fn} "
                         "from the factory, or pass --train MODULE:function (called as train(qat_model))")
    example = example_from(factory, calib, None)
    if example is None:
        raise UsageError("qat mode needs example inputs: pass --calib DATA or return 'example_inputs' "
                         "or 'calib' from the factory")
    qat_model = _api("prepare_qat")(factory.model.train(), example, config, skip=skip)
    try:
        trained = train(qat_model)
    except Exception as e:
        raise CommandError(f"the train function raised {type(e).__name__}: {e}") from e
    if isinstance(trained, nn.Module):
        qat_model = trained
    return quanta.convert(qat_model)


def _print_summary(float_model: nn.Module, qmodel: nn.Module, out: Path, mode: str, seconds: float) -> None:
    _print_saved(out, mode, seconds, summary_lines(float_model, qmodel, out))


def _print_saved(out: Path, mode: str, seconds: float, lines: list[tuple[str, bool]]) -> None:
    console = _console()
    console.print(f"[bold green]saved[/] {out} ({mode}, {seconds:.1f} s)")
    for text, markup in lines:
        console.print(text, markup=markup)


def summary_lines(float_model: nn.Module, qmodel: nn.Module, out: Path) -> list[tuple[str, bool]]:
    """What ``quantize`` prints under "saved ...": (text, has rich markup) pairs."""
    rep = quanta.report(qmodel)
    summary = rep.summary
    float_bytes = float_safetensors_bytes(float_model)
    int8_bytes = out.stat().st_size
    lines = []
    if rep.coverage is not None:
        lines.append(("  " + rep.coverage.headline(top=3).replace("\n", "\n  "), False))
    lines.append((f"  layers: {summary['int8']} int8, {summary['float']} float "
                  f"({summary['native']} int8-native ops, {summary['folded']} folded)", True))
    lines.append((f"  size:   {_kib(int8_bytes)} vs {_kib(float_bytes)} float safetensors "
                  f"({100.0 * int8_bytes / float_bytes:.1f} %)", True))
    lines.append((f"  next:   quanta report {out}", True))
    return lines


def _check_file(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"file not found: {path}")
    return p


def report(args: argparse.Namespace) -> int:
    path = _check_file(args.file)
    if args.data and not (args.html and args.model):
        raise UsageError("--data is for the HTML page's comparison: pass --html OUT and --model MODEL too")
    if args.model:
        factory = load_factory(args.model)
        qmodel = _api("load")(path, factory.model)
        rep, manifest = quanta.report(qmodel), _read_manifest(path)
        if args.html:
            _write_html(args, path, qmodel, factory, rep)
    else:
        manifest = _read_manifest(path)
        rep = quanta.report(_plan_holder(manifest))
        if args.html:
            from quanta.debug.html import write_html

            write_html(args.html, rep, title=path.name)
            _console().print(f"[bold green]wrote[/] {args.html} (pass --model for the graph, SQNR and "
                             "histograms)")
    meta = {"file": str(path), "file_bytes": path.stat().st_size,
            **{k: manifest.get(k) for k in ("format_version", "quanta_version", "torch_version")}}
    if args.json:
        print(json.dumps({**meta, **rep.to_dict()}, indent=2))
        return 0
    console = _console()
    console.print(f"[bold]{path}[/] ({_kib(meta['file_bytes'])}, format v{meta['format_version']}, "
                  f"saved by quanta {meta['quanta_version']} / torch {meta['torch_version']})")
    console.print(str(rep), markup=False, soft_wrap=True)
    return 0


def _compare_data(args: argparse.Namespace, factory: Factory) -> list[Any]:
    data = load_calib(args.data, args.batch_size) if args.data else factory.calib
    if data is None:
        raise UsageError("no data to compare on: pass --data DATA or return 'calib' from the factory")
    batches = []
    for batch in data:
        if len(batches) >= args.batches:
            break
        batches.append(batch)
    if not batches:
        raise CommandError("the data to compare on yielded no batch")
    return batches


def _write_html(args: argparse.Namespace, path: Path, qmodel: nn.Module, factory: Factory, rep: Any) -> None:
    from quanta.capture.record import capture
    from quanta.debug.html import write_html

    batches = _compare_data(args, factory)
    result = quanta.debug.compare(factory.model, qmodel, batches)
    record = capture(factory.model.eval(), batches[0], rep.mode)
    write_html(args.html, rep, compare=result, record=record, title=path.name)
    _console().print(f"[bold green]wrote[/] {args.html}")


def compare(args: argparse.Namespace) -> int:
    factory, qmodel = _load_pair(args)
    result = quanta.debug.compare(factory.model, qmodel, _compare_data(args, factory))
    if args.top is not None:
        result.sites = result.sites[:args.top]
    if args.json:
        print(result.to_json())
    else:
        _console().print(str(result), markup=False, soft_wrap=True)
    return 0


def _read_manifest(path: Path) -> dict[str, Any]:
    """The file's manifest, after checking its tensor data against the manifest's checksum."""
    from quanta.io import format as fmt
    from quanta.io.load import read_file

    manifest, blobs = read_file(path)
    fmt.check_blobs(fmt.check_table(manifest.get("tensors")), blobs, manifest.get("data_sha256"))
    return manifest


def _plan_holder(manifest: dict[str, Any]) -> nn.Module:
    """A bare module carrying the file's plan, so ``quanta.report`` reads it without the model."""
    from quanta.io.load import parse_manifest
    from quanta.modules.state import QuantaState

    config, plan = parse_manifest(manifest)
    holder = nn.Module()
    object.__setattr__(holder, "_quanta", QuantaState(plan, config))
    return holder


def _load_pair(args: argparse.Namespace) -> tuple[Factory, nn.Module]:
    path = _check_file(args.file)
    factory = load_factory(args.model)
    return factory, _api("load")(path, factory.model)


def _example(args: argparse.Namespace, factory: Factory) -> Any:
    shape = parse_shape(args.input_shape) if args.input_shape else None
    example = example_from(factory, None, shape)
    if example is None:
        raise UsageError("no example input: pass --input-shape (e.g. 1,3,224,224) or return "
                         "'example_inputs' or 'calib' from the factory")
    return example


def export(args: argparse.Namespace) -> int:
    factory, qmodel = _load_pair(args)
    example = _example(args, factory)
    if args.pte:
        return _export_pte(args, qmodel, example)
    export_onnx = _api("export_onnx")
    out = Path(args.onnx)
    with warnings.catch_warnings():
        # the ONNX tracer warns about Python scalars it records as constants: quanta's qparams are
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        export_onnx(qmodel, example, out, weight_format=args.weight_format, dynamic_dims=args.dynamic_dims)
    _console().print(f"[bold green]exported[/] {out} ({_kib(out.stat().st_size)}, ONNX QDQ, "
                     f"weight format {args.weight_format})")
    return 0


def _export_pte(args: argparse.Namespace, qmodel: torch.nn.Module, example: Any) -> int:
    from quanta.io.atomic import atomic_write_bytes
    from quanta.io.executorch_export import lower_executorch

    try:
        import executorch  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        raise UsageError(f"--pte needs ExecuTorch: pip install 'quanta[executorch]' ({e})") from e
    out = Path(args.pte)
    with warnings.catch_warnings():  # the numerics warning is a line of the summary below
        warnings.filterwarnings("ignore", message="the model was quantized with numerics=")
        program, info = lower_executorch(qmodel, example, strict=args.strict)
    atomic_write_bytes(out, program.buffer)
    _console().print(f"[bold green]exported[/] {out} ({_kib(out.stat().st_size)}, ExecuTorch + XNNPACK)")
    _console().print(info.summary(), markup=False)
    return 0


def bench(args: argparse.Namespace) -> int:
    from quanta.demo import measure_latency, resize_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    factory, qmodel = _load_pair(args)
    example = _example(args, factory)
    if not isinstance(example, torch.Tensor):
        raise UsageError("quanta bench resizes a single input tensor; this model's example input is "
                         f"a {type(example).__name__}: pass --input-shape")
    float_model = factory.model.eval()
    table = Table(title=f"latency on this machine ({torch.get_num_threads()} threads, median of "
                  "interleaved runs)", title_justify="left")
    for col in ("batch", "float32", "int8", "int8 vs float"):
        table.add_column(col, justify="right")
    rows = []
    for bs in args.batch_sizes:
        f_s, q_s, n = measure_latency(float_model, qmodel, resize_batch(example, bs),
                                      repeats=args.repeats, time_budget=args.time_budget)
        rows.append({"batch_size": bs, "float_ms": f_s * 1e3, "int8_ms": q_s * 1e3, "repeats": n})
        ratio = f_s / q_s
        table.add_row(str(bs), f"{f_s * 1e3:.2f} ms", f"{q_s * 1e3:.2f} ms",
                      f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower")
    runtime = quanta.runtime_status(qmodel)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "runtime": runtime, "results": rows}, indent=2))
    else:
        _console().print(table)
        _console().print(f"runtime: {runtime}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from quanta.demo import run_demo

    run_demo(threads=args.threads or None, repeats=args.repeats, calib_batches=args.calib_batches,
             time_budget=args.time_budget)
    return 0
