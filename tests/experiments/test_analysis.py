"""mdsd.experiments.analysis: the union-of-top-k layout is exact, clustered confidence intervals."""

from __future__ import annotations

import numpy as np
import pytest

import mdsd
from mdsd.experiments import analysis
from mdsd.experiments.analysis import clustered_mean, position_probs
from mdsd.experiments.capture import Positions, compress_logits


def test_topk_layout_is_exact(rng):
    """The union-of-top-k layout gives exactly process_logits(full logits, T, top_k)."""
    batch, vocab, k, temperature = 7, 40, 5, 0.7
    target, draft = rng.normal(size=(batch, vocab)) * 2, rng.normal(size=(batch, vocab)) * 2
    target[0, :] = draft[0, :]  # identical top-k sets in one row
    packed = {
        name: compress_logits(z.astype(np.float32), k) for name, z in (("target", target), ("draft", draft))
    }
    positions = Positions(
        "d",
        temperature,
        packed["target"]["logits"],
        packed["draft"]["logits"],
        packed["target"]["index"],
        packed["draft"]["index"],
        np.zeros(batch, int),
    )
    p, q = position_probs(positions)
    p_full = mdsd.process_logits(target.astype(np.float32), temperature, k)
    q_full = mdsd.process_logits(draft.astype(np.float32), temperature, k)
    for b in range(batch):
        # same multiset of masses, and the same alpha* and rates on the compressed rows
        assert np.sort(p[b][p[b] > 0]) == pytest.approx(np.sort(p_full[b][p_full[b] > 0]), abs=1e-15)
        assert np.sort(q[b][q[b] > 0]) == pytest.approx(np.sort(q_full[b][q_full[b] > 0]), abs=1e-15)
    for law in ("iid", "greedy", "without_replacement"):
        assert mdsd.optimal_acceptance(p, q, 3, law) == pytest.approx(
            mdsd.optimal_acceptance(p_full, q_full, 3, law), abs=1e-12
        )
    assert mdsd.acceptance_rate(p, q, 3, "kseq").rate == pytest.approx(
        mdsd.acceptance_rate(p_full, q_full, 3, "kseq").rate, abs=1e-12
    )


def test_clustered_mean():
    values = np.array([1.0, 1.0, 3.0, 3.0])
    mean, ci = clustered_mean(values, np.array([0, 0, 1, 1]))
    assert mean == 2.0
    # two clusters with sums of deviations -2 and +2: se = sqrt(2 * 8) / 4 = 1
    assert ci == pytest.approx(analysis.Z95 * 1.0)
    assert clustered_mean(np.array([0.5, 0.5]), np.array([0, 1]))[1] == 0.0
