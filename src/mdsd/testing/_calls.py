"""Calling user code safely: every way a function under audit can misbehave becomes a
:class:`FnError` whose message is one line naming the problem."""

from __future__ import annotations

import importlib
import importlib.util
import operator
import sys
from pathlib import Path

import numpy as np


class FnError(Exception):
    """The function under audit raised, or returned something that is not what was asked."""


def describe_call_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def as_token(value, vocab: int, where: str) -> int:
    """An integer token id in [0, vocab) from whatever ``fn`` returned, else FnError."""
    if isinstance(value, bool | np.bool_):
        raise FnError(f"fn returned a bool ({value!r}) {where}; expected an integer token id")
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, np.generic):
        value = value.item()  # a 0-d torch tensor or numpy array
    try:
        token = operator.index(value)
    except TypeError:
        raise FnError(
            f"fn returned {type(value).__name__} ({_short(value)}) {where}; expected an integer token id"
        ) from None
    if not 0 <= token < vocab:
        raise FnError(f"fn returned token {token} outside the vocabulary [0, {vocab}) {where}")
    return token


def as_token_array(value, rows: int, vocab: int, where: str) -> np.ndarray:
    """[rows] int64 token ids in [0, vocab) from a batched ``fn``'s return value, else FnError."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as err:  # noqa: BLE001 -- any conversion failure is the fn's problem
        raise FnError(f"fn returned {type(value).__name__} {where}: {describe_call_error(err)}") from None
    if arr.shape != (rows,):
        raise FnError(f"fn returned shape {arr.shape} {where}; expected [{rows}] token ids (batched=True)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise FnError(f"fn returned dtype {arr.dtype} {where}; expected integer token ids")
    bad = (arr < 0) | (arr >= vocab)
    if bad.any():
        raise FnError(f"fn returned token {int(arr[bad][0])} outside the vocabulary [0, {vocab}) {where}")
    return arr.astype(np.int64)


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_function(spec: str):
    """``package.module:function`` or ``path/to/file.py:function`` -> the callable.

    Raises ValueError (one line) when the spec is malformed, the module or file cannot be
    imported, or the attribute is missing or not callable.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"target must look like MODULE:FUNCTION or path/to/file.py:FUNCTION, got {spec!r}")
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"target must look like MODULE:FUNCTION or path/to/file.py:FUNCTION, got {spec!r}")
    module = _import_file(where) if where.endswith(".py") or "/" in where else _import_module(where)
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, not a function")
    return obj


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 -- report any import failure in one line
        raise ValueError(f"cannot import module {name!r}: {describe_call_error(err)}") from None


def _import_file(path_text: str):
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"file {path_text!r} does not exist")
    module_name = f"_mdsd_audit_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import file {path_text!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001
        sys.modules.pop(module_name, None)
        raise ValueError(f"cannot import file {path_text!r}: {describe_call_error(err)}") from None
    return module
