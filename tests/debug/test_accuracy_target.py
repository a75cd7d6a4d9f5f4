"""Accuracy target: quanta.quantize(model, data, eval_fn=..., max_drop=...)."""

import dataclasses

import pytest
import torch

import quanta
from quanta.zoo.mnist import evaluate, load_mnist


def test_mnist_3bit_reaches_its_target_keeping_few_macs_float(mnist_debug):
    """Real model: 3-bit weights lose ~6 points; the target keeps two convs float (about a fifth
    of the MACs) and lands within 1 point of float."""
    model, _, _, _ = mnist_debug
    train_x, _ = load_mnist("train")
    test_x, test_y = load_mnist("test")
    test_x, test_y = test_x[:200], test_y[:200]
    config = quanta.QuantConfig(weight=dataclasses.replace(quanta.QuantConfig().weight, bits=3))
    qmodel = quanta.quantize(model, [train_x[:100], train_x[100:200]], config=config, max_drop=1.0,
                             eval_fn=lambda m: evaluate(m, test_x, test_y), show_progress=False)
    result = quanta.target_of(qmodel)
    assert result.met and result.metric_float >= 99.0
    assert result.metric_int8 < result.metric_float - 3.0  # fully int8 misses the target
    assert result.metric >= result.target == result.metric_float - 1.0
    assert evaluate(qmodel, test_x, test_y) == result.metric  # the model returned is the one measured
    assert 0.0 < result.float_mac_share <= 0.4 and 1 <= len(result.kept) <= 3
    rows = {r["name"]: r for r in quanta.report(qmodel).to_dict()["layers"]}
    for kept in result.kept:
        assert rows[kept.name]["precision"] == "float"
        assert "accuracy target" in rows[kept.name]["reason"] and "rank" in kept.why
    assert sum(r["precision"] == "int8" for r in rows.values()) == 10 - len(result.kept)
    assert "target met" in str(result) and "kept float by the accuracy target" in str(result)


def test_unreachable_target_says_so_and_still_returns_a_model(tiny):
    model, data = tiny
    x = data[0]
    with torch.no_grad():
        reference = model(x)

    def closeness(m: torch.nn.Module) -> float:  # 0 for float itself
        with torch.no_grad():
            return -float((m(x) - reference).abs().max())

    with pytest.warns(quanta.QuantaWarning, match="even with every int8 site kept float"):
        qmodel = quanta.quantize(model, data, eval_fn=closeness, max_drop=-0.5, show_progress=False)
    result = quanta.target_of(qmodel)
    assert not result.met and "target NOT met" in result.message
    assert result.metric == 0.0 and len(result.kept) == 3  # the best model measured: all float
    assert torch.equal(qmodel(x), reference)


def test_target_is_deterministic_and_minimal(tiny):
    model, data = tiny
    weight = dataclasses.replace(quanta.QuantConfig().weight, bits=2)
    config = quanta.QuantConfig(overrides=(quanta.Override("b", weight=weight),))
    x = data[0]
    with torch.no_grad():
        reference = model(x)

    def closeness(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return -float((m(x) - reference).pow(2).mean() / reference.pow(2).mean())

    kept = []
    for order in ("sensitivity", "sensitivity", "sqnr"):
        q = quanta.quantize(model, data, config=config, eval_fn=closeness, max_drop=0.01, order=order,
                            show_progress=False)
        kept.append([k.name for k in quanta.target_of(q).kept])
    assert kept == [["b"], ["b"], ["b"]]


def test_target_arguments_are_checked(tiny):
    model, data = tiny
    with pytest.raises(ValueError, match="needs both eval_fn"):
        quanta.quantize(model, data, max_drop=0.1)
    with pytest.raises(ValueError, match="order must be one of"):
        quanta.quantize(model, data, eval_fn=lambda m: 1.0, max_drop=0.1, order="random")
    assert quanta.target_of(quanta.quantize(model, data, show_progress=False)) is None
