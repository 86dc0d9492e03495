"""Acceptance rates of verifiers: alpha = P(emitted token in set(x)).

Three methods, chosen in this order by ``method="auto"``:

``closed_form``  where the verifier has one for the law (rrs, kseq, greedy, spechub, sample_check
                 except under without_replacement, rrs_without_replacement for n <= 2 in
                 O(V log V), and any verifier that provides one).
``enumeration``  exact sums over draft sequences. rrs_without_replacement (n >= 3) shares the work
                 of common draw prefixes (a DP over the draw tree on the support of q: top-k = 64,
                 n = 4 is ~250k prefixes; refused beyond ``MAX_TREE_ROWS`` per depth). Other
                 verifiers sum over every draft tuple x of Pdraft(x) sum_{y in set(x)} pi(y | x),
                 when the law has at most ``max_tuples`` tuples (k^n for i.i.d. drafts from a
                 top-k q: 64^4 = 1.7e7 is past the default limit; Monte Carlo is used there).
``monte_carlo``  Rao-Blackwellised estimate (docs/theory.md §6): average sum_{y in set(x)} pi(y | x)
                 over sampled x (no sampling of y), with its standard error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdsd._validate import as_probs, check_choice, check_pair
from mdsd.verifiers import accepted_mass, resolve

METHODS = ("auto", "closed_form", "enumeration", "monte_carlo")
MAX_TUPLES = 50_000  # enumeration limit for method="auto"
SAMPLES = 4096  # Monte-Carlo draft sets for method="auto"
CHUNK_ELEMENTS = 4_000_000  # rows x vocabulary evaluated at once


@dataclass(frozen=True)
class AcceptanceRate:
    """Acceptance rate with its provenance.

    rate:   float, or array for batched input.
    stderr: standard error (0 for exact methods).
    method: closed_form, enumeration or monte_carlo.
    """

    rate: float | np.ndarray
    stderr: float | np.ndarray
    method: str
    verifier: str
    law: str
    n: int
    num_samples: int = 0


def acceptance_rate(
    target_probs,
    draft_probs,
    n: int,
    verifier="rrs",
    law=None,
    *,
    method="auto",
    rng=None,
    num_samples: int = SAMPLES,
    max_tuples: int = MAX_TUPLES,
    normalize=False,
) -> AcceptanceRate:
    """Acceptance rate P(y in set(x)) of ``verifier`` with n drafts from ``law``.

    Args:
        target_probs, draft_probs: p and q, [V] or [B, V] (batched: one rate per row).
        n: number of drafts.
        verifier, law: as in :func:`mdsd.output_law` (law defaults to the verifier's own).
        method: ``auto`` (closed form, else enumeration if at most ``max_tuples`` tuples, else
            Monte Carlo), or force one of ``closed_form``, ``enumeration``, ``monte_carlo``.
        rng: Generator or seed for Monte Carlo (None: seed 0, so results are reproducible).
        num_samples: Monte-Carlo draft sets per row.

    >>> acceptance_rate([0.5, 0.5], [1.0, 0.0], 1).rate
    0.5
    """
    check_choice(method, METHODS, "method")
    p = as_probs(target_probs, "target_probs", normalize=normalize)
    q = as_probs(draft_probs, "draft_probs", normalize=normalize)
    check_pair(p, q)
    the_verifier, the_law = resolve(verifier, law)
    n = the_law.check(q, n)
    single = p.ndim == 1
    p2, q2 = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])

    def finish(rate, stderr, used, samples=0):
        shape = p.shape[:-1]
        rate = np.clip(np.asarray(rate, dtype=np.float64), 0.0, 1.0).reshape(shape)
        stderr = np.asarray(stderr, dtype=np.float64).reshape(shape)
        if single:
            rate, stderr = float(rate), float(stderr)
        return AcceptanceRate(rate, stderr, used, the_verifier.name, the_law.name, n, samples)

    if method in ("auto", "closed_form"):
        rate = the_verifier.acceptance(p2, q2, n, the_law)
        if rate is not None:
            return finish(rate, np.zeros(len(p2)), the_verifier.acceptance_method(n))
        if method == "closed_form":
            raise ValueError(
                f"method='closed_form': verifier {the_verifier.name!r} has no closed form for law "
                f"{the_law.name!r}; use 'enumeration' or 'monte_carlo'"
            )
    if method == "enumeration" or (
        method == "auto" and max(the_law.num_tuples(row, n) for row in q2) <= max_tuples
    ):
        rates = [_enumerate_row(pr, qr, n, the_verifier, the_law) for pr, qr in zip(p2, q2)]
        return finish(rates, np.zeros(len(p2)), "enumeration")
    rng = np.random.default_rng(0 if rng is None else rng)
    rates, errors = zip(
        *(_monte_carlo_row(pr, qr, n, the_verifier, the_law, rng, num_samples) for pr, qr in zip(p2, q2))
    )
    return finish(rates, errors, "monte_carlo", num_samples)


def _chunks(count: int, vocab: int):
    size = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def _enumerate_row(p, q, n, verifier, law) -> float:
    tuples, probs = law.enumerate(q, n)
    total = 0.0
    for part in _chunks(len(tuples), p.size):
        x = tuples[part]
        rows = len(x)
        pb, qb = np.broadcast_to(p, (rows, p.size)), np.broadcast_to(q, (rows, q.size))
        total += float(probs[part] @ accepted_mass(verifier.output_law(pb, qb, x, law), x))
    return total


def _monte_carlo_row(p, q, n, verifier, law, rng, num_samples) -> tuple[float, float]:
    values = np.empty(num_samples)
    for part in _chunks(num_samples, p.size):
        rows = part.stop - part.start
        pb, qb = np.broadcast_to(p, (rows, p.size)), np.broadcast_to(q, (rows, q.size))
        x = law.sample(qb, n, rng)
        values[part] = accepted_mass(verifier.output_law(pb, qb, x, law), x)
    stderr = values.std(ddof=1) / np.sqrt(num_samples) if num_samples > 1 else np.inf
    return float(values.mean()), float(stderr)
