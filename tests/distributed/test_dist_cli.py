"""``quanta quantize --nproc 2``: calibration on two gloo ranks equals one process, bit for bit."""

import torch

import quanta
from quanta.cli import main
from quanta.zoo.mnist import cli_factory, load_pretrained_mnist_cnn


def test_nproc_2_equals_one_process(tmp_path, capsys):
    out = tmp_path / "mnist.quanta.safetensors"
    code = main(["quantize", "quanta.zoo.mnist:cli_factory", "--nproc", "2", "--timeout", "60",
                 "--batches", "4", "--out", str(out)])  # 4 batches of 100 images: 2 per rank
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "static, 2 processes" in printed.out
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: conv float sums depend on the thread count
    try:
        factory = cli_factory()
        single = quanta.quantize(factory["model"], factory["calib"][:4],
                                 example_inputs=factory["example_inputs"], show_progress=False)
    finally:
        torch.set_num_threads(threads)
    loaded = quanta.load(out, load_pretrained_mnist_cnn()).state_dict()
    expected = single.state_dict()
    assert loaded.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(loaded[k], expected[k])] == []


def test_nproc_needs_static_mode(tmp_path, capsys):
    code = main(["quantize", "quanta.zoo.mnist:cli_factory", "--nproc", "2", "--mode", "dynamic",
                 "--out", str(tmp_path / "m.quanta.safetensors")])
    assert code == 2
    assert "--nproc calibrates across processes: it needs --mode static" in capsys.readouterr().err
