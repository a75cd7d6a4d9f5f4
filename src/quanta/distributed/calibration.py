"""Calibration across ranks: ``sync_observers`` reduces every observer so all ranks convert to
the same qparams. ``quanta.calibrate`` calls it when a process group is initialized.

The protocol, per observer kind (each rank calibrated on its own shard):
- **minmax**: global min and max. Bit-identical to one process over the union of the shards.
- **histogram / entropy** (``HistogramObserver``): first the global min/max, which fixes the
  shared bin grid (power-of-two bin width, see ``HistogramObserver.grid``); each rank moves its
  histogram onto that grid (pairs of bins merge exactly) and the counts are summed. Equal to
  one process's histogram over the union, so the searched range is identical too.
- **percentile**: the per-batch percentiles are averaged over all batches of all ranks (sums and
  batch counts added in rank order): one process over the same batches, up to float64 rounding.
- **moving average** (and QAT's ``FakeQuantize``): the mean over ranks of each rank's average.
  An exponential average is order-dependent, so no union exists; under DistributedDataParallel
  ``quanta.distributed.prepare_ddp`` instead feeds every update the global batch's min/max.

Counts and sums are reduced as deltas since the previous sync, so calibrating again and
syncing again adds only the new batches. Observers update their buffers in place.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn as nn

from quanta.distributed.collective import DistributedError, all_gather, all_reduce, rank
from quanta.numerics.observers import (
    HistogramObserver,
    MovingAverageMinMaxObserver,
    Observer,
    PercentileObserver,
)


def observers(model: nn.Module) -> list[tuple[str, Observer]]:
    """Every observer of a prepared (or QAT) model, call sites included, in a fixed order."""
    found: dict[int, tuple[str, Observer]] = {}
    roots: list[tuple[str, nn.Module]] = [("", model)]
    state = getattr(model, "_quanta", None)
    if isinstance(state, nn.Module):
        roots.append(("_quanta", state))
    for prefix, root in roots:
        for name, m in root.named_modules(prefix=prefix):
            if isinstance(m, Observer) and id(m) not in found:
                found[id(m)] = (name, m)
    return list(found.values())


def _fingerprint(names: list[str]) -> float:
    """A 48-bit hash of the observer names (exact in float64), to check ranks agree."""
    digest = hashlib.sha256("\n".join(names).encode()).digest()
    return float(int.from_bytes(digest[:6], "little"))


def _base(o: Observer) -> dict[str, Any]:
    """What this rank already shares with the others (the result of the previous sync)."""
    return o.__dict__.setdefault("_quanta_synced", {"batches": 0, "lo_sum": 0.0, "hi_sum": 0.0,
                                                    "hist": None, "grid": None})


def _row(o: Observer, width: int) -> torch.Tensor:
    """This rank's contribution: [observed, min..., max..., batches, lo_sum, hi_sum] deltas."""
    base = _base(o)
    lo, hi = o.min_val.reshape(-1).double(), o.max_val.reshape(-1).double()
    if lo.numel() not in (1, width):
        raise DistributedError(f"{o.layer}: observer shape differs from the other ranks'")
    row = torch.full((2 * width + 4,), 0.0, dtype=torch.float64)
    row[0] = float(o.observed)
    row[1:1 + width], row[1 + width:1 + 2 * width] = lo.expand(width), hi.expand(width)
    row[-3] = float(int(o.batches) - base["batches"])
    if isinstance(o, PercentileObserver):
        row[-2] = float(o.lo_sum) - base["lo_sum"]
        row[-1] = float(o.hi_sum) - base["hi_sum"]
    return row


def _merge(o: Observer, rows: torch.Tensor, width: int) -> None:
    """Set ``o`` from every rank's row (``rows``: [world, 2*width+4], rank order)."""
    base = _base(o)
    seen = rows[:, 0] > 0
    lo, hi = rows[:, 1:1 + width], rows[:, 1 + width:1 + 2 * width]
    if not bool(seen.any()):
        return
    if isinstance(o, MovingAverageMinMaxObserver):
        count = int(seen.sum())
        new_lo = sum(lo[r] for r in range(len(rows)) if seen[r]) / count
        new_hi = sum(hi[r] for r in range(len(rows)) if seen[r]) / count
    else:
        new_lo, new_hi = lo[seen].amin(dim=0), hi[seen].amax(dim=0)
    shape = o.min_val.shape if o.min_val.numel() == width else (() if width == 1 else (width,))
    with torch.no_grad():
        _set(o, "min_val", new_lo.reshape(shape).float())
        _set(o, "max_val", new_hi.reshape(shape).float())
        base["batches"] += int(sum(float(v) for v in rows[:, -3]))
        o.batches.fill_(base["batches"])
        if isinstance(o, PercentileObserver):
            base["lo_sum"] += sum(float(v) for v in rows[:, -2])
            base["hi_sum"] += sum(float(v) for v in rows[:, -1])
            o.lo_sum.fill_(base["lo_sum"])
            o.hi_sum.fill_(base["hi_sum"])


def _set(o: nn.Module, name: str, value: torch.Tensor) -> None:
    current = getattr(o, name)
    if current.shape == value.shape:
        current.copy_(value)
    else:
        setattr(o, name, value.clone())


def sync_observers(model: nn.Module, *, group: Any = None, local_batches: int = 0) -> int:
    """Reduce every observer of ``model`` across the ranks of ``group`` (default group).

    A collective: every rank calls it, with the same prepared model. Returns the number of
    batches all ranks calibrated together (``local_batches`` summed), so a rank whose shard was
    empty can still convert.
    """
    named = observers(model)
    width = max([o.min_val.numel() for _, o in named] + [1])
    header = torch.tensor([_fingerprint([n for n, _ in named]), float(len(named)), float(width),
                           float(local_batches)], dtype=torch.float64)
    rows = [header] + [_row(o, width) for _, o in named]
    step = f"syncing {len(named)} observers (ranges)"
    gathered = all_gather(step, torch.cat([r.reshape(-1) for r in rows]), group=group)
    headers = torch.stack([g[:4] for g in gathered])
    if not bool((headers[:, :3] == headers[0, :3]).all()):
        bad = int((headers[:, :3] != headers[0, :3]).any(dim=1).nonzero()[0])
        raise DistributedError(
            f"rank {rank()}: rank {bad} prepared a different model ({int(headers[bad, 1])} observers, "
            f"rank 0 has {int(headers[0, 1])}): prepare the same model with the same config on every rank"
        )
    per_rank = torch.stack([g[4:].reshape(len(named), 2 * width + 4) for g in gathered])
    hists = [o for _, o in named if isinstance(o, HistogramObserver) and not o.spec.per_channel]
    local_grids = {id(o): o.current_grid() for o in hists if o.observed}  # before min/max widen
    for i, (_, o) in enumerate(named):
        _merge(o, per_rank[:, i], width)
    _sync_histograms([o for o in hists if o.observed], local_grids, group)
    return int(sum(float(v) for v in headers[:, 3]))


def _sync_histograms(hists: list[HistogramObserver], local_grids: dict[int, tuple[int, int]],
                     group: Any) -> None:
    """Move each rank's histogram and the synced base onto the shared grid; sum the new counts."""
    if not hists:
        return
    deltas = []
    for o in hists:
        base, grid = _base(o), o.current_grid()  # the global min/max are in place: the shared grid
        own = local_grids.get(id(o))
        local = o.rebin(o.histogram, own, grid) if own is not None else torch.zeros_like(o.histogram)
        if base["hist"] is not None:
            local = local - o.rebin(base["hist"], base["grid"], grid)
        deltas.append(local)
    total = all_reduce(f"syncing {len(hists)} histograms (counts)", torch.cat(deltas), group=group)
    for o, summed in zip(hists, total.split(HistogramObserver.BINS), strict=True):
        base, grid = _base(o), o.current_grid()
        merged = summed if base["hist"] is None else summed + o.rebin(base["hist"], base["grid"], grid)
        o.histogram.copy_(merged)
        base["hist"], base["grid"] = merged.clone(), grid
