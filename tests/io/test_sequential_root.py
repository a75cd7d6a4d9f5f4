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


def test_dynamic_per_row_model_round_trips_with_its_settings(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    config = quanta.QuantConfig(mode="dynamic", dynamic_per_row=True)
    qmodel = quanta.quantize_dynamic(model, config=config)
    assert "_quanta" not in dict(qmodel.named_children())
    path = tmp_path / "dyn.quanta.safetensors"
    quanta.save(qmodel, path)
    loaded = quanta.load(path, model)
    assert loaded[0].per_row and loaded[0].layer_name == "0"
    x = torch.randn(5, 16)
    assert torch.equal(qmodel(x), loaded(x))
