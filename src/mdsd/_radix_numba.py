"""A compiled stable argsort of float64 keys: least-significant-digit radix sort.

numpy sorts 32,000 float64 keys in ~1.4 ms (``np.argsort``; its stable sort ~2.6 ms) on CPUs
where it has no vectorised sort (the Zen 4 VM of BENCHMARKS.md; ~0.3 ms where its AVX-512 sort
runs): the largest part of the optimal verifier's full-vocabulary fit (its priority order). A
radix sort orders the keys by their bits: each float64 is mapped to an unsigned integer that
compares as the float does, and the integers are sorted by ``DIGIT_BITS``-bit digits from the
least significant, each pass a stable counting sort, so equal keys keep their index order. One
pass counts every digit; a digit that is the same for every key (the high exponent bits of keys
of one scale) needs no pass.

The order is ``np.argsort(keys, kind="stable")``'s exactly (tested): -0.0 and 0.0 are one key, and
every NaN sorts last, in index order, as numpy sorts them. Where numpy's own sort is vectorised
(AVX-512 on some CPUs: ~0.3 ms for 32,000 keys, against ~0.5 ms here), ``mdsd.bound.stable_argsort``
sorts with it and makes the order stable afterwards (``stabilize``), the same permutation.
"""

from __future__ import annotations

import numba
import numpy as np

DIGIT_BITS = 11  # 2,048 counters per digit (16 KiB, in L1); six passes cover 64 bits
_BUCKETS = 1 << DIGIT_BITS
_PASSES = -(-64 // DIGIT_BITS)
_SIGN = np.uint64(1 << 63)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


@numba.njit(cache=True)
def _sortable_bits(keys):
    """uint64 [n] that compare as the float64 keys do (a NaN above everything, -0.0 as 0.0): a
    non-negative float's bits with the sign bit set, a negative float's bits inverted."""
    out = np.empty(keys.size, dtype=np.uint64)
    bits = keys.view(np.uint64)
    for i in range(keys.size):
        key = keys[i]
        if key != key:
            out[i] = _ALL
        elif key == 0.0:
            out[i] = _SIGN  # +0.0 and -0.0
        elif bits[i] & _SIGN:
            out[i] = ~bits[i]
        else:
            out[i] = bits[i] | _SIGN
    return out


@numba.njit(cache=True)
def stable_argsort(keys):
    """int64 [n]: the indices of float64 ``keys`` [n] (contiguous) in ascending order, ties by
    lower index (``np.argsort(keys, kind="stable")``)."""
    n = keys.size
    mapped = _sortable_bits(keys)
    counts = np.zeros((_PASSES, _BUCKETS), dtype=np.int64)
    mask = np.uint64(_BUCKETS - 1)
    for i in range(n):  # every pass's digit counts in one read of the keys
        value = mapped[i]
        for d in range(_PASSES):
            counts[d, (value >> np.uint64(d * DIGIT_BITS)) & mask] += 1
    index = np.arange(n)
    spare_index = np.empty(n, dtype=np.int64)
    spare_mapped = np.empty(n, dtype=np.uint64)
    offsets = np.empty(_BUCKETS, dtype=np.int64)
    for d in range(_PASSES):
        shift = np.uint64(d * DIGIT_BITS)
        if n == 0 or counts[d, (mapped[0] >> shift) & mask] == n:
            continue  # one digit value for every key: this pass would not move anything
        total = 0
        for b in range(_BUCKETS):
            offsets[b] = total
            total += counts[d, b]
        for i in range(n):
            digit = (mapped[i] >> shift) & mask
            at = offsets[digit]
            offsets[digit] = at + 1
            spare_index[at] = index[i]
            spare_mapped[at] = mapped[i]
        index, spare_index = spare_index, index
        mapped, spare_mapped = spare_mapped, mapped
    return index


@numba.njit(cache=True)
def stabilize(keys, order):
    """``order`` [n] (ascending keys, e.g. numpy's unstable ``np.argsort``) made stable in place:
    the indices of each run of equal keys (-0.0 and 0.0 one key; the NaNs, which numpy sorts last,
    one run) sorted ascending. Returns ``order``: then ``np.argsort(keys, kind="stable")``."""
    n = order.size
    i = 0
    while i < n:
        key = keys[order[i]]
        j = i + 1
        if key != key:  # NaN: every later key is a NaN too
            j = n
        else:
            while j < n and keys[order[j]] == key:
                j += 1
        if j - i > 1:
            order[i:j] = np.sort(order[i:j])
        i = j
    return order
