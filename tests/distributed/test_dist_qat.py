"""QAT of the MNIST CNN under DistributedDataParallel on two gloo ranks."""

import pytest
import torch
from dist_workers import PRELOAD, QAT_BATCH, QAT_STEPS, qat_train, rank_qat

import quanta
from quanta.distributed import launch
from quanta.zoo.mnist import evaluate, load_mnist, load_pretrained_mnist_cnn


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("qat")
    return launch(rank_qat, 2, (str(out),), timeout=60, preload=PRELOAD), out


def _differing(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_ranks_are_bit_identical_after_convert(two_ranks):
    (r0, r1), out = two_ranks
    assert not _differing(r0["model"], r1["model"])
    assert r0["accuracy"] == r1["accuracy"]
    # without SyncBatchNorm the ranks' BatchNorm statistics differ; convert averages them first
    assert not _differing(r0["local_bn"], r1["local_bn"])
    assert [p.name for p in out.iterdir()] == ["qat.quanta.safetensors"]  # rank 0 wrote it once
    loaded = quanta.load(out / "qat.quanta.safetensors", load_pretrained_mnist_cnn())
    assert not _differing(loaded.state_dict(), r0["model"])


def test_ddp_qat_matches_single_process_qat(two_ranks):
    (r0, _), _ = two_ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = qat_train()
    finally:
        torch.set_num_threads(threads)
    test_x, test_y = load_mnist("test")
    acc = evaluate(single, test_x, test_y)
    ptq_weights = [k for k in r0["model"] if k.endswith(".weight") and r0["model"][k].dtype == torch.int8]
    changed = sum(int((r0["model"][k] != single.state_dict()[k]).sum()) for k in ptq_weights)
    total = sum(r0["model"][k].numel() for k in ptq_weights)
    print(f"MNIST QAT {QAT_STEPS} steps x {QAT_BATCH}: single {acc:.1f} %, DDP 2 ranks "
          f"{r0['accuracy']:.1f} %, int8 weights differing {changed}/{total}")
    assert abs(r0["accuracy"] - acc) <= 0.1 + 1e-9
    assert acc >= 98.5
