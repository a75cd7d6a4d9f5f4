"""Static int8 PTQ of the bundled pretrained MNIST CNN, step by step, then save and reload.

Run: python examples/static_mnist.py
"""

import tempfile
from pathlib import Path

import torch

import quanta
from quanta.zoo.mnist import evaluate, load_mnist, load_pretrained_mnist_cnn


def main() -> None:
    torch.set_num_threads(2)
    model = load_pretrained_mnist_cnn()
    train_x, _ = load_mnist("train")
    test_x, test_y = load_mnist("test")

    prepared = quanta.prepare(model, train_x[:8])  # fuse + observers, no model edits
    quanta.calibrate(prepared, [train_x[i:i + 100] for i in range(0, 1000, 100)])
    qmodel = quanta.convert(prepared)
    print(quanta.report(qmodel))

    print(f"float accuracy {evaluate(model, test_x, test_y):.2f} %, "
          f"int8 accuracy {evaluate(qmodel, test_x, test_y):.2f} %")
    print(f"runtime: {quanta.runtime_status(qmodel)}")  # built on the first call, checked vs eager
    with tempfile.TemporaryDirectory() as tmp:
        path = quanta.save(qmodel, Path(tmp) / "mnist.quanta.safetensors")
        reloaded = quanta.load(path, load_pretrained_mnist_cnn())
        same = torch.equal(reloaded(test_x[:64]), qmodel(test_x[:64]))
        print(f"saved {path.stat().st_size / 1024:.1f} KiB; reloaded outputs identical: {same}")


if __name__ == "__main__":
    main()
