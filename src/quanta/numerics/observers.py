"""Observers: watch float tensors during calibration and choose quantization parameters.

Every observer is an ``nn.Module`` whose forward records statistics and returns its input
unchanged. ``layer`` names the place it watches, so calibration errors can say where.
"""

from __future__ import annotations

import math

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
        sync = self.__dict__.get("range_sync")  # set by quanta.distributed.prepare_ddp
        if sync is not None:
            lo, hi = sync(lo, hi)
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

    Bins lie on a fixed grid (``grid``): width ``2**k`` for the smallest ``k`` whose bins from
    ``floor(min / 2**k)`` to ``floor(max / 2**k)`` number at most ``BINS``. When the range grows,
    the width doubles and pairs of bins merge exactly, so the histogram depends only on the
    values seen, not on their order or batching: two histograms (two ranks' shards) move to
    their union's grid and add up to the histogram of the union (``quanta.distributed``).
    The search tries clipped ranges on a grid of bin edges and scores each by the expected
    squared error of rounding (inside) plus clipping (outside), bin by bin.
    """

    BINS = 4096

    def __init__(self, spec: QuantSpec, layer: str = "") -> None:
        super().__init__(spec, layer)
        self.register_buffer("histogram", torch.zeros(self.BINS, dtype=torch.float64))

    @classmethod
    def grid(cls, lo: float, hi: float) -> tuple[int, int]:
        """``(k, origin)``: bins of width ``2**k``, the first covering ``[origin, origin+1) * 2**k``.

        A function of the range alone; ``k`` never shrinks when the range grows."""
        amax = max(abs(lo), abs(hi))
        k_low = math.frexp(amax)[1] - 52 if amax > 0 else 0  # keeps |x / 2**k| < 2**52: exact
        span = hi - lo
        k = max(k_low, math.frexp(span)[1] - 15) if span > 0 else k_low  # too fine: 2**13+ bins
        while math.floor(math.ldexp(hi, -k)) - math.floor(math.ldexp(lo, -k)) >= cls.BINS:
            k += 1
        return k, math.floor(math.ldexp(lo, -k))

    @classmethod
    def bin_counts(cls, x: torch.Tensor, k: int, origin: int) -> torch.Tensor:
        """Counts of ``x`` in the ``BINS`` bins of grid ``(k, origin)`` (float64, exact).

        ``floor(x / 2**k) - origin`` is exact in float32 when ``k <= 0`` (scaling up by a power
        of two, integers that differ by < BINS); bins wider than 1 use float64, where scaling
        down cannot underflow."""
        x = x.detach().reshape(-1)
        x = x.float() if k <= 0 else x.double()
        idx = torch.floor(x * math.ldexp(1.0, -k)).sub_(origin)
        return torch.bincount(idx.long(), minlength=cls.BINS).double()

    @classmethod
    def rebin(cls, hist: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
        """``hist`` on grid ``old`` moved to the coarser (or equal) grid ``new``: exact merging."""
        if old == new:
            return hist
        shift = new[0] - old[0]
        if shift < 0:
            raise ValueError(f"cannot rebin a histogram to a finer grid ({old} -> {new})")
        idx = torch.bitwise_right_shift(old[1] + torch.arange(cls.BINS, dtype=torch.int64), min(shift, 63))
        idx = idx - new[1]
        used = hist != 0
        if bool(((idx < 0) | (idx >= cls.BINS))[used].any()):
            raise ValueError(f"histogram counts fall outside the grid {new} (from {old})")
        return torch.zeros_like(hist).index_add_(0, idx.clamp(0, cls.BINS - 1), torch.where(used, hist, 0.0))

    def current_grid(self) -> tuple[int, int]:
        """The grid the stored histogram is on (a function of ``min_val``/``max_val``)."""
        return self.grid(float(self.min_val), float(self.max_val))

    def _update(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.spec.per_channel:  # the MSE search is per tensor: per-channel keeps min/max
            super()._update(x, lo, hi)
            return
        old = self.current_grid() if self.observed else None
        super()._update(x, lo, hi)
        new = self.current_grid()
        if old is not None:
            self.histogram.copy_(self.rebin(self.histogram, old, new))
        self.histogram += self.bin_counts(x, *new)

    def _edges(self) -> tuple[torch.Tensor, int]:
        """Edges of the used bins (float64; the outer two are the observed min and max)."""
        lo, hi = float(self.min_val), float(self.max_val)
        k, origin = self.grid(lo, hi)
        used = math.floor(math.ldexp(hi, -k)) - origin + 1
        edges = (origin + torch.arange(used + 1, dtype=torch.float64)) * math.ldexp(1.0, k)
        edges[0], edges[-1] = lo, hi
        return edges, used

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = float(self.min_val), float(self.max_val)
        if self.spec.per_channel or hi <= lo or self.histogram.sum() == 0:
            return self.min_val, self.max_val
        qmin, qmax = qrange(self.spec)
        edges, used = self._edges()
        centers = (edges[:-1] + edges[1:]) / 2
        # Prefix sums of n, n*c, n*c^2 make each candidate range's error O(1).
        n = self.histogram[:used]
        zero = torch.zeros(1, dtype=torch.float64)
        s0, s1, s2 = (torch.cat([zero, torch.cumsum(v, 0)]) for v in (n, n * centers, n * centers**2))

        def error(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            a = edges[i].clamp(max=0.0)  # the grid always includes 0 (choose_qparams)
            b = edges[j].clamp(min=0.0)
            below = s2[i] - 2 * a * s1[i] + a * a * s0[i]
            above = (s2[-1] - s2[j]) - 2 * b * (s1[-1] - s1[j]) + b * b * (s0[-1] - s0[j])
            scale = (b - a) / (qmax - qmin)
            inside = (s0[j] - s0[i]) * scale * scale / 12.0
            return torch.where(j > i, below + above + inside, torch.inf)

        coarse = torch.linspace(0, used, 257).round().long().unique()
        i, j = torch.meshgrid(coarse, coarse, indexing="ij")
        best = int(torch.argmin(error(i, j)))
        bi, bj = int(i.reshape(-1)[best]), int(j.reshape(-1)[best])
        reach = used // 256 + 1
        fi = torch.arange(max(0, bi - reach), min(used, bi + reach) + 1)
        fj = torch.arange(max(0, bj - reach), min(used, bj + reach) + 1)
        i, j = torch.meshgrid(fi, fj, indexing="ij")
        best = int(torch.argmin(error(i, j)))
        bi, bj = int(i.reshape(-1)[best]), int(j.reshape(-1)[best])
        return edges[bi].float(), edges[bj].float()


MAX_CLIPPED = 1e-3  # the entropy observer's ranges clip at most this share of the values


class EntropyObserver(HistogramObserver):
    """The range whose quantized histogram is closest to the observed one in KL divergence
    (the TensorRT-style calibration). Candidates shrink [min, max] towards 0 by a common
    factor; each is scored by KL(P || Q), with P the clipped histogram (outliers added to the
    edge bins) and Q the values inside the range projected onto the integer grid, spread over
    non-empty bins. Ranges that clip more than ``MAX_CLIPPED`` of the values are not candidates."""

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)
        if self.spec.per_channel or hi <= lo or self.histogram.sum() == 0:
            return self.min_val, self.max_val
        qmin, qmax = qrange(self.spec)
        levels = qmax - qmin + 1
        edges, used = self._edges()
        hist = self.histogram[:used].double().clone()
        # the bin holding 0 scores like its neighbour: the exact zeros after a ReLU are a spike
        # no bucket can average away, and left in, KL prefers ranges so narrow that each bucket
        # is one bin (clipping most of the values). As NVIDIA's entropy calibrator does.
        zero = min(used - 1, max(0, int(torch.searchsorted(edges, 0.0, right=True)) - 1))
        if used > 1:
            hist[zero] = hist[zero + 1] if zero + 1 < used else hist[zero - 1]
        total = float(self.histogram[:used].sum())
        best, best_kl = 1.0, float("inf")
        for t in torch.linspace(0.05, 1.0, 96).tolist():
            a, b = lo * t, hi * t
            i = max(0, int(torch.searchsorted(edges, a, right=True)) - 1)
            j = min(used, max(i + 1, int(torch.searchsorted(edges, b))))
            if j - i < levels:  # fewer bins than levels: KL cannot see rounding
                continue
            inside = hist[i:j]
            if float(self.histogram[:i].sum() + self.histogram[j:used].sum()) > MAX_CLIPPED * total:
                continue  # spikes of constant values (a background) make KL favour such ranges
            p = inside.clone()
            p[0] += hist[:i].sum()
            p[-1] += hist[j:].sum()
            # Q: the values inside the range (not the clipped ones: clipping must cost) projected
            # onto `levels` equal buckets over [edges[i], edges[j]]
            bucket = ((edges[i:j] - edges[i]) / (edges[j] - edges[i]) * levels).long().clamp(max=levels - 1)
            nonzero = (inside > 0).double()
            mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, inside)
            count = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, nonzero)
            q = torch.where(inside > 0, mass[bucket] / count[bucket].clamp(min=1), 0.0)
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
