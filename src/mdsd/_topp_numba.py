"""The compiled top-p of ``mdsd.logits.process_logits_row`` (numba): the nucleus of a row.

The reference (``mdsd.logits.top_p_kept_reference``) sorts the probabilities descending (stable:
ties in ascending id order), takes their running sum c (``np.cumsum``, one add after another)
and keeps sorted entry i where c_i - p_i < top_p. A full sort of a model's row costs more than
its softmax; here only the entries that can be kept are sorted.

Candidates: a histogram of the row's mass over buckets of the float64 exponent (eight buckets
an octave, from 2^-64 up) gives the smallest bucket b whose entries >= 2^b hold a mass of at
least top_p + ``MARGIN``; those entries form a prefix of the sorted order. Sorted (stable: a
merge sort, or above ``RADIX_MIN`` candidates the radix sort of ``mdsd._radix_numba``, 2-4x
faster on the thousands of a flat row's nucleus; the same permutation) and summed one after
another, they give the reference's c_i and its test for each
of them exactly (a running sum of a prefix does not depend on what follows it). Every later
entry is dropped by the reference: from c_{m-1} >= top_p + 1e-12 (checked; else every entry is
a candidate), c_j - p_j rounds to at least c_{m-1} - 4e-16 > top_p for every j >= m (a running
sum of non-negative terms never decreases). So the kept set is the reference's, bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np

from mdsd._radix_numba import stable_argsort
from mdsd._softmax_numba import float_bits, tempered_softmax
from mdsd._topk_numba import MASK32, SHIFT32, top_k_softmax

MARGIN = 1e-9  # the histogram's mass (an unordered sum) must pass top_p by this much
SURE = 1e-12  # the candidates' ordered sum must pass top_p by this much (rounding moves < 1e-15)
RADIX_MIN = 512  # candidates from which the radix sort beats the merge sort (~700 measured)
SUB_BITS = 3  # 2^3 buckets an octave
LOWEST = -64  # buckets from 2^-64 (and one below it for everything smaller, zeros included)
BUCKETS = (-LOWEST) << SUB_BITS  # probabilities <= 1: exponents below 0
_BASE = (1023 + LOWEST) << SUB_BITS  # the bucket key of 2^LOWEST (bits >> (52 - SUB_BITS))


@numba.njit(cache=True, boundscheck=False, inline="always")
def _bucket(prob):
    """1 + the bucket of ``prob`` in [0, 1] (key of its exponent and top mantissa bits, from
    2^LOWEST), or 0 below 2^LOWEST; 1.0 joins the last bucket."""
    key = (float_bits(prob) >> (52 - SUB_BITS)) - _BASE
    return min(max(key + 1, 0), BUCKETS)


@numba.njit(cache=True, boundscheck=False)
def _candidate_floor(probs, top_p):
    """The smallest bucket (``_bucket`` value) whose entries and those of all higher buckets hold
    a mass >= top_p + MARGIN, or 0 (every entry) where no bucket does."""
    mass = np.zeros(BUCKETS + 1)
    for i in range(probs.size):
        mass[_bucket(probs[i])] += probs[i]
    total = 0.0
    for b in range(BUCKETS, 0, -1):
        total += mass[b]
        if total >= top_p + MARGIN:
            return b
    return 0


@numba.njit(cache=True, boundscheck=False)
def _sorted_keep(values, top_p):
    """The reference's test on ``values`` (a prefix of the row's sorted order, in ascending id
    order): a bool per entry (kept) and the ordered running sum of all of them."""
    if values.size >= RADIX_MIN:  # stable: ties keep ascending ids
        order = stable_argsort(-values)
    else:
        order = np.argsort(-values, kind="mergesort")
    keep = np.zeros(values.size, dtype=np.bool_)
    total = 0.0
    for j in range(order.size):
        prob = values[order[j]]
        total += prob
        keep[order[j]] = total - prob < top_p
    return keep, total


@numba.njit(cache=True, boundscheck=False)
def top_p_kept(probs, top_p):
    """The positions (ascending) of ``probs`` [n] (float64, >= 0, summing to ~1) that top-p keeps:
    ``mdsd.logits.top_p_kept_reference``'s set (see the module docstring), for 0 < top_p < 1."""
    floor = _candidate_floor(probs, top_p)
    while True:
        ids = np.empty(probs.size, dtype=np.int64)
        m = 0
        for i in range(probs.size):
            if _bucket(probs[i]) >= floor:
                ids[m] = i
                m += 1
        keep, total = _sorted_keep(probs[ids[:m]], top_p)
        if floor == 0 or total >= top_p + SURE:
            return ids[:m][keep]
        floor = 0  # (not reached with the margins above) every entry a candidate


@numba.njit(cache=True, inline="always")
def truncates(top_k, top_p, vocab):
    """Whether the transform drops tokens of a row of ``vocab`` logits: a top-k below it or a
    top-p below 1 (top_k 0 and top_p 1: none)."""
    return 0 < top_k < vocab or top_p < 1.0


@numba.njit(cache=True, boundscheck=False)
def truncated_softmax(row, temperature, top_k, top_p):
    """``mdsd.logits.process_logits_row`` of a float32 row [V] for temperature > 0, top_k (0:
    none) and top_p (>= 1: none), in one call: (ids, values, zeros). ids: the kept token ids,
    ascending, or empty where nothing truncates (values then the dense softmax [V]); values:
    their probabilities (float64); zeros: how many values underflowed to 0 (with top-p: none,
    as those are dropped, ``process_logits_row``'s stored form)."""
    if 0 < top_k < row.size:
        ids, values, zeros = top_k_softmax(row, row.view(np.int32), top_k, SHIFT32, MASK32, temperature)
    else:
        ids = np.empty(0, dtype=np.int64)
        values, zeros = tempered_softmax(row, temperature)
    if top_p >= 1.0:
        return ids, values, zeros
    kept = top_p_kept(values, top_p)
    ids = kept if ids.size == 0 else ids[kept]
    kept_logits = np.empty(ids.size, dtype=row.dtype)
    for j in range(ids.size):
        kept_logits[j] = row[ids[j]]
    values, zeros = tempered_softmax(kept_logits, temperature)
    if zeros:
        nonzero = np.flatnonzero(values)
        return ids[nonzero], values[nonzero], 0
    return ids, values, 0
