"""See a ``generate()`` call begin: one shared wrapper per model around its ``_get_logits_processor``.

``generate`` calls the model's ``_get_logits_processor`` once, before any forward, with its generation config
and the user's processor list. :func:`watch_generate` wraps that method once per model, however many watchers
are live, tells each watcher ``(config, user_processors)`` at every call, and puts the model back as it was
when the last watcher leaves, in whatever order they leave.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

Watcher = Callable[[Any, Any], None]
"""``watcher(generation_config, user_logits_processors)``, called before ``generate``'s first forward."""

METHOD = "_get_logits_processor"

# One probe per model, shared by its live watchers, so that removing them in any order restores the model.
_LIVE: weakref.WeakKeyDictionary[nn.Module, list[Watcher]] = weakref.WeakKeyDictionary()


def can_watch(model: nn.Module) -> bool:
    """Whether ``model`` has the method ``generate`` calls at its start (every GenerationMixin does)."""
    return getattr(model, METHOD, None) is not None


def watch_generate(model: nn.Module, watcher: Watcher) -> Callable[[], None]:
    """Register ``watcher`` with ``model``'s probe (installing it for the first watcher); return its removal."""
    live = _LIVE.get(model)
    if live is None:
        live = _LIVE[model] = []
        _install(model)
    live.append(watcher)

    def remove() -> None:
        if watcher in live:
            live.remove(watcher)
        if not live:
            probe_now = vars(model).get(METHOD)
            _LIVE.pop(model, None)
            if probe_now is not None and hasattr(probe_now, "restore"):
                probe_now.restore()

    return remove


def _install(model: nn.Module) -> None:
    own = vars(model).get(METHOD)  # someone else's instance attribute, put back when the last watcher leaves
    original = getattr(model, METHOD)

    def probe(*args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("generation_config", args[0] if args else None)
        user = kwargs.get("logits_processor", args[4] if len(args) > 4 else None)
        for watcher in list(_LIVE.get(model, ())):
            watcher(config, user)
        return original(*args, **kwargs)

    probe.restore = lambda: setattr(model, METHOD, own) if own is not None else vars(model).pop(METHOD, None)
    setattr(model, METHOD, probe)
