"""The ``quanta`` command driven as a user drives it: in a subprocess, on the real MNIST CNN."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import quanta
from quanta.cli import main
from quanta.zoo.mnist import evaluate, load_mnist, load_pretrained_mnist_cnn

MNIST = "quanta.zoo.mnist:cli_factory"
COMMANDS = ("quantize", "report", "export", "bench", "demo")

QAT_FACTORY = '''
import torch
import torch.nn.functional as F
from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn

def make():
    x, y = load_mnist("train")
    def train(qat_model):
        opt = torch.optim.SGD(qat_model.parameters(), lr=1e-3, momentum=0.9)
        qat_model.train()
        for i in range(4):
            loss = F.cross_entropy(qat_model(x[i * 64:(i + 1) * 64]), y[i * 64:(i + 1) * 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {"model": load_pretrained_mnist_cnn(), "calib": [x[:100]], "train": train}

def plain():
    return load_pretrained_mnist_cnn()
'''


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quanta.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quanta: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def test_data() -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist("test")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "mnist.quanta.safetensors"
    result = run("quantize", MNIST, "--batches", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"saved {out}" in result.stdout
    assert "10 int8, 0 float" in result.stdout
    return out


@pytest.fixture(scope="module")
def factory_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("user") / "my_models.py"
    path.write_text(textwrap.dedent(QAT_FACTORY))
    return path


def saved_accuracy(path: Path, test_data: tuple[torch.Tensor, torch.Tensor]) -> float:
    qmodel = quanta.load(path, load_pretrained_mnist_cnn())
    return evaluate(qmodel, *test_data)


def test_quantize_static_keeps_accuracy(saved: Path, test_data: tuple[torch.Tensor, torch.Tensor]) -> None:
    float_acc = evaluate(load_pretrained_mnist_cnn(), *test_data)
    assert saved_accuracy(saved, test_data) >= float_acc - 0.5


def test_report_table(saved: Path) -> None:
    result = run("report", str(saved))
    assert result.returncode == 0, result.stderr
    for text in ("QuantizedConv2d", "QuantizedLinear", "block2.conv2", "classifier", "int8 ops: 10"):
        assert text in result.stdout


def test_report_json_lists_every_conv_and_linear_as_int8(saved: Path) -> None:
    result = run("report", str(saved), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mode"] == "static" and report["format_version"] == 1
    rows = {r["name"]: r for r in report["layers"]}
    float_model = load_pretrained_mnist_cnn()
    weighted = [n for n, m in float_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 8
    assert all(rows[n]["precision"] == "int8" for n in weighted)
    assert report["summary"]["int8"] == 10 and report["summary"]["float"] == 0


def test_report_with_model_loads_the_file(saved: Path) -> None:
    by_manifest = json.loads(run("report", str(saved), "--json").stdout)
    result = run("report", str(saved), "--json", "--model", MNIST)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layers"] == by_manifest["layers"]


def test_bench_json(saved: Path) -> None:
    result = run("bench", str(saved), "--model", MNIST, "--batch-sizes", "1", "8", "--repeats", "2",
                 "--time-budget", "1", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    assert json.loads(result.stdout)["runtime"].startswith("graph ("), result.stdout
    assert [r["batch_size"] for r in rows] == [1, 8]
    assert all(r["float_ms"] > 0 and r["int8_ms"] > 0 and r["repeats"] >= 2 for r in rows)


def test_export_onnx_runs_in_onnxruntime(saved: Path, tmp_path: Path,
                                         test_data: tuple[torch.Tensor, torch.Tensor]) -> None:
    if not hasattr(quanta, "export_onnx"):
        pytest.skip("quanta.export_onnx not available yet")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "mnist.onnx"
    result = run("export", str(saved), "--model", MNIST, "--onnx", str(out), "--weight-format", "uint8")
    assert result.returncode == 0, result.stderr
    assert "weight format uint8" in result.stdout
    import onnx

    weights = [i for i in onnx.load(str(out)).graph.initializer if i.name.endswith(".weight")]
    assert weights and all(i.data_type == onnx.TensorProto.UINT8 for i in weights)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images, labels = test_data
    logits = session.run(None, {session.get_inputs()[0].name: images[:500].numpy()})[0]
    onnx_acc = 100.0 * float((torch.from_numpy(logits).argmax(1) == labels[:500]).float().mean())
    float_acc = evaluate(load_pretrained_mnist_cnn(), images[:500], labels[:500])
    assert onnx_acc >= float_acc - 1.0


@pytest.mark.slow
def test_export_pte_runs_in_executorch(saved: Path, tmp_path: Path,
                                       test_data: tuple[torch.Tensor, torch.Tensor]) -> None:
    pytest.importorskip("executorch")
    from quanta.io.executorch_export import load_pte, run_pte

    out = tmp_path / "mnist.pte"
    result = run("export", str(saved), "--model", MNIST, "--pte", str(out))
    assert result.returncode == 0, result.stderr
    assert "14 int8 ops, 2 fp32 ops" in result.stdout and "fp32 classifier: float output" in result.stdout
    assert "quantized with numerics='onnxruntime'" in result.stdout  # says how to match XNNPACK
    assert "UserWarning" not in result.stderr  # said once, in the summary
    images, labels = test_data
    method = load_pte(out)
    logits = torch.cat([run_pte(method, images[i:i + 1]) for i in range(200)])
    assert float((logits.argmax(1) == labels[:200]).float().mean()) >= 0.97
    strict = run("export", str(saved), "--model", MNIST, "--pte", str(tmp_path / "s.pte"), "--strict")
    assert strict.returncode != 0 and "'classifier'" in strict.stderr and not (tmp_path / "s.pte").exists()


def test_quantize_for_xnnpack_numerics(tmp_path: Path) -> None:
    out = tmp_path / "x.quanta.safetensors"
    result = run("quantize", MNIST, "--batches", "2", "--numerics", "xnnpack", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert quanta.load(out, load_pretrained_mnist_cnn())._quanta.config.numerics == "xnnpack"


def test_quantize_from_pt_file_with_skip(tmp_path: Path) -> None:
    calib = tmp_path / "calib.pt"
    torch.save(load_mnist("train")[0][:200], calib)
    out = tmp_path / "skip.quanta.safetensors"
    result = run("quantize", "quanta.zoo.mnist:load_pretrained_mnist_cnn", "--calib", str(calib),
                 "--batch-size", "50", "--batches", "3", "--skip", "classifier", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(run("report", str(out), "--json").stdout)["layers"]}
    assert rows["classifier"]["precision"] == "float"
    assert "excluded by config" in rows["classifier"]["reason"]
    assert rows["fc1"]["precision"] == "int8"


def test_quantize_dynamic_from_a_python_file(factory_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "dyn.quanta.safetensors"
    result = run("quantize", f"{factory_file}:plain", "--mode", "dynamic", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(run("report", str(out), "--json").stdout)
    rows = {r["name"]: r for r in report["layers"]}
    assert report["mode"] == "dynamic"
    assert rows["fc1"]["precision"] == "int8" and rows["conv1"]["precision"] == "float"


LLAMA_FACTORY = '''
import torch
import transformers

def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    return {"model": transformers.LlamaForCausalLM(cfg).eval(), "example_inputs": (ids,)}
'''


def test_quantize_dynamic_with_rotation(factory_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    path = tmp_path / "llama_factory.py"
    path.write_text(textwrap.dedent(LLAMA_FACTORY))
    out = tmp_path / "llama.quanta.safetensors"
    result = run("quantize", f"{path}:llama", "--mode", "dynamic", "--rotate", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "residual stream of width 48 rotated" in result.stdout, result.stdout
    assert json.loads(run("report", str(out), "--json").stdout)["mode"] == "dynamic"
    result = run("quantize", f"{factory_file}:plain", "--mode", "dynamic", "--rotate", "--out", str(out))
    assert_one_line_error(result, 2, "--rotate needs an example input")


def test_quantize_dynamic_and_weight_only_with_gptq(factory_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "gptq.quanta.safetensors"
    for mode in ("dynamic", "weight_only"):
        result = run("quantize", f"{factory_file}:make", "--mode", mode, "--gptq", "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert "GPTQ: 2 Linear layers rounded" in result.stdout, result.stdout  # the CNN's two Linears
        report = json.loads(run("report", str(out), "--json").stdout)
        assert report["mode"] == mode
    result = run("quantize", f"{factory_file}:plain", "--mode", "weight_only", "--gptq", "--out", str(out))
    assert_one_line_error(result, 2, "--gptq in weight_only mode needs calibration data")


@pytest.mark.slow
def test_quantize_qat_with_factory_train(factory_file: Path, tmp_path: Path,
                                         test_data: tuple[torch.Tensor, torch.Tensor]) -> None:
    out = tmp_path / "qat.quanta.safetensors"
    result = run("quantize", f"{factory_file}:make", "--mode", "qat", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(run("report", str(out), "--json").stdout)["mode"] == "qat"
    float_acc = evaluate(load_pretrained_mnist_cnn(), *test_data)
    assert saved_accuracy(out, test_data) >= float_acc - 1.0


def test_qat_without_train_function_is_a_usage_error(tmp_path: Path) -> None:
    result = run("quantize", MNIST, "--mode", "qat", "--out", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, 2, "qat mode needs a train function")


@pytest.mark.parametrize("args, code, words", [
    (["report", "missing.quanta.safetensors"], 1, ["file not found"]),
    (["quantize", "no_colon_here", "--out", "x.safetensors"], 2, ["MODEL must be"]),
    (["quantize", "no_such_module_xyz:make", "--out", "x.safetensors"], 1, ["no_such_module_xyz"]),
    (["quantize", "quanta.zoo.mnist:no_such_factory", "--out", "x.safetensors"], 1, ["no_such_factory"]),
    (["quantize", "quanta.zoo.mnist:MnistCNN", "--out", "x.safetensors"], 2, ["needs calibration data"]),
    (["quantize", MNIST, "--config", '{"backend": "nope"}', "--out", "x.safetensors"], 2, ["--config"]),
    (["quantize", MNIST], 2, ["--out"]),
    (["frobnicate"], 2, ["invalid choice"]),
])
def test_bad_input_gives_one_line_error(args: list[str], code: int, words: list[str], tmp_path: Path) -> None:
    assert_one_line_error(run(*args, cwd=tmp_path), code, *words)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "not_safetensors"])
def test_damaged_file_gives_one_line_error(saved: Path, tmp_path: Path, damage: str) -> None:
    data = bytearray(saved.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_byte":
        data[-50] ^= 0xFF
    else:
        data = bytearray(b"hello, not a model file")
    bad = tmp_path / "bad.quanta.safetensors"
    bad.write_bytes(bytes(data))
    assert_one_line_error(run("report", str(bad)), 1)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.quanta.safetensors"
    bad.write_bytes(b"\x00" * 16)
    result = run("report", str(bad), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "FormatError" in result.stderr


def test_help_has_examples() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout and all(c in result.stdout for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # in-process: the same parser the subprocess tests run, without another torch start-up
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert f"usage: quanta {command}" in out and "examples:" in out and f"quanta {command} " in out


@pytest.mark.parametrize("launcher", ["python -m quanta", "quanta script"])
def test_launchers(launcher: str) -> None:
    if launcher == "quanta script":
        script = Path(sys.executable).parent / "quanta"
        if not script.exists():
            pytest.skip("the quanta console script is not installed next to this interpreter")
        cmd = [str(script)]
    else:
        cmd = [sys.executable, "-m", "quanta"]
    result = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"quanta {quanta.__version__}"


@pytest.mark.slow
def test_demo_prints_accuracy_size_and_latency() -> None:
    result = run("demo", "--repeats", "2", "--time-budget", "1")
    assert result.returncode == 0, result.stderr
    accuracy = re.search(r"top-1 accuracy.*?([\d.]+) %.*?([\d.]+) %", result.stdout)
    assert accuracy, result.stdout
    float_acc, int8_acc = map(float, accuracy.groups())
    assert float_acc > 98.0 and int8_acc >= float_acc - 0.5
    assert "model size" in result.stdout and "latency, batch 1 " in result.stdout
    assert "QuantizedConv2d" in result.stdout


ATTENTION_FACTORY = '''
import math
import torch
from torch import nn

class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, 4, 8).transpose(1, 2) for y in self.qkv(x).split(32, -1))
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(8), -1)
        return self.out(torch.matmul(p, v).transpose(1, 2).reshape(b, t, 32))

def make():
    torch.manual_seed(0)
    return {"model": Attention().eval(), "calib": [torch.randn(2, 16, 32) for _ in range(3)]}
'''


@pytest.mark.parametrize("flag", [(), ("--activation-matmul", "int8")])
def test_quantize_with_int8_attention_matmuls(tmp_path: Path, flag: tuple[str, ...]) -> None:
    factory = tmp_path / "attention_models.py"
    factory.write_text(textwrap.dedent(ATTENTION_FACTORY))
    out = tmp_path / "attention.quanta.safetensors"
    result = run("quantize", f"{factory}:make", *flag, "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(run("report", str(out), "--json").stdout)
    matmuls = [r["precision"] for r in report["layers"] if r["op"] == "matmul"]
    assert matmuls == (["int8", "int8"] if flag else ["float", "float"])


def test_export_onnx_with_a_dynamic_sequence(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    factory = tmp_path / "attention_models.py"
    factory.write_text(textwrap.dedent(ATTENTION_FACTORY))
    saved, out = tmp_path / "attention.quanta.safetensors", tmp_path / "attention.onnx"
    assert run("quantize", f"{factory}:make", "--out", str(saved)).returncode == 0
    export = ("export", str(saved), "--model", f"{factory}:make", "--onnx", str(out))
    result = run(*export, "--dynamic-dims", "0,1")
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in ((1, 5, 32), (3, 21, 32)):  # calibrated and exported at (2, 16, 32)
        y = session.run(None, {session.get_inputs()[0].name: torch.randn(shape).numpy()})[0]
        assert y.shape == shape
    bad = run(*export, "--dynamic-dims", "0,x")
    assert_one_line_error(bad, 2, "--dynamic-dims")
