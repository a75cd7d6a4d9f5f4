"""Orthogonal matrices for rotations: signed Hadamard matrices where one of the order exists.

A Hadamard matrix (entries +-1, H H^T = n I) divided by sqrt(n) is orthogonal and spreads any
one channel evenly over all n (every entry has magnitude 1/sqrt(n)), which is what a rotation
before int8 wants: an outlier channel's energy lands on every channel (QuaRot, Ashkboos et al.
2024). Orders built here: Sylvester's powers of two and Paley's construction I for q + 1 with q a
prime = 3 (mod 4), combined by Kronecker products (576 = 12 * 12 * 4, 1536 = 12 * 128). Random
signs on the rows make one matrix per seed. Where no order fits, a seeded random orthogonal
matrix (QR of a Gaussian) takes its place.
"""

from __future__ import annotations

import torch

# primes q = 3 (mod 4): Paley I gives a Hadamard matrix of order q + 1
_PALEY_PRIMES = (3, 7, 11, 19, 23, 31, 43, 47, 59, 67, 71, 79, 83, 103, 107, 127, 131, 139, 151, 163, 167,
                 179, 191, 199, 211, 223, 227, 239, 251)


def _paley(q: int) -> torch.Tensor:
    """The +-1 Hadamard matrix of order q + 1 (Paley construction I; q prime, q % 4 == 3)."""
    chi = [0] + [1 if pow(i, (q - 1) // 2, q) == 1 else -1 for i in range(1, q)]  # Legendre symbol
    jacobsthal = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int) -> torch.Tensor | None:
    """An n x n +-1 Hadamard matrix (float64), or None when none of the constructions here fits."""
    if n >= 1 and n & (n - 1) == 0:
        return _sylvester(n)
    for q in _PALEY_PRIMES:
        if n % (q + 1) == 0:
            rest = hadamard(n // (q + 1))
            if rest is not None:
                return torch.kron(_paley(q), rest)
    return None


def _signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1


def orthogonal(n: int, seed: int) -> torch.Tensor:
    """An n x n orthogonal matrix (float64): a normalized Hadamard matrix with seeded random row
    signs, or a seeded random orthogonal matrix where no Hadamard order here fits."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is not None:
        return _signs(n, g)[:, None] * h / n ** 0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def kronecker_factors(n: int) -> tuple[int, int]:
    """(a, b), a * b == n and a <= b, with a Hadamard matrix of both orders and a + b least: the
    cheapest rotation applied as two small matmuls (n (a + b) multiply-adds per row). (1, n) when
    no split fits (one dense n x n matmul)."""
    best = (1, n)
    for a in range(2, int(n ** 0.5) + 1):
        if n % a == 0 and hadamard(a) is not None and hadamard(n // a) is not None and a + n // a < sum(best):
            best = (a, n // a)
    return best
