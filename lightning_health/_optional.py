"""Which optional packages are installed, asked without importing them.

matplotlib, tensorboard and wandb are extras: a sink or a figure that needs one checks here and says
which extra to install. ``find_spec`` only looks the package up, so asking costs no import time (the
CLI starts in well under a second).
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def installed(name: str) -> bool:
    """Whether the top-level package ``name`` can be imported (looked up once per process).

    Example:
        >>> installed("math"), installed("no_such_package_here")
        (True, False)
    """
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-installed package
        return False
