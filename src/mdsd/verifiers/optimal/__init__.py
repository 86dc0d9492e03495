"""A verifier that attains alpha* for i.i.d., without-replacement and conditional-Poisson drafts.

Modules (docs/optimal.md explains the construction and its proofs):

``common``           the priority order (tokens with q > 0 by p/q decreasing) and the coverage
                     curve Phi_k = P(set(x) meets its first k tokens), read from the bound's
                     prefix scan (``mdsd.bound.prefix_scan``); the fit fields every method has;
                     the capping of a rule's mass vector m by p (exact whatever m is).
``threshold``        random-threshold priority groups: i.i.d. drafts at any vocabulary size, two
                     without-replacement drafts (a pair split) and three to twelve (the order
                     split; sixteen on supports above 128 tokens); method ``threshold``.
``priority_orders``  random priority orders as mixtures of greedy vertices of the coverage
                     function, fitted by Wolfe's minimum-norm-point algorithm.
``orders``           the rule built on them for without_replacement n >= 13 (on up to 128
                     tokens; n >= 17 beyond) and conditional_poisson; method ``orders``.
``verifier``         dispatch, the fallback beyond ``MAX_ORDER_SUPPORT``, certification of the
                     reported acceptance, :func:`fit_optimal`, :func:`output_law_from_fit` and
                     :class:`OptimalVerifier` (whose ``sample`` is the decoding path).

Shapes: target_probs p and draft_probs q are float64 [B, V]; drafts int64 [B, n] in draw order.
"""

from mdsd.verifiers.optimal.common import OptimalFit
from mdsd.verifiers.optimal.orders import OrdersFit
from mdsd.verifiers.optimal.threshold import ThresholdFit
from mdsd.verifiers.optimal.verifier import (
    CERTIFY_GAP,
    FALLBACK,
    LAWS,
    MAX_ORDER_SUPPORT,
    FallbackFit,
    OptimalVerifier,
    fit_optimal,
    output_law_from_fit,
    verify_from_fit,
)

__all__ = [
    "CERTIFY_GAP",
    "FALLBACK",
    "LAWS",
    "MAX_ORDER_SUPPORT",
    "FallbackFit",
    "OptimalFit",
    "OptimalVerifier",
    "OrdersFit",
    "ThresholdFit",
    "fit_optimal",
    "output_law_from_fit",
    "verify_from_fit",
]
