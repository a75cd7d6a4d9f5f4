"""Train :class:`quanta.zoo.mnist.MnistCNN` on the 4,000-image train split.

Deterministic (seeded, 2 threads). Writes ``src/quanta/zoo/weights/mnist_cnn.safetensors``
atomically (temp file + ``os.replace``). Usage: ``python scripts/train_mnist.py [--epochs N]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from quanta.zoo.mnist import WEIGHTS_PATH, MnistCNN, evaluate, load_mnist


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random integer translation by up to ``max_shift`` pixels (background-padded)."""
    n = x.shape[0]
    bg = float(x.min())
    padded = F.pad(x, (max_shift,) * 4, value=bg)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28]
    return out


def train(epochs: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> MnistCNN:
    """Train a fresh MnistCNN with Adam + one-cycle LR and shift augmentation."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_mnist("train")
    model = MnistCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((x.shape[0] + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            xb = augment(x[idx], gen)
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
        print(f"epoch {epoch + 1}/{epochs} loss {total / x.shape[0]:.4f}", flush=True)
    return model.eval()


def save_atomic(model: torch.nn.Module, path: Path) -> None:
    """Write the state dict as safetensors via a temp file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    model = train(args.epochs)
    elapsed = time.perf_counter() - t0
    xt, yt = load_mnist("test")
    acc = evaluate(model, xt, yt)
    print(f"trained in {elapsed:.1f}s; held-out test accuracy {acc:.2f}%")
    save_atomic(model, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
