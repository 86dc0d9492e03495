"""The compiled (numba) kernel modules, imported on first use and cached.

Importing numba costs ~0.3 s, so ``mdsd._race_numba``, ``mdsd.verifiers._early_exit`` and
``mdsd.verifiers._compiled`` are imported only when a fast path first needs them. numba is a
dependency: None (the numpy / torch paths then run) is only seen in an install without it.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def compiled_module(name: str) -> ModuleType | None:
    """The module ``name`` (e.g. ``"mdsd._race_numba"``), or None when it cannot be imported.

    >>> compiled_module("mdsd._race_numba") is compiled_module("mdsd._race_numba")
    True
    """
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover - numba is a dependency
        return None
