"""A rank that dies or hangs mid-calibration: the others fail with a clear error within the
timeout, and no file (not even a temporary one) is left behind."""

import time

import pytest
from dist_workers import PRELOAD, rank_fault

from quanta.distributed import DistributedError, launch

TIMEOUT = 3.0


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_failed_rank_gives_a_clear_error_and_no_file(tmp_path, fault):
    started = time.monotonic()
    with pytest.raises(DistributedError) as info:
        launch(rank_fault, 2, (str(tmp_path), fault), timeout=TIMEOUT, preload=PRELOAD)
    elapsed = time.monotonic() - started
    text = str(info.value)
    print(f"{fault}: launcher returned after {elapsed:.1f} s: {text}")
    assert "rank 0: DistributedError: rank 0 of 2: syncing 7 observers (ranges) failed after" in text
    detected = float(text.split("[detected after ")[1].split(" s]")[0])
    if fault == "kill":
        assert "rank 1: died (killed by SIGKILL)" in text
        assert detected < TIMEOUT  # the closed connection is seen at once
    else:
        assert f"did not reach this step within {TIMEOUT:g} s" in text
        assert "rank 1: still running" in text
        assert TIMEOUT - 0.5 < detected < TIMEOUT + 3  # the collective's own timeout
    assert list(tmp_path.iterdir()) == []
