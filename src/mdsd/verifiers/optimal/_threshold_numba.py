"""Compiled (numba) loops of the random-threshold fit (``mdsd.verifiers.optimal.threshold``):
the H* staircase walk (one step per H* token) and the peeling (one step per cut), which are
Python loops over up to the whole vocabulary in their references ``_staircase_walk_reference``
and ``_peel_reference``; and the priority scan's curve for the closed-form laws (``curve_scan``,
one pass where ``common.priority_scan_reference`` makes several numpy passes).

The staircase walk and the curve scans do the references' arithmetic in the same order, so their
results equal the references' bit for bit; the peel finds the same intervals and cuts from each
interval's own ratio instead of the reference's rescaled remainder, so its levels and rates equal
the reference's to rounding (``tests/verifiers/test_optimal.py`` compares them all).
"""

from __future__ import annotations

import numba
import numpy as np

from mdsd._race_numba import _power
from mdsd.verifiers.optimal._common_numba import keep_or_recover, others_mass, positions_in, priority_gather
from mdsd.verifiers.optimal._orders_numba import WITHOUT_REPLACEMENT, qall_window


@numba.njit(cache=True, error_model="numpy")
def peel(qs: np.ndarray, phi: np.ndarray, target: np.ndarray, tolerance: float):
    """(levels [K + 1], rate [K]) of the random-threshold mixture of chords of phi for target:
    ``_peel_reference``'s intervals, cuts and levels from the interval alone (equal to rounding).

    The reference rescales the remainder curve at every step; written out, an interval [lo, hi]
    holding a share g of u has remainder - chord_Phi = (A - chord_A) / g there (both chords
    between lo and hi), so its cut is the interior boundary of largest ratio

        R = max_b (A_b - chord_A(b)) / (Phi_b - chord_Phi(b))      (Phi at or below its chord: inf)

    whatever the ancestors, its level is 1 - min(R, g) and both children hold the share
    min(R, g); the interval's own rule adds (g - min(R, g)) rho to its rates. Each interval
    takes R and its cut from an anchor table when one covers it (``_sweep``: one pass from an
    end, O(length log length), answers every interval sharing that end; built for the root's
    left end, whose chain of left children is most of the peel on smooth rows), else, for long
    intervals, by branch and bound over ranges of boundaries (``_bound_ratios``: rows that shrink
    at either end in turn), else by one vectorised pass over its interior (``_scan_ratios``; a
    left child reuses its parent's prefix sums of q). Rates are carried on the stack as one
    value per interval and written when it ends. Leaf: one unit, or R (Phi_hi - Phi_lo), a bound
    on the largest A - chord_A, within tolerance * g (R <= 0 included)."""
    k = qs.size
    levels = np.ones(k + 1)
    levels[0] = 0.0
    levels[k] = 0.0
    rate = np.empty(k)
    cum, cum_low = _compensated_prefix(qs)  # q before each boundary, as a sum of two doubles
    slope, phi_slope = np.empty(k), np.empty(k)  # of A and of Phi on each position
    for i in range(k):
        slope[i] = (target[i + 1] - target[i]) / qs[i]
        phi_slope[i] = (phi[i + 1] - phi[i]) / qs[i]
    rises, phi_rises = _rises(slope), _rises(phi_slope)
    best, ratios, spans = np.empty(k + 1, dtype=np.int64), np.empty(k + 1), np.empty(k + 1)
    hull_b, hull_a, hull_i = np.empty(k + 1), np.empty(k + 1), np.empty(k + 1, dtype=np.int64)
    _sweep(qs, phi, target, 0, k, best, ratios, spans, hull_b, hull_a, hull_i)
    # prefix[lo + i] = q of positions lo..lo+i, summed afresh for a scanned interval: exact where
    # ``_span`` is not (``_compensated_prefix``)
    prefix = np.empty(k)
    scan = np.empty(k + 1)
    depth = 2 * k + 2
    stack_lo = np.empty(depth, dtype=np.int64)
    stack_hi = np.empty(depth, dtype=np.int64)
    stack_share = np.empty(depth)  # g: the share of u the interval's rules hold
    stack_base = np.empty(depth)  # the rate every position of the interval has so far
    stack_flags = np.empty(depth, dtype=np.int64)  # _TABLE: the anchor table covers it; _PREFIX
    stack_lo[0], stack_hi[0], stack_share[0], stack_base[0], stack_flags[0] = 0, k, 1.0, 0.0, _TABLE
    top = 1
    while top > 0:
        top -= 1
        lo, hi, share, base, flags = (
            stack_lo[top],
            stack_hi[top],
            stack_share[top],
            stack_base[top],
            stack_flags[top],
        )
        if hi - lo == 1:
            rate[lo] = base + share * (phi[hi] - phi[lo]) / qs[lo]
            continue
        if flags & _TABLE:
            cut, ratio, mass = best[hi], ratios[hi], spans[hi]
        else:
            found = False
            mass = _span(cum, cum_low, lo, hi)
            if hi - lo >= _BOUND_MIN and mass > 0.0:
                curves = (cum, cum_low, phi, target, slope, phi_slope, rises, phi_rises)
                cut, ratio, found = _bound_ratios(curves, lo, hi, mass, _BOUND_BUDGET + (hi - lo) // 8)
            if not found:
                if not flags & _PREFIX:
                    acc = 0.0
                    for i in range(lo, hi):  # q of positions lo..i, summed locally
                        acc += qs[i]
                        prefix[i] = acc
                    flags |= _PREFIX
                mass = prefix[hi - 1]
                cut, ratio = _scan_ratios(prefix, phi, target, lo, hi, mass, scan)
        rho = (phi[hi] - phi[lo]) / mass
        # A - chord_A <= R (Phi - chord_Phi) <= R (Phi_hi - Phi_lo): within tolerance * g, a leaf
        if not ratio * (phi[hi] - phi[lo]) > tolerance * share:
            value = base + share * rho
            for i in range(lo, hi):
                rate[i] = value
            continue
        if ratio >= share:  # a touch (lam = 0): the first one, as the reference cuts there
            cut = _first_touch(cum, cum_low, phi, target, lo, hi, share, cut)
        kept = min(ratio, share)  # the children's share
        levels[cut] = 1.0 - kept
        step_base = base + (share - kept) * rho
        stack_lo[top], stack_hi[top], stack_share[top], stack_base[top] = lo, cut, kept, step_base
        stack_flags[top] = flags  # a left child: the same left end
        stack_lo[top + 1], stack_hi[top + 1], stack_share[top + 1], stack_base[top + 1] = (
            cut,
            hi,
            kept,
            step_base,
        )
        stack_flags[top + 1] = 0
        top += 2
    return levels, rate


_TABLE, _PREFIX = 1, 2
# Intervals from _BOUND_MIN units not covered by the anchor table try ``_bound_ratios`` before a
# scan, with a budget of _BOUND_BUDGET + length / 8 ranges (then the scan: at most about twice
# its cost wasted). On the bundled pair's rows without a top-k (thousands of units, intervals
# shrinking at either end in turn) it opens ~65 ranges an interval and never runs out.
_BOUND_MIN = 128
_BOUND_BUDGET = 64
_BOUND_LEAF = 4  # ranges of fewer boundaries are read one by one
_BOUND_SLACK = 1.0 - 1e-12  # a range is dropped when its bound is below the best by more than rounding


@numba.njit(cache=True, error_model="numpy")
def _first_touch(high, low, phi, target, lo, hi, share, cut):
    """The first interior boundary of [lo, hi] where the remainder reaches Phi, (A - chord_A) / g
    >= Phi - chord_Phi (g = ``share``), as ``_peel_reference`` cuts at the first point of share 0;
    ``cut`` where rounding finds none. Where Phi is flat to rounding (a peaked row's tail) the
    touches are many, and cutting at another than the first leaves the remainder above Phi
    between them."""
    mass = _span(high, low, lo, hi)
    target_slope = (target[hi] - target[lo]) / mass
    phi_slope = (phi[hi] - phi[lo]) / mass
    for b in range(lo + 1, hi):
        x = _span(high, low, lo, b)
        over = target[b] - target[lo] - target_slope * x
        if over >= share * (phi[b] - phi[lo] - phi_slope * x):
            return b
    return cut


@numba.njit(cache=True)
def _compensated_prefix(qs):
    """(high [K + 1], low [K + 1]): q of the positions before each boundary as high + low, the
    running sum with each addition's rounding error kept (Knuth's two-sum), so that ``_span``
    gives the q of an interval to about one rounding of itself plus the kept errors' own
    rounding, where the plain running sum gives an interval of a peaked row's tail
    (masses down to 1e-56) a q of 0. Not exact below that: a scan sums its interval's q
    afresh (``peel``'s prefix), which a tail of such masses needs (measured: a scan reading
    ``_span`` instead left fits of T = 0.1 rows uncertified)."""
    high, low = np.zeros(qs.size + 1), np.zeros(qs.size + 1)
    acc, error = 0.0, 0.0
    for i in range(qs.size):
        total = acc + qs[i]
        back = total - acc
        error += (acc - (total - back)) + (qs[i] - back)
        acc = total
        high[i + 1], low[i + 1] = acc, error
    return high, low


@numba.njit(cache=True)
def _span(high, low, a, b):
    """q of positions a..b-1 from ``_compensated_prefix``'s parts."""
    return (high[b] - high[a]) + (low[b] - low[a])


@numba.njit(cache=True)
def _rises(slopes):
    """rises[i] = sum over j <= i of max(slopes[j] - slopes[j - 1], 0): how far the slopes climb
    (0 throughout for a concave curve); the climb within positions a + 1..b is rises[b] - rises[a]."""
    rises = np.zeros(slopes.size)
    for i in range(1, slopes.size):
        rises[i] = rises[i - 1] + max(slopes[i] - slopes[i - 1], 0.0)
    return rises


@numba.njit(cache=True, error_model="numpy")
def _bound_ratios(curves, lo, hi, mass, budget):
    """(cut, R, found) of interval [lo, hi] by branch and bound over ranges of its interior
    boundaries: for the long intervals of rows that shrink at either end in turn, whose cut is
    mostly next to an end. curves: (the two parts of q before each boundary, ``_span``, Phi,
    A, the slopes of A and Phi, their rises).

    On a range [b0, b1] (x = q from lo), over = A - chord_A and room = Phi - chord_Phi are
    piecewise linear with slopes in an interval of width w <= s_b0 - s_(b1-1) + 2 climb (exactly
    s_b0 - s_(b1-1) where the curve is concave), so they differ from their own chords between b0
    and b1 by at most w (x_b1 - x_b0) / 4. Hence ratio <= (over chord + d_A) / (room chord - d_Phi),
    a ratio of two linear functions of x, largest at an end of the range. A range whose two end
    bounds are below the best ratio so far (the boundaries next to lo and hi first, then each
    opened range's ends) is dropped; others are halved down to ``_BOUND_LEAF`` boundaries, read
    one by one. found False: more than ``budget`` ranges opened (the caller scans)."""
    cum, cum_low, phi, target, slope, phi_slope, rises, phi_rises = curves
    target_slope = (target[hi] - target[lo]) / mass
    chord_slope = (phi[hi] - phi[lo]) / mass
    cut, best = lo + 1, _ratio_at(cum, cum_low, phi, target, lo, lo + 1, target_slope, chord_slope)
    right = _ratio_at(cum, cum_low, phi, target, lo, hi - 1, target_slope, chord_slope)
    if right > best:
        cut, best = hi - 1, right
    depth = 128  # two ranges a level, a level per halving
    stack_first, stack_last = np.empty(depth, dtype=np.int64), np.empty(depth, dtype=np.int64)
    stack_first[0], stack_last[0] = lo + 1, hi - 1
    top, opened = 1, 0
    while top > 0 and best < np.inf:
        top -= 1
        first, last = stack_first[top], stack_last[top]
        opened += 1
        if opened > budget:
            return cut, best, False
        if last - first < _BOUND_LEAF:
            for b in range(first, last + 1):
                value = _ratio_at(cum, cum_low, phi, target, lo, b, target_slope, chord_slope)
                if value > best:
                    cut, best = b, value
            continue
        x0, x1 = _span(cum, cum_low, lo, first), _span(cum, cum_low, lo, last)
        over0 = target[first] - target[lo] - target_slope * x0
        over1 = target[last] - target[lo] - target_slope * x1
        over_gap = (
            0.25 * (x1 - x0) * (slope[first] - slope[last - 1] + 2.0 * (rises[last - 1] - rises[first]))
        )
        room_gap = (
            0.25
            * (x1 - x0)
            * (phi_slope[first] - phi_slope[last - 1] + 2.0 * (phi_rises[last - 1] - phi_rises[first]))
        )
        room0 = phi[first] - phi[lo] - chord_slope * x0 - room_gap
        room1 = phi[last] - phi[lo] - chord_slope * x1 - room_gap
        if (
            room0 > 0.0
            and room1 > 0.0
            and over0 + over_gap <= best * room0 * _BOUND_SLACK
            and over1 + over_gap <= best * room1 * _BOUND_SLACK
        ):
            continue
        for b in (first, last):
            value = _ratio_at(cum, cum_low, phi, target, lo, b, target_slope, chord_slope)
            if value > best:
                cut, best = b, value
        middle = (first + last) // 2
        stack_first[top], stack_last[top] = first, middle
        stack_first[top + 1], stack_last[top + 1] = middle, last
        top += 2
    return cut, best, True


@numba.njit(cache=True, error_model="numpy")
def _ratio_at(high, low, phi, target, lo, b, target_slope, chord_slope):
    """The ratio of boundary b of an interval from lo (its chords' slopes given), clipped at 0 as
    in ``_scan_ratios``; inf where Phi is at or below its chord (a touch)."""
    x = _span(high, low, lo, b)
    over = target[b] - target[lo] - target_slope * x
    room = phi[b] - phi[lo] - chord_slope * x
    return max(over / room, 0.0) if room > 0.0 else np.inf


@numba.njit(cache=True, error_model="numpy")
def _scan_ratios(prefix, phi, target, lo, hi, mass, ratios):
    """(cut, R) of interval [lo, hi] by one pass over its interior (prefix: q from lo): the
    ratios clipped at 0 (R <= 0 is a leaf), inf where Phi is at or below its chord; the largest
    by its bits (non-negative doubles order as int64 do, a vectorised reduction), then the last
    boundary holding it (cuts fall mostly near an interval's right end)."""
    target_slope = (target[hi] - target[lo]) / mass
    phi_slope = (phi[hi] - phi[lo]) / mass
    target_lo, phi_lo = target[lo], phi[lo]
    for b in range(lo + 1, hi):
        x = prefix[b - 1]
        over = target[b] - target_lo - target_slope * x
        room = phi[b] - phi_lo - phi_slope * x
        ratios[b] = max(over / room, 0.0) if room > 0.0 else np.inf
    bits = ratios.view(np.int64)
    largest = np.int64(0)
    for b in range(lo + 1, hi):
        largest = max(largest, bits[b])
    cut = hi - 1
    while bits[cut] != largest:
        cut -= 1
    return cut, ratios[cut]


@numba.njit(cache=True, error_model="numpy")
def _sweep(qs, phi, target, anchor, stop, best, ratios, spans, hull_b, hull_a, hull_i):
    """Anchor table of the intervals [anchor, e], e = anchor + 1..stop: best[e] and ratios[e] the
    cut and R of ``peel`` (best -1 for e = anchor + 1, no interior), spans[e] their q.

    With slopes from the anchor, b_i = (Phi_i - Phi_anchor) / q(anchor..i) and a_i the same of
    A, the ratio of boundary i in [anchor, e] is (a_i - a_e) / (b_i - b_e): the slope from point
    (b_e, a_e) to (b_i, a_i). Phi concave makes b decrease with i, so each new end lies left of
    the earlier points and the largest slope is its tangent to their upper convex hull (a binary
    search); the end then joins the hull. An end at or right of the hull's leftmost point has
    a boundary with Phi at or below the chord (a touch: R = inf, cut there); where Phi is not
    concave such a point is inserted in its place (``_insert``)."""
    size = 0
    dist = 0.0
    e = anchor
    while e < stop:
        dist += qs[e]
        e += 1
        spans[e] = dist
        b = (phi[e] - phi[anchor]) / dist
        a = (target[e] - target[anchor]) / dist
        if size == 0:
            best[e], ratios[e] = -1, -np.inf
        elif b >= hull_b[size - 1]:
            best[e], ratios[e] = hull_i[size - 1], np.inf
        else:
            t = _tangent(hull_b, hull_a, size, b, a)
            best[e], ratios[e] = hull_i[t], (hull_a[t] - a) / (hull_b[t] - b)
        size = _insert(hull_b, hull_a, hull_i, size, b, a, e)


@numba.njit(cache=True)
def _tangent(hull_b, hull_a, size, b, a):
    """The hull vertex of largest slope from (b, a), left of every vertex. Vertices by b
    decreasing (the last is leftmost); that slope rises, then falls, along the hull: the last
    vertex t whose edge to its right neighbour is no steeper than the slope from (b, a) to it."""
    first, last = 0, size - 1
    while first < last:
        mid = (first + last + 1) // 2
        edge = (hull_a[mid - 1] - hull_a[mid]) * (hull_b[mid] - b)
        if edge <= (hull_a[mid] - a) * (hull_b[mid - 1] - hull_b[mid]):
            first = mid
        else:
            last = mid - 1
    return first


@numba.njit(cache=True)
def _below(b0, a0, b1, a1, b2, a2):
    """Point 1 on or below the segment from point 0 to point 2 (b0 < b1 < b2)."""
    return (a1 - a0) * (b2 - b0) <= (a2 - a0) * (b1 - b0)


@numba.njit(cache=True)
def _drop(hull_b, hull_a, hull_i, size, k):
    """Remove vertex k; the new size."""
    for i in range(k, size - 1):
        hull_b[i], hull_a[i], hull_i[i] = hull_b[i + 1], hull_a[i + 1], hull_i[i + 1]
    return size - 1


@numba.njit(cache=True)
def _insert(hull_b, hull_a, hull_i, size, b, a, e):
    """Add point (b, a) of boundary e to the upper hull (vertices by b decreasing); the new size.
    A new leftmost point (Phi concave) drops the vertices it hides from the left end; otherwise
    it goes to its place in b, unless on or below the hull, and drops the hidden ones on both
    sides."""
    if size == 0 or b < hull_b[size - 1]:
        while size >= 2 and _below(
            b, a, hull_b[size - 1], hull_a[size - 1], hull_b[size - 2], hull_a[size - 2]
        ):
            size -= 1
        hull_b[size], hull_a[size], hull_i[size] = b, a, e
        return size + 1
    k = 0
    while hull_b[k] > b:
        k += 1
    if hull_b[k] == b:
        if a <= hull_a[k]:
            return size
        size = _drop(hull_b, hull_a, hull_i, size, k)
    if 0 < k < size and _below(hull_b[k], hull_a[k], b, a, hull_b[k - 1], hull_a[k - 1]):
        return size
    for i in range(size, k, -1):
        hull_b[i], hull_a[i], hull_i[i] = hull_b[i - 1], hull_a[i - 1], hull_i[i - 1]
    hull_b[k], hull_a[k], hull_i[k] = b, a, e
    size += 1
    while k + 2 < size and _below(hull_b[k + 2], hull_a[k + 2], hull_b[k + 1], hull_a[k + 1], b, a):
        size = _drop(hull_b, hull_a, hull_i, size, k + 1)
    while k >= 2 and _below(b, a, hull_b[k - 1], hull_a[k - 1], hull_b[k - 2], hull_a[k - 2]):
        size = _drop(hull_b, hull_a, hull_i, size, k - 1)
        k -= 1
    return size


@numba.njit(cache=True)
def staircase_walk(s, qs, tail_q, phi, ahead, cap, split, ratio, curve, new_run) -> bool:
    """The walk of ``_staircase_walk_reference`` on H* = positions split..K-1; writes curve
    [K + 1] and new_run [K] in place (copies of the target and run ids) and returns True when a
    staircase formed (False: the caller keeps the target)."""
    k = qs.size
    step, step_rate, surplus = 2, s[split], 0.0
    for j in range(split, k):
        rest_rate = (1.0 - curve[j]) / tail_q[j]  # one last step from j on
        if j > split and s[j] <= rest_rate and rest_rate <= step_rate and curve[j] <= phi[j]:
            last = curve[k]
            acc = 0.0
            for i in range(j, k):
                new_run[i] = step + 1
                acc += qs[i]
                curve[i + 1] = curve[j] + rest_rate * acc
            curve[k] = last
            return True
        if j > split and not (
            step_rate <= ratio * s[j] and surplus + (step_rate - s[j]) * qs[j] <= min(ahead[j + 1], cap)
        ):
            step, step_rate = step + 1, s[j]
        surplus += (step_rate - s[j]) * qs[j]
        curve[j + 1] = curve[j] + step_rate * qs[j]
        new_run[j] = step
        if curve[j + 1] > phi[j + 1]:
            return False
    return False


@numba.njit(cache=True)
def target_curve(ps, qs, s, tail_q, phi, split):
    """(A [K + 1], run ids [K]) of ``threshold._target_curve``: rates min(s, c) on L and
    max(s, mu) on H*; run 0 / 1 where the rate is c / mu (clipped), -1 elsewhere.
    s = p/q [K]; tail_q [K]: q of positions >= j."""
    k = qs.size
    run = np.full(k, -1, dtype=np.int64)
    target = np.empty(k + 1)
    target[0] = 0.0
    if split > 0:
        total_p = 0.0
        for i in range(split):
            total_p += ps[i]
        c, cum_q, cum_p = -np.inf, 0.0, 0.0
        for i in range(split):  # c = max_j (D_m + P_j) / Q_j, P_j = p of positions > j in L
            cum_q += qs[i]
            cum_p += ps[i]
            c = max(c, (phi[split] - (total_p - cum_p)) / cum_q)
        acc = 0.0
        for i in range(split):
            rate = s[i]
            if s[i] > c:
                rate, run[i] = c, 0
            acc += rate * qs[i]
            target[i + 1] = acc
    if split < k:
        mu, head_p = np.inf, 0.0
        for i in range(split, k):  # mu = min_j (1 - Phi_m - (P_j - P_m)) / q(tail_j)
            mu = min(mu, ((1.0 - phi[split]) - head_p) / tail_q[i])
            head_p += ps[i]
        acc = 0.0
        for i in range(split, k):
            rate = s[i]
            if s[i] < mu:
                rate, run[i] = mu, 1
            acc += rate * qs[i]
            target[i + 1] = phi[split] + acc
    target[split], target[k] = phi[split], 1.0
    return target, run


# A staircase of at most this many steps on H* is taken as it is; one with more makes the walk try
# the next step ratio (``threshold.STAIR_RATIOS``) and keep the staircase with the fewest steps.
STAIR_FEW_STEPS = 64


@numba.njit(cache=True)
def staircase_steps(run, split):
    """Units of H* (positions split..K-1) that ``fit_levels``' lumping leaves for run ids ``run``."""
    units = 1
    for i in range(split + 1, run.size):
        units += not (run[i] == run[i - 1] and run[i] >= 0)
    return units


@numba.njit(cache=True)
def staircase(ps, qs, s, tail_q, phi, split, target, run, margin, ratios, shares):
    """``threshold._staircase``: for each step ratio in turn, the walk with each share of the slack
    in turn until one forms; the first staircase of at most ``STAIR_FEW_STEPS`` steps, else the
    one with the fewest; (curve, run ids), the inputs themselves when none forms."""
    k = qs.size
    if k - split < 3:
        return target, run
    slack = target[k] - phi[split]
    for i in range(split, k):
        slack -= ps[i]
    mu_start = k
    for i in range(k):
        if run[i] == 1:
            mu_start = i
            break
    ahead = (phi - target) * (1.0 - margin) - margin  # the room Phi - A, with a margin
    for i in range(mu_start - 1, split - 1, -1):  # smallest room still ahead, up to the mu-region
        ahead[i] = min(ahead[i], ahead[i + 1])
    curve, new_run = np.empty(k + 1), np.empty(k, dtype=np.int64)
    best_curve, best_run, best_steps = target, run, -1
    for ratio in ratios:
        for share in shares:
            cap = share * max(slack, 0.0)
            curve[:] = target
            new_run[:] = run
            if staircase_walk(s, qs, tail_q, phi, ahead, cap, split, ratio, curve, new_run):
                steps = staircase_steps(new_run, split)
                if best_steps < 0 or steps < best_steps:
                    best_curve, best_run, best_steps = curve.copy(), new_run.copy(), steps
                break
        if 0 <= best_steps <= STAIR_FEW_STEPS:
            break
    return best_curve, best_run


@numba.njit(cache=True)
def fit_levels(ps, qs, phi, split, chord_tolerance, margin, ratios, shares):
    """(levels [K + 1], rate [K]) of the random-threshold fit from the priority scan: the target
    curve, the H* staircase, the lossless lumping of runs with one rate, the peel."""
    k = qs.size
    s = ps / qs
    tail_q = np.empty(k)  # q of positions >= j, summed from the end
    acc = 0.0
    for i in range(k - 1, -1, -1):
        acc += qs[i]
        tail_q[i] = acc
    target, run = target_curve(ps, qs, s, tail_q, phi, split)
    target, run = staircase(ps, qs, s, tail_q, phi, split, target, run, margin, ratios, shares)
    cuts = np.empty(k + 1, dtype=np.int64)
    cuts[0], count = 0, 1
    for i in range(1, k):  # a cut wherever the run changes or a unit stands on its own
        if not (run[i] == run[i - 1] and run[i] >= 0):
            cuts[count] = i
            count += 1
    cuts[count] = k
    count += 1
    coarse_q = np.zeros(count - 1)
    for c in range(count - 1):
        for i in range(cuts[c], cuts[c + 1]):
            coarse_q[c] += qs[i]
    coarse_phi, coarse_target = np.empty(count), np.empty(count)
    for c in range(count):
        coarse_phi[c], coarse_target[c] = phi[cuts[c]], target[cuts[c]]
    coarse_levels, coarse_rate = peel(coarse_q, coarse_phi, coarse_target, chord_tolerance)
    levels = np.ones(k + 1)
    rate = np.empty(k)
    for c in range(count - 1):
        levels[cuts[c]] = coarse_levels[c]
        for i in range(cuts[c], cuts[c + 1]):
            rate[i] = coarse_rate[c]
    levels[k] = coarse_levels[count - 1]
    return levels, rate


@numba.njit(cache=True)
def curve_scan(ps, qs, n, others):
    """(phi [K + 1], split, alpha, cum_mass [K + 1]) of ``common.priority_scan`` for i.i.d.
    drafts (others empty: Qall(H) = q(H)^n) or two drafts without replacement (others = 1 - q
    of the reversed order, ``laws.others_mass``: the closed form ``two_draft_qall_prefixes``).

    One pass over the reversed order (H_j = the last j positions) sums p(H_j), q(H_j) and the
    law's Qall(H_j) left to right as ``bound.prefix_scan`` does and keeps the first minimiser of
    p(H_j) - Qall(H_j); Phi_k = 1 - Qall(H_{K-k}), clipped to [0, 1] and made nondecreasing;
    cum_mass = q of the first k positions, summed from the front. Same operations in the same
    order as the numpy composition, so the same numbers (tested)."""
    k = qs.size
    pair = others.size > 0
    qall = np.empty(k + 1)
    qall[0] = 0.0
    best, value = 0, 0.0
    p_acc, q_acc, before_q, before_odds, pair_acc = 0.0, 0.0, 0.0, 0.0, 0.0
    for j in range(k):
        i = k - 1 - j  # the position added to H
        p_acc += ps[i]
        if pair:  # Qall grows by q_b (sum_{a in H} q_a / (1 - q_a) + q(H) / (1 - q_b))
            pair_acc += qs[i] * (before_odds + before_q / others[j])
            before_q += qs[i]
            before_odds += qs[i] / others[j]
            q_acc = min(pair_acc, 1.0)
        else:
            before_q += qs[i]
            q_acc = _power(min(before_q, 1.0), n)
        qall[j + 1] = q_acc
        f = p_acc - q_acc
        if f < value:
            best, value = j + 1, f
    phi, cum_mass = _curve_and_prefix(qall, qs)
    return phi, k - best, 1.0 + value, cum_mass


@numba.njit(cache=True)
def wor_curve_scan(ps, qs, n, race):
    """``curve_scan`` for three or more drafts without replacement (the order split): Qall of
    every prefix of the reversed order by ``_orders_numba.qall_window`` (the closed form for three
    draws on up to ``THREE_DRAFT_CLOSED_MAX`` tokens, as ``laws.WithoutReplacement.qall_prefixes``;
    else the race quadrature at ``race``, ``_orders_numba.race_settings``), p(H_j) summed left to
    right, the first minimiser of p(H_j) - Qall(H_j), then Phi and the prefix masses as
    ``curve_scan``."""
    k = qs.size
    qall = qall_window(qs[::-1].copy(), n, WITHOUT_REPLACEMENT, 0, k, race)
    best, value, p_acc = 0, 0.0, 0.0
    for j in range(k):
        p_acc += ps[k - 1 - j]
        f = p_acc - qall[j + 1]
        if f < value:
            best, value = j + 1, f
    phi, cum_mass = _curve_and_prefix(qall, qs)
    return phi, k - best, 1.0 + value, cum_mass


@numba.njit(cache=True)
def _curve_and_prefix(qall, qs):
    """(Phi [K + 1], cum_mass [K + 1]) from Qall of the reversed order's prefixes [K + 1]:
    Phi_k = 1 - Qall(H_{K-k}) clipped to [0, 1] and made nondecreasing (Phi_0 = 0, Phi_K = 1);
    cum_mass = q of the first k positions, summed from the front."""
    k = qs.size
    phi = np.empty(k + 1)
    phi[0] = 0.0
    running = 0.0
    for m in range(1, k):
        running = max(running, min(max(1.0 - qall[k - m], 0.0), 1.0))
        phi[m] = running
    phi[k] = max(running, 1.0)
    cum_mass = np.empty(k + 1)
    cum_mass[0] = 0.0
    acc = 0.0
    for m in range(k):
        acc += qs[m]
        cum_mass[m + 1] = acc
    return phi, cum_mass


# A share below -SHARE_TOLERANCE * alpha is not rounding (``order_split_shares`` raises).
SHARE_TOLERANCE = 1e-9


@numba.njit(cache=True)
def order_split_shares(draft_q, inside, rest):
    """(b0, b1) [n]: draft i of a set drawn without replacement is picked with probability
    b0_i + alpha * b1_i when the drafts ``inside`` (bool [n], at least one) share the first group
    met G = [a, b), alpha = q(U_b) / q(G) >= 1; draft_q [n]: q of the drafts, ``rest``: the mass
    of every other token.

    Over each order sigma in which the set could have been drawn, with probability
    P(sigma) = prod_i q_{sigma_i} / (1 - q(sigma_<i)): if the last draw and an earlier one lie in
    G, weight alpha on the first drawn of G and 1 - alpha on the last draw; otherwise pick the
    first drawn of G. The shares are these weights averaged over the orders given the set
    (docs/optimal.md, "The order split"; checked against the plain average over the n! orders
    and by enumeration in tests/verifiers/test_optimal.py). For two drafts it is the pair split.

    prod q is common to all orders and cancels; 1 - q(sigma_<i) is the mass of the draws still to
    come, ``rest`` + q(S) for the set S of the remaining drafts (no cancellation for tiny
    masses). The sum over orders runs over subsets (bit masks): an order is its prefix Q of
    drafts outside G, then the first drawn g of G, then an order of the rest T ending in some
    draft. ``forward[Q]`` sums the prefix factors over the orders of Q, ``outside[T]`` the factors
    of the orders of T that end outside G, ``ending[j, T]`` those that end in the j-th draft of G
    (one row of 2^n per draft of G, read within the row): O(2^n n (m + 1)) for m drafts in G.
    Every factor of sets of k drafts is scaled by the same c_k = ``rest`` + the k smallest masses
    (each order has one factor per k), so the factors are at most 1 and the order drawing the
    largest masses first has weight 1: no overflow.

    The shares are probabilities for every alpha the set allows (docs/optimal.md, "Why the
    shares are probabilities"): alpha - 1 = q(U_a) / q(G) <= rest / q(drafts in G), and a share
    is affine in alpha, so they are checked at that bound as a guard against a wrong computation:
    a share below -SHARE_TOLERANCE * alpha there (rounding stays below 1e-14 alpha) raises
    ValueError (``shares_are_probabilities``) instead of giving a wrong law."""
    n = draft_q.size
    full = (1 << n) - 1
    factor = _order_factors(draft_q, rest)
    group, m, mass_in = 0, 0, 0.0
    members = np.empty(n, dtype=np.int64)  # the drafts in G
    for i in range(n):
        if inside[i]:
            group |= 1 << i
            members[m] = i
            m += 1
            mass_in += draft_q[i]
    outside = np.zeros(full + 1)  # orders of T ending outside G
    _last_draw_factors(factor, full ^ group, 0, outside)
    ending = np.zeros((m, full + 1))  # orders of T ending in the j-th draft of G
    for j in range(m):
        last = 1 << members[j]
        _last_draw_factors(factor, last, last, ending[j])
    forward = np.zeros(full + 1)  # orders of the prefix Q (outside G), before g is drawn
    forward[0] = 1.0
    b0, b1 = np.zeros(n), np.zeros(n)
    for prefix in range(full + 1):
        if prefix & group:
            continue
        if prefix:
            total, bits = 0.0, prefix
            while bits:  # the last of Q drawn
                low = bits & -bits
                total += forward[prefix ^ low] * factor[full ^ prefix ^ low]
                bits ^= low
            forward[prefix] = total
        remaining = full ^ prefix
        base = forward[prefix] * factor[remaining]  # g drawn next
        for g in members[:m]:
            after = remaining ^ (1 << g)
            if after == 0:
                b0[g] += base
                continue
            b0[g] += base * outside[after]
            for j in range(m):  # alpha on g, 1 - alpha on the last draw
                last = members[j]
                if last != g and (after >> last) & 1:
                    weight = base * ending[j, after]
                    b0[last] += weight
                    b1[g] += weight
                    b1[last] -= weight
    total = b0.sum()
    b0, b1 = b0 / total, b1 / total
    alpha_bound = 1.0 + rest / mass_in
    if not shares_are_probabilities(b0, b1, alpha_bound):
        raise ValueError(
            "verifier 'optimal': the order split computed a negative pick probability beyond "
            "rounding (its shares are proved nonnegative, docs/optimal.md): a bug, please report "
            "the inputs"
        )
    return b0, b1


@numba.njit(cache=True)
def _last_draw_factors(factor, ends, fixed, out):
    """out[T] = the summed factors of the orders of T whose last draw is in ``ends`` (bit
    masks), for the sets T that hold every draft of ``fixed`` (``fixed`` = the one last draft,
    or 0): a single draft is its own order; else out[T] = factor[T] times the sum, over the
    first draw f of T (``fixed`` excluded), of out[T without f]. Other entries stay as they are."""
    for subset in range(1, out.size):
        if subset & fixed != fixed:
            continue
        if subset == subset & -subset:  # one draft
            out[subset] = factor[subset] if subset & ends else 0.0
            continue
        total, bits = 0.0, subset ^ fixed
        while bits:  # the first of T drawn
            low = bits & -bits
            total += out[subset ^ low]
            bits ^= low
        out[subset] = factor[subset] * total


@numba.njit(cache=True)
def _order_factors(draft_q, rest):
    """c_|S| / (rest + q(S)) for every subset S of the drafts (bit masks; entry 0 unused): the
    factor of an order when the draws still to come are S, scaled by c_k = ``rest`` + the k
    smallest masses."""
    n = draft_q.size
    full = (1 << n) - 1
    mass = np.zeros(full + 1)  # q of each subset
    size = np.zeros(full + 1, dtype=np.int64)
    for subset in range(1, full + 1):
        i = 0
        while not (subset >> i) & 1:
            i += 1
        mass[subset] = mass[subset & (subset - 1)] + draft_q[i]
        size[subset] = size[subset & (subset - 1)] + 1
    smallest = np.sort(draft_q)
    scale = np.empty(n + 1)  # c_k
    scale[0] = rest
    for k in range(1, n + 1):
        scale[k] = scale[k - 1] + smallest[k - 1]
    factor = np.zeros(full + 1)
    for subset in range(1, full + 1):
        factor[subset] = scale[size[subset]] / (rest + mass[subset])
    return factor


@numba.njit(cache=True)
def shares_are_probabilities(b0, b1, alpha_bound):
    """Whether b0 + alpha b1 >= -SHARE_TOLERANCE * alpha_bound for alpha = 1 and alpha_bound
    (hence for every alpha between: a share is affine in alpha)."""
    floor = -SHARE_TOLERANCE * alpha_bound
    for i in range(b0.size):
        if b0[i] + b1[i] < floor or b0[i] + alpha_bound * b1[i] < floor:
            return False
    return True


@numba.njit(cache=True)
def rest_mass(qs, pos):
    """q of the positions not in ``pos`` (a draft set's positions), summed from the front."""
    taken = np.zeros(qs.size, dtype=np.bool_)
    for i in pos:
        taken[i] = True
    total = 0.0
    for i in range(qs.size):
        if not taken[i]:
            total += qs[i]
    return total


@numba.njit(cache=True)
def _group_alpha(levels, cum_mass, first, end, u):
    """alpha = Q_end / (Q_end - Q_a) of the group [a, end) holding position ``first`` at the
    threshold u: a the last boundary at or before ``first`` with level <= u (levels[0] = 0)."""
    start = first
    while levels[start] > u:
        start -= 1
    return cum_mass[end] / (cum_mass[end] - cum_mass[start])


@numba.njit(cache=True)
def order_split_pick(qs, levels, cum_mass, pos, end, u, u_pick):
    """The position picked by the order split at (u, u_pick) when two or more of the drafts at
    positions ``pos`` [n] (draw order) lie in the group [a, end) of the first one: a the last
    boundary at or before the first draft with level <= u, alpha = Q_end / (Q_end - Q_a)."""
    alpha = _group_alpha(levels, cum_mass, pos.min(), end, u)
    b0, b1 = order_split_shares(qs[pos], pos < end, rest_mass(qs, pos))
    cumulative = np.cumsum(b0 + alpha * b1)
    target = u_pick * cumulative[-1]
    for i in range(pos.size - 1):
        if cumulative[i] > target:
            return pos[i]
    return pos[pos.size - 1]


@numba.njit(cache=True)
def threshold_node(
    p, q, n, without_replacement, drafts, uniforms, chord_tolerance, margin, ratios, shares, race
):
    """The emitted token of one node: ``threshold.fit_threshold_row`` then
    ``threshold.pick_threshold_row`` at uniforms [4], step for step (the same numbers).

    p, q: [V]; n drafts, i.i.d. or (without_replacement) two without replacement, whose curve and
    pair split use 1 - q (``_common_numba.others_mass``), or three or more without replacement
    (Qall of every prefix at the race settings ``race``, ``wor_curve_scan``, and the order split,
    ``order_split_pick``); drafts: [n] token ids in draw order."""
    order, ps, qs = priority_gather(p, q)
    none = np.zeros(0)
    split_order = without_replacement and n >= 3  # the order split (``common.splits_by_order``)
    pair = without_replacement and n == 2
    if split_order:
        phi, split, _, cum_mass = wor_curve_scan(ps, qs, n, race)
    else:
        scan_others = others_mass(qs[::-1].copy()) if pair else none
        phi, split, _, cum_mass = curve_scan(ps, qs, n, scan_others)
    pair_others = others_mass(qs) if pair else none
    levels, rate = fit_levels(ps, qs, phi, split, chord_tolerance, margin, ratios, shares)
    count = drafts.size
    pos = positions_in(order, drafts)  # priority position of each draft, in draw order
    first, last = pos.min(), pos.max()
    u = uniforms[0]
    end = first + 1  # the first boundary after the first draft whose level is <= u
    while levels[end] > u:
        end += 1
    inside = 0
    for d in range(count):
        inside += pos[d] < end
    if split_order and inside >= 2:
        chosen = order_split_pick(qs, levels, cum_mass, pos, end, u, uniforms[1])
    elif pair and last < end and pos[0] != pos[1]:
        alpha = _group_alpha(levels, cum_mass, first, end, u)
        c_y, c_z = 1.0 / pair_others[first], 1.0 / pair_others[last]
        chosen = first if uniforms[1] * (c_y + c_z) < c_z + alpha * (c_y - c_z) else last
    else:
        chosen = first
        for d in range(count):  # the earliest draw inside the group
            if pos[d] < end:
                chosen = pos[d]
                break
    return keep_or_recover(p, order, qs * rate, chosen, uniforms[2], uniforms[3])
