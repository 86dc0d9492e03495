"""The optimal verifier's front door: dispatch on the law, the fallback beyond
``MAX_ORDER_SUPPORT``, certification of the reported acceptance, and the ``Verifier`` itself.

Methods: ``threshold`` (iid at any n; without_replacement with n <= 2; any law with n = 1),
``orders`` (without_replacement with n >= 3, conditional_poisson with n >= 2, on supports up to
``MAX_ORDER_SUPPORT`` tokens), else the law's exact fallback verifier (with a warning).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from mdsd._validate import as_probs, check_pair
from mdsd.laws import DraftLaw, get_law
from mdsd.sampling import categorical
from mdsd.verifiers.base import Verifier
from mdsd.verifiers.classic import RRSWithoutReplacement, SampleCheck
from mdsd.verifiers.optimal import orders, threshold
from mdsd.verifiers.optimal.common import OptimalFit, cap_rule, closed_curve, priority_scan, uses_order_split
from mdsd.verifiers.optimal.orders import (
    OrdersFit,
    fit_orders_row,
    orders_acceptance,
    orders_node_applies,
    orders_node_arguments,
    orders_output_law,
    sample_orders_row,
)
from mdsd.verifiers.optimal.threshold import (
    ThresholdFit,
    fit_threshold_row,
    sample_threshold_row,
    stack_rows,
    threshold_node_applies,
    threshold_node_arguments,
    threshold_output_law,
)

LAWS = ("iid", "without_replacement", "conditional_poisson")
# Exact verifier of each law used beyond MAX_ORDER_SUPPORT (not optimal).
FALLBACK = {"without_replacement": RRSWithoutReplacement(), "conditional_poisson": SampleCheck()}
# Acceptance-certificate tolerance: residual or rejection mass below this counts as zero.
CERTIFY_TOLERANCE = 1e-13
# A fit whose sum a is this close to its alpha* is certified too: the true rate lies in
# [sum a, alpha*], so sum a is exact to this much (full-vocabulary fits round to ~1e-12).
CERTIFY_GAP = 1e-10
# Largest support on which an ``orders`` fit that the sign pattern does not certify gets its
# exact acceptance anyway (one Qall scan per order of the mixture and residual token).
EXACT_ORDERS_SUPPORT = 256
# Largest support (tokens with q > 0) for which the ``orders`` fit runs: one Qall scan of the
# support per Wolfe iteration (tens to thousands of iterations), plus small Gram solves.
MAX_ORDER_SUPPORT = 65_536


@dataclass(frozen=True)
class FallbackFit(OptimalFit):
    """Supports above ``MAX_ORDER_SUPPORT`` (without_replacement n >= 3, conditional_poisson):
    the law's exact fallback verifier, below alpha*. The common fields other than alpha_star and
    support are NaN (acceptance unknown, never certified).

    verifier:     the fallback verifier's name (also ``method``).
    target_probs, draft_probs: float64 [B, V], kept for its output law.
    """

    verifier: str
    target_probs: np.ndarray
    draft_probs: np.ndarray

    @property
    def method(self) -> str:  # type: ignore[override]
        return self.verifier


# -- fit -----------------------------------------------------------------------------------------


def fit_optimal(target_probs, draft_probs, n: int, law="iid", *, normalize=False) -> OptimalFit:
    """Fit the optimal verifier for one position ([V]) or a batch ([B, V]) of positions.

    Args:
        target_probs: p, [V] or [B, V].
        draft_probs: q, same shape: the law the drafts are drawn from.
        n: number of drafts.
        law: ``iid``, ``without_replacement`` or ``conditional_poisson``.

    Returns a :class:`ThresholdFit`, :class:`OrdersFit` or :class:`FallbackFit` (always batched,
    [B, ...]); pass it to :func:`output_law_from_fit` for any number of draft sets.

    >>> fit = fit_optimal([0.5, 0.5], [0.5, 0.5], 2, "without_replacement")
    >>> round(float(fit.acceptance[0]), 12)
    1.0
    """
    p = as_probs(target_probs, "target_probs", normalize=normalize)
    q = as_probs(draft_probs, "draft_probs", normalize=normalize)
    check_pair(p, q)
    if p.ndim > 2:
        raise ValueError(f"target_probs must be [V] or [B, V], got shape {p.shape}")
    the_law = check_law(law)
    p2, q2 = np.atleast_2d(p), np.atleast_2d(q)
    n = the_law.check(q2, n)
    return _fit_rows(p2, q2, n, the_law)


def check_law(law) -> DraftLaw:
    """The law, if the optimal verifier is exact for it; else ValueError."""
    the_law = get_law(law)
    if the_law.name not in LAWS:
        raise ValueError(
            f"verifier 'optimal' is exact only for law(s) {list(LAWS)}, got law {the_law.name!r}"
        )
    return the_law


def method_for(law: DraftLaw, n: int, support: int) -> str:
    """``threshold``, ``orders`` or ``fallback`` for n drafts from ``law`` on a support of q."""
    if n == 1 or closed_curve(law, n) or uses_order_split(law, n, support):
        return "threshold"
    return "orders" if support <= MAX_ORDER_SUPPORT else "fallback"


def _warn_fallback(law: DraftLaw, n: int, support: int) -> None:
    warnings.warn(
        f"verifier 'optimal' with law {law.name!r} and n = {n}: the draft support has {support:,} "
        f"tokens, above MAX_ORDER_SUPPORT = {MAX_ORDER_SUPPORT:,}; falling back to "
        f"{FALLBACK[law.name].name} (exact, below alpha*). Draft from a top-k support to stay "
        "optimal.",
        RuntimeWarning,
        stacklevel=4,
    )


def _fit_rows(p: np.ndarray, q: np.ndarray, n: int, law: DraftLaw) -> OptimalFit:
    """Fit every row of p, q [B, V] (already validated); dispatch on the law."""
    support = int(np.count_nonzero(q > 0, axis=1).max())
    method = method_for(law, n, support)
    if method == "threshold":
        return _fit_threshold(p, q, n, law)
    if method == "orders":
        return _fit_orders(p, q, n, law)
    _warn_fallback(law, n, support)
    return _fit_fallback(p, q, n, law)


def _fit_distinct(p, q, n, law):
    """Fit each distinct (p, q) row once. Returns (fit over the distinct rows, row -> fit row)."""
    if p.shape[0] == 1:
        return _fit_rows(p, q, n, law), np.zeros(1, dtype=np.int64)
    both = np.ascontiguousarray(np.concatenate([p, q], axis=1))
    _, first, which = np.unique(both, axis=0, return_index=True, return_inverse=True)
    return _fit_rows(p[first], q[first], n, law), which.ravel()


def _cap_and_certify(p, q, rule_mass, rank, levels, rows):
    """Cap a fitted rule at p (``cap_rule``); its acceptance [B]; and which rows are certified
    exact, by the sign pattern (``_certify``) or by a gap to alpha* below ``CERTIFY_GAP``."""
    capped = cap_rule(p, rule_mass)
    acceptance = capped.accepted.sum(axis=1)
    certified = _certify(q, rank, levels, p - capped.accepted, capped.accept_prob)
    certified |= np.array([row.alpha_star for row in rows]) - acceptance <= CERTIFY_GAP
    return capped, acceptance, certified


def _fit_fields(law, n, capped, acceptance, certified, rows) -> tuple:
    """The ``OptimalFit`` fields, in order, of a capped rule fitted row by row."""
    alpha_star = np.array([row.alpha_star for row in rows])
    support = np.array([row.order.size for row in rows], dtype=np.int64)
    return (
        law.name,
        n,
        capped.accept_prob,
        capped.accepted,
        capped.recovered,
        np.minimum(acceptance, 1.0),
        alpha_star,
        certified,
        support,
    )


def _fit_threshold(p, q, n, law) -> ThresholdFit:
    """The random-threshold construction, row by row (``threshold.fit_threshold_row``)."""
    rows = [fit_threshold_row(p[b], q[b], n, law) for b in range(p.shape[0])]
    arrays = stack_rows(rows, q)
    capped, acceptance, certified = _cap_and_certify(p, q, arrays.rule_mass, arrays.rank, arrays.levels, rows)
    return ThresholdFit(
        *_fit_fields(law, n, capped, acceptance, certified, rows),
        rank=arrays.rank,
        levels=arrays.levels,
        rule_mass=arrays.rule_mass,
        cum_mass=arrays.cum_mass,
        others_mass=arrays.others_mass,
        split_mass=arrays.split_mass,
    )


def _fit_orders(p, q, n, law) -> OrdersFit:
    """Random priority orders on L and on H*, row by row (``orders.fit_orders_row``); the exact
    acceptance of a fit without the sign pattern on supports up to EXACT_ORDERS_SUPPORT."""
    batch, vocab = p.shape
    rows = tuple(fit_orders_row(p[b], q[b], n, law) for b in range(batch))
    rank = np.empty((batch, vocab), dtype=np.int64)
    levels = np.ones((batch, vocab + 1))  # L always takes precedence over H*: a cut at level 0
    rule_mass = np.zeros((batch, vocab))
    for b, row in enumerate(rows):
        k = row.order.size
        rank[b, np.concatenate([row.order, np.flatnonzero(q[b] <= 0)])] = np.arange(vocab)
        levels[b, [0, row.split, k]] = 0.0
        rule_mass[b, row.order] = row.rule_mass
    capped, acceptance, certified = _cap_and_certify(p, q, rule_mass, rank, levels, rows)
    for b, row in enumerate(rows):
        if not certified[b] and row.order.size <= EXACT_ORDERS_SUPPORT:
            qs = q[b, row.order]
            exact = orders_acceptance(
                law,
                qs / qs.sum(),
                n,
                row,
                capped.accept_prob[b, row.order],
                capped.recovered[b, row.order],
                float(acceptance[b]),
            )
            acceptance[b], certified[b] = exact, True
    return OrdersFit(
        *_fit_fields(law, n, capped, acceptance, certified, rows),
        rank=rank,
        rule_mass=rule_mass,
        rows=rows,
    )


def _fit_fallback(p, q, n, law) -> FallbackFit:
    """Large supports: the law's fallback verifier, exact but below alpha*."""
    batch, vocab = p.shape
    alpha_star = np.array([priority_scan(p[b], q[b], n, law, curve=False).alpha_star for b in range(batch)])
    nan = np.full((batch, vocab), np.nan)
    return FallbackFit(
        law.name,
        n,
        nan,
        nan,
        nan,
        np.full(batch, np.nan),
        alpha_star,
        np.zeros(batch, dtype=bool),
        np.count_nonzero(q > 0, axis=1),
        verifier=FALLBACK[law.name].name,
        target_probs=p,
        draft_probs=q,
    )


def _certify(q, rank, levels, left, accept_prob) -> np.ndarray:
    """True where no rejected step can emit a draft from the residual.

    A rejection needs a chosen draft with accept_prob < 1; the residual lives on tokens with
    p - a > 0. If every such residual token with q > 0 sits before an always-on cut (level 0) and
    every rejecting token after it, a set that holds a residual token is served by an earlier group
    whose draft is kept, so acceptance = sum a exactly.
    """
    batch = q.shape[0]
    out = np.zeros(batch, dtype=bool)
    for b in range(batch):
        pos_left = rank[b, (left[b] > CERTIFY_TOLERANCE) & (q[b] > 0)]
        pos_reject = rank[b, (accept_prob[b] < 1.0 - CERTIFY_TOLERANCE) & (q[b] > 0)]
        if pos_left.size == 0 or pos_reject.size == 0:
            out[b] = True
            continue
        last_left, first_reject = int(pos_left.max()), int(pos_reject.min())
        if last_left >= first_reject:
            continue
        # an always-on cut between them: boundary c with last_left < c <= first_reject
        out[b] = bool(np.any(levels[b, last_left + 1 : first_reject + 1] <= 0.0))
    return out


# -- draft sets ----------------------------------------------------------------------------------


def output_law_from_fit(fit: OptimalFit, drafts) -> np.ndarray:
    """pi(. | x) for draft sets x [B, n] (or [n]) under a fit of 1 or B positions.

    ``threshold`` fits: the random-threshold group rule (``threshold.threshold_output_law``);
    ``orders`` fits take the first draft in each order of the mixture
    (``orders.orders_output_law``); the fallback runs its verifier.
    """
    x = np.asarray(drafts, dtype=np.int64)
    single = x.ndim == 1
    x = np.atleast_2d(x)
    rows, n = x.shape
    if fit.batch_size not in (1, rows):
        raise ValueError(f"a fit of {fit.batch_size} positions cannot serve {rows} draft rows")
    if n != fit.n:
        raise ValueError(f"the fit is for n = {fit.n} drafts, got drafts of shape {x.shape}")
    fr = np.zeros(rows, dtype=np.int64) if fit.batch_size == 1 else np.arange(rows)
    out = _output_law_rows(fit, x, fr)
    return out[0] if single else out


def _output_law_rows(fit: OptimalFit, x: np.ndarray, fr: np.ndarray) -> np.ndarray:
    """pi(. | x) for drafts x [R, n], row r served by fit row fr[r]."""
    if isinstance(fit, ThresholdFit):
        return threshold_output_law(fit, x, fr)
    if isinstance(fit, OrdersFit):
        return orders_output_law(fit, x, fr)
    return FALLBACK[fit.law].output_law(fit.target_probs[fr], fit.draft_probs[fr], x, get_law(fit.law))


def verify_from_fit(fit: OptimalFit, drafts, rng=None):
    """Draw y ~ pi(. | x) from a fit. Returns (tokens [B], accepted [B]) (scalars for [n] drafts)."""
    rng = np.random.default_rng(rng)
    x = np.asarray(drafts, dtype=np.int64)
    tokens = np.atleast_1d(categorical(np.atleast_2d(output_law_from_fit(fit, x)), rng))
    accepted = (np.atleast_2d(x) == tokens[:, None]).any(axis=1)
    if x.ndim == 1:
        return int(tokens[0]), bool(accepted[0])
    return tokens, accepted


def _fit_row_for_sampling(p: np.ndarray, q: np.ndarray, n: int, law: DraftLaw, method: str, support: int):
    """The row fit of one position [V], [V] for ``OptimalVerifier.sample`` by ``method``
    (``method_for`` of q's ``support``); a deterministic function of (p, q, n, law) that draws
    no randomness (None for the fallback)."""
    if method == "threshold":
        return fit_threshold_row(p, q, n, law)
    if method == "orders":
        return fit_orders_row(p, q, n, law)
    _warn_fallback(law, n, support)
    return None


@dataclass(frozen=True)
class NodePlan:
    """The compiled sampler of one node (``node_plan``): ``kind`` "threshold"
    (``_threshold_numba.threshold_node``) or "orders" (``_orders_numba.orders_node``), called as
    kernel(p, q, *head, drafts, uniforms, *tail) with ``uniforms`` uniforms from the generator
    (p, q [V] float64, drafts [n] int64)."""

    kind: str
    head: tuple
    tail: tuple
    uniforms: int

    def kernel(self):
        """The compiled node function (imported on first use)."""
        if self.kind == "orders":
            from mdsd.verifiers.optimal._orders_numba import orders_node  # lazy: numba ~0.3 s

            return orders_node
        from mdsd.verifiers.optimal._threshold_numba import threshold_node

        return threshold_node

    def sample(self, p: np.ndarray, q: np.ndarray, drafts: np.ndarray, rng) -> int:
        """The emitted token of one row: fit and draw in one compiled call."""
        p = np.ascontiguousarray(p, dtype=np.float64)
        q = np.ascontiguousarray(q, dtype=np.float64)
        drafts = np.ascontiguousarray(drafts, dtype=np.int64)
        return int(self.kernel()(p, q, *self.head, drafts, rng.random(self.uniforms), *self.tail))


def node_plan(law: DraftLaw, n: int, support: int) -> NodePlan | None:
    """The compiled node that fits and samples one row of n drafts of ``law`` whose q has
    ``support`` tokens: the threshold method's on short supports (``threshold_node_applies``),
    the orders method's for its compiled laws (``orders_node_applies``); None where a row takes
    the numpy fit or the fallback (``OptimalVerifier.sample``)."""
    method = method_for(law, n, support)
    if method == "threshold" and threshold_node_applies(law, n, support):
        return NodePlan("threshold", *threshold_node_arguments(n, law, support), threshold.NODE_UNIFORMS)
    if method == "orders" and orders_node_applies(law):
        return NodePlan("orders", *orders_node_arguments(n, law, support), orders.NODE_UNIFORMS)
    return None


@dataclass(frozen=True)
class PlanTable:
    """The nodes of at most n drafts one compiled walk samples with one threshold kernel
    (``plan_table``): ``plan``, a threshold ``NodePlan`` (None: no node is served); ``served``
    [n + 1, max_support + 1] bool: nodes of k drafts on a q of s nonzero tokens; ``races``
    [n + 1, max_support + 1, 5]: their race settings (the last entry of the plan's tail)."""

    plan: NodePlan | None
    served: np.ndarray
    races: np.ndarray


def plan_table(law: DraftLaw, n: int, max_support: int) -> PlanTable:
    """The nodes of 2 <= k <= n drafts of ``law`` on a q of s <= ``max_support`` nonzero tokens
    whose compiled node (``node_plan(law, k, s)``) is one threshold kernel with head (k, the
    law's flag) and one tail but for its last entry, the race settings of the order split
    (``threshold_node_arguments``): such a node draws ``node_plan``'s token from the table's
    plan with (k, flag) and its own race settings. The race step changes with the support
    (finer up to ``_race.SMALL_VOCAB`` tokens) and the drafts change with the tree's depth and
    with a top-p's nucleus, so one table serves every node of such trees. The plan is the
    first threshold plan met (k, then s ascending). ~100 ms for three drafts on 4,096 tokens:
    made once per (law, n, max_support) (``walk.RuleBook.plan_table``)."""
    served = np.zeros((n + 1, max_support + 1), dtype=bool)
    races = np.zeros((n + 1, max_support + 1, 5))
    plan = None
    for k in range(2, n + 1):
        for support in range(2 if not law.distinct else k, max_support + 1):
            node = node_plan(law, k, support)
            if node is None or node.kind != "threshold":
                continue
            plan = node if plan is None else plan
            same_head = node.head == (k, plan.head[1]) and node.uniforms == plan.uniforms
            if same_head and same_arguments(node.tail[:-1], plan.tail[:-1]):
                served[k, support], races[k, support] = True, node.tail[-1]
    return PlanTable(plan, served, races)


def same_arguments(a, b) -> bool:
    """Whether two plan arguments (nested tuples of numbers and arrays) are equal, arrays
    entry by entry."""
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(same_arguments, a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class OptimalVerifier(Verifier):
    """Attains alpha* for ``iid``, ``without_replacement`` and ``conditional_poisson`` drafts.

    A random-threshold mixture of priority-group rules over tokens ordered by p/q, fitted so that
    the accepted mass is a = min(p, c q) with sum a = alpha*; chosen drafts are capped by p, the
    rest is emitted from resid(p - a); two to twelve without_replacement drafts (sixteen on
    supports above 128 tokens) choose inside a group by the pair and the order split. More
    without_replacement drafts and conditional_poisson drafts: mixtures of priority orders on
    supports up to ``MAX_ORDER_SUPPORT`` tokens, else the law's fallback verifier (with a
    warning). See docs/optimal.md.
    ``output_law`` accepts a precomputed ``fit`` (from :func:`fit_optimal`) to share one fit across
    many draft sets of the same position; ``sample`` fits each row and samples from the rule
    directly (the decoding path).
    """

    name: str = "optimal"
    laws: tuple[str, ...] = LAWS

    def output_law(self, target_probs, draft_probs, drafts, law, fit: OptimalFit | None = None):
        if fit is not None:
            return output_law_from_fit(fit, drafts)
        # one fit per distinct (p, q) row: batches often repeat a position for many draft sets
        fit, which = _fit_distinct(target_probs, draft_probs, drafts.shape[1], check_law(law))
        return _output_law_rows(fit, np.asarray(drafts, dtype=np.int64), which)

    def sample(self, target_probs, draft_probs, drafts, law, rng):
        """Emitted tokens [B] int64 for validated p, q [B, V] and drafts [B, n]: per row, the
        fit's rule only (no capped arrays over the vocabulary, no acceptance, no certificate);
        the residual is built only on a rejection. Same conditional law as ``output_law``.
        Rows on short supports of the threshold method and the rows of the orders method are
        fitted and sampled by one compiled node (``node_plan``: the same token as the row path)."""
        the_law = check_law(law)
        n = drafts.shape[1]
        out = np.empty(drafts.shape[0], dtype=np.int64)
        fitted = None  # (p, q, row fit): a row equal to the previous one reuses its fit
        for b in range(drafts.shape[0]):
            p, q, x = target_probs[b], draft_probs[b], drafts[b]
            support = int(np.count_nonzero(q))
            plan = node_plan(the_law, n, support)
            if plan is not None:  # one compiled call
                out[b] = plan.sample(p, q, x, rng)
                continue
            method = method_for(the_law, n, support)
            if fitted is None or not (np.array_equal(p, fitted[0]) and np.array_equal(q, fitted[1])):
                fitted = (p, q, _fit_row_for_sampling(p, q, n, the_law, method, support))
            row_fit = fitted[2]
            if method == "threshold":
                out[b] = sample_threshold_row(row_fit, p, x, rng)
            elif method == "orders":
                out[b] = sample_orders_row(row_fit, p, x, rng)
            else:
                out[b] = FALLBACK[the_law.name].sample(p[None], q[None], x[None], the_law, rng)[0]
        return out

    def acceptance(self, target_probs, draft_probs, n, law):
        the_law = check_law(law)
        fit, which = _fit_distinct(target_probs, draft_probs, n, the_law)
        if isinstance(fit, FallbackFit):
            return FALLBACK[the_law.name].acceptance(target_probs, draft_probs, n, the_law)
        if not np.all(fit.certified):
            return None
        return fit.acceptance[which]

    def fit(self, target_probs, draft_probs, n, law="iid") -> OptimalFit:
        return fit_optimal(target_probs, draft_probs, n, law)
