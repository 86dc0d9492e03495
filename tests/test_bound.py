"""alpha*: sort-and-scan == brute force over subsets == the HiGHS LP (docs/theory.md §6)."""

import zlib

import numpy as np
import pytest

import mdsd
from mdsd.bound import bound_reference
from mdsd.lp import lp_optimal_acceptance, solve_lp

from conftest import ALL_LAWS, edge_pairs, law_accepts, random_pair


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
