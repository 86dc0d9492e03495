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
``monte_carlo``  Rao-Blackwellised estimate (docs/theory.md §6): average sum_{y in set(x)} pi(y | x) over
                 ``num_samples`` sampled draft sets x per row (no sampling of y), with its standard
                 error; rows are sampled together in chunks (vectorised).

With ``chunk_rows`` the method is chosen per chunk of rows, so that one row without a closed form
or with too many tuples sends only its chunk down the ladder (``mdsd measure`` uses this).
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
    chunk_rows: int | None = None,
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
        max_tuples: ``auto`` enumerates when every row (of a chunk) has at most this many tuples.
        chunk_rows: choose the method per chunk of this many rows (None: one choice for the batch);
            ``method`` is then the methods used joined by ``+`` (``monte_carlo`` alone if any
            chunk needed it, as its stderr is then nonzero).

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
    rng = np.random.default_rng(0 if rng is None else rng)
    size = len(p2) if chunk_rows is None else max(1, int(chunk_rows))
    parts = [
        _ladder(p2[s], q2[s], n, the_verifier, the_law, method, rng, num_samples, max_tuples)
        for s in (slice(i, i + size) for i in range(0, len(p2), size))
    ] or [(np.zeros(0), np.zeros(0), "closed_form")]
    methods = {used for _, _, used in parts}
    used = "monte_carlo" if "monte_carlo" in methods else "+".join(sorted(methods))
    shape = p.shape[:-1]
    rate = np.clip(np.concatenate([r for r, _, _ in parts]), 0.0, 1.0).reshape(shape)
    stderr = np.concatenate([e for _, e, _ in parts]).reshape(shape)
    if single:
        rate, stderr = float(rate), float(stderr)
    samples = num_samples if "monte_carlo" in methods else 0
    return AcceptanceRate(rate, stderr, used, the_verifier.name, the_law.name, n, samples)


def _ladder(p2, q2, n, verifier, law, method, rng, num_samples, max_tuples):
    """(rates [B], stderr [B], method) of rows [B, V] by the first method of the ladder."""
    zeros = np.zeros(len(p2))
    if method in ("auto", "closed_form"):
        rate = verifier.acceptance(p2, q2, n, law)
        if rate is not None:
            return np.asarray(rate, dtype=np.float64), zeros, verifier.acceptance_method(n)
        if method == "closed_form":
            raise ValueError(
                f"method='closed_form': verifier {verifier.name!r} has no closed form for law "
                f"{law.name!r}; use 'enumeration' or 'monte_carlo'"
            )
    if method == "enumeration" or (
        method == "auto" and max(law.num_tuples(row, n) for row in q2) <= max_tuples
    ):
        rates = [_enumerate_row(pr, qr, n, verifier, law) for pr, qr in zip(p2, q2)]
        return np.asarray(rates, dtype=np.float64), zeros, "enumeration"
    rates, stderr = _monte_carlo_rows(p2, q2, n, verifier, law, rng, num_samples)
    return rates, stderr, "monte_carlo"


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


def _monte_carlo_rows(p2, q2, n, verifier, law, rng, num_samples) -> tuple[np.ndarray, np.ndarray]:
    """Per row: mean and standard error of sum_{y in set(x)} pi(y | x) over ``num_samples``
    sampled x. Rows are repeated num_samples times and evaluated in chunks of whole rows; a row
    too wide for one chunk is evaluated alone, its samples in chunks."""
    vocab = p2.shape[1]
    if vocab * num_samples > CHUNK_ELEMENTS:
        values = np.empty((len(p2), num_samples))
        for b in range(len(p2)):
            for part in _chunks(num_samples, vocab):
                rows = part.stop - part.start
                pb, qb = np.broadcast_to(p2[b], (rows, vocab)), np.broadcast_to(q2[b], (rows, vocab))
                x = law.sample(qb, n, rng)
                values[b, part] = accepted_mass(verifier.output_law(pb, qb, x, law), x)
        return _mean_and_stderr(values)
    rates, stderr = np.empty(len(p2)), np.empty(len(p2))
    rows_per_chunk = CHUNK_ELEMENTS // (vocab * num_samples)
    for start in range(0, len(p2), rows_per_chunk):
        part = slice(start, min(start + rows_per_chunk, len(p2)))
        pb = np.repeat(p2[part], num_samples, axis=0)  # [b * S, V]
        qb = np.repeat(q2[part], num_samples, axis=0)
        x = law.sample(qb, n, rng)  # [b * S, n]
        values = accepted_mass(verifier.output_law(pb, qb, x, law), x).reshape(-1, num_samples)
        rates[part], stderr[part] = _mean_and_stderr(values)
    return rates, stderr


def _mean_and_stderr(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row means of [B, S] samples and their standard errors (inf with a single sample)."""
    samples = values.shape[1]
    if samples < 2:
        return values.mean(axis=1), np.full(values.shape[0], np.inf)
    return values.mean(axis=1), values.std(axis=1, ddof=1) / np.sqrt(samples)
