"""The ``quanta`` command: quantize | report | compare | export | bench | demo.

Errors print one line, ``quanta: error: ...``, and exit with 2 (bad command line) or 1 (the
command failed); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from quanta.cli.specs import SPEC_HELP, CommandError, UsageError

PROG = "quanta"

MAIN_EPILOG = """\
examples:
  quanta demo                                        the main job on the bundled MNIST CNN
  quanta quantize quanta.zoo.mnist:cli_factory --out mnist.quanta.safetensors
  quanta report mnist.quanta.safetensors
  quanta compare mnist.quanta.safetensors --model quanta.zoo.mnist:cli_factory
  quanta bench mnist.quanta.safetensors --model quanta.zoo.mnist:cli_factory
  quanta export mnist.quanta.safetensors --model quanta.zoo.mnist:cli_factory --onnx mnist.onnx

Run 'quanta COMMAND --help' for the options of each command.
"""

QUANTIZE_EPILOG = f"""\
MODEL is {SPEC_HELP}: a function called with no arguments
that returns the float model, a (model, calibration_data) tuple, or a dict
{{"model": ..., "calib": ..., "example_inputs": ..., "train": train_fn}}.
DATA (--calib) is a .pt/.npy file holding one tensor (split into --batch-size batches)
or a list of batch tensors, or MODULE:function returning an iterable of batches.

examples:
  quanta quantize quanta.zoo.mnist:cli_factory --out mnist.quanta.safetensors
  quanta quantize models.py:make_model --calib images.pt --batch-size 32 --out m.quanta.safetensors
  quanta quantize models.py:make_model --calib data.py:calibration_batches --batches 20 \\
      --skip classifier --out m.quanta.safetensors
  quanta quantize models.py:make_lstm --mode dynamic --out lstm.quanta.safetensors
  quanta quantize models.py:make_model --mode qat --train train.py:finetune --out m.quanta.safetensors
  quanta quantize models.py:make_model --calib images.pt --nproc 4 --out m.quanta.safetensors
  quanta quantize models.py:make_model --config '{{"backend": "reference"}}' --out m.quanta.safetensors
  quanta quantize models.py:make_model --max-drop 0.01 --eval models.py:accuracy --out m.quanta.safetensors

--max-drop keeps the fewest conv/linear MACs in float that bring the --eval metric
(eval(model) -> float, higher is better; or the factory's "eval") within that much of float's,
and prints what it kept float and why.
"""

REPORT_EPILOG = """\
examples:
  quanta report mnist.quanta.safetensors
  quanta report mnist.quanta.safetensors --json > report.json
  quanta report mnist.quanta.safetensors --model quanta.zoo.mnist:cli_factory   (also loads the model)
  quanta report mnist.quanta.safetensors --html report.html    (one self-contained page)
  quanta report mnist.quanta.safetensors --html report.html --model quanta.zoo.mnist:cli_factory
      (with the model: its dataflow graph, per-site SQNR and activation histograms)
"""

COMPARE_EPILOG = """\
Runs the float model (--model) and the saved int8 model on the same batches (--data, else the
factory's calibration data) and prints, per int8 site and worst first: isolated SQNR (float
inputs into this int8 op alone), accumulated SQNR (the int8 model up to there), weight SQNR,
and the share of the activation range the chosen qparams clip.

examples:
  quanta compare mnist.quanta.safetensors --model quanta.zoo.mnist:cli_factory
  quanta compare m.quanta.safetensors --model models.py:make_model --data images.pt --batches 4 --json
"""

EXPORT_EPILOG = """\
The float model (--model) supplies the architecture; its weights are not used.

examples:
  quanta export mnist.quanta.safetensors --model quanta.zoo.mnist:cli_factory --onnx mnist.onnx
  quanta export mnist.quanta.safetensors --model quanta.zoo.mnist:cli_factory --pte mnist.pte
  quanta export m.quanta.safetensors --model models.py:make_model --input-shape 1,3,224,224 --onnx m.onnx
"""

BENCH_EPILOG = """\
Median latency of interleaved float32 and int8 runs on this machine.

examples:
  quanta bench mnist.quanta.safetensors --model quanta.zoo.mnist:cli_factory
  quanta bench m.quanta.safetensors --model models.py:make_model --input-shape 1,3,224,224 \\
      --batch-sizes 1 8 32 --threads 4 --json
"""

DEMO_EPILOG = """\
Quantizes the bundled pretrained MNIST CNN (real MNIST images) and prints the per-layer
report, float vs int8 accuracy on 1,000 held-out images, model size and latency.

examples:
  quanta demo
  quanta demo --threads 4 --repeats 50
"""


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors on one line with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _dimensions(text: str) -> tuple[int, ...]:
    """--dynamic-dims: comma-separated dimension indices ("0,1")."""
    return tuple(int(d) for d in text.split(","))


def _command(sub: Any, name: str, help_text: str, epilog: str, common: argparse.ArgumentParser) -> Parser:
    return sub.add_parser(name, help=help_text, description=help_text, epilog=epilog, parents=[common],
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _bench_options(p: argparse.ArgumentParser, repeats: int) -> None:
    p.add_argument("--threads", type=int, default=2, metavar="N",
                   help="torch threads for timing (default: 2; 0 leaves torch's default)")
    p.add_argument("--repeats", type=int, default=repeats, metavar="N",
                   help=f"timed repetitions per batch size (default: {repeats})")
    p.add_argument("--time-budget", type=float, default=20.0, metavar="SECONDS",
                   help="stop repeating a batch size after this long, once 3 runs are done (default: 20)")


def build_parser() -> Parser:
    from quanta import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")
    parser = Parser(prog=PROG, description="quanta: real int8 models from any PyTorch nn.Module.",
                    epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"quanta {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    q = _command(sub, "quantize", "Quantize a model and save it as one safetensors file.", QUANTIZE_EPILOG,
                 common)
    q.add_argument("model", metavar="MODEL", help=f"model factory: {SPEC_HELP}")
    q.add_argument("--mode", choices=("static", "dynamic", "weight_only", "qat"), default="static",
                   help="static PTQ (default), dynamic (no calibration), weight_only (int8, or int4 with "
                        "--config '{\"weight\": {\"bits\": 4, \"group_size\": 32}}') or qat")
    q.add_argument("--calib", metavar="DATA", help="calibration data (omit if the factory returns it)")
    q.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="batch size when DATA is a single tensor (default: 32)")
    q.add_argument("--batches", type=int, metavar="N", help="use at most N calibration batches")
    q.add_argument("--out", required=True, metavar="FILE", help="output file (.quanta.safetensors)")
    q.add_argument("--config", metavar="JSON", help="QuantConfig as a JSON file or inline JSON object")
    q.add_argument("--skip", nargs="+", action="extend", metavar="NAME",
                   help="keep these modules (names, globs or class names) in float")
    q.add_argument("--train", metavar="MODULE:function", help="qat mode: train(qat_model) function")
    q.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="calibrate on N local processes (torch.distributed, gloo), each on 1/N of the "
                        "batches; the result equals one process on all of them (default: 1)")
    q.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="with --nproc: fail when a process dies or hangs this long (default: 300)")
    q.add_argument("--equalize", action="store_true",
                   help="static: cross-layer equalization before calibration")
    q.add_argument("--adaround", nargs="?", type=float, const=300.0, metavar="SECONDS",
                   help="static: learn each layer's weight rounding (AdaRound) within SECONDS (default 300)")
    q.add_argument("--learn-ranges", nargs="?", type=float, const=300.0, metavar="SECONDS",
                   help="static: learn the activation ranges and biases for the model's output error "
                        "within SECONDS (default 300)")
    q.add_argument("--adaround-iterations", type=int, metavar="N",
                   help="static: AdaRound with exactly N iterations per layer instead of a time budget "
                        "(the same model on any machine; implies --adaround)")
    q.add_argument("--learn-ranges-steps", type=int, metavar="N",
                   help="static: learn the ranges for exactly N steps instead of a time budget "
                        "(implies --learn-ranges)")
    q.add_argument("--smoothquant", nargs="?", const="auto", metavar="ALPHA",
                   help="static: SmoothQuant, each Linear's input outliers moved into its weights before "
                        "calibration; ALPHA in (0, 1), or chosen per layer when left out")
    q.add_argument("--rotate", action="store_true",
                   help="static or dynamic: rotate the residual stream of an RMSNorm transformer first "
                        "(exact in float; spreads outlier channels before int8)")
    q.add_argument("--gptq", action="store_true",
                   help="dynamic or weight_only: round each Linear's weights for the least output error on "
                        "the calibration data (GPTQ)")
    q.add_argument("--bias-correction", action="store_true",
                   help="static: move each layer's mean output error into its bias")
    q.add_argument("--activation-matmul", choices=("float", "int8"),
                   help="static: matmuls of two activations (attention's Q.K^T and P.V) in float (default) "
                        "or int8")
    q.add_argument("--numerics", choices=("onnxruntime", "xnnpack"),
                   help="whose int8 rounding the model reproduces bit for bit: onnxruntime (default; "
                        "for export --onnx) or xnnpack (for export --pte)")
    q.add_argument("--max-drop", type=float, metavar="X",
                   help="accuracy target: keep the fewest MACs float to stay within X of float's metric")
    q.add_argument("--eval", metavar="MODULE:function",
                   help="with --max-drop: eval(model) -> float, higher is better (or the factory's 'eval')")
    q.add_argument("--order", choices=("sensitivity", "sqnr"), default="sensitivity",
                   help="with --max-drop: rank sites by sensitivity (default; one variant per site) "
                        "or by isolated SQNR (one pass, cheaper)")

    r = _command(sub, "report", "Print the per-layer report of a saved quantized model.", REPORT_EPILOG,
                 common)
    r.add_argument("file", metavar="FILE", help="a file written by 'quanta quantize' or quanta.save")
    r.add_argument("--json", action="store_true", help="machine-readable JSON instead of the table")
    r.add_argument("--model", metavar="MODEL", help="also load the model with this factory (checks the file)")
    r.add_argument("--html", metavar="OUT", help="also write one self-contained HTML page")
    r.add_argument("--data", metavar="DATA", help="with --html and --model: batches to compare on "
                   "(default: the factory's calibration data)")
    r.add_argument("--batches", type=int, default=2, metavar="N", help="batches to compare on (default: 2)")
    r.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="batch size when DATA is a single tensor (default: 32)")

    c = _command(sub, "compare", "Compare every int8 site of a saved model with the float model.",
                 COMPARE_EPILOG, common)
    c.add_argument("file", metavar="FILE", help="a saved quantized model")
    c.add_argument("--model", required=True, metavar="MODEL", help=f"float model factory: {SPEC_HELP}")
    c.add_argument("--data", metavar="DATA", help="batches to compare on (default: the factory's calib)")
    c.add_argument("--batches", type=int, default=4, metavar="N", help="at most N batches (default: 4)")
    c.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="batch size when DATA is a single tensor (default: 32)")
    c.add_argument("--top", type=int, metavar="N", help="show only the N worst sites")
    c.add_argument("--json", action="store_true", help="machine-readable JSON instead of the table")

    e = _command(sub, "export", "Export a saved quantized model to ONNX (QDQ) or ExecuTorch (.pte).",
                 EXPORT_EPILOG, common)
    e.add_argument("file", metavar="FILE", help="a saved quantized model")
    out = e.add_mutually_exclusive_group(required=True)
    out.add_argument("--onnx", metavar="OUT", help="output .onnx file")
    out.add_argument("--pte", metavar="OUT",
                     help="output ExecuTorch .pte file (int8 ops delegated to XNNPACK; static input shape)")
    e.add_argument("--strict", action="store_true",
                   help="--pte: fail, naming the layer and op, if any op would not run int8 in XNNPACK")
    e.add_argument("--model", required=True, metavar="MODEL", help=f"float model factory: {SPEC_HELP}")
    e.add_argument("--input-shape", metavar="SHAPE", help="example input shape, e.g. 1,3,224,224")
    e.add_argument("--weight-format", choices=("auto", "int8", "uint8"), default="auto",
                   help="auto (default): exact in ONNX Runtime on every CPU (int8 where weights fit "
                        "7 bits, else uint8 with zero point 128); int8: fastest, exact only on "
                        "VNNI/AMX/ARM CPUs for 8-bit weights")
    e.add_argument("--dynamic-dims", type=_dimensions, default=(0,), metavar="DIMS",
                   help="--onnx: dimensions of every input and output left free, comma-separated "
                        "(default 0, the batch; 0,1 for [batch, sequence] transformers)")

    b = _command(sub, "bench", "Time float vs int8 inference on this machine.", BENCH_EPILOG, common)
    b.add_argument("file", metavar="FILE", help="a saved quantized model")
    b.add_argument("--model", required=True, metavar="MODEL", help=f"float model factory: {SPEC_HELP}")
    b.add_argument("--input-shape", metavar="SHAPE", help="input shape (batch dim is replaced)")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], metavar="N",
                   help="batch sizes to time (default: 1 32)")
    b.add_argument("--json", action="store_true", help="print results as JSON")
    _bench_options(b, repeats=20)

    d = _command(sub, "demo", "Run the main job: quantize the bundled MNIST CNN and compare.", DEMO_EPILOG,
                 common)
    d.add_argument("--calib-batches", type=int, default=10, metavar="N",
                   help="calibration batches of 100 train images (default: 10)")
    _bench_options(d, repeats=20)
    return parser


def _short_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from quanta.cli import commands

    for name in ("batch_size", "batches", "repeats", "threads", "calib_batches", "nproc", "top"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "threads" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if getattr(args, "timeout", 1.0) <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    for bs in getattr(args, "batch_sizes", None) or ():
        if bs < 1:
            raise UsageError(f"--batch-sizes must be positive, got {bs}")
    return getattr(commands, args.command)(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``quanta`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    if not debug:
        warnings.showwarning = _short_warning
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        code = 2 if isinstance(e, UsageError) else 1
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return code


def _message(e: Exception) -> str:
    from quanta.errors import QuantaError

    text = " ".join(str(e).split()) or "(no message)"
    if isinstance(e, (UsageError, CommandError, QuantaError)):
        return text
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return f"{type(e).__name__}: {text} (run with --debug for the traceback)"
