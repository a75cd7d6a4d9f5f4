"""Learned activation ranges: every int8 activation's (min, max) tuned for the model's output.

Calibration picks each activation's range from that tensor alone (the histogram observer
minimizes its own quantization error). In a deep net the errors of ~100 such choices add up,
and the range best for one tensor is not the one best for the logits: a wider range rounds
coarser, a narrower one clips. This correction starts from the calibrated ranges and learns
them (and, optionally, the biases) by gradient descent on the error of the model's output
against the float model on the calibration data, through a fake-quantized copy of the int8 model
(``quanta.qat.simulate_static``: the static plan, the same quantized tensors, BatchNorm folded).
It runs last: the int8 weights that calibration, bias correction and AdaRound chose stay as they
are, and the model is converted again at the learned qparams. A learned-step-size estimator
(LSQ, Esser et al. 2020) gives each range its gradient; the forward uses exactly the scale and
zero point ``convert`` bakes in.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from quanta.errors import QuantaWarning
from quanta.modules.qat import FakeQuantize, QATModule
from quanta.numerics.qparams import choose_qparams, qrange
from quanta.progress import Steps


@dataclass
class RangeLearningResult:
    """What range learning did: output error on the calibration data before and after."""

    ranges: int
    steps: int
    error_before: float
    error_after: float
    seconds: float
    biases: int = 0
    kept: bool = True  # False: the error rose, and the int8 model kept what it started from

    def summary(self) -> str:
        gain = self.error_before / max(self.error_after, 1e-30)
        what = f"{self.ranges} activation ranges" + (f" and {self.biases} biases" if self.biases else "")
        if not self.kept:
            return (f"range learning: {what} tuned in {self.steps} steps raised the output error on the "
                    f"calibration data {1 / gain:.2f}x; not kept: the int8 model keeps its ranges and "
                    f"biases ({self.seconds:.0f} s)")
        return (f"range learning: {what} tuned in {self.steps} steps (output error on the calibration "
                f"data {gain:.2f}x lower than with the ranges it started from; {self.seconds:.0f} s)")


class LearnedRange(nn.Module):
    """An activation range as two learnable log-factors on the calibrated (min, max).

    The forward quantizes with exactly ``choose_qparams(min, max)`` (what ``convert`` uses);
    the gradient reaches the factors through the LSQ surrogate scale and zero point."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("lo0", lo.detach().float().clamp(max=0.0).clone())
        self.register_buffer("hi0", hi.detach().float().clamp(min=0.0).clone())
        self.log_factors = nn.Parameter(torch.zeros(2))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        factors = torch.exp(self.log_factors)
        return self.lo0 * factors[0], self.hi0 * factors[1]

    def fake_quant(self, x: torch.Tensor, spec: Any) -> torch.Tensor:
        lo, hi = self.bounds()
        scale, zero_point = choose_qparams(lo.detach(), hi.detach(), spec)
        qmin, qmax = qrange(spec)
        if spec.symmetric:
            surrogate = torch.maximum(-lo, hi) / ((qmax - qmin) // 2)
        else:
            surrogate = (hi - lo) / (qmax - qmin)
        # LSQ gradient scale: keeps the step's update comparable across tensor sizes
        grad_scale = 1.0 / math.sqrt(x.numel() * qmax)
        surrogate = surrogate * grad_scale + (surrogate - surrogate * grad_scale).detach()
        s = surrogate + (scale - surrogate).detach()
        z = zero_point.float()
        q = x / s
        q = q + (torch.round(q) - q).detach()
        return (torch.clamp(q + z, qmin, qmax) - z) * s


def _learnable(observer: FakeQuantize, lo: torch.Tensor, hi: torch.Tensor) -> LearnedRange:
    """Attach a learned range to ``observer``: its qparams and fake quantization follow it."""
    learned = LearnedRange(lo, hi)
    observer.learned_range = learned
    return learned


def _layers(model: nn.Module, layer_type: type) -> dict[str, Any]:
    """The conv/linear layers of a prepared, QAT or int8 model, as modules and at weight op
    call sites, by a key all three share."""
    from quanta.api import get_state

    named = {**dict(model.named_modules()), **get_state(model).sites_by_key}
    return {name: m for name, m in named.items() if isinstance(m, layer_type)}


def _observers(model: nn.Module, layer_type: type) -> dict[str, Any]:
    """Every activation observer of a prepared (static or QAT) model, by a key both share:
    each layer's input and output, and the int8 add/cat call sites."""
    from quanta.api import get_state

    found = {}
    for name, m in _layers(model, layer_type).items():
        found[f"{name}:input"] = m.input_observer
        found[f"{name}:output"] = m.output_observer
    for site in get_state(model).sites.values():
        if site.observer is not None:
            found[f"{site.key}:site"] = site.observer
    return found


def _adopt_weights(sim: nn.Module, qmodel: nn.Module) -> None:
    """Give each simulated layer the int8 model's weights and bias (as corrected by AdaRound and
    bias correction), so that the ranges are learned for them and ``convert`` reproduces them."""
    from quanta.modules.quantized import QuantizedModule

    quantized = _layers(qmodel, QuantizedModule)
    for name, m in _layers(sim, QATModule).items():
        q = quantized.get(name)
        if q is None:
            continue
        weight, bias = q._float_params()
        m.bn = None  # the int8 weights have BatchNorm folded in
        m.float_module.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
        m.float_module.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)


def _simulation(float_model: nn.Module, qmodel: nn.Module, batches: Sequence[Any],
                ) -> tuple[nn.Module, list[QATModule], list[LearnedRange]]:
    """The static int8 simulation of ``float_model`` with ``qmodel``'s int8 weights and biases
    (frozen) and a learnable range on each activation, starting at ``qmodel``'s qparams."""
    from quanta.api import get_state
    from quanta.qat import simulate_static

    float_model.eval()
    sim = simulate_static(float_model, batches[0], get_state(qmodel).config)
    _adopt_weights(sim, qmodel)
    layers = list(_layers(sim, QATModule).values())
    for layer in layers:
        for p in layer.parameters():
            p.requires_grad_(False)
    calibrated = _calibrated_ranges(qmodel)
    ranges = [_learnable(fq, *calibrated[key]) for key, fq in _observers(sim, QATModule).items()
              if key in calibrated]
    return sim, layers, ranges


def _reconvert(sim: nn.Module, source: nn.Module, config: Any) -> nn.Module:
    """The int8 model of ``sim`` at its learned qparams. Warns, naming them, about layers whose
    int8 weights differ from ``source``'s (codes that do not imply their own scale: the convert
    re-rounds them on another grid)."""
    from quanta.api import convert, get_state
    from quanta.modules.quantized import QuantizedModule

    result = convert(sim, config=config)
    get_state(result).config = config
    before, after = _layers(source, QuantizedModule), _layers(result, QuantizedModule)
    changed = [name for name, q in before.items()
               if name in after and not torch.equal(q.weight, after[name].weight)]
    if changed:
        warnings.warn(f"range learning changed the int8 weights of {len(changed)} layer(s) "
                      f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}): their codes do "
                      "not imply their scales, so converting again re-rounded them",
                      QuantaWarning, stacklevel=3)
    return result


def _outputs(model: nn.Module, batch: Any) -> torch.Tensor:
    from quanta.capture.record import call_with

    out = call_with(model, batch)
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"range learning needs a model whose output is one tensor, got {type(out).__name__}")


def _calibrated_ranges(qmodel: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The (min, max) each activation's qparams in the int8 model stand for, by observer key."""
    from quanta.api import get_state

    state = get_state(qmodel)
    plan = state.plan
    qmin, qmax = 0, 255  # activations are uint8 (QuantConfig checks it)

    def bounds(qparams: tuple[float, int]) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero_point = qparams
        return torch.tensor((qmin - zero_point) * scale), torch.tensor((qmax - zero_point) * scale)

    ranges = {}
    for name, lp in plan.layers.items():
        if lp.input_qparams and not lp.input_from:  # else it is its producer's output range
            ranges[f"{name}:input"] = bounds(lp.input_qparams)
        if lp.output_qparams:
            ranges[f"{name}:output"] = bounds(lp.output_qparams)
    for site in state.sites.values():
        qparams = plan.layers[site.key].output_qparams
        if qparams:
            ranges[f"{site.key}:site"] = bounds(qparams)
    return ranges


def learn_ranges(float_model: nn.Module, qmodel: nn.Module, batches: Sequence[Any], *, seconds: float,
                 steps: int | None = None, learn_biases: bool = True, show_progress: bool = True,
                 ) -> tuple[nn.Module, RangeLearningResult]:
    """Tune the activation ranges of ``qmodel`` (a static int8 model of ``float_model``, after
    any AdaRound or bias correction) and its biases for the error of the model's output against
    ``float_model`` on ``batches``, keeping its int8 weights, for ``seconds`` of wall time or
    exactly ``steps`` steps (reproducible); returns the new int8 model, or ``qmodel`` itself if the
    learned ranges raised the error on ``batches`` (``result.kept`` is then False)."""
    from quanta.api import get_state

    began = time.monotonic()
    config = get_state(qmodel).config
    sim, layers, ranges = _simulation(float_model, qmodel, batches)
    params = [{"params": [r.log_factors for r in ranges], "lr": 5e-3}]
    biases = []
    if learn_biases:
        for m in layers:
            b = m.float_module.bias
            if b is not None and all(b is not seen for seen in biases):
                b.requires_grad_(True)
                biases.append(b)
        params.append({"params": biases, "lr": 1e-4})
    with torch.no_grad():
        targets = [_outputs(float_model, b) for b in batches]

    def error() -> float:
        with torch.no_grad():
            pairs = zip(batches, targets, strict=True)
            errors = [float(((_outputs(sim, b) - t) ** 2).mean()) for b, t in pairs]
        return sum(errors) / len(errors)

    before = error()
    optimizer = torch.optim.Adam(params)
    taken = 0
    deadline = began + seconds
    with Steps(steps, "learning activation ranges", enabled=show_progress) as bar:
        while taken < steps if steps is not None else time.monotonic() < deadline:
            batch, target = batches[taken % len(batches)], targets[taken % len(batches)]
            loss = ((_outputs(sim, batch) - target) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            taken += 1
            bar.advance()
    after = error()
    kept = after < before  # a model AdaRound already fitted can get worse: then keep what it was
    learned = _reconvert(sim, qmodel, config) if kept else qmodel
    return learned, RangeLearningResult(len(ranges), taken, before, after, time.monotonic() - began,
                                        len(biases), kept)
