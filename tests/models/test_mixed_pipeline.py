"""Acceptance: LayerNorm and Softmax between Linear layers stay float, the rest is int8.

A small classifier is trained for a few seconds on real 8x8 digits (sklearn), then quantized.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quanta
from quanta.debug.sqnr import sqnr


class MixedPipeline(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.relu(self.fc1(x)))
        x = torch.softmax(self.fc2(x), dim=-1)  # an attention-like float island
        return self.fc3(x * 8.0)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = MixedPipeline()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        for i in range(0, 1400, 200):
            loss = F.cross_entropy(model(x[i:i + 200]), y[i:i + 200])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), x[:1400], x[1400:], y[1400:]


def test_mixed_pipeline_fidelity_and_report(digits):
    model, train_x, test_x, test_y = digits
    calib = [train_x[i:i + 100] for i in range(0, 800, 100)]
    qmodel = quanta.quantize(model, calib, show_progress=False)
    with torch.no_grad():
        ref, out = model(test_x), qmodel(test_x)
    assert sqnr(ref, out) >= 25.0
    acc_f = (ref.argmax(1) == test_y).float().mean().item()
    acc_q = (out.argmax(1) == test_y).float().mean().item()
    assert acc_f > 0.9 and abs(acc_f - acc_q) <= 0.01
    rows = {r["name"]: r for r in quanta.report(qmodel).to_dict()["layers"]}
    assert [rows[n]["precision"] for n in ("fc1", "fc2", "fc3")] == ["int8"] * 3
    assert rows["norm"]["precision"] == "float" and rows["norm"]["reason"] == "no int8 kernel"
    softmax = [r for r in rows.values() if r["op"] == "softmax"]
    assert softmax and softmax[0]["precision"] == "float" and softmax[0]["reason"] == "no int8 kernel"
    # fc1 feeds LayerNorm (float), so it emits float directly rather than int8
    assert not rows["fc1"]["output_int8"]
    text = str(quanta.report(qmodel))
    assert "LayerNorm" in text and "no int8 kernel" in text
