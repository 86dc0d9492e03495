"""From logits to the probabilities the bound and the verifiers use.

The target's p and the draft's q must go through the *same* sampling transform, and q must be the
law the drafts were actually drawn from (a classic engine bug verifies against the raw q while
drafting from a top-k q). ``process_logits`` is that transform; ``probs_from_logits`` applies it to
both models at once.

Transform, in order (as in Hugging Face's samplers):
1. temperature T: logits / T; T = 0 means greedy: a one-hot on the argmax (ties: lowest index);
2. top-k: keep the k largest logits of each row (ties at the boundary: lower index wins);
3. top-p: keep the smallest prefix of the tokens sorted by probability whose mass reaches top_p
   (at least one token);
4. softmax in float64 over the kept tokens; dropped tokens get probability exactly 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from mdsd._validate import _to_numpy


def process_logits(
    logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> np.ndarray:
    """Sampling probabilities (float64, [..., V]) from logits [..., V]; see the module docstring.

    >>> process_logits([0.0, 0.0, 10.0], temperature=0).tolist()
    [0.0, 0.0, 1.0]
    """
    z = np.array(_to_numpy(logits), dtype=np.float64)
    if z.ndim == 0 or z.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary axis, got shape {z.shape}")
    if np.any(np.isnan(z)) or np.any(z == np.inf):
        raise ValueError("logits contain NaN or +inf")
    if np.any(np.all(z == -np.inf, axis=-1)):
        raise ValueError("logits has a row where every entry is -inf (no token is possible)")
    if temperature is None or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")

    if temperature == 0:
        out = np.zeros_like(z)
        np.put_along_axis(out, np.argmax(z, axis=-1)[..., None], 1.0, axis=-1)
        return out
    z = z / temperature
    vocab = z.shape[-1]
    if top_k is not None and top_k < vocab:
        keep = np.zeros(z.shape, dtype=bool)
        rows = z.reshape(-1, vocab)
        for row, kept in zip(rows, keep.reshape(-1, vocab)):
            kept[top_k_indices_reference(row, int(top_k))] = True
        z = np.where(keep, z, -np.inf)
    probs = _softmax(z)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < top_p  # the first token is always kept
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        z = np.where(keep, z, -np.inf)
        probs = _softmax(z)
    return probs


def top_k_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries of a row [V], ascending token ids; ties at the boundary: lower id wins.

    One compiled call (``mdsd._topk_numba``: block maxima bound the k-th value, then only the
    candidates above the bound are partitioned); the same set as ``top_k_indices_reference``
    (tested), a few times faster on a model's row.
    """
    _, bits, shift, mask = _key_bits(logits)
    return _compiled_top_k().top_k_indices(bits, int(k), shift, mask)


# float dtype -> (the integers of its width, width - 1, 2^(width - 1) - 1)
_KEY_TYPES = {
    np.dtype(np.float32): (np.int32, np.int32(31), np.int32(2**31 - 1)),
    np.dtype(np.float64): (np.int64, np.int64(63), np.int64(2**63 - 1)),
}


def _key_bits(logits: np.ndarray):
    """(row float32 / float64, its bits as int32 / int64, width - 1, 2^(width - 1) - 1): the
    arguments of ``mdsd._topk_numba``'s integer keys (other dtypes: the row in float64)."""
    key = _KEY_TYPES.get(logits.dtype)
    if key is None:
        logits = logits.astype(np.float64)
        key = _KEY_TYPES[logits.dtype]
    integers, shift, mask = key
    return logits, logits.view(integers), shift, mask


def top_k_indices_reference(logits: np.ndarray, k: int) -> np.ndarray:
    """``top_k_indices`` by ``np.argpartition`` (not a full sort): everything strictly above the
    k-th largest value is kept, then the lowest ids among the entries equal to it fill the
    remaining places, the same set a stable descending sort would keep."""
    vocab = logits.shape[-1]
    if k >= vocab:
        return np.arange(vocab)
    chosen = np.argpartition(logits, vocab - k)[vocab - k :]  # the k largest, ties arbitrary
    kth = logits[chosen].min()  # the k-th largest value
    if np.count_nonzero(logits == kth) == np.count_nonzero(logits[chosen] == kth):
        return np.sort(chosen)  # no tied entry left out: the set is the stable sort's
    above = np.flatnonzero(logits > kth)
    tied = np.flatnonzero(logits == kth)[: k - above.size]
    return np.union1d(above, tied)


def kernel_truncation(top_k: int | None, top_p: float | None) -> tuple[int, float]:
    """The compiled kernels' form of a top-k and a top-p (``mdsd._topp_numba.truncates``):
    (top_k or 0, top_p or 1.0), 0 and 1.0 meaning none."""
    return int(top_k or 0), float(1.0 if top_p is None else top_p)


def top_p_kept_reference(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The positions (ascending) of a probability row [n] that top-p keeps: sorted descending
    (stable: ties in ascending position), sorted entry i is kept where the mass before it,
    ``cumsum - probs`` in that order, is below ``top_p`` (the first entry always is).
    ``process_logits_row`` finds the same set in one compiled call (``mdsd._topp_numba.top_p_kept``,
    which sorts only the entries that can be kept; tested equal)."""
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    return np.sort(order[(np.cumsum(sorted_probs) - sorted_probs) < top_p])


@functools.cache
def _compiled_top_p():
    """``mdsd._topp_numba``, imported once."""
    from mdsd import _topp_numba

    return _topp_numba


@functools.cache
def _compiled_top_k():
    """``mdsd._topk_numba``, imported once (numba's import costs ~0.3 s)."""
    from mdsd import _topk_numba

    return _topk_numba


@dataclass(frozen=True)
class SupportProbs:
    """A probability vector stored on its support (the engine's p and q per tree node).

    indices: [k] int64 ascending token ids, or None when the vector is stored densely.
    values:  [k] float64 probabilities of those tokens (or [V] when dense); they sum to 1.
    vocab:   V.
    """

    indices: np.ndarray | None
    values: np.ndarray
    vocab: int

    @property
    def support_size(self) -> int:
        return int(self.values.size if self.indices is not None else np.count_nonzero(self.values))

    def dense(self) -> np.ndarray:
        """The probability vector [V] float64."""
        if self.indices is None:
            return self.values
        out = np.zeros(self.vocab)
        out[self.indices] = self.values
        return out

    def token(self, position: int) -> int:
        """Token id of an entry of ``values``."""
        return int(position if self.indices is None else self.indices[position])

    def prob(self, token: int) -> float:
        """The probability of token id ``token`` (0 off the support)."""
        if self.indices is None:
            return float(self.values[token])
        at = int(np.searchsorted(self.indices, token))
        return float(self.values[at]) if at < self.indices.size and self.indices[at] == token else 0.0


def process_logits_row(
    logits: np.ndarray,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    drop_zeros: bool = False,
) -> SupportProbs:
    """``process_logits`` of one trusted row [V] (float32 or float64), stored on its support.

    The same transform, with the same kept tokens and float64 probabilities (tested equal to
    ``process_logits``), without its input checks and without touching the whole vocabulary
    more than a few times: top-k by ``top_k_indices`` and the softmax (``mdsd._softmax_numba``)
    in one compiled call, top-p's set by ``mdsd._topp_numba.top_p_kept`` (sorting only the
    tokens that can be kept), then the softmax of the kept tokens. Dense (``indices=None``) only
    when neither top-k nor temperature 0 truncates, and with ``drop_zeros`` only when moreover no
    mass underflows to 0 (else stored on the nonzero entries).
    """
    vocab = logits.shape[-1]
    if temperature == 0:
        return SupportProbs(np.array([int(np.argmax(logits))]), np.ones(1), vocab)
    softmax = _tempered_softmax()
    if top_k is not None and top_k < vocab:  # top-k and softmax in one compiled call
        row, bits, shift, mask = _key_bits(logits)
        indices, probs, zeros = _compiled_top_k().top_k_softmax(
            row, bits, int(top_k), shift, mask, float(temperature)
        )
    else:
        indices = None
        probs, zeros = softmax(logits, float(temperature))
    if top_p is not None and top_p < 1.0:
        logits = logits if indices is None else logits[indices]
        kept = _compiled_top_p().top_p_kept(probs, float(top_p))
        indices = kept if indices is None else indices[kept]
        probs, zeros = softmax(logits[kept], float(temperature))
    if zeros and (indices is not None or drop_zeros):  # -inf logits kept, or underflow
        nonzero = np.flatnonzero(probs)
        indices = nonzero if indices is None else indices[nonzero]
        probs = probs[nonzero]
    return SupportProbs(indices, probs, vocab)


@functools.cache
def _tempered_softmax():
    """``mdsd._softmax_numba.tempered_softmax``: (softmax(row / T) in float64, its number of
    zeros), one compiled call (``_softmax`` of the same row to 1e-14 relative, zeros where it
    has zeros; tested)."""
    from mdsd._softmax_numba import tempered_softmax

    return tempered_softmax


def _softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(shifted)  # exp(-inf) = 0 exactly
    return e / e.sum(axis=-1, keepdims=True)


def probs_from_logits(
    target_logits,
    draft_logits,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
):
    """(p, q) from target and draft logits with the identical transform (float64).

    Each model's distribution is truncated by its own top-k / top-p set, as each is sampled from.
    """
    target_logits, draft_logits = _to_numpy(target_logits), _to_numpy(draft_logits)
    if np.shape(target_logits) != np.shape(draft_logits):
        raise ValueError(
            f"target_logits and draft_logits must have the same shape (same vocabulary), got "
            f"{np.shape(target_logits)} and {np.shape(draft_logits)}"
        )
    return (
        process_logits(target_logits, temperature, top_k, top_p),
        process_logits(draft_logits, temperature, top_k, top_p),
    )
