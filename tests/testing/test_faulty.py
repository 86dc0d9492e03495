"""mdsd.testing.faulty: the faulty example rules' losses by enumeration (the numbers docs/audit.md
quotes), and the faulty samplers draw from their stated laws (G-tests, false-positive rate 1e-4
each)."""

from __future__ import annotations

import numpy as np

import mdsd
from mdsd.testing import faulty
from mdsd.testing.stats import law_test

EXACT = 1e-12


def _marginal(law_of, p, q, law, n):
    """sum_x Pdraft(x) pi(. | x) and the acceptance, by enumerating draft tuples."""
    tuples, probs = mdsd.get_law(law).enumerate(q, n)
    out, acc = np.zeros_like(p), 0.0
    for x, w in zip(tuples, probs):
        cond = law_of(p, q, x)
        out += w * cond
        acc += w * cond[np.unique(x)].sum()
    return out, acc


def test_faulty_rules_exact_losses():
    p, q = np.array([0.5, 0.0, 0.5]), np.array([0.4, 0.5, 0.1])
    out, _ = _marginal(faulty.rrs_skip_repeats_law, p, q, "iid", 2)
    np.testing.assert_allclose(out, [0.55, 0.0, 0.45], atol=EXACT)
    _, acc = _marginal(faulty.rrs_skip_repeats_law, p, q, "iid", 3)
    assert abs(acc - 0.735) < EXACT
    assert abs(mdsd.acceptance_rate(p, q, 3, verifier="rrs").rate - 0.685) < EXACT
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    top2 = faulty.top_drafts(q, 2, None)
    assert top2.tolist() == [2, 1]
    np.testing.assert_allclose(faulty.sibling_same_residual_law(p, q, top2), [0, 0.6, 0.4], atol=EXACT)
    out, _ = _marginal(faulty.sibling_same_residual_law, p, q, "iid", 2)
    np.testing.assert_allclose(out, [0.35, 0.39, 0.26], atol=EXACT)
    # hub shortcut: off by 1 - p(hub) in total variation; exact below the threshold
    p, q = np.array([0.9995, 0.0004, 0.0001]), np.array([0.6, 0.3, 0.1])
    out, _ = _marginal(faulty.spechub_hub_shortcut_law, p, q, "spechub", 2)
    assert abs(0.5 * np.abs(out - p).sum() - (1 - p[0])) < EXACT
    p = np.array([0.7, 0.2, 0.1])
    out, _ = _marginal(faulty.spechub_hub_shortcut_law, p, q, "spechub", 2)
    np.testing.assert_allclose(out, p, atol=EXACT)


def test_faulty_samplers_follow_their_laws():
    """Each faulty sampler draws from its stated conditional law (G-test, false-positive 1e-4)."""
    rng = np.random.default_rng(5)
    p, q = np.array([0.5, 0.1, 0.15, 0.25]), np.array([0.2, 0.4, 0.3, 0.1])
    drafts = np.array([1, 1, 2])
    for sampler, law_of in faulty.FAULTY.values():
        if sampler is faulty.spechub_hub_shortcut:
            x = np.array([1, 0])  # spechub: the hub argmax q = token 1 exactly once
        else:
            x = drafts
        want = law_of(p, q, x)
        counts = np.bincount([sampler(p, q, x, rng) for _ in range(3000)], minlength=4)
        assert law_test(counts, want, rng).pvalue > 1e-4, sampler.__name__
