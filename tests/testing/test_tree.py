"""mdsd.testing tree-level audits (audit_tree_verifier): a correct tree rule passes, the sibling
rule is caught, malformed blocks are reported.

Every audit here has a family-wise false-positive rate <= 1e-4 (Bonferroni over its cases), so a
"passes" assertion fails spuriously with probability <= 1e-4 for a given seed -- and the seeds
are fixed, so the outcome is stable.
"""

from __future__ import annotations

import mdsd
from mdsd.testing import audit_tree_verifier, faulty, node_by_node


def correct_tree_verifier(tree, rng):
    """Node by node with mdsd.output_law: descend while the emitted token is a child's."""
    node, emitted = -1, []
    while True:
        kids = tree.children(node)
        p, q = tree.target_probs[tree.row(node)], tree.draft_probs[tree.row(node)]
        if kids.size == 0:
            law = p
        else:
            law = mdsd.output_law(p, q, tree.tokens[kids], verifier="rrs_without_replacement")
        token = int(rng.choice(p.size, p=law))
        emitted.append(token)
        hits = kids[tree.tokens[kids] == token]
        if hits.size == 0:
            return emitted
        node = int(hits[0])


def test_tree_audit_passes_correct_and_catches_sibling_rule():
    good = audit_tree_verifier(correct_tree_verifier, law="without_replacement", vocab_sizes=(3,), trials=400)
    assert good.passed, good.summary()
    bad = audit_tree_verifier(node_by_node(faulty.sibling_same_residual), law="iid", vocab_sizes=(3, 4))
    assert not bad.passed and bad.worst.kind == "tree"
    assert bad.worst.labels[0] == "0-0-0"  # sequences of length depth + 1


def test_tree_audit_reports_bad_blocks():
    result = audit_tree_verifier(lambda tree, rng: [0, 0, 0, 0], law="iid", vocab_sizes=(3,), trials=10)
    assert result.status == "error" and "4 tokens" in result.error
