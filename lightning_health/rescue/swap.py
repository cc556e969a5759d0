"""Swap an activation module for another in place (e.g. a dying ReLU for a LeakyReLU)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn


def replace_activation(
    model: nn.Module,
    old_type: type[nn.Module] | tuple[type[nn.Module], ...],
    new_factory: Callable[[], nn.Module],
    *,
    names: Iterable[str] | None = None,
) -> list[str]:
    """Swap activation modules in place, e.g. every ReLU for a LeakyReLU.

    Works at any depth and inside ``nn.Sequential``, ``nn.ModuleList`` and ``nn.ModuleDict``. A
    module registered under several names is replaced at each of them (by separate new modules).
    The new modules take the old one's train/eval mode and the device of the model's parameters.
    A new module with parameters (e.g. ``nn.PReLU``) is not known to an existing optimizer: add
    its parameters yourself.

    Args:
        model: the model to edit.
        old_type: the activation class(es) to replace (``isinstance`` match, so subclasses too).
        new_factory: called with no arguments once per replaced module; returns the new module,
            e.g. ``nn.GELU`` or ``lambda: nn.LeakyReLU(0.01)``.
        names: only replace the modules with these qualified names (each must exist and be an
            ``old_type``); ``None`` replaces every match.

    Returns:
        The qualified names that were replaced, in ``named_modules()`` order.

    Raises:
        ValueError: if a name in ``names`` is not a submodule or not an ``old_type``, or the model
            itself is an ``old_type`` (it has no parent to be replaced in).
        TypeError: if ``new_factory`` returns something that is not an nn.Module.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.ModuleList([nn.ReLU()]))
        >>> replace_activation(net, nn.ReLU, nn.GELU)
        ['1', '2.0']
        >>> net[1]
        GELU(approximate='none')
    """
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, old_type)]
    if names is not None:
        wanted = list(dict.fromkeys(names))
        all_names = {n for n, _ in model.named_modules(remove_duplicate=False)}
        missing = [n for n in wanted if n not in all_names]
        if missing:
            raise ValueError(f"Expected `names` to name submodules of the model, but {missing} are not")
        matching = {n for n, _ in found}
        wrong = [n for n in wanted if n not in matching]
        if wrong:
            raise ValueError(f"Expected `names` to name modules of type {old_type}, but {wrong} are not")
        keep = set(wanted)
        found = [(n, m) for n, m in found if n in keep]
    if any(n == "" for n, _ in found):
        raise ValueError(f"Cannot replace the model itself ({type(model).__name__}): it has no parent module")
    reference = next(iter(model.parameters()), None)
    replaced = []
    for name, old in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = new_factory()
        if not isinstance(new, nn.Module):
            raise TypeError(f"Expected `new_factory` to return an nn.Module, got {type(new).__name__}")
        new.train(old.training)
        if reference is not None:
            new.to(device=reference.device)
        setattr(parent, attr, new)
        replaced.append(name)
    return replaced
