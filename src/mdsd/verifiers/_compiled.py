"""Compiled (numba) kernels of the classic verifiers for numpy rows.

``kseq_brackets``: the bracket of K-SEQ's rho* by selection instead of a full sort.
``importance_law_ordered``: the law of max-importance selection from a (fast, unstable) argsort.

K-SEQ solves g(rho) = 1 - (1 - beta)^n - rho beta = 0 on [1, n], with
beta(rho) = sum_x min(q_x, p_x / rho). With the breakpoints r_x = min(p_x / q_x, n) (n where
q_x = 0), tokens with r_x >= rho give q_x and the others p_x / rho, so at rho = v

    beta(v) = A(v) + B(v) / v,   A(v) = q({x: r_x >= v}),   B(v) = p({x: r_x < v}),

and g is decreasing in rho. ``mdsd.verifiers.classic_math.kseq_rho`` needs the two neighbouring
breakpoints hi > lo between which g changes sign (g <= 0 at hi, g > 0 at lo; breakpoints below 1
count as g > 0) and (A, B) on that interval; the sorted version finds them by a binary search over
all breakpoints in sorted order. Here, without a sort: one pass puts the breakpoints >= 1 into
BUCKETS buckets by value (floor((r - 1) BUCKETS / (n - 1)), monotone in r, so a higher bucket holds
only larger breakpoints and equal breakpoints share a bucket) and sums q, p and the smallest r of
each (``_bucket_sums``: the divisions of a block of tokens in vector lanes, then the adds into
SCATTER_COPIES interleaved copies of the sums); g at each bucket's smallest breakpoint follows
from those sums, which locates the bucket whose breakpoints straddle the sign change; a second
pass, over the tokens' stored bucket numbers (2 bytes a token), gathers that bucket's tokens,
which are sorted (a few dozen at LLM vocabularies) to find the exact neighbours. Sums are of
non-negative terms; they differ from the sorted version's prefix sums by rounding only.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, fastmath=False)
def _log1p_power(beta, n):
    """1 - (1 - beta)^n for beta in [0, 1] (as ``at_least_one``: log1p / expm1)."""
    return -np.expm1(n * np.log1p(-min(beta, 1.0)))


BUCKETS = 512  # value buckets of the breakpoints in [1, n]


@numba.njit(cache=True, fastmath=False)
def _g(head, tail, rho, nf):
    """g(rho) = 1 - (1 - beta)^n - rho beta with beta = head + tail / rho."""
    beta = head + tail / rho
    return _log1p_power(beta, nf) - rho * beta


@numba.njit(cache=True, fastmath=False, inline="always")
def _bucket(r, scale):
    """0 for r < 1, else 1 + floor((r - 1) scale) capped at BUCKETS: non-decreasing in r."""
    offset = (r - 1.0) * scale if r >= 1.0 else -1.0  # >= 0 from r = 1 on: truncation = floor
    return int(offset if offset < BUCKETS - 1.0 else BUCKETS - 1.0) + 1  # selects: vectorised


@numba.njit(cache=True, inline="always")
def _breakpoint(px, qx, nf):
    """r = min(p / q, n), n where q = 0 (selects, no branch: vectorised; never divides by 0,
    whatever the caller's error model)."""
    positive = qx > 0.0
    r = px / (qx if positive else 1.0)
    return (nf if r > nf else r) if positive else nf


SCATTER_COPIES = 4  # copies of the bucket sums: consecutive tokens add into different copies


@numba.njit(cache=True, boundscheck=False, error_model="numpy")
def _bucket_sums(p, q, nf, scale, index):
    """Per bucket (``_bucket``) of the breakpoints of p, q [V]: the sums of q and p, the
    smallest breakpoint (inf where empty), each [BUCKETS + 1]; index[x] = token
    x's bucket. By blocks: the breakpoints and buckets of a block in one vectorised loop (the
    divisions in vector lanes), then the adds, token j into copy j % SCATTER_COPIES, so that a
    run of tokens in one bucket (most fall in bucket 0 or the top one) is not one chain of
    dependent adds through memory."""
    vocab = p.size
    sums = np.zeros((SCATTER_COPIES, BUCKETS + 1, 4))  # q, p, smallest r (a fourth: padding)
    sums[:, :, 2] = np.inf
    r = np.empty(SCATTER_BLOCK)
    for start in range(0, vocab, SCATTER_BLOCK):
        stop = min(start + SCATTER_BLOCK, vocab)
        p_block, q_block, index_block = p[start:stop], q[start:stop], index[start:stop]
        for j in range(stop - start):  # block views: contiguous loads (not gathers)
            r[j] = _breakpoint(p_block[j], q_block[j], nf)
            index_block[j] = _bucket(r[j], scale)
        for j in range(stop - start):
            row = sums[j % SCATTER_COPIES, index_block[j]]
            row[0] += q_block[j]
            row[1] += p_block[j]
            row[2] = min(row[2], r[j])
    bucket_q = sums[0, :, 0].copy()
    bucket_p = sums[0, :, 1].copy()
    bucket_min = sums[0, :, 2].copy()
    for k in range(1, SCATTER_COPIES):
        for i in range(BUCKETS + 1):
            bucket_q[i] += sums[k, i, 0]
            bucket_p[i] += sums[k, i, 1]
            bucket_min[i] = min(bucket_min[i], sums[k, i, 2])
    return bucket_q, bucket_p, bucket_min


SCATTER_BLOCK = 512  # tokens per block of ``_bucket_sums``


@numba.njit(cache=True, fastmath=False)
def kseq_brackets(p, q, n):
    """Per row of [B, V] p, q: (lo, hi, head, tail) with g(lo) > 0 >= g(hi) between neighbouring
    breakpoints (lo = 1, hi = n where none), head = A and tail = B on (lo, hi] -- the rows of
    ``kseq_bracket_row``: [B, 4]."""
    out = np.empty((p.shape[0], 4))
    for b in range(p.shape[0]):
        out[b, 0], out[b, 1], out[b, 2], out[b, 3] = kseq_bracket_row(p[b], q[b], n)
    return out


@numba.njit(cache=True, fastmath=False)
def kseq_bracket_row(p, q, n):
    """``kseq_brackets`` of one row p, q [V]: (lo, hi, head, tail)."""
    vocab = p.size
    nf = float(n)
    scale = BUCKETS / (nf - 1.0) if n > 1 else 0.0
    # bucket 0: r < 1 (these tokens give p / rho for every rho in [1, n]); 1..BUCKETS: r >= 1
    index = np.empty(vocab, dtype=np.int16)  # each token's bucket, for the second pass
    bucket_q, bucket_p, bucket_min = _bucket_sums(p, q, nf, scale, index)
    # low[i] = p of the buckets below i (bucket 0: r < 1), summed from the bottom
    low = np.empty(BUCKETS + 2)
    low[0] = 0.0
    for i in range(BUCKETS + 1):
        low[i + 1] = low[i] + bucket_p[i]
    # from the top bucket down, with A = q of the buckets above: the highest bucket whose
    # smallest breakpoint has g > 0 holds the sign change (or it lies just above that bucket)
    above_q = 0.0
    hi, head_hi, tail_hi = nf, 0.0, low[BUCKETS + 1]  # the bracket's top so far
    found = -1
    for i in range(BUCKETS, 0, -1):
        if bucket_min[i] == np.inf:  # empty
            continue
        v = bucket_min[i]
        head_v = above_q + bucket_q[i]  # tokens with r >= v
        if _g(head_v, low[i], v, nf) <= 0.0:
            hi, head_hi, tail_hi = v, head_v, low[i]
            above_q = head_v
        else:
            found = i
            break
    if found < 0:  # every breakpoint >= 1 has g <= 0: the bracket is [1, the smallest]
        return 1.0, hi, head_hi, tail_hi
    # the tokens of bucket `found`, decreasing: the sign change is among them or at hi
    count = 0
    for x in range(vocab):
        count += index[x] == found
    cand_r = np.empty(count)
    cand_q = np.empty(count)
    cand_p = np.empty(count)
    c = 0
    for x in range(vocab):
        if index[x] == found:
            px, qx = p[x], q[x]
            cand_r[c], cand_q[c], cand_p[c] = _breakpoint(px, qx, nf), qx, px
            c += 1
    order = np.argsort(-cand_r)
    # suffix[c] = p of the candidates from sorted position c on (the smaller breakpoints)
    suffix = np.empty(count + 1)
    suffix[count] = 0.0
    for c in range(count - 1, -1, -1):
        suffix[c] = suffix[c + 1] + cand_p[order[c]]
    lo = bucket_min[found]
    head, tail = above_q, low[found] + suffix[0]  # on (lo, hi]: the bucket's tokens give p
    c = 0
    while c < count:  # the distinct values u, decreasing; g(u) <= 0 moves hi down to u
        u = cand_r[order[c]]
        group_q = 0.0
        e = c
        while e < count and cand_r[order[e]] == u:
            group_q += cand_q[order[e]]
            e += 1
        head_u = head + group_q
        tail_u = low[found] + suffix[e]
        if _g(head_u, tail_u, u, nf) <= 0.0:
            hi, head, tail = u, head_u, tail_u
            c = e
        else:
            lo = u
            break
    return max(lo, 1.0), hi, head, tail


@numba.njit(cache=True, fastmath=False)
def importance_keys(p, q):
    """Sort keys of max-importance selection: -p/q where q > 0, +inf where q = 0.  [B, V]"""
    key = np.empty(q.shape)
    rows, vocab = q.shape
    for b in range(rows):
        for x in range(vocab):
            qx = q[b, x]
            key[b, x] = -p[b, x] / qx if qx > 0.0 else np.inf
    return key


@numba.njit(cache=True, fastmath=False)
def importance_law_ordered(key, q, total, order, n, out):
    """p_I of ``mdsd.verifiers.classic_math.importance_law`` into out [B, V], from the keys -p/q (+inf
    where q = 0; ``importance_keys``), total [B] = q summed per row (pairwise: numpy), and order
    [B, V]: the tokens by increasing key (decreasing weight), in any order among equal keys.

    Runs of equal finite keys are first put in increasing token id (the verifier's tie rule), in
    place; then in rank order, with G(k) = q(rank >= k) = total - q(rank < k):
    p_I(rank k) = min(G(k), 1)^n - min(G(k + 1), 1)^n (as d sum_j G(k)^j G(k + 1)^{n-1-j}), and 0
    where q = 0. (Two passes: finding the runs inside the main pass measured 2x slower.)
    """
    rows, vocab = q.shape
    for b in range(rows):
        row = order[b]
        start = 0
        previous = key[b, row[0]]
        for k in range(1, vocab + 1):  # tie runs (q = 0 tokens carry no mass: order irrelevant)
            if k < vocab:
                current = key[b, row[k]]
                if current == previous:
                    continue
            else:
                current = previous
            if k - start > 1 and previous < np.inf:
                row[start:k] = np.sort(row[start:k])
            start, previous = k, current
        head = 0.0
        for k in range(vocab):
            x = row[k]
            qx = q[b, x]
            head += qx  # q(rank <= k)
            unclipped = max(total[b] - head, 0.0)  # G(k + 1)
            tail = min(unclipped + qx, 1.0)  # G(k)
            after = min(unclipped, 1.0)
            # tail^n - after^n = d sum_{j<n} tail^j after^{n-1-j}, d = tail - after: no cancellation
            d = qx if unclipped + qx <= 1.0 else tail - after
            power, terms = 1.0, 1.0
            for _ in range(n - 1):
                power *= tail
                terms = terms * after + power
            out[b, x] = d * terms if qx > 0.0 else 0.0


EMPTY_MASS = 1e-300  # as ``mdsd.verifiers.base.EMPTY_MASS``: a residual this small is empty


@numba.njit(cache=True, fastmath=False)
def _residual_into(cur, q_cur, out):
    """out = resid(cur, q_cur) = (cur - q_cur)_+ / sum (cur - q_cur)_+; cur itself where that
    mass is (numerically) empty, as ``mdsd.verifiers.base.residual``."""
    total = 0.0
    for y in range(cur.size):
        diff = cur[y] - q_cur[y]
        out[y] = diff if diff > 0.0 else 0.0
        total += out[y]
    if total <= EMPTY_MASS:
        out[:] = cur
    else:
        out /= total


@numba.njit(cache=True, fastmath=False)
def _leaf_terms(cur, q_cur, nxt):
    """Sum over the children t of a node one draw before the last (q_cur_t > cur_t) of
    (q_cur_t - cur_t) * sum_{y != t} min(nxt_y, q_cur_y / s_t), s_t = sum_{y != t} q_cur_y, and
    their number. With thresholds h_y = q_cur_y / nxt_y sorted once, the inner sum is
    S(s) - min(nxt_t, q_cur_t / s), S(s) = sum_{h_y <= s} q_cur_y / s + sum_{h_y > s} nxt_y (as
    ``mdsd.verifiers.classic_math.rrs_wor_acceptance_two``): O(m log m) for all children, not O(m^2).
    """
    m = cur.size
    threshold = np.empty(m)
    total_q, total_next = 0.0, 0.0
    for y in range(m):
        # nxt_y = 0: min(0, .) = 0 on either side of the split; inf keeps it in the nxt part
        threshold[y] = q_cur[y] / nxt[y] if nxt[y] > 0.0 else np.inf
        total_q += q_cur[y]
        total_next += nxt[y]
    order = np.argsort(threshold)
    sorted_threshold = threshold[order]
    below_q = np.zeros(m + 1)  # q_cur of the k smallest thresholds
    below_next = np.zeros(m + 1)  # nxt of the k smallest thresholds
    for k in range(m):
        below_q[k + 1] = below_q[k] + q_cur[order[k]]
        below_next[k + 1] = below_next[k] + nxt[order[k]]
    value, count = 0.0, 0
    for t in range(m):
        reject = q_cur[t] - cur[t]
        if not reject > 0.0:
            continue
        count += 1
        rest = total_q - q_cur[t]
        if not rest > 0.0:  # no token left to draw (unreachable for n <= |supp q|): adds nothing
            continue
        k = np.searchsorted(sorted_threshold, rest, side="right")
        inner = below_q[k] / rest + (total_next - below_next[k]) - min(nxt[t], q_cur[t] / rest)
        value += reject * max(inner, 0.0)
    return value, count


@numba.njit(cache=True, fastmath=False)
def rrs_wor_tree(cur0, q0, n, max_rows):
    """Acceptance of ``rrs_without_replacement`` with n >= 2 drafts by a depth-first walk of the
    draw tree of ``mdsd.verifiers.classic_math.rrs_wor_acceptance_tree`` (its compiled twin: the same
    nodes, the same value up to the order of the sums).

    cur0, q0: [m] p and q on the support of q plus one bucket (q = 0) for the rest. A node at
    depth d (a rejected prefix x_1..x_d, weight w) adds w * sum_y min(cur_y, q_cur_y); its
    children are the tokens t with q_cur_t > cur_t (weight w (q_cur_t - cur_t), target
    resid(cur, q_cur), draft law q_cur without t, renormalised). The stack holds one node per
    depth (memory O(n m)); the last depth is summed in bulk by ``_leaf_terms``. Returns
    (alpha, True), or (nan, False) as soon as some depth has more than ``max_rows`` nodes (the
    reference's limit per depth, so both refuse the same rows).
    """
    m = cur0.size
    cur = np.empty((n - 1, m))  # target of the node on the stack at each depth < n - 1
    q_cur = np.empty((n - 1, m))  # its draft law
    nxt = np.empty((n - 1, m))  # resid(cur, q_cur): the target of its children
    weight = np.empty(n - 1)
    cursor = np.zeros(n - 1, dtype=np.int64)  # next child token to try at each depth
    counts = np.zeros(n, dtype=np.int64)  # nodes seen per depth
    cur[0] = cur0
    q_cur[0] = q0
    weight[0] = 1.0
    alpha = 0.0
    for y in range(m):
        alpha += min(cur0[y], q0[y])
    _residual_into(cur[0], q_cur[0], nxt[0])
    depth = 0
    while depth >= 0:
        if depth == n - 2:  # its children are the leaves: all at once, then back up
            value, count = _leaf_terms(cur[depth], q_cur[depth], nxt[depth])
            counts[n - 1] += count
            if counts[n - 1] > max_rows:
                return np.nan, False
            alpha += weight[depth] * value
            depth -= 1
            continue
        t = cursor[depth]
        while t < m and not (q_cur[depth, t] - cur[depth, t] > 0.0):
            t += 1
        if t == m:  # every child of this node done: back to its parent
            depth -= 1
            continue
        cursor[depth] = t + 1
        child = depth + 1
        counts[child] += 1
        if counts[child] > max_rows:
            return np.nan, False
        rest = 0.0
        for y in range(m):
            if y != t:
                rest += q_cur[depth, y]
        if not rest > 0.0:  # no token left to draw (unreachable for n <= |supp q|): adds nothing
            continue
        w = weight[depth] * (q_cur[depth, t] - cur[depth, t])
        own = 0.0
        for y in range(m):
            q_cur[child, y] = q_cur[depth, y] / rest
            cur[child, y] = nxt[depth, y]
        q_cur[child, t] = 0.0
        for y in range(m):
            own += min(cur[child, y], q_cur[child, y])
        alpha += w * own
        weight[child] = w
        cursor[child] = 0
        _residual_into(cur[child], q_cur[child], nxt[child])
        depth = child
    return alpha, True
