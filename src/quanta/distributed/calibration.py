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


_ROW = 6  # observed, min, max, batches, lo_sum, hi_sum


def _base(o: Observer) -> dict[str, Any]:
    """What this rank already shares with the others (the result of the previous sync)."""
    return o.__dict__.setdefault("_quanta_synced", {"batches": 0, "lo_sum": 0.0, "hi_sum": 0.0,
                                                    "hist": None, "grid": None})


def _row(o: Observer) -> torch.Tensor:
    """This rank's contribution: [observed, min, max, batches, lo_sum, hi_sum] (deltas since the
    last sync for the counts and sums)."""
    base = _base(o)
    row = torch.zeros(_ROW, dtype=torch.float64)
    row[0] = float(o.observed)
    row[1], row[2] = float(o.min_val), float(o.max_val)
    row[3] = float(int(o.batches) - base["batches"])
    if isinstance(o, PercentileObserver):
        row[4] = float(o.lo_sum) - base["lo_sum"]
        row[5] = float(o.hi_sum) - base["hi_sum"]
    return row


def _merge(o: Observer, rows: torch.Tensor) -> None:
    """Set ``o`` from every rank's row (``rows``: [world, _ROW], rank order)."""
    base = _base(o)
    seen = rows[:, 0] > 0
    if not bool(seen.any()):
        return
    lo, hi = rows[seen, 1], rows[seen, 2]
    if isinstance(o, MovingAverageMinMaxObserver):  # mean of the ranks' averages, in rank order
        new_lo, new_hi = sum(lo.tolist()) / len(lo), sum(hi.tolist()) / len(hi)
    else:
        new_lo, new_hi = float(lo.min()), float(hi.max())
    with torch.no_grad():
        _set(o, "min_val", torch.tensor(new_lo, dtype=torch.float32))
        _set(o, "max_val", torch.tensor(new_hi, dtype=torch.float32))
        base["batches"] += int(sum(rows[:, 3].tolist()))
        o.batches.fill_(base["batches"])
        if isinstance(o, PercentileObserver):
            base["lo_sum"] += sum(rows[:, 4].tolist())
            base["hi_sum"] += sum(rows[:, 5].tolist())
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
    per_channel = [name for name, o in named if o.spec.per_channel]
    if per_channel:
        raise DistributedError(f"{per_channel[0]}: per-channel activation observers cannot be synced")
    header = torch.tensor([_fingerprint([n for n, _ in named]), float(len(named)), 0.0,
                           float(local_batches), 0.0, 0.0], dtype=torch.float64)
    rows = [header] + [_row(o) for _, o in named]
    step = f"syncing {len(named)} observers (ranges)"
    gathered = all_gather(step, torch.stack(rows), group=group)
    headers = torch.stack([g[0] for g in gathered])
    if not bool((headers[:, :2] == headers[0, :2]).all()):
        bad = int((headers[:, :2] != headers[0, :2]).any(dim=1).nonzero()[0])
        raise DistributedError(
            f"rank {rank()}: rank {bad} prepared a different model ({int(headers[bad, 1])} observers, "
            f"rank 0 has {int(headers[0, 1])}): prepare the same model with the same config on every rank"
        )
    per_rank = torch.stack([g[1:] for g in gathered])  # [world, observers, _ROW]
    hists = [o for _, o in named if isinstance(o, HistogramObserver)]
    local_grids = {id(o): o.current_grid() for o in hists if o.observed}  # before min/max widen
    for i, (_, o) in enumerate(named):
        _merge(o, per_rank[:, i])
    _sync_histograms([o for o in hists if o.observed], local_grids, group)
    return int(sum(headers[:, 3].tolist()))


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
