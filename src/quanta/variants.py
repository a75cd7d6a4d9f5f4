"""One model quantized many ways from one calibration: the same sites, some kept float.

Sensitivity analysis and the accuracy target build dozens of variants of one model, each with a
set of int8 sites kept float. A variant is an ordinary ``QuantConfig`` with those site names
added to ``skip``, prepared and converted by the usual ``prepare``/``convert``; only the
calibration is shared. Observers watch float activations while calibrating, so what a site's
observers saw does not depend on which other sites are int8: each variant's observers are copies
of the fully calibrated model's (shared, their qparams computed once: the histogram search
is the costly part of a conversion), wherever the site plans the same fusion (same folded
BatchNorm, same fused activation). Where it does not, that variant is calibrated on its own.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from quanta import api  # module import: quanta.api imports quanta.debug, which imports this
from quanta.capture.plan import LayerPlan
from quanta.config import QuantConfig, QuantSpec
from quanta.errors import CalibrationError, QuantaWarning
from quanta.modules.observed import ObservedModule

KEPT_FLOAT = "kept float"


def _batches(data: Iterable[Any], max_batches: int | None) -> list[Any]:
    out: list[Any] = []
    for batch in data:
        if max_batches is not None and len(out) >= max_batches:
            break
        out.append(batch)
    if not out:
        raise CalibrationError("calibration data is empty: it yielded no batch")
    return out


class FrozenObserver(nn.Module):
    """A calibrated observer whose qparams are computed once and shared by every variant."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.source = source
        self._cache: dict[QuantSpec | None, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def observed(self) -> bool:
        return bool(self.source.observed)

    def calculate_qparams(self, spec: QuantSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if spec not in self._cache:
            self._cache[spec] = self.source.calculate_qparams(spec)
        return self._cache[spec]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x  # already calibrated


def first_row(batch: Any) -> Any:
    """``batch`` cut to its first sample where every tensor in it has the same batch size (a
    cheaper example forward for each variant's prepare), else ``batch`` itself."""
    sizes = set()
    tree_map(lambda t: sizes.add(t.shape[0] if t.dim() else -1) if isinstance(t, torch.Tensor) else None,
             batch)
    if len(sizes) != 1 or -1 in sizes:
        return batch
    return tree_map(lambda t: t[:1] if isinstance(t, torch.Tensor) else t, batch)


class Variants:
    """Calibrate ``model`` once; :meth:`build` returns it quantized with chosen sites kept float."""

    def __init__(self, model: nn.Module, data: Iterable[Any], config: QuantConfig | None = None, *,
                 example_inputs: Any = None, max_batches: int | None = None,
                 show_progress: bool = True) -> None:
        self.model = model
        self.config = config or QuantConfig()
        self.data = _batches(data, max_batches)
        self.example = example_inputs if example_inputs is not None else first_row(self.data[0])
        self.show_progress = show_progress
        self.calibrated = api.prepare(model, self.example, self.config)
        api.calibrate(self.calibrated, self.data, show_progress=show_progress)
        self.plan = api.get_state(self.calibrated).plan
        self.own_calibrations = 0  # variants whose fusion differed, so were calibrated themselves
        self._frozen: dict[int, FrozenObserver] = {}

    def sites(self) -> list[LayerPlan]:
        """The int8 sites of the fully quantized model, in execution order."""
        return [lp for lp in self.plan.layers.values() if lp.precision == "int8"]

    def build(self, keep_float: Iterable[str] = (), reasons: dict[str, str] | None = None,
              runtime: str | None = None) -> nn.Module:
        """The model quantized with the sites ``keep_float`` left float (``reasons``: the report's
        reason for each, default "kept float"; ``runtime``: override ``QuantConfig.runtime``)."""
        keep = sorted(set(keep_float))
        unknown = [n for n in keep if n not in self.plan.layers]
        if unknown:
            raise ValueError(f"not a site of this model: {', '.join(unknown[:5])}")
        config = dataclasses.replace(self.config, skip=tuple(self.config.skip) + tuple(keep),
                                     runtime=runtime or self.config.runtime)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QuantaWarning)  # low coverage is the point of some variants
            prepared = api.prepare(self.model, self.example, config)
            if not self._transfer(prepared):
                self.own_calibrations += 1
                api.calibrate(prepared, self.data, show_progress=False)
            qmodel = api.convert(prepared, inplace=True)
        plan = api.get_state(qmodel).plan
        for name in keep:
            lp = plan.layers[name]
            if lp.precision == "float":
                lp.reason = (reasons or {}).get(name, KEPT_FLOAT)
        return qmodel

    def _frozen_of(self, observer: nn.Module) -> FrozenObserver:
        if id(observer) not in self._frozen:
            self._frozen[id(observer)] = FrozenObserver(observer)
        return self._frozen[id(observer)]

    def _transfer(self, prepared: nn.Module) -> bool:
        """Put the calibrated observers into ``prepared`` wherever a site plans the same fusion;
        False if some site still needs calibrating."""
        state, source = api.get_state(prepared), api.get_state(self.calibrated)
        ours = dict(self.calibrated.named_modules())
        targets = [(m, ours.get(name)) for name, m in prepared.named_modules()
                   if isinstance(m, ObservedModule)]
        targets += [(site, source.sites_by_key.get(key)) for key, site in state.sites_by_key.items()]
        complete = True
        for site, src in targets:
            if src is None or type(src) is not type(site) or not self._same(state.plan.layers[_key(site)]):
                complete = False
                continue
            for attr in ("observer", "input_observer", "output_observer"):
                if getattr(site, attr, None) is not None:
                    setattr(site, attr, self._frozen_of(getattr(src, attr)))
        return complete

    def _same(self, lp: LayerPlan) -> bool:
        full = self.plan.layers.get(lp.name)
        return full is not None and full.precision == "int8" and full.activation == lp.activation \
            and list(full.fused) == list(lp.fused)


def _key(site: nn.Module) -> str:
    return getattr(site, "key", None) or site.layer_name
