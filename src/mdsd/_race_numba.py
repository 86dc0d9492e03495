"""Compiled CPU kernels (numba) of alpha*: the exponential-race quadrature of ``mdsd._race``
(``race_window``), and for ``mdsd.bound`` the pruning window (``candidate_window``) and the
i.i.d. scan (``iid_scan``).

The race kernel computes the same quadrature as ``mdsd._race.wor_qall_window`` (same nodes
t_j = e^{u_j}, same step h, same clamping and saturation rules), in one fused pass over the tokens
with the nodes in the inner, vectorised loop, in unscaled probability space. For node t write, for token i,

    s_i = e^{-q_i t}  (token i has not arrived by t),   a_i = 1 - s_i = -expm1(-q_i t).

The probabilities x_k[m] = P(N_{H_k}(t) = m), m < n, obey

    x_k[m] = x_{k-1}[m] s_k + x_{k-1}[m-1] a_k,     x_k[0] = x_{k-1}[0] s_k,

a convex combination: every term is non-negative and every x lies in [0, 1], so nothing overflows
and no scaling or restart is needed (the scaled form of ``mdsd._race`` needs both). The n-th
arrival happens at token k with probability a_k x_{k-1}[n-1], so

    F_k = P(N_{H_k}(t) >= n) = F_{k-1} + a_k x_{k-1}[n-1],

a sum of non-negative terms (full relative accuracy when F is small). Then, at every prefix k of
the window k_lo..k_hi with tail mass lambda_k > 0,

    Qall(H_k) = h sum_j lambda_k t_j e^{-lambda_k t_j} F_k(t_j),

over the nodes with lambda_k t_j <= RIGHT_CUT (the others carry weight < RIGHT_CUT e^{-RIGHT_CUT}
each, and they decay double-exponentially in j). The error estimate is |Qall_h - Qall_2h| with
Qall_2h the same sum over the nodes on the grid 2hZ, times 2h.

Numerics, as in ``mdsd._race``: (1) q_i t is clamped at CLAMP (each clamp moves the law of N by at
most 2 e^{-CLAMP} in total variation; it also keeps every product away from subnormals);
(2) s and a are computed by one range-reduced polynomial with full relative accuracy for both
(a = -expm1(-q t) directly when q t < ln 2 / 2, where 1 - s would cancel); (3) the nodes are in
increasing t and P(N_{H_k}(t) <= n-1) is non-increasing in k and in t (each a_i grows with t), so
the saturated nodes (P(N <= n-1) < SATURATED) form a suffix of the node list: the top node is
dropped while its sum is below SATURATED, with F = 1 from then on; (4) state entries below TINY are
set to 0 (a change < 1e-290 each) so that no arithmetic runs on subnormals.

``_exp_neg`` is a vectorisable e^{-x} for x in [0, CLAMP] (Cody-Waite reduction x = k ln 2 - r,
degree-13 Taylor polynomial for expm1(r) on |r| <= ln 2 / 2 by Estrin's scheme with fused
multiply-adds, truncation error < 5e-18 relative, 2^k assembled from its bits): libm's exp is a
call LLVM cannot vectorise, and Horner's 13-step chain was latency-bound.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

INV_LN2 = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * LN2_HI is exact for |k| < 2^20
LN2_LO = 1.90821492927058770002e-10
# 1 / k!, k = 2..13: expm1(r) = r + r^2 (C2 + r (C3 + ...))
C2, C3, C4, C5 = 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120
C6, C7, C8, C9 = 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880
C10, C11, C12, C13 = 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800
TINY = 1e-290  # state entries below this are set to 0 (no subnormal arithmetic; change < 1e-290)
SEGMENT = 64  # tokens per call of the scan (F is recorded after each of them for the outputs)
LANES = 8  # node arrays are padded to a multiple of this (one AVX-512 register of float64)


@intrinsic
def _bits_to_float(typingctx, bits):
    """Reinterpret an int64 as a float64 (a free bitcast, vectorisable)."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@intrinsic
def _fma(typingctx, x, y, z):
    """x * y + z rounded once (llvm.fma: one vectorisable instruction)."""
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        double = ir.DoubleType()
        fn = builder.module.declare_intrinsic(
            "llvm.fma", [double], ir.FunctionType(double, [double, double, double])
        )
        return builder.call(fn, args)

    return sig, codegen


@numba.njit(cache=True, fastmath=False, inline="always")
def _exp_neg(x):
    """(e^{-x}, 1 - e^{-x}) for 0 <= x <= 700, each to ~1 ulp relative."""
    y = -x
    k = np.floor(y * INV_LN2 + 0.5)  # y = k ln 2 + r, |r| <= ln 2 / 2 (k <= 0)
    r = _fma(-k, LN2_LO, _fma(-k, LN2_HI, y))
    # expm1(r) = r + r^2 P(r), P(r) = sum_{i=2}^{13} r^{i-2} / i! by Estrin's scheme (short chains)
    r2 = r * r
    r4 = r2 * r2
    r8 = r4 * r4
    p01 = _fma(_fma(C5, r, C4), r2, _fma(C3, r, C2))
    p23 = _fma(_fma(C9, r, C8), r2, _fma(C7, r, C6))
    p45 = _fma(_fma(C13, r, C12), r2, _fma(C11, r, C10))
    p = _fma(p45, r8, _fma(p23, r4, p01))
    em1 = _fma(r2, p, r)  # expm1(r)
    scale = _bits_to_float((np.int64(k) + 1023) << 52)  # 2^k
    s = _fma(scale, em1, scale)  # 2^k (1 + expm1(r))
    a = -em1 if k == 0.0 else 1.0 - s  # k = 0: r = y exactly, no cancellation
    return s, a


@numba.njit(cache=True, fastmath=False)
def race_window(q, lam, t, n, k_lo, k_hi, step, first_even, clamp, saturated, right_cut, out):
    """Qall_h(H_k) into out[k - k_lo], k = k_lo..k_hi; returns max_k |Qall_h - Qall_2h|.

    q: [V] float64 in scan order; lam: [k_hi - k_lo + 1] tail masses lambda_k (non-increasing);
    t: [J] nodes, increasing; first_even: index parity (0 or 1) of the nodes on the grid 2hZ;
    n >= 2. Prefixes with lambda_k = 0 get 1 and no error.
    """
    empty = race_prefix_state(0, n)
    return race_window_from(
        q, lam, t, n, k_lo, k_hi, step, first_even, clamp, saturated, right_cut, out, empty, SCAN
    )


# What ``race_window_from`` does with its prefix state: scan from the empty prefix (SCAN), also
# keep the state reached at k_lo (SAVE), or start from a kept state (RESUME).
SCAN, SAVE, RESUME = 0, 1, 2


@numba.njit(cache=True, fastmath=False)
def race_prefix_state(num, n):
    """Storage for the scan's state at a prefix, for ``num`` nodes: (x [n, width], F [width],
    F recorded at that prefix [width], active [1])."""
    width = (num + LANES - 1) // LANES * LANES
    return np.zeros((n, width)), np.zeros(width), np.zeros(width), np.zeros(1, dtype=np.int64)


@numba.njit(cache=True, fastmath=False)
def race_window_from(
    q, lam, t, n, k_lo, k_hi, step, first_even, clamp, saturated, right_cut, out, state, mode
):
    """``race_window``, optionally keeping or reusing the scan's state at the window's first
    prefix k_lo > 0: SAVE stores it in ``state`` (``race_prefix_state(t.size, n)``); RESUME starts
    from it, skipping the scan of tokens 0..k_lo-1, for a q whose first k_lo entries and nodes t
    are those of the SAVE call (the caller's part). The state at k_lo is a function of those
    alone, so every output is the plain scan's bit for bit."""
    saved_x, saved_arrived, saved_record, saved_active = state
    num = t.size
    width = (num + LANES - 1) // LANES * LANES
    tt = np.zeros(width)  # padding nodes t = 0: s = 1, a = 0
    tt[:num] = t
    x = np.zeros((n, width))  # x[m, j] = P(N = m) at node j, m < n
    x[0, :] = 1.0
    arrived = np.zeros(width)  # F = P(N >= n)
    s = np.empty(width)
    a = np.empty(width)
    record = np.empty((SEGMENT, width))  # F after each token of a segment
    term = np.zeros(width)
    acc = np.zeros(LANES)
    active = num  # nodes 0..active-1 are scanned; the others are saturated (F = 1)
    cut = 0  # nodes 0..cut-1 have lambda_k t_j <= right_cut at the current prefix
    error = 0.0
    start = 0
    if k_lo == 0:  # the empty prefix: nothing has arrived
        cut, error = _output(
            lam[0], tt, num, arrived, step, first_even, right_cut, cut, error, term, acc, out, 0
        )
    elif mode == RESUME:  # the state at k_lo, and the output there, as the SAVE call had them
        x[:, :] = saved_x
        arrived[:] = saved_arrived
        active = saved_active[0]
        cut, error = _output(
            lam[0], tt, num, saved_record, step, first_even, right_cut, cut, error, term, acc, out, 0
        )
        start = k_lo
    while start < k_hi:
        end = min(start + SEGMENT, k_hi)
        if start < k_lo:  # segments before the window end at prefix k_lo
            end = min(end, k_lo)
        keep = end >= k_lo
        # whole groups of LANES nodes (no scalar remainder loop; saturated nodes keep F = 1:
        # their increments a x[n-1] < SATURATED vanish against 1)
        scanned = (active + LANES - 1) // LANES * LANES
        _scan_segment(q, start, end, tt, x, arrived, s, a, n, scanned, clamp, record, keep)
        if keep:
            for k in range(max(start + 1, k_lo), end + 1):
                cut, error = _output(
                    lam[k - k_lo],
                    tt,
                    num,
                    record[k - start - 1],
                    step,
                    first_even,
                    right_cut,
                    cut,
                    error,
                    term,
                    acc,
                    out,
                    k - k_lo,
                )
        while active > 0:  # drop the top node while saturated
            below = 0.0
            for m in range(n):
                below += x[m, active - 1]
            if below >= saturated:
                break
            active -= 1
            arrived[active] = 1.0
        if mode == SAVE and start < k_lo and end == k_lo:
            saved_x[:, :] = x
            saved_arrived[:] = arrived
            saved_record[:] = record[k_lo - start - 1]
            saved_active[0] = active
        start = end
    return error


@numba.njit(cache=True, fastmath=False)
def _scan_segment(q, start, end, tt, x, arrived, s, a, n, active, clamp, record, keep):
    """Advance the state of nodes 0..active-1 over tokens start..end-1; with keep, record[i] = F
    after token start + i (every node: the saturated ones hold 1).

    A separate function with ``active`` fixed over the segment: with a trip count that changes
    inside the token loop the compiled level loops ran ~5x slower.
    """
    for k in range(start, end):
        qk = q[k]
        if qk > 0.0:  # q_k = 0: s = 1, a = 0, nothing changes
            # levels m = n-1 .. 1 in place; s = e^{-q_k t}, a = 1 - s (q_k t clamped) and F in the
            # top level's loop, x[0] in level 1's (separate short loops measured 2-3x slower)
            for m in range(n - 1, 0, -1):
                upper, lower = x[m], x[m - 1]
                if m == n - 1 and m == 1:
                    for j in range(active):
                        sj, aj = _exp_neg(min(qk * tt[j], clamp))
                        arrived[j] = _fma(aj, upper[j], arrived[j])  # F_k = F_{k-1} + a_k x_{k-1}[n-1]
                        value = _fma(upper[j], sj, lower[j] * aj)
                        upper[j] = value if value >= TINY else 0.0
                        low = lower[j] * sj
                        lower[j] = low if low >= TINY else 0.0
                elif m == n - 1:
                    for j in range(active):
                        sj, aj = _exp_neg(min(qk * tt[j], clamp))
                        s[j] = sj
                        a[j] = aj
                        arrived[j] = _fma(aj, upper[j], arrived[j])
                        value = _fma(upper[j], sj, lower[j] * aj)
                        upper[j] = value if value >= TINY else 0.0
                elif m == 1:
                    for j in range(active):
                        value = _fma(upper[j], s[j], lower[j] * a[j])
                        upper[j] = value if value >= TINY else 0.0
                        low = lower[j] * s[j]
                        lower[j] = low if low >= TINY else 0.0
                else:
                    for j in range(active):
                        value = _fma(upper[j], s[j], lower[j] * a[j])
                        upper[j] = value if value >= TINY else 0.0
        if keep:
            row = record[k - start]
            for j in range(arrived.size):
                row[j] = arrived[j]


@numba.njit(cache=True, fastmath=False)
def _output(lam_k, tt, num, arrived, step, first_even, right_cut, cut, error, term, acc, out, i):
    """out[i] = Qall_h at a prefix with tail mass lam_k and F = arrived; returns (cut, error).

    Sums h lambda t_j e^{-lambda t_j} F(t_j) over the nodes with lambda t_j <= right_cut (``cut``
    of them, non-decreasing along the window since lambda is non-increasing) in LANES partial
    sums (fixed order); the lanes of index parity first_even hold the nodes of the grid 2hZ.
    """
    if lam_k <= 0.0:
        out[i] = 1.0
        return cut, error
    while cut < num and lam_k * tt[cut] <= right_cut:
        cut += 1
    for j in range(cut):
        lt = lam_k * tt[j]
        e, _ = _exp_neg(lt)
        term[j] = lt * e * arrived[j]
    for j in range(cut, (cut + LANES - 1) // LANES * LANES):
        term[j] = 0.0
    for lane in range(LANES):
        acc[lane] = 0.0
    for j0 in range(0, cut, LANES):
        for lane in range(LANES):
            acc[lane] += term[j0 + lane]
    total = 0.0
    coarse = 0.0
    for lane in range(LANES):
        total += acc[lane]
        if lane % 2 == first_even:
            coarse += acc[lane]
    fine = step * total
    out[i] = min(fine, 1.0)
    return cut, max(error, abs(fine - 2.0 * step * coarse))


@numba.njit(cache=True, fastmath=False)
def candidate_window(p_prefix, q_sorted, n, top_mass, rest_mass, slack):
    """(k_lo, k_hi): the first and last prefix k whose lower bound p(H_k) - Q_k^n on the objective
    is within ``slack`` of the best upper bound min_k p(H_k) - L_k (``mdsd.bound._wor_window``).

    Q_k = min(q(H_k), 1); L_k = prod_{j<n} min(1, max(0, Q_k - R_jk) / max(1 - T_j, 1 - R_jk)) with
    R_jk = min(T_j, j max_{i<k} q_i, Q_k) (factor 0 where the room is 0); top_mass[j] = T_j (mass
    of the j largest q), rest_mass[j] = 1 - T_j summed from the other tokens. One fused pass per
    factor instead of numpy's temporaries.
    """
    size = q_sorted.size + 1
    q_prefix = np.empty(size)
    running_max = np.empty(size)
    total, peak = 0.0, 0.0
    q_prefix[0] = 0.0
    running_max[0] = 0.0
    for k in range(1, size):
        total += q_sorted[k - 1]
        peak = max(peak, q_sorted[k - 1])
        q_prefix[k] = min(total, 1.0)
        running_max[k] = peak
    low = np.ones(size)
    for j in range(n):
        top_j, rest_j = top_mass[j], rest_mass[j]
        for k in range(size):
            removed = min(min(top_j, j * running_max[k]), q_prefix[k])
            room = max(rest_j, 1.0 - removed)
            factor = max(q_prefix[k] - removed, 0.0) / room if room > 0.0 else 0.0
            low[k] *= min(factor, 1.0)
    best = np.inf
    for k in range(size):
        best = min(best, p_prefix[k] - low[k])
    k_lo, k_hi = -1, -1
    for k in range(size):
        power, base, e = 1.0, q_prefix[k], n  # Q_k^n by repeated squaring
        while e:
            if e & 1:
                power *= base
            e >>= 1
            if e:
                base *= base
        if p_prefix[k] - power <= best + slack:
            if k_lo < 0:
                k_lo = k
            k_hi = k
    return k_lo, k_hi


@numba.njit(cache=True, fastmath=False, inline="always")
def _power(x, n):
    """x^n for an integer n >= 1 by repeated squaring (as ``mdsd.laws.int_power``)."""
    result, base = 1.0, x
    while n:
        if n & 1:
            result *= base
        n >>= 1
        if n:
            base *= base
    return result


@numba.njit(cache=True, fastmath=False)
def iid_scan(p, q, order, keys, head, n):
    """(k*, f(H_k*)): the first minimiser of f(H_k) = p(H_k) - q(H_k)^n over the prefixes of the
    scan order (k = 0: f = 0), in one pass (i.i.d. drafts: Qall(H) = q(H)^n).

    p, q: [V] rows; order: the scan order; keys: -q/p in that order; head: the number of p = 0
    tokens at the front, whose q is gathered; elsewhere q = -keys p (within 1 ulp), as in
    ``mdsd.bound.scan_row``. Prefix sums left to right.
    """
    best, value = 0, 0.0
    p_acc, q_acc = 0.0, 0.0
    for k in range(order.size):
        x = order[k]
        pk = p[x]
        qk = q[x] if k < head else -keys[k] * pk
        p_acc += pk
        q_acc += qk
        f = p_acc - _power(min(q_acc, 1.0), n)  # q(H) > 1 by rounding only: Qall <= 1
        if f < value:
            best, value = k + 1, f
    return best, value
