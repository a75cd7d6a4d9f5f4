"""The bundled pretrained MNIST CNN as an ExecuTorch program whose int8 ops run in XNNPACK, checked
against the quantized model it came from.

``numerics="xnnpack"`` makes quanta round float inputs and int8 adds the way XNNPACK does, so the
.pte reproduces the quantized model (the default rounds as ONNX Runtime does, for the .onnx).

Run: python examples/executorch_mnist.py   (needs: pip install 'quanta[executorch]')
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch

import quanta
from quanta.io.executorch_export import load_pte, lower_executorch, run_pte
from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn


def main() -> None:
    torch.set_num_threads(2)
    train_x, _ = load_mnist("train")
    test_x, test_y = load_mnist("test")
    config = quanta.QuantConfig(numerics="xnnpack", backend="reference")  # the integer reference
    qmodel = quanta.quantize(load_pretrained_mnist_cnn(), [train_x[i:i + 100] for i in range(0, 500, 100)],
                             config=config, show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        # quanta.export_executorch(qmodel, example, path) writes the file in one call (atomically);
        # lower_executorch also says what XNNPACK took
        program, delegation = lower_executorch(qmodel, test_x[:1])
        path = Path(tmp) / "mnist.pte"
        path.write_bytes(program.buffer)
        print(f"wrote {path.name}: {path.stat().st_size / 1024:.1f} KiB")
        print(delegation.summary())
        method = load_pte(path)
        got = torch.cat([run_pte(method, test_x[i:i + 1]) for i in range(len(test_x))])
        times = []
        for _ in range(200):
            start = time.perf_counter()
            run_pte(method, test_x[:1])
            times.append(time.perf_counter() - start)
    want = qmodel(test_x)
    quantum = float(qmodel.get_submodule("classifier").output_scale)
    within = float(((got - want).abs() <= quantum * 1.0001).float().mean())
    agree = float((got.argmax(1) == want.argmax(1)).float().mean())
    accuracy = 100 * float((got.argmax(1) == test_y).float().mean())
    print(f".pte vs quantized model on {len(test_x)} test images: {100 * within:.1f} % of outputs within one "
          f"quantum, top-1 agreement {agree:.3f}; .pte accuracy {accuracy:.2f} %")
    print(f".pte latency, batch 1: {1e3 * statistics.median(times):.3f} ms (median of 200)")


if __name__ == "__main__":
    main()
