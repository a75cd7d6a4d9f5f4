"""Accuracy-targeted mixed precision: the fewest MACs kept float to stay within ``max_drop``.

Starting from the fully int8 model (all variants share one calibration, ``quanta.variants``):
1. rank the int8 sites, most harmful first: ``order="sensitivity"`` builds the "all but this
   site int8" variant of every site and ranks by the output SQNR it wins back;
   ``order="sqnr"`` ranks by each site's isolated SQNR from ``quanta.debug.compare`` (one pass);
2. find the shortest prefix of that ranking whose float variant meets the target, by bisection
   (every step verified by ``eval_fn``; the all-float end is checked first);
3. return kept sites to int8 one by one, most MACs first, wherever ``eval_fn`` still meets the
   target without them.
Everything is deterministic (fixed ranking, ties by MACs then name). The model returned always
comes with a :class:`quanta.target.TargetResult` saying what was kept float and why; when even
every site float misses the target, it says so and returns the best model it measured.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch.nn as nn

from quanta.capture.plan import LayerPlan
from quanta.config import QuantConfig
from quanta.errors import QuantaWarning
from quanta.progress import Steps
from quanta.target import KeptSite, TargetResult, attach
from quanta.variants import Variants

ORDERS = ("sensitivity", "sqnr")


def _ranking(variants: Variants, model: nn.Module, order: str, show_progress: bool) -> tuple[list[str], dict]:
    """Site names most harmful first, and the figure each was ranked by."""
    sites = variants.sites()
    if order == "sqnr":
        from quanta.debug.compare import compare

        full = variants.build()
        result = compare(model, full, variants.data[:2], show_progress=False)
        figures = {s.name: s.isolated_sqnr for s in result.sites}
        key = {lp.name: (figures.get(lp.name) if figures.get(lp.name) is not None else math.inf,
                         lp.macs, lp.name) for lp in sites}
        return sorted(key, key=key.__getitem__), {n: f"isolated SQNR {_db(figures.get(n))} dB" for n in key}
    from quanta.debug.sensitivity import sensitivity

    result = sensitivity(model, variants=variants, only=False, show_progress=show_progress)
    return result.order(), {s.name: f"output SQNR +{s.gain_db:.1f} dB when float" if s.gain_db is not None
                            else "" for s in result.sites}


def _db(v: float | None) -> str:
    return "n/a" if v is None else ("inf" if math.isinf(v) else f"{v:.1f}")


class _Search:
    """Evaluations of variants by the set of sites kept float (each set evaluated once)."""

    def __init__(self, variants: Variants, eval_fn: Callable[[nn.Module], float], target: float,
                 bar: Steps) -> None:
        self.variants, self.eval_fn, self.target, self.bar = variants, eval_fn, target, bar
        self.metrics: dict[frozenset[str], float] = {}
        self.macs = {lp.name: lp.macs for lp in variants.sites()}

    def cost(self, keep: Iterable[str]) -> int:
        return sum(self.macs[n] for n in keep)

    def metric(self, keep: Iterable[str]) -> float:
        key = frozenset(keep)
        if key not in self.metrics:
            self.metrics[key] = float(self.eval_fn(self.variants.build(key)))
            self.bar.advance()
        return self.metrics[key]

    def ok(self, keep: Iterable[str]) -> bool:
        return self.metric(keep) >= self.target

    def best(self) -> frozenset[str]:
        """Of the sets measured: the fewest MACs meeting the target, else the highest metric."""
        met = [k for k, v in self.metrics.items() if v >= self.target]
        if met:
            return min(met, key=lambda k: (self.cost(k), -self.metrics[k], len(k), sorted(k)))
        return min(self.metrics, key=lambda k: (-self.metrics[k], self.cost(k), len(k), sorted(k)))


def quantize_to_target(model: nn.Module, data: Iterable[Any], eval_fn: Callable[[nn.Module], float],
                       max_drop: float, config: QuantConfig | None = None, *, order: str = "sensitivity",
                       example_inputs: Any = None, max_batches: int | None = None,
                       show_progress: bool = True) -> nn.Module:
    """``model`` quantized with the fewest conv/linear MACs kept float that keeps ``eval_fn(model)``
    (higher is better) within ``max_drop`` of the float model's; see the module docstring."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not callable(eval_fn):
        raise TypeError("eval_fn must be a function eval_fn(model) -> float (higher is better)")
    if not isinstance(max_drop, (int, float)) or math.isnan(max_drop):
        raise ValueError(f"max_drop must be a number, got {max_drop!r}")
    metric_float = float(eval_fn(model.eval()))
    variants = Variants(model, data, config, example_inputs=example_inputs, max_batches=max_batches,
                        show_progress=show_progress)
    sites = variants.sites()
    target = metric_float - max_drop
    with Steps(2 + math.ceil(math.log2(max(len(sites), 1))) + 2, "accuracy target", show_progress) as bar:
        search = _Search(variants, eval_fn, target, bar)
        metric_int8 = search.metric(())
        kept: list[str] = []
        why: dict[str, str] = {}
        if metric_int8 < target and sites:
            ranking, figures = _ranking(variants, model, order, show_progress)
            if search.ok(ranking):
                kept = _bisect(search, ranking)
                kept = _prune(search, kept, why)
                for name in kept:
                    why[name] = f"rank {ranking.index(name) + 1} by {order} ({figures.get(name, '')}); " \
                        + why.get(name, "")
    final_keep = search.best()
    met = search.metrics[final_keep] >= target
    final = variants.build(final_keep)
    all_float = search.metrics.get(frozenset(lp.name for lp in sites))
    result = _result(variants, sites, final_keep, why, max_drop, metric_float, metric_int8,
                     search.metrics[final_keep], met, len(search.metrics), order, all_float)
    for name in final_keep:
        final._quanta.plan.layers[name].reason = f"kept float by the accuracy target (max_drop={max_drop:g})"
    attach(final, result)
    if not met:
        warnings.warn(result.message, QuantaWarning, stacklevel=2)
    return final


def _bisect(search: _Search, ranking: list[str]) -> list[str]:
    """The shortest prefix of ``ranking`` that meets the target (the whole list does)."""
    lo, hi = 0, len(ranking)  # ranking[:lo] fails (the fully int8 model), ranking[:hi] meets it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if search.ok(ranking[:mid]):
            hi = mid
        else:
            lo = mid
    return ranking[:hi]


def _prune(search: _Search, kept: list[str], why: dict[str, str]) -> list[str]:
    """Return kept sites to int8, most MACs first, wherever the target still holds."""
    for name in sorted(kept, key=lambda n: (-search.macs[n], n)):
        trial = [n for n in kept if n != name]
        value = search.metric(trial)
        if value >= search.target:
            kept = trial
        else:
            why[name] = f"int8 again, the metric falls to {value:.4g} < {search.target:.4g}"
    return kept


def _result(variants: Variants, sites: list[LayerPlan], keep: frozenset[str], why: dict[str, str],
            max_drop: float, metric_float: float, metric_int8: float, metric: float, met: bool,
            evaluations: int, order: str, all_float: float | None) -> TargetResult:
    total = sum(lp.macs for lp in variants.plan.weight_layers()) or 1
    kept = [KeptSite(lp.name, lp.float_type, lp.macs, lp.macs / total,
                     why.get(lp.name, "best model measured")) for lp in sites if lp.name in keep]
    share = sum(k.macs for k in kept) / total
    if met:
        message = (f"target met: {metric:.4g} >= {metric_float:.4g} - {max_drop:g} with {len(kept)} of "
                   f"{len(sites)} int8 sites kept float ({100 * share:.1f} % of conv/linear MACs)")
    else:
        message = (f"target NOT met: even with every int8 site kept float the metric is "
                   f"{_num(all_float)} < {metric_float - max_drop:.4g} (float {metric_float:.4g} - max_drop "
                   f"{max_drop:g}); returning the best model measured: metric {metric:.4g}, "
                   f"{len(kept)} sites float ({100 * share:.1f} % of MACs)")
    return TargetResult(max_drop, metric_float, metric_int8, metric, met, kept, share, evaluations, order,
                        message)


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"
