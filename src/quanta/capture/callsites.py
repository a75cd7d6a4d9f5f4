"""Call-site keys for functional ops, without tracing.

A functional call such as ``out + identity`` inside ``layer1.0``'s forward is keyed as
``"layer1.0:add#0"``: the enclosing (non-leaf) module's qualified name, the op's canonical
name, and its order among ops of that name inside that forward. Keys are stable across
calls as long as the forward calls the same ops in the same order, and they ignore metadata
calls (``x.shape``, ``x.size()``) so control flow on shapes does not shift them.

``SiteTracker`` keeps the stack of enclosing modules through forward hooks; a
``TorchFunctionMode`` asks it for the current key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from quanta.qtensor import _METADATA


def canonical_op_name(func: Callable) -> str:
    """'add' for torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__iadd__."""
    name = getattr(func, "__name__", str(func)).strip("_")
    if name.startswith("i") and name[1:] in ("add", "mul", "sub"):
        name = name[1:]
    if name.startswith("r") and name[1:] in ("add", "mul", "sub"):
        name = name[1:]
    return name


def is_metadata(func: Callable) -> bool:
    return func in _METADATA


class LeafMarker:
    """Mixin for quanta's own modules: always leaves, whatever children they hold."""


def is_leaf(module: nn.Module) -> bool:
    return isinstance(module, LeafMarker) or next(module.children(), None) is None


class _Push:
    def __init__(self, tracker: SiteTracker, name: str) -> None:
        self.tracker, self.name = tracker, name

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.tracker.stack.append((self.name, {}))


class _Pop:
    def __init__(self, tracker: SiteTracker) -> None:
        self.tracker = tracker

    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.tracker.stack:
            self.tracker.stack.pop()


class _LeafPre:
    def __init__(self, tracker: SiteTracker, name: str, on_leaf: Callable | None) -> None:
        self.tracker, self.name, self.on_leaf = tracker, name, on_leaf

    def __call__(self, module: nn.Module, args: Any) -> None:
        if self.on_leaf is not None and self.tracker.leaf_depth == 0:
            self.on_leaf("pre", self.name, module, args, None)
        self.tracker.leaf_depth += 1


class _LeafPost:
    def __init__(self, tracker: SiteTracker, name: str, on_leaf: Callable | None) -> None:
        self.tracker, self.name, self.on_leaf = tracker, name, on_leaf

    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        self.tracker.leaf_depth -= 1
        if self.on_leaf is not None and self.tracker.leaf_depth == 0:
            self.on_leaf("post", self.name, module, args, out)


def _plain_container(module: nn.Module) -> bool:
    """Containers whose forward only calls their children (``nn.Sequential`` without an own
    forward, ``ModuleList``/``ModuleDict``): no torch function is ever called directly inside
    them, so they never enclose a call site and need no push/pop hooks (MobileNetV2 makes 54
    such calls per forward; a hooked call costs ~1.5 us more than a plain one)."""
    return type(module).forward is nn.Sequential.forward or isinstance(module, (nn.ModuleList, nn.ModuleDict))


class _TrackerLocal(threading.local):
    def __init__(self) -> None:
        self.stack: list[tuple[str, dict[str, int]]] = []
        self.leaf_depth = 0


class SiteTracker:
    """Tracks the enclosing module and per-op counters during a forward.

    Hooks are small callable objects (not closures) so that ``copy.deepcopy`` and pickling of
    a model carry them over consistently with the tracker they point to.
    """

    def __init__(self, opened: Iterable[str] = ()) -> None:
        self._local = _TrackerLocal()
        self.handles: list[RemovableHandle] = []
        # childless modules looked inside, so the weight ops in their forward are keyed like any
        # functional call (``capture.weightops.opened_modules``; kept in the plan)
        self.opened = frozenset(opened)

    # the stack and depth belong to the forward running in this thread: a model may run in
    # several threads at once
    @property
    def stack(self) -> list[tuple[str, dict[str, int]]]:
        return self._local.stack

    @property
    def leaf_depth(self) -> int:
        return self._local.leaf_depth

    @leaf_depth.setter
    def leaf_depth(self, value: int) -> None:
        self._local.leaf_depth = value

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("opened", frozenset())  # pickled by an older quanta
        self._local = _TrackerLocal()

    def install(self, model: nn.Module, on_leaf: Callable | None = None,
                skip_leaf: Callable[[nn.Module], bool] | None = None) -> None:
        """Register hooks on every module of ``model``. ``on_leaf(phase, name, module, args,
        out)`` is called around each leaf module run at the top level (for the record).
        Leaves for which ``skip_leaf(module)`` is true get no hooks: a module call with hooks
        costs several microseconds, and leaves that never call a keyed op need none.
        Modules named in ``self.opened`` are treated as non-leaves."""
        opened = self.opened

        def walk(name: str, module: nn.Module) -> None:
            if is_leaf(module) and module is not model and name not in opened:
                if skip_leaf is not None and skip_leaf(module):
                    return
                self.handles.append(module.register_forward_pre_hook(_LeafPre(self, name, on_leaf)))
                self.handles.append(
                    module.register_forward_hook(_LeafPost(self, name, on_leaf), always_call=True)
                )
                return  # the inside of a leaf is never keyed
            if module is model or not _plain_container(module):
                self.handles.append(module.register_forward_pre_hook(_Push(self, name)))
                self.handles.append(module.register_forward_hook(_Pop(self), always_call=True))
            for child_name, child in module.named_children():
                walk(f"{name}.{child_name}" if name else child_name, child)

        walk("", model)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @property
    def active(self) -> bool:
        """True at the top level of some module's forward (not inside a leaf module)."""
        return self.leaf_depth == 0 and bool(self.stack)

    def next_key(self, op: str) -> str:
        enclosing, counters = self.stack[-1]
        n = counters.get(op, 0)
        counters[op] = n + 1
        return f"{enclosing or 'model'}:{op}#{n}"
