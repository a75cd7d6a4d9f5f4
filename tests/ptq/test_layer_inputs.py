"""feed_layer_inputs: the calibration pass SmoothQuant and GPTQ learn from."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from quanta.ptq.layer_inputs import feed_layer_inputs


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()


def test_inputs_in_eval_mode_from_a_generator_and_the_model_restored():
    model = _model()
    batches = [torch.randn(3, 4) for _ in range(2)]
    seen: list[tuple[str, torch.Tensor]] = []
    ends = []
    feed_layer_inputs(model, (b for b in batches), {"0": model[0], "2": model[2]},
                      lambda name, x: seen.append((name, x.clone())), after_batch=lambda: ends.append(1))
    assert [n for n, _ in seen] == ["0", "2", "0", "2"] and len(ends) == 2
    assert torch.equal(seen[0][1], batches[0])
    with torch.no_grad():  # dropout was off: layer 2 saw exactly layer 0's output
        assert torch.equal(seen[1][1], model[0](batches[0]))
    assert model.training and all(not m._forward_pre_hooks for m in model)


def test_hooks_removed_and_mode_restored_when_a_batch_fails():
    model = _model()

    def fail(name: str, x: torch.Tensor) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        feed_layer_inputs(model, [torch.randn(1, 4)], {"0": model[0]}, fail)
    assert model.training and not model[0]._forward_pre_hooks
