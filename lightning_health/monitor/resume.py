"""The monitor's checkpoint key: the same in every process, so a resume finds its state.

Lightning stores each callback's ``state_dict()`` under ``callback.state_key`` and hands it back only
to a callback with the same key. The key therefore holds only what identifies a monitor, written so
that a new process writes it identically:

- ``name=`` when given (two monitors with the same settings can coexist by naming them);
- otherwise the ``layers`` spec in a stable form: a predicate by ``module.qualname`` (not its
  address), a set or list of names sorted, a regex as the string, types by ``module.qualname``.

The cadence (``every_n_steps``) is *not* in the key: a run resumed with another cadence keeps its
history (with a note). A checkpoint written before this key existed is found by its old key
(``HealthMonitor{'every_n_steps': ..., 'layers': ...}``) and adopted with a note.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

PREFIX = "HealthMonitor"


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def stable_layers_repr(layers: Any) -> str:
    """A text for ``layers`` that is the same in every process for the same spec."""
    if layers is None or isinstance(layers, str):
        return repr(layers)
    if isinstance(layers, type):
        return _type_name(layers)
    if isinstance(layers, tuple) and all(isinstance(t, type) for t in layers):
        return "(" + ", ".join(_type_name(t) for t in layers) + ")"
    if callable(layers):
        fn = getattr(layers, "__func__", layers)  # a bound method: its function
        module = getattr(fn, "__module__", None) or type(fn).__module__
        qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        return f"<predicate {module}.{qualname}>"
    if isinstance(layers, Iterable):
        return repr(sorted(_type_name(item) if isinstance(item, type) else str(item) for item in layers))
    return repr(layers)


def state_key(name: str | None, layers: Any) -> str:
    """``HealthMonitor{'name': ...}`` or ``HealthMonitor{'layers': ...}`` (Lightning's key format)."""
    if name is not None:
        return f"{PREFIX}{{'name': {name!r}}}"
    return f"{PREFIX}{{'layers': {stable_layers_repr(layers)!r}}}"


def old_state(callbacks: Mapping[Any, Any], own_key: str, other_keys: Iterable[str]) -> tuple[str | None, list[str]]:
    """The key of a monitor state this monitor should adopt, and every candidate seen.

    Called when ``callbacks`` (a checkpoint's ``"callbacks"``) holds nothing under ``own_key``: a
    candidate is a ``HealthMonitor{...}`` key that no other callback of this Trainer claims. Exactly
    one candidate is adopted; with several none is (which one is meant is unknowable: pass ``name=``).
    """
    if own_key in callbacks:
        return None, []
    claimed = set(other_keys)
    candidates = [k for k in callbacks if isinstance(k, str) and k.startswith(PREFIX + "{") and k not in claimed]
    return (candidates[0] if len(candidates) == 1 else None), candidates


def adopt_old_state(checkpoint: dict[str, Any], own_key: str, other_keys: Iterable[str]) -> str | None:
    """Move a monitor state saved under another key (an older version's, a renamed monitor) to ``own_key``.

    Returns the note to show, or ``None`` when there is nothing to say.
    """
    states = checkpoint.get("callbacks") or {}
    key, candidates = old_state(states, own_key, other_keys)
    if key is not None:
        states[own_key] = states[key]  # Lightning then passes it to load_state_dict
        return f"HealthMonitor: resuming the monitor state saved under {key!r} (now {own_key!r})"
    if candidates:
        return (
            f"HealthMonitor: no state under {own_key!r} and several monitor states in the checkpoint "
            f"({candidates}); starting afresh. Pass the same `name=` as the saved monitor to resume it"
        )
    return None
