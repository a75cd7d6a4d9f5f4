"""quanta.export_onnx: a checked QDQ graph that ONNX Runtime runs like quanta's reference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import quanta
from quanta.kernels import reference
from quanta.qtensor import QTensor

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


def test_mnist_cnn_matches_reference_in_ort(tmp_path: Path) -> None:
    from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn

    x, y = load_mnist("test")
    q = quanta.quantize(load_pretrained_mnist_cnn(), [x[i:i + 100] for i in range(0, 300, 100)],
                        config=REFERENCE, show_progress=False)
    path = quanta.export_onnx(q, x[:1], tmp_path / "mnist.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == 6 and ops.count("Gemm") == 2 and ops.count("Add") == 2
    assert ops.count("QuantizeLinear") >= 8 and ops.count("DequantizeLinear") >= 16
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    weights = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert np.array_equal(weights["twin.conv1.weight"], q.conv1.weight.numpy())
    assert weights["twin.block1.conv2.bias"].dtype == np.int32
    axis = [a.i for n in proto.graph.node if n.op_type == "DequantizeLinear"
            and n.input[0] == "twin.conv1.weight" for a in n.attribute if a.name == "axis"]
    assert axis == [0]

    ref = q(x[:1000])
    got = np.concatenate([_run_ort(path, x[i:i + 250]) for i in range(0, 1000, 250)])
    assert _within_one_quantum(q, got, ref, "classifier") >= 0.999
    assert (got.argmax(1) == y[:1000].numpy()).mean() > 0.97
    assert _run_ort(path, x[:1]).shape == (1, 10)
    total, exact, within = _per_op_agreement(q, path, x[:200])
    assert within == total and exact / total >= 0.9999  # measured: every op exact

    # the residual adds (one input arrives through max pooling) run as ORT's int8 QLinearAdd
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "mnist.opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused.count("QLinearAdd") == 2 and "Add" not in fused


def test_seven_bit_weights_are_exported_as_chosen(tmp_path: Path) -> None:
    from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn

    x, _ = load_mnist("test")
    config = quanta.QuantConfig(backend="reference", weight=quanta.QuantSpec(
        dtype="int8", symmetric=True, per_channel=True, bits=7))
    q = quanta.quantize(load_pretrained_mnist_cnn(), [x[:200]], config=config, show_progress=False)
    proto = onnx.load(str(quanta.export_onnx(q, x[:1], tmp_path / "m7.onnx")))
    int8 = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8 and min(int(w.min()) for w in int8) >= -64 and max(int(w.max()) for w in int8) <= 63
    ref = q(x[:500])
    assert _within_one_quantum(q, _run_ort(tmp_path / "m7.onnx", x[:500]), ref, "classifier") >= 0.999


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


_EPILOGUE, _ADD = reference.epilogue, reference.add


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _epilogue_one_multiplier(acc: torch.Tensor, x_scale: float, w_scale: torch.Tensor, channel_dim: int,
                             activation: str = "none", out_scale: float | None = None,
                             out_zero_point: int = 0, out_qmin: int = 0, out_qmax: int = 255) -> torch.Tensor:
    """reference.epilogue requantizing as ORT's QLinearConv/QGemm do: one f32 multiplier,
    round(acc * f32(f32(s_x * s_w) / s_y)) + zp, where quanta rounds twice (acc * (s_x * s_w),
    then / s_y). The fused ReLU/ReLU6 become clamps on the integers (ORT drops the Clip)."""
    if out_scale is None:
        return _EPILOGUE(acc, x_scale, w_scale, channel_dim, activation)
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    multiplier = (_f32(x_scale) * w_scale.float()) / _f32(out_scale)
    q = torch.round(acc.float() * multiplier.reshape(shape)) + out_zero_point
    low = max(out_qmin, out_zero_point) if activation in ("relu", "relu6") else out_qmin
    high = out_qmax
    if activation == "relu6":
        high = min(high, int(torch.round(_f32(6.0) / _f32(out_scale))) + out_zero_point)
    return torch.clamp(q, low, high).to(torch.uint8)


def _add_scale_ratios(a_q: torch.Tensor, a_scale: float, a_zero_point: int, b_q: torch.Tensor,
                      b_scale: float, b_zero_point: int, out_scale: float, out_zero_point: int,
                      activation: str = "none") -> torch.Tensor:
    """reference.add as ORT's QLinearAdd computes it: f32 scale ratios s_a/s_y and s_b/s_y,
    zero points folded into one constant, where quanta dequantizes, adds, then divides by s_y."""
    ratio_a, ratio_b = _f32(a_scale) / _f32(out_scale), _f32(b_scale) / _f32(out_scale)
    fixed = _f32(out_zero_point) - (ratio_a * a_zero_point + ratio_b * b_zero_point)
    q = torch.round(fixed + a_q.float() * ratio_a + b_q.float() * ratio_b)
    low = out_zero_point if activation in ("relu", "relu6") else 0
    high = 255
    if activation == "relu6":
        high = min(high, int(torch.round(_f32(6.0) / _f32(out_scale))) + out_zero_point)
    return torch.clamp(q, low, high).to(torch.uint8)


@contextlib.contextmanager
def _ort_rounding_order() -> Iterator[None]:
    """quanta's reference with ORT's f32 rounding order in requantization: the same integer
    graph and qparams, only the order of the float multiplications differs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference, "epilogue", _epilogue_one_multiplier)
        patch.setattr(reference, "add", _add_scale_ratios)
        yield


def _vision(name: str, tmp_path: Path, size: int = 96, calibrate_bn: bool = False) -> dict[str, float]:
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
    with _ort_rounding_order():
        ref_ort_order = q(x)
    last = [n for n, m in q.named_modules() if hasattr(m, "weight_scale")][-1]
    total, exact, within = _per_op_agreement(q, path, x)
    return {
        "end_to_end_within": _within_one_quantum(q, got, ref, last),
        "end_to_end_within_ort_order": _within_one_quantum(q, got, ref_ort_order, last),
        "end_to_end_exact_ort_order": float((got == ref_ort_order.numpy()).mean()),
        "cosine": torch.nn.functional.cosine_similarity(torch.from_numpy(got), ref, dim=1).min().item(),
        "top1": float((got.argmax(1) == ref.numpy().argmax(1)).mean()),
        "per_op_within": within / total, "per_op_exact": exact / total,
    }


# Why the end-to-end bar is checked against the reference in ORT's rounding order: ORT
# requantizes a QLinearConv/QGemm as round(acc * f32(f32(s_x*s_w)/s_y)) and a QLinearAdd with
# f32 scale ratios, where quanta's reference computes round(f32(acc * f32(s_x*s_w)) / s_y) and
# dequantize-add-divide. Both are exact readings of the same QDQ graph; they differ only in f32
# rounding, on about 1 in 10^6 requantized elements, by 1 LSB (the per-op check). In MobileNetV2
# such a flip does not stay small: rounding turns the sub-LSB change it causes in each consumer
# into whole-LSB flips with probability equal to that change, so one flip becomes ~N_out/sqrt(K)
# flips per layer (~30 per 1x1 expand) and after a few blocks the two int8 runs differ by noise
# of the order of quantization noise itself. Measured on 4 images: end to end against the
# untouched reference 71% (default MobileNetV2), 60% (BatchNorm calibrated), 98.1% (ResNet-18
# BN-calibrated); quanta's own oneDNN path scores 58% against its reference the same way, and
# the reference scores 86% against itself when the input moves by 1e-6 relative. Against the
# reference with ORT's rounding order the exported graph is bit-exact end to end in all of
# these: every op, every qparam and every rounding of the export is right.
@pytest.mark.slow
def test_resnet18_runs_in_ort_close_to_reference(tmp_path: Path) -> None:
    r = _vision("resnet18", tmp_path)
    # measured: per op 100% exact; end to end 100% within one quantum (no flip occurs here)
    assert r["per_op_within"] >= 0.999 and r["per_op_exact"] >= 0.9999, r
    assert r["end_to_end_within_ort_order"] >= 0.999 and r["end_to_end_exact_ort_order"] >= 0.999, r
    assert r["end_to_end_within"] >= 0.97 and r["cosine"] >= 0.999 and r["top1"] == 1.0, r


@pytest.mark.slow
def test_mobilenet_v2_runs_in_ort_close_to_reference(tmp_path: Path) -> None:
    # BatchNorm statistics measured on the calibration images, as a trained network has them
    # (the default random model's BNs normalise nothing and fold to zero biases)
    r = _vision("mobilenet_v2", tmp_path, calibrate_bn=True)
    # measured: per op 100% within one quantum, 99.9999% exact; end to end bit-exact against the
    # reference in ORT's rounding order; 60% within one quantum of the untouched reference
    # (see above), cosine 0.993, same top-1
    assert r["per_op_within"] >= 0.999 and r["per_op_exact"] >= 0.9999, r
    assert r["end_to_end_within_ort_order"] >= 0.999 and r["end_to_end_exact_ort_order"] >= 0.999, r
    assert r["cosine"] >= 0.98 and r["top1"] == 1.0, r
