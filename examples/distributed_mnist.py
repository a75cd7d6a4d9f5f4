"""Calibration and quantization-aware training on several processes (torch.distributed, gloo, CPU).

Run:  torchrun --nproc-per-node 2 examples/distributed_mnist.py [--steps N] [--out DIR]

Every rank runs this script. Static PTQ: each rank calibrates on its share of the batches and
``quanta.calibrate`` syncs the observers, so every rank converts to the same int8 model (equal
to one process calibrating on all batches). QAT: ``quanta.distributed.prepare_ddp`` wraps the
QAT model in DistributedDataParallel with the fake-quant observers and BatchNorm statistics
synced across ranks. ``quanta.save`` writes on rank 0 only, atomically.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import quanta
from quanta.distributed import prepare_ddp, shard
from quanta.zoo.mnist import evaluate, load_mnist, load_pretrained_mnist_cnn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=62, help="QAT steps of 64 images (default: one epoch)")
    parser.add_argument("--out", default=".", help="folder for the two .quanta.safetensors files")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    model = load_pretrained_mnist_cnn()

    # static PTQ: 10 batches of 100 images, each rank calibrates on its share
    batches = [train_x[i:i + 100] for i in range(0, 1000, 100)]
    prepared = quanta.prepare(model, train_x[:1])
    quanta.calibrate(prepared, shard(batches), show_progress=False)  # observers synced here
    ptq = quanta.convert(prepared)
    quanta.save(ptq, Path(args.out) / "mnist_ptq.quanta.safetensors")  # rank 0 writes

    # QAT under DistributedDataParallel: every rank takes its 1/world of each batch of 64
    qat = quanta.prepare_qat(model.train(), train_x[:64])  # the same example on every rank
    ddp = prepare_ddp(qat, sync_batchnorm=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)
    for step in range(args.steps):
        rows = slice(step * 64 + rank, (step + 1) * 64, world)
        loss = F.cross_entropy(ddp(train_x[rows]), train_y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    qmodel = quanta.convert(ddp)  # the same int8 model on every rank
    quanta.save(qmodel, Path(args.out) / "mnist_qat.quanta.safetensors")
    accuracy = evaluate(qmodel, test_x, test_y)
    agreed = torch.tensor([accuracy, -accuracy])
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"ranks: {world}")
        print(f"PTQ int8 accuracy: {evaluate(ptq, test_x, test_y):.2f} %")
        same = float(agreed[0]) == -float(agreed[1])
        print(f"QAT int8 accuracy: {accuracy:.2f} % (same on every rank: {same})", flush=True)
    dist.barrier()  # every rank is done with the process group
    # Leave without tearing down. torch 2.13's gloo process group can deadlock in its destructor:
    # it joins its worker thread while holding the GIL, and that thread may be freeing a finished
    # collective's tensors, which needs the GIL (seen in the tests: at destroy_process_group, at
    # interpreter exit, and when DistributedDataParallel's reducer was freed as main() returned).
    # os._exit runs no destructor; multiprocessing's children (quanta.distributed.launch) leave
    # the same way. Everything is written and flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
