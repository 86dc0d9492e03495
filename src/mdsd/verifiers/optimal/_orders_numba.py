"""Compiled priority-order fits (the fast path of ``mdsd.verifiers.optimal.priority_orders.decompose``
with ``order_vertex``) for the two laws fitted by priority orders: drafts without replacement
(n >= 3) and conditional Poisson.

The same algorithm, step for step (the affine minimiser by an updated Cholesky factor where the
reference solves a KKT system: the same weights to rounding): Wolfe's minimum-norm point over the
coverage polytope of one block, each greedy vertex one Qall scan over the order [R, sigma
reversed, B]: for three drafts without replacement on up to ``THREE_DRAFT_CLOSED_MAX`` tokens the
closed form of ``mdsd._wor_numba``; for other drafts without replacement the exponential-race quadrature
(``mdsd._race_numba.race_window``) with the nodes of ``mdsd._race.wor_qall_window``'s numba path
(``race_nodes_fast`` below mirrors ``mdsd._race.fast_nodes`` and its right-cut pruning; within one
Wolfe run the race's state after the tokens every vertex scans first is kept and resumed,
``wor_window_cached``); for
conditional Poisson the prefix elementary symmetric polynomials (``mdsd._esp_numba.prefix_log_en``),
as ``ConditionalPoisson.qall_prefixes``.
Running the whole loop compiled removes the per-iteration Python work (an argsort, a vertex scan's
setup, the Gram update and the affine minimiser), which dominated a fit at top-k 64 (docs/optimal.md,
"Priority orders"). Tests compare every vertex and the decomposition with the Python reference.

Shapes: q over the block's support (float64 [K], sums to 1); rest, block, before: int64 index
arrays into it; orders are rows of indices into ``block``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from mdsd._esp_numba import prefix_log_en
from mdsd._race_numba import RESUME, SAVE, candidate_window, race_prefix_state, race_window, race_window_from
from mdsd._wor_numba import three_draft_qall
from mdsd.bound import CANDIDATE_SLACK
from mdsd.laws import THREE_DRAFT_CLOSED_MAX
from mdsd.verifiers.optimal._common_numba import keep_or_recover, numpy_sum, positions_in, priority_gather
from mdsd.verifiers.optimal.priority_orders import DEPENDENT

WITHOUT_REPLACEMENT, CONDITIONAL_POISSON = 0, 1  # law codes
LAW_CODES = {"without_replacement": WITHOUT_REPLACEMENT, "conditional_poisson": CONDITIONAL_POISSON}


@numba.njit(cache=True, fastmath=False)
def race_nodes_fast(min_rate, n, step, fast_tail, right_cut):
    """Nodes u_j = step * j of ``mdsd._race.fast_nodes`` with the right-cut pruning of
    ``_wor_qall_window_numba`` (nodes with t min_rate > right_cut carry no weight), and the parity
    of the first node's grid index."""
    log_left = math.log(fast_tail) + math.lgamma(n + 1) + math.log(-math.expm1(-(n + 1) * step) / step)
    u_lo = log_left / (n + 1)
    u_hi = math.log(right_cut / min_rate)
    j_lo = math.floor(u_lo / step)
    j_hi = max(math.ceil(u_hi / step), j_lo + 1)
    u = step * np.arange(j_lo, j_hi + 1).astype(np.float64)
    keep = 0
    for j in range(u.size):
        if math.exp(u[j]) * min_rate <= right_cut:
            keep += 1
    u = u[: max(1, keep)]
    first_even = int(round(u[0] / step)) % 2
    return u, first_even


@numba.njit(cache=True, fastmath=False)
def _wor_nodes(q, n, k_lo, k_hi, step, fast_tail, right_cut):
    """(lam [k_hi - k_lo + 1], nodes t, first_even) of ``mdsd._race.wor_qall_window``'s numba
    path for the window k_lo..k_hi of q's order; t is empty when every prefix holds all the mass."""
    size = q.size
    tail = np.zeros(size + 1)  # lambda_k = q(tokens k..), summed from the small end
    running = 0.0
    for i in range(size - 1, -1, -1):
        running += q[i]
        tail[i] = running
    lam = tail[k_lo : k_hi + 1].copy()
    min_rate = np.inf
    for value in lam:
        if value > 0.0 and value < min_rate:
            min_rate = value
    if min_rate == np.inf:
        return lam, np.zeros(0), 0
    u, first_even = race_nodes_fast(min_rate, n, step, fast_tail, right_cut)
    return lam, np.exp(u), first_even


@numba.njit(cache=True, fastmath=False)
def wor_window(q, n, k_lo, k_hi, step, fast_tail, right_cut, clamp, saturated):
    """Qall(first k tokens of q's order), k = k_lo..k_hi, for n >= 2 drafts without replacement:
    ``mdsd._race.wor_qall_window`` on the numba kernel (same tail masses, nodes and step)."""
    lam, t, first_even = _wor_nodes(q, n, k_lo, k_hi, step, fast_tail, right_cut)
    out = np.ones(lam.size)
    if t.size:  # else every prefix holds all the mass
        race_window(q, lam, t, n, k_lo, k_hi, step, first_even, clamp, saturated, right_cut, out)
    return out


@numba.njit(cache=True, fastmath=False)
def empty_race_cache():
    """A ``wor_window_cached`` cache holding nothing."""
    return (np.zeros(0), np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros(0), np.zeros(1, dtype=np.int64))


@numba.njit(cache=True, fastmath=False)
def wor_window_cached(q, n, k_lo, k_hi, race, cache):
    """``wor_window``, reusing the race's state at prefix k_lo from the previous call when its
    first k_lo masses and its nodes were the same (``race_window_from``): the vertices of one
    block scan the same tokens R first, and their nodes agree whenever the block's window ends
    before tokens with mass (the min tail mass is then that of the tokens after the block).
    cache: (q[:k_lo], nodes, race state at k_lo) of the last call; returns (Qall, cache)."""
    step, fast_tail, right_cut, clamp, saturated = race
    lam, t, first_even = _wor_nodes(q, n, k_lo, k_hi, step, fast_tail, right_cut)
    out = np.ones(lam.size)
    if t.size == 0:
        return out, cache
    if k_lo == 0:
        race_window(q, lam, t, n, k_lo, k_hi, step, first_even, clamp, saturated, right_cut, out)
        return out, cache
    prefix, nodes, x, arrived, record, active = cache
    same = prefix.size == k_lo and nodes.size == t.size
    for i in range(prefix.size if same else 0):
        same = same and prefix[i] == q[i]
    for j in range(nodes.size if same else 0):
        same = same and nodes[j] == t[j]
    if same:
        state = (x, arrived, record, active)
        race_window_from(
            q, lam, t, n, k_lo, k_hi, step, first_even, clamp, saturated, right_cut, out, state, RESUME
        )
        return out, cache
    state = race_prefix_state(t.size, n)
    race_window_from(
        q, lam, t, n, k_lo, k_hi, step, first_even, clamp, saturated, right_cut, out, state, SAVE
    )
    return out, (q[:k_lo].copy(), t, state[0], state[1], state[2], state[3])


@numba.njit(cache=True, fastmath=False)
def by_race(law, n, size):
    """Whether Qall over ``size`` tokens is the race quadrature: drafts without replacement but
    for three on at most ``THREE_DRAFT_CLOSED_MAX`` tokens (the closed form; conditional Poisson
    has its e_n ratios)."""
    return law == WITHOUT_REPLACEMENT and not (n == 3 and size <= THREE_DRAFT_CLOSED_MAX)


@numba.njit(cache=True, fastmath=False)
def qall_window(q, n, law, k_lo, k_hi, race):
    """Qall(first k tokens of q's order), k = k_lo..k_hi, for the law code ``law``."""
    if by_race(law, n, q.size):
        step, fast_tail, right_cut, clamp, saturated = race
        return wor_window(q, n, k_lo, k_hi, step, fast_tail, right_cut, clamp, saturated)
    if law == WITHOUT_REPLACEMENT:
        out = np.empty(k_hi - k_lo + 1)  # the closed form, as ``WithoutReplacement.qall_window``
        three_draft_qall(q, k_lo, k_hi, out)
        return out
    log_en = prefix_log_en(q.reshape((1, q.size)), n)[0]  # conditional Poisson: e_n ratios
    return np.minimum(np.exp(log_en[k_lo : k_hi + 1] - log_en[-1]), 1.0)


@numba.njit(cache=True, fastmath=False)
def order_vertex(q, n, law, rest, block, before, sigma, race):
    """Mass vector [|G|] of the priority-order rule sigma on ``block`` given that the drafts miss
    ``before``: v_{sigma_k} = Qall(R + sigma_{>=k}) - Qall(R + sigma_{>k}) (clipped at 0).
    law: a law code; race = (step, fast_tail, right_cut, clamp, saturated) (without replacement)."""
    return order_vertex_cached(q, n, law, rest, block, before, sigma, race, empty_race_cache())[0]


@numba.njit(cache=True, fastmath=False)
def order_vertex_cached(q, n, law, rest, block, before, sigma, race, cache):
    """(``order_vertex``, cache): the race's state after R kept between the vertices of one block
    (``wor_window_cached``; the closed forms need none)."""
    g = block.size
    r = rest.size
    tokens = np.empty(r + g + before.size, dtype=np.int64)
    tokens[:r] = rest
    for i in range(g):
        tokens[r + i] = block[sigma[g - 1 - i]]
    tokens[r + g :] = before
    scanned = q[tokens]
    if by_race(law, n, scanned.size):
        window, cache = wor_window_cached(scanned, n, r, r + g, race, cache)
    else:
        window = qall_window(scanned, n, law, r, r + g, race)
    v = np.empty(g)
    for k in range(g):  # prefix R + sigma_{>=k} has length |R| + |G| - k: window index G - k
        v[sigma[k]] = max(window[g - k] - window[g - k - 1], 0.0)
    return v, cache


@numba.njit(cache=True, fastmath=False)
def _dot(a, b):
    """a . b in a plain loop: at a block's size a BLAS call costs more than the sum."""
    total = 0.0
    for i in range(a.size):
        total += a[i] * b[i]
    return total


@numba.njit(cache=True, fastmath=False)
def _rows_dot(buffer, count, c):
    """buffer[:count] @ c [count]: each row's ``_dot`` (the same sum in the same order), four rows
    at a time so that four independent sums share the loop instead of one waiting on each add."""
    out = np.empty(count)
    i = 0
    while i + 4 <= count:
        b0, b1, b2, b3 = buffer[i], buffer[i + 1], buffer[i + 2], buffer[i + 3]
        t0, t1, t2, t3 = 0.0, 0.0, 0.0, 0.0
        for j in range(c.size):
            t0 += b0[j] * c[j]
            t1 += b1[j] * c[j]
            t2 += b2[j] * c[j]
            t3 += b3[j] * c[j]
        out[i], out[i + 1], out[i + 2], out[i + 3] = t0, t1, t2, t3
        i += 4
    for k in range(i, count):
        out[k] = _dot(buffer[k], c)
    return out


@numba.njit(cache=True, fastmath=False)
def _gap_dots(g, c):
    """(g . g, c . c, g . (g - c)), each summed in index order as ``_dot``, in one pass."""
    gg, cc, gd = 0.0, 0.0, 0.0
    for i in range(g.size):
        gg += g[i] * g[i]
        cc += c[i] * c[i]
        gd += g[i] * (g[i] - c[i])
    return gg, cc, gd


@numba.njit(cache=True, fastmath=False)
def _matched(g, scale, side, match_tol):
    """Whether the point g * scale (the mass less the target) is within ``match_tol`` of the
    target in every coordinate or, for side 1 ("below") / 2 ("above"), breaks the sign pattern by
    at most ``match_tol`` in total (``priority_orders.decompose``'s two stopping tests)."""
    largest, violation = 0.0, 0.0
    for i in range(g.size):
        off = g[i] * scale[i]
        largest = max(largest, abs(off))
        violation += max(off if side == 1 else -off, 0.0)
    return largest <= match_tol or (side != 0 and violation <= match_tol)


@numba.njit(cache=True, fastmath=False)
def _combine(weights, buffer, count):
    """weights @ buffer[:count] [G]."""
    out = np.zeros(buffer.shape[1])
    for i in range(count):
        for j in range(out.size):
            out[j] += weights[i] * buffer[i, j]
    return out


@numba.njit(cache=True, fastmath=False)
def _append_point(factor, buffer, count, c):
    """Extend the Cholesky factor R [count, count] of M = 1 1^T + S S^T (S = buffer[:count], the
    active points) by the point c: R^T r = 1 + S c (forward substitution), rho^2 = 1 + c.c -
    r.r, the new diagonal entry rho. Returns False, leaving R as it is, when rho^2 <= DEPENDENT
    (1 + c.c): c is affinely dependent on the active points to rounding."""
    r = _forward_solve(factor, count, _rows_dot(buffer, count, c) + 1.0)
    top = 1.0 + _dot(c, c)
    rho2 = top - _dot(r, r)
    if not rho2 > DEPENDENT * top:
        return False
    factor[:count, count] = r
    factor[count, :count] = 0.0
    factor[count, count] = math.sqrt(rho2)
    return True


@numba.njit(cache=True, fastmath=False)
def _forward_solve(factor, count, rhs):
    """x with R^T x = rhs for the upper triangular R = factor[:count, :count]; rhs is consumed.
    By columns: once x_j is known, it leaves every later right-hand side (row j of R, contiguous),
    so each x_i = (rhs_i - sum_{j<i} R_ji x_j) / R_ii subtracts its terms in the order j = 0, 1, ..."""
    x = np.empty(count)
    for j in range(count):
        x[j] = rhs[j] / factor[j, j]
        for i in range(j + 1, count):
            rhs[i] -= factor[j, i] * x[j]
    return x


@numba.njit(cache=True, fastmath=False)
def _drop_point(factor, count, j):
    """Remove point j from the factor R [count, count]: shift the later columns left, then Givens
    rotations of rows (k, k + 1) for k >= j restore the triangle (R^T R loses row and column j)."""
    for k in range(j, count - 1):
        factor[:count, k] = factor[:count, k + 1]
    for k in range(j, count - 1):
        a, b = factor[k, k], factor[k + 1, k]
        radius = math.hypot(a, b)
        cos, sin = a / radius, b / radius
        factor[k, k], factor[k + 1, k] = radius, 0.0
        for col in range(k + 1, count - 1):
            x, y = factor[k, col], factor[k + 1, col]
            factor[k, col] = cos * x + sin * y
            factor[k + 1, col] = cos * y - sin * x
    factor[count - 1, :count] = 0.0
    factor[:count, count - 1] = 0.0


@numba.njit(cache=True, fastmath=False)
def _affine_minimiser(factor, count):
    """argmin ||S^T a|| over sum a = 1: a = M^-1 1 / (1^T M^-1 1) by the two triangular solves
    R^T z = 1, R a = z (``priority_orders._affine_minimiser`` solves the equivalent KKT system)."""
    z = _forward_solve(factor, count, np.ones(count))
    a = np.empty(count)
    for i in range(count - 1, -1, -1):
        total = z[i]
        for j in range(i + 1, count):
            total -= factor[i, j] * a[j]
        a[i] = total / factor[i, i]
    return a / a.sum()


@numba.njit(cache=True, fastmath=False)
def decompose(
    q, n, law, rest, block, before, target, start, scale, side, max_iter, race, match_tol, gap_tol, floor
):
    """Wolfe's minimum-norm point for one block (``priority_orders.decompose`` with the law's
    ``order_vertex``). side: 0 none, 1 "below", 2 "above". The affine minimiser of the active
    points comes from a Cholesky factor of 1 1^T + their Gram matrix, updated as points join
    (a column) and leave (Givens rotations): O(s^2) per step where the reference solves the
    (s + 1)-square KKT system, O(s^3).

    Returns (orders [J, G] int64, weights [J], mass [G], iterations)."""
    size = target.size
    t = target / scale
    capacity = 8
    orders = np.empty((capacity, size), dtype=np.int64)
    buffer = np.empty((capacity, size))  # active vertices minus the target
    factor = np.zeros((capacity, capacity))  # R: R^T R = 1 1^T + buffer buffer^T (active rows)
    orders[0] = start
    vertex, cache = order_vertex_cached(q, n, law, rest, block, before, start, race, empty_race_cache())
    buffer[0] = vertex / scale - t
    factor[0, 0] = math.sqrt(1.0 + _dot(buffer[0], buffer[0]))
    count = 1
    weights = np.ones(1)
    g = buffer[0].copy()
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        if _matched(g, scale, side, match_tol):
            break
        sigma = np.argsort(g / scale, kind="mergesort")
        vertex, cache = order_vertex_cached(q, n, law, rest, block, before, sigma, race, cache)
        c = vertex / scale - t
        gg, cc, gd = _gap_dots(g, c)
        g_norm = math.sqrt(gg)
        spread = max(math.sqrt(cc), g_norm)
        if gd <= gap_tol * g_norm * spread:
            break
        if count == capacity:
            capacity *= 2
            grown_orders = np.empty((capacity, size), dtype=np.int64)
            grown_orders[:count] = orders[:count]
            orders = grown_orders
            grown_buffer = np.empty((capacity, size))
            grown_buffer[:count] = buffer[:count]
            buffer = grown_buffer
            grown_factor = np.zeros((capacity, capacity))
            grown_factor[:count, :count] = factor[:count, :count]
            factor = grown_factor
        if not _append_point(factor, buffer, count, c):
            break  # c in the active points' affine hull to rounding: no step can follow
        orders[count] = sigma
        buffer[count] = c
        count += 1
        extended = np.zeros(count)
        extended[:-1] = weights
        weights = extended
        while True:  # minor cycle
            alpha = _affine_minimiser(factor, count)
            if np.all(alpha > floor):
                weights = alpha
                break
            theta = 1.0
            for i in range(count):
                if alpha[i] < weights[i]:
                    theta = min(theta, weights[i] / (weights[i] - alpha[i]))
            theta = min(max(theta, 0.0), 1.0)
            weights = (1.0 - theta) * weights + theta * alpha
            keep = weights > floor
            if np.all(keep):  # rounding: drop the smallest so the cycle makes progress
                keep[np.argmin(weights)] = False
            for j in range(count - 1, -1, -1):  # drop, keeping the order of the others
                if not keep[j]:
                    _drop_point(factor, count, j)
                    orders[j : count - 1] = orders[j + 1 : count].copy()
                    buffer[j : count - 1] = buffer[j + 1 : count].copy()
                    count -= 1
            weights = weights[keep] / weights[keep].sum()
            if count == 1:
                break
        g = _combine(weights, buffer, count)
    mass = (g + t) * scale  # g = weights @ buffer[:count]: every exit precedes a change to either
    return orders[:count].copy(), weights, mass, iterations


def race_settings(n: int, support: int) -> tuple[float, float, float, float, float]:
    """(step, fast_tail, right_cut, clamp, saturated) of ``mdsd._race.wor_qall_window``'s numba
    path for n drafts over ``support`` tokens."""
    from mdsd import _race

    step = _race._window_step(n, support, None)
    return (step, _race.FAST_TAIL, _race.RIGHT_CUT, _race.CLAMP, _race.SATURATED)


@numba.njit(cache=True, fastmath=False)
def orders_node(
    p, q, n, law, drafts, uniforms, race, match_tol, gap_tol, floor, short_budget, full_budget, plain_first
):
    """The emitted token of one node of the orders method (law code ``law``: n >= 3 drafts
    without replacement, or conditional Poisson; the split by ``scan_split``):
    ``orders.fit_orders_row`` then
    ``orders.pick_orders_row`` at uniforms [3], step for step (the same numbers), fitting only
    what the draw reads: the mixture of the block the drafts meet first (L, else H*), and the
    other block's only when the draft is not kept (the residual reads the whole rule mass).

    p, q: [V]; drafts: [n] token ids in draw order; race, tolerances, budgets and ``plain_first``
    (``orders.ORDER_PLAIN_FIRST``) as in ``priority_orders.decompose_compiled`` and
    ``orders._order_mixture``."""
    order, ps, qs = priority_gather(p, q)
    split = scan_split(ps, qs, n, law, race)[0]
    qs_law = qs / numpy_sum(qs)
    settings = (race, match_tol, gap_tol, floor, short_budget, full_budget, plain_first)
    pos = positions_in(order, drafts)  # priority position of each draft
    in_low = pos.min() < split
    orders, weights, block_mass = _block_mixture(ps, qs, qs_law, n, law, split, in_low, settings)
    offset = 0 if in_low else split
    cumulative = np.cumsum(weights)
    j = min(np.searchsorted(cumulative, uniforms[0] * numpy_sum(weights), side="right"), weights.size - 1)
    chosen = -1
    for i in range(orders.shape[1]):  # the drafted position of the block first in the order
        for d in range(drafts.size):
            if pos[d] - offset == orders[j, i] and (not in_low or pos[d] < split):
                chosen = orders[j, i] + offset
                break
        if chosen >= 0:
            break
    mass = block_mass[chosen - offset]
    if mass > 0.0 and uniforms[1] * mass < p[order[chosen]]:
        return order[chosen]  # kept: keep_or_recover's first branch
    other_mass = _block_mixture(ps, qs, qs_law, n, law, split, not in_low, settings)[2]
    masses = (block_mass, other_mass) if in_low else (other_mass, block_mass)
    rule_mass = np.concatenate(masses)  # the rule's mass m in priority order
    return keep_or_recover(p, order, rule_mass, chosen, uniforms[1], uniforms[2])


@numba.njit(cache=True, fastmath=False)
def _block_mixture(ps, qs, qs_law, n, law, split, low, settings):
    """(orders, weights, mass) of block L (``low``) or H* of a row in priority order, as
    ``orders.fit_orders_row`` makes them: ``_order_mixture`` on L, or on H*'s tokens with p > 0
    with its p = 0 tail last in every order (``orders.with_tail``)."""
    race, match_tol, gap_tol, floor, short_budget, full_budget, plain_first = settings
    k = ps.size
    lows, highs, none = np.arange(split), np.arange(split, k), np.arange(0)
    if low:
        return _order_mixture(
            qs_law, n, law, highs, lows, none, ps[lows], qs[lows], 1, race, match_tol, gap_tol, floor,
            short_budget, full_budget, plain_first,
        )  # fmt: skip
    zeros = 0
    for i in range(split, k):
        zeros += ps[i] == 0.0
    covered, tail = np.arange(split, k - zeros), np.arange(k - zeros, k)
    orders, weights, mass = _order_mixture(
        qs_law, n, law, tail, covered, lows, ps[covered], qs[covered], 2, race, match_tol, gap_tol, floor,
        short_budget, full_budget, plain_first,
    )  # fmt: skip
    if zeros == 0:
        return orders, weights, mass
    tail_mass = order_vertex(qs_law, n, law, none, tail, np.arange(k - zeros), np.arange(zeros), race)
    full = np.empty((weights.size, k - split), dtype=np.int64)
    full[:, : covered.size] = orders
    for i in range(zeros):
        full[:, covered.size + i] = covered.size + i
    return full, weights, np.concatenate((mass, tail_mass))


@numba.njit(cache=True, fastmath=False)
def scan_split(ps, qs, n, law, race):
    """(m*, 1 + f(H*)) of a row in priority order [K] for the law code ``law`` (n >= 3 drafts
    without replacement, or conditional Poisson): the first minimiser j* of
    f(H_j) = p(H_j) - Qall(H_j) over H_j = the last j positions, m* = K - j*
    (``common.priority_scan_reference`` with ``bound.prefix_scan``: the same steps).

    Conditional Poisson, and three drafts without replacement on at most
    ``THREE_DRAFT_CLOSED_MAX`` tokens: Qall of every H_j in closed form (``qall_window``).
    Otherwise ``bound._wor_window``: the bounds Qall(H) <= q(H)^n and the product bound below it
    leave a window of prefixes that can attain the minimum (``_race_numba.candidate_window``),
    and only those are integrated by the race (``wor_window`` at ``race`` settings)."""
    k = qs.size
    q_rev = qs[::-1].copy()  # H_j = the first j positions of the reversed order
    p_prefix = np.zeros(k + 1)
    total = 0.0
    for j in range(k):
        total += ps[k - 1 - j]
        p_prefix[j + 1] = total
    if not by_race(law, n, k):
        k_lo, qall = 0, qall_window(q_rev, n, law, 0, k, race)
    else:
        top = np.sort(q_rev)[::-1][:n]  # the n largest masses, decreasing (K >= n)
        top_mass = np.zeros(n)  # T_j: the mass of the j largest
        for j in range(1, n):
            top_mass[j] = top_mass[j - 1] + top[j - 1]
        rest_mass = numpy_sum(q_rev) - top_mass  # 1 - T_j, summed from the other tokens
        k_lo, k_hi = candidate_window(p_prefix, q_rev, n, top_mass, rest_mass, CANDIDATE_SLACK)
        qall = qall_window(q_rev, n, law, k_lo, k_hi, race)
    best, value = k_lo, p_prefix[k_lo] - qall[0]
    for i in range(1, qall.size):
        f = p_prefix[k_lo + i] - qall[i]
        if f < value:
            best, value = k_lo + i, f
    return k - best, 1.0 + value


@numba.njit(cache=True, fastmath=False)
def _order_mixture(
    q, n, law, rest, block, before, target, block_q, side, race, match_tol, gap_tol, floor, short, full,
    plain_first,
):  # fmt: skip
    """``orders._order_mixture`` with ``decompose_compiled``: (orders, weights, mass) of one block,
    trying the norms q, plain and q_floor in turn (plain, q, q_floor for blocks of at most
    ``plain_first`` tokens) with a short budget, then the closest one with the full budget.
    side: 1 "below", 2 "above"."""
    size = target.size
    if size == 0:
        return np.zeros((1, 0), dtype=np.int64), np.ones(1), np.zeros(0)
    short = max(short, size // 8)
    top = block_q.max()
    scales = (np.sqrt(block_q), np.ones(size), np.sqrt(block_q + 1e-2 * top))
    start = np.arange(size)
    best_orders, best_weights, best_mass = np.zeros((1, 0), dtype=np.int64), np.ones(1), np.zeros(0)
    best_violation, best_scale = np.inf, 0
    for s in (1, 0, 2) if size <= plain_first else (0, 1, 2):
        orders, weights, mass, _ = decompose(
            q, n, law, rest, block, before, target, start, scales[s], side, short, race,
            match_tol, gap_tol, floor,
        )  # fmt: skip
        violation = _violation(mass, target, side)
        if violation <= match_tol:
            return orders, weights, mass
        if violation < best_violation:
            best_orders, best_weights, best_mass = orders, weights, mass
            best_violation, best_scale = violation, s
    budget = min(10 * size + 50, full)
    if budget <= short:
        return best_orders, best_weights, best_mass
    orders, weights, mass, _ = decompose(
        q, n, law, rest, block, before, target, start, scales[best_scale], side, budget, race,
        match_tol, gap_tol, floor,
    )  # fmt: skip
    if _violation(mass, target, side) <= best_violation:
        return orders, weights, mass
    return best_orders, best_weights, best_mass


@numba.njit(cache=True, fastmath=False)
def _violation(mass, target, side):
    """``orders._violation``: the total by which mass breaks the block's sign pattern."""
    off = mass - target
    return numpy_sum(np.maximum(off if side == 1 else -off, 0.0))
