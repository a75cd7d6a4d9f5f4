"""Quanta models called from several Python threads: forwards run in parallel, a graph build
runs alone.

Why: building the graph runtime traces the model with ``torch.fx``, which patches
``nn.Module.__call__`` and ``__getattr__`` for the whole process while it traces; a forward
running meanwhile in another thread would be recorded into the trace (and run through fx's
proxies). So a forward of any quanta model waits while a build runs, and a build waits until
the forwards in flight have finished. A thread waiting to build gives up its place meanwhile,
so two threads that both want to build cannot wait on each other.

Cost: one uncontended condition-variable round trip per outermost forward (~1 us).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_cond = threading.Condition()
_active = 0  # threads inside a quanta forward (outermost calls only)
_builder: int | None = None  # the thread that is building, if any
_depth = threading.local()  # per thread: quanta forwards on its stack


def forward(call: Callable[[], Any]) -> Any:
    """Run ``call()`` (one quanta model forward) as a reader of the gate."""
    global _active
    depth = getattr(_depth, "n", 0)
    if depth == 0:
        me = threading.get_ident()
        with _cond:
            while _builder is not None and _builder != me:
                _cond.wait()
            _active += 1
    _depth.n = depth + 1
    try:
        return call()
    finally:
        _depth.n = depth
        if depth == 0:
            with _cond:
                _active -= 1
                _cond.notify_all()


def build(make: Callable[[], Any]) -> Any:
    """Run ``make()`` (a graph build) with no other thread inside a quanta forward. Called from
    inside a forward: this thread's own place is not waited for."""
    global _active, _builder
    me = threading.get_ident()
    mine = 1 if getattr(_depth, "n", 0) else 0
    with _cond:
        nested = _builder == me  # a quanta model built inside another's build
    if nested:
        return make()
    with _cond:
        _active -= mine  # give up this thread's place while waiting: no deadlock between builders
        _cond.notify_all()
        while _builder is not None or _active > 0:
            _cond.wait()
        _builder = me
    try:
        return make()
    finally:
        with _cond:
            _builder = None
            _active += mine
            _cond.notify_all()
