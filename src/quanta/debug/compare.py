"""Where accuracy is lost: every int8 site of a quantized model compared with the float model.

For each int8 site (module, op site, int8 add/cat/mul) on the same batches:
- **isolated SQNR**: the float model's inputs of this site fed into its int8 op alone (inputs the
  int8 model receives as int8 are put on the same grid first), against the float output;
- **accumulated SQNR**: the int8 model's output at this site (all error up to here);
- **weight SQNR**: the dequantized int8 weights against the float ones (BatchNorm folded);
- **clipped**: the share of the float activation range (and of its values) outside what the
  chosen output (and input) qparams represent.
Sites come worst isolated SQNR first: that is the op that loses accuracy on its own.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from quanta.capture.plan import LayerPlan, Plan
from quanta.debug.report import plan_of
from quanta.debug.taps import Call, tap_float, tap_quantized, tensors
from quanta.kernels.reference import apply_activation
from quanta.modules import opsites
from quanta.modules.observed import fold_batchnorm
from quanta.progress import progress

HIST_BINS = 48
_SAMPLE = 4096  # reference values kept per site and batch for the histogram


def db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB (inf without noise)."""
    if noise <= 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


@dataclass
class SiteResult:
    """One int8 site's figures (dB; None where not measurable)."""

    name: str
    op: str
    kind: str
    macs: int
    isolated_sqnr: float | None = None
    accumulated_sqnr: float | None = None
    weight_sqnr: float | None = None
    clipped_range: float | None = None  # share of the float output range the output qparams cut
    clipped_values: float | None = None  # share of output values outside the representable range
    input_clipped_range: float | None = None  # same for the input qparams of a layer quantizing its input
    histogram: dict[str, Any] | None = None  # float output values: lo, hi, counts; q_lo, q_hi
    note: str = ""


@dataclass
class CompareResult:
    """Per-site figures, worst isolated SQNR first, and the model output's SQNR."""

    sites: list[SiteResult]
    output_sqnr: float | None
    batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def by_name(self) -> dict[str, SiteResult]:
        return {s.name: s for s in self.sites}

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) and v < 0 else (
                "inf" if isinstance(v, float) and math.isinf(v) else v)

        sites = [{k: clean(v) for k, v in asdict(s).items()} for s in self.sites]
        return {"output_sqnr": clean(self.output_sqnr), "batches": self.batches, "sites": sites}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="quanta compare: int8 sites, worst isolated SQNR first", title_justify="left")
        for col in ("site", "op", "isolated dB", "accumulated dB", "weight dB", "range clipped",
                    "values clipped", "input range clipped"):
            table.add_column(col, overflow="fold", justify="left" if col in ("site", "op") else "right")
        for s in self.sites:
            table.add_row(s.name, s.op, _db(s.isolated_sqnr), _db(s.accumulated_sqnr), _db(s.weight_sqnr),
                          _pct(s.clipped_range), _pct(s.clipped_values), _pct(s.input_clipped_range))
        buf = io.StringIO()
        console = Console(file=buf, width=160, force_terminal=False, color_system=None)
        console.print(table)
        console.print(f"model output SQNR: {_db(self.output_sqnr)} dB over {self.batches} batch(es)")
        return buf.getvalue().rstrip()

    def __repr__(self) -> str:
        return str(self)


def _db(v: float | None) -> str:
    return "" if v is None else ("inf" if math.isinf(v) and v > 0 else f"{v:.1f}")


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f} %"


class _Acc:
    """Running energies and range statistics of one site."""

    def __init__(self) -> None:
        self.signal = self.iso_noise = self.acc_noise = 0.0
        self.iso_ok = self.acc_ok = True
        self.lo, self.hi, self.outside, self.count = math.inf, -math.inf, 0, 0
        self.in_lo, self.in_hi = math.inf, -math.inf
        self.samples: list[torch.Tensor] = []


def _fake_quantize_args(args: tuple, qparams: list[tuple[float, int] | None]) -> tuple:
    """Float arguments put on the int8 grid where the int8 model received them as int8."""
    leaves, spec = tree_flatten(args)
    it = iter(qparams)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            qp = next(it, None)
            if qp is not None and leaf.is_floating_point():
                leaf = torch.fake_quantize_per_tensor_affine(leaf.float(), qp[0], qp[1], 0, 255)
        out.append(leaf)
    return tree_unflatten(out, spec)


def _isolated(qmodel: nn.Module, lp: LayerPlan, fcall: Call, qcall: Call | None) -> Any:
    site = qmodel._quanta.sites_by_key.get(lp.name)
    with torch.no_grad():
        if site is None:
            return qmodel.get_submodule(lp.name)(*fcall.args)
        args = _fake_quantize_args(fcall.args, qcall.arg_qparams if qcall is not None else [])
        return site.run(fcall.func, args, fcall.kwargs)


def pre_activation_source(lp: LayerPlan, plan: Plan) -> str:
    """The float-model site whose output an int8 layer computes before its fused activation:
    its last folded BatchNorm, else the layer itself."""
    source = lp.name
    for name in lp.fused:
        if plan.layers.get(name) is not None and plan.layers[name].float_type.startswith("BatchNorm"):
            source = name
    return source


def _reference(lp: LayerPlan, plan: Plan, fcalls: dict[str, list[Call]], i: int) -> torch.Tensor | None:
    """The float value the int8 site computes in call ``i``: its output, after a folded
    BatchNorm and the fused activation."""
    calls = fcalls.get(pre_activation_source(lp, plan), [])
    if i >= len(calls):
        return None
    out = tensors(calls[i].out)
    if not out:
        return None
    return apply_activation(torch.cat(out), lp.activation)


def folded_float_layer(float_model: nn.Module, lp: LayerPlan, plan: Plan) -> nn.Module:
    """The float layer an int8 layer was made from, with its fused BatchNorm folded in.
    Raises AttributeError/ValueError when the float model has no such layer."""
    f = opsites.float_layer(float_model, lp) if lp.kind == "site" else float_model.get_submodule(lp.name)
    bns = [n for n in lp.fused if plan.layers[n].float_type.startswith("BatchNorm")]
    return fold_batchnorm(f, float_model.get_submodule(bns[0])) if bns else f


def _weight_sqnr(float_model: nn.Module, qmodel: nn.Module, lp: LayerPlan, plan: Plan) -> float | None:
    site = qmodel._quanta.sites_by_key.get(lp.name)
    q = site if site is not None else qmodel.get_submodule(lp.name)
    w_q, scale = getattr(q, "weight", None), getattr(q, "weight_scale", None)
    if not isinstance(w_q, torch.Tensor) or not isinstance(scale, torch.Tensor) or w_q.is_floating_point():
        return None
    try:
        w = folded_float_layer(float_model, lp, plan).weight.detach().float()
    except (AttributeError, ValueError):
        return None
    zp = getattr(q, "weight_zero_point", None)
    shape = [-1] + [1] * (w_q.dim() - 1)
    offset = zp.float().reshape(shape) if isinstance(zp, torch.Tensor) and zp.numel() == scale.numel() else 0
    deq = (w_q.float() - offset) * scale.float().reshape(shape)
    if deq.shape != w.shape and deq.t().shape == w.shape:
        deq = deq.t()
    if deq.shape != w.shape:
        return None
    return db(float(w.double().pow(2).sum()), float((w.double() - deq.double()).pow(2).sum()))


def _range(qp: tuple[float, int]) -> tuple[float, float]:
    return (0 - qp[1]) * qp[0], (255 - qp[1]) * qp[0]


def _batches(data: Any, max_batches: int | None) -> list[Any]:
    if isinstance(data, (torch.Tensor, dict, tuple)):
        return [data]
    out = []
    for b in data:
        if max_batches is not None and len(out) >= max_batches:
            break
        out.append(b)
    return out


def compare(float_model: nn.Module, qmodel: nn.Module, data: Iterable[Any] | Any, *,
            max_batches: int | None = 8, show_progress: bool = True) -> CompareResult:
    """Compare every int8 site of ``qmodel`` with ``float_model`` on ``data`` (a batch or an
    iterable of batches, as for calibration). See the module docstring for the figures."""
    plan = plan_of(qmodel)
    lps = [lp for lp in plan.layers.values() if lp.precision == "int8"]
    names = {lp.name for lp in lps} | {n for lp in lps for n in lp.fused if n in plan.layers}
    float_model = float_model.eval()
    accs = {lp.name: _Acc() for lp in lps}
    out_signal = out_noise = 0.0
    batches = _batches(data, max_batches)
    for batch in progress(batches, total=len(batches), description="comparing", enabled=show_progress):
        fcalls, fout = tap_float(float_model, plan, names, batch)
        qcalls, qout = tap_quantized(qmodel, {lp.name for lp in lps}, batch)
        ref_out, test_out = torch.cat(tensors(fout)), torch.cat(tensors(qout))
        out_signal += float(ref_out.double().pow(2).sum())
        out_noise += float((ref_out.double() - test_out.double()).pow(2).sum())
        for lp in lps:
            _measure(qmodel, lp, plan, fcalls, qcalls.get(lp.name, []), accs[lp.name])
    results = [_result(float_model, qmodel, lp, plan, accs[lp.name]) for lp in lps]
    results.sort(key=lambda s: (math.inf if s.isolated_sqnr is None else s.isolated_sqnr,
                                math.inf if s.accumulated_sqnr is None else s.accumulated_sqnr))
    return CompareResult(results, db(out_signal, out_noise) if batches else None, len(batches))


def _measure(qmodel: nn.Module, lp: LayerPlan, plan: Plan, fcalls: dict[str, list[Call]],
             qcalls: list[Call], acc: _Acc) -> None:
    own = fcalls.get(lp.name, [])
    if not own:
        acc.iso_ok = acc.acc_ok = False
        return
    if len(qcalls) != len(own):
        acc.acc_ok = False
    for i, fcall in enumerate(own):
        ref = _reference(lp, plan, fcalls, i)
        if ref is None:
            acc.iso_ok = acc.acc_ok = False
            return
        acc.signal += float(ref.double().pow(2).sum())
        try:
            iso = torch.cat(tensors(_isolated(qmodel, lp, fcall, qcalls[i] if i < len(qcalls) else None)))
            acc.iso_noise += float((ref.double() - iso.double()).pow(2).sum()) if iso.shape == ref.shape \
                else math.nan
        except Exception:  # an op that cannot run alone on these arguments: no isolated figure
            acc.iso_ok = False
        if acc.acc_ok and i < len(qcalls):
            test = torch.cat(tensors(qcalls[i].out))
            if test.shape == ref.shape:
                acc.acc_noise += float((ref.double() - test.double()).pow(2).sum())
            else:
                acc.acc_ok = False
        if ref.numel():
            acc.lo, acc.hi = min(acc.lo, float(ref.min())), max(acc.hi, float(ref.max()))
            if lp.output_int8 and lp.output_qparams is not None:
                lo, hi = _range(lp.output_qparams)
                half = lp.output_qparams[0] / 2
                acc.outside += int(((ref < lo - half) | (ref > hi + half)).sum())
            acc.count += ref.numel()
            extremes = torch.stack([ref.min(), ref.max()])  # the histogram spans the whole range
            acc.samples.append(torch.cat([ref[:: max(1, ref.numel() // _SAMPLE)][:_SAMPLE], extremes]))
        inputs = tensors(fcall.args)
        if lp.input_qparams is not None and inputs and inputs[0].numel() and inputs[0].is_floating_point():
            acc.in_lo = min(acc.in_lo, float(inputs[0].min()))
            acc.in_hi = max(acc.in_hi, float(inputs[0].max()))


def _clip_share(lo: float, hi: float, qlo: float, qhi: float) -> float | None:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return None
    return (max(0.0, hi - qhi) + max(0.0, qlo - lo)) / (hi - lo)


def _result(float_model: nn.Module, qmodel: nn.Module, lp: LayerPlan, plan: Plan, acc: _Acc) -> SiteResult:
    r = SiteResult(lp.name, lp.float_type, lp.kind, lp.macs)
    if not acc.iso_ok and not acc.acc_ok:
        r.note = "not comparable: the float model has no call of this site on these inputs"
    if acc.iso_ok and math.isfinite(acc.iso_noise):
        r.isolated_sqnr = db(acc.signal, acc.iso_noise)
    if acc.acc_ok:
        r.accumulated_sqnr = db(acc.signal, acc.acc_noise)
    r.weight_sqnr = _weight_sqnr(float_model, qmodel, lp, plan)
    q_range = None
    if lp.output_int8 and lp.output_qparams is not None and acc.count:
        q_range = _range(lp.output_qparams)
        r.clipped_range = _clip_share(acc.lo, acc.hi, *q_range)
        r.clipped_values = acc.outside / acc.count
    if lp.input_qparams is not None:
        r.input_clipped_range = _clip_share(acc.in_lo, acc.in_hi, *_range(lp.input_qparams))
    if acc.samples:
        values = torch.cat(acc.samples)
        lo, hi = float(values.min()), float(values.max())
        if hi > lo:
            counts = torch.histc(values, HIST_BINS, lo, hi)
            r.histogram = {"lo": lo, "hi": hi, "counts": [int(c) for c in counts.tolist()],
                           "q_lo": q_range[0] if q_range else None, "q_hi": q_range[1] if q_range else None}
    return r
