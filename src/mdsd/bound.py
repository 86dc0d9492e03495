"""The optimal acceptance rate alpha* of a draft law (Hu et al., ICLR 2025; docs/theory.md §3).

For target p, draft q, n drafts from a law with Qall(H) = P(all n drafts lie in H), the best
acceptance P(y in set(x)) of any verifier that emits y ~ p exactly is the optimal-transport value

    alpha* = 1 + min_{H subset V} [ p(H) - Qall(H) ].

For ``iid``, ``without_replacement`` and ``conditional_poisson`` an optimal H is a prefix of the
tokens sorted by q(x)/p(x) in decreasing order (p = 0 first), so one sort and a scan over the V + 1
prefixes solve it (sort-and-scan). ``greedy`` (and ``spechub``, the same unordered law at n = 2)
have the closed form alpha* = p(T) + sum_{x not in T} min(p_x, q'_x), T = top-(n-1) of q.

Cost at LLM vocabularies (see BENCHMARKS.md): iid, greedy and spechub are one (vectorised) sort
or an O(V) selection plus a few passes. ``without_replacement`` integrates the exponential race
(``mdsd._race``) only on the prefixes that cheap bounds cannot rule out and only on the
quadrature nodes they need (``_wor_window``), with a compiled (numba) kernel on CPU;
``device="cuda"`` runs that integral on a GPU (torch). Two drafts, and three on up to
``laws.THREE_DRAFT_CLOSED_MAX`` tokens, have closed forms instead (no quadrature).
The plain references are kept next to the fast paths: ``mdsd._race.wor_qall_prefixes_reference``
(a Python loop over the tokens) and ``scan_reference`` (stable sort, every prefix, those Qall).

``bound_reference`` is the plain brute force over all 2^V subsets, with Qall from the law's explicit
tuple enumeration: the independent check the tests compare with.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from mdsd._optional import compiled_module
from mdsd._race import (
    numba_kernel,
    tail_masses,
    tail_masses_torch,
    wor_qall_prefixes_reference,
    wor_qall_window,
)
from mdsd._validate import as_probs, check_pair
from mdsd.laws import (
    IID,
    DraftLaw,
    complement_renormalised,
    get_law,
    top_tokens,
    top_tokens_reference,
)


@dataclass(frozen=True)
class OptimalBound:
    """alpha* and an optimal dual set H*, for one (p, q) pair or a batch.

    alpha:       float, or [B...] array for batched input.
    optimal_set: bool [..., V]; a minimiser H* of p(H) - Qall(H) (needed by optimal verifiers).
    error_estimate: without_replacement only: max over the evaluated prefixes of |Qall_h - Qall_2h|
        (race quadrature with step h against every other node): a conservative estimate, since the
        trapezoid error falls like exp(-a / h); the value itself is accurate to ~1e-12.
    """

    alpha: float | np.ndarray
    optimal_set: np.ndarray
    law: str
    n: int
    error_estimate: float = 0.0


def scan_order(target_probs: np.ndarray, draft_probs: np.ndarray) -> np.ndarray:
    """Tokens sorted by q/p decreasing (p = 0 first, q = 0 last), ties by lower index. [..., V]

    Fast paths: from ``RADIX_MIN`` tokens the compiled stable radix sort of -q/p
    (``mdsd._radix_numba``); below, numpy's default (unstable) argsort, then the p = 0 block at
    the front and the q = 0 block at the back put in index order, and the stable sort used
    instead only if two finite positive ratios tie.
    """
    p, q = np.asarray(target_probs), np.asarray(draft_probs)
    if p.ndim != 1:
        flat = [scan_order(pr, qr) for pr, qr in zip(p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1]))]
        return np.asarray(flat).reshape(p.shape)
    return _scan_order_keys(p, q)[0]


# From this many tokens the orders are sorted by the compiled radix sort (below it numpy's
# argsort is faster: ~20 us either way at 1,024 keys on the CPU of BENCHMARKS.md).
RADIX_MIN = 1024


def stable_argsort(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` of a float64 vector: numpy's default sort made stable
    (``mdsd._radix_numba.stabilize``: the indices of equal keys sorted) where that sort is the
    faster one on this CPU (``numpy_sort_is_faster``), else the compiled radix sort
    (``mdsd._radix_numba``); numpy's stable sort when numba is not installed. The same
    permutation either way (tested)."""
    compiled = compiled_module("mdsd._radix_numba")
    keys = np.ascontiguousarray(keys, dtype=np.float64)
    if compiled is None:
        return np.argsort(keys, kind="stable")
    if keys.size >= RADIX_MIN and numpy_sort_is_faster():
        return compiled.stabilize(keys, np.argsort(keys))
    return compiled.stable_argsort(keys)


@functools.cache
def numpy_sort_is_faster() -> bool:
    """Whether numpy's default argsort, made stable, beats the compiled radix sort on 32,000
    random keys on this CPU (best of five each, once per process, ~10 ms): numpy's sort is
    vectorised on some CPUs (AVX-512: ~0.3 ms) and not on others (~1.4 ms), where the radix sort
    takes ~0.5 ms. It picks the faster of two ways to the same permutation, never a result."""
    from mdsd._radix_numba import stabilize
    from mdsd._radix_numba import stable_argsort as radix

    keys = -np.random.default_rng(0).random(32_000)
    stabilize(keys, np.argsort(keys))  # both compiled and warm before timing
    radix(keys)

    def best(sort) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            sort()
            times.append(time.perf_counter() - start)
        return min(times)

    return best(lambda: stabilize(keys, np.argsort(keys))) < best(lambda: radix(keys))


def _scan_order_keys(p: np.ndarray, q: np.ndarray):
    """(order, -q/p in that order, number of p = 0 tokens at the front) for one row."""
    with np.errstate(divide="ignore", invalid="ignore"):
        key = np.divide(-q, p)  # -q/p: -inf where p = 0 < q, nan where p = q = 0
    if key.size >= RADIX_MIN:
        key[np.isnan(key)] = -np.inf  # p = 0 sorts first whatever q is
        order = stable_argsort(key)
        ordered = key[order]
        return order, ordered, int(np.searchsorted(ordered, -np.inf, side="right"))
    order = np.argsort(key)
    ordered = key[order]
    if ordered.size and np.isnan(ordered[-1]):  # argsort puts nan last: only then p = q = 0 exists
        key[np.isnan(key)] = -np.inf  # p = 0 sorts first whatever q is
        order = np.argsort(key)
        ordered = key[order]
    head = int(np.searchsorted(ordered, -np.inf, side="right"))  # p = 0
    tail = p.size - int(np.searchsorted(ordered, 0.0))  # q = 0 < p (key -0.0 == 0.0)
    middle = ordered[head : p.size - tail]
    if middle.size > 1 and np.any(middle[1:] == middle[:-1]):
        order = np.argsort(key, kind="stable")
        return order, key[order], head
    if head > 1:
        order[:head] = np.sort(order[:head])
    if tail > 1:
        order[p.size - tail :] = np.sort(order[p.size - tail :])
    return order, ordered, head


def optimal_bound(
    target_probs, draft_probs, n: int, law="iid", *, normalize=False, device=None, kernel="numba"
) -> OptimalBound:
    """Optimal acceptance rate alpha* of ``law`` with n drafts, and an optimal set H*.

    Args:
        target_probs: p, [..., V] probabilities (rows sum to 1).
        draft_probs:  q, [..., V], same shape; the law the drafts are really drawn from.
        n: number of drafts.
        law: ``iid``, ``without_replacement``, ``greedy``, ``spechub`` (n = 2) or
            ``conditional_poisson``.
        normalize: renormalise rows that do not sum to 1 instead of raising.
        device: torch device for the race quadrature of ``without_replacement`` (e.g. "cuda");
            default CPU. The sort and the scan stay on the host; results agree to ~1e-12.
        kernel: that quadrature's CPU kernel, ``"numba"`` (compiled, the default) or ``"torch"``
            (``mdsd._race``; the two are compared by the tests); ignored on CUDA. Neither
            applies where Qall has a closed form (n = 2; n = 3 on up to
            ``laws.THREE_DRAFT_CLOSED_MAX`` tokens).

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
        alpha, optimal_set, error = _sort_and_scan(p2, q2, n, the_law, device, kernel)
    else:
        alpha, optimal_set = _greedy_closed_form(p2, q2, n)
        error = np.zeros(len(p2))

    alpha = np.clip(alpha, 0.0, 1.0).reshape(batch_shape)
    optimal_set = optimal_set.reshape(p.shape)
    return OptimalBound(
        alpha=float(alpha) if not batch_shape else alpha,
        optimal_set=optimal_set,
        law=the_law.name,
        n=n,
        error_estimate=float(error.max()) if error.size else 0.0,
    )


def optimal_acceptance(
    target_probs, draft_probs, n: int, law="iid", *, normalize=False, device=None, kernel="numba"
):
    """alpha* = 1 + min_H [p(H) - Qall(H)]: a float for 1-D inputs, an array for [..., V].

    See :func:`optimal_bound` for the arguments and the laws.

    >>> round(optimal_acceptance([0.6, 0.4], [0.4, 0.6], 1), 12)
    0.8
    """
    return optimal_bound(
        target_probs, draft_probs, n, law, normalize=normalize, device=device, kernel=kernel
    ).alpha


@dataclass(frozen=True)
class PrefixScan:
    """The sort-and-scan of one (p, q) row: f(H_k) = p(H_k) - Qall(H_k) over the prefixes H_k.

    H_k is the first k tokens of the scan order (q/p decreasing for ``optimal_bound``; any order
    a caller passes to :func:`prefix_scan`, e.g. the optimal verifier's).

    order:    int64 [V]; position -> token id (None when the caller permuted p and q itself).
    p_prefix: float64 [V + 1]; p(H_k), summed left to right.
    q_prefix: float64 [V + 1]; q(H_k), summed left to right, capped at 1.
    qall:     float64 [V + 1]; Qall(H_k) from the law (``DraftLaw.qall_prefixes``); NaN on the
              prefixes a quadrature law's scan pruned (they cannot attain the minimum).
    best:     k*, the first minimiser of f; H* = order[:best].
    alpha:    1 + f(H_k*), alpha* before clipping to [0, 1].
    error:    estimate of the quadrature error of the evaluated Qall (0 for closed forms).
    The arrays are None for the compiled i.i.d. scan (``curves=False``), which keeps no curves.
    """

    order: np.ndarray | None
    p_prefix: np.ndarray | None
    q_prefix: np.ndarray | None
    qall: np.ndarray | None
    best: int
    alpha: float
    error: float = 0.0


def prefix_scan(
    p_ordered, q_ordered, n: int, law: DraftLaw, *, order=None, device=None, kernel="numba"
) -> PrefixScan:
    """Scan the prefixes of one row already permuted into scan order: [V], [V] -> PrefixScan.

    Qall comes from the law itself; for a law that integrates it numerically
    (``law.qall_by_quadrature(n, V)``: without_replacement, n >= 4, or 3 beyond
    ``laws.THREE_DRAFT_CLOSED_MAX`` tokens) only the prefixes whose cheap
    bounds leave them in the running are evaluated (``_wor_window``, with the race ``kernel``).
    ``order`` is stored as is.
    """
    p_prefix = prefix_sums(p_ordered)
    q_prefix = np.minimum(prefix_sums(q_ordered), 1.0)
    error = 0.0
    if law.qall_by_quadrature(n, q_ordered.size):
        q_ordered = np.ascontiguousarray(q_ordered)  # the compiled kernels take contiguous rows
        qall, error = _wor_window(p_prefix, q_prefix, q_ordered, n, device, kernel)
        objective = np.where(np.isnan(qall), np.inf, p_prefix - qall)
    else:
        qall = law.qall_prefixes(q_ordered[None, :], n, order=order)[0]
        objective = p_prefix - qall
    best = int(np.argmin(objective))
    return PrefixScan(order, p_prefix, q_prefix, qall, best, 1.0 + float(objective[best]), error)


def _sort_and_scan(p, q, n, law, device=None, kernel="numba"):
    """[B, V] x [B, V] -> alpha [B], H* [B, V], error [B] by the prefix scan of the q/p order."""
    batch, vocab = p.shape
    alpha, error = np.empty(batch), np.zeros(batch)
    optimal_set = np.zeros((batch, vocab), dtype=bool)
    for b in range(batch):
        scan = scan_row(p[b], q[b], n, law, device=device, curves=False, kernel=kernel)
        alpha[b], error[b] = scan.alpha, scan.error
        optimal_set[b, scan.order[: scan.best]] = True
    return alpha, optimal_set, error


def scan_row(
    p_row, q_row, n: int, law: DraftLaw, *, device=None, curves: bool = True, kernel="numba"
) -> PrefixScan:
    """The sort-and-scan of alpha* for one validated row: order by q/p, then :func:`prefix_scan`.

    curves=False lets i.i.d. drafts take the compiled one-pass scan (``mdsd._race_numba.iid_scan``),
    which returns k* and f(H_k*) only (the record's curves are None).
    """
    order, keys, head = _scan_order_keys(p_row, q_row)
    compiled = numba_kernel() if law.name == "iid" and not curves else None
    if compiled is not None:
        best, value = compiled.iid_scan(p_row, q_row, order, keys, head, n)
        return PrefixScan(order, None, None, None, int(best), 1.0 + float(value))
    return prefix_scan(p_row[order], q_row[order], n, law, order=order, device=device, kernel=kernel)


def prefix_sums(values: np.ndarray) -> np.ndarray:
    """[0, v_0, v_0 + v_1, ...]: the V + 1 prefix sums of a [V] float64 vector, left to right
    (torch's cumsum on long rows, several times faster than numpy's on one core)."""
    out = np.zeros(values.size + 1)
    if values.size < TORCH_CUMSUM_MIN:
        np.cumsum(values, out=out[1:])
    else:
        torch.cumsum(torch.from_numpy(np.ascontiguousarray(values)), 0, out=torch.from_numpy(out)[1:])
    return out


TORCH_CUMSUM_MIN = 2048  # below this length numpy's cumsum wins (no torch call overhead)


# Prefixes whose lower bound is within this of the best upper bound are evaluated exactly; it
# only has to exceed the rounding error of the bounds themselves.
CANDIDATE_SLACK = 1e-9


def _wor_window(p_prefix, q_prefix, q_sorted, n, device=None, kernel="numba"):
    """Qall(H_k) where f(H_k) = p(H_k) - Qall(H_k) can be the minimum, NaN elsewhere; and an
    error estimate (without_replacement, n >= 4 or a long row with n = 3: the race integral of
    ``mdsd._race``).

    Cheap bounds prune the prefixes (only these are integrated, and only on the quadrature nodes
    they need): with Q = q(H), T_j = an upper bound on the mass of the j largest q in H,
        prod_{j<n} max(0, (Q - T_j) / (1 - T_j))  <=  Qall(H)  <=  Q^n
    (without replacement, the j-th draw stays in H with probability (Q - removed) / (1 - removed),
    and removed <= T_j, removed >= 0). So f >= p(H) - Q^n =: lower and min f <= min (p(H) - the
    left side) =: best; prefixes with lower > best cannot attain the minimum.
    """
    vocab = q_sorted.size
    # T_j <= min(top-j mass of all of q, j * largest q in H, Q)
    top = -np.sort(-np.partition(q_sorted, vocab - n)[vocab - n :]) if vocab > n else -np.sort(-q_sorted)
    top_mass = np.concatenate([[0.0], np.cumsum(top)])[:n]  # T_0..T_{n-1} of q
    rest_mass = np.array([q_sorted.sum() - m for m in top_mass])  # 1 - T_j, summed for precision
    compiled = numba_kernel()
    if compiled is not None:  # the same bounds in one fused compiled pass per factor
        k_lo, k_hi = compiled.candidate_window(
            p_prefix, q_sorted, n, np.ascontiguousarray(top_mass), rest_mass, CANDIDATE_SLACK
        )
    else:
        k_lo, k_hi = _candidate_window(p_prefix, q_sorted, n, top_mass, rest_mass, q_prefix)
    qall = np.full(vocab + 1, np.nan)
    if device is None or torch.device(device).type == "cpu":  # numpy in: the kernel named
        tail = tail_masses(q_sorted[None, :])[0]
        window, error = wor_qall_window(q_sorted, tail, n, k_lo, k_hi, kernel=kernel)
    else:
        q_row = torch.from_numpy(q_sorted).to(device)
        window, error = wor_qall_window(q_row, tail_masses_torch(q_row[None, :])[0], n, k_lo, k_hi)
        window = window.cpu().numpy()
    qall[k_lo : k_hi + 1] = window
    return qall, error


def _candidate_window(p_prefix, q_sorted, n, top_mass, rest_mass, q_prefix=None):
    """numpy version of ``mdsd._race_numba.candidate_window`` (used when numba is missing)."""
    vocab = q_sorted.size
    if q_prefix is None:
        q_prefix = np.minimum(prefix_sums(q_sorted), 1.0)
    lower = p_prefix - IID.qall_of_mass(q_prefix, n)  # Qall <= q(H)^n (the i.i.d. Qall)
    running_max = np.zeros(vocab + 1)
    np.maximum.accumulate(q_sorted, out=running_max[1:])
    qall_low = np.ones(vocab + 1)
    for j in range(n):
        removed = np.minimum(np.minimum(top_mass[j], j * running_max), q_prefix)
        room = np.maximum(rest_mass[j], 1.0 - removed)  # 1 - removed >= 1 - T_j
        # room = 0 only when H holds all the mass but rounding: the factor 0 is still a bound
        factor = np.divide(np.maximum(q_prefix - removed, 0.0), room, out=np.zeros_like(room), where=room > 0)
        qall_low *= np.minimum(factor, 1.0)
    best = float(np.min(p_prefix - qall_low))
    candidates = np.flatnonzero(lower <= best + CANDIDATE_SLACK)
    return int(candidates[0]), int(candidates[-1])


def _greedy_closed_form(p, q, n):
    """alpha* = p(T) + sum_{x not in T} min(p_x, q'_x); H* = T + {x not in T: q'_x > p_x}.

    Rows are processed in blocks of about ``BLOCK_ELEMENTS`` entries so that the temporaries stay
    in cache (a [64, 32000] batch at once was ~1.7x slower per row than one row).
    """
    alpha = np.empty(p.shape[0])
    optimal_set = np.empty(p.shape, dtype=bool)
    step = max(1, BLOCK_ELEMENTS // p.shape[1])
    for start in range(0, p.shape[0], step):
        rows = slice(start, start + step)
        top = top_tokens(q[rows], n - 1)
        rest = complement_renormalised(q[rows], top)  # q', zero on T
        in_top = np.zeros(rest.shape, dtype=bool)
        np.put_along_axis(in_top, top, True, axis=1)
        alpha[rows] = np.where(in_top, p[rows], np.minimum(p[rows], rest)).sum(axis=1)
        optimal_set[rows] = in_top | (rest > p[rows])
    return alpha, optimal_set


BLOCK_ELEMENTS = 1 << 16  # entries per block of rows in the closed form (fits in L2 with temporaries)


# -- reference ---------------------------------------------------------------------------------


def qall_reference(tuples: np.ndarray, probs: np.ndarray, subset_mask: np.ndarray) -> float:
    """P(all drafts in H) from an explicit tuple distribution. tuples [M, n], subset_mask [V]."""
    inside = subset_mask[tuples].all(axis=1)
    return float(probs[inside].sum())


def scan_reference(target_probs, draft_probs, n: int, law="iid", *, step: float = 0.2) -> float:
    """alpha* by the plain sort-and-scan: stable sort by q/p, every prefix, reference Qall.

    1-D p, q (validated by the caller). without_replacement: the Python-loop race quadrature
    ``wor_qall_prefixes_reference`` at trapezoid ``step`` (every n); other prefix-scan laws: the
    law's ``qall_prefixes``; greedy / spechub: the closed form with the stable-sort top tokens.
    The reference the fast paths are compared with.
    """
    p, q = np.asarray(target_probs, np.float64), np.asarray(draft_probs, np.float64)
    if law in ("greedy", "spechub"):
        top = top_tokens_reference(q, n - 1)
        rest = complement_renormalised(q, top)
        keep = np.ones(p.size, dtype=bool)
        keep[top] = False
        return float(p[top].sum() + np.minimum(p[keep], rest[keep]).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p == 0, np.inf, q / p)
    order = np.argsort(-ratio, kind="stable")
    p_prefix = np.concatenate([[0.0], np.cumsum(p[order])])
    if law == "without_replacement":
        qall = wor_qall_prefixes_reference(q[None, order], n, step=step)[0]
    else:
        qall = get_law(law).qall_prefixes(q[None, order], n)[0]
    return float(1.0 + np.min(p_prefix - qall))


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
