"""torch.distributed plumbing for quanta: the process group it talks on, collectives that fail
with a clear ``DistributedError`` instead of hanging, and ``shard`` for calibration data.

quanta runs on PyTorch's own engine (gloo on CPU, any backend torch supports for the default
group); it adds no transport. Every collective quanta issues goes through ``collective``, so a
rank that died or hangs surfaces on the others as one error naming this rank, the step and the
timeout, within the process group's timeout.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from quanta.errors import QuantaError

T = TypeVar("T")


class DistributedError(QuantaError, RuntimeError):
    """A collective across ranks failed: a rank died, hung past the timeout, or ranks disagree."""


def active() -> bool:
    """True when a torch.distributed process group is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def timeout_seconds(group: Any = None) -> float | None:
    """The timeout of ``group`` (default group) in seconds, where torch exposes it."""
    try:
        backend = (group or dist.group.WORLD)._get_backend(torch.device("cpu"))
        return float(backend.options._timeout.total_seconds())
    except Exception:  # a backend without options, or a torch that moved them
        return None


_GROUPS: dict[tuple[int, float], Any] = {}


def quanta_group(timeout: float | None = None) -> Any:
    """A gloo group over all ranks for quanta's own collectives (created once, collectively).

    Keeping observer and BatchNorm syncs off the default group means they never interleave with
    DistributedDataParallel's gradient all-reduces, whatever the backend of the default group.
    """
    if timeout is None:
        timeout = timeout_seconds() or 1800.0
    key = (id(dist.group.WORLD), float(timeout))
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    return _GROUPS[key]


def collective(step: str, fn: Callable[..., T], *args: Any, group: Any = None, **kwargs: Any) -> T:
    """Run one torch.distributed collective; a failure becomes a ``DistributedError`` naming
    this rank, ``step`` and the timeout (a peer died, or did not answer in time)."""
    started = time.monotonic()
    try:
        return fn(*args, group=group, **kwargs)
    except Exception as e:  # gloo raises RuntimeError / DistBackendError subclasses
        waited = time.monotonic() - started
        limit = timeout_seconds(group)
        limit_text = f"{limit:g} s" if limit else "the process group's timeout"
        detail = " ".join(str(e).split())[:300]
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {step} failed after {waited:.1f} s: another rank died "
            f"or did not reach this step within {limit_text} ({type(e).__name__}: {detail})"
        ) from e


def all_gather(step: str, tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
    size = dist.get_world_size(group)
    out = [torch.empty_like(tensor) for _ in range(size)]
    collective(step, dist.all_gather, out, tensor.contiguous(), group=group)
    return out


def all_reduce(step: str, tensor: torch.Tensor, op: Any = None, group: Any = None) -> torch.Tensor:
    """In-place all_reduce of ``tensor`` (``op`` defaults to SUM)."""
    collective(step, dist.all_reduce, tensor, op=op or dist.ReduceOp.SUM, group=group)
    return tensor


def shard(data: Iterable[T] | Any, rank_: int | None = None, world: int | None = None) -> Any:
    """This rank's share of ``data``: every ``world``-th item starting at ``rank``.

    A list or tuple gives a list; a map-style ``Dataset`` (``__len__`` and ``__getitem__``) a
    ``Subset`` (wrap it in a ``DataLoader`` with workers to stream data larger than memory); any
    other iterable (a DataLoader, a generator) is consumed lazily, item by item. Without a process
    group the data is returned whole.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"shard: rank {r} is not in [0, {w})")
    if w == 1:
        return data
    if isinstance(data, (list, tuple)):
        return list(data[r::w])
    if isinstance(data, torch.Tensor):
        raise TypeError("shard: got a single Tensor; pass a list of batches or a Dataset")
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        return torch.utils.data.Subset(data, range(r, len(data), w))
    return _Strided(data, r, w)


class _Strided:
    """Every ``step``-th item of an iterable from ``start``, lazily; knows its length if it can."""

    def __init__(self, data: Iterable[Any], start: int, step: int) -> None:
        self.data, self.start, self.step = data, start, step

    def __iter__(self):  # noqa: ANN204
        return itertools.islice(iter(self.data), self.start, None, self.step)

    def __len__(self) -> int:
        n = len(self.data)  # type: ignore[arg-type]  # TypeError: no length, as for the data
        return max(0, (n - self.start + self.step - 1) // self.step)
