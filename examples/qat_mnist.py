"""Quantization-aware training: one epoch from the float checkpoint, then int8.

Run: python examples/qat_mnist.py
"""

import torch
import torch.nn.functional as F

import quanta
from quanta.zoo.mnist import evaluate, load_mnist, load_pretrained_mnist_cnn


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    qat = quanta.prepare_qat(load_pretrained_mnist_cnn().train(), train_x[:8])
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3, momentum=0.9)
    for i in range(0, len(train_x), 64):
        loss = F.cross_entropy(qat(train_x[i:i + 64]), train_y[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    quanta.freeze(qat)
    qmodel = quanta.convert(qat.eval())
    print(f"QAT int8 accuracy: {evaluate(qmodel, test_x, test_y):.2f} %")


if __name__ == "__main__":
    main()
