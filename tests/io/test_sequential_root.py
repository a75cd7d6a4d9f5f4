"""quanta's state must not become a child of the model: nn.Sequential runs every child."""

import torch
import torch.nn as nn

import quanta


def test_sequential_root_survives_quantize_save_and_load(tmp_path):
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)).eval()
    qmodel = quanta.quantize(model, [torch.randn(4, 10)], show_progress=False)
    assert "_quanta" not in dict(qmodel.named_children())
    path = tmp_path / "seq.quanta.safetensors"
    quanta.save(qmodel, path)
    loaded = quanta.load(path, model)
    assert "_quanta" not in dict(loaded.named_children())
    x = torch.randn(3, 10)
    assert torch.equal(qmodel(x), loaded(x))
    assert any(k.startswith("_quanta.") or k.endswith("weight_scale") for k in loaded.state_dict())
