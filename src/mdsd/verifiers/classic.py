"""The published exact verifiers (docs/theory.md §5), as conditional output laws.

Shapes: target_probs p and draft_probs q are float64 [B, V]; drafts are int64 [B, n] in draw
order; every ``output_law`` returns pi(. | x) as float64 [B, V]. Every verifier is written once
against ``mdsd._backend`` and runs on numpy arrays and on torch tensors (CPU or CUDA).

Sampling (``sample``, ``sample_with_branch``) exits early: the drafts are tested in order from
their ratios, and the vocabulary is read only after a rejection (see
``mdsd.verifiers._early_exit`` for the compiled numpy kernels; the ``_*_vectorised`` functions
below are the batch versions for torch, written against ``mdsd._backend``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mdsd._backend import NumpyOps, backend, complement_renormalised, top_mask
from mdsd.verifiers.base import (
    EarlyExitVerifier,
    gather,
    inverse_cdf,
    residual,
    safe_ratio,
    scatter_add,
)

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


# -- early-exit sampling: dispatch, and the batch-vectorised versions (torch; numpy on request) ---


def _early_exit_kernels(values, vectorised: bool):
    """``mdsd.verifiers._early_exit`` for numpy rows (None for torch, with ``vectorised``, or
    without numba): imported on first use."""
    global _EARLY_EXIT
    if vectorised or backend(values) is not NumpyOps:
        return None
    if _EARLY_EXIT is False:
        try:
            from mdsd.verifiers import _early_exit
        except ImportError:  # pragma: no cover - numba is a dependency
            _early_exit = None
        _EARLY_EXIT = _early_exit
    return _EARLY_EXIT


_EARLY_EXIT = False  # not imported yet


def _run_kernel(kernel, p, q, drafts, uniforms, *extra):
    """Call a row kernel of ``_early_exit`` on contiguous float64 / int64 copies (views when the
    inputs already are); returns (tokens [B], branch [B])."""
    rows = p.shape[0]
    tokens, branch = np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.int64)
    kernel(
        np.ascontiguousarray(p, dtype=np.float64),
        np.ascontiguousarray(q, dtype=np.float64),
        np.ascontiguousarray(drafts, dtype=np.int64),
        np.ascontiguousarray(uniforms, dtype=np.float64),
        *extra,
        tokens,
        branch,
    )
    return tokens, branch


def _undecided(drafts):
    """(tokens, branch) filled with -1, like drafts' rows: [B] int64 each."""
    tokens = drafts[:, 0] * 0 - 1
    return tokens, tokens * 1


def _rrs_vectorised(p, q, drafts, uniforms, distinct: bool):
    """RRS (``distinct``: without replacement) on a batch: test i on the rows still undecided,
    residual update only for the rows it rejects, final inverse-CDF draw for the rows left."""
    tokens, branch = _undecided(drafts)
    n = drafts.shape[1]
    live = backend(p).rows(p)  # row ids still undecided
    cur, q_cur = p, q
    for i in range(n):
        x = drafts[live, i]
        accept = uniforms[live, i] < safe_ratio(gather(cur, x), gather(q_cur, x))
        tokens[live[accept]], branch[live[accept]] = x[accept], i
        keep = ~accept
        live, x, cur, q_cur = live[keep], x[keep], cur[keep], q_cur[keep]
        if live.shape[0] == 0:
            return tokens, branch
        cur = residual(cur, q_cur)
        if distinct and i < n - 1:
            q_cur = drop_token(q_cur, x)
    tokens[live], branch[live] = inverse_cdf(cur, uniforms[live, n]), n
    return tokens, branch


def _kseq_vectorised(p, q, drafts, uniforms):
    """K-SEQ on a batch: tests decided from the bounds rho* in [1, n] where they can be; rho* is
    computed only for the rows with a test between the bounds or with every test rejected."""
    ops = backend(p)
    tokens, branch = _undecided(drafts)
    n = drafts.shape[1]
    rho, beta = ops.full((p.shape[0],), np.nan, p), ops.full((p.shape[0],), np.nan, p)
    live = ops.rows(p)

    def fill(rows):  # rho*, beta for the rows that have none yet
        rows = rows[rho[rows] != rho[rows]]
        if rows.shape[0]:
            rho[rows], beta[rows] = kseq_rho(p[rows], q[rows], n)

    for i in range(n):
        x = drafts[live, i]
        p_x, q_x, u = gather(p[live], x), gather(q[live], x), uniforms[live, i]
        fill(live[(u >= safe_ratio(p_x, n * q_x)) & (u < safe_ratio(p_x, q_x))])
        known = rho[live] == rho[live]
        exact = safe_ratio(p_x, ops.where(known, rho[live], 1.0) * q_x)
        accept = ops.where(known, u < exact, u < safe_ratio(p_x, n * q_x))
        tokens[live[accept]], branch[live[accept]] = x[accept], i
        live = live[~accept]
        if live.shape[0] == 0:
            return tokens, branch
    fill(live)
    p_live, r, b = p[live], rho[live], beta[live]
    c = ops.divide_safe(at_least_one(b, n), b, float(n))
    leftover = ops.positive_part(p_live - ops.minimum(q[live], p_live / r[:, None]) * c[:, None])
    empty = ops.row_sum(leftover, keepdim=True) <= 0
    tokens[live], branch[live] = inverse_cdf(ops.where(empty, p_live, leftover), uniforms[live, n]), n
    return tokens, branch


def _greedy_vectorised(p, q, drafts, uniforms):
    """The greedy law's verifier on a batch: q' = q off the first n - 1 drafts (one pass), the
    test of x_n, and resid(p, q') only for the rows it rejects."""
    tokens, branch = _undecided(drafts)
    rest = complement_renormalised(q, backend(q).mask_of(drafts[:, :-1], q.shape[1]))  # q'
    last = drafts[:, -1]
    accept = uniforms[:, 0] < safe_ratio(gather(p, last), gather(rest, last))
    tokens[accept], branch[accept] = last[accept], 0
    rejected = ~accept
    if backend(p).any(rejected):
        values = residual(p[rejected], rest[rejected])
        tokens[rejected], branch[rejected] = inverse_cdf(values, uniforms[rejected, 1]), 1
    return tokens, branch


def _spechub_vectorised(verifier, p, q, drafts, uniforms):
    """SpecHub on a batch: rows whose non-hub draft comes first and passes min(1, p_i / q_i) stop
    there; the others build the hub tables (``SpecHubVerifier._tables``) on their rows only."""
    ops = backend(p)
    tokens, branch = _undecided(drafts)
    d0, d1 = drafts[:, 0], drafts[:, 1]
    q0, q1 = gather(q, d0), gather(q, d1)
    hub_first = (q0 > q1) | ((q0 == q1) & (d0 < d1))
    other = ops.where(hub_first, d1, d0)
    early = ~hub_first & (uniforms[:, 0] < safe_ratio(gather(p, other), gather(q, other)))
    tokens[early], branch[early] = other[early], 0
    live = ops.rows(p)[~early]
    if live.shape[0] == 0:
        return tokens, branch
    p, q, other, hub_first, u = p[live], q[live], other[live], hub_first[live], uniforms[live]
    hub, pair_hub_first, p1, left_i, left_hub, p_hub, p_hub_left, recovered = verifier._tables(p, q)
    first = hub_first & (u[:, 0] < safe_ratio(gather(p1, other), gather(pair_hub_first, other)))
    accept_hub = ops.where(hub_first, safe_ratio(p_hub, left_hub), safe_ratio(p_hub_left, left_i))
    second = ~first & (u[:, 1] < accept_hub)
    empty = ops.row_sum(recovered, keepdim=True) <= 0
    tokens[live] = inverse_cdf(ops.where(empty, p, recovered), u[:, 2])
    branch[live] = 2
    tokens[live[second]], branch[live[second]] = hub[second], 1
    tokens[live[first]], branch[live[first]] = other[first], 0
    return tokens, branch


def _picked_draft(p, q, drafts):
    """Max-importance selection: the draft with the largest p / q, ties by lower id.  -> [B]"""
    ops = backend(p)
    weight = gather(p, drafts) / gather(q, drafts)  # [B, n], q > 0 on drafts
    best = weight == (
        weight.max(1, keepdims=True) if ops.name == "numpy" else weight.max(1, keepdim=True).values
    )
    picked = ops.where(best, drafts, p.shape[1]).min(1)
    return picked if ops.name == "numpy" else picked.values


def _importance_vectorised(p, q, drafts, uniforms):
    """Importance selection on a batch: p_I(picked) from one pass (no sort), the test, and the
    whole law p_I (``importance_law``, one sort) only for the rows it rejects."""
    ops = backend(p)
    tokens, branch = _undecided(drafts)
    n = drafts.shape[1]
    picked = _picked_draft(p, q, drafts)
    weight = ops.divide_safe(p, q, -np.inf)  # [B, V]
    best = gather(weight, picked)[:, None]
    ids = ops.rows(p.T)[None, :]  # token ids, [1, V]
    later = (weight < best) | ((weight == best) & (ids > picked[:, None]))
    after_unclipped = ops.row_sum(ops.where(later & (q > 0), q, 0.0))  # G_after
    q_s = gather(q, picked)
    tail, after = ops.minimum(after_unclipped + q_s, 1.0), ops.minimum(after_unclipped, 1.0)
    d = ops.where(after_unclipped + q_s <= 1.0, q_s, tail - after)
    power, terms = ops.ones_rows(p), ops.ones_rows(p)
    for _ in range(n - 1):  # tail^n - after^n = d sum_j tail^j after^(n-1-j)
        power = power * tail
        terms = terms * after + power
    accept = uniforms[:, 0] < safe_ratio(gather(p, picked), d * terms)
    tokens[accept], branch[accept] = picked[accept], 0
    rejected = ~accept
    if ops.any(rejected):
        values = residual(p[rejected], importance_law(p[rejected], q[rejected], n))
        tokens[rejected], branch[rejected] = inverse_cdf(values, uniforms[rejected, 1]), 1
    return tokens, branch


@dataclass(frozen=True)
class RRS(EarlyExitVerifier):
    """Recursive rejection sampling (SpecInfer), for i.i.d. drafts.

    cur = p. For i = 1..n: accept x_i with probability min(1, cur(x_i) / q(x_i)); on rejection
    cur <- resid(cur, q). If all are rejected, emit y ~ cur. Acceptance in closed form:
    alpha = 1 - prod_{k=1..n} (1 - sum_x min(p_k(x), q(x))), p_1 = p, p_{k+1} = resid(p_k, q).
    """

    name: str = "rrs"
    laws: tuple[str, ...] = ("iid",)

    def output_law(self, p, q, drafts, law):
        ops = backend(p)
        out = ops.zeros_like(p)
        reach = ops.ones_rows(p)  # P(all earlier drafts rejected)
        cur = p
        for i in range(drafts.shape[1]):
            x = drafts[:, i]
            accept = safe_ratio(gather(cur, x), gather(q, x))
            scatter_add(out, x, reach * accept)
            reach = reach * (1.0 - accept)
            cur = residual(cur, q)
        out += reach[:, None] * cur
        return out

    def uniforms_per_row(self, n):
        return n + 1

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        kernels = _early_exit_kernels(p, vectorised)
        if kernels is None:
            return _rrs_vectorised(p, q, drafts, uniforms, distinct=False)
        return _run_kernel(kernels.rrs_sample, p, q, drafts, uniforms, False)

    def acceptance(self, p, q, n, law):
        ops = backend(p)
        reject_all = ops.ones_rows(p)
        cur = p
        for _ in range(n):
            reject_all = reject_all * (1.0 - ops.row_sum(ops.minimum(cur, q)))
            cur = residual(cur, q)
        return 1.0 - reject_all


@dataclass(frozen=True)
class RRSWithoutReplacement(EarlyExitVerifier):
    """Recursive rejection sampling for drafts sampled without replacement (verify in draw order).

    cur = p, q_cur = q. For i = 1..n: accept x_i with probability min(1, cur(x_i) / q_cur(x_i));
    on rejection cur <- resid(cur, q_cur), then q_cur <- q_cur without x_i, renormalised.
    If all are rejected, emit y ~ cur.

    ``acceptance``: exact for n = 2 in O(V log V) (``rrs_wor_acceptance_two``); otherwise None
    (``mdsd.acceptance_rate`` then enumerates small supports or estimates).
    """

    name: str = "rrs_without_replacement"
    laws: tuple[str, ...] = ("without_replacement",)

    def output_law(self, p, q, drafts, law):
        ops = backend(p)
        out = ops.zeros_like(p)
        reach = ops.ones_rows(p)
        cur, q_cur = p, q
        n = drafts.shape[1]
        for i in range(n):
            x = drafts[:, i]
            accept = safe_ratio(gather(cur, x), gather(q_cur, x))
            scatter_add(out, x, reach * accept)
            reach = reach * (1.0 - accept)
            cur = residual(cur, q_cur)
            if i < n - 1:
                q_cur = drop_token(q_cur, x)
        out += reach[:, None] * cur
        return out

    def uniforms_per_row(self, n):
        return n + 1

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        kernels = _early_exit_kernels(p, vectorised)
        if kernels is None:
            return _rrs_vectorised(p, q, drafts, uniforms, distinct=True)
        return _run_kernel(kernels.rrs_sample, p, q, drafts, uniforms, True)

    def acceptance(self, p, q, n, law):
        ops = backend(p)
        if n == 1:
            return ops.row_sum(ops.minimum(p, q))
        if n == 2:
            return rrs_wor_acceptance_two(p, q)
        if ops.name != "numpy":
            return None
        rates = []
        for pr, qr in zip(p, q):
            rate = rrs_wor_acceptance_walk(pr, qr, n)
            if rate is None:
                return None
            rates.append(rate)
        return np.array(rates)

    def acceptance_method(self, n):
        return "closed_form" if n <= 2 else "enumeration"


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
    compiled = _compiled_kernels()
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
    s = ops.row_sum(q, keepdim=True) - q  # 1 - q_x, as a sum
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


def _compiled_kernels():
    """``mdsd.verifiers._compiled`` (numba kernels for numpy rows), or None without numba
    (imported on first use)."""
    global _COMPILED
    if _COMPILED is False:
        try:
            from mdsd.verifiers import _compiled
        except ImportError:  # pragma: no cover - numba is a dependency
            _compiled = None
        _COMPILED = _compiled
    return _COMPILED


_COMPILED = False  # not imported yet


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
    compiled = _compiled_kernels() if ops is NumpyOps else None
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


@dataclass(frozen=True)
class KSEQ(EarlyExitVerifier):
    """K-SEQ (SpecTr, Sun et al. 2023), for i.i.d. drafts.

    beta(rho) = sum_x min(q_x, p_x / rho); rho* in [1, n] solves 1 - (1 - beta)^n = rho beta.
    Accept the first x_i that passes probability min(1, p(x_i) / (rho* q(x_i))); if none, emit
    y ~ [p(y) - min(q_y, p_y / rho*) (1 - (1 - beta)^n) / beta] / (1 - beta)^n.
    Acceptance 1 - (1 - beta(rho*))^n (at least (1 - 1/e) alpha*).
    """

    name: str = "kseq"
    laws: tuple[str, ...] = ("iid",)

    def output_law(self, p, q, drafts, law):
        ops = backend(p)
        n = drafts.shape[1]
        rho, beta = kseq_rho(p, q, n)
        out = ops.zeros_like(p)
        reach = ops.ones_rows(p)
        for i in range(n):
            x = drafts[:, i]
            accept = safe_ratio(gather(p, x), rho * gather(q, x))
            scatter_add(out, x, reach * accept)
            reach = reach * (1.0 - accept)
        accepted_total = at_least_one(beta, n)
        # c = (1 - (1-beta)^n) / beta, whose limit as beta -> 0 is n (disjoint supports).
        c = ops.divide_safe(accepted_total, beta, float(n))
        leftover = p - ops.minimum(q, p / rho[:, None]) * c[:, None]
        # leftover >= 0 up to rounding (rho is on the safe side of the root); clip, then normalise.
        recovered = residual(ops.positive_part(leftover), 0.0)
        out += reach[:, None] * recovered
        return out

    def uniforms_per_row(self, n):
        return n + 1

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        kernels = _early_exit_kernels(p, vectorised)
        if kernels is None:
            return _kseq_vectorised(p, q, drafts, uniforms)
        unknown = np.full(p.shape[0], np.nan)
        tokens, branch = _run_kernel(kernels.kseq_sample, p, q, drafts, uniforms, unknown, unknown)
        pending = np.flatnonzero(branch < 0)  # a test between the bounds, or all rejected
        if pending.size:
            rho, beta = np.empty(pending.size), np.empty(pending.size)
            target, draft = np.ascontiguousarray(p[pending]), np.ascontiguousarray(q[pending])
            kernels.kseq_rho_rows(target, draft, drafts.shape[1], INTERVAL_ITERATIONS, rho, beta)
            tokens[pending], branch[pending] = _run_kernel(
                kernels.kseq_sample, target, draft, drafts[pending], uniforms[pending], rho, beta
            )
        return tokens, branch

    def acceptance(self, p, q, n, law):
        _, beta = kseq_rho(p, q, n)
        return at_least_one(beta, n)


@dataclass(frozen=True)
class GreedyVerifier(EarlyExitVerifier):
    """The optimal verifier of the greedy law (Hu et al., ICLR 2025).

    Drafts are T = top-(n-1) of q plus x_n ~ q'. Single-draft speculative sampling of p against q'
    on x_n: accept x_n with probability min(1, p(x_n) / q'(x_n)), else emit y ~ resid(p, q').
    q' is 0 on T, so the residual keeps T's target mass, and T's tokens are drafts: they count as
    accepted. Acceptance = alpha* of the law = p(T) + sum_{x not in T} min(p_x, q'_x).
    """

    name: str = "greedy"
    laws: tuple[str, ...] = ("greedy",)

    def output_law(self, p, q, drafts, law):
        n = drafts.shape[1]
        rest = complement_renormalised(q, top_mask(q, n - 1))  # q'
        last = drafts[:, -1]
        accept = safe_ratio(gather(p, last), gather(rest, last))
        out = residual(p, rest)
        out *= (1.0 - accept)[:, None]
        scatter_add(out, last, accept)
        return out

    def uniforms_per_row(self, n):
        return 2

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        kernels = _early_exit_kernels(p, vectorised)
        if kernels is None:
            return _greedy_vectorised(p, q, drafts, uniforms)
        return _run_kernel(kernels.greedy_sample, p, q, drafts, uniforms)

    def acceptance(self, p, q, n, law):
        ops = backend(p)
        in_top = top_mask(q, n - 1)
        rest = complement_renormalised(q, in_top)
        return ops.row_sum(ops.where(in_top, p, ops.minimum(p, rest)))


@dataclass(frozen=True)
class SpecHubVerifier(EarlyExitVerifier):
    """SpecHub (Sun et al., EMNLP 2024) for n = 2 drafts with hub a = argmax q.

    Q(a, i) = q_a q_i / (1 - q_a); p1(i) = max(p_i - q_i, 0); p2(i) = max(p1(i) - Q(a, i), 0);
    Q'(i, a) = max(q_i - p_i, 0); Q'(a, i) = max(Q(a, i) - p1(i), 0); pa1 = max(p_a - sum Q'(a, .), 0).
    Pair (i, a): accept i w.p. min(1, p_i / q_i), then a w.p. min(1, pa1 / sum Q'(., a)).
    Pair (a, i): accept i w.p. min(1, p1(i) / Q(a, i)), then a w.p. min(1, p_a / sum Q'(a, .)).
    Otherwise emit from p2 on i != a and max(pa1 - sum Q'(., a), 0) on a, normalised.
    Attains alpha* of its law (= greedy with n = 2). 1 - q_a is summed from the other entries, so
    q_a close to 1 keeps its precision.
    """

    name: str = "spechub"
    laws: tuple[str, ...] = ("spechub",)

    def _tables(self, p, q):
        ops = backend(p)
        rows = ops.rows(p)
        hub = ops.argmax(q)
        not_hub = q == q  # all True, [B, V]
        ops.put(not_hub, hub, False)
        zero = 0.0
        q_hub, p_hub = q[rows, hub], p[rows, hub]
        q_rest = ops.row_sum(ops.where(not_hub, q, zero))  # 1 - q_a, summed for precision
        pair_hub_first = ops.where(not_hub, q_hub[:, None] * q / q_rest[:, None], zero)  # Q(a, i)
        p1 = ops.where(not_hub, ops.positive_part(p - q), zero)
        p2 = ops.positive_part(p1 - pair_hub_first)
        left_i_first = ops.row_sum(ops.where(not_hub, ops.positive_part(q - p), zero))  # sum Q'(., a)
        left_hub_first = ops.row_sum(ops.positive_part(pair_hub_first - p1))  # sum Q'(a, .)
        p_hub_left = ops.positive_part(p_hub - left_hub_first)  # pa1
        recovered = ops.copy(p2)
        ops.put(recovered, hub, ops.positive_part(p_hub_left - left_i_first))
        return hub, pair_hub_first, p1, left_i_first, left_hub_first, p_hub, p_hub_left, recovered

    def output_law(self, p, q, drafts, law):
        ops = backend(p)
        rows = ops.rows(p)
        hub, pair_hub_first, p1, left_i, left_hub, p_hub, p_hub_left, recovered = self._tables(p, q)
        hub_first = drafts[:, 0] == hub
        other = ops.where(hub_first, drafts[:, 1], drafts[:, 0])  # the non-hub draft i
        # pair (i, a): i first
        accept_i_if_i_first = safe_ratio(p[rows, other], q[rows, other])
        accept_a_if_i_first = safe_ratio(p_hub_left, left_i)
        # pair (a, i): hub first
        accept_i_if_a_first = safe_ratio(p1[rows, other], pair_hub_first[rows, other])
        accept_a_if_a_first = safe_ratio(p_hub, left_hub)
        accept_i = ops.where(hub_first, accept_i_if_a_first, accept_i_if_i_first)
        accept_a = ops.where(hub_first, accept_a_if_a_first, accept_a_if_i_first)
        reach = (1.0 - accept_i) * (1.0 - accept_a)
        out = residual(recovered, 0.0)
        out *= reach[:, None]
        scatter_add(out, other, accept_i)
        scatter_add(out, hub, (1.0 - accept_i) * accept_a)
        return out

    def uniforms_per_row(self, n):
        return 3

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        kernels = _early_exit_kernels(p, vectorised)
        if kernels is None:
            return _spechub_vectorised(self, p, q, drafts, uniforms)
        return _run_kernel(kernels.spechub_sample, p, q, drafts, uniforms)

    def acceptance(self, p, q, n, law):
        return GreedyVerifier().acceptance(p, q, 2, law)


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
    compiled = _compiled_kernels() if ops is NumpyOps else None
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


@dataclass(frozen=True)
class Importance(EarlyExitVerifier):
    """Importance selection + single-draft speculative sampling (Khisti et al., ICLR 2025 form).

    Rule: pick the draft with the largest importance weight p(x)/q(x) (ties by lower token id), a
    deterministic member of Khisti et al.'s canonical family. Its exact law p_I has the closed form
    of ``importance_law``; then accept the picked token s with probability min(1, p(s)/p_I(s)),
    else emit y ~ resid(p, p_I). Exact for i.i.d. drafts for any p, q.
    """

    name: str = "importance"
    laws: tuple[str, ...] = ("iid",)

    def output_law(self, p, q, drafts, law):
        ops = backend(p)
        picked_law = importance_law(p, q, drafts.shape[1])
        weight = gather(p, drafts) / gather(q, drafts)  # [B, n], q > 0 on drafts
        # best weight, ties by lower token id
        best = (
            weight == weight.max(1, keepdims=True)
            if ops.name == "numpy"
            else (weight == weight.max(1, keepdim=True).values)
        )
        vocab = p.shape[1]
        picked = ops.where(best, drafts, vocab).min(1)
        picked = picked if ops.name == "numpy" else picked.values
        accept = safe_ratio(gather(p, picked), gather(picked_law, picked))
        out = residual(p, picked_law)
        out *= (1.0 - accept)[:, None]
        scatter_add(out, picked, accept)
        return out

    def uniforms_per_row(self, n):
        return 2

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        kernels = _early_exit_kernels(p, vectorised)
        if kernels is None:
            return _importance_vectorised(p, q, drafts, uniforms)
        tokens, branch = _run_kernel(kernels.importance_sample, p, q, drafts, uniforms)
        pending = np.flatnonzero(branch < 0)  # rejected: y ~ resid(p, p_I) needs all of p_I
        if pending.size:
            target = np.ascontiguousarray(p[pending], dtype=np.float64)
            picked_law = importance_law(target, q[pending], drafts.shape[1])
            drawn = np.empty(pending.size, dtype=np.int64)
            kernels.residual_draw(target, picked_law, uniforms[pending, 1], drawn)
            tokens[pending], branch[pending] = drawn, 1
        return tokens, branch

    def acceptance(self, p, q, n, law):
        return importance_acceptance(np.asarray(p), np.asarray(q), n)


@dataclass(frozen=True)
class SampleCheck(EarlyExitVerifier):
    """Draw y ~ p and accept iff y is a draft. Exact for every law; the baseline.

    Acceptance = sum_y p(y) P(y in set(x)) (inclusion probabilities of the law); optimal for
    deterministic top-n drafts, where it is p(top-n).
    """

    name: str = "sample_check"
    laws: tuple[str, ...] = (
        "iid",
        "without_replacement",
        "greedy",
        "spechub",
        "conditional_poisson",
    )

    def output_law(self, p, q, drafts, law):
        return backend(p).copy(p)

    def uniforms_per_row(self, n):
        return 1

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        """y ~ p directly (one sum, one search): no test, branch 0 for every row."""
        kernels = _early_exit_kernels(p, vectorised)
        if kernels is None:
            tokens = inverse_cdf(p, uniforms[:, 0])
        else:
            tokens = np.empty(p.shape[0], dtype=np.int64)
            kernels.categorical_draw(np.ascontiguousarray(p, dtype=np.float64), uniforms[:, 0], tokens)
        return tokens, tokens * 0

    def acceptance(self, p, q, n, law):
        try:
            inclusion = law.inclusion_probs(np.asarray(q), n)
        except NotImplementedError:
            return None
        return (np.asarray(p) * inclusion).sum(axis=1)
