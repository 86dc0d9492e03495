"""A verifier that attains alpha* (docs/theory.md §5.8): i.i.d., without-replacement, conditional Poisson.

Construction ("random-threshold priority groups"; see docs/optimal.md for the proof sketch).

1. Order the tokens with q > 0 by the ratio s = p/q, decreasing (ties by lower id): positions
   0..K-1. Let U_k be the first k tokens, Q_k = q(U_k), P_k = p(U_k) and
   Phi_k = P(set(x) meets U_k) = 1 - Qall(V minus U_k) (the scan of the bound, read backwards).
2. A *group rule* cuts the positions into consecutive groups at some boundaries; it accepts from
   the first group (in priority order) that holds a draft, the draft of that group drawn first.
   For i.i.d. drafts the first-drawn token of a group is distributed as q restricted to the
   group, independently of the event "the first group met is G", so the rule puts mass
   q_y * rho_G on token y, with the group rate rho_G = (Phi_hi - Phi_lo) / (Q_hi - Q_lo).
3. A *random-threshold* rule gives every boundary b a level theta_b in [0, 1], draws
   u ~ Uniform[0, 1) and cuts at the boundaries with theta_b <= u. It is a mixture of nested group
   rules, and its mass vector m_y = q_y E_u[rho_{G_u(y)}] is computed exactly from the levels.
4. The levels are fitted so that m matches a target: the cumulative curve A_k = sum_{i<=k} t_i q_i
   with rates t = clip(s, mu, c), where m* = argmin_k Phi_k - P_k (the dual set H* is the
   complement of U_{m*}), c solves sum_{k<=m*} min(p, c q) = Phi_m* and mu solves
   sum_{k>m*} max(p, mu q) = 1 - Phi_m*. A is concave and lies below Phi at every position, so it
   is a mixture of chord interpolants of Phi; peeling (take the largest share of the one-group
   chord, split where the remainder touches Phi, recurse) finds the levels in O(K^2) worst case.
   Runs with one common rate are lumped first; on H* (where only m >= p matters) the exact rates
   are replaced by a staircase of few constant rates when the room Phi - A allows it.
5. Capping: accept the chosen draft y with probability min(1, p_y / m_y). The accepted-mass vector
   is a = min(p, m); on rejection emit from resid = (p - a) / (1 - sum a). Then
   sum_x Pdraft(x) pi(. | x) = a + (p - a) = p whatever the levels are: exactness does not depend on
   the fit. With the fitted levels a = min(p, c q) and sum a = alpha*.

Draft laws. For ``iid`` drafts step 2 holds (the first draft, in draw order, that falls in a group
is q-distributed within it, independently of everything that decides which group is met), and
the construction is exact and optimal at any vocabulary size (method ``threshold``). For
sequential ``without_replacement`` drafts the first-drawn choice fails for groups after the first
(a later draw from the same group changes whether an earlier group is met). With two drafts a
pair split replaces it and is exactly q-proportional (``_pair_split``), so n <= 2 uses
``threshold`` too. For n >= 3 (and for ``conditional_poisson`` at any n >= 2) the fit uses
random *priority orders* instead of groups (method ``orders``, module ``priority_orders``): when
set(x) meets L = U_{m*} it accepts the drafted L-token that comes first in an order of L drawn from
a mixture, else the drafted token first in an order of H*. Each order's mass vector is a greedy
vertex of the coverage function (one Qall scan); Wolfe's minimum-norm-point algorithm finds the
point of each block's coverage polytope closest to p, as a mixture of at most |L| and |H*| + 1
orders; by the optimality of H* that point is <= p on L and >= p on H* (Fujishige's theorem on
minimum-norm bases), so the capped rule accepts alpha*. Supports above ``MAX_ORDER_SUPPORT`` fall
back, with a warning, to an exact verifier of the law (``rrs_without_replacement``;
``sample_check`` for conditional_poisson). See docs/optimal.md.

Shapes: target_probs p and draft_probs q are float64 [B, V]; drafts int64 [B, n] in draw order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from mdsd._validate import as_probs, check_pair
from mdsd.laws import DraftLaw, get_law
from mdsd.verifiers.base import EMPTY_MASS, Verifier
from mdsd.verifiers.classic import RRSWithoutReplacement, SampleCheck
from mdsd.verifiers.priority_orders import MATCH_TOLERANCE, decompose, order_vertex

LAWS = ("iid", "without_replacement", "conditional_poisson")
# Exact verifier of each law used beyond MAX_ORDER_SUPPORT (not optimal).
FALLBACK = {"without_replacement": RRSWithoutReplacement(), "conditional_poisson": SampleCheck()}
# The peeling treats the target as a single group once it is within this distance (probability
# units) of the chord: it can lose at most about this much acceptance per group.
CHORD_TOLERANCE = 1e-15
# Acceptance-certificate tolerance: residual or rejection mass below this counts as zero.
CERTIFY_TOLERANCE = 1e-13
# A fit whose sum a is this close to its alpha* is certified too: the true rate lies in
# [sum a, alpha*], so sum a is exact to this much (full-vocabulary fits round to ~1e-12).
CERTIFY_GAP = 1e-10
# Largest support on which an ``orders`` fit that the sign pattern does not certify gets its
# exact acceptance anyway (one Qall scan per order of the mixture and residual token).
EXACT_ORDERS_SUPPORT = 256
# Safety margin (relative and absolute) on the room Phi - A used by the H* staircase.
STAIR_MARGIN = 1e-12
# Largest ratio between the rates of one H* step and the s of its tokens, and the share of the
# slack 1 - Phi_m - p(H*) the steps may use before the last step takes the rest.
STAIR_RATIO = 1.5
STAIR_SHARES = (1.0, 0.5)
# Largest support (tokens with q > 0) for which the ``orders`` fit runs: one Qall scan of the
# support per Wolfe iteration (tens to thousands of iterations), plus small Gram solves.
MAX_ORDER_SUPPORT = 65_536
# Wolfe's norms tried in turn for a block, the short budget of each (at least size / 8
# iterations) and the budget of the final run with the norm that came closest.
ORDER_NORMS = ("q", "plain", "q_floor")
ORDER_SHORT_BUDGET = 200
ORDER_FULL_BUDGET = 3000


@dataclass(frozen=True)
class OptimalFit:
    """The per-position precomputation of the optimal verifier, reusable for every draft set.

    Batched over rows b (one decoding position each); V is the vocabulary.

    rank:        int64 [B, V]; priority position of each token (q > 0 tokens first, by p/q
                 decreasing); tokens with q = 0 sit at positions >= support and are never drafted.
    levels:      float64 [B, V + 1]; theta_b of boundary b (between positions b-1 and b); the rule
                 cuts there when u >= theta_b, u ~ Uniform[0, 1). 0: always, 1: never.
    rule_mass:   float64 [B, V]; m_y, the mass the uncapped rule puts on y (exact for the levels).
    accept_prob: float64 [B, V]; min(1, p_y / m_y), the probability of keeping a chosen draft y.
    accepted:    float64 [B, V]; a = min(p, m), the accepted-mass vector of the rule used.
    recovered:   float64 [B, V]; the residual law (p - a) / (1 - sum a) of the recovered token.
    acceptance:  float64 [B]; the acceptance rate of the rule used, exact when ``certified``:
                 sum a (``threshold``, ``orders``), plus the residual draws that hit a draft for
                 an ``orders`` fit without the sign pattern (``_orders_acceptance``); NaN
                 (fallback).
    alpha_star:  float64 [B]; alpha* from the same scan.
    certified:   bool [B]; ``acceptance`` is exact: residual tokens can never be drafts in a
                 rejected step, or sum a is within CERTIFY_GAP of alpha* (the rate lies between),
                 or (``orders``, support <= EXACT_ORDERS_SUPPORT) it was computed exactly.
    support:     int64 [B]; number of tokens with q > 0.
    method:      ``threshold`` (iid; without_replacement with n <= 2), ``orders``
                 (without_replacement with n >= 3, conditional_poisson with n >= 2: random priority
                 orders) or the fallback verifier's name (supports above MAX_ORDER_SUPPORT).
    orders:      per row, (split, ranks_L [J_L, V], weights_L [J_L], ranks_H [J_H, V],
                 weights_H [J_H]) (``orders`` only): the mixtures of priority orders of L (positions
                 < split) and of H*; ranks map token -> position in the order (V outside the block).
    cum_mass:    float64 [B, V + 1]; q of the positions before each boundary (``threshold``).
    """

    law: str
    n: int
    rank: np.ndarray
    levels: np.ndarray
    rule_mass: np.ndarray
    accept_prob: np.ndarray
    accepted: np.ndarray
    recovered: np.ndarray
    acceptance: np.ndarray
    alpha_star: np.ndarray
    certified: np.ndarray
    support: np.ndarray
    method: str = "threshold"
    orders: tuple = field(default=(), repr=False)
    target_probs: np.ndarray | None = field(default=None, repr=False)
    draft_probs: np.ndarray | None = field(default=None, repr=False)
    cum_mass: np.ndarray | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.rank.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.rank.shape[1]


# -- fit -----------------------------------------------------------------------------------------


def fit_optimal(target_probs, draft_probs, n: int, law="iid", *, normalize=False) -> OptimalFit:
    """Fit the optimal verifier for one position ([V]) or a batch ([B, V]) of positions.

    Args:
        target_probs: p, [V] or [B, V].
        draft_probs: q, same shape: the law the drafts are drawn from.
        n: number of drafts.
        law: ``iid``, ``without_replacement`` or ``conditional_poisson``.

    Returns an :class:`OptimalFit` (always batched, [B, ...]); pass it to
    :func:`output_law_from_fit` for any number of draft sets.

    >>> fit = fit_optimal([0.5, 0.5], [0.5, 0.5], 2, "without_replacement")
    >>> round(float(fit.acceptance[0]), 12)
    1.0
    """
    p = as_probs(target_probs, "target_probs", normalize=normalize)
    q = as_probs(draft_probs, "draft_probs", normalize=normalize)
    check_pair(p, q)
    if p.ndim > 2:
        raise ValueError(f"target_probs must be [V] or [B, V], got shape {p.shape}")
    the_law = _check_law(law)
    p2, q2 = np.atleast_2d(p), np.atleast_2d(q)
    n = the_law.check(q2, n)
    return _fit_rows(p2, q2, n, the_law)


def _fit_distinct(p, q, n, law):
    """Fit each distinct (p, q) row once. Returns (fit over the distinct rows, row -> fit row)."""
    if p.shape[0] == 1:
        return _fit_rows(p, q, n, law), np.zeros(1, dtype=np.int64)
    both = np.ascontiguousarray(np.concatenate([p, q], axis=1))
    _, first, which = np.unique(both, axis=0, return_index=True, return_inverse=True)
    return _fit_rows(p[first], q[first], n, law), which.ravel()


def _check_law(law) -> DraftLaw:
    the_law = get_law(law)
    if the_law.name not in LAWS:
        raise ValueError(
            f"verifier 'optimal' is exact only for law(s) {list(LAWS)}, got law {the_law.name!r}"
        )
    return the_law


def _fit_rows(p: np.ndarray, q: np.ndarray, n: int, law: DraftLaw) -> OptimalFit:
    """Fit every row of p, q [B, V] (already validated); dispatch on the law."""
    if law.name == "iid" or n == 1 or (law.name == "without_replacement" and n == 2):
        return _fit_threshold(p, q, n, law)
    support = int(np.count_nonzero(q > 0, axis=1).max())
    if support <= MAX_ORDER_SUPPORT:
        return _fit_orders(p, q, n, law)
    fallback = FALLBACK[law.name]
    warnings.warn(
        f"verifier 'optimal' with law {law.name!r} and n = {n}: the draft support has {support:,} "
        f"tokens, above MAX_ORDER_SUPPORT = {MAX_ORDER_SUPPORT:,}; falling back to "
        f"{fallback.name} (exact, below alpha*). Draft from a top-k support to stay optimal.",
        RuntimeWarning,
        stacklevel=3,
    )
    return _fit_fallback(p, q, n, law)


def _finish(p, q, n, law, rule_mass, rank, levels, alpha_star, support, **extra) -> OptimalFit:
    """Cap the rule's mass vector by p and build the residual: exact whatever rule_mass is."""
    accepted = np.minimum(p, rule_mass)
    accept_prob = np.where(rule_mass > 0, accepted / np.where(rule_mass > 0, rule_mass, 1.0), 0.0)
    accept_prob = np.minimum(accept_prob, 1.0)
    acceptance = accepted.sum(axis=1)
    left = np.maximum(p - accepted, 0.0)
    left_total = left.sum(axis=1, keepdims=True)
    # Empty residual: alpha = 1 to rounding, rejection has probability ~0; emit from p then.
    recovered = np.where(left_total > EMPTY_MASS, left / np.where(left_total > 0, left_total, 1), p)
    certified = _certify(q, rank, levels, left, accept_prob, support)
    certified |= alpha_star - acceptance <= CERTIFY_GAP
    return OptimalFit(
        law=law.name,
        n=n,
        rank=rank,
        levels=levels,
        rule_mass=rule_mass,
        accept_prob=accept_prob,
        accepted=accepted,
        recovered=recovered,
        acceptance=np.minimum(acceptance, 1.0),
        alpha_star=alpha_star,
        certified=certified,
        support=support,
        **extra,
    )


def _fit_threshold(p, q, n, law) -> OptimalFit:
    """iid: the random-threshold group construction, row by row."""
    batch, vocab = p.shape
    rank = np.empty((batch, vocab), dtype=np.int64)
    levels = np.ones((batch, vocab + 1))
    rule_mass = np.zeros((batch, vocab))
    alpha_star = np.empty(batch)
    support = np.empty(batch, dtype=np.int64)
    cum_mass = np.zeros((batch, vocab + 1))
    for b in range(batch):
        order, lv, mass_sorted, alpha_star[b] = _fit_row(p[b], q[b], n, law)
        k = order.size
        support[b] = k
        full_order = np.concatenate([order, np.flatnonzero(q[b] <= 0)])
        rank[b, full_order] = np.arange(vocab)
        levels[b, : k + 1] = lv
        rule_mass[b, order] = mass_sorted
        cum_mass[b, 1:] = np.cumsum(q[b, full_order])
    return _finish(
        p, q, n, law, rule_mass, rank, levels, alpha_star, support, cum_mass=cum_mass, draft_probs=q
    )


def _fit_orders(p, q, n, law) -> OptimalFit:
    """Random priority orders on L and on H* (see the module docstring), row by row."""
    batch, vocab = p.shape
    rank = np.empty((batch, vocab), dtype=np.int64)
    levels = np.ones((batch, vocab + 1))
    rule_mass = np.zeros((batch, vocab))
    alpha_star = np.empty(batch)
    support = np.empty(batch, dtype=np.int64)
    mixtures, rows = [], []
    for b in range(batch):
        order, split, mass_sorted, alpha_star[b], blocks = _orders_row(p[b], q[b], n, law)
        rows.append((order, split, blocks))
        k = order.size
        support[b] = k
        rank[b, np.concatenate([order, np.flatnonzero(q[b] <= 0)])] = np.arange(vocab)
        levels[b, [0, split, k]] = 0.0  # L always takes precedence over H*: a cut at level 0
        rule_mass[b, order] = mass_sorted
        ranks = []
        for block, mix in blocks:
            r = np.full((mix.weights.size, vocab), vocab, dtype=np.int64)
            tokens = order[block][mix.orders]  # [J, |block|] token ids, first = top priority
            np.put_along_axis(r, tokens, np.arange(block.size)[None, :], axis=1)
            ranks.append((r, mix.weights))
        mixtures.append((split, *ranks[0], *ranks[1]))
    fit = _finish(
        p, q, n, law, rule_mass, rank, levels, alpha_star, support, method="orders", orders=tuple(mixtures)
    )
    for b, (order, split, blocks) in enumerate(rows):
        if not fit.certified[b] and order.size <= EXACT_ORDERS_SUPPORT:
            qs = q[b, order]
            fit.acceptance[b] = min(
                1.0,
                _orders_acceptance(
                    law,
                    qs / qs.sum(),
                    n,
                    split,
                    blocks,
                    fit.accept_prob[b, order],
                    fit.recovered[b, order],
                    float(fit.accepted[b].sum()),
                ),
            )
            fit.certified[b] = True
    return fit


def _orders_acceptance(
    law: DraftLaw,
    qs: np.ndarray,
    n: int,
    split: int,
    blocks,
    keep: np.ndarray,
    recovered: np.ndarray,
    accepted_total: float,
) -> float:
    """Exact acceptance of a priority-order rule whatever its mixtures (tokens in scan order).

    A step accepts when the kept draft is emitted (sum a) or when a rejected step's residual
    token z was itself drafted:
        alpha = sum a + sum_z r_z sum_y (1 - keep_y) P(z in X, chosen = y),
    with, for an order whose rule picks y = sigma_k when X misses M_y (the block's tokens before
    y, and L for the H* block) and holds y,
        P(z in X, chosen = y) = P(chosen = y) - [Qall(C_y - z) - Qall(C_y - z - y)],  C_y = V - M_y,
    which is 0 for z in M_y and P(chosen = y) for z = y. Qall(C_y - z) over the orders' prefixes is
    one scan per (order, z) with z moved out of the scanned prefix.
    """
    k = qs.size
    low, high, none = np.arange(split), np.arange(split, k), np.arange(0)
    residual = np.flatnonzero(recovered > 0)
    extra = 0.0
    for (block, mix), before, rest in zip(blocks, (none, low), (high, none)):
        g = block.size
        reject = 1.0 - keep[block]  # indexed like block
        if g == 0 or not np.any(reject > 0):
            continue
        in_before = np.zeros(k, dtype=bool)
        in_before[before] = True
        for sigma, weight in zip(mix.orders, mix.weights):
            chosen = order_vertex(law, qs, n, rest, block, before, sigma)  # P(chosen = y), [g]
            position = np.full(k, g, dtype=np.int64)  # order position of each block token
            position[block[sigma]] = np.arange(g)  # (g: not in the block)
            block_reversed = block[sigma[::-1]]  # sigma_{G-1}, ..., sigma_0: C_y grows from the end
            for z in residual:
                if in_before[z]:
                    continue  # z in M_y for every y of this block
                z_in_block = int(position[z])
                scan_rest = rest[rest != z]
                scan_block = block_reversed[block_reversed != z]
                tokens = np.concatenate([scan_rest, scan_block, [z], before]).astype(np.int64)
                window = law.qall_window(
                    qs[tokens], n, scan_rest.size, scan_rest.size + scan_block.size, order=tokens
                )
                step = np.diff(window)  # step[c - 1]: Qall(C - z) - Qall(C - z - y), c = |C_y - z in block|
                ks = np.arange(min(z_in_block, g))  # y = sigma_k before z (or all when z not in block)
                counts = scan_block.size - ks  # sigma tokens of C_y - z: sigma_{>=k} without z
                both = chosen[sigma[ks]] - step[counts - 1]
                total = float(np.dot(reject[sigma[ks]], np.maximum(both, 0.0)))
                if z_in_block < g:  # y = z: P(z in X, chosen = z) = P(chosen = z)
                    total += reject[sigma[z_in_block]] * chosen[sigma[z_in_block]]
                extra += weight * recovered[z] * total
    return accepted_total + extra


def _orders_row(p: np.ndarray, q: np.ndarray, n: int, law: DraftLaw):
    """One position: (order [K], split m*, m in order [K], alpha*, [(block, OrderMixture) x 2]).

    L = positions < m* (their rule runs when set(x) meets L), H* = the rest (rule on the draw
    sets inside H*, i.e. f contracted by L). Each block's mixture is the point of its coverage
    polytope closest to p (Wolfe). That point is <= p on L and >= p on H*: by the optimality of
    H*, g(A) = f(A) - p(A) is minimised over A in L by L itself, and f(L + B) - f(L) - p(B) over
    B in H* by the empty set, and the minimum-norm base z of a submodular g has {z < 0} = the
    smallest and {z <= 0} = the largest minimiser of g (Fujishige; also for the norm weighted by
    1/q used here). So the capped rule accepts f(L) on L and p on H*: alpha*. Wolfe stops as soon
    as that sign pattern holds.
    """
    order = np.flatnonzero(q > 0)
    order = order[np.argsort(-(p[order] / q[order]), kind="stable")]
    ps, qs = p[order], q[order]
    qs_law = qs / qs.sum()  # the law's Qall is over the support; q sums to 1 up to rounding
    k = order.size
    phi = _coverage_curve(qs, n, law)
    gap = phi - np.concatenate([[0.0], np.cumsum(ps)])
    split = k - int(np.argmin(gap[::-1]))
    alpha_star = min(1.0, max(0.0, 1.0 - (1.0 - ps.sum()) + gap[split]))
    low, high, none = np.arange(split), np.arange(split, k), np.arange(0)
    mass = np.zeros(k)
    blocks = []
    for block, before, rest, side in ((low, none, high, "below"), (high, low, none, "above")):

        def vertex(sigma, block=block, before=before, rest=rest):
            return order_vertex(law, qs_law, n, rest, block, before, sigma)

        mix = _order_mixture(vertex, ps[block], qs[block], side)
        mass[block] = mix.mass
        blocks.append((block, mix))
    return order, split, mass, alpha_star, blocks


def _order_mixture(vertex, target: np.ndarray, qs: np.ndarray, side: str):
    """Wolfe on one block, trying the norms of ``ORDER_NORMS`` in turn (each with a short budget);
    the first whose mixture has the sign pattern (<= p on L, >= p on H*) wins. Otherwise the norm
    that came closest runs again with the full budget. Every norm has the same sign pattern at its
    minimum-norm point, but how many iterations it takes to reach it varies by orders of magnitude
    between positions (1/q weights suit peaked top-k rows, the plain norm long flat tails)."""
    size = target.size
    if size == 0:
        return decompose(vertex, target, np.arange(0))
    scales = {"q": np.sqrt(qs), "plain": None, "q_floor": np.sqrt(qs + 1e-2 * qs.max())}
    short = max(ORDER_SHORT_BUDGET, size // 8)
    best, best_name, best_violation = None, None, np.inf
    for name in ORDER_NORMS:
        # start from the order by p/q (the scan order; on L its vertex is often the answer)
        mix = decompose(vertex, target, np.arange(size), scale=scales[name], side=side, max_iter=short)
        violation = _violation(mix.mass, target, side)
        if violation <= MATCH_TOLERANCE:
            return mix
        if violation < best_violation:
            best, best_name, best_violation = mix, name, violation
    full = min(10 * size + 50, ORDER_FULL_BUDGET)
    if full <= short:
        return best
    mix = decompose(vertex, target, np.arange(size), scale=scales[best_name], side=side, max_iter=full)
    return mix if _violation(mix.mass, target, side) <= best_violation else best


def _violation(mass: np.ndarray, target: np.ndarray, side: str) -> float:
    """Total amount by which mass breaks the sign pattern: above target ("below"), under it."""
    off = mass - target
    return float(np.maximum(off if side == "below" else -off, 0.0).sum())


def _scan_alpha(p, q, n, law) -> float:
    """alpha* = 1 - p(q = 0) + min_k (Phi_k - P_k) over the p/q-ordered prefixes."""
    order = np.flatnonzero(q > 0)
    order = order[np.argsort(-(p[order] / q[order]), kind="stable")]
    phi = _coverage_curve(q[order], n, law)
    cum_p = np.concatenate([[0.0], np.cumsum(p[order])])
    return float(min(1.0, max(0.0, cum_p[-1] + np.min(phi - cum_p))))


def _fit_fallback(p, q, n, law) -> OptimalFit:
    """Large without-replacement supports: rrs_without_replacement, exact but below alpha*."""
    batch, vocab = p.shape
    alpha_star = np.array([_scan_alpha(p[b], q[b], n, law) for b in range(batch)])
    nan = np.full((batch, vocab), np.nan)
    return OptimalFit(
        law=law.name,
        n=n,
        rank=np.tile(np.arange(vocab), (batch, 1)),
        levels=np.ones((batch, vocab + 1)),
        rule_mass=nan,
        accept_prob=nan,
        accepted=nan,
        recovered=nan,
        acceptance=np.full(batch, np.nan),
        alpha_star=alpha_star,
        certified=np.zeros(batch, dtype=bool),
        support=np.count_nonzero(q > 0, axis=1),
        method=FALLBACK[law.name].name,
        target_probs=p,
        draft_probs=q,
    )


def _fit_row(p: np.ndarray, q: np.ndarray, n: int, law: DraftLaw):
    """One position. Returns (order [K], levels [K + 1], m in order [K], alpha*)."""
    # 1. priority order: q > 0 tokens by s = p / q decreasing, ties by lower id
    order = np.flatnonzero(q > 0)
    ratio = p[order] / q[order]
    order = order[np.argsort(-ratio, kind="stable")]
    ps, qs = p[order], q[order]
    k = order.size
    # 2. Phi_k = P(set(x) meets U_k), k = 0..K
    phi = _coverage_curve(qs, n, law)
    cum_p = np.concatenate([[0.0], np.cumsum(ps)])
    gap = phi - cum_p  # D_k = Phi_k - P_k; alpha* = 1 - p(q = 0 tokens) + min D
    split = k - int(np.argmin(gap[::-1]))  # the largest minimiser m*
    alpha_star = min(1.0, max(0.0, 1.0 - (1.0 - cum_p[-1]) + gap[split]))
    # 3. target curve A (rates clip(s, mu, c)) and its mixture of group rules
    target, clipped = _target_curve(ps, qs, phi, split)
    run = np.where(clipped, np.where(np.arange(k) < split, 0, 1), -1)  # -1: a unit on its own
    target, run = _staircase(ps, qs, phi, split, target, run)
    # 4. lossless lumping: a run of tokens with one common rate is never cut inside (the target is
    #    linear there), so the peel only sees the run's two ends
    same_run = (run[1:] == run[:-1]) & (run[1:] >= 0)
    cuts = np.concatenate([[0], 1 + np.flatnonzero(~same_run), [k]]) if k > 1 else np.array([0, k])
    coarse_levels, coarse_rate = _peel(np.add.reduceat(qs, cuts[:-1]), phi[cuts], target[cuts])
    levels = np.ones(k + 1)
    levels[cuts] = coarse_levels
    rate = np.repeat(coarse_rate, np.diff(cuts))
    return order, levels, qs * rate, alpha_star


def _coverage_curve(qs: np.ndarray, n: int, law: DraftLaw) -> np.ndarray:
    """Phi_k = P(set(x) meets the first k tokens of the order), k = 0..K, nondecreasing."""
    k = qs.size
    tail = np.concatenate([np.cumsum(qs[::-1])[::-1], [0.0]])  # q of positions >= k
    if law.name == "iid" or n == 1:
        head = np.concatenate([[0.0], np.cumsum(qs)])
        with np.errstate(divide="ignore"):
            # log q(V minus U_k): log1p(-head) is accurate while head is small, log(tail) after
            log_rest = np.where(head < 0.5, np.log1p(-np.minimum(head, 1.0)), np.log(tail))
        phi = -np.expm1(n * log_rest)
    elif law.name == "without_replacement" and n == 2:
        # closed form Qall(R) = sum_{a in R} q_a (q(R) - q_a) / (1 - q_a) over the last j tokens,
        # grown token by token with nonnegative increments q_b (sum_{a in R} q_a / (1 - q_a)
        # + q(R) / (1 - q_b)) so that nothing cancels
        rest = qs[::-1]
        left = _others_mass(qs)[::-1]  # 1 - q_a, the mass the second draw is taken from
        before_q = np.concatenate([[0.0], np.cumsum(rest)[:-1]])
        before_odds = np.concatenate([[0.0], np.cumsum(rest / left)[:-1]])
        qall = np.concatenate([[0.0], np.cumsum(rest * (before_odds + before_q / left))])
        phi = 1.0 - qall[::-1]
    else:
        rest_first = qs[::-1].copy()[None, :]  # complement of U_k: a prefix of the reversed order
        qall = law.qall_prefixes(rest_first, n)[0]  # Qall(last j tokens), j = 0..K
        phi = 1.0 - qall[::-1]
    phi[0], phi[k] = 0.0, 1.0
    return np.maximum.accumulate(np.clip(phi, 0.0, 1.0))


def _others_mass(q: np.ndarray) -> np.ndarray:
    """sum_{b != a} q_b for every a (the 1 - q_a of sampling without replacement).

    1 - q_a loses all precision when q_a is close to 1; only one token can exceed 1/2, and for it
    the others are summed directly.
    """
    total = q.sum()
    out = total - q
    top = int(np.argmax(q))
    if q[top] > 0.5:
        out[top] = np.delete(q, top).sum()
    return out


def _target_curve(ps, qs, phi, split):
    """A_k = sum_{i < k} t_i q_i with t = min(s, c) before ``split`` and max(s, mu) after.

    c = max_{1<=j<=m} (D_m + P_j) / Q_j and mu = min_{m<=j<K} (1 - Phi_m - (P_j - P_m)) / q(tail_j)
    are the closed-form roots of sum min(p, c q) = Phi_m and sum max(p, mu q) = 1 - Phi_m.
    Returns (A [K + 1], clipped [K]: the rate is c or mu rather than s).
    """
    k = qs.size
    s = ps / qs
    rates = s.copy()
    clipped = np.zeros(k, dtype=bool)
    if split > 0:
        cum_q = np.cumsum(qs[:split])
        cum_p = np.cumsum(ps[:split])
        low = phi[split] - (cum_p[-1] - cum_p)  # D_m + P_j
        c = float(np.max(low / cum_q))
        rates[:split] = np.minimum(s[:split], c)
        clipped[:split] = s[:split] > c
    if split < k:
        hp, hq = ps[split:], qs[split:]
        tail_q = np.cumsum(hq[::-1])[::-1]  # q(positions >= j), j = m..K-1
        head_p = np.concatenate([[0.0], np.cumsum(hp)[:-1]])  # P_j - P_m
        mu = float(np.min(((1.0 - phi[split]) - head_p) / tail_q))
        rates[split:] = np.maximum(s[split:], mu)
        clipped[split:] = s[split:] < mu
    target = np.empty(k + 1)
    target[0] = 0.0
    target[1 : split + 1] = np.cumsum(rates[:split] * qs[:split])
    target[split + 1 :] = phi[split] + np.cumsum(rates[split:] * qs[split:])
    target[split], target[k] = phi[split], 1.0
    return target, clipped


def _staircase(ps, qs, phi, split, target, run):
    """Try the H* staircase with the whole slack, then with half of it (see _staircase_walk)."""
    for share in STAIR_SHARES:
        out, new_run = _staircase_walk(ps, qs, phi, split, target, run, share)
        if out is not target:
            return out, new_run
    return target, run


def _staircase_walk(ps, qs, phi, split, target, run, share):
    """On H* only m >= p matters: replace the exact rates by a few constant steps when it is free.

    Walking H* in order, a token joins the current step (rate = the step's first, largest s, at
    most STAIR_RATIO times the token's s) while the surplus over the exact target stays below the
    room Phi - A after it. As soon as one last step can take the rest (its rate, fixed by the
    total 1 - Phi_m, is at least the largest s in it) the walk stops. The curve stays below Phi
    at every step boundary and every H* token keeps m >= p; nothing changes on L, so the fit is as
    optimal as with the exact target, with far fewer cuts at the full vocabulary.
    Returns (target, run ids); the inputs unchanged when no staircase forms.
    """
    k = qs.size
    if k - split < 3:
        return target, run
    s = ps / qs
    tail_q = np.cumsum(qs[::-1])[::-1]  # q(positions >= j)
    room = (phi - target) * (1.0 - STAIR_MARGIN) - STAIR_MARGIN
    # the surplus over p on H* can reach E = 1 - Phi_m - p(H*) in all; keep half for the last step
    cap = share * max(float(target[k] - phi[split] - ps[split:].sum()), 0.0)
    # until the mu-region the surplus only grows: cap it by the smallest room still ahead there
    mu_start = int(np.flatnonzero(run == 1)[0]) if np.any(run == 1) else k
    ahead = room.copy()
    ahead[split : mu_start + 1] = np.minimum.accumulate(room[split : mu_start + 1][::-1])[::-1]
    new_run = run.copy()
    curve = target.copy()
    step, step_rate, surplus = 2, s[split], 0.0
    for j in range(split, k):
        rest_rate = (1.0 - curve[j]) / tail_q[j]  # one last step from j on
        if j > split and s[j] <= rest_rate <= step_rate and curve[j] <= phi[j]:
            new_run[j:] = step + 1
            curve[j + 1 :] = curve[j] + rest_rate * np.cumsum(qs[j:])
            curve[k] = target[k]
            return curve, new_run
        if j > split and not (
            step_rate <= STAIR_RATIO * s[j] and surplus + (step_rate - s[j]) * qs[j] <= min(ahead[j + 1], cap)
        ):
            step, step_rate = step + 1, s[j]
        surplus += (step_rate - s[j]) * qs[j]
        curve[j + 1] = curve[j] + step_rate * qs[j]
        new_run[j] = step
        if curve[j + 1] > phi[j + 1]:
            return target, run
    return target, run


def _peel(qs: np.ndarray, phi: np.ndarray, target: np.ndarray):
    """Write the target curve as a random-threshold mixture of group rules.

    On an interval [lo, hi] whose ends are cuts: take the largest share lam of the one-group rule
    (the chord of Phi) such that the remainder (A - lam chord) / (1 - lam) stays below Phi; the
    remainder touches Phi at some j, which becomes a cut with level offset + scale * lam; recurse
    on [lo, j] and [j, hi] with u rescaled to the remaining share. Returns (levels [K + 1],
    rate [K]) where rate_i = E_u[rho of the group of i] is computed from the rules actually used.
    """
    k = qs.size
    levels = np.ones(k + 1)
    levels[0] = levels[k] = 0.0
    rate = np.zeros(k)
    stack = [(0, k, target, 0.0, 1.0)]
    while stack:
        lo, hi, curve, offset, scale = stack.pop()
        local_q = np.cumsum(qs[lo:hi])  # q mass of positions lo..j-1, summed locally
        mass = local_q[-1]
        rho = (phi[hi] - phi[lo]) / mass
        if hi - lo == 1:
            rate[lo] += scale * rho
            continue
        chord = phi[lo] + (phi[hi] - phi[lo]) * (local_q[:-1] / mass)  # interior points
        excess = np.maximum(curve[1:-1] - chord, 0.0)  # A - chord >= 0 (A concave)
        room = phi[lo + 1 : hi] - chord  # Phi - chord
        if excess.max() <= CHORD_TOLERANCE:
            rate[lo:hi] += scale * rho
            continue
        # largest lam with excess <= (1 - lam) room; room <= excess means a touch: lam = 0
        share = np.where(room > excess, 1.0 - excess / np.where(room > 0, room, 1.0), 0.0)
        j = int(np.argmin(share))
        lam = float(share[j])
        rate[lo:hi] += scale * lam * rho
        cut = lo + 1 + j
        levels[cut] = offset + scale * lam
        rest = np.empty(hi - lo + 1)
        rest[0], rest[-1] = phi[lo], phi[hi]
        rest[1:-1] = chord + excess / (1.0 - lam)
        rest[j + 1] = phi[cut]
        child_offset, child_scale = offset + scale * lam, scale * (1.0 - lam)
        stack.append((lo, cut, rest[: j + 2], child_offset, child_scale))
        stack.append((cut, hi, rest[j + 1 :], child_offset, child_scale))
    return levels, rate


def _threshold_rates(qs: np.ndarray, phi: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Reference: E_u[rho of the group of each position] for any cut levels, O(K * #levels).

    levels [K + 1] with levels[0] = levels[K] = 0; between consecutive distinct levels the active
    cuts are fixed, and each group (lo, hi) has rate (Phi_hi - Phi_lo) / q(group).
    """
    k = qs.size
    steps = np.append(np.unique(levels[levels < 1.0]), 1.0)
    rate = np.zeros(k)
    for u_lo, u_hi in zip(steps[:-1], steps[1:]):
        cuts = np.flatnonzero(levels <= u_lo)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            rate[lo:hi] += (u_hi - u_lo) * (phi[hi] - phi[lo]) / qs[lo:hi].sum()
    return rate


def _certify(q, rank, levels, left, accept_prob, support) -> np.ndarray:
    """True where no rejected step can emit a draft from the residual.

    A rejection needs a chosen draft with accept_prob < 1; the residual lives on tokens with
    p - a > 0. If every such residual token with q > 0 sits before an always-on cut (level 0) and
    every rejecting token after it, a set that holds a residual token is served by an earlier group
    whose draft is kept, so acceptance = sum a exactly.
    """
    batch, vocab = q.shape
    out = np.zeros(batch, dtype=bool)
    for b in range(batch):
        pos_left = rank[b, (left[b] > CERTIFY_TOLERANCE) & (q[b] > 0)]
        pos_reject = rank[b, (accept_prob[b] < 1.0 - CERTIFY_TOLERANCE) & (q[b] > 0)]
        if pos_left.size == 0 or pos_reject.size == 0:
            out[b] = True
            continue
        last_left, first_reject = int(pos_left.max()), int(pos_reject.min())
        if last_left >= first_reject:
            continue
        # an always-on cut between them: boundary c with last_left < c <= first_reject
        out[b] = bool(np.any(levels[b, last_left + 1 : first_reject + 1] <= 0.0))
    return out


# -- one draft set -------------------------------------------------------------------------------


def output_law_from_fit(fit: OptimalFit, drafts) -> np.ndarray:
    """pi(. | x) for draft sets x [B, n] (or [n]) under a fit of 1 or B positions.

    With drafts sorted by priority position p_(1) <= ... <= p_(n), draft i shares the first group
    with draft 1 exactly when u < tau_i = min{theta_c : p_(1) < c <= p_(i)}; so for
    u in [tau_{i+1}, tau_i) the rule picks the earliest-drawn of the first i drafts. Each pick y is
    kept with probability accept_prob[y]; the rest of the mass goes to the residual law. (``orders``
    fits take the first draft in each order of the mixture; the fallback runs its verifier.)
    """
    x = np.asarray(drafts, dtype=np.int64)
    single = x.ndim == 1
    x = np.atleast_2d(x)
    rows, n = x.shape
    if fit.batch_size not in (1, rows):
        raise ValueError(f"a fit of {fit.batch_size} positions cannot serve {rows} draft rows")
    if n != fit.n:
        raise ValueError(f"the fit is for n = {fit.n} drafts, got drafts of shape {x.shape}")
    fr = np.zeros(rows, dtype=np.int64) if fit.batch_size == 1 else np.arange(rows)
    out = _output_law_rows(fit, x, fr)
    return out[0] if single else out


def _output_law_rows(fit: OptimalFit, x: np.ndarray, fr: np.ndarray) -> np.ndarray:
    """pi(. | x) for drafts x [R, n], row r served by fit row fr[r]."""
    if fit.method == "orders":
        return _orders_output_law(fit, x, fr)
    if fit.method != "threshold":
        return FALLBACK[fit.law].output_law(fit.target_probs[fr], fit.draft_probs[fr], x, get_law(fit.law))
    return _threshold_output_law(fit, x, fr)


def _orders_output_law(fit: OptimalFit, x: np.ndarray, fr: np.ndarray) -> np.ndarray:
    """Priority orders: the block met first (L, else H*), the first draft in each of its orders."""
    rows, n = x.shape
    out = np.zeros((rows, fit.vocab_size))
    kept_total = np.zeros(rows)
    for b in np.unique(fr):
        split, ranks_low, w_low, ranks_high, w_high = fit.orders[b]
        mine = np.flatnonzero(fr == b)
        meets_low = (fit.rank[b, x[mine]] < split).any(axis=1)
        for sel, ranks, weights in (
            (mine[meets_low], ranks_low, w_low),
            (mine[~meets_low], ranks_high, w_high),
        ):
            if sel.size == 0:
                continue
            drafts = x[sel]  # [R', n]
            first = np.argmin(ranks[:, drafts], axis=2)  # [J, R']
            picked = np.take_along_axis(drafts.T, first, axis=0)  # [J, R'] token ids
            kept = weights[:, None] * fit.accept_prob[b, picked]  # [J, R']
            np.add.at(out, (np.broadcast_to(sel, picked.shape), picked), kept)
            kept_total[sel] = kept.sum(axis=0)
    out += fit.recovered[fr] * np.maximum(1.0 - kept_total, 0.0)[:, None]
    return out


def _threshold_output_law(fit: OptimalFit, x: np.ndarray, fr: np.ndarray) -> np.ndarray:
    """The random-threshold group rule for a batch of draft sets (see output_law_from_fit)."""
    rows, n = x.shape
    pos = fit.rank[fr[:, None], x]  # [B, n]
    by_pos = np.argsort(pos, axis=1, kind="stable")  # drafts in priority order
    pos_sorted = np.take_along_axis(pos, by_pos, axis=1)
    # tau_i: running min of the levels of the boundaries after p_(1) -- [B, n]
    vocab = fit.vocab_size
    bounds = np.arange(vocab + 1)
    after_first = bounds[None, :] > pos_sorted[:, :1]
    running = np.minimum.accumulate(np.where(after_first, fit.levels[fr], 1.0), axis=1)
    tau = np.take_along_axis(running, pos_sorted, axis=1)
    tau[:, 0] = 1.0
    weight = tau - np.concatenate([tau[:, 1:], np.zeros((rows, 1))], axis=1)  # [B, n]
    if fit.law == "without_replacement" and n == 2:
        kept, picked = _pair_split(fit, x, fr, by_pos, pos_sorted, tau)
    else:
        # the pick for "first i drafts": earliest draw index among them
        earliest = np.minimum.accumulate(by_pos, axis=1)
        picked = np.take_along_axis(x, earliest, axis=1)  # [B, n]
        kept = weight * fit.accept_prob[fr[:, None], picked]
    out = fit.recovered[fr] * np.maximum(1.0 - kept.sum(axis=1), 0.0)[:, None]
    np.add.at(out, (np.repeat(np.arange(rows), n), picked.ravel()), kept.ravel())
    return out


def _pair_split(fit, x, fr, by_pos, pos_sorted, tau):
    """Two drafts without replacement: the q-proportional split inside a shared group.

    When both drafts y (earlier position) and z share the first group met G = [a, b), keep y with
    probability (c_z + alpha (c_y - c_z)) / (c_y + c_z), c = 1 / (1 - q), alpha = q(U_b) / q(G).
    Summed over the draft pairs this puts mass exactly proportional to q on G (where the
    first-drawn choice does not: later draws decide whether an earlier group is met), and it is
    a probability because 1 - q_z >= 1 - q(G) >= q(U_a) / q(U_b). G depends on u through the
    cuts around the pair, so the choice is integrated over u in [0, tau_2) piece by piece.
    Returns (kept [B, 2], picked [B, 2]) for picks (y, z).
    """
    rows = x.shape[0]
    first = np.take_along_axis(x, by_pos, axis=1)  # [B, 2] (y, z) in priority order
    kept = np.empty((rows, 2))
    for r in range(rows):
        b = fr[r]
        p1, p2, tau2 = int(pos_sorted[r, 0]), int(pos_sorted[r, 1]), float(tau[r, 1])
        shared = _shared_alpha_integral(fit.levels[b], fit.cum_mass[b], p1, p2, tau2)
        c_y, c_z = 1.0 / _others_mass(fit.draft_probs[b])[first[r]]
        y_share = (c_z * tau2 + (c_y - c_z) * shared) / (c_y + c_z)
        y_share = min(max(y_share, 0.0), tau2)
        kept[r] = (1.0 - tau2 + y_share, tau2 - y_share)
    return kept * fit.accept_prob[fr[:, None], first], first


def _shared_alpha_integral(levels, cum, p1, p2, tau2) -> float:
    """Integral over u in [0, tau2) of alpha(u) = Q_b / (Q_b - Q_a), [a, b) the group of the pair.

    a(u) = the largest cut c <= p1 with level <= u, b(u) = the smallest cut c > p2 with level <= u;
    both change only at the running minima of the levels going outwards from the pair.
    """
    if tau2 <= 0.0:
        return 0.0
    left = np.minimum.accumulate(levels[p1::-1])  # cuts p1, p1 - 1, ..., 0
    right = np.minimum.accumulate(levels[p2 + 1 :])  # cuts p2 + 1, ..., V
    edges = np.unique(np.concatenate([left, right, [0.0]]))
    edges = np.append(edges[edges < tau2], tau2)
    u = edges[:-1]
    a = p1 - np.searchsorted(-left, -u, side="left")
    b = p2 + 1 + np.searchsorted(-right, -u, side="left")
    alpha = cum[b] / (cum[b] - cum[a])
    return float(alpha @ np.diff(edges))


def verify_from_fit(fit: OptimalFit, drafts, rng=None):
    """Draw y ~ pi(. | x) from a fit. Returns (tokens [B], accepted [B]) (scalars for [n] drafts)."""
    rng = np.random.default_rng(rng)
    x = np.asarray(drafts, dtype=np.int64)
    law = np.atleast_2d(output_law_from_fit(fit, x))
    cdf = np.cumsum(law, axis=1)
    u = rng.random((law.shape[0], 1)) * cdf[:, -1:]
    tokens = np.minimum((cdf <= u).sum(axis=1), law.shape[1] - 1)
    accepted = (np.atleast_2d(x) == tokens[:, None]).any(axis=1)
    if x.ndim == 1:
        return int(tokens[0]), bool(accepted[0])
    return tokens, accepted


@dataclass(frozen=True)
class OptimalVerifier(Verifier):
    """Attains alpha* for ``iid``, ``without_replacement`` and ``conditional_poisson`` drafts.

    A random-threshold mixture of priority-group rules over tokens ordered by p/q, fitted so that
    the accepted mass is a = min(p, c q) with sum a = alpha*; chosen drafts are capped by p, the
    rest is emitted from resid(p - a). Three or more without_replacement drafts and
    conditional_poisson drafts: mixtures of priority orders on supports up to
    ``MAX_ORDER_SUPPORT`` tokens, else the law's fallback verifier (with a warning). See the module
    docstring and docs/optimal.md.
    ``output_law`` accepts a precomputed ``fit`` (from :func:`fit_optimal`) to share one fit across
    many draft sets of the same position.
    """

    name: str = "optimal"
    laws: tuple[str, ...] = LAWS

    def output_law(self, target_probs, draft_probs, drafts, law, fit: OptimalFit | None = None):
        if fit is not None:
            return output_law_from_fit(fit, drafts)
        # one fit per distinct (p, q) row: batches often repeat a position for many draft sets
        fit, which = _fit_distinct(target_probs, draft_probs, drafts.shape[1], _check_law(law))
        return _output_law_rows(fit, np.asarray(drafts, dtype=np.int64), which)

    def acceptance(self, target_probs, draft_probs, n, law):
        the_law = _check_law(law)
        fit, which = _fit_distinct(target_probs, draft_probs, n, the_law)
        if fit.method in ("threshold", "orders"):
            if not np.all(fit.certified):
                return None
            return fit.acceptance[which]
        return FALLBACK[the_law.name].acceptance(target_probs, draft_probs, n, the_law)

    def fit(self, target_probs, draft_probs, n, law="iid") -> OptimalFit:
        return fit_optimal(target_probs, draft_probs, n, law)


__all__ = [
    "OptimalFit",
    "OptimalVerifier",
    "fit_optimal",
    "output_law_from_fit",
    "verify_from_fit",
]
