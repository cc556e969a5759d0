"""Which modules run inside a ``torch.compile(..., fullgraph=True)`` region, where no hook may run.

The monitor's hooks run eagerly inside a compiled model (a graph break around each hooked module,
see :mod:`lightning_health.capture.hooks`). Under ``fullgraph=True`` a graph break is an error, so a
hook there would stop the user's run at its first compiled call ("Skip inlining
`torch.compiler.disable()`d function"). Such modules are left out, with a warning naming them.

Found at set-up, from the three ways a model is compiled before fit: a compiled submodule
(``torch.compile(module)``, an ``OptimizedModule``), a module compiled in place
(``module.compile()``), and a LightningModule handed to ``Trainer.fit`` compiled (Lightning keeps
the compile context in ``_compiler_ctx``). A region compiled later, inside ``training_step``, is not
seen here.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

WHY_LEFT_OUT = "compiled with torch.compile(fullgraph=True), where its hooks would be graph breaks, an error there"
"""Why a module in :func:`fullgraph_modules` is not read, for the warnings that name them."""


def fullgraph_modules(model: nn.Module) -> set[int]:
    """``id`` of every module that runs inside a region compiled with ``fullgraph=True``."""
    found: set[int] = set()
    for module in model.modules():
        root = _fullgraph_root(module)
        if root is not None:
            found.update(id(m) for m in root.modules())
    return found


def _fullgraph_root(module: nn.Module) -> nn.Module | None:
    """The module whose calls a ``fullgraph=True`` compile covers, if ``module`` holds one."""
    optimized = getattr(module, "_orig_mod", None)  # torch.compile(module): an OptimizedModule
    if isinstance(optimized, nn.Module) and _is_fullgraph(getattr(module, "dynamo_ctx", None)):
        return optimized
    compiled = getattr(module, "_compiled_call_impl", None)  # module.compile(...)
    if compiled is not None and _is_fullgraph(_context_of(compiled)):
        return module
    lightning = getattr(module, "_compiler_ctx", None)  # Trainer.fit(torch.compile(lightning_module))
    if isinstance(lightning, dict) and _is_fullgraph(lightning.get("dynamo_ctx")):
        return module
    return None


def _context_of(compiled: Any) -> Any:
    """The compile context a ``torch.compile``d function closes over (``None`` if it cannot be found)."""
    try:
        return inspect.getclosurevars(compiled).nonlocals.get("self")
    except (TypeError, ValueError):
        return None


def _is_fullgraph(context: Any) -> bool:
    return bool(getattr(context, "fullgraph", False))
