"""quanta.debug.sensitivity and quanta.variants: one calibration, variants by QuantConfig.skip."""

import dataclasses

import pytest
import torch

import quanta
from quanta.config import Override
from quanta.variants import Variants


def _two_bit_b() -> quanta.QuantConfig:
    weight = dataclasses.replace(quanta.QuantConfig().weight, bits=2)
    return quanta.QuantConfig(overrides=(Override("b", weight=weight),))


def test_sensitivity_ranks_the_damaged_layer_first(tiny):
    model, data = tiny
    result = quanta.debug.sensitivity(model, data, _two_bit_b(), show_progress=False)
    assert [s.name for s in result.sites][0] == "b"
    b = result.sites[0]
    others = result.sites[1:]
    # only b int8: far worse than only a or only c int8; all but b int8: far better than all int8
    assert b.only_sqnr < min(s.only_sqnr for s in others) - 10
    assert b.gain_db > 10 and all(s.gain_db < b.gain_db - 10 for s in others)
    assert b.all_but_sqnr == pytest.approx(result.full_sqnr + b.gain_db)
    assert result.full_sqnr < 20 and min(s.only_sqnr for s in others) > 30
    assert [d["name"] for d in result.to_dict()["sites"]] == result.order()
    assert "all but this int8 dB" in str(result)


@pytest.mark.filterwarnings("ignore::quanta.QuantaWarning")  # variants with every site float
def test_variants_match_quantizing_with_skip(tiny):
    """A variant (shared calibration, frozen observers) is the model quantize(skip=...) makes."""
    model, data = tiny
    variants = Variants(model, data, show_progress=False)
    assert [lp.name for lp in variants.sites()] == ["a", "b", "c"]
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    for keep in ([], ["b"], ["a", "c"]):
        built = variants.build(keep)
        direct = quanta.quantize(model, data, skip=keep, show_progress=False)
        assert torch.equal(built(x), direct(x)), keep
        rows = {r["name"]: r for r in quanta.report(built).to_dict()["layers"]}
        assert [n for n, r in rows.items() if r["precision"] == "float" and n in "abc"] == keep
        assert all(rows[n]["reason"] == "kept float" for n in keep)
    assert variants.own_calibrations == 0
    with pytest.raises(ValueError, match="not a site"):
        variants.build(["nope"])
