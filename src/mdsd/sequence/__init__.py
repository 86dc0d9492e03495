"""Sequence-level verification: chains and drafted trees (numpy only; no models, no torch).

- chains: :func:`chain_emission_law`, :func:`chain_verify` (token-by-token or block
  verification, arXiv 2403.10444);
- trees: :func:`drafted_tree` builds a :class:`DraftedTree`; :func:`tree_emission_law` and
  :func:`tree_verify` run node-by-node verification (any exact token-level verifier) or Traversal
  Verification (arXiv 2505.12398);
- enumeration over drafted trees (tests, the LP ``mdsd.lp.tree_optimum``):
  :func:`enumerate_drafted_trees`, :func:`marginal_block_law`, :func:`lossless_error`.

See docs/tree_verification.md.
"""

from mdsd.sequence.chain import (
    CHAIN_VERIFIERS,
    ChainResult,
    chain_emission_law,
    chain_expected_length,
    chain_verify,
)
from mdsd.sequence.enumerate import (
    PrefixModel,
    enumerate_drafted_trees,
    lossless_error,
    marginal_block_law,
    random_prefix_table,
)
from mdsd.sequence.tree import (
    DEFAULT_NODE_VERIFIER,
    TREE_METHODS,
    DraftedTree,
    TreeResult,
    chain_as_tree,
    drafted_tree,
    expected_block_length,
    tree_emission_law,
    tree_verify,
)

__all__ = [
    "CHAIN_VERIFIERS",
    "DEFAULT_NODE_VERIFIER",
    "TREE_METHODS",
    "ChainResult",
    "DraftedTree",
    "PrefixModel",
    "TreeResult",
    "chain_as_tree",
    "chain_emission_law",
    "chain_expected_length",
    "chain_verify",
    "drafted_tree",
    "enumerate_drafted_trees",
    "expected_block_length",
    "lossless_error",
    "marginal_block_law",
    "random_prefix_table",
    "tree_emission_law",
    "tree_verify",
]
