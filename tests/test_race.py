"""Fast paths equal their plain references (issue 4): race quadrature, scan, K-SEQ, acceptance,
top tokens, and the torch backend equals the numpy one."""

import math
import zlib

import numpy as np
import pytest
import torch

import mdsd
import mdsd._race as race
from mdsd._race import tail_masses, wor_qall_prefixes, wor_qall_prefixes_reference, wor_qall_window
from mdsd.acceptance import _enumerate_row
from mdsd.bound import scan_order
from mdsd.bound import scan_reference as bound_scan_reference
from mdsd.laws import top_tokens, top_tokens_reference
from mdsd.verifiers import VERIFIERS
from mdsd.verifiers import torch_backend as tb
from mdsd.verifiers.classic import (
    RRSWithoutReplacement,
    at_least_one,
    kseq_rho,
    kseq_rho_reference,
    rrs_wor_acceptance_tree,
    rrs_wor_acceptance_two,
)

from conftest import random_pair

FINE_STEP = 0.15  # reference quadrature step: exact to ~1e-15 on these cases
QALL_TOLERANCE = 1e-10  # the fast quadrature targets ~1e-11 (mdsd._race.FAST_TOLERANCE)
ALPHA_TOLERANCE = 1e-9  # issue 4: exact to 1e-9 absolute
CUDA = torch.cuda.is_available()
KERNELS = ["numba", "torch"]  # the two CPU kernels of the fast race quadrature


def llm_like_pair(rng, vocab, zipf=1.1, noise=0.7):
    """Zipf-shaped logits shared by p and q plus independent Gaussian noise (LLM-like tails)."""
    base = -zipf * np.log(np.arange(1, vocab + 1))[rng.permutation(vocab)]
    zp, zq = base + rng.normal(0, noise, vocab), base + rng.normal(0, noise, vocab)
    p, q = np.exp(zp - zp.max()), np.exp(zq - zq.max())
    return p / p.sum(), q / q.sum()


def awkward_draft(rng, vocab, kind):
    """q with ties, zeros, tiny masses, or one token holding all but ~1e-9."""
    q = rng.dirichlet(np.full(vocab, 0.5))
    if kind == "ties":
        q = np.round(q * 8) + 1.0
    elif kind == "zeros":
        q[rng.choice(vocab, vocab // 3, replace=False)] = 0.0
    elif kind == "tiny":
        q[rng.choice(vocab, vocab // 3, replace=False)] = 1e-30
    elif kind == "one_big":
        q *= 1e-9 / q.sum()
        q[rng.integers(vocab)] = 1.0 - 1e-9
    return q / q.sum()


# -- race quadrature -------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["plain", "ties", "zeros", "tiny", "one_big"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8, 11, 16])
def test_fast_qall_equals_reference(kind, n, kernel):
    rng = np.random.default_rng(100 * n + len(kind))
    for vocab in (n + 1, 7, 60, 400):
        q = awkward_draft(rng, vocab, kind)
        if np.count_nonzero(q) < n:
            continue
        fast = wor_qall_prefixes(q[None, :], n, kernel=kernel)
        slow = wor_qall_prefixes_reference(q[None, :], n, step=FINE_STEP)
        np.testing.assert_allclose(fast, slow, rtol=0, atol=QALL_TOLERANCE)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fast_qall_llm_like_large_vocabulary(kernel):
    rng = np.random.default_rng(7)
    _, q = llm_like_pair(rng, 3000)
    order = rng.permutation(3000)
    fast = wor_qall_prefixes(q[None, order], 8, kernel=kernel)
    slow = wor_qall_prefixes_reference(q[None, order], 8, step=FINE_STEP)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=QALL_TOLERANCE)


@pytest.mark.parametrize("n", [2, 5, 8, 13])
def test_race_kernels_agree_on_windows(n):
    """numba and torch kernels on random windows k_lo..k_hi (incl. k_lo = 0, k_hi = V, one prefix):
    the same nodes and step, so values agree far below the quadrature error, and so do the error
    estimates; both equal the reference on the window."""
    rng = np.random.default_rng(40 + n)
    for i in range(8):
        vocab = int(rng.choice([n + 2, 50, 700]))
        if i % 2:
            _, q = llm_like_pair(rng, vocab, noise=float(rng.choice([0.3, 2.0])))
        else:
            q = awkward_draft(rng, vocab, ["plain", "zeros", "tiny", "one_big"][i // 2])
        if np.count_nonzero(q) < n:
            continue
        q = q[rng.permutation(vocab)]
        tail = tail_masses(q[None, :])[0]
        windows = [(0, vocab), (0, 0), (vocab, vocab), (vocab // 2, vocab // 2)]
        windows += [tuple(sorted(rng.integers(0, vocab + 1, size=2))) for _ in range(3)]
        slow = wor_qall_prefixes_reference(q[None, :], n, step=FINE_STEP)[0]
        for k_lo, k_hi in windows:
            k_lo, k_hi = int(k_lo), int(k_hi)
            compiled, error_numba = wor_qall_window(q, tail, n, k_lo, k_hi, kernel="numba")
            plain, error_torch = wor_qall_window(
                torch.from_numpy(q), torch.from_numpy(tail), n, k_lo, k_hi, kernel="torch"
            )
            assert compiled.shape == (k_hi - k_lo + 1,)
            np.testing.assert_allclose(compiled, plain.numpy(), rtol=0, atol=1e-13)
            np.testing.assert_allclose(compiled, slow[k_lo : k_hi + 1], rtol=0, atol=QALL_TOLERANCE)
            # an estimate (a difference of two sums): the kernels drop different negligible terms
            assert error_numba == pytest.approx(error_torch, rel=1e-3, abs=1e-14)


def test_racenumba_kernel_tiny_masses_and_saturation():
    """Many surely-arrived tokens (q t clamped) then tiny ones: nodes saturate and are dropped,
    lower levels of the state underflow (flushed to 0), tiny q = 1e-30 still count."""
    for n in (2, 8, 16):
        q = np.concatenate([np.full(20, 0.04), np.full(200, 1e-30), np.full(100, 2e-3)])
        q /= q.sum()
        for kernel in KERNELS:
            fast = wor_qall_prefixes(q[None, :], n, kernel=kernel)
            slow = wor_qall_prefixes_reference(q[None, :], n, step=FINE_STEP)
            np.testing.assert_allclose(fast, slow, rtol=0, atol=QALL_TOLERANCE)


def test_fast_qall_torch_input_and_float32_promotion():
    rng = np.random.default_rng(3)
    q = rng.dirichlet(np.full(50, 0.4))
    from_numpy = wor_qall_prefixes(q[None, :], 4)
    from_torch = wor_qall_prefixes(torch.tensor(q[None, :]), 4)
    assert isinstance(from_torch, torch.Tensor) and isinstance(from_numpy, np.ndarray)
    np.testing.assert_allclose(from_torch.numpy(), from_numpy, rtol=0, atol=1e-15)
    q32 = q.astype(np.float32)
    reference = wor_qall_prefixes_reference(
        q32[None, :].astype(np.float64) / q32.astype(np.float64).sum(), 4, step=FINE_STEP
    )
    for kernel in KERNELS:
        promoted = wor_qall_prefixes(
            q32[None, :].astype(np.float64) / q32.astype(np.float64).sum(), 4, kernel=kernel
        )
        np.testing.assert_allclose(promoted, reference, rtol=0, atol=QALL_TOLERANCE)


def test_race_kernel_choice():
    q = np.array([0.5, 0.3, 0.2])
    tail = tail_masses(q[None, :])[0]
    with pytest.raises(ValueError, match="kernel"):
        wor_qall_window(q, tail, 2, 0, 3, kernel="cython")
    assert race.CPU_KERNEL == "numba" and race.numba_kernel() is not None  # numba is a dependency
    # Qall of the first two tokens for sequential draws: 0.5 * 0.3/0.5 + 0.3 * 0.5/0.7
    for kernel in KERNELS:
        assert wor_qall_window(q, tail, 2, 2, 2, kernel=kernel)[0][0] == pytest.approx(
            0.3 + 0.15 / 0.7, abs=1e-12
        )


# -- the scan ------------------------------------------------------------------------------


def scan_reference(p, q, n, law):
    """alpha* by the plain scan: stable sort, every prefix, reference Qall."""
    return bound_scan_reference(p, q, n, law, step=FINE_STEP)


@pytest.mark.parametrize(
    "law,kernel", [("iid", None), ("without_replacement", "numba"), ("without_replacement", "torch")]
)
def test_fast_alpha_equals_plain_scan(law, kernel, monkeypatch):
    if kernel:
        monkeypatch.setattr(race, "CPU_KERNEL", kernel)
    rng = np.random.default_rng(11 if law == "iid" else 12)
    for i in range(24):
        vocab = int(rng.choice([3, 9, 40, 300]))
        n = int(rng.integers(1, 9))
        if i % 3 == 0:
            p, q = llm_like_pair(rng, vocab, noise=float(rng.choice([0.3, 1.0, 2.0])))
        else:
            p, q = random_pair(
                rng, vocab, concentration=float(rng.choice([0.2, 1.0])), zero_p=i % 4 == 0, zero_q=i % 5 == 0
            )
        if i % 6 == 1:
            q = awkward_draft(rng, vocab, "tiny")
        if law == "without_replacement" and np.count_nonzero(q) < n:
            continue
        result = mdsd.optimal_bound(p, q, n, law)
        assert result.alpha == pytest.approx(scan_reference(p, q, n, law), abs=ALPHA_TOLERANCE)
        # H* attains alpha*: f(H*) from the reference Qall of the set's own order
        k = int(result.optimal_set.sum())
        order = np.concatenate([np.flatnonzero(result.optimal_set), np.flatnonzero(~result.optimal_set)])
        if law == "iid":
            qall = min(q[result.optimal_set].sum(), 1.0) ** n
        else:
            qall = wor_qall_prefixes_reference(q[None, order], n, step=FINE_STEP)[0, k]
        value = 1.0 + p[result.optimal_set].sum() - qall
        assert value == pytest.approx(result.alpha, abs=ALPHA_TOLERANCE)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fast_alpha_llm_like_full_vocabulary(kernel, monkeypatch):
    monkeypatch.setattr(race, "CPU_KERNEL", kernel)
    rng = np.random.default_rng(21)
    p, q = llm_like_pair(rng, 2000)
    for n in (2, 8):
        fast = mdsd.optimal_acceptance(p, q, n, "without_replacement")
        assert fast == pytest.approx(scan_reference(p, q, n, "without_replacement"), abs=ALPHA_TOLERANCE)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fast_alpha_when_pruning_fails(kernel, monkeypatch):
    """p ~ q (alpha* ~ 1): the bounds prune nothing, every prefix is integrated."""
    monkeypatch.setattr(race, "CPU_KERNEL", kernel)
    rng = np.random.default_rng(22)
    p, _ = llm_like_pair(rng, 1500)
    near = p * np.exp(rng.normal(0, 1e-3, p.size))
    for q in (p, near / near.sum()):
        for n in (3, 8):
            fast = mdsd.optimal_acceptance(p, q, n, "without_replacement")
            assert fast == pytest.approx(scan_reference(p, q, n, "without_replacement"), abs=ALPHA_TOLERANCE)


def test_candidate_window_compiled_equals_numpy():
    """The pruning bounds of without_replacement alpha*: numba's fused pass = the numpy version."""
    from mdsd.bound import _candidate_window, prefix_sums

    compiled = race.numba_kernel()
    rng = np.random.default_rng(23)
    for i in range(40):
        vocab, n = int(rng.choice([4, 30, 500, 4000])), int(rng.integers(1, 17))
        p, q = llm_like_pair(rng, vocab) if i % 2 else random_pair(rng, vocab, zero_p=i % 3 == 0)
        if i % 5 == 0:
            q = p.copy()
        if np.count_nonzero(q) < n:
            continue
        order = scan_order(p, q)
        p_prefix, q_sorted = prefix_sums(p[order]), q[order]
        top = -np.sort(-q_sorted)[:n]
        top_mass = np.concatenate([[0.0], np.cumsum(top)])[:n]
        rest_mass = np.array([q_sorted.sum() - m for m in top_mass])
        expected = _candidate_window(p_prefix, q_sorted, n, top_mass, rest_mass)
        got = compiled.candidate_window(p_prefix, q_sorted, n, top_mass, rest_mass, 1e-9)
        assert got == expected


@pytest.mark.parametrize("kernel", KERNELS)
def test_alpha_float32_inputs_match_float64(kernel, monkeypatch):
    monkeypatch.setattr(race, "CPU_KERNEL", kernel)
    rng = np.random.default_rng(5)
    p, q = llm_like_pair(rng, 500)
    p32, q32 = p.astype(np.float32), q.astype(np.float32)
    a32 = mdsd.optimal_acceptance(p32, q32, 4, "without_replacement", normalize=True)
    p64, q64 = p32.astype(np.float64), q32.astype(np.float64)
    a64 = scan_reference(p64 / p64.sum(), q64 / q64.sum(), 4, "without_replacement")
    assert a32 == pytest.approx(a64, abs=ALPHA_TOLERANCE)


@pytest.mark.parametrize("law", ["iid", "without_replacement"])
def test_bound_compiled_equals_numpy_paths(law, monkeypatch):
    """alpha* and H* with the compiled scan / pruning window = with the numpy versions."""
    import mdsd.bound as bound

    rng = np.random.default_rng(26)
    for i in range(30):
        vocab, n = int(rng.choice([3, 40, 2000])), int(rng.integers(1, 9))
        p, q = random_pair(
            rng, vocab, concentration=float(rng.choice([0.2, 1.0])), zero_p=i % 3 == 0, zero_q=i % 4 == 0
        )
        if i % 5 == 0:
            q = awkward_draft(rng, vocab, "ties")
        if i % 2 and vocab > 3:  # p = q = 0 on two tokens: f is flat there, H* is the first minimum
            p[-2:], q[-2:] = 0.0, 0.0
            p, q = p / p.sum(), q / q.sum()
        if i % 6 == 1:  # alpha* = 1: f = 0 at the empty prefix and on the p = q = 0 tokens
            q = p.copy()
        if np.count_nonzero(q) < n:
            continue
        compiled = mdsd.optimal_bound(p, q, n, law)
        with monkeypatch.context() as m:
            m.setattr(bound, "numba_kernel", lambda: None)
            plain = mdsd.optimal_bound(p, q, n, law)
        assert compiled.alpha == pytest.approx(plain.alpha, abs=1e-14)
        np.testing.assert_array_equal(compiled.optimal_set, plain.optimal_set)


def test_scan_order_equals_stable_sort():
    rng = np.random.default_rng(9)
    for kind in ("plain", "ties", "zeros", "tiny"):
        for _ in range(10):
            vocab = int(rng.integers(2, 60))
            p = awkward_draft(rng, vocab, kind)
            q = awkward_draft(rng, vocab, "zeros" if kind == "plain" else kind)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(p == 0, np.inf, q / p)
            np.testing.assert_array_equal(scan_order(p, q), np.argsort(-ratio, kind="stable"))


def test_top_tokens_equals_stable_sort():
    rng = np.random.default_rng(10)
    for _ in range(30):
        vocab = int(rng.integers(2, 80))
        q = rng.integers(0, 5, size=(3, vocab)).astype(float)  # many ties and zeros
        for k in (1, 2, min(7, vocab)):
            np.testing.assert_array_equal(top_tokens(q, k), top_tokens_reference(q, k))


@pytest.mark.parametrize("law", ["greedy", "spechub"])
def test_greedy_closed_form_large_vocabulary(law):
    rng = np.random.default_rng(13)
    p, q = llm_like_pair(rng, 5000)
    n = 2 if law == "spechub" else 5
    top = top_tokens_reference(q, n - 1)
    rest = q.copy()
    rest[top] = 0.0
    rest /= rest.sum()
    expected = p[top].sum() + np.minimum(np.delete(p, top), np.delete(rest, top)).sum()
    assert mdsd.optimal_acceptance(p, q, n, law) == pytest.approx(expected, abs=1e-12)


def test_batched_bound_equals_rows():
    rng = np.random.default_rng(14)
    pairs = [llm_like_pair(rng, 300) for _ in range(5)]
    p, q = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    batched = mdsd.optimal_acceptance(p, q, 4, "without_replacement")
    rows = [mdsd.optimal_acceptance(a, b, 4, "without_replacement") for a, b in pairs]
    np.testing.assert_allclose(batched, rows, rtol=0, atol=1e-15)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_bound_on_cuda_equals_cpu():
    rng = np.random.default_rng(15)
    p, q = llm_like_pair(rng, 32000)
    cpu = mdsd.optimal_acceptance(p, q, 8, "without_replacement")
    gpu = mdsd.optimal_acceptance(p, q, 8, "without_replacement", device="cuda")
    assert gpu == pytest.approx(cpu, abs=ALPHA_TOLERANCE)


# -- K-SEQ and acceptance ----------------------------------------------------------------


def test_kseq_rho_equals_bisection():
    rng = np.random.default_rng(16)
    for i in range(200):
        vocab, n = int(rng.integers(2, 60)), int(rng.integers(1, 9))
        p = rng.dirichlet(np.full(vocab, 0.3), size=3)
        q = rng.dirichlet(np.full(vocab, 0.3), size=3)
        if i % 3 == 0:
            p[:, 0] = 0.0
            p /= p.sum(axis=1, keepdims=True)
        if i % 5 == 0:
            q[:, -1] = 0.0
            q /= q.sum(axis=1, keepdims=True)
        rho, beta = kseq_rho(p, q, n)
        _, beta_ref = kseq_rho_reference(p, q, n)
        # the acceptance 1 - (1 - beta)^n is what matters (rho is not unique where g is flat)
        np.testing.assert_allclose(at_least_one(beta, n), at_least_one(beta_ref, n), atol=1e-12)
        # rho is on the safe side of the root: c = (1 - (1-beta)^n) / beta <= rho
        c = np.where(beta > 0, at_least_one(beta, n) / np.where(beta > 0, beta, 1.0), n)
        assert np.all(c <= rho * (1 + 1e-12))
        assert np.all((rho >= 1.0) & (rho <= n))


def kseq_g(p, q, n, rho):
    """g(rho) = 1 - (1 - beta)^n - rho beta, beta = sum min(q, p / rho) summed exactly."""
    beta = math.fsum(np.minimum(q, p / rho))
    return 1.0 - (1.0 - min(beta, 1.0)) ** n - rho * beta


def test_kseq_bracket_selection_equals_sort():
    """K-SEQ's bracket (lo, hi, A, B) by numba selection = by sorting, on ties, zeros, p = q,
    ratios capped at n, and LLM-like rows; and the acceptance and rho* from both equal."""
    from mdsd.verifiers import classic
    from mdsd.verifiers._compiled import kseq_brackets

    rng = np.random.default_rng(24)
    checked = 0
    for i in range(120):
        vocab, n = int(rng.choice([2, 5, 40, 300, 3000])), int(rng.integers(1, 9))
        if i % 4 == 3:
            pairs = [llm_like_pair(rng, vocab) for _ in range(3)]
            p, q = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
        else:
            p, q = (rng.dirichlet(np.full(vocab, 0.3), size=3) for _ in range(2))
        if i % 5 == 0:
            q[1] = p[1]  # p = q: every breakpoint is 1
        if i % 3 == 0:
            q[:, : vocab // 3] = 0.0  # breakpoints capped at n
            p[:, -1] = 0.0
        if i % 7 == 0:  # ties
            p, q = np.round(p * 6) + 1.0, np.round(q * 6) + 1.0
        p /= p.sum(axis=1, keepdims=True)
        q /= q.sum(axis=1, keepdims=True)
        lo, hi, head, tail = classic._kseq_bracket_sorted(p, q, n)
        got = kseq_brackets(p, q, n)
        # where g is 0 to rounding at a breakpoint (p = q, n = 1, ties at the root) the two
        # searches may stop on either side of it; rho*, beta (below) agree there too
        clear = np.array(
            [
                hi[b] > lo[b]
                and min(abs(kseq_g(p[b], q[b], n, lo[b])), abs(kseq_g(p[b], q[b], n, hi[b]))) > 1e-12
                for b in range(3)
            ]
        )
        np.testing.assert_array_equal(got[clear, 1], hi[clear])
        np.testing.assert_array_equal(got[clear, 0], lo[clear])
        np.testing.assert_allclose(got[clear, 2], head[clear], rtol=0, atol=1e-13)
        np.testing.assert_allclose(got[clear, 3], tail[clear], rtol=0, atol=1e-13)
        checked += int(clear.sum())
        rho, beta = kseq_rho(p, q, n)
        rho_t, beta_t = kseq_rho(torch.tensor(p), torch.tensor(q), n)  # the sorted path
        # the acceptance is what matters: at a double root (p = q) rho moves by ~sqrt(eps)
        np.testing.assert_allclose(at_least_one(beta, n), at_least_one(beta_t.numpy(), n), rtol=0, atol=1e-12)
        np.testing.assert_allclose(rho[clear], rho_t.numpy()[clear], rtol=0, atol=1e-12)
    assert checked > 250  # most brackets are compared


def test_importance_law_compiled_equals_sorted(monkeypatch):
    """p_I of max-importance selection: the numba pass after numpy's unstable argsort (tie runs
    put in token order) = the stable-sort path, with many ties, zeros in p and q, LLM-like rows."""
    from mdsd.verifiers import classic

    rng = np.random.default_rng(25)
    for i in range(60):
        vocab, n = int(rng.choice([2, 7, 50, 2000])), int(rng.integers(1, 9))
        if i % 3 == 0:  # integer masses: many equal weights p / q
            p, q = (rng.integers(0, 4, size=(4, vocab)).astype(float) + (i % 2) for _ in range(2))
            p[:, 0] += 1.0
            q[:, -1] += 1.0
        elif i % 3 == 1:
            pairs = [llm_like_pair(rng, vocab) for _ in range(4)]
            p, q = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
        else:
            p, q = (rng.dirichlet(np.full(vocab, 0.3), size=4) for _ in range(2))
            q[:, : vocab // 4] = 0.0
        p /= p.sum(axis=1, keepdims=True)
        q /= q.sum(axis=1, keepdims=True)
        compiled = classic.importance_law(p, q, n)
        with monkeypatch.context() as m:
            m.setattr(classic, "_COMPILED", None)
            plain = classic.importance_law(p, q, n)
        np.testing.assert_allclose(compiled, plain, rtol=0, atol=1e-14)
        np.testing.assert_allclose(compiled.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_rrs_without_replacement_acceptance_exact():
    rng = np.random.default_rng(17)
    law, verifier = mdsd.get_law("without_replacement"), RRSWithoutReplacement()
    for i in range(60):
        vocab, n = int(rng.integers(2, 7)), int(rng.integers(2, 5))
        p, q = random_pair(rng, vocab, zero_p=i % 3 == 0, zero_q=i % 4 == 0)
        if i % 7 == 0:
            q = p.copy()
        if np.count_nonzero(q) < n:
            continue
        exact = _enumerate_row(p, q, n, verifier, law)
        if n == 2:
            assert rrs_wor_acceptance_two(p[None], q[None])[0] == pytest.approx(exact, abs=1e-12)
            assert rrs_wor_acceptance_two(torch.tensor(p[None]), torch.tensor(q[None]))[
                0
            ].item() == pytest.approx(exact, abs=1e-12)
        assert rrs_wor_acceptance_tree(p, q, n) == pytest.approx(exact, abs=1e-12)


def test_acceptance_rate_methods_for_rrs_without_replacement():
    rng = np.random.default_rng(18)
    p, q = llm_like_pair(rng, 2000)
    two = mdsd.acceptance_rate(p, q, 2, "rrs_without_replacement")
    assert two.method == "closed_form"
    top = top_tokens_reference(q, 12)
    q_top = np.zeros_like(q)
    q_top[top] = q[top]
    q_top /= q_top.sum()
    four = mdsd.acceptance_rate(p, q_top, 4, "rrs_without_replacement")
    assert four.method == "enumeration"
    estimate = mdsd.acceptance_rate(
        p, q_top, 4, "rrs_without_replacement", method="monte_carlo", num_samples=4096, rng=1
    )
    assert abs(four.rate - estimate.rate) < 5 * estimate.stderr + 1e-12


# -- torch backend ----------------------------------------------------------------------------

PAIRS = [(v, law) for v in VERIFIERS for law in VERIFIERS[v].laws if v != "optimal"]


def devices():
    return ["cpu", "cuda"] if CUDA else ["cpu"]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("verifier,law", PAIRS)
def test_torch_output_law_equals_numpy(verifier, law, device):
    rng = np.random.default_rng(zlib.crc32(f"{verifier}-{law}".encode()))
    the_law = mdsd.get_law(law)
    for i in range(6):
        vocab = int(rng.choice([3, 8, 200]))
        n = 2 if law == "spechub" else int(rng.integers(1, 5))
        p = rng.dirichlet(np.full(vocab, 0.4), size=5)
        q = rng.dirichlet(np.full(vocab, 0.4), size=5)
        if i % 2:
            p[:, 0] = 0.0
            p /= p.sum(axis=1, keepdims=True)
        try:
            x = the_law.sample(q, n, rng)
        except ValueError:
            continue
        expected = mdsd.output_law(p, q, x, verifier, law)
        got = tb.output_law(
            torch.tensor(p, device=device),
            torch.tensor(q, device=device),
            torch.tensor(x, device=device),
            verifier,
            law,
        )
        np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("verifier,law", PAIRS)
def test_torch_batched_path_is_exact(verifier, law):
    """sum_x Pdraft(x) pi(. | x) = p by enumeration, on the torch path (rows = draft tuples)."""
    rng = np.random.default_rng(zlib.crc32(f"{law}/{verifier}".encode()))
    the_law = mdsd.get_law(law)
    for _ in range(5):
        vocab = int(rng.integers(3, 6))
        n = 2 if law == "spechub" else int(rng.integers(1, 4))
        p, q = random_pair(rng, vocab)
        try:
            tuples, probs = the_law.enumerate(q, n)
        except ValueError:
            continue
        rows = len(tuples)
        out = tb.output_law(
            torch.tensor(np.broadcast_to(p, (rows, vocab)).copy()),
            torch.tensor(np.broadcast_to(q, (rows, vocab)).copy()),
            torch.tensor(tuples),
            verifier,
            law,
        ).numpy()
        np.testing.assert_allclose(probs @ out, p, rtol=0, atol=1e-12)


def test_torch_float32_inputs_are_promoted():
    rng = np.random.default_rng(19)
    p, q = rng.dirichlet(np.ones(30), size=4), rng.dirichlet(np.ones(30), size=4)
    x = mdsd.get_law("iid").sample(q, 3, rng)
    p32, q32 = p.astype(np.float32), q.astype(np.float32)
    got = tb.output_law(torch.tensor(p32), torch.tensor(q32), torch.tensor(x), "kseq")
    assert got.dtype == torch.float64
    p64 = p32.astype(np.float64) / p32.astype(np.float64).sum(axis=1, keepdims=True)
    q64 = q32.astype(np.float64) / q32.astype(np.float64).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), mdsd.output_law(p64, q64, x, "kseq"), atol=1e-12)


def test_torch_verify_is_seeded_and_samples_the_law():
    rng = np.random.default_rng(20)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    rows = 20000
    tp = torch.tensor(np.broadcast_to(p, (rows, 6)).copy())
    tq = torch.tensor(np.broadcast_to(q, (rows, 6)).copy())
    x = torch.tensor(mdsd.get_law("iid").sample(np.broadcast_to(q, (rows, 6)), 2, rng))
    first = tb.verify(tp, tq, x, "rrs", generator=torch.Generator().manual_seed(0))
    again = tb.verify(tp, tq, x, "rrs", generator=torch.Generator().manual_seed(0))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    # i.i.d. drafts + exact verifier: the emitted tokens follow p (6-sigma band per token)
    freq = np.bincount(first[0].numpy(), minlength=6) / rows
    assert np.all(np.abs(freq - p) < 6 * np.sqrt(p * (1 - p) / rows) + 1e-12)
    # accepted == token among the drafts
    member = (x == first[0][:, None]).any(dim=1)
    assert torch.equal(member, first[1])


def test_torch_refuses_bad_input():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="sum to 1"):
        tb.output_law(torch.tensor([0.5, 0.6]), p, torch.tensor([0]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tb.output_law(p, p, torch.tensor([2]))
    with pytest.raises(ValueError, match="repeat"):
        tb.output_law(p, p, torch.tensor([0, 0]), "rrs_without_replacement")
    if "optimal" in VERIFIERS:
        with pytest.raises(ValueError, match="no torch path"):
            tb.output_law(p, p, torch.tensor([0]), "optimal")
