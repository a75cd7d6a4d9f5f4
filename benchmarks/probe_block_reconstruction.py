"""Probe (not a quanta feature): block-wise reconstruction of the weight rounding (BRECQ,
Li et al. 2021, with QDrop's optional activation dropping, Wei et al. 2022) on EfficientNet-Lite1,
through quanta's static int8 simulation, to test whether it beats per-layer AdaRound
(``QuantConfig(adaround=True)``) on issue 14's metric. docs/ptq.md (session 27) has the results.

    python benchmarks/probe_block_reconstruction.py --bits 8 --iterations 1000 [--qdrop 0.5] [--calib 768]

Units: the stem, each of the 21 MBConv blocks, and the head (head conv, pool, classifier). Each
unit's rounding (AdaRound's rectified sigmoid, annealed regularizer) is learned against the float
unit's output on the float model's own inputs, from the inputs the already rounded units deliver,
with every int8 activation inside the unit fake-quantized at the calibrated qparams; a unit keeps
its learned rounding only if it lowers the unit's error on 64 calibration crops. Units before 40x40
train on random 40x40 windows (the same window on both sides). The result is converted by
``quanta.convert`` and evaluated as int8 on held-out crops and on its own calibration crops.
"""
import argparse
import dataclasses
import time

import torch
import torch.nn as nn

import quanta
from quanta.api import convert, get_state
from quanta.debug.sqnr import sqnr
from quanta.kernels.reference import apply_activation
from quanta.modules.qat import QATModule, fake_quantize_bias
from quanta.modules.state import _SiteMode
from quanta.numerics.qparams import choose_qparams, qrange
from quanta.ptq.range_learning import _calibrated_ranges, _learnable, _observers
from quanta.qat import simulate_static
from quanta.qtensor import dequantize_any
from quanta.zoo.efficientnet_lite import load_efficientnet_lite1, photo_inputs

ZETA, GAMMA = 1.1, -0.1
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--bits", type=int, default=8, help="weight bits (7: AVX2 without VNNI)")
parser.add_argument("--iterations", type=int, default=1000, help="optimizer steps per unit")
parser.add_argument("--batch", type=int, default=8, help="crops per step")
parser.add_argument("--qdrop", type=float, default=0.0, help="share of activations left unrounded per step")
parser.add_argument("--weight", type=float, default=1e-3, help="rounding regularizer weight")
parser.add_argument("--window", type=int, default=40, help="training window of the large early units")
parser.add_argument("--calib", type=int, default=256, help="calibration crops (seed 1)")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
BITS, ITERS, BATCH, QDROP, LAM, WINDOW = (args.bits, args.iterations, args.batch, args.qdrop, args.weight,
                                          args.window)
T0 = time.time()


def log(*a: object) -> None:
    print(f"[{time.time() - T0:7.0f}s]", *a, flush=True)


model = load_efficientnet_lite1().eval()
calib = photo_inputs(args.calib, seed=1)
calib_batches = list(torch.split(calib, 16))
eval_batches = list(torch.split(photo_inputs(256, seed=0), 32))
with torch.no_grad():
    ref = torch.cat([model(b) for b in eval_batches])
base = quanta.QuantConfig()
config = dataclasses.replace(base, weight=dataclasses.replace(base.weight, bits=BITS))


def evaluate(m, name):
    with torch.no_grad():
        out = torch.cat([m(b) for b in eval_batches])
    agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
    log(f"{name}: agreement {agree:.4f}  SQNR {sqnr(ref, out):.2f} dB")
    return out


qmodel = quanta.quantize(model, calib_batches, config=config, show_progress=False)
q_out = evaluate(qmodel, "plain int8")
sim = simulate_static(model, calib_batches[0], config)
calibrated = _calibrated_ranges(qmodel)
for key, fq in _observers(sim, QATModule).items():
    if key in calibrated:
        _learnable(fq, *calibrated[key]).log_factors.requires_grad_(False)
sim.eval()
for p in sim.parameters():
    p.requires_grad_(False)
s_out = evaluate(sim, "simulation (round to nearest)")
log(f"simulation vs int8: {sqnr(q_out, s_out):.2f} dB")

state = get_state(sim)
qat = {k: m for k, m in state.sites_by_key.items() if isinstance(m, QATModule)}
qat.update({n: m for n, m in sim.named_modules() if isinstance(m, QATModule)})


def unit_fn(m, u):
    if u == "stem":
        return lambda x: m._swish(m._bn0(m._conv_stem(x)))
    if u == "head":
        def head(x):
            x = m._swish(m._bn1(m._conv_head(x)))
            return m._fc(m._dropout(m._avg_pooling(x).flatten(1)))
        return head
    return lambda x: m._blocks[u](x)


def unit_layers(u):
    prefix = {"stem": ("_conv_stem:",), "head": ("_conv_head:", "_fc")}.get(u, (f"_blocks.{u}.",))
    return [m for k, m in qat.items() if k.startswith(prefix)]


class Soft:
    def __init__(self, m):
        weight, bias = m._folded()
        w = weight.detach().float()
        flat = w.reshape(w.shape[0], -1)
        scale, _ = choose_qparams(flat.amin(1), flat.amax(1), m.weight_spec)
        self.scale = scale.float().reshape([-1] + [1] * (w.dim() - 1))
        self.qmin, self.qmax = qrange(m.weight_spec)
        div = w / self.scale
        self.floor = torch.floor(div)
        self.nearest = torch.clamp(torch.round(div), self.qmin, self.qmax)
        rest = (div - self.floor).clamp(1e-4, 1 - 1e-4)
        self.v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
        # the element that sets each row's scale keeps its nearest code (the scale must not move)
        idx = flat.abs().argmax(1)
        self.fixed = torch.zeros_like(flat, dtype=torch.bool)
        self.fixed[torch.arange(flat.shape[0]), idx] = True
        self.fixed = self.fixed.reshape(w.shape)
        self.mode = "soft"

    def h(self):
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def int_weight(self):
        if self.mode == "nearest":
            return self.nearest
        h = self.h() if self.mode == "soft" else (self.v >= 0).float()
        q = torch.clamp(self.floor + h, self.qmin, self.qmax)
        return torch.where(self.fixed, self.nearest, q)

    def reg(self, beta):
        return (1 - (2 * self.h() - 1).abs().pow(beta)).mean()


def soft_forward(self, x):
    x = dequantize_any(x)
    source = self.input_source if self.input_source is not None else self.input_observer
    xq = self.input_observer.fake_quant(x, source)
    if QDROP and self._soft.mode == "soft":
        xq = torch.where(torch.rand_like(x) < QDROP, x, xq)
    _, bias = self._folded()
    s = self._soft
    w = s.int_weight() * s.scale
    if bias is not None:
        bias = fake_quantize_bias(bias, float(source.calculate_qparams()[0]), s.scale.flatten())
    y = apply_activation(self._op(xq, w, bias), self.activation)
    return self.output_observer.fake_quant(y) if self.output_int8 else y


units = ["stem", *range(len(model._blocks)), "head"]
site_mode = _SiteMode(state)
x_q = calib  # simulation-side inputs of the current unit
x_f = calib  # float-side inputs
total_iters = 0
for u in units:
    t_u = time.time()
    layers = unit_layers(u)
    for m in layers:
        m._soft = Soft(m)
        m.forward = soft_forward.__get__(m)
    f_float, f_sim = unit_fn(model, u), unit_fn(sim, u)
    with torch.no_grad():
        target = torch.cat([f_float(b) for b in torch.split(x_f, 32)])
    power = float(target.pow(2).mean())

    def unit_error(mode, layers=layers, f_sim=f_sim, x=x_q[:64], target=target[:64], power=power):
        """The unit's relative output error on 64 calibration crops with ``mode`` rounding."""
        for m in layers:
            m._soft.mode = mode
        with torch.no_grad(), site_mode:
            out = torch.cat([f_sim(b) for b in torch.split(x, 32)])
        return float((out - target).pow(2).mean()) / power

    e_nearest = unit_error("nearest")
    for m in layers:
        m._soft.mode = "soft"
    opt = torch.optim.Adam([m._soft.v for m in layers], lr=1e-2)
    warmup = ITERS // 5
    gen = torch.Generator().manual_seed(1234)
    size = x_q.shape[-1]
    win = size if u in ("stem", "head") or size <= WINDOW else WINDOW
    t_it = time.time()
    for it in range(ITERS):
        pick = torch.randperm(x_q.shape[0], generator=gen)[:BATCH]
        xq, xf = x_q[pick], x_f[pick]
        if win < size:  # the same window of both sides (even offsets keep stride-2 phases)
            i, j = (2 * int(torch.randint(0, (size - win) // 2 + 1, (1,), generator=gen)) for _ in range(2))
            xq, xf = xq[..., i:i + win, j:j + win], xf[..., i:i + win, j:j + win]
            with torch.no_grad():
                tgt = f_float(xf)
        else:
            tgt = target[pick]
        with site_mode:
            out = f_sim(xq)
        loss = (out - tgt).pow(2).mean() / power
        if it >= warmup:
            beta = 2 + 18 * (1 - (it - warmup) / max(1, ITERS - warmup))
            loss = loss + LAM * sum(m._soft.reg(beta) for m in layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    per_it = (time.time() - t_it) / max(1, ITERS)
    e_learned = unit_error("hard")
    keep = e_learned < e_nearest
    for m in layers:
        m._soft.mode = "hard" if keep else "nearest"
        m._soft.v = m._soft.v.detach()
    with torch.no_grad(), site_mode:
        x_q = torch.cat([f_sim(b) for b in torch.split(x_q, 32)])
    x_f = target
    total_iters += ITERS
    flipped = sum(float((m._soft.int_weight() != m._soft.nearest).sum()) for m in layers)
    n_w = sum(m._soft.v.numel() for m in layers)
    log(f"unit {u}: {len(layers)} layers, error nearest {e_nearest:.2e} -> learned {e_learned:.2e} "
        f"({'kept' if keep else 'dropped'}; {flipped / n_w:.1%} flipped) {time.time() - t_u:.0f}s "
        f"({per_it * 1000:.0f} ms/it)")

s_out = evaluate(sim, f"simulation after block reconstruction (bits {BITS}, {ITERS} it, batch {BATCH}, "
                      f"qdrop {QDROP}, lam {LAM})")
# bake the hard weights in and convert through quanta
for m in qat.values():
    if hasattr(m, "_soft"):
        w = (m._soft.int_weight() * m._soft.scale).detach()
        _, bias = m._folded()
        m.bn = None
        m.float_module.weight = nn.Parameter(w.reshape(m.float_module.weight.shape).contiguous(),
                                             requires_grad=False)
        m.float_module.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                                     requires_grad=False)
        del m.forward
q2 = convert(sim, config=config)
get_state(q2).config = config
q2_out = evaluate(q2, "int8 after block reconstruction")
with torch.no_grad():
    cref = torch.cat([model(b) for b in calib_batches])
    for m, name in ((qmodel, "plain int8"), (q2, "int8 after block reconstruction")):
        cout = torch.cat([m(b) for b in calib_batches])
        agree = float((cout.argmax(1) == cref.argmax(1)).float().mean())
        log(f"{name} on its calibration crops: agreement {agree:.4f}  SQNR {sqnr(cref, cout):.2f} dB")
coverage = quanta.report(q2).coverage
log(f"int8 vs simulation: {sqnr(s_out, q2_out):.2f} dB; int8 share of MACs {coverage.share:.1%} "
    f"({len(coverage.float_layers)} layers in float, e.g. the exact float fallback of 8-bit weights "
    "on a CPU without VNNI)")
