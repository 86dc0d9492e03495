"""Verifiers by name, and the two front doors ``output_law`` and ``verify``.

``output_law(p, q, drafts, verifier=..., law=...)`` returns pi(. | x), the law of the emitted token
given the drafts; ``verify`` draws the token from it. Both take one position ([V], [V], [n]) or a
batch ([B, V], [B, V], [B, n]).
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

from mdsd._validate import as_drafts, as_probs, check_choice, check_pair
from mdsd.laws import DraftLaw, get_law
from mdsd.verifiers.base import Verifier, accepted_mass, check_drafts_for_law
from mdsd.verifiers.classic import (
    KSEQ,
    RRS,
    GreedyVerifier,
    Importance,
    RRSWithoutReplacement,
    SampleCheck,
    SpecHubVerifier,
)
from mdsd.verifiers.optimal import OptimalVerifier

VERIFIERS: dict[str, Verifier] = {}


def register(verifier: Verifier) -> Verifier:
    """Add a verifier to the registry under ``verifier.name``."""
    VERIFIERS[verifier.name] = verifier
    return verifier


for _v in (
    RRS(),
    RRSWithoutReplacement(),
    KSEQ(),
    SpecHubVerifier(),
    GreedyVerifier(),
    Importance(),
    SampleCheck(),
):
    register(_v)
register(OptimalVerifier())


def get_verifier(verifier) -> Verifier:
    if isinstance(verifier, Verifier):
        return verifier
    return VERIFIERS[check_choice(verifier, VERIFIERS, "verifier")]


def resolve(verifier, law) -> tuple[Verifier, DraftLaw]:
    """The verifier and its law (default: the verifier's natural law); refuses inexact pairs."""
    the_verifier = get_verifier(verifier)
    the_law = get_law(the_verifier.default_law if law is None else law)
    if the_law.name not in the_verifier.laws:
        raise ValueError(
            f"verifier {the_verifier.name!r} is exact only for law(s) {list(the_verifier.laws)}, "
            f"got law {the_law.name!r}"
        )
    return the_verifier, the_law


# The verifier used when only a draft law is named (the engine's ``TreeConfig.make(law=...)`` and
# the node verifier of its sequence rules; the per-node rule of ``mdsd.sequence`` node / hybrid
# verification when ``verifier=None``). Each entry is the law's own closed-form rule: O(n V) per
# node, no fitted optimisation. conditional_poisson has no rule of its own; ``optimal`` attains
# alpha* for it but fits priority orders at every node (up to seconds per node on a full
# vocabulary, docs/optimal.md), so it is opt-in by name (as it is for iid and without_replacement)
# and the default is ``sample_check``, the exact rule ``optimal`` itself falls back to.
NATURAL_VERIFIERS = MappingProxyType(
    {
        "iid": "rrs",
        "without_replacement": "rrs_without_replacement",
        "greedy": "greedy",
        "spechub": "spechub",
        "conditional_poisson": "sample_check",
    }
)


def natural_verifier(law) -> str:
    """The name of the verifier used when only ``law`` is named (``NATURAL_VERIFIERS``).

    Raises ValueError naming ``law`` for an unknown law.

    >>> natural_verifier("iid")
    'rrs'
    """
    return NATURAL_VERIFIERS[get_law(law).name]


def _prepare(target_probs, draft_probs, drafts, verifier, law, normalize):
    p = as_probs(target_probs, "target_probs", normalize=normalize)
    q = as_probs(draft_probs, "draft_probs", normalize=normalize)
    check_pair(p, q)
    if p.ndim > 2:
        raise ValueError(f"target_probs must be [V] or [B, V], got shape {p.shape}")
    x = as_drafts(drafts, p.shape[-1])
    single = p.ndim == 1
    if single and x.ndim != 1:
        raise ValueError(f"drafts must be [n] for 1-D target_probs, got shape {x.shape}")
    if not single and (x.ndim != 2 or x.shape[0] != p.shape[0]):
        raise ValueError(f"drafts must be [B, n] = [{p.shape[0]}, n], got shape {x.shape}")
    p2, q2, x2 = np.atleast_2d(p), np.atleast_2d(q), np.atleast_2d(x)
    the_verifier, the_law = resolve(verifier, law)
    the_law.check(q2, x2.shape[1])
    check_drafts_for_law(q2, x2, the_law)
    return p2, q2, x2, the_verifier, the_law, single


def output_law(target_probs, draft_probs, drafts, verifier="rrs", law=None, *, normalize=False):
    """Conditional law pi(. | x) of the token a verifier emits, given the drafts x.

    Args:
        target_probs: p, [V] or [B, V].
        draft_probs: q, same shape: the law the drafts were drawn from.
        drafts: [n] or [B, n] token ids in draw order.
        verifier: a name from ``VERIFIERS`` (rrs, rrs_without_replacement, kseq, spechub, greedy,
            importance, sample_check, ...).
        law: the draft law; defaults to the verifier's natural law. Must be one the verifier is
            exact for: sum_x Pdraft(x) pi(. | x) = p.

    Returns float64 [V] or [B, V]. The acceptance given x is the mass on set(x).

    >>> output_law([0.5, 0.5], [0.5, 0.5], [1], verifier="rrs").tolist()
    [0.0, 1.0]
    """
    p, q, x, the_verifier, the_law, single = _prepare(
        target_probs, draft_probs, drafts, verifier, law, normalize
    )
    out = the_verifier.output_law(p, q, x, the_law)
    return out[0] if single else out


def _trusted(target_probs, draft_probs, drafts, verifier, law):
    """``_prepare`` without the checks: float64 / int64 views, the batch axis added."""
    p = np.asarray(target_probs, dtype=np.float64)
    q = np.asarray(draft_probs, dtype=np.float64)
    x = np.asarray(drafts, dtype=np.int64)
    single = p.ndim == 1
    if single:
        p, q, x = p[None], q[None], x[None]
    the_verifier, the_law = resolve(verifier, law)
    return p, q, x, the_verifier, the_law, single


def verify(
    target_probs,
    draft_probs,
    drafts,
    verifier="rrs",
    law=None,
    *,
    rng=None,
    normalize=False,
    check=True,
):
    """Run a verifier: draw y ~ pi(. | x). Returns (token, accepted), accepted = y in set(x).

    Batched input gives arrays ``tokens [B]`` and ``accepted [B]``. ``rng`` is a
    ``numpy.random.Generator`` or an int seed (None: fresh entropy).

    The classic verifiers sample by early exit (``Verifier.sample``): the drafts are tested in
    order from their ratios and the vocabulary is read only after a rejection, never building
    pi(. | x); the draws follow ``output_law`` exactly. ``check=False`` skips the input checks
    (probability rows, shapes, draft ids, drafts the law can produce), which themselves cost
    several passes over the vocabulary: for trusted callers such as a decoding engine, with float64
    rows that sum to 1 and valid drafts; the draws are the same as with ``check=True`` (whose
    renormalisation moves p and q by rounding only). ``normalize`` applies only with ``check``.

    >>> verify([0.0, 1.0], [0.5, 0.5], [1], rng=0)
    (1, True)
    """
    prepare = _prepare if check else _trusted
    args = (normalize,) if check else ()
    p, q, x, the_verifier, the_law, single = prepare(target_probs, draft_probs, drafts, verifier, law, *args)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    tokens = the_verifier.sample(p, q, x, the_law, rng)
    accepted = (x == tokens[:, None]).any(axis=1)
    if single:
        return int(tokens[0]), bool(accepted[0])
    return tokens, accepted


__all__ = [
    "NATURAL_VERIFIERS",
    "VERIFIERS",
    "Verifier",
    "accepted_mass",
    "get_verifier",
    "natural_verifier",
    "output_law",
    "register",
    "resolve",
    "verify",
]
