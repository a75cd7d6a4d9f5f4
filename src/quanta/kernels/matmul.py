"""Fast int8 activation x activation matmul (attention's Q.K^T and P.V).

Both operands change on every call, so there is no weight to pack, and on AVX2 without VNNI
int8 x int8 products do not fit ``vpmaddubsw``'s saturating pairs (255 * 255 * 2 > 2^15). The
codes minus their zero points are instead multiplied as float32 in one sgemm, which is exact:
each product is at most 255^2 and every partial sum of ``EXACT_K`` = 258 of them stays below
2^24, where float32 still holds every integer (258 * 65025 = 16,776,450 < 16,777,216). Longer
sums are split into chunks of ``EXACT_K`` whose exact results are added in int32. So the
accumulator equals :func:`quanta.kernels.reference.matmul_accumulate` exactly, and the epilogue
is the reference's own: the output is bit-identical to :func:`quanta.kernels.reference.matmul`
(tests/kernels/test_matmul.py). What int8 buys here is the data between ops (uint8 Q, K, V and
softmax output, 4x less memory than float32), not a faster multiply.
"""

from __future__ import annotations

import torch

from quanta.kernels import reference

#: the longest sum of products of two 8-bit codes (|code - zero point| <= 255) float32 keeps exact
EXACT_K = 258


def matmul_accumulate(
    a_q: torch.Tensor, a_zero_point: int, b_q: torch.Tensor, b_zero_point: int
) -> torch.Tensor:
    """The int32 accumulator of :func:`quanta.kernels.reference.matmul_accumulate`, as exact
    integers in float32 (``k <= EXACT_K``) or int32 (longer sums, added chunk by chunk)."""
    a = a_q.to(torch.float32).sub_(a_zero_point)
    b = b_q.to(torch.float32).sub_(b_zero_point)
    k = a.shape[-1]
    if k <= EXACT_K:
        return torch.matmul(a, b)
    acc = None
    for start in range(0, k, EXACT_K):
        part = torch.matmul(a[..., start:start + EXACT_K], b[..., start:start + EXACT_K, :])
        part = part.to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


def matmul(
    a_q: torch.Tensor, a_scale: float, a_zero_point: int,
    b_q: torch.Tensor, b_scale: float, b_zero_point: int,
    out_scale: float | None = None, out_zero_point: int = 0,
) -> torch.Tensor:
    """:func:`quanta.kernels.reference.matmul` with the accumulator computed in one sgemm."""
    if a_q.dim() < 2 or b_q.dim() < 2:  # a vector operand: the reference's shapes, unchanged
        return reference.matmul(a_q, a_scale, a_zero_point, b_q, b_scale, b_zero_point,
                                out_scale, out_zero_point)
    acc = matmul_accumulate(a_q, a_zero_point, b_q, b_zero_point)
    return reference.epilogue(acc, a_scale, torch.tensor([b_scale]), -1, "none", out_scale, out_zero_point)
