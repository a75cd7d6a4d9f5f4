"""Observers: watch float tensors during calibration and choose quantization parameters.

Every observer is an ``nn.Module`` whose forward records statistics and returns its input
unchanged. ``layer`` names the place it watches, so calibration errors can say where.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from quanta.config import QuantSpec
from quanta.errors import CalibrationError
from quanta.numerics.qparams import choose_qparams, qrange


class Observer(nn.Module):
    """Base: tracks running min/max (per tensor or per channel) and checks for NaN/Inf."""

    def __init__(self, spec: QuantSpec, layer: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.layer = layer
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("batches", torch.tensor(0, dtype=torch.int64))

    @property
    def observed(self) -> bool:
        return int(self.batches) > 0

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.per_channel:
            flat = x.detach().transpose(0, self.spec.axis).reshape(x.shape[self.spec.axis], -1)
            return torch.aminmax(flat, dim=1)
        return torch.aminmax(x.detach())

    def _check(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            bad = "NaN" if torch.isnan(x).any() else "Inf"
            raise CalibrationError(
                f"{bad} found while calibrating {self.layer or 'a layer'}: calibration data (or the "
                f"float model on it) produced non-finite values; clean the data before calibrating"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return x
        self._check(x)
        lo, hi = self._reduce(x)
        self._update(x, lo, hi)
        self.batches += 1
        return x

    def _update(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if not self.observed:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) the quantization grid should cover."""
        return self.min_val, self.max_val

    def calculate_qparams(self, spec: QuantSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.observed:
            raise CalibrationError(f"{self.layer or 'observer'} was never run on calibration data")
        lo, hi = self.range()
        return choose_qparams(lo, hi, spec or self.spec)


class MinMaxObserver(Observer):
    """Global min/max over all calibration batches."""


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min/max (the usual QAT choice)."""

    def _update(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if not self.observed:
            self.min_val, self.max_val = lo.clone(), hi.clone()
            return
        c = self.spec.averaging_constant
        self.min_val = self.min_val + c * (lo - self.min_val)
        self.max_val = self.max_val + c * (hi - self.max_val)


class PercentileObserver(Observer):
    """Average over batches of the per-batch low/high percentiles: robust to rare outliers."""

    _SAMPLE = 1 << 20

    def __init__(self, spec: QuantSpec, layer: str = "") -> None:
        super().__init__(spec, layer)
        self.register_buffer("lo_sum", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("hi_sum", torch.tensor(0.0, dtype=torch.float64))

    def _update(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super()._update(x, lo, hi)
        flat = x.detach().reshape(-1).float()
        if flat.numel() > self._SAMPLE:
            pick = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))
            flat = flat[pick[: self._SAMPLE]]
        q = self.spec.percentile / 100.0
        k_hi = max(1, min(flat.numel(), round(q * flat.numel())))
        k_lo = max(1, min(flat.numel(), round((1 - q) * flat.numel()) + 1))
        self.hi_sum += flat.kthvalue(k_hi).values.double()
        self.lo_sum += flat.kthvalue(k_lo).values.double()

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = float(self.batches)
        return (self.lo_sum / n).float(), (self.hi_sum / n).float()


class HistogramObserver(Observer):
    """Histogram of all values; the range is the one minimising quantization MSE.

    The histogram grows its range by merging bins when a batch exceeds it, so memory stays
    fixed. The search tries clipped ranges on a grid of bin edges and scores each by the
    expected squared error of rounding (inside) plus clipping (outside), bin by bin.
    """

    BINS = 2048

    def __init__(self, spec: QuantSpec, layer: str = "") -> None:
        super().__init__(spec, layer)
        self.register_buffer("histogram", torch.zeros(self.BINS, dtype=torch.float64))
        self._edges = (0.0, 0.0)

    def _update(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        first = not self.observed
        super()._update(x, lo, hi)
        new_lo, new_hi = float(self.min_val), float(self.max_val)
        if new_hi <= new_lo:
            new_hi = new_lo + 1e-8
        if not first:
            self.histogram = self._rebin(self.histogram, self._edges, new_lo, new_hi)
        self._edges = (new_lo, new_hi)
        self.histogram += torch.histc(x.detach().float(), self.BINS, new_lo, new_hi).double()

    def _rebin(self, hist: torch.Tensor, old: tuple[float, float], lo: float, hi: float) -> torch.Tensor:
        if old == (lo, hi):
            return hist
        centers = torch.linspace(old[0], old[1], self.BINS + 1, dtype=torch.float64)
        centers = (centers[:-1] + centers[1:]) / 2
        idx = ((centers - lo) / (hi - lo) * self.BINS).long().clamp(0, self.BINS - 1)
        return torch.zeros_like(hist).index_add_(0, idx, hist)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._edges = (float(self.min_val), float(self.max_val))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = float(self.min_val), float(self.max_val)
        if self.spec.per_channel or hi <= lo or self.histogram.sum() == 0:
            return self.min_val, self.max_val
        qmin, qmax = qrange(self.spec)
        width = (hi - lo) / self.BINS
        centers = lo + (torch.arange(self.BINS, dtype=torch.float64) + 0.5) * width
        # Prefix sums of n, n*c, n*c^2 make each candidate range's error O(1).
        n = self.histogram
        zero = torch.zeros(1, dtype=torch.float64)
        s0, s1, s2 = (torch.cat([zero, torch.cumsum(v, 0)]) for v in (n, n * centers, n * centers**2))

        def error(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            a = (lo + i * width).clamp(max=0.0)  # the grid always includes 0 (choose_qparams)
            b = (lo + j * width).clamp(min=0.0)
            below = s2[i] - 2 * a * s1[i] + a * a * s0[i]
            above = (s2[-1] - s2[j]) - 2 * b * (s1[-1] - s1[j]) + b * b * (s0[-1] - s0[j])
            scale = (b - a) / (qmax - qmin)
            inside = (s0[j] - s0[i]) * scale * scale / 12.0
            return torch.where(j > i, below + above + inside, torch.inf)

        coarse = torch.linspace(0, self.BINS, 257).round().long()
        i, j = torch.meshgrid(coarse, coarse, indexing="ij")
        best = int(torch.argmin(error(i, j)))
        bi, bj = int(i.reshape(-1)[best]), int(j.reshape(-1)[best])
        fi = torch.arange(max(0, bi - 8), min(self.BINS, bi + 9))
        fj = torch.arange(max(0, bj - 8), min(self.BINS, bj + 9))
        i, j = torch.meshgrid(fi, fj, indexing="ij")
        best = int(torch.argmin(error(i, j)))
        bi, bj = int(i.reshape(-1)[best]), int(j.reshape(-1)[best])
        return torch.tensor(lo + bi * width), torch.tensor(lo + bj * width)


class EntropyObserver(HistogramObserver):
    """The range whose quantized histogram is closest to the observed one in KL divergence
    (the TensorRT-style calibration). Candidates shrink [min, max] towards 0 by a common
    factor; each is scored by KL(P || Q), with P the clipped histogram (outliers added to the
    edge bins) and Q its projection onto the integer grid, spread over non-empty bins."""

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)
        if self.spec.per_channel or hi <= lo or self.histogram.sum() == 0:
            return self.min_val, self.max_val
        qmin, qmax = qrange(self.spec)
        levels = qmax - qmin + 1
        full_lo, width = float(self.min_val), (float(self.max_val) - float(self.min_val)) / self.BINS
        edges = full_lo + torch.arange(self.BINS + 1, dtype=torch.float64) * width
        best, best_kl = 1.0, float("inf")
        for t in torch.linspace(0.05, 1.0, 96).tolist():
            a, b = lo * t, hi * t
            i = int((a - full_lo) / width) if a > full_lo else 0
            j = min(self.BINS, max(i + 1, int(round((b - full_lo) / width))))
            if j - i < levels:  # fewer bins than levels: KL cannot see rounding
                continue
            p = self.histogram[i:j].clone()
            p[0] += self.histogram[:i].sum()
            p[-1] += self.histogram[j:].sum()
            # project onto `levels` equal buckets over [edges[i], edges[j]]
            bucket = ((edges[i:j] - edges[i]) / (edges[j] - edges[i]) * levels).long().clamp(max=levels - 1)
            nonzero = (p > 0).double()
            mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, p)
            count = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, nonzero)
            q = torch.where(p > 0, mass[bucket] / count[bucket].clamp(min=1), 0.0)
            pn, qn = p / p.sum(), q / q.sum()
            kl = float(torch.sum(torch.where(pn > 0, pn * torch.log(pn / qn.clamp(min=1e-12)), 0.0)))
            if kl < best_kl:
                best, best_kl = t, kl
        return torch.tensor(lo * best), torch.tensor(hi * best)


_OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "histogram": HistogramObserver,
    "entropy": EntropyObserver,
}


def make_observer(spec: QuantSpec, layer: str = "") -> Observer:
    """The observer named by ``spec.observer``, labelled with the layer it watches."""
    return _OBSERVERS[spec.observer](spec, layer)
