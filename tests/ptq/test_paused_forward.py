"""PausedForward: layer-by-layer corrections read each layer's int8 inputs from a forward that
resumes where it paused. It must give exactly what rerunning the int8 model from its input
gives, while each layer before it changes, on residual nets with in-place activations and
shared layers, and run each node about once per batch instead of once per layer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import quanta
from quanta.modules import graph as graph_runtime
from quanta.ptq import paused_forward
from quanta.ptq.bias_correction import add_to_bias, correct_bias, correctable_layers, int8_inputs
from quanta.ptq.paused_forward import PausedForward
from quanta.zoo import mnist


class _Residual(nn.Module):
    """Conv stem, two residual blocks with in-place ReLUs, one conv used twice, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
                                                 nn.Conv2d(8, 8, 1)) for _ in range(2))
        self.shared = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for block in self.block:
            x = torch.relu(x + block(x))
        x = self.shared(self.shared(x).relu())
        return self.head(x.mean((2, 3)))


def _pair(model: nn.Module, calib: list[torch.Tensor]) -> tuple[nn.Module, nn.Module]:
    q = quanta.quantize(model, calib, show_progress=False)
    return q, copy.deepcopy(q)


@pytest.mark.parametrize("which", ["residual", "mnist"])
def test_paused_inputs_equal_rerun_inputs_while_layers_change(which: str) -> None:
    model = _Residual().eval() if which == "residual" else mnist.load_pretrained_mnist_cnn()
    size = 12 if which == "residual" else 28
    calib = [torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    if which == "mnist":
        calib = [mnist.load_mnist("test")[0][i * 8:(i + 1) * 8] for i in range(3)]
    eager, resumed = _pair(model, calib)
    paused = PausedForward.build(resumed, calib)
    assert paused is not None, "the model traces: the forward can pause"
    layers_e, layers_r = correctable_layers(eager), correctable_layers(resumed)
    assert len(layers_e) >= 4
    for (lp, le), (_, lr) in zip(layers_e, layers_r, strict=True):
        seen: dict[str, list[torch.Tensor]] = {"eager": [], "paused": []}
        int8_inputs(eager, [(lp, le)], calib, lambda n, m, x, s=seen: s["eager"].append(x.clone()), lp.name)
        int8_inputs(resumed, [(lp, lr)], calib, lambda n, m, x, s=seen: s["paused"].append(x.clone()),
                    lp.name, paused)
        assert len(seen["eager"]) == len(seen["paused"]) == 3, lp.name
        for a, b in zip(seen["eager"], seen["paused"], strict=True):
            assert torch.equal(a, b), lp.name
        shift = torch.linspace(-0.3, 0.3, le.weight.shape[0])  # change the layer, as a correction does
        add_to_bias(le, shift)
        add_to_bias(lr, shift)
    with torch.no_grad():
        assert torch.equal(eager(calib[0]), resumed(calib[0]))


def test_shared_layer_reads_both_calls() -> None:
    model = _Residual().eval()
    calib = [torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    q, _ = _pair(model, calib)
    paused = PausedForward.build(q, calib)
    shared = [(lp, m) for lp, m in correctable_layers(q) if lp.name == "shared"]
    assert len(shared) == 1
    seen: list[torch.Tensor] = []
    for lp, m in correctable_layers(q):  # pause at every layer before the shared one
        if lp.name == "shared":
            break
        int8_inputs(q, [(lp, m)], calib, lambda n, mod, x: None, lp.name, paused)
    int8_inputs(q, shared, calib, lambda n, mod, x: seen.append(x), None, paused)
    assert len(seen) == 4  # two calls per batch, the second on the first's output
    head = [(lp, m) for lp, m in correctable_layers(q) if lp.name == "head"]
    int8_inputs(q, head, calib, lambda n, mod, x: None, "head", paused)
    stem = [(lp, m) for lp, m in correctable_layers(q) if lp.name == "stem"]
    rerun, resumed = [], []
    int8_inputs(q, stem, calib, lambda n, mod, x: rerun.append(x), "stem")
    int8_inputs(q, stem, calib, lambda n, mod, x: resumed.append(x), "stem", paused)  # paused past it
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(rerun, resumed, strict=True))


def test_each_node_runs_about_once_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mnist.load_pretrained_mnist_cnn()
    calib = [mnist.load_mnist("test")[0][i * 8:(i + 1) * 8] for i in range(2)]
    q = quanta.quantize(model, calib, show_progress=False)
    paused = PausedForward.build(q, calib)
    runs = []
    original = graph_runtime.node_value
    monkeypatch.setattr(paused_forward.graph_runtime, "node_value",
                        lambda *a: (runs.append(1), original(*a))[1])
    layers = correctable_layers(q)
    for lp, layer in layers:
        int8_inputs(q, [(lp, layer)], calib, lambda n, m, x: None, lp.name, paused)
    nodes = len(paused.nodes)
    print(f"{len(layers)} layers, {nodes} nodes, 2 batches: {len(runs)} node runs")
    assert len(runs) <= 2 * (nodes + len(layers))  # rerun from the input: ~ layers * nodes / 2 per batch


def test_values_past_the_hold_limit_start_over_with_the_same_inputs() -> None:
    model = mnist.load_pretrained_mnist_cnn()
    calib = [mnist.load_mnist("test")[0][i * 8:(i + 1) * 8] for i in range(3)]
    q = quanta.quantize(model, calib, show_progress=False)
    layers = correctable_layers(q)
    seen: dict[object, list[torch.Tensor]] = {}
    largest = 0  # the most bytes one batch holds at any pause, with no limit
    for limit in (None, 0, "one batch"):
        paused = PausedForward.build(q, calib, hold_limit={None: None, 0: 0, "one batch": largest}[limit])
        seen[limit], ever_kept = [], set()
        for lp, layer in layers:
            record = seen[limit].append
            int8_inputs(q, [(lp, layer)], calib, lambda n, m, x, r=record: r(x.clone()), lp.name, paused)
            sizes = [paused_forward.held_bytes(v) for _, v in paused.paused]
            largest = max(largest, *sizes) if limit is None else largest
            ever_kept.update(b for b, (start, _) in enumerate(paused.paused) if start > 0)
            assert sum(sizes) <= paused.hold_limit
        if limit is None:
            assert ever_kept == {0, 1, 2}
        elif limit == 0:
            assert not ever_kept, "no room: every batch starts over"
        else:
            assert ever_kept, "one batch's values fit: some batch was kept"
    assert len(seen[None]) == len(seen[0]) == len(seen["one batch"]) == 3 * len(layers)
    for a, b, c in zip(seen[None], seen[0], seen["one batch"], strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_untraceable_or_mixed_batches_are_not_paused() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if float(x.sum()) > 0 else self.b(x)  # data-dependent: FX cannot trace it

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.calls = nn.Linear(4, 4), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1  # Python state a trace would run only once: later calls would differ
            return self.a(x) * (2.0 if self.calls > 1000 else 1.0)

    calib = [torch.randn(3, 4), -torch.rand(3, 4)]
    q = quanta.quantize(Branchy().eval(), calib, show_progress=False)
    assert PausedForward.build(q, calib) is None
    q = quanta.quantize(Counting().eval(), calib, show_progress=False)
    assert PausedForward.build(q, calib) is None
    lin = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    q = quanta.quantize(lin, [torch.randn(3, 4)], show_progress=False)
    assert PausedForward.build(q, [torch.randn(3, 4), torch.randn(5, 4)]) is None  # two shapes
    assert PausedForward.build(q, [(torch.randn(3, 4),)]) is None  # not a plain tensor
    assert PausedForward.build(q, [torch.randn(3, 4)]) is not None


def test_bias_correction_gives_the_same_model_paused_or_rerun(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mnist.load_pretrained_mnist_cnn()
    calib = [mnist.load_mnist("train")[0][i * 50:(i + 1) * 50] for i in range(2)]
    a, b = _pair(model, calib)
    correct_bias(model, a, calib, show_progress=False)
    monkeypatch.setattr(PausedForward, "build", classmethod(lambda cls, q, batches: None))
    correct_bias(model, b, calib, show_progress=False)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), key
