"""Token-level audit: does a multi-draft verifier emit exactly the target law p?

A verifier is lossless when sum_x Pdraft(x) pi(y | x) = p(y) for every token y (docs/audit.md).
The audit draws many positions -- LM-like random pairs and edge cases (``mdsd.testing.cases``) --
and, at each, ``trials`` draft sets x from the declared law (or the user's drafter), calls
``fn(p, q, x, rng)`` once per draft set, and tests

(a) the emitted tokens against p: a pooled G-test (``mdsd.testing.stats``) and a total-variation
    effect size with its interval;
(b) the acceptance rate P(y in set(x)) against alpha* of the law (``mdsd.optimal_acceptance``):
    an exact verifier never exceeds it, so a rate significantly above alpha* proves a loss.

The per-test level is alpha / (2 x cases) (Bonferroni), so the whole audit raises a false alarm
with probability at most alpha (default 1e-4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from mdsd.bound import optimal_acceptance
from mdsd.laws import DraftLaw, get_law
from mdsd.testing._calls import FnError, as_token, as_token_array, describe_call_error
from mdsd.testing.cases import TokenCase, all_token_cases
from mdsd.testing.result import AuditResult, CaseRow, WorstCase
from mdsd.testing.stats import acceptance_test, law_test

DEFAULT_VOCAB_SIZES = (3, 5, 50, 1000)
DEFAULT_TRIALS = 4000  # emissions per case (near-deterministic cases get NEAR_ONE_WEIGHT x more)
DEFAULT_ALPHA = 1e-4  # family-wise false-positive rate of one audit
CHUNK_ELEMENTS = 2_000_000  # rows x vocabulary drawn or verified at once


@dataclass(frozen=True)
class _Outcome:
    """What one case produced: the emitted tokens [N] and the drafts [N, n]."""

    tokens: np.ndarray
    drafts: np.ndarray


def audit_verifier(
    fn: Callable,
    *,
    law: str | DraftLaw | None,
    n: int,
    vocab_sizes: Sequence[int] = DEFAULT_VOCAB_SIZES,
    trials: int | None = None,
    seed: int = 0,
    drafter: Callable | None = None,
    batched: bool = False,
    pairs: Sequence[tuple] | None = None,
    alpha: float = DEFAULT_ALPHA,
    name: str | None = None,
    exhaustive: bool = False,
) -> AuditResult:
    """Audit a token-level verifier for losslessness.

    Args:
        fn: ``fn(target_probs [V], draft_probs [V], drafts [n] int64, rng) -> int`` (the emitted
            token), or with ``batched=True`` ``fn([B, V], [B, V], [B, n], rng) -> [B]``. Inputs
            are read-only float64 / int64 numpy arrays; ``rng`` is a ``numpy.random.Generator``.
        law: the draft law the verifier claims to be exact for (a name from ``mdsd.LAWS``);
            drafts are drawn by ``get_law(law).sample`` and the acceptance rate is checked
            against its alpha*. May be None when ``drafter`` is given (no acceptance check).
        n: drafts per position.
        vocab_sizes: vocabulary sizes of the generated cases.
        trials: emissions per case (default 4000; near-deterministic cases get 8x more).
        seed: every draw derives from it; the same arguments and seed give the same result.
        drafter: ``drafter(draft_probs [B, V], n, rng) -> [B, n]`` instead of the law's sampler
            (the calling convention of ``DraftLaw.sample``).
        pairs: explicit (target_probs, draft_probs) positions instead of the generated cases.
        alpha: family-wise false-positive rate (Bonferroni over cases and the two tests).
        name: how the report names ``fn`` (default: its qualified name).
        exhaustive: run every case even after one has proved a loss (default: stop there; the
            cases run in increasing vocabulary size, so the first failure is a small one).

    Returns an :class:`AuditResult`; bad arguments raise ValueError, while anything ``fn`` does
    wrong (raising, returning a non-token) ends the audit with status "error" and a one-line
    verdict.

    >>> from mdsd.testing import audit_verifier, verifier_fn
    >>> audit_verifier(verifier_fn("rrs"), law="iid", n=2, vocab_sizes=(3,), trials=500).passed
    True
    """
    the_law, n, trials = _check_arguments(fn, law, n, trials, drafter, alpha)
    cases = _explicit_cases(pairs) if pairs is not None else all_token_cases(_sizes(vocab_sizes), seed)
    label = name or _qualified_name(fn)
    planned = sum(_skip_reason(case, the_law, n) is None for case in cases)
    threshold = alpha / max(1, 2 * planned)
    results, error = [], None
    for index, case in enumerate(cases):
        case_seed = (int(seed), index)
        try:
            row, worst = _audit_case(fn, case, the_law, n, trials * case.weight, case_seed, drafter, batched)
        except FnError as err:
            error = str(err)
            break
        results.append((row, worst))
        if not exhaustive and row.status != "skipped" and row.pvalue < threshold:
            break
    law_name = the_law.name if the_law else None
    return finish("token", label, law_name, n, seed, results, alpha, error, planned_cases=planned)


def replay(fn: Callable, worst: WorstCase | str, *, batched: bool = False, drafter=None) -> AuditResult:
    """Re-run the one case of a saved worst case (``WorstCase`` or its .npz/.json path).

    With the same ``fn`` (and drafter), the draws are identical to the original audit's.
    """
    if not isinstance(worst, WorstCase):
        worst = WorstCase.load(worst)
    if worst.kind != "token":
        raise ValueError(f"worst must be a token-level case to replay, got kind {worst.kind!r}")
    case = TokenCase(worst.name, worst.target_probs, worst.draft_probs)
    the_law = get_law(worst.law) if worst.law else None
    try:
        result = _audit_case(fn, case, the_law, int(worst.n), worst.trials, worst.case_seed, drafter, batched)
    except FnError as err:
        return finish(
            "token", _qualified_name(fn), worst.law, worst.n, worst.case_seed[0], [], DEFAULT_ALPHA, str(err)
        )
    return finish(
        "token", _qualified_name(fn), worst.law, worst.n, worst.case_seed[0], [result], DEFAULT_ALPHA, None
    )


# ---------------------------------------------------------------------------- one case
def _audit_case(fn, case: TokenCase, law, n, trials, case_seed, drafter, batched):
    """Run one case; returns (row, WorstCase or None when skipped)."""
    p, q = _read_only(case.target_probs), _read_only(case.draft_probs)
    skip = _skip_reason(case, law, n)
    if skip is not None:
        return CaseRow(case.name, case.vocab, 0, status="skipped", note=skip), None
    rng = np.random.default_rng(list(case_seed))
    where = f"on case {case.name!r} (V = {case.vocab})"
    drafts = _draw(law, drafter, q, n, trials, rng, where)
    tokens = _run(fn, p, q, drafts, rng, batched, where)
    outcome = _Outcome(tokens, drafts)
    counts = np.bincount(outcome.tokens, minlength=case.vocab)
    accepted = int((outcome.tokens[:, None] == outcome.drafts).any(axis=1).sum())
    fit = law_test(counts, p, rng)
    bound = _bound(p, q, n, law) if law is not None else None
    acc = acceptance_test(accepted, trials, bound)
    row = CaseRow(
        case.name,
        case.vocab,
        trials,
        fit.pvalue,
        fit.tv,
        fit.tv_low,
        fit.tv_high,
        fit.impossible,
        acc.rate,
        acc.stderr,
        acc.bound,
        acc.pvalue,
    )
    worst = WorstCase(
        kind="token",
        name=case.name,
        law=law.name if law is not None else None,
        n=n,
        trials=trials,
        case_seed=tuple(case_seed),
        target_probs=np.array(p),
        draft_probs=np.array(q),
        labels=tuple(str(t) for t in range(case.vocab)),
        observed=counts / trials,
        expected=np.array(p),
        law_pvalue=fit.pvalue,
        tv=fit.tv,
        acceptance=acc.rate,
        bound=acc.bound,
        acceptance_pvalue=acc.pvalue,
    )
    return row, worst


def _skip_reason(case: TokenCase, law, n: int) -> str | None:
    """Why a case cannot be drawn (None when it can): the law refuses q, or, for a drafter
    without a law, q has fewer than n tokens of positive mass."""
    if law is not None:
        try:
            law.check(case.draft_probs, n)
        except ValueError as err:
            return str(err)
        return None
    support = int(np.count_nonzero(case.draft_probs > 0))
    return f"draft_probs has {support} < n = {n} tokens of positive mass" if support < n else None


def _draw(law, drafter, q, n, trials, rng, where) -> np.ndarray:
    """[trials, n] read-only int64 drafts, in chunks of at most CHUNK_ELEMENTS."""
    out = np.empty((trials, n), dtype=np.int64)
    for part in _chunks(trials, q.size):
        qb = np.broadcast_to(q, (part.stop - part.start, q.size))
        if drafter is None:
            out[part] = law.sample(qb, n, rng)
            continue
        try:
            drawn = np.asarray(drafter(qb, n, rng))
        except Exception as err:  # noqa: BLE001 -- the drafter is user code
            raise FnError(f"drafter raised {describe_call_error(err)} {where}") from None
        if drawn.shape != qb.shape[:1] + (n,) or not np.issubdtype(drawn.dtype, np.integer):
            raise FnError(
                f"drafter returned {drawn.dtype} of shape {drawn.shape} {where}; expected int [B, {n}]"
            )
        if (drawn < 0).any() or (drawn >= q.size).any() or (q[np.clip(drawn, 0, q.size - 1)] <= 0).any():
            raise FnError(f"drafter drew a token outside the support of draft_probs {where}")
        out[part] = drawn
    out.setflags(write=False)
    return out


def _run(fn, p, q, drafts, rng, batched, where) -> np.ndarray:
    trials, vocab = drafts.shape[0], p.size
    tokens = np.empty(trials, dtype=np.int64)
    if batched:
        for part in _chunks(trials, vocab):
            rows = part.stop - part.start
            pb, qb = np.broadcast_to(p, (rows, vocab)), np.broadcast_to(q, (rows, vocab))
            try:
                value = fn(pb, qb, drafts[part], rng)
            except Exception as err:  # noqa: BLE001 -- fn is user code
                raise FnError(f"fn raised {describe_call_error(err)} {where}") from None
            tokens[part] = as_token_array(value, rows, vocab, where)
        return tokens
    i = 0
    try:
        for i in range(trials):
            tokens[i] = as_token(fn(p, q, drafts[i], rng), vocab, where)
    except FnError:
        raise
    except Exception as err:  # noqa: BLE001
        raise FnError(f"fn raised {describe_call_error(err)} {where}, drafts {drafts[i].tolist()}") from None
    return tokens


def _bound(p, q, n, law) -> float | None:
    try:
        return float(optimal_acceptance(p, q, n, law=law))
    except ValueError:
        return None


# ---------------------------------------------------------------------------- the verdict
def finish(kind, label, law, n, seed, results, alpha, error, planned_cases=None) -> AuditResult:
    """Apply the Bonferroni threshold, pick the worst case, build the AuditResult.

    results: (CaseRow, WorstCase or None) per case run, in case order; planned_cases: how many
    cases the audit planned to test (the Bonferroni count, fixed before any is run; default:
    those in ``results``). Stopping early at a loss keeps the false-positive rate <= alpha.
    """
    tested = [row for row, _ in results if row.status != "skipped"]
    planned = len(tested) if planned_cases is None else planned_cases
    threshold = alpha / max(1, 2 * planned)
    marked = [(_mark(row, threshold), worst) for row, worst in results]
    failing = [(row, worst) for row, worst in marked if row.status == "loss" and worst is not None]
    candidates = [(row, worst) for row, worst in marked if worst is not None]
    if failing:  # the simplest reproduction: smallest vocabulary, then smallest p-value
        worst = min(failing, key=lambda rw: (rw[0].vocab, rw[0].pvalue))[1]
    elif candidates:  # the closest call
        worst = min(candidates, key=lambda rw: rw[0].pvalue)[1]
    else:
        worst = None
    rows = tuple(row for row, _ in marked)
    status = "error" if error else ("loss" if failing else "passed")
    return AuditResult(
        kind,
        label,
        law,
        n,
        int(seed),
        status == "passed",
        status,
        rows,
        worst,
        alpha,
        threshold,
        error,
        planned,
    )


def _mark(row: CaseRow, threshold: float) -> CaseRow:
    if row.status == "skipped" or row.pvalue >= threshold:
        return row
    reasons = []
    if row.law_pvalue < threshold:
        reasons.append(
            "impossible token emitted" if row.impossible else "emitted law differs from the target's"
        )
    if row.acceptance_pvalue < threshold:
        reasons.append("acceptance above alpha*")
    return replace(row, status="loss", note="; ".join(reasons))


# ---------------------------------------------------------------------------- helpers
def _check_arguments(fn, law, n, trials, drafter, alpha):
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if law is None and drafter is None:
        raise ValueError("law is required unless a drafter is given")
    the_law = get_law(law) if law is not None else None
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    trials = DEFAULT_TRIALS if trials is None else trials
    if isinstance(trials, bool) or not isinstance(trials, int | np.integer) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    if drafter is not None and not callable(drafter):
        raise ValueError(f"drafter must be callable, got {type(drafter).__name__}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return the_law, int(n), int(trials)


def _sizes(vocab_sizes) -> list[int]:
    sizes = [int(v) for v in vocab_sizes]
    if not sizes or any(v < 2 for v in sizes):
        raise ValueError(f"vocab_sizes must be integers >= 2, got {list(vocab_sizes)!r}")
    return sizes


def _explicit_cases(pairs) -> list[TokenCase]:
    from mdsd._validate import as_probs, check_pair

    cases = []
    for i, pair in enumerate(pairs):
        p = as_probs(pair[0], f"pairs[{i}] target_probs")
        q = as_probs(pair[1], f"pairs[{i}] draft_probs")
        check_pair(p, q, f"pairs[{i}] target_probs", f"pairs[{i}] draft_probs")
        if p.ndim != 1:
            raise ValueError(f"pairs[{i}] must hold 1-D probability vectors, got shape {p.shape}")
        cases.append(TokenCase(f"pair_{i}", p, q))
    if not cases:
        raise ValueError("pairs is empty")
    return cases


def _read_only(values: np.ndarray) -> np.ndarray:
    out = np.array(values, dtype=np.float64)
    out.setflags(write=False)
    return out


def _chunks(count: int, vocab: int):
    size = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def _qualified_name(fn) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{module}:{name}" if module else name


def verifier_fn(verifier: str, law: str | None = None) -> Callable:
    """One of mdsd's verifiers with the audit's calling convention (``mdsd.verify``); it works
    one position at a time and batched (pass ``batched=True`` to the audit: much faster).

    >>> fn = verifier_fn("rrs")
    >>> fn([0.0, 1.0], [0.5, 0.5], [1], np.random.default_rng(0))
    1
    """
    from mdsd.verifiers import resolve, verify

    resolve(verifier, law)  # validates the pair now, naming verifier / law

    def one(target_probs, draft_probs, drafts, rng):
        return verify(target_probs, draft_probs, drafts, verifier=verifier, law=law, rng=rng)[0]

    one.__qualname__ = one.__name__ = f"verify[{verifier}]"
    one.__module__ = "mdsd"
    return one
