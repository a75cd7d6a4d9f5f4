"""Two gloo ranks calibrate shards; the result is compared with one process over the union."""

import pytest
import torch
from dist_workers import (
    KINDS,
    PRELOAD,
    LazyImages,
    batches,
    calibrate_kinds,
    config,
    net,
    observer_state,
    rank_calibration,
)

import quanta
from quanta.distributed import launch


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    ranks = launch(rank_calibration, 2, (str(out),), timeout=60, preload=PRELOAD)
    return ranks, out


@pytest.fixture(scope="module")
def one_thread():
    """Ranks run one torch thread each: so does the single process (a conv's float sums
    depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single(one_thread):
    """One process over the union: the shards are [b0, b2, b4] and [b1, b3, b5]."""
    return calibrate_kinds(batches(), batches(3, seed=2))


def _equal(a: dict, b: dict) -> list[str]:
    """Names of tensors that differ in value, dtype or shape (bit for bit)."""
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def test_ranks_end_bit_identical(two_ranks):
    (r0, r1), _ = two_ranks
    for kind in KINDS:
        if "model" in r0[kind]:
            assert not _equal(r0[kind]["model"], r1[kind]["model"]), kind
        for name in r0[kind]["observers"]:
            assert not _equal(r0[kind]["observers"][name], r1[kind]["observers"][name]), (kind, name)


@pytest.mark.parametrize("kind", ["minmax", "histogram", "entropy"])
def test_equal_to_one_process_over_the_union(two_ranks, single, kind):
    """minmax: global min/max; histogram/entropy: shared grid, summed counts (the histogram
    case also calibrates twice): observers and the int8 model are bit-identical."""
    (r0, _), _ = two_ranks
    assert len(single[kind]["observers"]) == 7  # input + output of 3 layers, and the add
    for name, state in single[kind]["observers"].items():
        assert not _equal(state, r0[kind]["observers"][name]), (kind, name)
    if kind == "entropy":  # same histogram, min and max: the same searched range
        for name, state in single[kind]["observers"].items():
            assert float(state["histogram"].sum()) > 0, name
    else:
        assert not _equal(single[kind]["model"], r0[kind]["model"]), kind
    if kind == "histogram":
        hist = single[kind]["observers"]["conv.input_observer"]["histogram"]
        assert int(hist.sum()) == 9 * 4 * 3 * 8 * 8  # all 9 batches of both calibrate calls


def test_percentile_averages_every_batch_of_every_rank(two_ranks, single):
    (r0, _), _ = two_ranks
    for name, state in single["percentile"]["observers"].items():
        got = r0["percentile"]["observers"][name]
        assert int(got["batches"]) == int(state["batches"]) == 6
        torch.testing.assert_close(got["lo_sum"], state["lo_sum"], rtol=1e-14, atol=0)
        torch.testing.assert_close(got["hi_sum"], state["hi_sum"], rtol=1e-14, atol=0)
    assert not _equal(single["percentile"]["model"], r0["percentile"]["model"])


def test_moving_average_is_the_mean_of_the_ranks_averages(two_ranks, one_thread):
    (r0, _), _ = two_ranks
    data = batches()
    per_rank = []
    for shard in (data[0::2], data[1::2]):
        prepared = quanta.prepare(net(), data[0], config("moving_average"))
        quanta.calibrate(prepared, shard, show_progress=False)
        per_rank.append(observer_state(prepared))
    for name, got in r0["moving_average"]["observers"].items():
        a, b = per_rank[0][name], per_rank[1][name]
        assert float(got["min_val"]) == float(((a["min_val"].double() + b["min_val"].double()) / 2).float())
        assert float(got["max_val"]) == float(((a["max_val"].double() + b["max_val"].double()) / 2).float())
        assert int(got["batches"]) == 6


def test_streamed_dataset_with_workers_equals_one_process(two_ranks, one_thread):
    """A lazily generated Dataset, sharded per rank, through a DataLoader with 2 workers."""
    (r0, _), _ = two_ranks
    prepared = quanta.prepare(net(), batches(1)[0], config("histogram"))
    quanta.calibrate(prepared, torch.utils.data.DataLoader(LazyImages(), batch_size=4), show_progress=False)
    single = observer_state(prepared)
    for name, state in single.items():
        assert not _equal(state, r0["stream"][name]), name
    assert int(single["conv.input_observer"]["histogram"].sum()) == 40 * 3 * 8 * 8


def test_only_rank_zero_writes(two_ranks):
    (r0, r1), out = two_ranks
    assert r0["saved"] == r1["saved"]
    assert (out / "only-rank0.quanta.safetensors").is_file()
    assert not (out / "only-rank1.quanta.safetensors").exists()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["model.quanta.safetensors", "only-rank0.quanta.safetensors"]
    loaded = quanta.load(out / "model.quanta.safetensors", net())
    assert loaded(batches(1)[0]).shape == (4, 10)
