"""quanta.export_onnx: a checked QDQ graph that ONNX Runtime runs like quanta's reference."""

from __future__ import annotations

import platform
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import quanta
from quanta.io.onnx_export import OPSET
from quanta.kernels import reference
from quanta.qtensor import QTensor

pytestmark = pytest.mark.isa  # run natively and under scripts/as-avx2 (.ci/run)

ort = pytest.importorskip("onnxruntime")
REFERENCE = quanta.QuantConfig(backend="reference")


def _run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _within_one_quantum(model: torch.nn.Module, onnx_out: np.ndarray, ref_out: torch.Tensor,
                        last: str) -> float:
    """Fraction of outputs within one output quantum of the last quantized layer."""
    quantum = float(model.get_submodule(last).output_scale)
    return float((np.abs(onnx_out - ref_out.numpy()) <= quantum * 1.0001).mean())


@pytest.mark.slow  # natively and capped at AVX2 only: many minutes under QEMU (.ci/run)
def test_mnist_cnn_matches_reference_in_ort(tmp_path: Path) -> None:
    from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn

    x, y = load_mnist("test")
    q = quanta.quantize(load_pretrained_mnist_cnn(), [x[i:i + 50] for i in range(0, 100, 50)],
                        config=REFERENCE, show_progress=False)
    path = quanta.export_onnx(q, x[:1], tmp_path / "mnist.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == 6 and ops.count("Gemm") == 2 and ops.count("Add") == 2
    assert ops.count("QuantizeLinear") >= 8 and ops.count("DequantizeLinear") >= 16
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    weights = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    # 8-bit weights (the reference keeps them) are written as uint8 with zero point 128, the
    # format ORT adds exactly on every CPU; the values are quanta's
    (dq,) = [n for n in proto.graph.node
             if n.op_type == "DequantizeLinear" and n.input[0] == "twin.conv1.weight"]
    w, zp = weights["twin.conv1.weight"], weights[dq.input[2]]
    assert w.dtype == np.uint8 and zp.dtype == np.uint8 and set(zp.tolist()) == {128}
    assert np.array_equal(w.astype(np.int16) - 128, q.conv1.weight.numpy())
    assert weights["twin.block1.conv2.bias"].dtype == np.int32
    assert [a.i for a in dq.attribute if a.name == "axis"] == [0]

    ref = q(x[:200])  # 200 images: the test also runs under emulation (scripts/as-avx2)
    got = np.concatenate([_run_ort(path, x[i:i + 100]) for i in range(0, 200, 100)])
    assert _within_one_quantum(q, got, ref, "classifier") >= 0.999  # measured: 100%
    assert (got == ref.numpy()).mean() >= 0.999  # measured: bit-exact
    assert (got.argmax(1) == y[:200].numpy()).mean() > 0.97
    assert _run_ort(path, x[:1]).shape == (1, 10)
    total, exact, within = _per_op_agreement(q, path, x[:50])
    assert within == total and exact / total >= 0.9999  # measured: every op exact

    # the residual adds (one input arrives through max pooling) run as ORT's int8 QLinearAdd
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "mnist.opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused.count("QLinearAdd") == 2 and "Add" not in fused


def test_fused_gelu_mlp_matches_reference_in_ort(tmp_path: Path) -> None:
    """A Linear with GELU folded in (int8 out to the next Linear) exports as Linear -> GELU -> Q:
    ORT reproduces the reference (GELU of the float-scaled accumulator, then one quantization)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 32)).eval()
    q = quanta.quantize(model, [torch.randn(16, 64) for _ in range(4)], config=REFERENCE,
                        show_progress=False)
    assert q[0].activation == "gelu" and q[0].output_int8
    path = quanta.export_onnx(q, torch.randn(1, 64), tmp_path / "mlp.onnx")
    x = torch.randn(256, 64)
    got, ref = _run_ort(path, x), q(x).numpy()
    # ORT computes GELU in float with an erf vectorized per ISA, so on some CPUs a tie of the
    # quantized GELU output lands one LSB away; one such flip moves an output by at most
    # s_hidden * max|W2|. Measured: bit-identical on AVX-512 VNNI; on AVX2 (as-avx2) 99.6 % equal
    # and max |diff| 5.39e-4 against one flip's bound of 5.62e-4
    one_flip = float(q[0].output_scale) * float((q[2].weight.abs() * q[2].weight_scale[:, None]).max())
    assert float(np.mean(got == ref)) >= 0.99, float(np.abs(got - ref).max())
    assert float(np.abs(got - ref).max()) <= 2 * one_flip * 1.001


def test_weight_format_choices(tmp_path: Path) -> None:
    """"auto" shifts only layers whose weights exceed 7 bits; "int8" and "uint8" force one format;
    every format runs in ORT to the same outputs (on this CPU: int8 8-bit weights only where ORT
    has VNNI). A bad format name is refused before anything is written."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    q = quanta.quantize(model, [torch.randn(16, 32) for _ in range(2)], config=REFERENCE, show_progress=False)
    with torch.no_grad():  # make layer 2's weights 7-bit: "auto" keeps them int8
        q[2].weight.copy_(q[2].weight.clamp(-64, 63))
    x = torch.randn(64, 32)
    ref = q(x).numpy()
    kinds = {}
    for fmt in ("auto", "uint8", "int8"):
        path = quanta.export_onnx(q, x[:1], tmp_path / f"{fmt}.onnx", weight_format=fmt)
        dtypes = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}
        kinds[fmt] = (dtypes["twin.0.weight"], dtypes["twin.2.weight"])
        if fmt != "int8" or quanta.kernels.cpu.has_vnni():
            assert float(np.mean(_run_ort(path, x) == ref)) >= 0.999, fmt
    u8, i8 = onnx.TensorProto.UINT8, onnx.TensorProto.INT8
    assert kinds == {"auto": (u8, i8), "uint8": (u8, u8), "int8": (i8, i8)}
    with pytest.raises(ValueError, match="weight_format"):
        quanta.export_onnx(q, x[:1], tmp_path / "bad.onnx", weight_format="s8")
    assert not (tmp_path / "bad.onnx").exists()


def test_seven_bit_weights_are_exported_as_chosen(tmp_path: Path) -> None:
    from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn

    x, _ = load_mnist("test")
    config = quanta.QuantConfig(backend="reference", weight=quanta.QuantSpec(
        dtype="int8", symmetric=True, per_channel=True, bits=7))
    q = quanta.quantize(load_pretrained_mnist_cnn(), [x[:32]], config=config, show_progress=False)
    proto = onnx.load(str(quanta.export_onnx(q, x[:1], tmp_path / "m7.onnx")))
    int8 = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8 and min(int(w.min()) for w in int8) >= -64 and max(int(w.max()) for w in int8) <= 63
    ref = q(x[:50])  # 32 calibration and 50 checked images: also runs under QEMU (scripts/as-avx2)
    assert _within_one_quantum(q, _run_ort(tmp_path / "m7.onnx", x[:50]), ref, "classifier") >= 0.999


def _qdq_add_session(qparams: tuple[float, int, float, int, float, int]) -> ort.InferenceSession:
    """DequantizeLinear(a), DequantizeLinear(b) -> Add -> QuantizeLinear: ORT fuses a QLinearAdd."""
    from onnx import TensorProto, helper

    names = ["sa", "za", "sb", "zb", "sy", "zy"]
    consts = [helper.make_node("Constant", [], [n], value=helper.make_tensor(
        n, TensorProto.FLOAT if n[0] == "s" else TensorProto.UINT8, [], [v]))
        for n, v in zip(names, qparams, strict=True)]
    nodes = [*consts, helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
             helper.make_node("Add", ["fa", "fb"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["q"])]
    io = [helper.make_tensor_value_info(n, TensorProto.UINT8, [None]) for n in ("a", "b", "q")]
    graph = helper.make_graph(nodes, "add", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="ORT's x86 QLinearAdd")
def test_reference_add_is_ort_qlinear_add_bit_for_bit() -> None:
    """Every (a, b) uint8 pair, for qparams with and without ties: reference.add == ORT's add
    (measured: 0 of 9.8M pairs differ over 150 random qparam sets; the old dequantize-add-divide
    reference differed on ~5e-3 of them)."""
    a, b = (t.reshape(-1).contiguous() for t in torch.meshgrid(
        torch.arange(256, dtype=torch.uint8), torch.arange(256, dtype=torch.uint8), indexing="ij"))
    gen = torch.Generator().manual_seed(5)
    cases = [(0.05, 128, 0.05, 128, 0.1, 128), (0.0213, 117, 0.0377, 9, 0.0419, 131)]
    for _ in range(6):
        s = (torch.rand(3, generator=gen) * 0.2 + 0.003).tolist()
        z = torch.randint(0, 256, (3,), generator=gen).tolist()
        cases.append((s[0], z[0], s[1], z[1], s[2], z[2]))
    for sa, za, sb, zb, sy, zy in cases:
        sa, sb, sy = (float(np.float32(v)) for v in (sa, sb, sy))
        got = _qdq_add_session((sa, za, sb, zb, sy, zy)).run(None, {"a": a.numpy(), "b": b.numpy()})[0]
        ours = reference.add(a, sa, za, b, sb, zb, sy, zy)
        assert np.array_equal(ours.numpy(), got), (sa, za, sb, zb, sy, zy)


def test_xnnpack_numerics_are_warned_of(tmp_path: Path) -> None:
    """A model quantized with XNNPACK's rounding (for ExecuTorch) is exported, with a warning that
    ONNX Runtime rounds a few values one LSB away; the default model exports silently."""

    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Conv2d(3, 3, 1) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.a(x) + self.b(x))

    x = torch.randn(2, 3, 8, 8)
    for numerics in reference.NUMERICS:
        config = quanta.QuantConfig(backend="reference", numerics=numerics)
        q = quanta.quantize(Residual().eval(), [x], config=config, show_progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quanta.export_onnx(q, x, tmp_path / f"{numerics}.onnx")
        said = [str(w.message) for w in caught if "numerics" in str(w.message)]
        expected = ["the model was quantized with numerics='xnnpack'"] if numerics == "xnnpack" else []
        assert [m.split(" (")[0] for m in said] == expected, said
        assert (tmp_path / f"{numerics}.onnx").exists()


def _scope(node: onnx.NodeProto) -> str:
    """'/twin/features/features.2/conv/conv.0/conv.0.0/Conv' -> 'features.2.conv.0.0'."""
    parts = node.name.split("/")[2:-1]
    kept = [c for i, c in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(c + "."))]
    return ".".join(kept)


def _per_op_agreement(q: torch.nn.Module, path: Path, x: torch.Tensor) -> tuple[int, int, int]:
    """Teacher-forced check of every int8 Conv/Gemm/Add in ONNX Runtime: the op's int8 input as
    ORT computed it is fed to quanta's reference op, and the two outputs are compared. This is the
    export's own fidelity, free of the amplification a deep network adds on top (see below).
    Returns (elements, exactly equal, within one output quantum)."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.value_info}
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
              for n in proto.graph.node if n.op_type == "Constant"}

    def quantized_input(name: str) -> str:  # DequantizeLinear output -> the QuantizeLinear output it reads
        dq = producer[name]
        assert dq.op_type == "DequantizeLinear" and producer[dq.input[0]].op_type == "QuantizeLinear"
        return dq.input[0]

    ops, adds = [], {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "Add"):
            continue
        end = node
        while end.output[0] != "output" and end.op_type != "QuantizeLinear":
            (end,) = consumers[end.output[0]]  # the fused activation (Clip/Relu), then the output Q
        if node.op_type == "Add":
            key = f"{_scope(node)}:add#{adds.setdefault(_scope(node), 0)}"
            adds[_scope(node)] += 1
        else:
            key = _scope(node)
        inputs = node.input[:2] if node.op_type == "Add" else node.input[:1]
        ops.append((node.op_type, key, [quantized_input(i) for i in inputs], end.output[0]))
    names = sorted({t for _, _, ins, out in ops for t in [*ins, out]} - {"output"})
    for name in names:
        proto.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    debug = path.with_suffix(".debug.onnx")
    onnx.save(proto, str(debug))
    values = dict(zip(["output", *names], _run_ort_all(debug, x), strict=True))

    def qtensor(name: str) -> QTensor:
        q_node = producer[name]
        data = torch.from_numpy(values[name])
        if data.dim() == 4 and list(data.shape[1:]) != shapes[name][1:]:
            data = data.permute(0, 3, 1, 2)  # an intermediate ORT handed out channels-last
        return QTensor(data.contiguous(), float(consts[q_node.input[1]]), int(consts[q_node.input[2]]))

    sites = q._quanta.sites_by_key
    total = exact = within = 0
    for op_type, key, ins, out in ops:
        if op_type == "Add":
            ours, quantum = sites[key].run(torch.add, tuple(qtensor(i) for i in ins), {}), 1.0
        else:
            module = q.get_submodule(key)
            ours, quantum = module(qtensor(ins[0])), float(module.output_scale)
        if isinstance(ours, QTensor):  # compare int8 outputs in quanta (LSB)
            diff, quantum = (ours.int_data.int() - qtensor(out).int_data.int()).abs().float(), 1.0
        else:
            diff = (ours - torch.from_numpy(values[out])).abs()
        total += diff.numel()
        exact += int((diff == 0).sum())
        within += int((diff <= quantum * 1.0001).sum())
    return total, exact, within


def _run_ort_all(path: Path, x: torch.Tensor) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})


def _vision(name: str, tmp_path: Path, size: int = 64, calibrate_bn: bool = False) -> dict[str, float]:
    from quanta.zoo import vision

    torch.manual_seed(0)
    model = getattr(vision, name)().eval()
    calibration = [torch.randn(8, 3, size, size) for _ in range(2)]
    if calibrate_bn:
        vision.calibrate_batchnorm(model, calibration)
    q = quanta.quantize(model, calibration, config=REFERENCE, show_progress=False)
    path = quanta.export_onnx(q, torch.randn(1, 3, size, size), tmp_path / f"{name}.onnx")
    x = torch.randn(4, 3, size, size)
    ref, got = q(x), _run_ort(path, x)
    last = [n for n, m in q.named_modules() if hasattr(m, "weight_scale")][-1]
    total, exact, within = _per_op_agreement(q, path, x)
    return {
        "end_to_end_within": _within_one_quantum(q, got, ref, last),
        "end_to_end_exact": float((got == ref.numpy()).mean()),
        "cosine": torch.nn.functional.cosine_similarity(torch.from_numpy(got), ref, dim=1).min().item(),
        "top1": float((got.argmax(1) == ref.numpy().argmax(1)).mean()),
        "per_op_within": within / total, "per_op_exact": exact / total,
    }


# Requantization order matters end to end. ONNX leaves the f32 rounding order of a QDQ graph
# open; quanta's reference requantizes exactly as ONNX Runtime does (one f32 multiplier per
# output channel for Conv/Gemm, f32 scale ratios with fused multiply-adds for QLinearAdd; see
# kernels/reference.py). With the earlier two-rounding reference (acc * (s_x*s_w), then / s_y)
# about 1 element in 10^6 landed on a tie and flipped by 1 LSB, and MobileNetV2 fans such flips
# out (rounding turns the sub-LSB change in each consumer into whole-LSB flips): end to end only
# 60-71% within one quantum on 4 images. Measured now: MNIST CNN, ResNet-18 and MobileNetV2
# (default and BatchNorm-calibrated) are bit-exact per op and end to end (100% within one
# quantum, 100% equal); the asserts keep the issue's >= 99.9% bar with room for another
# ORT build's kernels.
@pytest.mark.slow  # natively and capped at AVX2 only: many minutes under QEMU (.ci/run)
def test_resnet18_runs_in_ort_close_to_reference(tmp_path: Path) -> None:
    r = _vision("resnet18", tmp_path)
    # measured: per op 100% exact; end to end 100% equal (within one quantum: 100%)
    assert r["per_op_within"] >= 0.999 and r["per_op_exact"] >= 0.9999, r
    assert r["end_to_end_within"] >= 0.999 and r["end_to_end_exact"] >= 0.999, r
    assert r["cosine"] >= 0.9999 and r["top1"] == 1.0, r


@pytest.mark.slow  # natively and capped at AVX2 only: many minutes under QEMU (.ci/run)
def test_mobilenet_v2_runs_in_ort_close_to_reference(tmp_path: Path) -> None:
    # BatchNorm statistics measured on the calibration images, as a trained network has them
    # (the default random model's BNs normalise nothing and fold to zero biases)
    r = _vision("mobilenet_v2", tmp_path, calibrate_bn=True)
    # measured: per op 100% exact; end to end 100% equal (was 60% within one quantum against the
    # two-rounding reference)
    assert r["per_op_within"] >= 0.999 and r["per_op_exact"] >= 0.9999, r
    assert r["end_to_end_within"] >= 0.999 and r["end_to_end_exact"] >= 0.999, r
    assert r["cosine"] >= 0.9999 and r["top1"] == 1.0, r


def test_requantize_pairs_at_equal_qparams_are_dropped_without_changing_a_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The export twin writes DQ -> Q -> DQ where an int8 value passes between int8 ops at one
    qparams; the file keeps no such Q(DQ(q)) (OpenVINO ran each as a float detour), and ONNX
    Runtime gives the same outputs bit for bit with or without them."""
    from quanta.io import onnx_cleanup, onnx_export
    from quanta.zoo import vision

    torch.manual_seed(0)
    q = quanta.quantize(vision.resnet18(num_classes=10).eval(), [torch.randn(4, 3, 32, 32) for _ in range(2)],
                        config=REFERENCE, show_progress=False)
    example = torch.randn(1, 3, 32, 32)
    path = quanta.export_onnx(q, example, tmp_path / "clean.onnx")
    assert onnx_cleanup.drop_requantize_pairs(onnx.load(str(path))) == 0
    monkeypatch.setattr(onnx_export, "drop_requantize_pairs", lambda proto: 0)
    raw = quanta.export_onnx(q, example, tmp_path / "raw.onnx")
    pairs = onnx_cleanup.drop_requantize_pairs(onnx.load(str(raw)))
    assert pairs >= 20, pairs  # one per int8 hand-over between int8 ops (pytorchcv ResNet-18: 35)
    count = {p: sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(p)).graph.node) for p in (path, raw)}
    assert count[raw] - count[path] == pairs
    x = torch.randn(3, 3, 32, 32)
    assert np.array_equal(_run_ort(path, x), _run_ort(raw, x))
    assert torch.equal(torch.from_numpy(_run_ort(path, x)), q(x))  # and quanta's integer reference


def test_onnx_export_with_a_dynamic_sequence_length(tmp_path: Path) -> None:
    """``dynamic_dims=(0, 1)``: one file for every [batch, sequence] shape; a dimension an input
    does not have is refused by name. (Float attention: with int8 attention the float softmaxes of
    ONNX Runtime and torch differ in the last bit and move P's rounding at ties, ~1e-3 here.)"""
    ort = pytest.importorskip("onnxruntime")

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = torch.nn.Linear(64, 192), torch.nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = (y.view(b, t, 4, 16).transpose(1, 2) for y in self.qkv(x).split(64, -1))
            p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 4.0, -1)
            return self.out(torch.matmul(p, v).transpose(1, 2).reshape(b, t, 64))

    torch.manual_seed(0)
    x = torch.randn(3, 24, 64)
    calib = [torch.randn(2, 24, 64) for _ in range(4)]
    qmodel = quanta.quantize(Attention().eval(), calib, show_progress=False)
    path = quanta.export_onnx(qmodel, (x,), tmp_path / "attention.onnx", dynamic_dims=(0, 1))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((1, 7, 64), (2, 40, 64)):  # the example was (3, 24, 64)
        xs = torch.randn(shape)
        out = session.run(None, {session.get_inputs()[0].name: xs.numpy()})[0]
        with torch.no_grad():
            y = qmodel(xs)
        assert out.shape == tuple(y.shape)
        assert float((torch.from_numpy(out) - y).abs().max()) < 1e-4 * float(y.abs().max())
    with pytest.raises(ValueError, match=r"dynamic_dims=\(0, 3\): input has shape \(3, 24, 64\)"):
        quanta.export_onnx(qmodel, (x,), tmp_path / "bad.onnx", dynamic_dims=(0, 3))
    assert not (tmp_path / "bad.onnx").exists()
