"""Compiled (numba) loops of the random-threshold fit (``mdsd.verifiers.optimal.threshold``):
the H* staircase walk (one step per H* token) and the peeling (one step per cut), which are
Python loops over up to the whole vocabulary in their references ``_staircase_walk_reference``
and ``_peel_reference``; and the priority scan's curve for the closed-form laws (``curve_scan``,
one pass where ``common.priority_scan_reference`` makes several numpy passes).

Same arithmetic in the same order (sequential prefix sums, first minimiser), so the results equal
the references' bit for bit (``tests/verifiers/test_optimal.py`` compares them). The intervals of
the peel are disjoint except for their shared ends, whose curve value is Phi there, so its
working arrays are indexed by absolute position instead of a copy per interval (``peel``).
"""

from __future__ import annotations

import numba
import numpy as np

from mdsd._race_numba import _power
from mdsd.verifiers.optimal._common_numba import keep_or_recover, others_mass, positions_in, priority_gather
from mdsd.verifiers.optimal._orders_numba import WITHOUT_REPLACEMENT, qall_window


@numba.njit(cache=True, error_model="numpy")
def peel(qs: np.ndarray, phi: np.ndarray, target: np.ndarray, tolerance: float):
    """(levels [K + 1], rate [K]) of the random-threshold mixture of chords of phi for target.

    ``_peel_reference``'s arithmetic in its order, with three kinds of work done once instead of
    once per interval (the peel of a language-model row is mostly a chain of intervals [lo, hi)
    that lose a few points at the right end, so per-interval passes make it O(K x depth)):

    - q prefix sums from lo are kept by absolute position: a left child [lo, cut) reuses its
      parent's (the same sequential sums); only a right child sums its own.
    - The elements of an interval share one rate value (every step adds to a whole interval,
      and intervals nest), carried on the stack and written once, when the interval ends.
    - The parent's curve update chord + excess / (1 - lam) is applied by each child in its own
      scan (chord and excess kept by absolute position; siblings' interiors are disjoint).

    Per interval one branch-free scan computes the curve, chord, excess and share of every
    interior point (vectorised: its divisions dominate), vectorised max / min reductions give
    the largest excess and the smallest share, and a last scan finds the first point with that
    share (the reference's first minimiser). error_model "numpy": no zero checks on divisions
    (a share divides only where room > excess >= 0)."""
    k = qs.size
    levels = np.ones(k + 1)
    levels[0] = 0.0
    levels[k] = 0.0
    rate = np.zeros(k)
    prefix = np.empty(k)  # prefix[lo + i] = q of positions lo..lo+i, for the interval being read
    chord = np.empty(k + 1)  # by absolute position: the last scan's chord and excess there
    excess = np.empty(k + 1)
    share = np.empty(k + 1)
    extremes = np.empty(2, dtype=np.int64)  # bits of the largest excess, the smallest share
    extremes_value = extremes.view(np.float64)
    depth = 2 * k + 2
    stack_lo = np.empty(depth, dtype=np.int64)
    stack_hi = np.empty(depth, dtype=np.int64)
    stack_offset = np.empty(depth)
    stack_scale = np.empty(depth)
    stack_base = np.empty(depth)  # the rate value every element of the interval has so far
    stack_lam = np.empty(depth)  # the parent's lam: its curve update (the root: 0)
    stack_left = np.empty(depth, dtype=np.bool_)  # a left child: the parent's prefix sums hold
    stack_lo[0], stack_hi[0], stack_offset[0], stack_scale[0] = 0, k, 0.0, 1.0
    chord[:] = target  # the root's curve: target + 0 / 1, the target exactly
    excess[:] = 0.0
    stack_base[0], stack_lam[0], stack_left[0] = 0.0, 0.0, False
    top = 1
    while top > 0:
        top -= 1
        lo, hi, offset, scale = stack_lo[top], stack_hi[top], stack_offset[top], stack_scale[top]
        base, parent_lam = stack_base[top], stack_lam[top]
        size = hi - lo
        if not stack_left[top]:
            acc = 0.0
            for i in range(lo, hi):  # q of positions lo..i, summed locally
                acc += qs[i]
                prefix[i] = acc
        mass = prefix[hi - 1]
        start, rise = phi[lo], phi[hi] - phi[lo]
        rho = rise / mass
        if size == 1:
            rate[lo] = base + scale * rho
            continue
        _scan(
            prefix[lo : hi - 1],
            phi[lo + 1 : hi],
            chord[lo + 1 : hi],
            excess[lo + 1 : hi],
            share[lo + 1 : hi],
            start,
            rise,
            mass,
            1.0 - parent_lam,
        )
        _extremes(excess, share, lo + 1, hi, extremes)
        largest, smallest = extremes_value[0], extremes_value[1]
        if largest <= tolerance:
            value = base + scale * rho
            for i in range(lo, hi):
                rate[i] = value
            continue
        cut = lo + 1 + _first_at_most(share[lo + 1 : hi], smallest, extremes[1])  # first minimiser
        lam = share[cut]
        step_base = base + scale * lam * rho
        levels[cut] = offset + scale * lam
        child_offset, child_scale = offset + scale * lam, scale * (1.0 - lam)
        stack_lo[top], stack_hi[top] = lo, cut
        stack_offset[top], stack_scale[top] = child_offset, child_scale
        stack_base[top], stack_lam[top], stack_left[top] = step_base, lam, True
        stack_lo[top + 1], stack_hi[top + 1] = cut, hi
        stack_offset[top + 1], stack_scale[top + 1] = child_offset, child_scale
        stack_base[top + 1], stack_lam[top + 1], stack_left[top + 1] = step_base, lam, False
        top += 2
    return levels, rate


@numba.njit(cache=True, error_model="numpy")
def _scan(prefix, phi, chord, excess, share, start, rise, mass, keep):
    """Chord, excess and share of an interval's interior points (views from its first interior
    point; prefix: q of the interval's positions up to the one before). The curve there is the
    parent's update chord + excess / keep (keep = 1 - the parent's lam; the root: the target)."""
    for i in range(share.size):  # zero-based views: the compiler vectorises this loop
        point = start + rise * (prefix[i] / mass)
        over = max(chord[i] + excess[i] / keep - point, 0.0)
        room = phi[i] - point
        chord[i] = point
        excess[i] = over
        # largest lam with excess <= (1 - lam) room; room <= excess means a touch: lam = 0
        share[i] = 1.0 - over / room if room > over else 0.0


@numba.njit(cache=True)
def _first_at_most(values, bound, bound_bits):
    """The first i with values[i] <= bound (values >= 0, bound their minimum, bound_bits its bits
    as int64), found from the right: the peel's minimiser is mostly near an interval's right
    end. The last such i is the first when no earlier value is <= bound (one vectorised pass
    over the bits checks); else a forward search."""
    last = values.size - 1
    while last > 0 and not values[last] <= bound:
        last -= 1
    bits = values.view(np.int64)
    earlier = 0
    for i in range(last):
        earlier += bits[i] <= bound_bits
    if earlier == 0:
        return last
    first = 0
    while not values[first] <= bound:
        first += 1
    return first


@numba.njit(cache=True)
def _extremes(excess, share, first, stop, out):
    """out [2] int64 = the bits of max(0, excess[first:stop]) and min(inf, share[first:stop]).
    Both are >= 0 (excess a max with 0, share 0 or 1 - over / room with 0 <= over < room), and
    the bits of non-negative doubles order as int64 do: integer reductions, which vectorise,
    give the exact values."""
    excess_bits, share_bits = excess.view(np.int64), share.view(np.int64)
    largest, smallest = np.int64(0), _INF_BITS
    for i in range(first, stop):
        largest = max(largest, excess_bits[i])
        smallest = min(smallest, share_bits[i])
    out[0], out[1] = largest, smallest


_INF_BITS = np.array([np.inf]).view(np.int64)[0]


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
