"""Functions the distributed tests run on each rank (importable, so the launcher can pickle them)."""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import quanta
from quanta.config import QuantConfig, QuantSpec
from quanta.distributed import shard
from quanta.distributed.calibration import observers

KINDS = ("minmax", "histogram", "entropy", "percentile", "moving_average")
PRELOAD = ("dist_workers",)  # imported once by the launcher's fork server, not by every rank


class Net(nn.Module):
    """Conv -> ReLU -> residual add -> Linear: observers on modules and on a call site."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        y = y + self.conv2(y)
        return self.fc(torch.flatten(y, 1))


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def batches(n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) * (1 + i) for i in range(n)]


class LazyImages(torch.utils.data.Dataset):
    """Images made from their index on demand: nothing is held in memory."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(100 + i)) * (1 + i % 7)


def config(kind: str) -> QuantConfig:
    return QuantConfig(activation=QuantSpec(dtype="uint8", symmetric=False, per_channel=False, observer=kind))


def observer_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in o.state_dict().items()} for name, o in observers(model)}


def calibrate_kinds(data: list[torch.Tensor], more: list[torch.Tensor]) -> dict:
    """For each observer kind: prepare, calibrate (twice: ``data`` then ``more``), convert."""
    out = {}
    for kind in KINDS:
        prepared = quanta.prepare(net(), data[0], config(kind))
        quanta.calibrate(prepared, shard(data), show_progress=False)
        if kind == "histogram":  # a second calibrate adds only its own batches
            quanta.calibrate(prepared, shard(more), show_progress=False)
        out[kind] = {"observers": observer_state(prepared)}
        if kind in ("minmax", "histogram", "percentile"):  # entropy: same histogram, slower search
            out[kind]["model"] = quanta.convert(prepared).state_dict()
    return out


def rank_calibration(out_dir: str) -> dict:
    """Everything the calibration test checks, from one launch of two ranks."""
    result = calibrate_kinds(batches(), batches(3, seed=2))
    # streaming: a lazily generated Dataset, this rank's share, through a DataLoader with workers
    loader = torch.utils.data.DataLoader(shard(LazyImages()), batch_size=4, num_workers=2)
    prepared = quanta.prepare(net(), batches(1)[0], config("histogram"))
    quanta.calibrate(prepared, loader, show_progress=False)
    result["stream"] = observer_state(prepared)
    qmodel = quanta.convert(prepared)
    rank = dist.get_rank()
    saved = quanta.save(qmodel, os.path.join(out_dir, "model.quanta.safetensors"))
    quanta.save(qmodel, os.path.join(out_dir, f"only-rank{rank}.quanta.safetensors"))
    result["saved"] = str(saved)
    return result


def rank_fault(out_dir: str, fault: str) -> None:
    """Calibrate on a shard; rank 1 dies (``kill``) or hangs (``hang``) on its second batch."""

    class Faulty(list):
        def __iter__(self):  # noqa: ANN204
            for i, b in enumerate(list.__iter__(self)):
                if dist.get_rank() == 1 and i == 1:
                    if fault == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    time.sleep(60)
                yield b

    started = time.monotonic()
    try:
        qmodel = quanta.quantize(net(), Faulty(shard(batches())), show_progress=False)
        quanta.save(qmodel, os.path.join(out_dir, "model.quanta.safetensors"))
    except quanta.QuantaError as e:
        raise type(e)(f"{e} [detected after {time.monotonic() - started:.2f} s]") from None


QAT_STEPS, QAT_BATCH, QAT_LR = 12, 64, 1e-3


def qat_train(world: int = 1, rank: int = 0, sync_batchnorm: bool = True, steps: int = QAT_STEPS):
    """QAT of the pretrained MNIST CNN: ``steps`` SGD steps on global batches of ``QAT_BATCH``
    train images, each rank taking its ``1/world`` of every batch; returns the int8 model."""
    import torch.nn.functional as F

    from quanta.distributed.qat import prepare_ddp
    from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn

    torch.manual_seed(0)
    x, y = load_mnist("train")
    qat = quanta.prepare_qat(load_pretrained_mnist_cnn().train(), x[:QAT_BATCH])  # same on all ranks
    model = prepare_ddp(qat, sync_batchnorm=sync_batchnorm) if world > 1 else qat
    opt = torch.optim.SGD(model.parameters(), lr=QAT_LR, momentum=0.9)
    for step in range(steps):
        rows = slice(step * QAT_BATCH + rank, (step + 1) * QAT_BATCH, world)
        loss = F.cross_entropy(model(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return quanta.convert(model)


def rank_qat(out_dir: str) -> dict:
    """DDP QAT with SyncBatchNorm (compared with one process), and a short run without it."""
    from quanta.zoo.mnist import evaluate, load_mnist

    rank, world = dist.get_rank(), dist.get_world_size()
    test_x, test_y = load_mnist("test")
    qmodel = qat_train(world, rank)
    quanta.save(qmodel, os.path.join(out_dir, "qat.quanta.safetensors"))
    local_bn = qat_train(world, rank, sync_batchnorm=False, steps=1)
    return {"model": qmodel.state_dict(), "accuracy": evaluate(qmodel, test_x, test_y),
            "local_bn": local_bn.state_dict()}
