"""The closed forms and exact solvers the classic verifiers (``mdsd.verifiers.classic``) are
built on: K-SEQ's rho* (fast bracket-and-solve and the bisection reference), the law of the
importance-selected draft and the importance verifier's exact acceptance, the exact acceptance of
recursive rejection sampling without replacement (n = 2 in closed form, n >= 3 by a DP over
draw prefixes), and two small helpers. Shapes: p, q [B, V] float64 unless a docstring says one
row [V]; written against ``mdsd._array_ops`` (numpy or torch) where a torch path exists.
"""

from __future__ import annotations

import math

import numpy as np

from mdsd._array_ops import NumpyOps, backend
from mdsd._optional import compiled_module
from mdsd.verifiers.base import gather, residual

ROOT_ITERATIONS = 80  # bisection steps for K-SEQ's rho* (reference): [1, n] shrinks below 1e-22
INTERVAL_ITERATIONS = 64  # bisection steps on the closed form of beta between two breakpoints


def at_least_one(beta, n: int):
    """1 - (1 - beta)^n, accurate for tiny beta (log1p/expm1) and exact 1 at beta = 1."""
    ops = backend(beta)
    return -ops.expm1(n * ops.log1p(-ops.minimum(beta, 1.0)))


def drop_token(q, tokens):
    """q with tokens[b] removed from row b, renormalised (normaliser summed over the rest)."""
    ops = backend(q)
    rest = ops.copy(q)
    ops.put(rest, tokens, 0.0)
    return rest / ops.row_sum(rest, keepdim=True)


# Exact enumeration of rrs_without_replacement for n >= 3 keeps at most this many draw prefixes
# (tree nodes) at one depth; each holds two vectors over the support of q (+1 bucket).
MAX_TREE_ROWS = 300_000


def rrs_wor_acceptance_tree(p, q, n: int, max_rows: int = MAX_TREE_ROWS):
    """Exact acceptance of ``rrs_without_replacement`` by a DP over the draw sequence; float or None.

    p, q: [V] (one row). A node is a rejected draw prefix (x_1..x_i) with its probability w, the
    verifier's current target cur and draft law q_cur. The next draft x ~ q_cur is accepted with
    probability min(1, cur_x / q_cur_x), so the node adds w * sum_x min(cur_x, q_cur_x) to alpha,
    and spawns the child x with weight w (q_cur_x - cur_x)_+, cur' = resid(cur, q_cur) (the same
    for every child) and q_cur' = q_cur without x. Children with zero weight are pruned; prefixes
    share their work, so the cost is the number of reachable rejected prefixes times the support
    of q (at most s (s-1) ... (s-n+2) nodes at the last depth for support s; top-k = 64, n = 4:
    ~250k). Tokens with q = 0 are never drafted and are merged into one bucket (resid keeps their
    mass). Returns None when a depth would exceed ``max_rows`` nodes.
    """
    support = q > 0
    cur = np.append(p[support], p[~support].sum())[None, :]  # [R, s + 1]
    q_cur = np.append(q[support], 0.0)[None, :]
    weight = np.ones(1)
    alpha = 0.0
    for depth in range(n):
        alpha += float(weight @ np.minimum(cur, q_cur).sum(axis=1))
        if depth == n - 1:
            break
        reject = np.maximum(q_cur - cur, 0.0)  # per unit weight: draw x and reject it
        rows, tokens = np.nonzero(reject > 0)
        if rows.size > max_rows:
            return None
        if rows.size == 0:
            break
        weight = weight[rows] * reject[rows, tokens]
        cur = residual(cur, q_cur)[rows]
        q_cur = drop_token(q_cur[rows], tokens)
    return alpha


def rrs_wor_acceptance_walk(p, q, n: int, max_rows: int = MAX_TREE_ROWS):
    """:func:`rrs_wor_acceptance_tree` by its compiled twin (``mdsd.verifiers._compiled.
    rrs_wor_tree``): the same draw tree walked depth first, one node per depth in memory. The cost
    is the number of inner nodes times the support (the last draw of every prefix is summed in
    O(s log s) per parent), without the per-depth [R, s + 1] arrays. Same value up to the order
    of the sums, same refusals (None when a depth would exceed ``max_rows`` nodes); the
    reference where numba is missing.
    """
    compiled = compiled_kernels()
    if compiled is None:  # pragma: no cover - numba is a dependency
        return rrs_wor_acceptance_tree(p, q, n, max_rows)
    if n == 1:  # one draft: the root alone
        return float(np.minimum(p, q).sum())
    support = q > 0
    cur = np.append(p[support], p[~support].sum())  # [s + 1]: q = 0 tokens in one bucket
    q_cur = np.append(q[support], 0.0)
    alpha, complete = compiled.rrs_wor_tree(cur, q_cur, n, max_rows)
    return float(alpha) if complete else None


def rrs_wor_acceptance_two(p, q):
    """Exact acceptance of ``rrs_without_replacement`` with n = 2 drafts, O(V log V) per row.

    First draft x ~ q: accepted with probability sum_x min(p_x, q_x) = 1 - D. On rejection
    (probability D = sum (q - p)_+) the target becomes r = (p - q)_+ / D; the second draft is
    y ~ q^{-x} = q_y / (1 - q_x), y != x, and is accepted with probability min(1, r_y / q^{-x}_y).
    Rejecting x happens with probability q_x - min(p_x, q_x) = (q_x - p_x)_+, so

        alpha = (1 - D) + sum_x (q_x - p_x)_+ sum_{y != x} min(q_y / (1 - q_x), r_y).

    With s_x = 1 - q_x, the inner sum is S(s_x) - min(q_x / s_x, r_x), where
    S(s) = sum_y min(q_y / s, r_y) = sum_{y: q_y / r_y <= s} q_y / s + sum_{y: q_y / r_y > s} r_y
    is evaluated for all x at once after sorting the thresholds q_y / r_y: O(V log V).
    """
    ops = backend(p)
    is_numpy = ops.name == "numpy"
    excess = ops.positive_part(q - p)  # (q_x - p_x)_+, [B, V]
    rejected = ops.row_sum(excess, keepdim=True)  # D
    first = 1.0 - rejected[:, 0]
    deficit = ops.positive_part(p - q)  # D r
    r = ops.divide_safe(deficit, rejected, 0.0)  # residual target, [B, V]
    # thresholds q_y / r_y (inf where r_y = 0: then min(q_y / s, 0) = 0 always)
    threshold = ops.divide_safe(q, r, np.inf)
    threshold = ops.where(r > 0, threshold, np.inf)
    order = ops.argsort_descending(-threshold, stable=False)  # ascending thresholds
    t_sorted = ops.gather(threshold, order)
    q_cum = ops.cumsum(ops.gather(q, order))  # sum of q_y over the k smallest thresholds
    r_sorted = ops.gather(r, order)
    r_total = ops.row_sum(r, keepdim=True)
    r_cum = ops.cumsum(r_sorted)
    # 1 - q_x as the sum of the others: total - q_x loses all precision when q_x is close to 1,
    # and only one token of a row can exceed 1/2, so for it the others are summed directly
    big = q > 0.5
    s = ops.where(big, ops.row_sum(ops.where(big, 0.0, q), keepdim=True), ops.row_sum(q, keepdim=True) - q)
    # count of thresholds <= s_x per row (searchsorted row by row)
    if is_numpy:
        count = np.stack([np.searchsorted(t_sorted[b], s[b], side="right") for b in range(len(s))])
    else:
        import torch

        count = torch.searchsorted(t_sorted.contiguous(), s.contiguous(), right=True)
    idx = ops.maximum(count - 1, 0)
    below_q = ops.where(count > 0, ops.gather(q_cum, idx), 0.0)
    below_r = ops.where(count > 0, ops.gather(r_cum, idx), 0.0)
    s_safe = ops.where(s > 0, s, 1.0)
    inner_all = below_q / s_safe + (r_total - below_r)  # S(s_x)
    own = ops.minimum(q / s_safe, r)
    inner = ops.positive_part(inner_all - own)
    second = ops.row_sum(ops.where(excess > 0, excess * inner, 0.0))
    return first + second


def kseq_rho_reference(p, q, n: int):
    """K-SEQ's rho* by bisection on [1, n] (80 steps, each O(V)): the plain reference."""
    ops = backend(p)

    def beta(rho):
        return ops.row_sum(ops.minimum(q, p / rho[:, None]))

    def g(rho):
        b = beta(rho)
        return at_least_one(b, n) - rho * b

    lo = ops.ones_rows(p)
    hi = lo * float(n)
    at_one = g(lo) <= 0  # root at rho = 1 (n = 1, p = q, or disjoint supports)
    hi = ops.where(at_one, lo, hi)
    for _ in range(ROOT_ITERATIONS):
        mid = 0.5 * (lo + hi)
        positive = g(mid) > 0
        lo = ops.where(positive, mid, lo)
        hi = ops.where(positive, hi, mid)
    return hi, beta(hi)


def _kseq_bracket_sorted(p, q, n: int):
    """(lo, hi, head, tail) of ``kseq_rho`` after one sort (torch, or numpy without numba): the
    neighbouring breakpoints with g(lo) > 0 >= g(hi), and beta = head + tail / rho between them."""
    ops = backend(p)
    n_float = float(n)
    ratio = ops.divide_safe(p, q, n_float)  # q = 0: contributes min(0, .) = 0 either way
    ratio = ops.minimum(ratio, n_float)  # tokens above n give q for every rho <= n
    order = ops.argsort_descending(ratio, stable=False)
    q_sorted, p_sorted = ops.gather(q, order), ops.gather(p, order)
    # the same ratios, recomputed in sorted order (a division is cheaper than a gather)
    r_sorted = ops.minimum(ops.divide_safe(p_sorted, q_sorted, n_float), n_float)  # decreasing
    q_head = ops.cumsum(q_sorted)  # A_k: tokens 1..k give q
    p_total = ops.row_sum(p, keepdim=True)
    p_tail = ops.positive_part(p_total - ops.cumsum(p_sorted))  # B_k: tokens k+1..V give p/rho
    vocab = p.shape[1]
    rows = ops.rows(p)

    def g_at(k):  # g at breakpoint k (0-based), [B]; breakpoints below 1 count as positive
        r = r_sorted[rows, k]
        in_range = r >= 1.0
        r = ops.where(in_range, r, 1.0)
        b = q_head[rows, k] + p_tail[rows, k] / r
        return ops.where(in_range, at_least_one(b, n) - r * b, 1.0)

    # k*: the number of breakpoints with g <= 0, a prefix since g increases with k (rho falls);
    # binary search per row, O(log V) evaluations of the closed form
    low = 0 * rows  # g <= 0 for every k < low
    high = low + vocab  # g > 0 for every k >= high
    while ops.any(low < high):
        mid = (low + high) // 2
        probe = ops.minimum(mid, vocab - 1)
        nonpositive = (g_at(probe) <= 0) & (low < high)
        low = ops.where(nonpositive, mid + 1, low)
        high = ops.where(nonpositive | (low >= high), high, mid)
    k_star = low
    # interval [lo, hi] = [r_(k*+1), r_(k*)], with r_(0) = n and r_(V+1) = 1
    hi = ops.where(k_star > 0, r_sorted[rows, ops.maximum(k_star - 1, 0)], n_float)
    lo = ops.where(k_star < vocab, r_sorted[rows, ops.minimum(k_star, vocab - 1)], 1.0)
    lo = ops.maximum(lo, 1.0)  # g(1) <= 0 is handled by at_one below
    head = ops.where(k_star > 0, q_head[rows, ops.maximum(k_star - 1, 0)], 0.0)
    tail = ops.where(k_star > 0, p_tail[rows, ops.maximum(k_star - 1, 0)], p_total[:, 0])
    return lo, hi, head, tail


def compiled_kernels():
    """``mdsd.verifiers._compiled`` (numba kernels for numpy rows), or None without numba
    (imported on first use, ``mdsd._optional.compiled_module``)."""
    return compiled_module("mdsd.verifiers._compiled")


def kseq_rho(p, q, n: int):
    """K-SEQ's rho* in [1, n] with 1 - (1 - beta)^n = rho * beta, beta(rho) = sum min(q, p / rho).

    Exact after one sort (torch) or one selection (numpy: ``mdsd.verifiers._compiled``, expected
    O(V)). beta is piecewise of the form A + B / rho between the breakpoints
    p_x / q_x (capped at n): tokens with p_x / q_x >= rho give q_x, the others p_x / rho. With
    the breakpoints sorted decreasingly, g(rho) = 1 - (1 - beta)^n - rho beta (decreasing in rho)
    is evaluated at every breakpoint from prefix sums; the root lies between the two neighbours
    where g changes sign, where beta = A + B / rho in closed form; bisection on that scalar
    function (``INTERVAL_ITERATIONS`` steps, O(1) each) keeps g(lo) > 0 >= g(hi). Returns
    (rho, beta) at the ``hi`` end, beta summed over the vocabulary, so that the residual
    p - min(q, p / rho) c stays non-negative whatever the tolerance (only ~1e-16 acceptance lost).
    """
    ops = backend(p)
    compiled = compiled_kernels() if ops is NumpyOps else None
    if compiled is not None:  # the same bracket by selection, expected O(V), no sort
        bracket = compiled.kseq_brackets(
            np.ascontiguousarray(p, dtype=np.float64), np.ascontiguousarray(q, dtype=np.float64), n
        )
        lo, hi, head, tail = bracket[:, 0], bracket[:, 1], bracket[:, 2], bracket[:, 3]
    else:
        lo, hi, head, tail = _kseq_bracket_sorted(p, q, n)

    def g(rho):
        b = head + tail / rho
        return at_least_one(b, n) - rho * b

    at_one = g(1.0) <= 0
    for _ in range(INTERVAL_ITERATIONS):
        mid = 0.5 * (lo + hi)
        positive = g(mid) > 0
        lo = ops.where(positive, mid, lo)
        hi = ops.where(positive, hi, mid)
    rho = ops.where(at_one, 1.0, hi)
    return rho, ops.row_sum(ops.minimum(q, p / rho[:, None]))


def picked_draft(p, q, drafts):
    """Max-importance selection: the draft with the largest p / q, ties by lower id.  -> [B]"""
    ops = backend(p)
    weight = gather(p, drafts) / gather(q, drafts)  # [B, n], q > 0 on drafts
    best = weight == (
        weight.max(1, keepdims=True) if ops.name == "numpy" else weight.max(1, keepdim=True).values
    )
    picked = ops.where(best, drafts, p.shape[1]).min(1)
    return picked if ops.name == "numpy" else picked.values


def importance_rank(p, q):
    """Tokens in max-importance rank order: p / q decreasing, ties by lower id, q = 0 tokens last
    (by id). The importance verifier draws its residual token along this order.  [B, V] int64"""
    ops = backend(p)
    return ops.argsort_descending(ops.divide_safe(p, q, -np.inf))


def importance_law(p, q, n: int):
    """Law p_I of the draft picked by max-importance selection from n i.i.d. drafts.

    Tokens are ranked by importance weight p/q (decreasing; ties by lower index); the picked draft
    is the best-ranked one. With G(k) = q(tokens of rank >= k) (summed from the tail):
    p_I(token of rank k) = G(k)^n - G(k+1)^n (evaluated as (G(k) - G(k+1)) sum_j G(k)^j G(k+1)^{n-1-j},
    G clipped at 1).   [B, V] -> [B, V]
    numpy rows: numpy's (unstable, vectorised) argsort, then one compiled pass that puts tied
    weights in index order and writes p_I (``mdsd.verifiers._compiled.importance_law_ordered``).
    """
    ops = backend(p)
    compiled = compiled_kernels() if ops is NumpyOps else None
    if compiled is not None:
        p = np.ascontiguousarray(p, dtype=np.float64)
        q = np.ascontiguousarray(q, dtype=np.float64)
        key = compiled.importance_keys(p, q)  # -p/q, +inf where q = 0
        order = np.argsort(key, axis=-1)
        out = np.empty(q.shape)
        compiled.importance_law_ordered(key, q, q.sum(axis=1), order, n, out)
        return out
    weight = ops.divide_safe(p, q, -np.inf)
    order = ops.argsort_descending(weight)
    q_sorted = ops.gather(q, order)
    total = ops.row_sum(q_sorted, keepdim=True)
    # G(k) = q(rank >= k) = total - q(rank < k); G(k + 1) = total - q(rank <= k)
    head = ops.cumsum(q_sorted)
    unclipped = ops.positive_part(total - head)  # G(k + 1)
    tail = ops.minimum(unclipped + q_sorted, 1.0)  # G(k)
    after = ops.minimum(unclipped, 1.0)
    # tail^n - after^n = d sum_{j<n} tail^j after^{n-1-j}, d = tail - after (= q unless clipped):
    # no cancellation (the plain difference lost ~1e-9 relative on top-ranked tokens of tiny q)
    d = ops.where(unclipped + q_sorted <= 1.0, q_sorted, tail - after)
    power, terms = ops.full(q_sorted.shape, 1.0, q_sorted), ops.full(q_sorted.shape, 1.0, q_sorted)
    for _ in range(n - 1):
        power = power * tail
        terms = terms * after + power
    picked_sorted = d * terms
    picked = ops.zeros_like(q)
    if ops.name == "numpy":
        np.put_along_axis(picked, order, picked_sorted, axis=1)
    else:
        picked.scatter_(1, order, picked_sorted)
    return ops.where(q > 0, ops.positive_part(picked), 0.0)


def importance_acceptance(target_probs: np.ndarray, draft_probs: np.ndarray, n: int) -> np.ndarray:
    """Exact acceptance of the ``importance`` verifier with n i.i.d. drafts, O(n V) per row.

    Rank tokens by p/q decreasing (ties by lower id); G_k = q(rank >= k). The picked draft has rank k
    with probability p_I(k) = G_k^n - G_{k+1}^n and is accepted w.p. a_k = min(1, p_k / p_I(k));
    otherwise y ~ r = resid(p, p_I), which is accepted when y is one of the other drafts (all of
    rank > k). With j > k, P(pick = k, j in set) = G_k^n - G_{k+1}^n - (G_k - q_j)^n +
    (G_{k+1} - q_j)^n, and expanding the powers binomially with S_m(k) = sum_{j > k} r_j q_j^m:

        alpha = sum_k min(p_k, p_I(k))
                + sum_k (1 - a_k) sum_{m=1..n} C(n, m) (-1)^(m+1) S_m(k) (G_k^(n-m) - G_{k+1}^(n-m)).

    [B, V] x [B, V] -> [B]. Checked against enumeration in the tests.
    """
    p, q = np.asarray(target_probs, np.float64), np.asarray(draft_probs, np.float64)
    picked = importance_law(p, q, n)  # p_I, [B, V]
    diff = np.maximum(p - picked, 0.0)
    mass = diff.sum(axis=1, keepdims=True)
    resid = np.where(mass > 0, diff / np.where(mass > 0, mass, 1.0), 0.0)  # r, [B, V]
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(q > 0, p / np.where(q > 0, q, 1.0), -np.inf)
    order = np.argsort(-weight, axis=1, kind="stable")  # rank order, q = 0 tokens last
    p_s, q_s, pi_s, r_s = (np.take_along_axis(a, order, axis=1) for a in (p, q, picked, resid))
    tail = np.minimum(np.cumsum(q_s[:, ::-1], axis=1)[:, ::-1], 1.0)  # G_k
    after = np.concatenate([tail[:, 1:], np.zeros((p.shape[0], 1))], axis=1)  # G_{k+1}
    with np.errstate(divide="ignore", invalid="ignore"):
        accept = np.where(pi_s > 0, np.minimum(1.0, p_s / np.where(pi_s > 0, pi_s, 1.0)), 1.0)
    total = np.minimum(p_s, pi_s).sum(axis=1)
    second = np.zeros_like(total)
    for m in range(1, n + 1):
        terms = r_s * q_s**m
        later = np.cumsum(terms[:, ::-1], axis=1)[:, ::-1] - terms  # S_m(k): ranks > k
        coeff = math.comb(n, m) * (-1.0) ** (m + 1)
        second += coeff * ((1.0 - accept) * later * (tail ** (n - m) - after ** (n - m))).sum(axis=1)
    return np.clip(total + second, 0.0, 1.0)
