"""mdsd: optimal multi-draft speculative decoding.

The public API, bottom (math) to top:

- draft laws: :data:`LAWS`, :func:`get_law` (``iid``, ``without_replacement``, ``greedy``,
  ``spechub``, ``conditional_poisson``);
- the bound: :func:`optimal_acceptance` (alpha*), :func:`optimal_bound` (alpha* and H*), the LP
  oracle :mod:`mdsd.lp`;
- verifiers: :data:`VERIFIERS`, :func:`output_law`, :func:`verify`, :func:`acceptance_rate`;
- logits: :func:`probs_from_logits`, :func:`process_logits`.
"""

from mdsd import lp
from mdsd.acceptance import AcceptanceRate, acceptance_rate
from mdsd.bound import OptimalBound, optimal_acceptance, optimal_bound
from mdsd.laws import LAWS, DraftLaw, get_law
from mdsd.logits import probs_from_logits, process_logits
from mdsd.verifiers import VERIFIERS, Verifier, get_verifier, output_law, verify

__version__ = "0.1.0"

__all__ = [
    "LAWS",
    "VERIFIERS",
    "AcceptanceRate",
    "DraftLaw",
    "OptimalBound",
    "Verifier",
    "acceptance_rate",
    "get_law",
    "get_verifier",
    "lp",
    "optimal_acceptance",
    "optimal_bound",
    "output_law",
    "probs_from_logits",
    "process_logits",
    "verify",
]
