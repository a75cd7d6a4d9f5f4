"""Shared measures for tests."""

import torch


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(||ref|| / ||ref - test||)."""
    reference, test = reference.detach().double(), test.detach().double()
    noise = (reference - test).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(reference.norm() / noise))
