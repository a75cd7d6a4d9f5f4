"""Weight-only mode end to end on a small Llama: generate with the KV cache, save/load, config."""

from __future__ import annotations

import pytest
import torch

import quanta
from quanta.config import CONFIG_VERSION, QuantConfig, QuantSpec
from quanta.modules.weight_only import WeightOnlyLinear

transformers = pytest.importorskip("transformers")

INT4_G32 = QuantConfig(weight=QuantSpec(bits=4, group_size=32))
INT4_G32_FLOAT = QuantConfig(weight=QuantSpec(bits=4, group_size=32), int4_activations="float")


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


# cache_limit: the cached decode against a full forward, relative. int4 decodes with int8 activations
# (one row at a time: the GEMV quantizes x per block of 32) while the full forward's many rows run
# float activations (dequantize + sgemm): they differ by that quantization (measured 0.8 %)
@pytest.mark.parametrize("mode,config,limit,cache_limit", [
    ("weight_only", None, 0.01, 1e-5), ("weight_only", INT4_G32, 0.1, 0.03),
    ("weight_only", INT4_G32_FLOAT, 0.1, 1e-5), ("dynamic", None, 0.02, 1e-5)],
    ids=["int8", "int4-g32", "int4-g32-float-activations", "dynamic"])
def test_generate_with_kv_cache_and_roundtrip(tiny_llama, tmp_path, mode, config, limit, cache_limit):
    q = quanta.quantize(tiny_llama, mode=mode, config=config)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = q.generate(ids, max_new_tokens=6, do_sample=False)
        # the cached decode gives the logits a full forward over the same tokens gives
        full = q(out).logits[0, -2]  # the logits that chose the last token
        cached = q.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                            return_dict_in_generate=True).logits[-1][0]
        ref = tiny_llama(out).logits[0, -2]
    assert out.shape == (1, 16)
    assert float((cached - full).abs().max() / full.abs().max()) < cache_limit
    assert float((full - ref).abs().max() / ref.abs().max()) < limit
    path = quanta.save(q, tmp_path / "m.quanta.safetensors")
    back = quanta.load(path, tiny_llama)
    with torch.inference_mode():
        assert torch.equal(back(out).logits, q(out).logits)
        assert torch.equal(back.generate(ids, max_new_tokens=6, do_sample=False), out)


def test_layers_and_report(tiny_llama):
    q = quanta.quantize(tiny_llama, mode="weight_only",
                        config=QuantConfig(weight=QuantSpec(bits=4, group_size=64, symmetric=True)))
    layer = q.model.layers[0].mlp.down_proj
    assert isinstance(layer, WeightOnlyLinear) and layer.weight.dtype == torch.uint8
    assert layer.weight.shape == (64, 64) and layer.weight_scale.shape == (64, 2)
    assert isinstance(q.lm_head, WeightOnlyLinear)
    plan = q._quanta.plan
    assert plan.layers["lm_head"].reason == ("weight-only int4 (symmetric, groups of 64; decode: int8 "
                                             "activations per block of 32)")
    assert layer.int8_activations and "int8 activations in decode" in repr(layer)
    assert plan.layers["model.embed_tokens"].precision == "float"
    assert "WeightOnlyLinear" in str(quanta.report(q))


def test_config_errors_and_versions():
    assert QuantConfig().version == CONFIG_VERSION  # the literal is checked once, in test_config_and_report
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantSpec(bits=4, group_size=48) and QuantConfig(weight=QuantSpec(bits=4, group_size=48))
    with pytest.raises(ValueError, match="bits=4"):
        QuantConfig(weight=QuantSpec(bits=8, group_size=32))
    with pytest.raises(ValueError, match="need mode='weight_only'"):
        quanta.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), mode="dynamic", config=INT4_G32)
    # a version-1 config (no group_size, no weight_only mode) still loads
    old = QuantConfig(mode="dynamic").to_dict()
    old["version"] = 1
    for spec in ("weight", "activation"):
        del old[spec]["group_size"]
    assert QuantConfig.from_dict(old).weight.group_size is None
    assert QuantConfig.from_dict(INT4_G32.to_dict()) == INT4_G32
    # a file saved before int8 activations existed keeps the float-activation GEMV it was measured with
    v9 = INT4_G32.to_dict()
    v9["version"] = 9
    del v9["int4_activations"]
    assert QuantConfig.from_dict(v9).int4_activations == "float"
    with pytest.raises(ValueError, match="int4_activations"):
        QuantConfig(int4_activations="int4")


def test_layers_that_cannot_take_int4_stay_float():
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Linear(64, 8))
    q = quanta.quantize(model, mode="weight_only", config=INT4_G32_FLOAT)  # float_forward's arithmetic
    assert isinstance(q[0], torch.nn.Linear) and isinstance(q[1], WeightOnlyLinear)
    assert "multiples of 32" in q._quanta.plan.layers["0"].reason
    x = torch.randn(2, 40)
    assert torch.allclose(q(x), q[1].float_forward(q[0](x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [None, INT4_G32], ids=["int8", "int4-g32"])
def test_compiled_forward_keeps_the_kernels_as_one_op(tiny_llama, config):
    """``torch.compile`` of a forward that calls weight-only layers (transformers' own advice:
    ``model.forward = torch.compile(model.forward)``): each layer is one opaque op, so the graph
    has no break (``fullgraph=True`` would raise) and its outputs are the eager ones."""
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).eval()
    q = quanta.quantize(mlp, mode="weight_only", config=config)
    compiled = torch.compile(q.forward, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for rows in (1, 40):  # the GEMV, and dequantize + sgemm
            x = torch.randn(rows, 64)
            assert torch.equal(compiled(x), q(x))
    llama = quanta.quantize(tiny_llama, mode="weight_only", config=config)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = llama(ids, use_cache=False).logits
        llama.forward = torch.compile(llama.forward, dynamic=False)
        got = llama(ids, use_cache=False).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4  # inductor's float ops, same kernels
