"""mdsd.testing tree-level audits (audit_tree_verifier): a correct tree rule passes, the sibling
rule is caught, malformed blocks are reported.

Every audit here has a family-wise false-positive rate <= 1e-4 (Bonferroni over its cases), so a
"passes" assertion fails spuriously with probability <= 1e-4 for a given seed -- and the seeds
are fixed, so the outcome is stable.
"""

from __future__ import annotations

import numpy as np
import pytest

import mdsd
from mdsd.sequence import DraftedTree, tree_verify
from mdsd.testing import audit_tree_verifier, faulty, node_by_node


def correct_tree_verifier(tree, rng):
    """Node by node with mdsd.output_law on the DraftedTree's rows: descend while the emitted
    token is a child's."""
    row, emitted = 0, []
    while True:
        p, q = tree.target_probs[row], tree.draft_probs[row]
        drafts = tree.child_tokens(row)
        if drafts.size == 0:
            law = p
        else:
            law = mdsd.output_law(p, q, drafts, verifier="rrs_without_replacement")
        token = int(rng.choice(p.size, p=law))
        emitted.append(token)
        hits = np.flatnonzero(drafts == token)
        if hits.size == 0:
            return emitted
        row = tree.children[row][int(hits[0])] + 1


def test_tree_audit_hands_fn_a_drafted_tree():
    seen = []

    def spy(tree, rng):
        seen.append(tree)
        return [int(rng.integers(tree.vocab))]

    audit_tree_verifier(spy, law="iid", widths=(2, 1), vocab_sizes=(3,), trials=3, exhaustive=True)
    tree = seen[0]
    assert isinstance(tree, DraftedTree) and tree.laws == ("iid",) * 5
    assert tree.parents.tolist() == [-1, -1, 0, 1] and tree.children[0] == (0, 1)
    assert tree.target_probs.shape == (5, 3) and not tree.target_probs.flags.writeable


def test_tree_audit_passes_correct_and_catches_sibling_rule():
    good = audit_tree_verifier(correct_tree_verifier, law="without_replacement", vocab_sizes=(3,), trials=400)
    assert good.passed, good.summary()
    bad = audit_tree_verifier(node_by_node(faulty.sibling_same_residual), law="iid", vocab_sizes=(3, 4))
    assert not bad.passed and bad.worst.kind == "tree"
    assert bad.worst.labels[0] == "0-0-0"  # sequences of length depth + 1


def test_tree_audit_reports_bad_blocks():
    result = audit_tree_verifier(lambda tree, rng: [0, 0, 0, 0], law="iid", vocab_sizes=(3,), trials=10)
    assert result.status == "error" and "4 tokens" in result.error


@pytest.mark.parametrize(
    "method,law,widths",
    [
        ("node", "iid", (2, 1)),
        ("node", "conditional_poisson", (2, 1)),
        ("traversal", "without_replacement", (2, 1)),
        ("traversal", "spechub", (2, 2)),  # spechub draws exactly two
        ("traversal", "iid", (1, 1, 1)),  # a chain: block verification
        ("hybrid", "greedy", (2, 1)),
    ],
)
def test_tree_audit_passes_mdsd_sequence_rules(method, law, widths):
    """mdsd.tree_verify's rules (returning a TreeResult) pass the tree audit."""

    def rule(tree, rng):
        return tree_verify(tree, method, rng=rng)

    result = audit_tree_verifier(rule, law=law, widths=widths, vocab_sizes=(3,), trials=300, seed=2)
    assert result.passed, result.summary()
    assert any(row.status == "ok" for row in result.rows)
