"""Quantization-aware training under DistributedDataParallel: ``prepare_ddp``.

What keeps the ranks bit-identical (weights already are: DDP averages gradients):
- **Fake-quant observers.** Each moving-average update uses the *global* batch's min/max (one
  all_reduce MAX of ``[-min, max]`` per observer per step), so every rank computes the same
  average, equal to single-process QAT on the global batch. The observers start from
  ``sync_observers`` (pass the same ``example_inputs`` to ``prepare_qat`` on every rank to
  start exactly where one process would).
- **BatchNorm** (``sync_batchnorm=True``): train-mode statistics over the global batch (torch's
  ``nn.SyncBatchNorm`` runs on GPUs only; ``SyncBatchNorm`` here is two differentiable
  all_reduces). With ``sync_batchnorm=False`` each rank normalizes with its own batch and its
  running statistics drift apart; ``quanta.freeze`` and ``quanta.convert`` then first average
  them across ranks (collectives: call them on every rank).
quanta's syncs run on their own gloo group, never interleaved with DDP's gradient reduction.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from quanta.distributed.calibration import sync_observers
from quanta.distributed.collective import (
    DistributedError,
    active,
    all_gather,
    all_reduce,
    quanta_group,
)
from quanta.modules.qat import FakeQuantize


class _GroupRef:
    """Holds a process group inside a model: copies share it; pickling drops it (to None)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict) -> _GroupRef:
        return self

    def __reduce__(self) -> tuple:
        return (_none, ())


def _none() -> None:
    return None


class RangeSync(_GroupRef):
    """Called by an observer with a batch's (min, max): returns the global batch's."""

    def __call__(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.stack([-lo.reshape(-1), hi.reshape(-1)]).float()
        all_reduce("syncing a fake-quant observer's batch range", both, dist.ReduceOp.MAX, self.group)
        return (-both[0]).reshape(lo.shape).to(lo.dtype), both[1].reshape(hi.shape).to(hi.dtype)


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce SUM whose gradient is the all_reduce SUM of the output gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return all_reduce("SyncBatchNorm statistics", x.clone(), group=group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_reduce("SyncBatchNorm gradients", grad.clone(), group=ctx.group), None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose train-mode statistics cover the batches of all ranks (CPU, any backend).

    Built from an existing BatchNorm, sharing its parameters and running statistics. Eval mode
    is plain BatchNorm. Gradients flow through the all_reduces (as in torch's SyncBatchNorm).
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, group: Any) -> None:
        nn.Module.__init__(self)
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(self, name, getattr(bn, name))
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))
        self.__dict__["_group"] = _GroupRef(group)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__.get("_group")
        if not self.training or group is None:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype)
        sums = _SumAcrossRanks.apply(torch.cat([x.sum(dims), count]), group.group)
        n = sums[-1]
        mean = sums[:-1] / n
        centered = x - mean.reshape(shape)
        var = _SumAcrossRanks.apply((centered * centered).sum(dims), group.group) / n
        y = centered * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y


def _swap_batchnorms(model: nn.Module, group: Any) -> int:
    """Replace every BatchNorm under ``model`` (inside QAT modules too) by a SyncBatchNorm."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncBatchNorm):
                setattr(parent, name, SyncBatchNorm(child, group))
                swapped += 1
    return swapped


class _AverageBatchNorm(_GroupRef):
    """Before ``freeze``/``convert``: the mean over ranks of every BatchNorm's running statistics."""

    def __call__(self, model: nn.Module) -> None:
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.running_mean is not None]
        if not bns:
            return
        flat = torch.cat([torch.cat([b.running_mean, b.running_var]).double() for b in bns])
        rows = all_gather(f"averaging the running statistics of {len(bns)} BatchNorms", flat, self.group)
        mean = sum(rows[1:], rows[0].clone()) / len(rows)  # rank order: identical on every rank
        offset = 0
        with torch.no_grad():
            for b in bns:
                n = b.running_mean.numel()
                b.running_mean.copy_(mean[offset:offset + n])
                b.running_var.copy_(mean[offset + n:offset + 2 * n])
                offset += 2 * n


def prepare_ddp(qat_model: nn.Module, *, sync_batchnorm: bool = False, timeout: float | None = None,
                **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """Wrap a model from ``quanta.prepare_qat`` in DistributedDataParallel for QAT on all ranks.

    A collective: call it on every rank after ``torch.distributed.init_process_group``. Syncs
    the observers, makes every fake-quant update use the global batch range, optionally swaps
    BatchNorms for ``SyncBatchNorm``, and returns ``DistributedDataParallel(qat_model,
    **ddp_kwargs)``. Train it as usual; ``quanta.convert(ddp_model)`` gives the same int8 model
    on every rank, and ``quanta.save`` writes it once (rank 0).
    """
    from quanta.api import get_state

    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError("prepare_ddp needs torch.distributed.init_process_group(...) first")
    state = get_state(qat_model)
    if state.config.mode != "qat":
        raise DistributedError("prepare_ddp expects a model returned by quanta.prepare_qat")
    group = quanta_group(timeout)
    if active():
        sync_observers(qat_model, group=group)
    sync = RangeSync(group)
    fake_quants = [m for root in (qat_model, state) for m in root.modules() if isinstance(m, FakeQuantize)]
    for fq in fake_quants:
        fq.__dict__["range_sync"] = sync
    if sync_batchnorm:
        _swap_batchnorms(qat_model, group)
    else:
        state.__dict__["before_convert"] = _AverageBatchNorm(group)
    return nn.parallel.DistributedDataParallel(qat_model, **ddp_kwargs)
