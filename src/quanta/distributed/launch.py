"""``launch``: run a function on N local gloo ranks (what ``quanta quantize --nproc N`` uses).

Scripts launched by ``torchrun --nproc-per-node N`` need none of this: they call
``torch.distributed.init_process_group("gloo")`` and use quanta as usual. ``launch`` is for
callers that are not under torchrun (the CLI, tests): it starts the ranks itself, each with a
gloo process group bound to a TCP store the launcher owns (so the store outlives any rank), and
turns a failure anywhere into one ``DistributedError`` that says which rank failed and how.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from quanta.distributed.collective import DistributedError


def _context(preload: Sequence[str]) -> Any:
    """Ranks fork from a server that imported torch and quanta once (spawn where no fork)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "quanta", *preload])
        return ctx
    return mp.get_context("spawn")


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, timeout: float,
               threads: int, args: tuple, results: Any) -> None:
    import torch
    import torch.distributed as dist

    if "fork" in mp.get_all_start_methods():  # a rank's own children (DataLoader workers) fork
        mp.set_start_method("fork", force=True)  # from it, as on Linux by default, not a new server
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                              timeout=timedelta(seconds=timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        value = fn(*args)
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the launcher
        text = f"{type(e).__name__}: {' '.join(str(e).split())}"
        results.put((rank, "error", (text, traceback.format_exc())))
        results.close()
        results.join_thread()  # the message is on its way before this rank exits
        os._exit(1)  # skip tearing down a process group a dead peer left broken
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, args: tuple = (), *, timeout: float = 300.0,
           threads: int | None = None, preload: Sequence[str] = ()) -> list[Any]:
    """Run ``fn(*args)`` on ``nproc`` local ranks with a gloo process group; return the values
    in rank order.

    ``fn`` and ``args`` must be picklable (a module-level function). ``timeout`` (seconds) is
    the process group's: a collective waiting longer for a rank that died or hangs fails. A
    failed rank makes ``launch`` raise a ``DistributedError`` naming each rank that failed and
    why; ranks still running then get ``timeout`` seconds to finish before they are killed.
    ``threads``: torch threads per rank (default: CPUs / nproc). ``preload``: modules the
    process that forks the ranks imports once, when this process first launches (Linux).
    """
    import torch.distributed as dist

    if nproc < 1:
        raise ValueError(f"launch: nproc must be at least 1, got {nproc}")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    store = dist.TCPStore("127.0.0.1", 0, nproc + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    ctx = _context(preload)
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, name=f"quanta-rank{r}",
                         args=(fn, r, nproc, store.port, timeout, threads, args, results))
             for r in range(nproc)]
    for p in procs:
        p.start()
    try:
        return _collect(procs, results, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        del store


def _collect(procs: list[Any], results: Any, timeout: float) -> list[Any]:
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    first_failure: float | None = None
    while len(values) + len(errors) < len(procs):
        try:
            rank, status, payload = results.get(timeout=0.05)
            if status == "ok":
                values[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload[0]
                first_failure = first_failure or time.monotonic()
            continue
        except queue.Empty:
            pass
        for r, p in enumerate(procs):
            if r not in values and r not in errors and not p.is_alive() and p.exitcode is not None:
                _drain(results, values, errors)
                if r not in values and r not in errors:
                    errors[r] = _death(p.exitcode)
                    first_failure = first_failure or time.monotonic()
        if first_failure is not None and time.monotonic() - first_failure > timeout:
            for r, p in enumerate(procs):
                if r not in values and r not in errors:
                    p.kill()
                    errors[r] = f"still running {timeout:g} s after another rank failed: killed"
    if errors:
        lines = "; ".join(f"rank {r}: {errors[r]}" for r in sorted(errors))
        raise DistributedError(f"{len(errors)} of {len(procs)} ranks failed: {lines}")
    return [values[r] for r in range(len(procs))]


def _drain(results: Any, values: dict[int, Any], errors: dict[int, str]) -> None:
    """Read what a rank put on the queue just before it exited."""
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        try:
            rank, status, payload = results.get(timeout=0.05)
        except queue.Empty:
            return
        if status == "ok":
            values[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload[0]


def _death(exitcode: int) -> str:
    if exitcode < 0:
        import signal

        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"died (killed by {name})"
    return f"exited with code {exitcode} without a result"
