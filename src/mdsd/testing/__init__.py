"""Audits for losslessness: test anyone's speculative-decoding verifier or decoder against the
exact target law (docs/audit.md).

- :func:`audit_verifier`: a token-level multi-draft verifier ``fn(p, q, drafts, rng) -> token``;
- :func:`audit_tree_verifier`: a tree verifier ``fn(tree: DraftedTree, rng) -> emitted tokens``
  (``mdsd.sequence.DraftedTree``, the project's drafted-tree record);
- :func:`audit_decoder`: a whole decoder ``generate_fn(target, draft, input_ids, ...)`` on a tiny
  random Hugging Face Llama pair; :func:`engine_generate_fn` adapts mdsd's own TreeDecoder;
- :func:`assert_lossless`: the pytest helper;
- :mod:`mdsd.testing.faulty`: three deliberately wrong verifiers the audit catches.

Importing this package imports neither torch nor transformers (the decoder audit does, lazily).
"""

from __future__ import annotations

from mdsd.testing.decoder import audit_decoder, engine_generate_fn, naive_generate_fn, tiny_llama_pair
from mdsd.testing.result import AuditResult, CaseRow, WorstCase
from mdsd.testing.token import audit_verifier, replay, verifier_fn
from mdsd.testing.tree import audit_tree_verifier, node_by_node, tree_method_fn

KINDS = {"token": audit_verifier, "tree": audit_tree_verifier, "decoder": audit_decoder}


def assert_lossless(fn, *, kind: str = "token", **kwargs) -> AuditResult:
    """Run an audit and raise AssertionError with its summary unless it passed (pytest helper).

    ``kind`` is "token" (:func:`audit_verifier`), "tree" (:func:`audit_tree_verifier`) or
    "decoder" (:func:`audit_decoder`); the other keyword arguments go to that audit.

    >>> assert_lossless(verifier_fn("rrs"), law="iid", n=2, vocab_sizes=(3,), trials=300).passed
    True
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(KINDS)}")
    result = KINDS[kind](fn, **kwargs)
    if not result.passed:
        raise AssertionError(result.summary())
    return result


__all__ = [
    "AuditResult",
    "CaseRow",
    "WorstCase",
    "assert_lossless",
    "audit_decoder",
    "audit_tree_verifier",
    "audit_verifier",
    "engine_generate_fn",
    "naive_generate_fn",
    "node_by_node",
    "replay",
    "tiny_llama_pair",
    "tree_method_fn",
    "verifier_fn",
]
