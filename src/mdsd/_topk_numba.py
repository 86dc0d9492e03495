"""The compiled top-k of ``mdsd.logits.top_k_indices`` (numba): the k largest entries of a row.

The set is the one a stable descending sort keeps: every entry strictly above the k-th largest
value, then the lowest ids among the entries equal to it (``top_k_indices_reference``, by
``np.argpartition``, is the reference; tests/test_logits.py compares them).

Keys instead of floats: a float's bits read as a signed integer x map to the integer
x ^ ((x >> s) & m) - (x >> s) (s = width - 1, m = the largest positive integer): positive floats
keep their bits, negative ones are mirrored below them and -0.0 joins +0.0, so keys compare as
the floats do (no NaN; -inf is the smallest). The compiler vectorises a maximum of integers, not
one of floats (whose NaN rules it must keep).

A bound instead of a partition of the whole row: split the row [V] into B >= 2k blocks (their
length a multiple of ``VECTOR``) and take each block's largest key (a vectorised pass). The k-th
largest block maximum t is at most the row's k-th largest key (the maxima of k blocks are >= t),
so every entry that can be kept is >= t, and only the blocks whose maximum is >= t hold one.
Their entries >= t (a few hundred on a model's logits) give the k-th largest key (``select``, a
quickselect in place), and one pass over them in ascending id order keeps the set. On a 32k row
with k = 50 this reads the row about 1.3 times where ``np.argpartition`` moves all of it
(``benchmarks/bench_sampling.py`` compares them). Worst case (a row sorted ascending): about
k V / B candidates, still O(V). Keys are integers of the bits' width (int32 for float32:
``shift`` and ``mask`` passed as int32), twice the lanes of int64.
"""

from __future__ import annotations

import numba
import numpy as np

from mdsd._softmax_numba import tempered_softmax

BLOCKS_PER_KEPT = 4  # B = min(V, 4k) blocks before rounding (B >= 2k after it)
VECTOR = 16  # block lengths above it are whole multiples of it: the maxima vectorise
# a float32 row's ``shift`` and ``mask`` (``top_k_indices``), int32 so that its keys are int32
SHIFT32, MASK32 = np.int32(31), np.int32(0x7FFFFFFF)


@numba.njit(cache=True, boundscheck=False, inline="always")
def _key(bits, shift, mask):
    return (bits ^ ((bits >> shift) & mask)) - (bits >> shift)


@numba.njit(cache=True, boundscheck=False)
def _max_key(bits, shift, mask):
    top = _key(bits[0], shift, mask)
    for i in range(bits.size):
        top = max(top, _key(bits[i], shift, mask))
    return top


@numba.njit(cache=True, boundscheck=False)
def select(values, rank):
    """The rank-th smallest entry of ``values`` (0-based), ``values`` permuted in place: Hoare's
    quickselect with a median-of-three pivot (``np.partition``'s answer, tested; without its copy
    and allocation: a few times faster on the few hundred keys of ``top_k_indices``)."""
    lo, hi = 0, values.size - 1
    while lo < hi:
        a, b, c = values[lo], values[(lo + hi) >> 1], values[hi]
        pivot = max(min(a, b), min(max(a, b), c))
        i, j = lo, hi
        while i <= j:  # [lo, i) <= pivot, (j, hi] >= pivot
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if rank <= j:
            hi = j
        elif rank >= i:
            lo = i
        else:  # j < rank < i: equal to the pivot
            return values[rank]
    return values[rank]


@numba.njit(cache=True, boundscheck=False)
def top_k_indices(bits, k, shift, mask):
    """The k largest entries of a row of floats given as their bits [V] (int32 for float32,
    int64 for float64: ``row.view``; no NaN, -inf allowed), ``shift`` = width - 1 and ``mask`` =
    2^shift - 1 (of the bits' integer type: keys in its width): ascending int64 token ids
    [min(k, V)]; ties at the k-th value: lower id wins."""
    vocab = bits.size
    if k >= vocab:
        return np.arange(vocab)
    size = -(-vocab // min(vocab, BLOCKS_PER_KEPT * k))  # block length, rounded up to whole vectors
    size = -(-size // VECTOR) * VECTOR if size > VECTOR else size
    blocks = -(-vocab // size)  # >= 2k when 4k < V (size <= 2 V / 4k), = V otherwise
    maxima = np.empty(blocks, dtype=bits.dtype)
    for b in range(blocks):
        maxima[b] = _max_key(bits[b * size : min(vocab, (b + 1) * size)], shift, mask)
    bound = select(maxima.copy(), blocks - k)  # k-th largest block maximum
    # the candidates: keys >= bound in the blocks whose maximum reaches it, ascending ids
    room = 0
    for b in range(blocks):
        room += size if maxima[b] >= bound else 0
    ids = np.empty(room, dtype=np.int64)
    keys = np.empty(room, dtype=bits.dtype)
    m = 0
    for b in range(blocks):
        if maxima[b] >= bound:
            for i in range(b * size, min(vocab, (b + 1) * size)):
                key = _key(bits[i], shift, mask)
                if key >= bound:
                    ids[m] = i
                    keys[m] = key
                    m += 1
    kth = select(keys[:m].copy(), m - k)  # the row's k-th largest key
    ties = k  # places left for entries equal to the k-th
    for j in range(m):
        ties -= keys[j] > kth
    out = np.empty(k, dtype=np.int64)
    kept = 0
    for j in range(m):
        if keys[j] > kth or (keys[j] == kth and ties > 0):
            ties -= keys[j] == kth
            out[kept] = ids[j]
            kept += 1
    return out


@numba.njit(cache=True, boundscheck=False)
def top_k_softmax(row, bits, k, shift, mask, temperature):
    """The top-k step and the softmax of ``mdsd.logits.process_logits_row`` in one call: (the
    kept ids [k] ascending, softmax(row[ids] / temperature) float64 [k], its number of zeros).
    ``bits`` is ``row`` viewed as integers, as for ``top_k_indices``."""
    ids = top_k_indices(bits, k, shift, mask)
    kept = np.empty(ids.size, dtype=row.dtype)
    for j in range(ids.size):
        kept[j] = row[ids[j]]
    probs, zeros = tempered_softmax(kept, temperature)
    return ids, probs, zeros
