"""Compiled (numba) early-exit samplers of the classic verifiers, for numpy rows.

Every classic verifier emits its token by a short chain of tests: draft t_1 is accepted with
probability a_1; on rejection t_2 with probability a_2 (computed from the state the rejection left);
...; if every test rejects, the token is drawn from a final law R. ``Verifier.output_law`` sums this
chain into pi(. | x) over the whole vocabulary. The kernels here run the chain instead, with the
uniforms drawn up front by the caller (``uniforms [B, k]``, k fixed per verifier): test j accepts
iff ``uniforms[b, j] < a_j``; the final draw is the inverse CDF of R at ``uniforms[b, k - 1]``. A
test that needs only O(1) numbers (the first draft's ratio p(x) / q(x)) touches no vocabulary; the
vocabulary is read only after a rejection (one pass per residual update) and for the final draw
(one pass for the total, one search that stops at the drawn token).

Outputs: ``tokens [B]`` and ``branch [B]``: j when test j accepted (0-based), k - 1 when the token
came from the final draw, -1 when the row is left pending for the caller (K-SEQ without rho*,
importance after a rejection: its residual is drawn by ``importance_residual_draw``). The branch
makes the conditional law checkable exactly: tests are thresholds in their uniform and the final
draw is monotone in its uniform (along token ids; along the rank order p / q for importance), so
locating the breakpoints in each uniform recovers every a_j and R (tests/verifiers/test_early_exit.py).

Numerics: sums use four accumulators (``_sum``, i.e. ``mdsd.sampling.row_sum``; a different
rounding order from numpy's pairwise sum, same value to ~1e-16 relative); the search
(``mdsd.sampling.search``) walks blocks of four with the same rounding caveat and falls back to
the last token of positive mass should rounding leave the threshold unreached (an event of
probability ~1e-16). K-SEQ's beta and its final law are summed in vector lanes (its final law
by blocks of LEFTOVER_BLOCK tokens, so that the draw walks the block sums and reads one block
again, with the same fallback). Tokens of zero mass are never drawn.
"""

from __future__ import annotations

import numba
import numpy as np

from mdsd.sampling import draw as _draw
from mdsd.sampling import draw_rows as categorical_draw  # noqa: F401 (a kernel)
from mdsd.sampling import row_sum as _sum
from mdsd.sampling import search as _search
from mdsd.verifiers._compiled import _g, kseq_bracket_row
from mdsd.verifiers._importance_residual import importance_residual_draw
from mdsd.verifiers.base import EMPTY_MASS


@numba.njit(cache=True, fastmath=False)
def _residual_into(cur, cur_scale, q_cur, q_scale, out):
    """out = (cur cur_scale - q_cur q_scale)_+ in one pass; returns its sum (four accumulators)."""
    s0 = s1 = s2 = s3 = 0.0
    vocab = cur.size
    stop = vocab // 4 * 4
    for y in range(0, stop, 4):
        d0 = max(cur[y] * cur_scale - q_cur[y] * q_scale, 0.0)
        d1 = max(cur[y + 1] * cur_scale - q_cur[y + 1] * q_scale, 0.0)
        d2 = max(cur[y + 2] * cur_scale - q_cur[y + 2] * q_scale, 0.0)
        d3 = max(cur[y + 3] * cur_scale - q_cur[y + 3] * q_scale, 0.0)
        out[y], out[y + 1], out[y + 2], out[y + 3] = d0, d1, d2, d3
        s0 += d0
        s1 += d1
        s2 += d2
        s3 += d3
    for y in range(stop, vocab):
        out[y] = max(cur[y] * cur_scale - q_cur[y] * q_scale, 0.0)
        s0 += out[y]
    return (s0 + s1) + (s2 + s3)


@numba.njit(cache=True, fastmath=False)
def _sum_negative(values):
    """sum(max(-values, 0)) with four accumulators."""
    s0 = s1 = s2 = s3 = 0.0
    stop = values.size // 4 * 4
    for y in range(0, stop, 4):
        s0 += max(-values[y], 0.0)
        s1 += max(-values[y + 1], 0.0)
        s2 += max(-values[y + 2], 0.0)
        s3 += max(-values[y + 3], 0.0)
    for y in range(stop, values.size):
        s0 += max(-values[y], 0.0)
    return (s0 + s1) + (s2 + s3)


@numba.njit(cache=True, fastmath=False)
def _ratio(num, den):
    """min(1, num / den), 1 where den = 0 (``mdsd.verifiers.base.safe_ratio``)."""
    return min(1.0, num / den) if den > 0.0 else 1.0


@numba.njit(cache=True, fastmath=False)
def rrs_sample(p, q, drafts, uniforms, distinct, tokens, branch):
    """Recursive rejection sampling (``RRS``; ``distinct``: ``RRSWithoutReplacement``).

    cur = p, q_cur = q. Test i: accept x_i iff u_i < min(1, cur(x_i) / q_cur(x_i)). On rejection
    (one pass): cur <- (cur - q_cur)_+ / total, kept unchanged when total <= EMPTY_MASS (as
    ``base.residual``); without replacement also q_cur <- q_cur without x_i, renormalised by the sum
    of the kept entries. All n rejected: y ~ cur by inverse CDF at u_n. ``uniforms`` [B, n + 1].
    cur is stored unnormalised (values * scale) in one of two buffers; the other receives the next
    residual, so an empty residual leaves cur intact.
    """
    rows, vocab = p.shape
    n = drafts.shape[1]
    work = np.empty((0, 0))  # [3, V] on the first rejection: two cur buffers and q_cur
    for b in range(rows):
        cur, cur_scale, cur_total = p[b], 1.0, -1.0  # cur_x = cur[x] * cur_scale
        q_cur, q_scale = q[b], 1.0
        slot = 0
        tokens[b], branch[b] = -1, -1
        for i in range(n):
            x = drafts[b, i]
            if uniforms[b, i] < _ratio(cur[x] * cur_scale, q_cur[x] * q_scale):
                tokens[b], branch[b] = x, i
                break
            if work.shape[0] == 0:
                work = np.empty((3, vocab))
            out = work[slot]
            total = _residual_into(cur, cur_scale, q_cur, q_scale, out)
            if total > EMPTY_MASS:
                cur, cur_scale, cur_total = out, 1.0 / total, total
                slot = 1 - slot
            if distinct and i < n - 1:
                kept = work[2]
                if i == 0:
                    kept[:] = q[b]
                kept[x] = 0.0
                rest = _sum(kept, 0, vocab)
                q_cur, q_scale = kept, (1.0 / rest if rest > 0.0 else 1.0)
        if tokens[b] < 0:
            if cur_total < 0.0:  # every residual was empty: cur is still p
                cur_total = _sum(cur, 0, vocab)
            tokens[b], branch[b] = _search(cur, uniforms[b, n] * cur_total), n


@numba.njit(cache=True, fastmath=False)
def kseq_sample(p, q, drafts, uniforms, rho, beta, tokens, branch):
    """K-SEQ (``KSEQ``): test i accepts x_i iff u_i < min(1, p(x_i) / (rho* q(x_i))).

    rho* needs a pass over the vocabulary, but rho* lies in [1, n], so a test is decided without
    it when u_i < min(1, p / (n q)) (accept) or u_i >= min(1, p / q) (reject): correctly rounded
    products and quotients are monotone, so these bounds hold in floating point too. Rows where
    ``rho[b]`` is NaN and a test falls between the bounds, or every test rejects, are left pending
    (branch -1); the caller computes rho*, beta for them and calls again. The final draw: y ~
    (p - min(q, p / rho) c)_+, c = (1 - (1 - beta)^n) / beta (n when beta = 0), drawn
    proportionally while its total is positive, else from p. ``uniforms`` [B, n + 1].
    """
    rows, vocab = p.shape
    n = drafts.shape[1]
    nf = float(n)
    for b in range(rows):
        known = rho[b] == rho[b]
        tokens[b], branch[b] = -1, -1
        decided = True
        for i in range(n):
            x = drafts[b, i]
            px, qx, u = p[b, x], q[b, x], uniforms[b, i]
            if known:
                accept = u < _ratio(px, rho[b] * qx)
            elif u < _ratio(px, nf * qx):
                accept = True
            elif u >= _ratio(px, qx):
                accept = False
            else:
                decided = False
                break
            if accept:
                tokens[b], branch[b] = x, i
                break
        if tokens[b] >= 0 or not decided or not known:
            continue
        tokens[b], branch[b] = _kseq_final(p[b], q[b], uniforms[b, n], rho[b], beta[b], n), n


@numba.njit(cache=True, fastmath=False)
def kseq_sample_pending(p, q, drafts, uniforms, iterations, tokens, branch):
    """``kseq_sample``'s second call for the rows it left pending (branch -1), each finished
    before the next starts (rho*, beta by ``_kseq_rho_row``, the tests, the final draw): one
    row's p and q stay in the core's cache through its three passes, and no pending rows are
    copied. The same tokens as computing rho*, beta for those rows and calling ``kseq_sample``."""
    n = drafts.shape[1]
    for b in range(p.shape[0]):
        if branch[b] >= 0:
            continue
        rho, beta = _kseq_rho_row(p[b], q[b], n, iterations)
        tokens[b], branch[b] = -1, -1
        for i in range(n):
            x = drafts[b, i]
            if uniforms[b, i] < _ratio(p[b, x], rho * q[b, x]):
                tokens[b], branch[b] = x, i
                break
        if tokens[b] < 0:
            tokens[b], branch[b] = _kseq_final(p[b], q[b], uniforms[b, n], rho, beta, n), n


@numba.njit(cache=True, fastmath=False)
def _kseq_final(p, q, uniform, rho, beta, n):
    """K-SEQ's draw when every test rejects: y ~ (p - min(q, p / rho) c)_+ while its total is
    positive, else y ~ p; one row p, q [V]. One vectorised pass sums the law by blocks
    (``_kseq_leftover_blocks``); the draw walks the block sums and reads one block again."""
    nf = float(n)
    accepted_total = -np.expm1(nf * np.log1p(-min(beta, 1.0)))
    c = accepted_total / beta if beta > 0.0 else nf
    inv_rho = 1.0 / rho
    block_sums = np.empty((p.size + LEFTOVER_BLOCK - 1) // LEFTOVER_BLOCK)
    total = _kseq_leftover_blocks(p, q, inv_rho, c, block_sums)
    if total > 0.0:
        return _kseq_leftover_search(p, q, inv_rho, c, block_sums, uniform * total)
    return _draw(p, uniform)


LEFTOVER_BLOCK = 256  # tokens per block sum of K-SEQ's final law


@numba.njit(cache=True, inline="always")  # inlined: its callers' flags apply
def _kseq_leftover(p, q, inv_rho, c, y):
    """K-SEQ's final law at token y, unnormalised: (p - min(q, p / rho) c)_+."""
    return max(p[y] - min(q[y], p[y] * inv_rho) * c, 0.0)


@numba.njit(cache=True, boundscheck=False, fastmath={"reassoc"})
def _kseq_leftover_blocks(p, q, inv_rho, c, block_sums):
    """block_sums[k] = the final law's mass on tokens [k BLOCK, (k + 1) BLOCK) (summed in vector
    lanes: no buffer over V, no branch per token); returns their sum."""
    vocab = p.size
    total = 0.0
    for k in range(block_sums.size):
        s = 0.0
        for y in range(k * LEFTOVER_BLOCK, min((k + 1) * LEFTOVER_BLOCK, vocab)):
            s += _kseq_leftover(p, q, inv_rho, c, y)
        block_sums[k] = s
        total += s
    return total


@numba.njit(cache=True, boundscheck=False, fastmath=False)
def _kseq_leftover_search(p, q, inv_rho, c, block_sums, threshold):
    """The inverse CDF of the final law at ``threshold``: the first token y (block k) with
    S_k + block_sums[k] > threshold and S_k + (its block's running sum to y) > threshold, where
    S_k = block_sums[:k] summed in order -- a fixed sequence, so the token is non-decreasing in
    the threshold; the last token of positive mass should rounding leave it unreached."""
    vocab = p.size
    acc = 0.0
    for k in range(block_sums.size):
        top = acc + block_sums[k]
        if top > threshold:
            running = acc
            for y in range(k * LEFTOVER_BLOCK, min((k + 1) * LEFTOVER_BLOCK, vocab)):
                value = _kseq_leftover(p, q, inv_rho, c, y)
                running += value
                if running > threshold and value > 0.0:
                    return y
        acc = top
    for y in range(vocab - 1, -1, -1):
        if _kseq_leftover(p, q, inv_rho, c, y) > 0.0:
            return y
    return vocab - 1  # an all-zero law: the caller draws from p instead


@numba.njit(cache=True, fastmath=False)
def _kseq_rho_row(p, q, n, iterations):
    """K-SEQ's (rho*, beta) of one row p, q [V]: ``mdsd.verifiers.classic_math.kseq_rho``
    compiled (the same bracket, the same ``iterations`` bisection steps on g between the two
    breakpoints, rho = 1 where g(1) <= 0, beta = sum min(q, p / rho) at the ``hi`` end)."""
    lo, hi, head, tail = kseq_bracket_row(p, q, n)
    nf = float(n)
    at_one = _g(head, tail, 1.0, nf) <= 0.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if _g(head, tail, mid, nf) > 0.0:
            lo = mid
        else:
            hi = mid
    r = 1.0 if at_one else hi
    return r, _beta_at(p, q, r)


@numba.njit(cache=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"})
def _beta_at(p, q, rho):
    """beta(rho) = sum_y min(q_y, p_y / rho) over one row [V], summed in vector lanes."""
    total = 0.0
    for y in range(p.size):
        value = p[y] / rho
        total += q[y] if q[y] < value else value
    return total


@numba.njit(cache=True, fastmath=False)
def greedy_sample(p, q, drafts, uniforms, tokens, branch):
    """The greedy law's verifier (``GreedyVerifier``): T = drafts[:n-1], q' = q off T, renormalised
    by S = q(V minus T) summed over its own entries (one pass). Accept x_n iff
    u_0 < min(1, p(x_n) / q'(x_n)); else y ~ (p - q')_+ (T keeps its target mass) by inverse CDF at
    u_1, or y ~ p when that residual is empty. ``uniforms`` [B, 2]."""
    rows, vocab = p.shape
    n = drafts.shape[1]
    work = np.empty(0)
    for b in range(rows):
        top = np.sort(drafts[b, : n - 1])
        rest, lo = 0.0, 0  # S: the sum over the gaps between the sorted top tokens
        for t in top:
            rest += _sum(q[b], lo, t)
            lo = t + 1
        rest += _sum(q[b], lo, vocab)
        last = drafts[b, n - 1]
        q_last = q[b, last] / rest
        if uniforms[b, 0] < _ratio(p[b, last], q_last):
            tokens[b], branch[b] = last, 0
            continue
        if work.size == 0:
            work = np.empty(vocab)
        inv_rest = 1.0 / rest
        for y in range(vocab):
            work[y] = max(p[b, y] - q[b, y] * inv_rest, 0.0)
        for t in top:
            work[t] = p[b, t]  # q' = 0 on T
        total = _sum(work, 0, vocab)
        values = work if total > EMPTY_MASS else p[b]
        tokens[b], branch[b] = _draw(values, uniforms[b, 1]), 1


@numba.njit(cache=True, fastmath=False)
def spechub_sample(p, q, drafts, uniforms, tokens, branch):
    """SpecHub (``SpecHubVerifier``), n = 2: hub a = the draft of larger q (ties: lower id, i.e.
    argmax q as the law guarantees), i the other draft.

    Test 0 (token i): i first: min(1, p_i / q_i), no pass; hub first: min(1, p1_i / Q(a, i)) with
    Q(a, y) = q_a q_y / q_rest, q_rest = q(V minus a) summed (one pass). Test 1 (the hub): needs
    sum Q'(., a) = sum_{y != a} (q_y - p_y)_+ (same pass) and sum Q'(a, .) = sum (Q(a, y) - p1_y)_+
    (second pass); then y ~ p2 off a, (pa1 - sum Q'(., a))_+ on a, proportionally (from p if all
    zero). ``uniforms`` [B, 3].
    """
    rows, vocab = p.shape
    work = np.empty(0)
    for b in range(rows):
        d0, d1 = drafts[b, 0], drafts[b, 1]
        q0, q1 = q[b, d0], q[b, d1]
        hub = d0 if (q0 > q1 or (q0 == q1 and d0 < d1)) else d1
        other = d1 if hub == d0 else d0
        hub_first = hub == d0
        p_i, q_i, p_hub, q_hub = p[b, other], q[b, other], p[b, hub], q[b, hub]
        if not hub_first and uniforms[b, 0] < _ratio(p_i, q_i):
            tokens[b], branch[b] = other, 0
            continue
        q_rest = _sum(q[b], 0, hub) + _sum(q[b], hub + 1, vocab)  # 1 - q_a, summed
        hub_share = q_hub / q_rest
        if hub_first and uniforms[b, 0] < _ratio(max(p_i - q_i, 0.0), q_i * hub_share):
            tokens[b], branch[b] = other, 0
            continue
        if work.size == 0:
            work = np.empty(vocab)
        for y in range(vocab):
            work[y] = max(q[b, y] - p[b, y], 0.0)
        work[hub] = 0.0
        left_i = _sum(work, 0, vocab)  # sum Q'(., a)
        for y in range(vocab):  # p1 - Q(a, .), off the hub
            work[y] = max(p[b, y] - q[b, y], 0.0) - q[b, y] * hub_share
        work[hub] = 0.0
        left_hub = _sum_negative(work)  # sum Q'(a, .) = sum (Q - p1)_+
        p_hub_left = max(p_hub - left_hub, 0.0)  # pa1
        accept_hub = _ratio(p_hub, left_hub) if hub_first else _ratio(p_hub_left, left_i)
        if uniforms[b, 1] < accept_hub:
            tokens[b], branch[b] = hub, 1
            continue
        for y in range(vocab):
            work[y] = max(work[y], 0.0)  # p2
        work[hub] = max(p_hub_left - left_i, 0.0)
        values = work if _sum(work, 0, vocab) > 0.0 else p[b]
        tokens[b], branch[b] = _draw(values, uniforms[b, 2]), 2


@numba.njit(cache=True, fastmath=False, error_model="numpy")
def importance_sample(p, q, drafts, uniforms, tokens, branch):
    """Importance selection (``Importance``), the O(1)-plus-one-pass part.

    The picked draft s has the largest weight p / q among the drafts (ties: lower id). Its
    selection probability p_I(s) = G^n - G_after^n, G_after = q(tokens ranked after s: smaller
    weight, or equal weight and larger id), G = G_after + q_s (both clipped at 1), needs one pass
    and no sort. Accept s iff u_0 < min(1, p_s / p_I(s)); rejected rows are left pending (branch
    -1): their residual resid(p, p_I) is drawn at u_1 by ``importance_residual_draw``
    (``mdsd.verifiers._importance_residual``: a radix selection instead of a sort). ``uniforms``
    [B, 2].
    """
    rows, vocab = p.shape
    n = drafts.shape[1]
    for b in range(rows):
        best, best_weight = -1, -np.inf
        for j in range(n):
            x = drafts[b, j]
            weight = p[b, x] / q[b, x] if q[b, x] > 0.0 else -np.inf
            if weight > best_weight or (weight == best_weight and x < best):
                best, best_weight = x, weight
        a0 = a1 = a2 = a3 = 0.0  # G_after, four accumulators
        stop = vocab // 4 * 4
        for y in range(0, stop, 4):
            a0 += _later(p[b, y], q[b, y], y, best_weight, best)
            a1 += _later(p[b, y + 1], q[b, y + 1], y + 1, best_weight, best)
            a2 += _later(p[b, y + 2], q[b, y + 2], y + 2, best_weight, best)
            a3 += _later(p[b, y + 3], q[b, y + 3], y + 3, best_weight, best)
        for y in range(stop, vocab):
            a0 += _later(p[b, y], q[b, y], y, best_weight, best)
        after_unclipped = (a0 + a1) + (a2 + a3)
        q_s = q[b, best]
        tail, after = min(after_unclipped + q_s, 1.0), min(after_unclipped, 1.0)
        d = q_s if after_unclipped + q_s <= 1.0 else tail - after
        power, terms = 1.0, 1.0
        for _ in range(n - 1):  # tail^n - after^n = d sum_j tail^j after^(n-1-j)
            power *= tail
            terms = terms * after + power
        picked = d * terms
        if uniforms[b, 0] < _ratio(p[b, best], picked):
            tokens[b], branch[b] = best, 0
        else:
            tokens[b], branch[b] = -1, -1


@numba.njit(cache=True)
def importance_rows(p, q, drafts, uniforms, tokens, branch):
    """``Importance``'s draw, row by row: ``importance_sample``, then for a rejected row its
    residual token at u_1 (``importance_residual_draw``) while the row is still in the cache. Two
    passes over a batch (the test for every row, then the residuals) read each rejected row from
    memory twice: at V = 32,000 that made a 100-row batch slower per row than single calls."""
    n = drafts.shape[1]
    row, uniform, drawn = np.empty(1, dtype=np.int64), np.empty(1), np.empty(1, dtype=np.int64)
    for b in range(p.shape[0]):
        importance_sample(
            p[b : b + 1],
            q[b : b + 1],
            drafts[b : b + 1],
            uniforms[b : b + 1],
            tokens[b : b + 1],
            branch[b : b + 1],
        )
        if branch[b] < 0:  # rejected: y ~ resid(p, p_I) in rank order
            row[0], uniform[0] = b, uniforms[b, 1]
            importance_residual_draw(p, q, row, n, uniform, drawn)
            tokens[b], branch[b] = drawn[0], 1


@numba.njit(cache=True, fastmath=False, inline="always", error_model="numpy")
def _later(py, qy, y, best_weight, best):
    """q_y if token y ranks after the picked token (smaller weight, or equal and larger id); 0
    where q_y = 0 (its weight p_y / 0 is inf or nan, but it adds nothing). Branch-free."""
    weight = py / qy
    later = (weight < best_weight) | ((weight == best_weight) & (y > best))
    return qy if later else 0.0
