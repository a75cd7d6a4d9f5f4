"""What the graph runtime checks to know a built graph still applies: the hooks eager mode would
run (quanta's own, or a user's, which the generated code would skip) and the plain Python state of
the traced modules (a forward that changes it would do so only once in a traced graph)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn as nn

HOOK_KINDS = (("forward ", "_forward_hooks"), ("forward pre-", "_forward_pre_hooks"),
               ("backward ", "_backward_hooks"), ("backward pre-", "_backward_pre_hooks"))


def hook_dicts(modules: Iterable[nn.Module]) -> list[dict]:
    """Every hook dict that eager mode would consult for these modules, the global ones too."""
    return [getattr(m, attr) for m in modules for _, attr in HOOK_KINDS] + global_hook_dicts()


def global_hook_dicts() -> list[dict]:
    import torch.nn.modules.module as module_mod

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
    return [getattr(module_mod, n) for n in names if isinstance(getattr(module_mod, n, None), dict)]


_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "training"})


def python_state(model: nn.Module) -> list[dict[str, Any]]:
    """A cheap fingerprint of the plain Python attributes of the traced (non-leaf) modules:
    values for scalars, lengths and identities for containers and other objects."""
    from quanta.capture.callsites import is_leaf

    def mark(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, dict, set)):
            return (id(v), len(v))
        return id(v)

    traced = [m for m in model.modules() if m is model or not is_leaf(m)]
    return [{k: mark(v) for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS and "hooks" not in k}
            for m in traced]


def hook_total(model: nn.Module) -> int:
    return sum(map(len, hook_dicts(model.modules())))


def foreign_hook(state: Any, model: nn.Module) -> str | None:
    """The first hook quanta did not install (the runtime would skip it), described."""
    from quanta.capture.callsites import _LeafPost, _LeafPre, _Pop, _Push

    ours = (_Push, _Pop, _LeafPre, _LeafPost)
    if any(global_hook_dicts()):
        return "a global module hook is registered"
    for name, m in model.named_modules():
        for kind, attr in HOOK_KINDS:
            for hook in getattr(m, attr).values():
                if not isinstance(hook, ours) and getattr(hook, "__self__", None) is not state:
                    return f"a {kind}hook on {name or 'the model'}"
    return None
