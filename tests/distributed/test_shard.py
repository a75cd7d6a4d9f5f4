"""``shard`` without a process group (explicit rank and world size)."""

import pytest
import torch

from quanta.distributed import shard


def test_lists_datasets_and_iterables_are_split_round_robin():
    data = [torch.full((1,), float(i)) for i in range(7)]
    assert [float(b) for b in shard(data, 1, 3)] == [1.0, 4.0]
    assert shard(data, 0, 1) is data  # one rank: everything
    ds = torch.utils.data.TensorDataset(torch.arange(10.0))
    sub = shard(ds, 1, 2)
    assert isinstance(sub, torch.utils.data.Subset) and list(sub.indices) == [1, 3, 5, 7, 9]
    lazy = shard(iter(range(10)), 2, 4)  # a one-shot iterator is consumed lazily
    assert list(lazy) == [2, 6]
    assert len(shard(range(10), 2, 4)) == 2


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank 2 is not in"):
        shard([1, 2], 2, 2)
    with pytest.raises(TypeError, match="single Tensor"):
        shard(torch.zeros(4, 3), 0, 2)
