"""Exponential-race quadrature: Qall(H) for sequential sampling without replacement.

Sequential sampling without replacement from ``q`` has the law of the arrival order of an
exponential race: token i arrives at T_i ~ Exp(rate q_i), independently, and the n drafts are the
first n arrivals. All n drafts lie in H exactly when the n-th arrival from H comes before the first
arrival from L = V \\ H, which arrives at an Exp(lambda) time with lambda = q(L). Hence (docs/theory.md §4.1)

    Qall(H) = int_0^inf lambda * exp(-lambda t) * P(N_H(t) >= n) dt,

with N_H(t) ~ Poisson-binomial(1 - exp(-q_i t), i in H). Substituting t = e^u makes the integrand
analytic in a strip around the real u-axis and double-exponentially decaying on the right, so the
trapezoid rule with step h converges like exp(-a / h). a = pi^2 for one draft; measured on random
and LLM-like cases, the strip narrows as n grows (a(8) ~ 6.3, a(16) ~ 5): h = 0.3 gave ~1e-11 at
n = 4 but ~2e-9 at n = 8, V = 300; the reference's STEP = 0.2 gives ~1e-15 up to n = 8 and ~5e-12
at n = 16 (pass a finer ``step`` for larger n; the tests use 0.15).

Two implementations of the same quadrature:

``wor_qall_prefixes_reference``  the plain one: one pass over the tokens in scan order, carrying for
    every node t_j the distribution of min(N, n). A Python loop over V; O(V * n * nodes).
``wor_qall_prefixes`` / ``wor_qall_window``  the fast one (torch, CPU or CUDA), vectorised over
    prefixes and nodes, with the step h(n) of ``fast_step`` (target ~1e-11). For a node t, write
    r_i = e^{q_i t} - 1 and E_k = sum_{i<=k} q_i t. The probabilities x_k[m] = P(N_{H_k}(t) = m),
    m < n, scaled as y_k[m] = x_k[m] e^{E_k}, obey y_k[m] = y_{k-1}[m] + r_k y_{k-1}[m-1]: each
    level m is one cumulative sum over the prefixes. The n-th arrival happens at token k with
    probability a_k x_{k-1}[n-1] (a_k = 1 - e^{-q_k t}), so P(N_{H_k} >= n) is one more cumulative
    sum of non-negative terms. Numerics: (1) q_i t is clamped at ``CLAMP`` (the token counts as
    surely arrived; each clamp moves the law of N by at most 2 e^{-CLAMP} in total variation);
    (2) the prefixes are cut into chunks over which E grows by at most ``SPAN`` at every node, and
    the scaled state restarts at each chunk, so nothing overflows; all sums are of non-negative
    terms (relative accuracy ~V eps); (3) a node whose P(N <= n-1) has fallen below ``SATURATED``
    is dropped: it is non-increasing in k, so it stays negligible for every later prefix; nodes
    certified saturated (Chernoff bound) before the first prefix that needs them are never run.
    ``wor_qall_window`` evaluates a window of prefixes k_lo..k_hi only (the bound prunes the
    others) on the nodes that window needs (t <= RIGHT_CUT / min lambda).

On CPU the fast path runs the compiled kernel of ``mdsd._race_numba`` by default: the same nodes,
step, clamping and saturation rule, in one fused pass over the tokens with the nodes vectorised,
in unscaled probability space (x_k[m] = x_{k-1}[m] (1 - a_k) + x_{k-1}[m-1] a_k: a convex
combination, so no chunks, scaling or restarts). ``kernel="torch"`` (an argument of every function
that runs the quadrature, up to ``mdsd.optimal_bound``) selects the torch implementation above on
CPU; CUDA tensors always use it.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from mdsd._optional import compiled_module
from mdsd._threads import torch_threads

TAIL = 1e-17  # mass allowed to be cut off at each end of the u-integral (reference)
STEP = 0.2  # trapezoid step in u = log t (reference); discretisation error ~ exp(-a(n) / STEP)

FAST_TOLERANCE = 1e-11  # target discretisation error of the fast path (sets its step, see fast_step)
SMALL_VOCAB, SMALL_VOCAB_STEP = 2048, 0.75  # up to this V the step is scaled by this factor
FAST_TAIL = 1e-15  # left-tail truncation of the fast path (bound on the omitted sum)
RIGHT_CUT = 40.0  # nodes with lambda t > RIGHT_CUT carry weight < RIGHT_CUT e^{-RIGHT_CUT}
CLAMP = 50.0  # q_i t is capped here: total-variation change of N <= 2 e^{-50} ~ 4e-22 per token
SPAN = 700.0  # growth allowed to the scaled state within one chunk (e^709 is float64's limit)
CHUNK_TOKENS = 8192  # tokens per chunk at most, so a chunk's buffers stay in cache
SATURATED = 1e-22  # a node with P(N <= n - 1) below this is dropped for the remaining prefixes
RACE_CPU_THREADS = 1  # torch intra-op threads for the scan on CPU (None: leave torch's setting)
KERNELS = ("numba", "torch")  # kernels for CPU inputs (``kernel=``); CUDA tensors always run torch


def race_nodes(min_rate: float, n: int, step: float = STEP) -> np.ndarray:
    """Quadrature nodes u_j (t_j = e^{u_j}) covering every prefix whose tail mass >= min_rate."""
    u_lo = math.log(TAIL) / (n + 1)
    u_hi = math.log(-math.log(TAIL) / min_rate)
    count = int(math.ceil((u_hi - u_lo) / step)) + 1
    return u_lo + step * np.arange(count)


def race_weights(tail_mass: np.ndarray, u: np.ndarray, step: float) -> np.ndarray:
    """Trapezoid weights h * lambda * t * exp(-lambda t) at t = e^u.  [..., K] x [J] -> [..., K, J]"""
    t = np.exp(u)
    lt = tail_mass[..., None] * t  # [..., K, J]
    return step * lt * np.exp(-lt)


def tail_masses(q_rows: np.ndarray) -> np.ndarray:
    """lambda_k = q(V \\ H_k) for k = 0..V, summed from the small end.  [B, V] -> [B, V + 1]"""
    tail = np.zeros((q_rows.shape[0], q_rows.shape[1] + 1))
    tail[:, :-1] = np.cumsum(q_rows[:, ::-1], axis=1)[:, ::-1]
    return tail


def wor_qall_prefixes_reference(draft_probs_ordered: np.ndarray, n: int, step: float = STEP):
    """Qall(H_k) for the prefixes H_k = first k tokens of the given order, k = 0..V (plain loop).

    draft_probs_ordered: [B, V] float64, q permuted into scan order. Returns [B, V + 1].
    Assumes every row has at least n tokens with positive mass (checked by the caller).
    """
    q = draft_probs_ordered
    batch, vocab = q.shape
    tail_mass = tail_masses(q)
    positive = tail_mass[tail_mass > 0]
    min_rate = float(positive.min()) if positive.size else 1.0
    u = race_nodes(min_rate, n, step)
    t = np.exp(u)  # [J]

    qall = np.zeros((batch, vocab + 1))
    # state[b, j, m] = P(min(N_{H_k}(t_j), n) = m)
    state = np.zeros((batch, t.size, n + 1))
    state[:, :, 0] = 1.0
    for k in range(vocab):
        qt = q[:, k, None] * t  # [B, J]
        stay = np.exp(-qt)[..., None]  # token k has not arrived by t_j
        arrive = -np.expm1(-qt)[..., None]
        new = state * stay
        new[..., 1:] += state[..., :-1] * arrive
        new[..., n] += state[..., n] * arrive[..., 0]
        state = new
        weights = race_weights(tail_mass[:, k + 1], u, step)  # [B, J]
        qall[:, k + 1] = np.einsum("bj,bj->b", weights, state[..., n])
    # lambda = 0: no draft can fall outside H, so all n drafts lie in H surely.
    qall[tail_mass == 0] = 1.0
    return np.minimum(qall, 1.0)


# -- fast path ------------------------------------------------------------------------------------


def fast_step(n: int, tolerance: float = FAST_TOLERANCE) -> float:
    """Trapezoid step in u for n drafts: error ~ exp(-a(n) / h), a(n) calibrated on random cases.

    a(1) = pi^2 (strip |Im u| < pi/2); the strip where the integrand stays moderate narrows as n
    grows (the n-th arrival time is sharper), measured a(8) ~ 6.3, a(16) ~ 5.
    """
    log_n = math.log(n)
    rate = math.pi**2 / (1.0 + 0.25 * log_n + 0.04 * log_n**2)
    return rate / math.log(1.0 / tolerance)


def fast_nodes(min_rate: float, n: int, step: float) -> np.ndarray:
    """Nodes u_j on the grid step * Z covering prefixes with tail mass >= min_rate."""
    # left: sum_{u_j < u_lo} h e^{(n+1) u_j} / n! <= FAST_TAIL
    log_left = math.log(FAST_TAIL) + math.lgamma(n + 1) + math.log(-math.expm1(-(n + 1) * step) / step)
    u_lo = log_left / (n + 1)
    u_hi = math.log(RIGHT_CUT / min_rate)
    j_lo, j_hi = math.floor(u_lo / step), math.ceil(u_hi / step)
    return step * np.arange(j_lo, max(j_hi, j_lo + 1) + 1)


def chernoff_lower_tail(mean: torch.Tensor, n: int) -> torch.Tensor:
    """Bound on P(N <= n - 1) for a Poisson-binomial N with mean ``mean`` (>= n - 1 to be < 1).

    P(N <= k) <= e^{-mean} (e mean / k)^k for mean > k (Chernoff); k = 0: e^{-mean}.
    """
    k = n - 1
    if k == 0:
        return torch.exp(-mean)
    log_bound = -mean + k * (1.0 + torch.log(torch.clamp(mean, min=1e-300) / k))
    return torch.where(mean > k, torch.exp(log_bound), torch.ones_like(mean))


def race_arrived(q_row: torch.Tensor, t: torch.Tensor, n: int, k_lo: int, k_hi: int):
    """F[j, k] = P(N_{H_k}(t_j) >= n) for the prefixes k = k_lo..k_hi of one row.

    q_row: [V] float64 in scan order; t: [J] nodes. Returns [J, k_hi - k_lo + 1]. The scan runs
    over tokens 0..k_hi - 1; nodes with t <= SPAN need a single chunk (E_k <= t q(V) <= SPAN),
    the others go through the chunked loop (see the module docstring for the numerics).
    """
    small = t <= SPAN
    if bool(small.all()) or not bool(small.any()):
        return _arrived_chunked(q_row, t, n, k_lo, k_hi)
    arrived = torch.empty(t.numel(), k_hi - k_lo + 1, dtype=q_row.dtype, device=q_row.device)
    for group in (small, ~small):
        arrived[group] = _arrived_chunked(q_row, t[group], n, k_lo, k_hi)
    return arrived


def _arrived_chunked(q_row, t, n, k_lo, k_hi):
    num_nodes, dtype, device = t.numel(), q_row.dtype, q_row.device
    qt = torch.clamp(t[:, None] * q_row[None, :k_hi], max=CLAMP)  # [J, K]
    energy = torch.empty(num_nodes, k_hi + 1, dtype=dtype, device=device)
    energy[:, 0] = 0.0
    torch.cumsum(qt, dim=1, out=energy[:, 1:])  # E_k = sum_{i<k} q_i t, [J, K + 1]
    ratio = torch.expm1(qt, out=qt)  # r_i = e^{q_i t} - 1 <= e^CLAMP, [J, K]

    # nodes dropped as saturated keep F = 1 (to within SATURATED) for the rest of the window
    arrived = torch.ones(num_nodes, k_hi - k_lo + 1, dtype=dtype, device=device)
    if k_lo == 0:
        arrived[:, 0] = 0.0  # empty prefix: nothing arrived
    state = torch.zeros(num_nodes, n + 1, dtype=dtype, device=device)  # x[m], m < n; F last
    state[:, 0] = 1.0
    active = torch.arange(num_nodes, device=device)
    start = 0
    while start < k_hi and active.numel():
        everyone = active.numel() == num_nodes
        e_start = energy[:, start : start + 1] if everyone else energy[active, start : start + 1]
        e_last = energy[:, k_hi] if everyone else energy[active, k_hi]
        if float((e_last - e_start[:, 0]).max()) <= SPAN:
            end = min(k_hi, start + CHUNK_TOKENS)
        else:  # the last prefix where every active node's E grew by at most SPAN
            rest = (energy[:, start:] if everyone else energy[:, start:][active]).contiguous()
            end = start + int(torch.searchsorted(rest, e_start + SPAN, right=True).min()) - 1
            end = min(max(end, start + 1), k_hi, start + CHUNK_TOKENS)
        if start < k_lo - 1:  # chunks before the window end at prefix k_lo - 1
            end = min(end, k_lo - 1)
        outputs = end >= k_lo  # some prefix of this chunk is in the window
        r = (ratio[:, start:end] if everyone else ratio[:, start:end][active]).contiguous()  # [A, L]
        x0 = state if everyone else state[active]  # [A, n + 1]
        if outputs:  # decay[k] = e^{-(E_k - E_start)} at the prefixes start..end
            e_chunk = energy[:, start : end + 1] if everyone else energy[:, start : end + 1][active]
            decay = torch.exp(e_chunk[:, :1] - e_chunk)
        else:  # only the end state is needed: its decay alone
            e_end = energy[:, end : end + 1] if everyone else energy[active, end : end + 1]
            decay = torch.exp(e_start - e_end)
        part, new_state = _chunk_arrivals(r, decay, x0, n, outputs)
        if everyone:
            state = new_state
        else:
            state[active] = new_state
        lo, hi = max(start + 1, k_lo), end  # prefixes of this chunk inside the window
        if outputs and lo <= hi:
            part = part[:, lo - start - 1 : hi - start]
            if everyone:
                arrived[:, lo - k_lo : hi - k_lo + 1] = part
            else:
                arrived[active, lo - k_lo : hi - k_lo + 1] = part
        # P(N <= n-1) is non-increasing in k: a node below SATURATED stays negligible
        active = active[new_state[:, :n].sum(dim=1) >= SATURATED]
        start = end
    return arrived


def _chunk_arrivals(r: torch.Tensor, decay: torch.Tensor, x0: torch.Tensor, n: int, outputs: bool = True):
    """P(N >= n) at the prefixes of one chunk, and the state at its end.

    r: [A, L] contiguous (tokens of the chunk); decay: [A, L + 1] = e^{-(E_k - E_start)} at the
    prefixes start..end ([A, 1], its last column, when outputs=False); x0: [A, n + 1] =
    (P(N = m) for m < n, P(N >= n)) at the chunk start. outputs=False (a chunk before the window):
    no per-prefix F; the end state's F is 1 - sum_m P(N = m) (absolute error ~1e-16).
    Scaled levels y[m]_k = x[m]_k e^{E_k - E_start} obey y[m]_k = y[m]_{k-1} + r_k y[m-1]_{k-1}
    (y[0] constant): one cumulative sum per level. The n-th arrival happens at token k with
    probability a_k x[n-1]_{k-1}, a_k = r_k / (1 + r_k), so F_k = F_start + sum of those: no
    level sums, and F keeps full relative accuracy when small.
    Returns (F at the L prefixes after the start [A, L], the state at the end [A, n + 1]).
    """
    rows, width = r.shape
    # Each level's cumulative sum is written one element into a flat buffer, so that the same
    # buffer read from element 0 holds y[m] shifted by one prefix (what the next level needs),
    # with column 0 then reset to the value at the chunk start. All operands stay contiguous.
    buffers = [torch.empty(rows * width + 1, dtype=r.dtype, device=r.device) for _ in range(2)]
    incr = torch.empty_like(r)
    end_state = torch.empty_like(x0)
    end_state[:, 0] = x0[:, 0]
    shifted = x0[:, 0:1].expand(rows, width)  # y[0] at prefixes start..end-1
    for m in range(1, n):
        torch.mul(r, shifted, out=incr)
        incr[:, 0] += x0[:, m]  # the level's value at the chunk start
        if m == n - 1 and not outputs:  # only the end value of the last level is needed
            end_state[:, m] = incr.sum(dim=1)
            break
        buf = buffers[m % 2]
        level = buf[1:].view(rows, width)  # y[m] at prefixes start+1..end
        torch.cumsum(incr, dim=1, out=level)
        end_state[:, m] = level[:, -1]
        shifted = buf[:-1].view(rows, width)  # y[m] at prefixes start..end-1
        shifted[:, 0] = x0[:, m]
    if not outputs:
        end_state[:, :n] *= decay[:, -1:]
        end_state[:, n] = torch.clamp(1.0 - end_state[:, :n].sum(dim=1), min=0.0)
        return None, end_state
    # F increments a_k x[n-1]_{k-1} = r_k / (1 + r_k) * y[n-1]_{k-1} * decay_{k-1}
    torch.mul(r, shifted, out=incr)
    incr *= decay[:, :-1]
    spare = buffers[n % 2][1:].view(rows, width)  # not the one holding y[n-1]
    incr /= torch.add(r, 1.0, out=spare)
    incr[:, 0] += x0[:, n]
    arrived = torch.cumsum(incr, dim=1)
    end_state[:, :n] *= decay[:, -1:]
    end_state[:, n] = arrived[:, -1]
    return arrived, end_state


def _maybe_live(q_row, lam, t, n, k_lo):
    """False for nodes certified saturated wherever they matter; [J] bool.

    Node t_j matters for prefixes k >= k_lo with lambda_k t_j <= RIGHT_CUT, from k_s(j) on. There
    P(N <= n-1) is non-increasing in k, and at k_s it is at most the Chernoff bound for the mean
    mu = sum_{i < k_s} (1 - e^{-q_i t}) >= (1 - 1/e) (#{q_i >= 1/t} + t q({q_i < 1/t}))
    - min(t lambda_{k_s}, V - k_s) (all tokens, less what the tokens after k_s can add).
    """
    vocab = q_row.numel()
    if q_row.device.type == "cpu":  # numpy's vectorised sort is far faster than torch's on CPU
        asc_np = np.sort(q_row.numpy())
        asc, desc = torch.from_numpy(asc_np), torch.from_numpy(asc_np[::-1].copy())
    else:
        asc = torch.sort(q_row).values
        desc = torch.flip(asc, (0,))
    mass_desc = torch.cumsum(desc, 0)
    count_big = vocab - torch.searchsorted(asc, 1.0 / t)  # #{q >= 1/t}
    mass_big = torch.where(count_big > 0, mass_desc[(count_big - 1).clamp(min=0)], torch.zeros_like(t))
    mass_small = torch.clamp(mass_desc[-1] - mass_big, min=0.0)
    mean_all = (1.0 - math.exp(-1.0)) * (count_big + t * mass_small)
    # k_s(j): first window prefix with lambda_k t_j <= RIGHT_CUT (lam is non-increasing)
    first = torch.searchsorted(-lam, -(RIGHT_CUT / t)).clamp(max=lam.numel() - 1)
    k_s = k_lo + first
    after = torch.minimum(t * lam[first], (vocab - k_s).to(t.dtype))
    return chernoff_lower_tail(torch.clamp(mean_all - after, min=0.0), n) >= SATURATED


@contextlib.contextmanager
def _cpu_threads(device, threads):
    """Run torch CPU kernels with ``threads`` intra-op threads (restored afterwards).

    The scan's kernels are memory-bound passes of a few MB; on a shared machine torch's thread
    pool made them ~10x slower (spinning workers competing with other processes), so they run
    on one thread by default. Set RACE_CPU_THREADS = None to keep torch's setting.
    """
    with torch_threads(threads if torch.device(device).type == "cpu" else None):
        yield


def wor_qall_window(
    q_row, tail, n: int, k_lo: int, k_hi: int, step: float | None = None, *, kernel: str = "numba"
):
    """Qall(H_k), k_lo <= k <= k_hi, for one row; returns (qall [K], error_estimate).

    q_row: [V] float64 (numpy array or torch tensor) in scan order; tail: [V + 1] its tail masses
    lambda_k. qall has q_row's type (numpy or torch, same device).
    error_estimate: max_k |Qall_h - Qall_2h| (the same sum over every other node), an estimate of
    the error of the coarser rule; the returned values use step h and are far more accurate.
    kernel: "numba" (compiled CPU kernel, the default; torch when numba is not installed) or
    "torch", for CPU inputs; CUDA tensors always run torch.
    """
    is_torch = isinstance(q_row, torch.Tensor)
    if _use_numba(q_row, kernel):
        q_np = q_row.numpy() if is_torch else q_row
        tail_np = tail.numpy() if isinstance(tail, torch.Tensor) else tail
        qall, error = _wor_qall_window_numba(q_np, tail_np, n, k_lo, k_hi, step)
        return (torch.from_numpy(qall) if is_torch else qall), error
    q_t = q_row if is_torch else torch.from_numpy(np.ascontiguousarray(q_row, dtype=np.float64))
    tail_t = tail if isinstance(tail, torch.Tensor) else torch.from_numpy(np.asarray(tail))
    with _cpu_threads(q_t.device, RACE_CPU_THREADS):
        qall, error = _wor_qall_window(q_t, tail_t, n, k_lo, k_hi, step)
    return (qall if is_torch else qall.cpu().numpy()), error


def _use_numba(values, kernel) -> bool:
    """True when the numba kernel is to run on ``values`` (numpy array or torch tensor)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(values, torch.Tensor) and values.device.type != "cpu":
        return False
    return kernel == "numba" and numba_kernel() is not None


def numba_kernel():
    """The module ``mdsd._race_numba``, or None when numba is not installed (imported on first
    use, ``mdsd._optional.compiled_module``: importing numba costs ~0.3 s)."""
    return compiled_module("mdsd._race_numba")


def _window_step(n: int, vocab: int, step: float | None) -> float:
    """The fast path's trapezoid step: ``fast_step(n)``, finer for small vocabularies."""
    if step is not None:
        return step
    # small problems are cheap: spend nodes on two more digits
    return fast_step(n) * (SMALL_VOCAB_STEP if vocab <= SMALL_VOCAB else 1.0)


def _wor_qall_window_numba(
    q_row: np.ndarray, tail: np.ndarray, n: int, k_lo: int, k_hi: int, step: float | None
):
    """``wor_qall_window`` on the numba kernel (numpy in, numpy out); same nodes as torch's."""
    q_row = np.ascontiguousarray(q_row, dtype=np.float64)
    lam = np.ascontiguousarray(tail[k_lo : k_hi + 1], dtype=np.float64)
    if n == 1:  # one draft: Qall(H) = q(H)
        prefix = np.concatenate([[0.0], np.cumsum(q_row[:k_hi])])
        return np.minimum(prefix[k_lo : k_hi + 1], 1.0), 0.0
    positive = lam[lam > 0]
    if not positive.size:  # every prefix holds all the mass
        return np.ones_like(lam), 0.0
    min_rate = float(positive.min())
    step = _window_step(n, q_row.size, step)
    u = fast_nodes(min_rate, n, step)
    # nodes with min_rate t > RIGHT_CUT carry no weight at any prefix of the window
    u = u[: max(1, int(np.count_nonzero(np.exp(u) * min_rate <= RIGHT_CUT)))]
    first_even = round(u[0] / step) % 2  # nodes j with j % 2 == first_even lie on the grid 2hZ
    qall = np.empty(lam.size)
    error = numba_kernel().race_window(
        q_row, lam, np.exp(u), n, k_lo, k_hi, step, first_even, CLAMP, SATURATED, RIGHT_CUT, qall
    )
    return qall, float(error)


def _wor_qall_window(q_row, tail, n, k_lo, k_hi, step):
    lam = tail[k_lo : k_hi + 1]
    if n == 1:  # one draft: Qall(H) = q(H)
        prefix = torch.cumsum(torch.cat([q_row.new_zeros(1), q_row]), 0)
        return prefix[k_lo : k_hi + 1].clamp(max=1.0), 0.0
    min_rate = float(torch.where(lam > 0, lam, torch.inf).min())
    if not math.isfinite(min_rate):  # every prefix holds all the mass
        return torch.ones_like(lam), 0.0
    step = _window_step(n, q_row.numel(), step)
    u = torch.as_tensor(fast_nodes(min_rate, n, step), dtype=q_row.dtype, device=q_row.device)
    t = torch.exp(u)
    live = _maybe_live(q_row, lam, t, n, k_lo)
    # weights h lambda t e^{-lambda t} times F = P(N >= n); nodes certified saturated have F = 1
    # wherever their weight is not negligible. In place: [J, K] can be large (K = all prefixes).
    integrand = torch.mul(lam[None, :], t[:, None])  # lambda_k t_j, [J, K]
    decay = torch.neg(integrand).exp_()
    integrand.mul_(decay)
    del decay
    if bool(live.all()):
        integrand.mul_(race_arrived(q_row, t, n, k_lo, k_hi))
    elif bool(live.any()):
        integrand[live] *= race_arrived(q_row, t[live], n, k_lo, k_hi)
    qall = step * integrand.sum(dim=0)
    first_even = int(torch.round(u[0] / step).long() % 2)  # rows on the grid 2 h Z
    coarse = 2.0 * step * integrand[first_even::2].sum(dim=0)
    ok = lam > 0
    error = float((qall - coarse)[ok].abs().max()) if bool(ok.any()) else 0.0
    qall = torch.where(ok, qall.clamp(max=1.0), torch.ones_like(qall))
    return qall, error


def wor_qall_prefixes(draft_probs_ordered, n: int, *, device=None, kernel: str = "numba"):
    """Qall(H_k) for the prefixes H_k = first k tokens of the given order, k = 0..V (fast path).

    draft_probs_ordered: [B, V] float64 numpy array or torch tensor, q permuted into scan order.
    device: torch device for the computation (default: the tensor's, or CPU).
    kernel: "numba" (default) or "torch" on CPU; CUDA always runs torch.
    Returns [B, V + 1], numpy for numpy input, torch for torch input.
    """
    as_numpy = not isinstance(draft_probs_ordered, torch.Tensor)
    if as_numpy and device is None and _use_numba(draft_probs_ordered, kernel):
        # numpy in, compiled kernel: no torch round trip (this is called once per Wolfe
        # iteration of the optimal verifier's fit, on short rows where the overhead dominates)
        q_np = np.ascontiguousarray(draft_probs_ordered, dtype=np.float64)
        tail_np = tail_masses(q_np)
        return np.stack(
            [
                _wor_qall_window_numba(q_np[b], tail_np[b], n, 0, q_np.shape[1], None)[0]
                for b in range(q_np.shape[0])
            ]
        )
    q = torch.as_tensor(np.asarray(draft_probs_ordered) if as_numpy else draft_probs_ordered)
    q = q.to(dtype=torch.float64, device=device)
    tail = tail_masses_torch(q)
    out = torch.stack(
        [wor_qall_window(q[b], tail[b], n, 0, q.shape[1], kernel=kernel)[0] for b in range(q.shape[0])]
    )
    return out.cpu().numpy() if as_numpy else out


def tail_masses_torch(q: torch.Tensor) -> torch.Tensor:
    """lambda_k = q(V \\ H_k), k = 0..V, summed from the small end.  [B, V] -> [B, V + 1]"""
    if q.device.type == "cpu":  # torch.flip is slow on CPU; numpy reverses by a view
        return torch.from_numpy(tail_masses(q.numpy()))
    tail = torch.flip(torch.cumsum(torch.flip(q, (1,)), 1), (1,))
    return torch.cat([tail, q.new_zeros(q.shape[0], 1)], dim=1)
