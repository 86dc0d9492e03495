"""mdsd: optimal multi-draft speculative decoding.

The public API, bottom (math) to top:

- draft laws: :data:`LAWS`, :func:`get_law` (``iid``, ``without_replacement``, ``greedy``,
  ``spechub``, ``conditional_poisson``);
- the bound: :func:`optimal_acceptance` (alpha*), :func:`optimal_bound` (alpha* and H*), the LP
  oracle :mod:`mdsd.lp`;
- verifiers: :data:`VERIFIERS`, :func:`output_law`, :func:`verify`, :func:`acceptance_rate`;
- logits: :func:`probs_from_logits`, :func:`process_logits`;
- sequence-level verification (chains and trees, :mod:`mdsd.sequence`): :func:`chain_emission_law`,
  :func:`chain_verify`, :func:`drafted_tree`, :func:`tree_emission_law`, :func:`tree_verify`; the
  tree-level LP optimum ``mdsd.lp.tree_optimum``.
"""

from mdsd import lp, sequence
from mdsd.acceptance import AcceptanceRate, acceptance_rate
from mdsd.bound import OptimalBound, optimal_acceptance, optimal_bound
from mdsd.laws import LAWS, DraftLaw, get_law
from mdsd.logits import probs_from_logits, process_logits
from mdsd.sequence import (
    ChainResult,
    DraftedTree,
    TreeResult,
    chain_emission_law,
    chain_verify,
    drafted_tree,
    tree_emission_law,
    tree_verify,
)
from mdsd.verifiers import VERIFIERS, Verifier, get_verifier, output_law, verify

__version__ = "0.1.0"

__all__ = [
    "LAWS",
    "VERIFIERS",
    "AcceptanceRate",
    "ChainResult",
    "DraftLaw",
    "DraftedTree",
    "OptimalBound",
    "TreeResult",
    "Verifier",
    "acceptance_rate",
    "chain_emission_law",
    "chain_verify",
    "drafted_tree",
    "get_law",
    "get_verifier",
    "lp",
    "optimal_acceptance",
    "optimal_bound",
    "output_law",
    "probs_from_logits",
    "process_logits",
    "sequence",
    "tree_emission_law",
    "tree_verify",
    "verify",
]
