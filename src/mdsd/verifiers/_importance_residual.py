"""The importance verifier's rejected path without a sort: y ~ resid(p, p_I) (compiled, numba).

After the picked draft s is rejected, ``Importance`` emits y ~ (p - p_I)_+ / total with p_I the law
of max-importance selection (``mdsd.verifiers.classic_math.importance_law``): tokens ranked by the
weight w = p / q decreasing (ties by lower id), G_after(x) = q(tokens ranked after x),
p_I(x) = min(G_after + q_x, 1)^n - min(G_after, 1)^n. The reference sorts the whole vocabulary to
get every G_after. Here the draw is an inverse CDF along that rank order, and the order is refined
only where the masses or the draw need it (a radix selection on the bits of w):

1. One pass: tokens with q = 0 (ranked last, p_I = 0: their residual is p) and with p = 0 (weight
   0, residual 0, their q only enters G) are set aside; the others get the key bits(w), which
   orders positive doubles as their values, and are counted into root parts of 1/128 octave
   (``_root_digit``: 2^-16 <= w < 2^16, the rest in the two end parts).
2. A set S of tokens with keys in a range [k_lo, k_hi] (weights in [w_lo, w_hi]) and the q-mass A
   of the tokens ranked after it has a residual mass computable without its internal order: for
   x in S, p_I(x) / q_x = sum_j tail^j after^(n-1-j) lies in [n A^(n-1), n min(A + Q_S, 1)^(n-1)]
   (Q_S = q(S)). If w_lo exceeds the upper bound (by ``MARGIN``), every token of S has
   p_x >= p_I(x) and the masses telescope: sum_S (p - p_I) = p(S) - (min(A + Q_S, 1)^n - min(A, 1)^n).
   If w_hi is below the lower bound (and A + Q_S <= 1: no clipping), every residual is 0. Otherwise
   S is gathered and split into up to 256 key ranges (stable counting sort), each with its own A;
   a set of at most ``leaf`` tokens (or of one key: a tie run, in id order) is sorted and summed
   token by token (the reference's formula).
3. The draw at u: t = u * total; the parts are walked in rank order (higher weights first) and the
   one whose running mass passes t is refined the same way, down to a leaf walked token by token;
   the q = 0 tokens come last, in id order. Where total <= EMPTY_MASS the draw is from p instead,
   in the same order (as ``base.residual``).

Cost: one pass over the vocabulary, one over the kept tokens to gather the parts that straddle a
sign change of p - p_I (and one for the part drawn from), instead of an argsort. Sums differ from
the reference's by rounding only (G is summed from the bottom of the order, not as total - head);
tests/verifiers/test_importance_residual.py compares the exact law of the draw with the reference.
"""

from __future__ import annotations

import numba
import numpy as np

from mdsd.verifiers.base import EMPTY_MASS

# Relative margin on the bounds of p_I / q that decide a whole set (rounding of p / q and of G).
MARGIN = 1e-9
# Sets of at most this many tokens are sorted and summed token by token (the default ``leaf``).
LEAF = 32
_KEY_INF = 0x7FF0000000000000  # bits(inf): weights p / q are at most this
_ROOT_SHIFT = 45  # root parts: the exponent and the first 7 mantissa bits of w
_ROOT_BASE = (1023 - 16) << 7  # the root part of w = 2^-16
_ROOT_PARTS = 32 << 7  # 2^-16 <= w < 2^16 in 1/128 octaves; the rest in the two end parts
_NOT_KEPT = _ROOT_PARTS  # the root part of a token with q = 0 or p = 0: none
_SPLIT = 256  # parts per split below the root
_STACK = 8 * _SPLIT + 1  # depth first: one split's parts per level, at most 8 levels of 8 bits


@numba.njit(cache=True, fastmath=False)
def _power_difference(lower, width, n):
    """min(lower + width, 1)^n - min(lower, 1)^n for lower, width >= 0, as d sum_j tail^j
    after^(n-1-j) with d = width unless clipped (no cancellation; the reference's formula)."""
    upper = lower + width
    tail, after = min(upper, 1.0), min(lower, 1.0)
    d = width if upper <= 1.0 else tail - after
    power, terms = 1.0, 1.0
    for _ in range(n - 1):
        power *= tail
        terms = terms * after + power
    return d * terms


@numba.njit(cache=True, fastmath=False, inline="always")
def _weight(key):
    """The double whose bits are ``key``."""
    return np.int64(key).view(np.float64)


@numba.njit(cache=True, fastmath=False, inline="always")
def _key(w):
    """bits(w): for w >= 0, ordered as the values."""
    return np.float64(w).view(np.int64)


@numba.njit(cache=True, fastmath=False)
def _whole_set_mass(key_lo, key_hi, below, q_mass, target_mass, n):
    """The residual mass of a set decided by its bounds, or -1.0 when the set straddles.

    Keys in [key_lo, key_hi]; below = A; q_mass = Q_S; target_mass = p(S)."""
    above = below + q_mass
    if _weight(key_lo) >= _rate(min(above, 1.0), n) * (1.0 + MARGIN):  # p >= p_I: telescopes
        return max(target_mass - _power_difference(below, q_mass, n), 0.0)
    if above <= 1.0 and _weight(key_hi) <= _rate(below, n) * (1.0 - MARGIN):  # p <= p_I
        return 0.0
    return -1.0


@numba.njit(cache=True, fastmath=False, inline="always")
def _rate(g, n):
    """n g^(n-1), the bound on p_I / q at G = g."""
    power = 1.0
    for _ in range(n - 1):
        power *= g
    return n * power


@numba.njit(cache=True, fastmath=False)
def _leaf_values(ids, keys, p, q, lo, hi, below, n, from_target, values, leaf):
    """Sort ids[lo:hi] (with their keys, keys[lo:hi]) into rank order (key decreasing, id
    increasing; a set of more than ``leaf`` tokens comes here only as a tie run, already in id
    order) and write each token's mass into values[lo:hi]: (p - p_I)_+ with G_after summed from
    the bottom of the set (from A = ``below``), or p (``from_target``). Returns their sum."""
    if hi - lo <= leaf:
        for i in range(lo + 1, hi):  # insertion sort: a few dozen tokens
            x, key = ids[i], keys[i]
            j = i - 1
            while j >= lo and (keys[j] < key or (keys[j] == key and ids[j] > x)):
                ids[j + 1], keys[j + 1] = ids[j], keys[j]
                j -= 1
            ids[j + 1], keys[j + 1] = x, key
    total, after = 0.0, below
    for i in range(hi - 1, lo - 1, -1):
        x = ids[i]
        values[i] = p[x] if from_target else max(p[x] - _power_difference(after, q[x], n), 0.0)
        after += q[x]
        total += values[i]
    return total


@numba.njit(cache=True, fastmath=False)
def _is_leaf(lo, hi, key_lo, key_hi, leaf):
    """A set summed token by token: at most ``leaf`` tokens, or one key (a tie run)."""
    return hi - lo <= leaf or key_lo == key_hi


# A parts table (one split, indexed by part): count, start, q, p, q of the lower parts, mass.
_COUNT, _START, _Q, _P, _BELOW, _MASS = 0, 1, 2, 3, 4, 5


@numba.njit(cache=True)
def _parts_table(size):
    """A zeroed parts table of ``size`` parts: (count, start) int64, (q, p, below, mass) float64."""
    ints = np.zeros(size, dtype=np.int64), np.zeros(size, dtype=np.int64)
    return ints + (np.zeros(size), np.zeros(size), np.zeros(size), np.zeros(size))


@numba.njit(cache=True, fastmath=False)
def _split_shift(key_lo, key_hi):
    """The smallest shift that cuts [key_lo, key_hi] into at most ``_SPLIT`` ranges."""
    shift = 0
    while (key_hi - key_lo) >> shift >= _SPLIT:
        shift += 1
    return shift


@numba.njit(cache=True, fastmath=False)
def _part_keys(key_lo, key_hi, shift, d):
    """The key range of part d of [key_lo, key_hi] cut at ``shift``."""
    first = key_lo + (d << shift)
    return first, min(first + ((1 << shift) - 1), key_hi)


@numba.njit(cache=True, fastmath=False)
def _split(ids, keys, p, q, lo, hi, key_lo, shift, digits, parts, scratch):
    """Stable counting sort of ids[lo:hi] and their keys by (key - key_lo) >> shift into ``digits``
    parts (``scratch``: a pair of buffers); fills
    each part's count, start, q, p and the q of the lower parts (A of part d = the set's A + it)."""
    count, start, part_q, part_p, below = parts[0], parts[1], parts[2], parts[3], parts[4]
    count[:digits] = 0
    part_q[:digits] = 0.0
    part_p[:digits] = 0.0
    for i in range(lo, hi):
        x = ids[i]
        d = (keys[i] - key_lo) >> shift
        count[d] += 1
        part_q[d] += q[x]
        part_p[d] += p[x]
    first, acc = lo, 0.0
    for d in range(digits):
        start[d], below[d] = first, acc
        first += count[d]
        acc += part_q[d]
    scratch_ids, scratch_keys = scratch
    for i in range(lo, hi):
        d = (keys[i] - key_lo) >> shift
        scratch_ids[start[d]], scratch_keys[start[d]] = ids[i], keys[i]
        start[d] += 1
    for d in range(digits):  # back to the starts
        start[d] -= count[d]
    ids[lo:hi] = scratch_ids[lo:hi]
    keys[lo:hi] = scratch_keys[lo:hi]


@numba.njit(cache=True, fastmath=False)
def _set_mass(ids, keys, p, q, lo, hi, key_lo, key_hi, below, q_mass, p_mass, n, leaf, work):
    """Residual mass of the set ids[lo:hi] (keys in [key_lo, key_hi], q(S) = q_mass,
    p(S) = p_mass, A = ``below``): decided by its bounds where they agree, else split (depth
    first, an explicit stack) down to leaves summed token by token."""
    scratch, values, parts, stack_int, stack_float = work
    stack_int[0, 0], stack_int[1, 0], stack_int[2, 0], stack_int[3, 0] = lo, hi, key_lo, key_hi
    stack_float[0, 0], stack_float[1, 0], stack_float[2, 0] = below, q_mass, p_mass
    top, total = 1, 0.0
    while top > 0:
        top -= 1
        s_lo, s_hi, s_key_lo, s_key_hi = (
            stack_int[0, top],
            stack_int[1, top],
            stack_int[2, top],
            stack_int[3, top],
        )
        s_below, s_q, s_p = stack_float[0, top], stack_float[1, top], stack_float[2, top]
        decided = _whole_set_mass(s_key_lo, s_key_hi, s_below, s_q, s_p, n)
        if decided >= 0.0:
            total += decided
        elif _is_leaf(s_lo, s_hi, s_key_lo, s_key_hi, leaf):
            total += _leaf_values(ids, keys, p, q, s_lo, s_hi, s_below, n, False, values, leaf)
        else:
            shift = _split_shift(s_key_lo, s_key_hi)
            digits = ((s_key_hi - s_key_lo) >> shift) + 1
            _split(ids, keys, p, q, s_lo, s_hi, s_key_lo, shift, digits, parts, scratch)
            for d in range(digits):
                if parts[_COUNT][d] == 0:
                    continue
                part_lo, part_hi = _part_keys(s_key_lo, s_key_hi, shift, d)
                stack_int[0, top] = parts[_START][d]
                stack_int[1, top] = parts[_START][d] + parts[_COUNT][d]
                stack_int[2, top], stack_int[3, top] = part_lo, part_hi
                stack_float[0, top] = s_below + parts[_BELOW][d]
                stack_float[1, top], stack_float[2, top] = parts[_Q][d], parts[_P][d]
                top += 1
    return total


@numba.njit(cache=True, fastmath=False)
def _choose(mass, first, last, threshold):
    """The part in [first, last] (decreasing index: rank order) where the running mass passes
    ``threshold`` and the threshold left inside it; the last part of positive mass (threshold at
    its end) if rounding leaves it unreached; (-1, threshold) if no part has positive mass."""
    acc, fallback = 0.0, -1
    for d in range(last, first - 1, -1):
        if mass[d] > 0.0:
            if acc + mass[d] > threshold:
                return d, threshold - acc
            acc += mass[d]
            fallback = d
    if fallback < 0:
        return -1, threshold
    return fallback, mass[fallback]


@numba.njit(cache=True, fastmath=False)
def _walk_leaf(ids, keys, p, q, lo, hi, below, n, from_target, values, leaf, threshold):
    """The first token (rank order) of the leaf ids[lo:hi] whose running mass exceeds
    ``threshold``; the last one of positive mass if rounding leaves it unreached (-1: none)."""
    _leaf_values(ids, keys, p, q, lo, hi, below, n, from_target, values, leaf)
    acc, last = 0.0, -1
    for i in range(lo, hi):
        if values[i] > 0.0:
            acc += values[i]
            last = ids[i]
            if acc > threshold:
                return last
    return last


@numba.njit(cache=True, fastmath=False)
def _descend(ids, keys, p, q, lo, hi, key_lo, key_hi, below, n, leaf, from_target, threshold, work, parts):
    """From the set ids[lo:hi] down to its token at ``threshold`` of its mass: split, the parts'
    masses, the part where the running mass passes the threshold, ... to a leaf; -1 if none."""
    scratch, values = work[0], work[1]
    while not _is_leaf(lo, hi, key_lo, key_hi, leaf):
        shift = _split_shift(key_lo, key_hi)
        digits = ((key_hi - key_lo) >> shift) + 1
        _split(ids, keys, p, q, lo, hi, key_lo, shift, digits, parts, scratch)
        count, start, part_q, part_p, part_below, mass = parts
        for d in range(digits):
            mass[d] = part_p[d] if from_target or count[d] == 0 else -1.0
            if mass[d] < 0.0:
                part_lo, part_hi = _part_keys(key_lo, key_hi, shift, d)
                mass[d] = _set_mass(
                    ids, keys, p, q, start[d], start[d] + count[d], part_lo, part_hi,
                    below + part_below[d], part_q[d], part_p[d], n, leaf, work,
                )  # fmt: skip
        chosen, threshold = _choose(mass, 0, digits - 1, threshold)
        if chosen < 0:
            return -1
        lo, hi = start[chosen], start[chosen] + count[chosen]
        below += part_below[chosen]
        key_lo, key_hi = _part_keys(key_lo, key_hi, shift, chosen)
    return _walk_leaf(ids, keys, p, q, lo, hi, below, n, from_target, values, leaf, threshold)


@numba.njit(cache=True, fastmath=False, inline="always")
def _root_digit(key):
    """The root part of a key: 1/128 octaves of w in [2^-16, 2^16), the rest in the end parts."""
    return min(max((key >> _ROOT_SHIFT) - _ROOT_BASE, 0), _ROOT_PARTS - 1)


@numba.njit(cache=True, fastmath=False)
def _root_keys(d):
    """The key range of root part d."""
    first = (d + _ROOT_BASE) << _ROOT_SHIFT
    last = first + ((1 << _ROOT_SHIFT) - 1)
    return (0 if d == 0 else first), (_KEY_INF if d == _ROOT_PARTS - 1 else last)


@numba.njit(cache=True, fastmath=False)
def _gather(p, q, digits, wanted, root, out_ids, out_keys):
    """Copy the kept tokens of the root parts with wanted[d] (``digits`` [V]: each token's root
    part, _NOT_KEPT for q = 0 or p = 0) and their keys into out_ids, out_keys, grouped by part
    (in id order within a part); sets root[_START][d] for them."""
    part_count, part_start = root[_COUNT], root[_START]
    first = 0
    for d in range(wanted.size):
        if wanted[d]:
            part_start[d] = first
            first += part_count[d]
    for y in range(p.size):
        d = digits[y]
        if d != _NOT_KEPT and wanted[d]:
            out_ids[part_start[d]], out_keys[part_start[d]] = y, _key(p[y] / q[y])
            part_start[d] += 1
    for d in range(wanted.size):
        if wanted[d]:
            part_start[d] -= part_count[d]


@numba.njit(cache=True, fastmath=False)
def importance_residual_draw(p, q, rows, n, uniforms, tokens, leaf=LEAF):
    """y ~ resid(p, p_I) for the rows ``rows`` [R] of p, q [B, V] (p_I: the law of max-importance
    selection from n i.i.d. drafts) by inverse CDF at uniforms [R] along the rank order (weight
    p / q decreasing, ties by lower id; q = 0 tokens last, by id); y ~ p in the same order where
    the residual mass is <= EMPTY_MASS. Writes tokens [R]. ``leaf``: sets of at most this many
    tokens are summed token by token (a parameter for the tests; any value >= 1 gives the same
    law)."""
    root = _parts_table(_ROOT_PARTS + 1)  # zeroed between rows; the last slot: _NOT_KEPT
    tables = (
        _parts_table(_SPLIT),
        _parts_table(_SPLIT),
        np.empty((4, _STACK), dtype=np.int64),
        np.empty((3, _STACK)),
    )
    wanted = np.zeros(_ROOT_PARTS, dtype=np.bool_)
    digits = np.empty(p.shape[1], dtype=np.uint16)  # each token's root part (2 bytes: few pages)
    for r in range(rows.size):
        b = rows[r]
        tokens[r] = _draw_row(p[b], q[b], n, leaf, uniforms[r], root, tables, wanted, digits)


@numba.njit(cache=True, fastmath=False)
def _buffers(size, tables):
    """Gathered ids and keys, and the work tuple of ``_set_mass`` (counting-sort scratch, leaf
    values, its parts table, the stack), for ``size`` gathered tokens. Sized by what is gathered,
    not by V: a fresh page costs about as much as the arithmetic on it."""
    ids, keys = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
    scratch = (np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64))
    return ids, keys, (scratch, np.empty(size), tables[0], tables[2], tables[3])


@numba.njit(cache=True, fastmath=False, error_model="numpy")  # p / q where q = 0: set aside
def _root_parts(p, q, root, digits):
    """Step 1: each token's root part into digits [V] (_NOT_KEPT for q = 0 or p = 0), then count,
    q and p of the kept tokens per root part (two branch-free loops: the first vectorises, the
    second is a histogram). Returns (first, last root part in use, p(q = 0), q(p = 0))."""
    for y in range(p.size):
        kept = (q[y] > 0.0) & (p[y] > 0.0)
        digits[y] = _root_digit(_key(p[y] / q[y])) if kept else _NOT_KEPT
    root_count, root_q, root_p = root[_COUNT], root[_Q], root[_P]
    for y in range(p.size):  # the _NOT_KEPT slot collects p and q of the tokens set aside
        d = digits[y]
        root_count[d] += 1
        root_q[d] += q[y]
        root_p[d] += p[y]
    zero_q_mass, zero_p_q = 0.0, 0.0
    if root_count[_NOT_KEPT] > 0:
        for y in range(p.size):
            if digits[y] == _NOT_KEPT:
                zero_q_mass += p[y] if q[y] <= 0.0 else 0.0
                zero_p_q += q[y] if q[y] > 0.0 else 0.0
    first, last = _ROOT_PARTS, -1
    for d in range(_ROOT_PARTS):
        if root_count[d] > 0:
            first, last = min(first, d), d
    root_count[_NOT_KEPT], root_q[_NOT_KEPT], root_p[_NOT_KEPT] = 0, 0.0, 0.0
    return first, last, zero_q_mass, zero_p_q


@numba.njit(cache=True, fastmath=False)
def _bound_root_parts(root, first, last, zero_p_q, n, wanted):
    """Step 2 on the root parts (bottom of the order first): each part's A (_BELOW) and its mass
    where the bounds decide it, else -1 and ``wanted`` (an open part, gathered next). Returns
    (the decided mass, p of the kept tokens)."""
    root_count, root_q, root_p, root_below, root_mass = (
        root[_COUNT],
        root[_Q],
        root[_P],
        root[_BELOW],
        root[_MASS],
    )
    below, decided, p_mass = zero_p_q, 0.0, 0.0
    for d in range(first, last + 1):
        root_below[d] = below
        if root_count[d] > 0:
            key_lo, key_hi = _root_keys(d)
            root_mass[d] = _whole_set_mass(key_lo, key_hi, below, root_q[d], root_p[d], n)
            if root_mass[d] >= 0.0:
                decided += root_mass[d]
            wanted[d] = root_mass[d] < 0.0
        below += root_q[d]
        p_mass += root_p[d]
    return decided, p_mass


@numba.njit(cache=True, fastmath=False)
def _draw_row(p, q, n, leaf, u, root, tables, wanted, digits):
    """One row of ``importance_residual_draw`` (steps 1-3): a pass for the root parts, a scan
    of ``digits`` that gathers the open parts, their masses, the draw (one more scan if its part
    is not open). Leaves ``root`` and ``wanted`` zeroed."""
    root_count, root_q, root_p, root_mass = root[_COUNT], root[_Q], root[_P], root[_MASS]
    root_below = root[_BELOW]
    first, last, zero_q_mass, zero_p_q = _root_parts(p, q, root, digits)
    decided, p_mass = _bound_root_parts(root, first, last, zero_p_q, n, wanted)
    size = 0
    for d in range(first, last + 1):
        size += root_count[d] if wanted[d] else 0
    ids, keys, work = _buffers(size, tables)
    if size > 0:
        _gather(p, q, digits, wanted, root, ids, keys)
    kept_mass = decided
    for d in range(first, last + 1):
        if wanted[d]:
            lo = root[_START][d]
            key_lo, key_hi = _root_keys(d)
            root_mass[d] = _set_mass(
                ids, keys, p, q, lo, lo + root_count[d], key_lo, key_hi, root_below[d],
                root_q[d], root_p[d], n, leaf, work,
            )  # fmt: skip
            kept_mass += root_mass[d]
    from_target = kept_mass + zero_q_mass <= EMPTY_MASS
    if from_target:  # an empty residual: draw from p (as ``base.residual``)
        kept_mass = p_mass
        root_mass[first : last + 1] = root_p[first : last + 1]
    total = kept_mass + zero_q_mass
    token = -1
    if kept_mass > 0.0 and (u * total < kept_mass or zero_q_mass <= 0.0):  # step 3
        d, threshold = _choose(root_mass, first, last, u * total)
        if d >= 0:
            if not wanted[d]:  # a decided part: gather it
                wanted[first : last + 1] = False
                wanted[d] = True
                ids, keys, work = _buffers(root_count[d], tables)
                _gather(p, q, digits, wanted, root, ids, keys)
            lo = root[_START][d]
            key_lo, key_hi = _root_keys(d)
            token = _descend(
                ids, keys, p, q, lo, lo + root_count[d], key_lo, key_hi, root_below[d], n, leaf,
                from_target, threshold, work, tables[1],
            )  # fmt: skip
    if token < 0:
        token = _draw_unranked(p, q, u * total - kept_mass)
    if first <= last:  # leave the root table zeroed for the next row
        root_count[first : last + 1] = 0
        root_q[first : last + 1] = 0.0
        root_p[first : last + 1] = 0.0
        root_mass[first : last + 1] = 0.0
        wanted[first : last + 1] = False
    return token


@numba.njit(cache=True, fastmath=False)
def _draw_unranked(p, q, threshold):
    """The q = 0 tokens (residual p, ranked last) in id order, at ``threshold`` of their mass; if
    none has positive mass (rounding; probability ~0), the mode of p."""
    acc, token = 0.0, -1
    for y in range(p.size):
        if q[y] <= 0.0 and p[y] > 0.0:
            acc += p[y]
            token = y
            if acc > threshold:
                return token
    return token if token >= 0 else int(np.argmax(p))
