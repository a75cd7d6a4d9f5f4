"""A MODEL factory for the --max-drop CLI test: a small MLP, its data and its metric."""

import torch
from torch import nn


def make() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(64, 16, generator=gen) for _ in range(2)]
    with torch.no_grad():
        reference = model(data[0])

    def closeness(m: nn.Module) -> float:
        with torch.no_grad():
            return -float((m(data[0]) - reference).abs().max())

    return {"model": model, "calib": data, "eval": closeness}


def bad_eval(model: nn.Module) -> str:
    return "not a number"
