"""mdsd.bound: alpha* by sort-and-scan == brute force over subsets == the HiGHS LP
(docs/theory.md §6); the fast paths (race quadrature with pruning, compiled scan and window,
greedy closed form, CUDA) equal the plain scan."""

import zlib

import numpy as np
import pytest

import mdsd
import mdsd._race as race
from mdsd._race import wor_qall_prefixes_reference
from mdsd.bound import bound_reference, scan_order
from mdsd.bound import scan_reference as bound_scan_reference
from mdsd.laws import top_tokens_reference
from mdsd.lp import lp_optimal_acceptance, solve_lp

from conftest import (
    ALL_LAWS,
    CUDA,
    FINE_STEP,
    RACE_KERNELS,
    awkward_draft,
    edge_pairs,
    law_accepts,
    llm_like_pair,
    random_pair,
)

ALPHA_TOLERANCE = 1e-9  # the fast alpha* is exact to 1e-9 absolute


def _cases(rng, count):
    for i in range(count):
        vocab = int(rng.integers(2, 7))
        n = int(rng.integers(1, 5))
        p, q = random_pair(
            rng, vocab, concentration=float(rng.choice([0.3, 1.0, 3.0])), zero_p=i % 4 == 0, zero_q=i % 5 == 0
        )
        yield p, q, n


@pytest.mark.parametrize("law", ALL_LAWS)
def test_bound_equals_lp_and_brute_force(law):
    rng = np.random.default_rng(zlib.crc32(law.encode()))
    checked = 0
    for p, q, n in _cases(rng, 120):
        if law == "spechub":
            n = 2
        if not law_accepts(law, q, n):
            continue
        result = mdsd.optimal_bound(p, q, n, law)
        lp = lp_optimal_acceptance(p, q, n, law).alpha
        brute, _ = bound_reference(p, q, n, law)
        assert result.alpha == pytest.approx(lp, abs=1e-9)
        assert result.alpha == pytest.approx(brute, abs=1e-12)
        # the returned H* attains the minimum
        tuples, probs = mdsd.get_law(law).enumerate(q, n)
        inside = result.optimal_set[tuples].all(axis=1)
        value = 1 + p[result.optimal_set].sum() - probs[inside].sum()
        assert value == pytest.approx(result.alpha, abs=1e-12)
        checked += 1
    assert checked >= 60


@pytest.mark.parametrize("name", list(edge_pairs()))
@pytest.mark.parametrize("law", ALL_LAWS)
def test_edge_cases(name, law):
    p, q = edge_pairs()[name]
    for n in range(1, 5):
        if law == "spechub" and n != 2:
            continue
        if not law_accepts(law, q, n):
            continue
        alpha = mdsd.optimal_acceptance(p, q, n, law)
        assert alpha == pytest.approx(bound_reference(p, q, n, law)[0], abs=1e-12)
        assert alpha == pytest.approx(lp_optimal_acceptance(p, q, n, law).alpha, abs=1e-9)


def test_known_values():
    p = np.array([0.6, 0.4])
    q = np.array([0.4, 0.6])
    assert mdsd.optimal_acceptance(p, q, 1) == pytest.approx(0.8)  # sum min(p, q)
    assert mdsd.optimal_acceptance(p, q, 2, "without_replacement") == pytest.approx(1.0)
    assert mdsd.optimal_acceptance(p, p, 3, "iid") == pytest.approx(1.0)
    disjoint = mdsd.optimal_acceptance([1.0, 0.0], [0.0, 1.0], 3, "iid")
    assert disjoint == pytest.approx(0.0)


def test_without_replacement_dominates_iid(rng):
    for p, q, n in _cases(rng, 50):
        if law_accepts("without_replacement", q, n):
            wor = mdsd.optimal_acceptance(p, q, n, "without_replacement")
            assert wor >= mdsd.optimal_acceptance(p, q, n, "iid") - 1e-12


def test_batched_equals_rows(rng):
    p = rng.dirichlet(np.ones(50) * 0.3, size=(3, 4))
    q = rng.dirichlet(np.ones(50) * 0.3, size=(3, 4))
    for law in ALL_LAWS:
        n = 2
        batched = mdsd.optimal_acceptance(p, q, n, law)
        assert batched.shape == (3, 4)
        rows = [[mdsd.optimal_acceptance(p[i, j], q[i, j], n, law) for j in range(4)] for i in range(3)]
        np.testing.assert_allclose(batched, rows, atol=1e-12)


def test_float32_inputs_are_promoted(rng):
    p, q = random_pair(rng, 30)
    a64 = mdsd.optimal_acceptance(p, q, 3, "without_replacement")
    a32 = mdsd.optimal_acceptance(
        p.astype(np.float32), q.astype(np.float32), 3, "without_replacement", normalize=True
    )
    assert abs(a64 - a32) < 1e-6


def test_lp_plan_is_feasible(rng):
    p, q = random_pair(rng, 4)
    res = lp_optimal_acceptance(p, q, 2, "iid")
    np.testing.assert_allclose(res.plan.sum(axis=1), res.tuple_probs, atol=1e-9)
    np.testing.assert_allclose(res.plan.sum(axis=0), p, atol=1e-9)


def test_lp_refuses_huge_problems():
    q = np.full(40, 1 / 40)
    with pytest.raises(ValueError, match="too many"):
        lp_optimal_acceptance(q, q, 6, "iid")
    with pytest.raises(ValueError, match="tuple_probs"):
        solve_lp([0.5, 0.5], [[0], [1]], [1.0])


def test_reference_refuses_large_vocabulary():
    q = np.full(20, 0.05)
    with pytest.raises(ValueError, match="V <= 14"):
        bound_reference(q, q, 2)


def scan_reference(p, q, n, law):
    """alpha* by the plain scan: stable sort, every prefix, reference Qall."""
    return bound_scan_reference(p, q, n, law, step=FINE_STEP)


@pytest.mark.parametrize(
    "law,kernel", [("iid", "numba"), ("without_replacement", "numba"), ("without_replacement", "torch")]
)
def test_fast_alpha_equals_plain_scan(law, kernel):
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
        result = mdsd.optimal_bound(p, q, n, law, kernel=kernel)
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


@pytest.mark.parametrize("kernel", RACE_KERNELS)
def test_fast_alpha_llm_like_full_vocabulary(kernel):
    rng = np.random.default_rng(21)
    p, q = llm_like_pair(rng, 2000)
    for n in (2, 8):
        fast = mdsd.optimal_acceptance(p, q, n, "without_replacement", kernel=kernel)
        assert fast == pytest.approx(scan_reference(p, q, n, "without_replacement"), abs=ALPHA_TOLERANCE)


@pytest.mark.parametrize("kernel", RACE_KERNELS)
def test_fast_alpha_when_pruning_fails(kernel):
    """p ~ q (alpha* ~ 1): the bounds prune nothing, every prefix is integrated."""
    rng = np.random.default_rng(22)
    p, _ = llm_like_pair(rng, 1500)
    near = p * np.exp(rng.normal(0, 1e-3, p.size))
    for q in (p, near / near.sum()):
        for n in (3, 8):
            fast = mdsd.optimal_acceptance(p, q, n, "without_replacement", kernel=kernel)
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


@pytest.mark.parametrize("kernel", RACE_KERNELS)
def test_alpha_float32_inputs_match_float64(kernel):
    rng = np.random.default_rng(5)
    p, q = llm_like_pair(rng, 500)
    p32, q32 = p.astype(np.float32), q.astype(np.float32)
    a32 = mdsd.optimal_acceptance(p32, q32, 4, "without_replacement", normalize=True, kernel=kernel)
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
    """Both fast paths (numpy's argsort below ``RADIX_MIN`` tokens, the radix sort from there)
    give the stable sort of q/p decreasing, with ties, zeros in p and q and tiny masses."""
    rng = np.random.default_rng(9)
    for kind in ("plain", "ties", "zeros", "tiny"):
        for trial in range(10):
            vocab = int(rng.integers(2, 60)) if trial % 3 else int(rng.integers(1024, 5000))
            p = awkward_draft(rng, vocab, kind)
            q = awkward_draft(rng, vocab, "zeros" if kind == "plain" else kind)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(p == 0, np.inf, q / p)
            np.testing.assert_array_equal(scan_order(p, q), np.argsort(-ratio, kind="stable"))


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
