"""The few array operations the verifiers need, for numpy arrays and torch tensors alike.

Verifier code is written once against this interface (``ops = backend(p)``) and runs on numpy
float64 arrays or on torch float64 tensors (CPU or CUDA) unchanged; arithmetic operators, slicing
and boolean masks are shared by both libraries, everything else goes through here.

Shapes follow the verifiers: values [B, V], tokens [B] or [B, k], per-row scalars [B].

(Named for what it holds, the array operations; ``mdsd.verifiers.torch_api`` is the verifiers'
front door for torch tensors, and ``mdsd._threads`` the thread-count helpers.)
"""

from __future__ import annotations

import numpy as np
import torch


class NumpyOps:
    name = "numpy"

    @staticmethod
    def rows(values):
        return np.arange(values.shape[0])

    @staticmethod
    def positive_part(values):
        return np.maximum(values, 0.0)

    @staticmethod
    def positive_part_(values):
        """max(values, 0) in place; returns values."""
        return np.maximum(values, 0.0, out=values)

    @staticmethod
    def minimum(a, b):
        return np.minimum(a, b)

    @staticmethod
    def maximum(a, b):
        return np.maximum(a, b)

    @staticmethod
    def where(condition, a, b):
        return np.where(condition, a, b)

    @staticmethod
    def row_sum(values, keepdim=False):
        return values.sum(axis=-1, keepdims=keepdim)

    @staticmethod
    def gather(values, tokens):
        """values[b, tokens[b]] for [B, V] and [B] (or [B, k]) -> [B] (or [B, k])."""
        if tokens.ndim == 1:
            return np.take_along_axis(values, tokens[:, None], axis=1)[:, 0]
        return np.take_along_axis(values, tokens, axis=1)

    @staticmethod
    def put(values, tokens, amount):
        """values[b, tokens[b]] = amount (scalar or [B]), in place."""
        values[np.arange(values.shape[0]), tokens] = amount

    @staticmethod
    def scatter_add(out, tokens, amount):
        """out[b, tokens[b]] += amount[b], in place."""
        out[np.arange(out.shape[0]), tokens] += amount

    @staticmethod
    def mask_of(tokens, vocab):
        """Boolean [B, V]: token y is among tokens[b] ([B, k])."""
        mask = np.zeros((tokens.shape[0], vocab), dtype=bool)
        np.put_along_axis(mask, tokens, True, axis=1)
        return mask

    @staticmethod
    def expm1(values):
        return np.expm1(values)

    @staticmethod
    def log1p(values):
        with np.errstate(divide="ignore"):
            return np.log1p(values)

    @staticmethod
    def cumsum(values):
        # np.cumsum: left to right per row. (Borrowing torch's faster kernel needed torch's
        # process-wide thread count changed around every call: global state, not worth it.)
        return np.cumsum(values, axis=-1)

    @staticmethod
    def argmax(values):
        return np.argmax(values, axis=-1)  # first maximum: ties by lower index

    @staticmethod
    def argsort_descending(key, stable=True):
        """Row-wise order by key decreasing; stable=True: ties by lower index.

        numpy's default argsort is vectorised and several times faster than its stable sort, so it
        is tried first and kept when no two keys of a row tie (then both orders agree).
        """
        order = np.argsort(-key, axis=-1)
        if stable:
            ordered = np.take_along_axis(key, order, axis=-1)
            if np.any(ordered[..., 1:] == ordered[..., :-1]):
                order = np.argsort(-key, axis=-1, kind="stable")
        return order

    @staticmethod
    def sort(values):
        return np.sort(values, axis=-1)

    @staticmethod
    def kth_largest(values, k):
        """The k-th largest value of each row, [B, 1] (k >= 1)."""
        vocab = values.shape[-1]
        return np.partition(values, vocab - k, axis=-1)[..., vocab - k : vocab - k + 1]

    @staticmethod
    def any(mask) -> bool:
        return bool(np.any(mask))

    @staticmethod
    def zeros_like(values):
        return np.zeros_like(values)

    @staticmethod
    def ones_rows(values):
        """A [B] vector of ones like values' rows."""
        return np.ones(values.shape[0], dtype=values.dtype)

    @staticmethod
    def copy(values):
        return values.copy()

    @staticmethod
    def full(shape, value, like):
        return np.full(shape, value, dtype=like.dtype)

    @staticmethod
    def divide_safe(num, den, when_zero):
        """num / den where den > 0, else when_zero (no warnings)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), when_zero)


class TorchOps:
    name = "torch"

    @staticmethod
    def rows(values):
        return torch.arange(values.shape[0], device=values.device)

    @staticmethod
    def positive_part(values):
        return torch.clamp(values, min=0.0)

    @staticmethod
    def positive_part_(values):
        return values.clamp_(min=0.0)

    @staticmethod
    def minimum(a, b):
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, max=b)
        if not isinstance(a, torch.Tensor):
            return torch.clamp(b, max=a)
        return torch.minimum(a, b)

    @staticmethod
    def maximum(a, b):
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, min=b)
        if not isinstance(a, torch.Tensor):
            return torch.clamp(b, min=a)
        return torch.maximum(a, b)

    @staticmethod
    def where(condition, a, b):
        return torch.where(condition, a, b)

    @staticmethod
    def row_sum(values, keepdim=False):
        return values.sum(dim=-1, keepdim=keepdim)

    @staticmethod
    def gather(values, tokens):
        if tokens.ndim == 1:
            return torch.gather(values, 1, tokens[:, None])[:, 0]
        return torch.gather(values, 1, tokens)

    @staticmethod
    def put(values, tokens, amount):
        values[torch.arange(values.shape[0], device=values.device), tokens] = amount

    @staticmethod
    def scatter_add(out, tokens, amount):
        out[torch.arange(out.shape[0], device=out.device), tokens] += amount

    @staticmethod
    def mask_of(tokens, vocab):
        mask = torch.zeros(tokens.shape[0], vocab, dtype=torch.bool, device=tokens.device)
        mask.scatter_(1, tokens, True)
        return mask

    @staticmethod
    def expm1(values):
        return torch.expm1(values)

    @staticmethod
    def log1p(values):
        return torch.log1p(values)

    @staticmethod
    def cumsum(values):
        return torch.cumsum(values, dim=-1)

    @staticmethod
    def argmax(values):
        # torch.argmax returns the first maximal index (documented), as numpy does
        return torch.argmax(values, dim=-1)

    @staticmethod
    def argsort_descending(key, stable=True):
        return torch.argsort(-key, dim=-1, stable=stable)

    @staticmethod
    def sort(values):
        return torch.sort(values, dim=-1).values

    @staticmethod
    def kth_largest(values, k):
        return torch.topk(values, k, dim=-1).values[..., k - 1 : k]

    @staticmethod
    def any(mask) -> bool:
        return bool(torch.any(mask))

    @staticmethod
    def zeros_like(values):
        return torch.zeros_like(values)

    @staticmethod
    def ones_rows(values):
        return torch.ones(values.shape[0], dtype=values.dtype, device=values.device)

    @staticmethod
    def copy(values):
        return values.clone()

    @staticmethod
    def full(shape, value, like):
        return torch.full(shape, value, dtype=like.dtype, device=like.device)

    @staticmethod
    def divide_safe(num, den, when_zero):
        safe = torch.where(den > 0, den, torch.ones_like(den))
        return torch.where(den > 0, num / safe, torch.full_like(num, when_zero))


def backend(values):
    """NumpyOps or TorchOps for an array or tensor."""
    return TorchOps if isinstance(values, torch.Tensor) else NumpyOps


def top_mask(values, k: int):
    """Boolean [B, V]: the k largest entries of each row, ties by lower index (as ``top_tokens``).

    O(V) per row: the k-th largest value v; every entry above v, then the lowest-index entries
    equal to v until k are taken.
    """
    ops = backend(values)
    if k <= 0:
        return values < -np.inf if ops is NumpyOps else torch.zeros_like(values, dtype=torch.bool)
    threshold = ops.kth_largest(values, k)  # [B, 1]
    above = values > threshold
    need = k - ops.row_sum(above, keepdim=True)
    equal = values == threshold
    rank_equal = ops.cumsum(equal.astype(np.int64) if ops is NumpyOps else equal.long())
    return above | (equal & (rank_equal <= need))


def holds_top(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Bool [B]: whether the tokens members [B, k] (k >= 1; numpy) are, as a set, the k largest
    entries of each row of values [B, V] with ties by lower index -- ``top_mask(values, k)``'s
    set -- without building the mask (a selection and a cumsum over V): with v the smallest
    member value, they are iff they are k distinct tokens, no other entry exceeds v, and the
    members equal to v are the lowest-index entries equal to v (a count over the row's prefix up
    to the last of them). Two comparisons over the row."""
    k = members.shape[1]
    out = np.empty(members.shape[0], dtype=bool)
    for b, (row, tokens) in enumerate(zip(values, members)):
        member_values = row[tokens]
        v = member_values.min()
        at_v = member_values == v
        last = int(tokens[at_v].max())
        out[b] = (
            np.unique(tokens).size == k
            and np.count_nonzero(row > v) == k - np.count_nonzero(at_v)
            and np.count_nonzero(row[: last + 1] == v) == np.count_nonzero(at_v)
        )
    return out


def complement_renormalised(values, excluded_mask):
    """values restricted to ~excluded_mask, renormalised row-wise; the normaliser is summed over the
    kept entries (not 1 - mass excluded), which keeps precision when the excluded mass is near 1."""
    ops = backend(values)
    rest = ops.where(excluded_mask, 0.0 * values, values)
    return rest / ops.row_sum(rest, keepdim=True)
