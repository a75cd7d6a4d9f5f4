"""quanta.export_executorch: a .pte whose int8 ops run in XNNPACK, checked in the ExecuTorch
runtime's Python bindings against quanta's integer reference."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import quanta
from quanta.io.executorch_export import XnnpackSteps, delegate_to_xnnpack, load_pte, lower_executorch, run_pte
from quanta.io.onnx_export import _ExportQuantized, export_twin
from quanta.kernels import reference
from quanta.modules.quantized import QuantizedModule
from quanta.qtensor import QTensor

pytest.importorskip("executorch")
REFERENCE = quanta.QuantConfig(backend="reference")


def _lower_run(q: torch.nn.Module, example: torch.Tensor, x: torch.Tensor, path: Path) -> tuple:
    program, info = lower_executorch(q, example)
    path.write_bytes(program.buffer)
    method = load_pte(path)
    n = example.shape[0]
    got = torch.cat([run_pte(method, x[i:i + n]) for i in range(0, len(x), n)])
    return got, info


def _figures(q: torch.nn.Module, got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    last = [n for n, m in q.named_modules() if hasattr(m, "weight_scale")][-1]
    quantum = float(q.get_submodule(last).output_scale)
    return {"within": float(((got - ref).abs() <= quantum * 1.0001).float().mean()),
            "top1": float((got.argmax(1) == ref.argmax(1)).float().mean()),
            "cosine": float(torch.nn.functional.cosine_similarity(got, ref, dim=1).min())}


def test_mnist_cnn_pte_matches_reference(tmp_path: Path) -> None:
    from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn

    x, y = load_mnist("test")  # 1000 test images
    q = quanta.quantize(load_pretrained_mnist_cnn(), [x[i:i + 100] for i in range(0, 300, 100)],
                        config=REFERENCE, show_progress=False)
    program, info = lower_executorch(q, x[:1])  # what quanta.export_executorch writes
    path = tmp_path / "mnist.pte"
    path.write_bytes(program.buffer)
    assert path.stat().st_size < 100 * 1024  # measured 70.0 KiB
    method = load_pte(path)
    got = torch.cat([run_pte(method, x[i:i + 1]) for i in range(len(x))])
    ref = q(x)
    r = _figures(q, got, ref)
    # measured: 100 % within one quantum (max 0.38 quantum), top-1 agreement 1.0 on 1000 images
    assert r["within"] >= 0.99 and r["top1"] == 1.0, r
    assert float((got.argmax(1) == y).float().mean()) > 0.97
    # every conv, add, max pool and reshape is an int8 XNNPACK op; the 7x7 -> 3x3 average pool (no
    # int8 kernel) and the float-output classifier run in XNNPACK's fp32 kernels on quanta's
    # integer values; nothing stays outside the delegate
    assert info.counts() == {"int8": 14, "fp32": 2, "portable": 0}, info.summary()
    assert [layer for layer, _ in info.fp32_layers] == ["classifier"]
    with pytest.raises(quanta.UnsupportedModelError, match="'classifier'.*float output"):
        quanta.export_executorch(q, x[:1], tmp_path / "strict.pte", strict=True)
    assert not (tmp_path / "strict.pte").exists()


def _xnnpack_add(a_q: torch.Tensor, b_q: torch.Tensor, qp: tuple) -> torch.Tensor:
    """XNNPACK's int8 add as its source defines it (``xnn_init_qs8_add_minmax_scalar_params`` and
    the qs8-vadd kernels, on quanta's uint8 values shifted to int8): the float32 scale ratios
    ``s_a / s_y``, ``s_b / s_y`` become integer multipliers with 20-21 significant bits, and
    ``(bias + a * m_a + b * m_b) >> shift`` rounds half up through the bias's ``2^(shift-1)``."""
    sa, za, sb, zb, sy, zy = qp
    f32 = torch.float32
    ratios = torch.tensor([sa, sb], dtype=f32) / torch.tensor(sy, dtype=f32)
    exponent = int(torch.frexp(ratios.max()).exponent) - 1  # floor(log2) of the larger ratio
    shift = 20 - exponent
    m_a, m_b = (int(torch.round(r * 2.0**shift)) for r in ratios)  # exact scaling, lrintf
    bias = (1 << (shift - 1)) - m_a * (za - 128) - m_b * (zb - 128)
    acc = bias + (a_q.long() - 128) * m_a + (b_q.long() - 128) * m_b
    return (torch.div(acc, 2**shift, rounding_mode="floor") + zy).clamp(0, 255)


def _with_xnnpack_add(q: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``q(x)`` on quanta's reference with XNNPACK's int8 add (``_xnnpack_add``) in place of its
    own: what the .pte computes, up to the float rounding of fp32 ops. ``q`` must not have run
    yet (its first call compiles its int8 call sites, binding the add it finds)."""
    twin = copy.deepcopy(q)
    original = reference.add

    def add(a_q: torch.Tensor, sa: float, za: int, b_q: torch.Tensor, sb: float, zb: int,
            sy: float, zy: int, activation: str = "none") -> torch.Tensor:
        lo, hi = reference.activation_bounds(activation, sy, zy)
        return _xnnpack_add(a_q, b_q, (sa, za, sb, zb, sy, zy)).clamp(lo, hi).to(torch.uint8)

    reference.add = add
    try:
        return twin(x)
    finally:
        reference.add = original


@pytest.mark.parametrize("qp", [(0.0213, 117, 0.0377, 9, 0.0419, 131),
                                (0.0623757, 153, 0.0398099, 104, 0.0438051, 151)])
def test_xnnpack_int8_add_against_reference_on_every_pair(tmp_path: Path, qp: tuple) -> None:
    """XNNPACK's int8 add on every (a, b) uint8 pair: exactly the fixed-point arithmetic of its
    source (``_xnnpack_add``), which differs from quanta's reference add (ONNX Runtime's float
    multiply-adds, half-even) by one LSB on a few pairs (ties it rounds up, and pairs within
    ~2^-20 of a tie): the one int8 op XNNPACK cannot run bit-exactly, whatever the export hands it.
    Emulated over 200 random qparams, 1.9e-5 of in-range pairs differ (a third exact ties)."""
    steps = XnnpackSteps()
    qp = tuple(float(torch.tensor(v, dtype=torch.float32)) if i % 2 == 0 else v for i, v in enumerate(qp))

    class Add(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            a, b = steps.quant_dequant(a, *qp[0:2]), steps.quant_dequant(b, *qp[2:4])
            return steps.quant_dequant(a + b, *qp[4:6])

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    a_q, b_q = (t.reshape(1, 1, 256, 256).contiguous() for t in torch.meshgrid(
        torch.arange(256, dtype=torch.uint8), torch.arange(256, dtype=torch.uint8), indexing="ij"))
    a, b = reference.dequantize_per_tensor(a_q, *qp[0:2]), reference.dequantize_per_tensor(b_q, *qp[2:4])
    edge = to_edge_transform_and_lower(torch.export.export(Add(), (a, b)), partitioner=[XnnpackPartitioner()])
    (tmp_path / "add.pte").write_bytes(edge.to_executorch().buffer)
    got = run_pte(load_pte(tmp_path / "add.pte"), a, b)
    got_q = reference.quantize_per_tensor(got, *qp[4:6]).int()
    assert torch.equal(got_q, _xnnpack_add(a_q, b_q, qp).int())
    ours = reference.add(a_q, qp[0], qp[1], b_q, qp[2], qp[3], qp[4], qp[5]).int()
    diff = (got_q - ours).abs()
    print("add pairs differing", int((diff != 0).sum()), "max", int(diff.max()))
    assert int(diff.max()) <= 1 and int((diff != 0).sum()) <= 10  # measured 0 and 5 of 65536


def _per_op(q: torch.nn.Module, x: torch.Tensor, tmp_path: Path) -> tuple[int, int, int]:
    """Teacher-forced agreement of every int8-output conv/linear: each XNNPACK op is fed the
    reference's int8 input of that layer (one program with every layer as its own branch), and
    its int8 output is compared with the reference's. Returns (elements, equal, within one LSB).
    Float-output layers (XNNPACK's fp32 kernels, e.g. a classifier) are left out: float sums in
    another order are never bit-equal, and counting them once hid that every int8 op is exact."""
    seen: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o)))
             for n, m in q.named_modules() if isinstance(m, QuantizedModule)]
    q(x)
    for h in hooks:
        h.remove()
    wrapper, tracker = export_twin(q, "int8", XnnpackSteps())
    tracker.remove()
    names = [n for n in seen if isinstance(wrapper.twin.get_submodule(n), _ExportQuantized)
             and isinstance(seen[n][1], QTensor)]
    ops = torch.nn.ModuleList([wrapper.twin.get_submodule(n) for n in names])

    class Branches(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ops = ops

        def forward(self, *inputs: torch.Tensor) -> tuple:
            return tuple(op(i) for op, i in zip(self.ops, inputs, strict=True))

    inputs = tuple(seen[n][0].dequantize() if isinstance(seen[n][0], QTensor) else seen[n][0] for n in names)
    branches = Branches()
    edge = delegate_to_xnnpack(branches, torch.export.export(branches, inputs))  # as the export does
    (tmp_path / "ops.pte").write_bytes(edge.to_executorch().buffer)
    outs = load_pte(tmp_path / "ops.pte").execute(list(inputs))
    total = equal = within = 0
    for n, got in zip(names, outs, strict=True):
        ref = seen[n][1]
        got_q = reference.quantize_per_tensor(got, ref.scale, ref.zero_point)
        diff = (got_q.int() - ref.int_data.int()).abs()
        total, equal = total + diff.numel(), equal + int((diff == 0).sum())
        within += int((diff <= 1).sum())
    return total, equal, within


class _Small(torch.nn.Module):
    """Every shape of int8 conv XNNPACK runs: strided, depthwise (ReLU6), 1x1 (ReLU), 3x3 with
    no activation (a nonzero output zero point), all with BatchNorm folded in; an int8 linear."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        shapes = [(3, c, 3, 2, 1), (c, c, 3, 1, c), (c, 2 * c, 1, 1, 1), (2 * c, c, 3, 1, 1), (c, c, 1, 1, 1)]
        self.convs = torch.nn.ModuleList([torch.nn.Conv2d(i, o, k, s, k // 2, groups=g)
                                          for i, o, k, s, g in shapes])
        self.bns = torch.nn.ModuleList([torch.nn.BatchNorm2d(conv.out_channels) for conv in self.convs])
        self.fc1, self.fc2 = torch.nn.Linear(c, 2 * c), torch.nn.Linear(2 * c, 10)
        for bn in self.bns:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 2)
            bn.bias.data.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = [torch.relu, torch.nn.functional.relu6, torch.relu, lambda t: t, torch.relu]
        for conv, bn, act in zip(self.convs, self.bns, acts, strict=True):
            x = act(bn(conv(x)))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def test_xnnpack_int8_convs_bit_exact_with_int32_bias(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every delegated int8 conv equals quanta's reference bit for bit, fed the reference's int8
    input: the requantization (f32(acc) * f32(f32(s_x * s_w) / s_y), half-even) is XNNPACK's
    own. XNNPACK gets quanta's int32 bias itself: handed as the float it stands for, ExecuTorch
    quantized it back with a float32 reciprocal, off by one or more for |b| >= 2^22."""
    from executorch.backends.xnnpack.operators import quant_params

    handed: list[torch.Tensor] = []
    original = quant_params.QuantParams.quantize_tensor

    def record(self: quant_params.QuantParams, tensor: torch.Tensor) -> torch.Tensor:
        out = original(self, tensor)
        if self.dtype == torch.int32:
            handed.append(out.clone())
        return out

    monkeypatch.setattr(quant_params.QuantParams, "quantize_tensor", record)
    torch.manual_seed(0)
    model = _Small().eval()
    calibration = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    q = quanta.quantize(model, calibration, config=REFERENCE, show_progress=False)
    big = q.get_submodule("convs.2")  # biases of dead BatchNorm channels reach 2^30
    signs = torch.where(torch.rand(big.bias.shape) < 0.5, -1, 1)
    big.bias.copy_((torch.randint(2**22, 2**29, big.bias.shape) * signs).to(torch.int32))
    total, equal, within = _per_op(q, torch.randn(2, 3, 32, 32), tmp_path)
    assert total == 2 * 16 * 16 * (16 + 16 + 32 + 16) + 2 * 32 and equal == total, (equal, total)
    biases = [m.bias for m in q.modules() if isinstance(m, QuantizedModule) and m.output_int8]
    assert len(handed) == len(biases) == 5
    assert all(any(torch.equal(h, b) for h in handed) for b in biases)
    handed.clear()
    program, info = lower_executorch(q, torch.randn(1, 3, 32, 32))  # the whole model's lowering too
    assert any(torch.equal(h, big.bias) for h in handed) and info.counts()["int8"] >= 5, info.summary()


def _vision(name: str, tmp_path: Path, calibrate_bn: bool = False) -> dict[str, float]:
    from quanta.zoo import vision

    torch.manual_seed(0)
    model = getattr(vision, name)().eval()
    calibration = [torch.randn(8, 3, 64, 64) for _ in range(2)]
    if calibrate_bn:
        vision.calibrate_batchnorm(model, calibration)
    q = quanta.quantize(model, calibration, config=REFERENCE, show_progress=False)
    x = torch.randn(4, 3, 64, 64)
    with_xnnpack_add = _with_xnnpack_add(q, x)
    got, info = _lower_run(q, x[:1], x, tmp_path / f"{name}.pte")
    r = _figures(q, got, q(x))
    r.update({f"xnnpack_add_{k}": v for k, v in _figures(q, got, with_xnnpack_add).items()})
    total, equal, within = _per_op(q, x[:2], tmp_path)
    r.update(per_op_equal=equal / total, per_op_within=within / total, **info.counts())
    print(name, r)
    return r


@pytest.mark.slow
def test_resnet18_pte(tmp_path: Path) -> None:
    r = _vision("resnet18", tmp_path)
    assert r["portable"] == 0 and r["fp32"] == 1 and r["int8"] >= 30, r  # measured 31 int8 ops
    # measured: every int8 conv bit-exact per op; end to end 92.6 % within one quantum (top-1 1.0):
    # XNNPACK's int8 add rounds a few elements one LSB the other way (fixed-point multipliers,
    # see the add test) and the residual blocks compound them (the 99 % is not met).
    # Against the reference with XNNPACK's add, 100 % (float rounding of the fp32 classifier only)
    assert r["per_op_equal"] == 1.0, r
    assert r["xnnpack_add_within"] == 1.0 and r["xnnpack_add_top1"] == 1.0, r
    assert r["within"] >= 0.9 and r["top1"] == 1.0 and r["cosine"] >= 0.999, r


@pytest.mark.slow
@pytest.mark.long  # minutes of ExecuTorch lowering: `pytest -m long`
def test_mobilenet_v2_pte(tmp_path: Path) -> None:
    r = _vision("mobilenet_v2", tmp_path, calibrate_bn=True)
    assert r["portable"] == 0 and r["fp32"] == 1 and r["int8"] >= 60, r  # measured 65 int8 ops
    # measured: every int8 conv bit-exact per op (52 layers, 1.09 M outputs), but end to end only
    # 47.1 % within one quantum (top-1 0.75, min cosine 0.993; the same on main before the int32
    # bias, earlier runs 34 % / 1.0): XNNPACK's int8 residual add rounds ~1e-4 of its outputs one
    # LSB the other way (fixed-point multipliers, see the add test) and this random-weight net
    # fans each flip out. Against the reference with XNNPACK's add: 100 %, top-1 1.0, max 1.7e-4
    # quantum (the fp32 classifier's float rounding): the add is the whole difference.
    assert r["per_op_equal"] == 1.0, r
    assert r["xnnpack_add_within"] == 1.0 and r["xnnpack_add_top1"] == 1.0, r
    assert r["cosine"] >= 0.95, r  # the 99 % and top-1 1.0 are not met against quanta's add


@pytest.mark.slow
@pytest.mark.long  # minutes of ExecuTorch lowering: `pytest -m long`
def test_same_padded_efficientnet_pte(tmp_path: Path) -> None:
    """efficientnet-pytorch's EfficientNet-B0 from the model sweep (same-padded depthwise convs as
    Conv2d subclasses, int8 call sites): its ReLU-free convs with fused SiLU and the squeeze-excite
    convs run in XNNPACK's fp32 kernels on quanta's integer values, the rest int8; nothing is left
    outside the delegate."""
    from quanta.zoo import architectures as arches
    from quanta.zoo.vision import calibrate_batchnorm

    if not arches.available():
        pytest.skip("efficientnet-pytorch missing")
    arch = next(a for a in arches.SWEEP if a.name == "efficientnet-b0")
    model = arches.build(arch, small=True)
    calib = [arches.images(arch, 4, small=True, seed=s) for s in range(2)]
    calibrate_batchnorm(model, calib)
    q = quanta.quantize(model, calib, config=REFERENCE, show_progress=False)
    x = arches.images(arch, 4, small=True, seed=9)
    got, info = _lower_run(q, x[:1], x, tmp_path / "effnet.pte")
    r = {**_figures(q, got, q(x)), **info.counts()}
    print("efficientnet-b0", r)
    # measured: 60 int8 + 197 fp32 ops (the SiLU/sigmoid convs, their sigmoid and mul), none
    # outside; end to end only 7.8 % within one quantum, top-1 0.75, min cosine 0.987 on 4
    # random images (7.6 % / 0.973 on an earlier run); against the reference with XNNPACK's add
    # (_with_xnnpack_add) still only 9.8 %, top-1 1.0, cosine 0.991: here the fp32 ops dominate
    # (float sums in another order, XNNPACK's own sigmoid, quantizing their float outputs by a
    # reciprocal multiply), each flipping outputs near a rounding tie, and this random-weight
    # 16-block net fans the flips out. Lowering and running took 86 s.
    assert r["portable"] == 0 and r["int8"] >= 50, r
    assert r["cosine"] >= 0.95, r
