"""The graph runtime: the same output as eager mode bit for bit, on real models, and eager mode
wherever the graph would not apply (control flow, hooks, replaced modules, other signatures)."""

import copy
import dataclasses
import pickle
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quanta
from quanta.errors import QuantizedInputError
from quanta.kernels import native
from quanta.modules import graph
from quanta.zoo import mnist, vision


def _eager(model: nn.Module) -> nn.Module:
    """The same quantized model, forced onto eager mode."""
    other = copy.deepcopy(model)
    other._quanta.config = dataclasses.replace(other._quanta.config, runtime="eager")
    return other


def _quantize(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    return quanta.quantize(model.eval(), batches, show_progress=False)


@pytest.fixture(scope="module")
def mnist_int8():
    images, labels = mnist.load_mnist("test")
    train, _ = mnist.load_mnist("train")
    q = _quantize(mnist.load_pretrained_mnist_cnn(), [train[i * 100:(i + 1) * 100] for i in range(4)])
    return q, images, labels


def test_mnist_graph_lowers_every_op_and_equals_eager_on_the_test_set(mnist_int8):
    q, images, labels = mnist_int8
    eager = _eager(q)
    with torch.no_grad():
        for batch in (images[:1], images[1:9], images[:250]):
            assert torch.equal(q(batch), eager(batch))
    status = graph.runtime_status(q)
    assert status.startswith("graph (27 ops lowered"), status
    assert "0 run as in eager mode" in status
    assert graph.runtime_status(eager) == "eager (config runtime='eager')"
    assert mnist.evaluate(q, images, labels) == mnist.evaluate(eager, images, labels) >= 98.5


def test_batch_one_calls_run_the_generated_forward(mnist_int8, monkeypatch):
    q, images, _ = mnist_int8
    q = copy.deepcopy(q)
    with torch.no_grad():
        q(images[:1])
        assert isinstance(q._quanta._graph, graph.GraphRuntime)
        calls, call_impl = [], nn.Module._call_impl

        def spy(module: nn.Module, *args: object, **kwargs: object) -> object:
            calls.append(module)
            return call_impl(module, *args, **kwargs)
        monkeypatch.setattr(nn.Module, "_call_impl", spy)
        y = q(images[:1])  # the eager path would call every module
        graph_calls = list(calls)
        assert torch.equal(y, _eager(q)(images[:1]))
    if native.load() is not None:
        assert graph_calls == []
    else:  # torch.ops fallback: a Linear at one row takes its float path, through the module
        assert {type(m).__name__ for m in graph_calls} == {"QuantizedLinear"}


def test_resnet18_graph_equals_eager_with_residual_adds():
    torch.manual_seed(0)
    calib = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    q = _quantize(vision.resnet18(num_classes=10), calib)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        y = q(x)
        assert torch.equal(q(x), y) and torch.equal(_eager(q)(x), y)
    assert graph.runtime_status(q).startswith("graph"), graph.runtime_status(q)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        if y.mean() > 0:  # data-dependent: cannot be one graph
            y = y * 2
        return self.fc(y.mean((2, 3)))


def test_data_dependent_control_flow_stays_eager_with_the_reason():
    torch.manual_seed(0)
    q = _quantize(_Branchy(), [torch.randn(2, 3, 8, 8)])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(q(x), _eager(q)(x))
        assert torch.equal(q(x), _eager(q)(x))
    status = graph.runtime_status(q)
    assert status.startswith("eager:") and "TraceError" in status, status


class _Mixed(nn.Module):
    """int8 convs around ops the runtime does not lower (sigmoid, a scalar multiply, cat)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        y = F.relu(self.a(x))
        z = torch.sigmoid(self.b(y)) * scale
        n = y.shape[0]
        return self.c(torch.cat([y, z], 1)).reshape(n, -1)


@pytest.fixture(scope="module")
def mixed_int8():
    torch.manual_seed(0)
    return _quantize(_Mixed(), [torch.randn(2, 3, 8, 8) for _ in range(2)])


def test_unlowered_ops_run_as_in_eager_mode(mixed_int8):
    q = copy.deepcopy(mixed_int8)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = q(x)
        assert torch.equal(q(x), y) and torch.equal(_eager(q)(x), y)
    rt = q._quanta._graph
    assert isinstance(rt, graph.GraphRuntime) and rt.generic > 0 and rt.lowered >= 3


def test_other_inputs_and_signatures_fall_back_to_eager(mixed_int8):
    q, eager = copy.deepcopy(mixed_int8), _eager(mixed_int8)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        q(x)
        assert isinstance(q._quanta._graph, graph.GraphRuntime)
        assert torch.equal(q(x, 3.0), eager(x, 3.0))  # the flag was fixed at 1.0 when traced
        assert torch.equal(q(x, scale=1.0), eager(x, scale=1.0))
        assert not torch.equal(q(x, 3.0), q(x))
    assert isinstance(q._quanta._graph, graph.GraphRuntime)


def test_new_batch_and_spatial_sizes_use_the_same_graph(mixed_int8):
    q, eager = copy.deepcopy(mixed_int8), _eager(mixed_int8)
    with torch.no_grad():
        q(torch.randn(2, 3, 8, 8))
        rt = q._quanta._graph
        for shape in ((1, 3, 8, 8), (5, 3, 6, 6), (3, 3, 11, 7)):
            x = torch.randn(*shape)
            assert torch.equal(q(x), eager(x))
    assert q._quanta._graph is rt


def test_bad_input_gives_the_eager_error(mnist_int8):
    q, images, _ = mnist_int8
    with torch.no_grad():
        q(images[:1])
        with pytest.raises(QuantizedInputError, match="rank"):
            q(images[0])
        with pytest.raises(QuantizedInputError, match="float"):
            q(images[:1].to(torch.int64))
        assert isinstance(q._quanta._graph, graph.GraphRuntime)  # still used for good input
        assert torch.equal(q(images[:2]), _eager(q)(images[:2]))


def test_a_hook_added_later_runs_and_the_graph_returns_after_removal(mixed_int8):
    q = copy.deepcopy(mixed_int8)
    x = torch.randn(2, 3, 8, 8)
    seen = []
    with torch.no_grad():
        q(x)
        handle = q.b.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        y = q(x)
        assert seen == [(2, 8, 8, 8)]
        assert "forward hook on b" in graph.runtime_status(q)
        handle.remove()
        assert torch.equal(q(x), y)  # rebuilt
        q(x)
    assert len(seen) == 1 and isinstance(q._quanta._graph, graph.GraphRuntime)


def test_replacing_a_module_after_the_build_is_seen(mixed_int8):
    q = copy.deepcopy(mixed_int8)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = q(x)
        q.c = nn.Identity()
        after = q(x)
    assert after.shape != before.shape and torch.equal(after, _eager(q)(x))


def test_load_state_dict_rebuilds_with_the_new_qparams(mnist_int8):
    q, images, _ = mnist_int8
    q = copy.deepcopy(q)
    state = q.state_dict()
    state["conv1.output_scale"] = state["conv1.output_scale"] * 2
    with torch.no_grad():
        q(images[:1])
        q.load_state_dict(state)
        assert torch.equal(q(images[:4]), _eager(q)(images[:4]))
        rt = q._quanta._graph
        fc1_state = dict(q.fc1.state_dict())
        fc1_state["output_scale"] = fc1_state["output_scale"] * 3  # one layer reloaded on its own
        q.fc1.load_state_dict(fc1_state)
        assert torch.equal(q(images[:4]), _eager(q)(images[:4]))
    assert isinstance(q._quanta._graph, graph.GraphRuntime) and q._quanta._graph is not rt


def test_copies_and_pickles_build_their_own_graph(mnist_int8):
    q, images, _ = mnist_int8
    with torch.no_grad():
        y = q(images[:3])
        for other in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
            assert other._quanta._graph is None
            assert torch.equal(other(images[:3]), y)
            assert other._quanta._graph.model is other


def test_train_mode_and_prepared_models_run_eagerly(mnist_int8):
    q, images, _ = mnist_int8
    prepared = quanta.prepare(mnist.load_pretrained_mnist_cnn().eval(), images[:2])
    with torch.no_grad():
        prepared(images[:2])
    assert graph.runtime_status(prepared) == "eager: the model is prepared, not converted"
    q = copy.deepcopy(q).train()
    with torch.no_grad():
        q(images[:2])
    assert q._quanta._graph is None


def test_linear_layers_keep_their_per_call_int8_or_float_choice():
    """Small Linear calls between float ops take the float path per call, large ones int8 (the
    break-even in kernels/dispatch.py): the graph keeps that choice and eager mode's result."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
    q = _quantize(model, [torch.randn(64, 64) for _ in range(2)])
    eager = _eager(q)
    with torch.no_grad():
        for rows in (1, 3, 256, 2):
            x = torch.randn(rows, 64)
            assert torch.equal(q(x), eager(x))
    assert graph.runtime_status(q).startswith("graph"), graph.runtime_status(q)


class _Counting(nn.Module):
    """A forward with a Python side effect: a traced graph would count only once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x)


def test_forward_with_python_side_effects_stays_eager():
    torch.manual_seed(0)
    q = _quantize(_Counting(), [torch.randn(2, 3, 8, 8)])
    start = q.calls
    with torch.no_grad():
        for _ in range(3):
            q(torch.randn(1, 3, 8, 8))
    assert q.calls == start + 3
    assert "changes Python attributes" in graph.runtime_status(q)


def test_quantizing_another_model_does_not_rebuild_this_one(mnist_int8):
    q, images, _ = mnist_int8
    with torch.no_grad():
        q(images[:1])
        rt = q._quanta._graph
        _quantize(_Counting(), [torch.randn(2, 3, 8, 8)])  # new quantized modules elsewhere
        q(images[:1])
    assert q._quanta._graph is rt


def test_a_call_with_defaults_takes_the_positional_path(mixed_int8):
    q = copy.deepcopy(mixed_int8)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = q(x)
        rt = q._quanta._graph
        assert rt.positional and rt.fixed == {"scale": 1.0}
        assert torch.equal(q(x), y)


def test_bert_style_encoder_with_finfo_mask_traces_and_equals_eager():
    """``torch.finfo(x.dtype).min`` in the attention mask (BERT's pattern) and optional inputs."""
    from quanta.zoo.minilm import MiniLMConfig, minilm_encoder_random

    cfg = MiniLMConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    model = minilm_encoder_random(cfg)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 100, (2, 12), generator=g) for _ in range(2)]
    q = _quantize(model, calib)
    eager = _eager(q)
    ids = torch.randint(0, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    with torch.no_grad():
        assert torch.equal(q(ids), eager(ids))
        assert torch.equal(q(ids), eager(ids))
        assert graph.runtime_status(q).startswith("graph"), graph.runtime_status(q)
        assert torch.equal(q(ids, mask), eager(ids, mask))  # another signature: eager
        assert not torch.equal(q(ids, mask), q(ids))


_REFS: list = []


class _Remember(nn.Module):
    """A float op whose output is referenced weakly, to see when the runtime lets it go."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(x)
        _REFS.append(weakref.ref(out))
        return out


class _AliveCheck(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _REFS.append(_REFS[-1]() is not None)
        return x


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)
        self.remember, self.check = _Remember(), _AliveCheck()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.remember(self.a(x))
        u = self.b(t)
        return self.check(self.c(u))


def test_intermediates_are_freed_after_their_last_use():
    """Straight-line code would keep every activation to the end of the forward (MiniLM at
    batch 8 ran 1.5x slower so); the runtime drops each one after its last reader."""
    torch.manual_seed(0)
    q = _quantize(_Chain(), [torch.randn(2, 3, 12, 12)])
    x = torch.randn(2, 3, 12, 12)
    with torch.inference_mode():  # no quantization cache keeping the last float input
        q(x)
        assert isinstance(q._quanta._graph, graph.GraphRuntime), graph.runtime_status(q)
        _REFS.clear()
        q(x)
    assert _REFS[-1] is False  # tanh's output was gone by the time the last op ran


def test_a_graph_that_raises_where_eager_runs_is_dropped(mixed_int8):
    q = copy.deepcopy(mixed_int8)
    x = torch.randn(2, 3, 8, 8)

    def broken(*args: object) -> None:
        raise RuntimeError("stands for a graph that went wrong")
    with torch.no_grad():
        q(x)
        q._quanta._graph.fn = broken
        assert torch.equal(q(x), _eager(q)(x))
    assert graph.runtime_status(q) == "eager: the graph raised where eager mode ran"


@pytest.mark.parametrize("dropout", [nn.Dropout, nn.Dropout2d, nn.AlphaDropout])
def test_classifier_head_dropout_passes_int8_and_a_training_dropout_runs_eagerly(dropout: type) -> None:
    """A Dropout of any kind in eval mode is the identity on int8 data (the head's conv reads it
    without a dequantize/quantize round trip); one dropout module switched to training on its own
    makes the graph step aside, and that call equals eager mode with the same random mask."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(8), dropout(0.2),
                          nn.Conv2d(16, 10, 1), nn.Flatten())
    q = _quantize(model, [torch.randn(4, 3, 8, 8) for _ in range(3)])
    x = torch.randn(2, 3, 8, 8)
    eager = _eager(q)
    with torch.no_grad():
        want, _ = eager(x), q(x)
        got = q(x)
        assert quanta.runtime_status(q).startswith("graph") and torch.equal(got, want)
        assert q._quanta.plan.layers["4"].input_from == "0"  # int8 end to end through the head
        q[3].train()
        eager[3].train()
        torch.manual_seed(1)
        dropped = q(x)
        torch.manual_seed(1)
        assert torch.equal(dropped, eager(x)) and not torch.equal(dropped, want)
