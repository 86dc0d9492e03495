"""Input checks shared by every public entry point.

Every check raises :class:`ValueError` whose message names the offending argument and value, so a
caller never gets a silently wrong number.
"""

from __future__ import annotations

import numbers

import numpy as np

# A probability vector may sum to 1 within this tolerance; beyond it we refuse (or renormalise when
# the caller asked for ``normalize=True``).
SUM_TOLERANCE = 1e-6


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x)


def as_probs(x, name: str, *, normalize: bool = False) -> np.ndarray:
    """Return ``x`` as a float64 array of probability vectors along its last axis.

    Checks: at least 1-D, non-empty, finite, non-negative, each row summing to 1 within
    ``SUM_TOLERANCE`` (or any positive sum when ``normalize=True``). Rows are divided by their sum
    so that they sum to 1 to rounding.
    """
    arr = _to_numpy(x)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float64)  # promote float32/ints (the result is a fresh array)
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (a vocabulary axis), got a scalar")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary axis (shape {arr.shape})")
    # Two passes instead of four on the common path: a row holding inf or nan has a non-finite
    # sum, so the element-wise scan runs only when some row sum is not finite.
    sums = arr.sum(axis=-1, keepdims=True)
    if not np.all(np.isfinite(sums)) and not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name} contains a non-finite value {arr[tuple(bad)]} at index {tuple(bad.tolist())}"
        )
    if arr.size and arr.min() < 0:
        bad = np.argwhere(arr < 0)[0]
        raise ValueError(f"{name} has negative mass {arr[tuple(bad)]} at index {tuple(bad.tolist())}")
    if np.any(sums <= 0):
        raise ValueError(f"{name} has a row with zero total mass")
    if not normalize:
        off = np.abs(sums - 1.0)
        if np.any(off > SUM_TOLERANCE):
            worst = float(sums.flat[int(np.argmax(off))])
            raise ValueError(
                f"{name} must sum to 1 along its last axis (within {SUM_TOLERANCE:g}); a row sums "
                f"to {worst!r}. Pass normalize=True to renormalise."
            )
    return arr / sums


def check_pair(p: np.ndarray, q: np.ndarray, p_name="target_probs", q_name="draft_probs"):
    """Both arrays must have the same shape (same vocabulary, same batch)."""
    if p.shape != q.shape:
        raise ValueError(
            f"{p_name} and {q_name} must have the same shape (same vocabulary), got {p.shape} and {q.shape}"
        )


def check_n(n, name: str = "n") -> int:
    """n must be an integer >= 1."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return int(n)


def check_choice(value: str, choices, name: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(choices)}")
    return value


def as_drafts(drafts, vocab_size: int, name: str = "drafts") -> np.ndarray:
    """Draft token ids as int64, each in [0, vocab_size)."""
    arr = _to_numpy(drafts)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integer token ids, got {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.ndim == 0 or arr.shape[-1] == 0:
        raise ValueError(f"{name} must hold at least one draft token, got shape {arr.shape}")
    if np.any(arr < 0) or np.any(arr >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)].flat[0]
        raise ValueError(f"{name} holds token id {int(bad)} outside the vocabulary [0, {vocab_size})")
    return arr
