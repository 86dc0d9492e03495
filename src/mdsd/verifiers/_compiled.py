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
each; g at each bucket's smallest breakpoint follows from those sums, which locates the bucket
whose breakpoints straddle the sign change; a second pass gathers that bucket's tokens, which are
sorted (a few hundred at LLM vocabularies) to find the exact neighbours. Sums are of non-negative
terms; they differ from the sorted version's prefix sums by rounding only.
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
    index = int(min(np.floor((r - 1.0) * scale), BUCKETS - 1.0)) + 1
    return index if r >= 1.0 else 0


@numba.njit(cache=True, fastmath=False)
def kseq_brackets(p, q, n):
    """Per row of [B, V] p, q: (lo, hi, head, tail) with g(lo) > 0 >= g(hi) between neighbouring
    breakpoints (lo = 1, hi = n where none), head = A and tail = B on (lo, hi]."""
    rows, vocab = p.shape
    out = np.empty((rows, 4))
    nf = float(n)
    scale = BUCKETS / (nf - 1.0) if n > 1 else 0.0
    # bucket 0: r < 1 (these tokens give p / rho for every rho in [1, n]); 1..BUCKETS: r >= 1
    bucket_q = np.empty(BUCKETS + 1)
    bucket_p = np.empty(BUCKETS + 1)
    bucket_min = np.empty(BUCKETS + 1)
    bucket_count = np.empty(BUCKETS + 1, dtype=np.int64)
    for b in range(rows):
        bucket_q[:] = 0.0
        bucket_p[:] = 0.0
        bucket_min[:] = np.inf
        bucket_count[:] = 0
        for x in range(vocab):  # branch-free: every token goes to a bucket
            px, qx = p[b, x], q[b, x]
            r = min(px / qx, nf) if qx > 0.0 else nf
            i = _bucket(r, scale)
            bucket_q[i] += qx
            bucket_p[i] += px
            bucket_count[i] += 1
            bucket_min[i] = min(bucket_min[i], r)
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
            if bucket_count[i] == 0:
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
            out[b, 0], out[b, 1], out[b, 2], out[b, 3] = 1.0, hi, head_hi, tail_hi
            continue
        # the tokens of bucket `found`, decreasing: the sign change is among them or at hi
        count = bucket_count[found]
        cand_r = np.empty(count)
        cand_q = np.empty(count)
        cand_p = np.empty(count)
        c = 0
        for x in range(vocab):
            px, qx = p[b, x], q[b, x]
            r = min(px / qx, nf) if qx > 0.0 else nf
            if _bucket(r, scale) == found:
                cand_r[c], cand_q[c], cand_p[c] = r, qx, px
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
        out[b, 0], out[b, 1], out[b, 2], out[b, 3] = max(lo, 1.0), hi, head, tail
    return out


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
