"""Adaptive average pooling in the export twin (ONNX and ExecuTorch): uniform bins are a plain
average pool, other bins explicit slice means; int8 inputs are quantized again after it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


class _ExportAdaptiveAvgPool2d(nn.Module):
    """AdaptiveAvgPool2d for a fixed spatial size: ONNX has no adaptive pooling when the output
    size does not divide the input size, but uniform bins are a plain AveragePool, and any
    other bins are explicit slice means."""

    def __init__(self, output_size: Any, qparams: Any = None) -> None:
        super().__init__()
        self.output_size = output_size
        self._qparams = qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._pool(x)
        qp = self._qparams.of(x) if self._qparams is not None else None
        # quanta pools int8 activations on the integers and rounds: quantize again, same qparams
        return y if qp is None else self._qparams.quant_dequant(y, *qp)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        size = self.output_size if isinstance(self.output_size, (tuple, list)) else (self.output_size,) * 2
        h, w = int(x.shape[-2]), int(x.shape[-1])
        oh, ow = (h if size[0] is None else size[0]), (w if size[1] is None else size[1])
        if (oh, ow) == (1, 1):  # GlobalAveragePool (ONNX), a global mean (XNNPACK)
            steps = self._qparams.steps if self._qparams is not None else None
            return steps.global_pool(x) if steps is not None else F.adaptive_avg_pool2d(x, 1)
        rows, cols = _bins(h, oh), _bins(w, ow)
        uniform = _uniform(rows) and _uniform(cols)
        if uniform:
            kernel = (rows[0][1] - rows[0][0], cols[0][1] - cols[0][0])
            stride = (rows[1][0] - rows[0][0] if oh > 1 else 1, cols[1][0] - cols[0][0] if ow > 1 else 1)
            return F.avg_pool2d(x, kernel, stride)
        cells = [torch.cat([x[..., r0:r1, c0:c1].mean(dim=(-2, -1), keepdim=True) for c0, c1 in cols], -1)
                 for r0, r1 in rows]
        return torch.cat(cells, -2)


def _uniform(bins: list[tuple[int, int]]) -> bool:
    sizes = {b - a for a, b in bins}
    steps = {bins[i + 1][0] - bins[i][0] for i in range(len(bins) - 1)}
    return len(sizes) == 1 and len(steps) <= 1
