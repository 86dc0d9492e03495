"""What every method of the optimal verifier shares: the priority order and its scan, the fit
record's common fields, and the capping of a rule's mass vector by p (docs/optimal.md).

Shapes: target_probs p and draft_probs q are float64 [B, V] (or [V] for one row); K is the number
of tokens with q > 0 (the support, in priority order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mdsd.bound import RADIX_MIN, numpy_sort_is_faster, prefix_scan, stable_argsort
from mdsd.laws import DraftLaw, others_mass
from mdsd.sampling import draw
from mdsd.verifiers.base import EMPTY_MASS


@dataclass(frozen=True)
class PriorityScan:
    """The priority order of one position and the coverage curve of its prefixes.

    order:      int64 [K]; the tokens with q > 0 by s = p/q decreasing, ties by lower id.
    phi:        float64 [K + 1]; Phi_k = P(set(x) meets U_k), U_k = order[:k]; nondecreasing,
                Phi_0 = 0, Phi_K = 1. NaN-free only where ``curve`` was asked for (see
                :func:`priority_scan`).
    split:      m* = the largest minimiser of Phi_k - p(U_k): L = U_m*, H* = the rest.
    alpha_star: alpha* = 1 - p(q = 0) + Phi_m* - p(U_m*), clipped to [0, 1].
    target_probs, draft_probs: float64 [K]; p and q in the order.
    draft_prefix: float64 [K + 1]; Q_k = q(U_k) summed from the front (None without ``curve``).
    """

    order: np.ndarray
    phi: np.ndarray | None
    split: int
    alpha_star: float
    target_probs: np.ndarray
    draft_probs: np.ndarray
    draft_prefix: np.ndarray | None = None


def priority_order(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Tokens with q > 0 by the ratio p/q decreasing, ties by lower id: int64 [K].

    Fast paths (as ``mdsd.bound.scan_order``): from ``RADIX_MIN`` tokens the compiled stable
    radix sort (``mdsd._radix_numba.stable_argsort``); below, numpy's default (unstable)
    argsort, then the p = 0 block at the end put in id order, and the stable sort instead only if
    two positive ratios tie. ``priority_order_reference`` is numpy's stable sort.
    """
    support = np.flatnonzero(q > 0)
    key = -(p[support] / q[support])  # -p/q <= 0; -0.0 where p = 0
    if support.size >= RADIX_MIN:
        return support[stable_argsort(key)]
    idx = np.argsort(key)
    ordered = key[idx]
    zeros = int(np.searchsorted(ordered, 0.0))  # first p = 0 token (-0.0 == 0.0)
    if zeros > 1 and np.any(ordered[1:zeros] == ordered[: zeros - 1]):
        return support[np.argsort(key, kind="stable")]
    if support.size - zeros > 1:
        idx[zeros:] = np.sort(idx[zeros:])
    return support[idx]


def priority_order_reference(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``priority_order`` by one stable argsort (the plain reference)."""
    support = np.flatnonzero(q > 0)
    return support[np.argsort(-(p[support] / q[support]), kind="stable")]


def priority_scan(p: np.ndarray, q: np.ndarray, n: int, law: DraftLaw, *, curve: bool = True) -> PriorityScan:
    """The priority order and the bound's prefix scan read in the verifier's direction.

    The complement of U_k is the last K - k tokens of the priority order, so the scan runs over
    the reversed order: H_j = the last j tokens, f(H_j) = p(H_j) - Qall(H_j), and
    Phi_k = 1 - Qall(H_{K-k}), Phi_k - p(U_k) = 1 - p(supp q) + f(H_{K-k}). Its first minimiser
    j* gives m* = K - j*. curve=False: the caller needs m* and alpha* only (a quadrature law
    may then prune the prefixes that cannot attain the minimum; phi is None).

    Fast paths: the curve of a closed-form Qall (i.i.d. drafts, or two without replacement) in
    one compiled pass (``_threshold_numba.curve_scan``), and of three or more without replacement
    (``splits_by_order``: ``_threshold_numba.wor_curve_scan``, Qall of every prefix, where the
    bound's scan integrates only those that can attain the minimum); the split alone
    of conditional Poisson and of drafts without replacement whose Qall is a quadrature
    (``_orders_numba.scan_split``, the orders node's scan). Elsewhere, and as their reference,
    :func:`priority_scan_reference` (the same numbers; tested).
    """
    support = int(np.count_nonzero(q))
    if not curve and compiled_split(law, n, support):
        return _compiled_split(p, q, n, law)
    split_curve = splits_by_order(law, n)
    if not (curve and (closed_curve(law, n) or split_curve)):
        return priority_scan_reference(p, q, n, law, curve=curve)
    from mdsd.verifiers.optimal import _orders_numba  # lazy: numba costs ~0.3 s
    from mdsd.verifiers.optimal._threshold_numba import curve_scan, wor_curve_scan

    order, ps, qs = _priority_gather(p, q, support)
    if split_curve:
        phi, split, alpha, draft_prefix = wor_curve_scan(ps, qs, n, _orders_numba.race_settings(n, support))
    else:
        others = others_mass(qs[::-1]) if law.name == "without_replacement" else np.zeros(0)
        phi, split, alpha, draft_prefix = curve_scan(ps, qs, n, others)
    return PriorityScan(order, phi, split, min(1.0, max(0.0, alpha)), ps, qs, draft_prefix)


def _priority_gather(p: np.ndarray, q: np.ndarray, support: int):
    """(order [K], p [K], q [K] in that order) of ``priority_order``: numpy's sort made stable
    (``mdsd.bound.stable_argsort``) where it is the faster one on this CPU and the support is
    large, else one compiled call (``_common_numba.priority_gather``: the order and the gathers).
    The same arrays either way (tested)."""
    if support >= RADIX_MIN and numpy_sort_is_faster():
        order = priority_order(p, q)
        return order, p[order], q[order]
    from mdsd.verifiers.optimal._common_numba import priority_gather  # lazy: numba costs ~0.3 s

    return priority_gather(p, q)


def compiled_split(law: DraftLaw, n: int, support: int) -> bool:
    """Laws whose split alone ``_orders_numba.scan_split`` computes (the orders method's one-call
    node): conditional Poisson, and drafts without replacement whose Qall is a quadrature."""
    if law.name == "without_replacement":
        return law.qall_by_quadrature(n, support)
    return law.name == "conditional_poisson"


def _compiled_split(p: np.ndarray, q: np.ndarray, n: int, law: DraftLaw) -> PriorityScan:
    """``priority_scan(curve=False)`` by ``_orders_numba.scan_split``."""
    from mdsd.verifiers.optimal import _orders_numba  # lazy: numba costs ~0.3 s

    order, ps, qs = _priority_gather(p, q, int(np.count_nonzero(q)))
    race = _orders_numba.race_settings(n, order.size)
    split, alpha = _orders_numba.scan_split(ps, qs, n, _orders_numba.LAW_CODES[law.name], race)
    return PriorityScan(order, None, int(split), min(1.0, max(0.0, float(alpha))), ps, qs)


# Drafts without replacement that the threshold method takes with the order split, on any support:
# Phi of every prefix compiled (the closed form of Qall for three draws on up to
# laws.THREE_DRAFT_CLOSED_MAX tokens, O(K^2); else the race quadrature, O(K x nodes)) per position,
# the shares O(2^n n (m + 1)) per draft set with m drafts in the group met (0.13 ms for 12 drafts,
# doubling per draft). The split is exact for every n (docs/optimal.md), checked by enumeration up
# to 8 and at 10 and 12. Beyond 12 drafts priority orders cost less at top-k (0.2-0.3 ms against
# 0.25-2.7 ms for 13-16 at top-64) and far more on larger supports (7-17 ms at 256 tokens, 0.3-1 s
# at 1,024-2,048, against 0.5-2.6 ms), so 13 to ORDER_SPLIT_WIDE_DRAFTS take the split on supports
# above ORDER_SPLIT_WIDE_SUPPORT; beyond 16 its tables (2^n (m + 1) doubles) grow too large.
ORDER_SPLIT_MAX_DRAFTS = 12
ORDER_SPLIT_WIDE_DRAFTS = 16
ORDER_SPLIT_WIDE_SUPPORT = 128


def splits_by_order(law: DraftLaw, n: int) -> bool:
    """Whether the threshold method chooses inside a group by the order split
    (``_threshold_numba.order_split_shares``) instead of the first draw: three or more sequential
    draws without replacement. Its mass is q-proportional inside every group for any n
    (docs/optimal.md, "Why the mass is q_y rho_G") and its shares are probabilities ("Why the
    shares are probabilities"); Phi comes from ``_threshold_numba.wor_curve_scan``."""
    return law.name == "without_replacement" and n >= 3


def uses_order_split(law: DraftLaw, n: int, support: int) -> bool:
    """Whether the threshold method with the order split takes n drafts of ``law`` whose q has
    ``support`` tokens: three to ``ORDER_SPLIT_MAX_DRAFTS`` on any support, up to
    ``ORDER_SPLIT_WIDE_DRAFTS`` above ``ORDER_SPLIT_WIDE_SUPPORT`` tokens (the shares' cost
    doubles with every draft; priority orders take the rest)."""
    if not splits_by_order(law, n):
        return False
    return n <= ORDER_SPLIT_MAX_DRAFTS or (
        n <= ORDER_SPLIT_WIDE_DRAFTS and support > ORDER_SPLIT_WIDE_SUPPORT
    )


def closed_curve(law: DraftLaw, n: int) -> bool:
    """Laws whose Qall of prefixes ``curve_scan`` computes: i.i.d., two drafts without replacement."""
    return law.name == "iid" or (law.name == "without_replacement" and n == 2)


def priority_scan_reference(
    p: np.ndarray, q: np.ndarray, n: int, law: DraftLaw, *, curve: bool = True
) -> PriorityScan:
    """:func:`priority_scan` by ``mdsd.bound.prefix_scan`` over the reversed order (any law)."""
    order = priority_order(p, q)
    k = order.size
    ps, qs = p[order], q[order]
    scan = prefix_scan(ps[::-1], qs[::-1], n, law)  # the complement first
    phi = draft_prefix = None
    if curve:
        phi = 1.0 - scan.qall[::-1]
        phi[0], phi[k] = 0.0, 1.0
        phi = np.maximum.accumulate(np.clip(phi, 0.0, 1.0))
        draft_prefix = np.zeros(k + 1)
        np.cumsum(qs, out=draft_prefix[1:])
    return PriorityScan(order, phi, k - scan.best, min(1.0, max(0.0, scan.alpha)), ps, qs, draft_prefix)


@dataclass(frozen=True)
class CappedRule:
    """A rule's mass vector m capped by p, batched [B, V] (exact whatever m is).

    accept_prob: min(1, p_y / m_y), the probability of keeping a chosen draft y (0 where m = 0).
    accepted:    a = min(p, m), the accepted-mass vector.
    recovered:   the residual law (p - a) / (1 - sum a) of the recovered token (p itself where the
                 residual is empty: alpha = 1 to rounding, a rejection has probability ~0).
    """

    accept_prob: np.ndarray
    accepted: np.ndarray
    recovered: np.ndarray


def cap_rule(p: np.ndarray, rule_mass: np.ndarray) -> CappedRule:
    """Accept the chosen draft y with probability min(1, p_y / m_y); on rejection emit from
    resid(p - a). Then sum_x Pdraft(x) pi(. | x) = a + (p - a) = p whatever m is."""
    accepted = np.minimum(p, rule_mass)
    positive = rule_mass > 0
    accept_prob = np.minimum(np.where(positive, accepted / np.where(positive, rule_mass, 1.0), 0.0), 1.0)
    left = np.maximum(p - accepted, 0.0)
    left_total = left.sum(axis=1, keepdims=True)
    recovered = np.where(left_total > EMPTY_MASS, left / np.where(left_total > 0, left_total, 1), p)
    return CappedRule(accept_prob, accepted, recovered)


@dataclass(frozen=True)
class OptimalFit:
    """The fields every fit of the optimal verifier has, batched over rows b (positions).

    law, n:      the draft law's name and the number of drafts.
    accept_prob: float64 [B, V]; min(1, p_y / m_y), the probability of keeping a chosen draft y.
    accepted:    float64 [B, V]; a = min(p, m), the accepted-mass vector of the rule used.
    recovered:   float64 [B, V]; the residual law (p - a) / (1 - sum a) of the recovered token.
    acceptance:  float64 [B]; the acceptance rate of the rule used, exact where ``certified``.
    alpha_star:  float64 [B]; alpha* from the same scan.
    certified:   bool [B]; ``acceptance`` is exact.
    support:     int64 [B]; number of tokens with q > 0.
    The subclasses (one per method) add what their output law needs; ``method`` names it.
    """

    method: ClassVar[str] = ""
    law: str
    n: int
    accept_prob: np.ndarray
    accepted: np.ndarray
    recovered: np.ndarray
    acceptance: np.ndarray
    alpha_star: np.ndarray
    certified: np.ndarray
    support: np.ndarray

    @property
    def batch_size(self) -> int:
        return self.acceptance.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.accepted.shape[1]


def residual_row(p: np.ndarray, order: np.ndarray, rule_mass: np.ndarray) -> np.ndarray:
    """Unnormalised residual max(p - m, 0) of one row [V] (= p - min(p, m)), m [K] in ``order``;
    p itself where it is empty (see :class:`CappedRule`)."""
    left = p.copy()
    left[order] = np.maximum(p[order] - rule_mass, 0.0)
    return left if left.sum() > EMPTY_MASS else p


# Up to this many (position, draft) comparisons a draft's position is found by comparing with the
# order; beyond it through a token -> position table (O(V)).
COMPARE_POSITIONS_MAX = 32_768


def positions_of(order: np.ndarray, drafts: np.ndarray, vocab: int) -> np.ndarray:
    """Position in ``order`` [K] of each draft [n] (every draft has q > 0, so it is there)."""
    if order.size * drafts.size <= COMPARE_POSITIONS_MAX:
        return np.argmax(order[None, :] == drafts[:, None], axis=1)
    rank = np.empty(vocab, dtype=np.int64)
    rank[order] = np.arange(order.size)
    return rank[drafts]


def keep_or_recover(
    p: np.ndarray, order: np.ndarray, rule_mass: np.ndarray, chosen: int, u_keep: float, u_residual: float
) -> int:
    """Keep the chosen draft (position ``chosen`` of ``order``) when u_keep m_y < p_y, i.e. with
    probability min(1, p_y / m_y) (never where m_y = 0), else draw the recovered token from the
    residual max(p - m, 0) by its inverse CDF at u_residual (u_keep, u_residual ~ Uniform[0, 1))."""
    mass, token = rule_mass[chosen], int(order[chosen])
    if mass > 0 and u_keep * mass < p[token]:
        return token
    return int(draw(np.ascontiguousarray(residual_row(p, order, rule_mass), dtype=np.float64), u_residual))
