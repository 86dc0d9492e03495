"""The optimal acceptance rate alpha* of a draft law (Hu et al., ICLR 2025; spec section 3).

For target p, draft q, n drafts from a law with Qall(H) = P(all n drafts lie in H), the best
acceptance P(y in set(x)) of any verifier that emits y ~ p exactly is the optimal-transport value

    alpha* = 1 + min_{H subset V} [ p(H) - Qall(H) ].

For ``iid``, ``without_replacement`` and ``conditional_poisson`` an optimal H is a prefix of the
tokens sorted by q(x)/p(x) in decreasing order (p = 0 first), so one sort and a scan over the V + 1
prefixes solve it (sort-and-scan). ``greedy`` (and ``spechub``, the same unordered law at n = 2)
have the closed form alpha* = p(T) + sum_{x not in T} min(p_x, q'_x), T = top-(n-1) of q.

``bound_reference`` is the plain brute force over all 2^V subsets, with Qall from the law's explicit
tuple enumeration: the independent check the tests compare with.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from mdsd._validate import as_probs, check_pair
from mdsd.laws import complement_renormalised, get_law, top_tokens


@dataclass(frozen=True)
class OptimalBound:
    """alpha* and an optimal dual set H*, for one (p, q) pair or a batch.

    alpha:       float, or [B...] array for batched input.
    optimal_set: bool [..., V]; a minimiser H* of p(H) - Qall(H) (needed by optimal verifiers).
    """

    alpha: float | np.ndarray
    optimal_set: np.ndarray
    law: str
    n: int


def scan_order(target_probs: np.ndarray, draft_probs: np.ndarray) -> np.ndarray:
    """Tokens sorted by q/p decreasing (p = 0 first, q = 0 last), ties by lower index. [..., V]"""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = draft_probs / target_probs
    ratio = np.where(target_probs == 0, np.inf, ratio)
    return np.argsort(-ratio, axis=-1, kind="stable")


def optimal_bound(target_probs, draft_probs, n: int, law="iid", *, normalize=False) -> OptimalBound:
    """Optimal acceptance rate alpha* of ``law`` with n drafts, and an optimal set H*.

    Args:
        target_probs: p, [..., V] probabilities (rows sum to 1).
        draft_probs:  q, [..., V], same shape; the law the drafts are really drawn from.
        n: number of drafts.
        law: ``iid``, ``without_replacement``, ``greedy``, ``spechub`` (n = 2) or
            ``conditional_poisson``.
        normalize: renormalise rows that do not sum to 1 instead of raising.

    Note on ``without_replacement``: Qall is computed exactly by the exponential-race integral.
    The elementary-symmetric ratio e_n(q_H) / e_n(q) is exact only for ``conditional_poisson``;
    for sequential sampling it is wrong: q = (0.5, 0.3, 0.2), n = 2, H = first two tokens gives
    Qall = 0.5143 (sequential) but 0.4839 (ratio), and the scan then overstates alpha* by up to
    ~0.08 on random cases.

    >>> optimal_bound([0.5, 0.5], [0.5, 0.5], 1).alpha
    1.0
    """
    p = as_probs(target_probs, "target_probs", normalize=normalize)
    q = as_probs(draft_probs, "draft_probs", normalize=normalize)
    check_pair(p, q)
    the_law = get_law(law)
    n = the_law.check(q, n)
    batch_shape, vocab = p.shape[:-1], p.shape[-1]
    p2, q2 = p.reshape(-1, vocab), q.reshape(-1, vocab)

    if the_law.prefix_scan:
        alpha, optimal_set = _sort_and_scan(p2, q2, n, the_law)
    else:
        alpha, optimal_set = _greedy_closed_form(p2, q2, n)

    alpha = np.clip(alpha, 0.0, 1.0).reshape(batch_shape)
    optimal_set = optimal_set.reshape(p.shape)
    return OptimalBound(
        alpha=float(alpha) if not batch_shape else alpha,
        optimal_set=optimal_set,
        law=the_law.name,
        n=n,
    )


def optimal_acceptance(target_probs, draft_probs, n: int, law="iid", *, normalize=False):
    """alpha* = 1 + min_H [p(H) - Qall(H)]: a float for 1-D inputs, an array for [..., V].

    See :func:`optimal_bound` for the arguments and the laws.

    >>> round(optimal_acceptance([0.6, 0.4], [0.4, 0.6], 1), 12)
    0.8
    """
    return optimal_bound(target_probs, draft_probs, n, law, normalize=normalize).alpha


def _sort_and_scan(p, q, n, law):
    """[B, V] x [B, V] -> alpha [B], H* [B, V] by the prefix scan of the q/p order."""
    order = scan_order(p, q)
    p_sorted = np.take_along_axis(p, order, axis=1)
    q_sorted = np.take_along_axis(q, order, axis=1)
    p_prefix = np.zeros((p.shape[0], p.shape[1] + 1))
    p_prefix[:, 1:] = np.cumsum(p_sorted, axis=1)
    objective = p_prefix - law.qall_prefixes(q_sorted, n)  # f(H_k), k = 0..V
    best = np.argmin(objective, axis=1)
    alpha = 1.0 + objective[np.arange(p.shape[0]), best]
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(p.shape[1])[None, :], axis=1)
    optimal_set = ranks < best[:, None]
    return alpha, optimal_set


def _greedy_closed_form(p, q, n):
    """alpha* = p(T) + sum_{x not in T} min(p_x, q'_x); H* = T + {x not in T: q'_x > p_x}."""
    top = top_tokens(q, n - 1)
    rest = complement_renormalised(q, top)  # q', zero on T
    in_top = np.zeros(p.shape, dtype=bool)
    np.put_along_axis(in_top, top, True, axis=1)
    alpha = np.where(in_top, p, np.minimum(p, rest)).sum(axis=1)
    optimal_set = in_top | (rest > p)
    return alpha, optimal_set


# -- reference ---------------------------------------------------------------------------------


def qall_reference(tuples: np.ndarray, probs: np.ndarray, subset_mask: np.ndarray) -> float:
    """P(all drafts in H) from an explicit tuple distribution. tuples [M, n], subset_mask [V]."""
    inside = subset_mask[tuples].all(axis=1)
    return float(probs[inside].sum())


def bound_reference(target_probs, draft_probs, n: int, law="iid", *, max_vocab: int = 14):
    """alpha* by brute force over all subsets H (Qall by enumerating the law's tuples).

    Returns (alpha, optimal_set). Exponential in V: refuses V > max_vocab.
    """
    p = as_probs(target_probs, "target_probs")
    q = as_probs(draft_probs, "draft_probs")
    check_pair(p, q)
    if p.ndim != 1 or p.size > max_vocab:
        raise ValueError(
            f"bound_reference enumerates 2^V subsets: needs 1-D inputs with V <= {max_vocab}, "
            f"got shape {p.shape}"
        )
    tuples, probs = get_law(law).enumerate(q, n)
    best, best_set = 0.0, np.zeros(p.size, dtype=bool)
    for bits in itertools.product([False, True], repeat=p.size):
        mask = np.array(bits)
        value = p[mask].sum() - qall_reference(tuples, probs, mask)
        if value < best:
            best, best_set = value, mask
    return 1.0 + best, best_set
