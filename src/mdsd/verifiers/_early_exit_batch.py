"""Early-exit sampling of the classic verifiers (``mdsd.verifiers.classic``): the dispatch to the
compiled row kernels, and the batch-vectorised versions.

Every classic verifier emits its token by a short chain of tests on the drafts' ratios, reading
the vocabulary only after a rejection. On numpy rows ``early_exit_kernels`` returns the compiled
(numba) kernels of ``mdsd.verifiers._early_exit`` and ``run_kernel`` calls one; the
``*_vectorised`` functions here are the same rules on a whole batch at once, written against
``mdsd._array_ops`` (torch tensors on CPU or CUDA; numpy rows with ``vectorised=True``, which the
tests compare with the kernels). Shapes: p, q [B, V] float64; drafts [B, n] int64; uniforms
[B, k]; each sampler returns (tokens [B], branch [B]).
"""

from __future__ import annotations

import numpy as np

from mdsd._array_ops import NumpyOps, backend, complement_renormalised
from mdsd._optional import compiled_module
from mdsd.verifiers.base import gather, inverse_cdf, residual, safe_ratio
from mdsd.verifiers.classic_math import (
    at_least_one,
    drop_token,
    importance_law,
    importance_rank,
    kseq_rho,
    picked_draft,
)


def early_exit_kernels(values, vectorised: bool):
    """``mdsd.verifiers._early_exit`` for numpy rows (None for torch, with ``vectorised``, or
    without numba): imported on first use (``mdsd._optional.compiled_module``)."""
    if vectorised or backend(values) is not NumpyOps:
        return None
    return compiled_module("mdsd.verifiers._early_exit")


def run_kernel(kernel, p, q, drafts, uniforms, *extra, out=None):
    """Call a row kernel of ``_early_exit`` on contiguous float64 / int64 copies (views when the
    inputs already are); returns (tokens [B], branch [B]): new arrays, or ``out`` = (tokens,
    branch) updated in place (a kernel that finishes the rows an earlier call left pending)."""
    rows = p.shape[0]
    if out is None:
        out = np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.int64)
    tokens, branch = out
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


def rrs_vectorised(p, q, drafts, uniforms, distinct: bool):
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


def kseq_vectorised(p, q, drafts, uniforms):
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


def greedy_vectorised(p, q, drafts, uniforms):
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


def spechub_vectorised(verifier, p, q, drafts, uniforms):
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


def importance_vectorised(p, q, drafts, uniforms):
    """Importance selection on a batch: p_I(picked) from one pass (no sort), the test, and the
    whole law p_I (``importance_law``, one sort) only for the rows it rejects; their residual token
    is drawn by inverse CDF along the rank order (``importance_rank``), as the compiled path."""
    ops = backend(p)
    tokens, branch = _undecided(drafts)
    n = drafts.shape[1]
    picked = picked_draft(p, q, drafts)
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
        p_rej, q_rej = p[rejected], q[rejected]
        values = residual(p_rej, importance_law(p_rej, q_rej, n))
        order = importance_rank(p_rej, q_rej)  # the draw runs along the rank order
        drawn = inverse_cdf(gather(values, order), uniforms[rejected, 1])
        tokens[rejected], branch[rejected] = gather(order, drawn), 1
    return tokens, branch
