"""The inputs named layers see when a float model runs on calibration batches: what SmoothQuant
and GPTQ learn from."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from typing import Any

import torch
import torch.nn as nn

from quanta.capture.record import call_with
from quanta.progress import progress


def feed_layer_inputs(model: nn.Module, batches: Iterable[Any], layers: dict[str, nn.Module],
                      on_input: Callable[[str, torch.Tensor], None], *,
                      after_batch: Callable[[], None] | None = None, description: str = "",
                      show_progress: bool = False) -> None:
    """Run ``model`` in eval mode without gradients on ``batches`` and call ``on_input(name, x)``
    with the first positional argument ``x`` of each call of ``layers[name]`` (floating tensors
    only), then ``after_batch()`` after each batch. The training flag and the hooks are restored
    whatever happens."""
    def hook_for(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                on_input(name, x)  # the same object for every layer reading it (GPTQ shares sums)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in layers.items()]
    training = model.training
    model.eval()  # the inputs inference will see (no dropout)
    try:
        with torch.no_grad():
            total = len(batches) if isinstance(batches, Sized) else None  # a generator has no length
            for batch in progress(batches, total=total, description=description,
                                  enabled=show_progress and bool(description)):
                call_with(model, batch)
                if after_batch is not None:
                    after_batch()
    finally:
        model.train(training)
        for h in handles:
            h.remove()
