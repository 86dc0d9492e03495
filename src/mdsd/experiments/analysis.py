"""Per-position acceptance metrics from cached logits, and their aggregation with 95% CIs.

For one (dataset, T) all positions are processed at once as [B, W] arrays (W = the vocabulary, or
with top-k drafting the union of the two models' top-k sets, which holds all of p's and q's mass):

* alpha* of every draft law (``mdsd.optimal_bound``, batched, with its error estimate);
* the acceptance rate of every (verifier, law) pair with the verifier exact for the law, by the
  first exact method available:
  1. the verifier's closed form (``Verifier.acceptance``);
  2. the core's exact closed form for ``importance`` (``importance_acceptance``);
  3. enumeration of all draft tuples, when every row has at most ``ENUM_LIMIT`` tuples;
  4. otherwise Monte Carlo: ``mc_samples`` draft sets per position, each scored by its exact
     conditional acceptance sum_{y in set(x)} pi(y | x) (Rao-Blackwellised), marked ``monte_carlo``
     with its sampling standard error.

Rows whose q has fewer than n positive tokens cannot draw n distinct drafts; distinct laws use
n_eff = |supp q| there (counted in ``clamped``).

Aggregation: the mean over positions, with a 95% CI clustered by prompt (positions of one
generated sequence are correlated): se^2 = C/(C-1) * sum_c (sum_{i in c} (x_i - mean))^2 / N^2.
The gap to the bound is a per-position difference, so its CI is paired.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mdsd.acceptance import acceptance_rate
from mdsd.bound import optimal_bound
from mdsd.experiments.capture import Positions, datasets_in, load_positions
from mdsd.experiments.config import MeasureConfig
from mdsd.laws import get_law
from mdsd.logits import process_logits
from mdsd.verifiers import VERIFIERS, accepted_mass, get_verifier
from mdsd.verifiers.classic import importance_acceptance

Z95 = 1.959963984540054
ENUM_LIMIT = 2_000  # enumerate draft tuples exactly when every row has at most this many
CHUNK_ELEMENTS = 2_000_000  # rows x width evaluated at once (memory of the batched kernels)
SKIPPED = "skipped (too slow)"  # the method of a (verifier, law, n) the time budget skipped
BOUND_VERIFIER = "alpha*"  # the verifier column of the rows that report a law's bound itself
ALL_DATASETS = "all"
EXACT_SLACK = 1e-9  # an exact rate may exceed its bound by rounding only (plus the bound's own
# error estimate, e.g. the race quadrature's for without_replacement)


# ---------------------------------------------------------------- probabilities
def position_probs(positions: Positions) -> tuple[np.ndarray, np.ndarray]:
    """(p, q) float64 [B, W] at the positions' temperature.

    Dense cache: process_logits over the full vocabulary. Top-k cache: each row is laid out on the
    union of the two top-k sets, sorted by token id (so ties still break by lower id), padded with
    columns where both logits are -inf; process_logits then gives exactly the top-k laws.
    """
    t = positions.temperature
    if positions.target_index is None:
        return (
            process_logits(positions.target_logits.astype(np.float64), t),
            process_logits(positions.draft_logits.astype(np.float64), t),
        )
    t_idx, d_idx = positions.target_index.astype(np.int64), positions.draft_index.astype(np.int64)
    batch = t_idx.shape[0]
    union = np.sort(np.concatenate([t_idx, d_idx], axis=1), axis=1)  # [B, 2k], with repeats
    width = union.shape[1]
    stride = int(union.max()) + 1
    keys = (union + stride * np.arange(batch)[:, None]).ravel()  # rows stay sorted
    grids = []
    for idx, values in ((t_idx, positions.target_logits), (d_idx, positions.draft_logits)):
        # leftmost match: the first column holding the token; repeated columns stay -inf
        where = np.searchsorted(keys, (idx + stride * np.arange(batch)[:, None]).ravel())
        grid = np.full(batch * width, -np.inf)
        grid[where] = values.astype(np.float64).ravel()
        grids.append(grid.reshape(batch, width))
    return process_logits(grids[0], t), process_logits(grids[1], t)


# ---------------------------------------------------------------- exact rates
@dataclass(frozen=True)
class RateArrays:
    """Per-position acceptance of one (verifier, law): value [B], Monte-Carlo variance of each
    position's estimate (0 for exact methods), and the method."""

    value: np.ndarray
    mc_var: np.ndarray
    method: str


def _chunks(rows: int, width: int, per_row: int = 1):
    size = max(1, CHUNK_ELEMENTS // max(1, width * per_row))
    for start in range(0, rows, size):
        yield slice(start, min(start + size, rows))


def _monte_carlo(p, q, n, verifier, law, rng, samples) -> tuple[np.ndarray, np.ndarray]:
    """Rao-Blackwellised estimate per row: mean over sampled x of sum_{y in set(x)} pi(y | x)."""
    value, var = np.empty(p.shape[0]), np.empty(p.shape[0])
    for part in _chunks(p.shape[0], p.shape[1], samples):
        pb = np.repeat(p[part], samples, axis=0)  # [b * S, W]
        qb = np.repeat(q[part], samples, axis=0)
        x = law.sample(qb, n, rng)  # [b * S, n]
        got = accepted_mass(verifier.output_law(pb, qb, x, law), x).reshape(-1, samples)
        value[part] = got.mean(axis=1)
        var[part] = got.var(axis=1, ddof=1) / samples if samples > 1 else np.inf
    return value, var


EXACT_CHUNK_ROWS = 256  # rows per call to a verifier's closed form (a chunk falls back alone)


def exact_or_sampled(p, q, n, verifier, law, rng, samples) -> RateArrays:
    """Acceptance of ``verifier`` under ``law`` per row, by the first available method (chosen
    per chunk of rows; the method string joins the methods used, ``monte_carlo`` if any)."""
    if p.shape[0] <= EXACT_CHUNK_ROWS:
        return _exact_or_sampled(p, q, n, verifier, law, rng, samples)
    parts = [
        _exact_or_sampled(p[s], q[s], n, verifier, law, rng, samples)
        for s in (slice(i, i + EXACT_CHUNK_ROWS) for i in range(0, p.shape[0], EXACT_CHUNK_ROWS))
    ]
    methods = {part.method for part in parts}
    return RateArrays(
        np.concatenate([part.value for part in parts]),
        np.concatenate([part.mc_var for part in parts]),
        "monte_carlo" if "monte_carlo" in methods else "+".join(sorted(methods)),
    )


def _exact_or_sampled(p, q, n, verifier, law, rng, samples) -> RateArrays:
    zeros = np.zeros(p.shape[0])
    closed = verifier.acceptance(p, q, n, law)
    if closed is not None:
        return RateArrays(np.clip(np.asarray(closed, np.float64), 0.0, 1.0), zeros, "closed_form")
    if verifier.name == "importance" and law.name == "iid":
        return RateArrays(importance_acceptance(p, q, n), zeros, "closed_form")
    if max(law.num_tuples(row, n) for row in q) <= ENUM_LIMIT:
        rates = [
            acceptance_rate(pr, qr, n, verifier.name, law.name, method="enumeration").rate
            for pr, qr in zip(p, q)
        ]
        return RateArrays(np.asarray(rates), zeros, "enumeration")
    value, var = _monte_carlo(p, q, n, verifier, law, rng, samples)
    return RateArrays(value, var, "monte_carlo")


# ---------------------------------------------------------------- one (dataset, T, n)
@dataclass(frozen=True)
class PositionMetrics:
    """Per-position alpha* per law and rates per (verifier, law) for one n; ``clamped`` counts the
    rows evaluated with fewer distinct drafts than n (q has too small a support)."""

    n: int
    bounds: dict[str, np.ndarray]
    rates: dict[tuple[str, str], RateArrays]
    clamped: dict[str, int]
    notes: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # warnings raised
    seconds: dict[str, float] = field(default_factory=dict)  # time per bound / (verifier, law)
    bound_error: dict[str, float] = field(default_factory=dict)  # the core's error estimate of
    # alpha* per law (quadrature for without_replacement; 0 where exact to rounding)


def active_pairs(config: MeasureConfig, n: int) -> tuple[list[str], list[tuple[str, str]]]:
    """The laws whose bound is measured at n, and the (verifier, law) pairs with the verifier exact
    for the law. ``spechub`` (n = 2 only) joins the laws when a selected verifier needs it."""
    names = list(VERIFIERS) if config.verifiers is None else list(config.verifiers)
    laws = [law for law in config.laws if law != "spechub"]
    if n == 2 and ("spechub" in config.laws or any(get_verifier(v).default_law == "spechub" for v in names)):
        laws.append("spechub")
    pairs = [(v, law) for v in names for law in get_verifier(v).laws if law in laws]
    return laws, pairs


def _law_groups(q: np.ndarray, n: int, law_name: str):
    """Row groups with the number of drafts each can take under the law: [(rows, n_eff, law)]."""
    law = get_law(law_name)
    if not law.distinct:
        return [(np.arange(q.shape[0]), n, law)]
    support = np.count_nonzero(q > 0, axis=1)
    n_eff = np.minimum(support, n)
    groups = []
    for value in np.unique(n_eff):
        rows = np.flatnonzero(n_eff == value)
        # spechub needs exactly 2 drafts; with one token in supp q it is single-draft greedy
        the_law = get_law("greedy") if law_name == "spechub" and value < 2 else law
        groups.append((rows, int(value), the_law))
    return groups


FIRST_ROWS = 2  # rows evaluated before a verifier's cost is extrapolated against its budget


def _pair_rates(p, q, n, rows, verifier, law_name, bounds, rng, samples):
    """Rates of one (verifier, law) at the given rows: (value, mc_var, methods)."""
    value, mc_var, methods = np.empty(rows.size), np.zeros(rows.size), set()
    sub_q = q[rows]
    for group, n_eff, law in _law_groups(sub_q, n, law_name):
        sel = rows[group]
        if law.name not in verifier.laws:  # spechub rows clamped to one draft
            got = RateArrays(bounds[law_name][sel], np.zeros(sel.size), "closed_form")
        else:
            got = exact_or_sampled(p[sel], q[sel], n_eff, verifier, law, rng, samples)
        value[group], mc_var[group] = got.value, got.mc_var
        methods.update(got.method.split("+"))
    return value, mc_var, methods


def _within_budget(order: np.ndarray, evaluate, budget: float | None):
    """Evaluate rows in the given (random) order until the time budget is spent.

    Returns (rows evaluated, [results]). The first FIRST_ROWS rows are timed, then chunks follow,
    each at most as many rows as are done (doubling) and, once the rest no longer fits the budget
    at the mean cost so far, at most half the remaining budget's worth, until the budget is spent
    or the rows run out. A run of costly rows after cheap ones overshoots by about one chunk, not
    by the whole rest (always at least the first chunk).
    """
    if budget is None or order.size <= FIRST_ROWS:
        return order, [evaluate(order)]
    start = time.perf_counter()
    results, done, size = [], 0, FIRST_ROWS
    while done < order.size:
        chunk = order[done : done + size]
        results.append(evaluate(chunk))
        done += chunk.size
        elapsed = time.perf_counter() - start
        left = budget - elapsed
        if left <= 0:
            break
        per_row = elapsed / done
        if per_row <= 0 or per_row * (order.size - done) <= left:
            size = done  # the rest fits at the mean cost so far: doubling chunks
        else:
            size = max(1, min(done, int(0.5 * left / per_row)))
    return order[:done], results


def measure_n(
    p: np.ndarray,
    q: np.ndarray,
    n: int,
    config: MeasureConfig,
    rng: np.random.Generator,
    *,
    order: np.ndarray | None = None,
    cell_budget=None,
) -> PositionMetrics:
    """alpha* of each law and the rate of each (verifier, law) pair at every position.

    cell_budget: seconds per (verifier, law): a number, or a :class:`VerifierBudget` per verifier.
        A verifier too slow for all positions is rated on the first positions of ``order`` (a
        random permutation, the same for every n and law, so the subsamples are paired) that fit
        its budget; the other positions get NaN.
    """
    order = np.arange(p.shape[0]) if order is None else order
    laws, pairs = active_pairs(config, n)
    bounds, clamped = {}, {}
    seconds, notes, bound_error = {}, {}, {}
    for law_name in laws:
        bound_error[law_name] = 0.0
        start = time.perf_counter()
        out = np.empty(p.shape[0])
        groups = _law_groups(q, n, law_name)
        clamped[law_name] = int(sum(rows.size for rows, value, _ in groups if value < n))
        for rows, value, law in groups:
            for part in _chunks(rows.size, p.shape[1], value + 1):
                sel = rows[part]
                result = optimal_bound(p[sel], q[sel], value, law.name)
                out[sel] = result.alpha
                bound_error[law_name] = max(
                    bound_error.get(law_name, 0.0), float(getattr(result, "error_estimate", 0.0))
                )
        bounds[law_name] = out
        seconds[f"bound {law_name}"] = time.perf_counter() - start
    rates = {}
    for verifier_name, law_name in pairs:
        verifier = get_verifier(verifier_name)

        def evaluate(rows, verifier=verifier, law_name=law_name):
            return _pair_rates(p, q, n, rows, verifier, law_name, bounds, rng, config.mc_samples)

        budget = cell_budget.get(verifier_name) if isinstance(cell_budget, dict) else cell_budget
        start = time.perf_counter()
        if isinstance(budget, VerifierBudget) and (law_name, n) in budget.too_slow:
            # one position took longer than a cell's share before: skip, reported as such
            rates[(verifier_name, law_name)] = RateArrays(
                np.full(p.shape[0], np.nan), np.zeros(p.shape[0]), SKIPPED
            )
            budget.spend(0.0)
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if isinstance(budget, VerifierBudget):
                share = budget.next_cell()
                done, results = _within_budget(order, evaluate, share)
                spent = time.perf_counter() - start
                budget.spend(spent)
                if spent / max(done.size, 1) > share:
                    budget.too_slow.add((law_name, n))
            else:
                done, results = _within_budget(order, evaluate, budget)
        seconds[f"{verifier_name} [{law_name}]"] = time.perf_counter() - start
        # one note per kind of warning (numbers stripped), e.g. a verifier's fallback
        notes[(verifier_name, law_name)] = {re.sub(r"[\d,.]+\d", "#", str(w.message)) for w in caught}
        value, mc_var = np.full(p.shape[0], np.nan), np.zeros(p.shape[0])
        value[done] = np.concatenate([r[0] for r in results])
        mc_var[done] = np.concatenate([r[1] for r in results])
        methods = set().union(*(r[2] for r in results))
        method = "monte_carlo" if "monte_carlo" in methods else "+".join(sorted(methods))
        rates[(verifier_name, law_name)] = RateArrays(value, mc_var, method)
    return PositionMetrics(n, bounds, rates, clamped, notes, seconds, bound_error)


@dataclass
class VerifierBudget:
    """A verifier's analysis time for one dataset, shared by its (T, n, law) cells: each
    cell may use what is left divided by the cells left (time a cheap cell does not use rolls
    over to the later ones). Where a single position took longer than its cell's share, the
    later cells of that (law, n) are skipped (method ``skipped``, no positions)."""

    seconds: float
    cells: int
    too_slow: set = field(default_factory=set)  # (law, n) where one position exceeded a share

    def next_cell(self) -> float:
        return max(self.seconds, 0.0) / max(self.cells, 1)

    def spend(self, elapsed: float) -> None:
        self.seconds -= elapsed
        self.cells -= 1


def cell_budgets(config: MeasureConfig, datasets: int) -> dict[str, VerifierBudget | None]:
    """A :class:`VerifierBudget` per verifier for one dataset: ``config.verifier_budget`` seconds
    split equally between the datasets (None: no limit), so that a costly first dataset cannot
    leave nothing for the others."""
    budgets = {}
    names = list(VERIFIERS) if config.verifiers is None else list(config.verifiers)
    for name in names:
        if config.verifier_budget is None:
            budgets[name] = None
            continue
        cells = sum(sum(1 for v, _ in active_pairs(config, n)[1] if v == name) for n in config.ns)
        budgets[name] = VerifierBudget(
            config.verifier_budget / max(datasets, 1), cells * len(config.temperatures)
        )
    return budgets


# ---------------------------------------------------------------- aggregation
def clustered_mean(values: np.ndarray, clusters: np.ndarray) -> tuple[float, float]:
    """(mean, 95% CI half-width) with the standard error clustered by ``clusters``."""
    values = np.asarray(values, np.float64)
    count = values.size
    if count == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    ids, inverse = np.unique(clusters, return_inverse=True)
    c = ids.size
    if c < 2:
        se = float(values.std(ddof=1) / math.sqrt(count)) if count > 1 else math.inf
    else:
        sums = np.bincount(inverse, weights=values - mean, minlength=c)
        se = math.sqrt(c / (c - 1) * float((sums**2).sum())) / count
    return mean, Z95 * se


@dataclass
class _Collected:
    """Per-position arrays of one (dataset, T, n, law, verifier), for pooling across datasets."""

    value: np.ndarray
    bound: np.ndarray
    mc_var: np.ndarray
    clusters: np.ndarray
    method: str
    clamped: int
    notes: frozenset = frozenset()
    bound_error: float = 0.0


def _row(dataset, temperature, n, law, verifier, c: _Collected) -> dict:
    total = c.value.size
    keep = ~np.isnan(c.value)  # positions not evaluated (time budget) are NaN
    c = _Collected(
        c.value[keep],
        c.bound[keep],
        c.mc_var[keep],
        c.clusters[keep],
        c.method,
        c.clamped,
        c.notes,
        c.bound_error,
    )
    acceptance, ci = clustered_mean(c.value, c.clusters)
    bound, bound_ci = clustered_mean(c.bound, c.clusters)
    gap, gap_ci = clustered_mean(c.bound - c.value, c.clusters)
    if c.value.size == 0:
        mc_se = excess = math.nan
    else:
        mc_se = math.sqrt(float(c.mc_var.sum())) / c.value.size if c.method == "monte_carlo" else 0.0
        excess = float(np.max(c.value - c.bound))
    return {
        "dataset": dataset,
        "temperature": temperature,
        "n": n,
        "law": law,
        "verifier": verifier,
        "acceptance": acceptance,
        "ci95": ci,
        "bound": bound,
        "bound_ci95": bound_ci,
        "gap": gap,
        "gap_ci95": gap_ci,
        "method": c.method,
        "mc_stderr": mc_se,
        "positions": int(c.value.size),
        "prompts": int(np.unique(c.clusters).size),
        "clamped": c.clamped,
        "max_excess": excess,
        "bound_error": c.bound_error,
        "subsampled": int(0 < c.value.size < total),
        "notes": " | ".join(sorted(c.notes)),
    }


def _pooled_method(methods: list[str]) -> str:
    used = [m for m in methods if m != SKIPPED]
    if not used:
        return SKIPPED
    return "monte_carlo" if "monte_carlo" in used else "+".join(sorted(set("+".join(used).split("+"))))


def analyse(
    config: MeasureConfig, cache_dir: Path, *, progress: Callable[[int, str], None] | None = None
) -> tuple[list[dict], dict]:
    """Tidy rows (one per dataset, T, n, law, verifier; ``alpha*`` rows give each law's bound) for
    every dataset and for all datasets pooled, and the per-position checks."""
    rng = np.random.default_rng([config.seed, 7])
    datasets = datasets_in(cache_dir, config)
    collected: dict[tuple, _Collected] = {}
    checks = {
        "wor_below_iid_positions": 0,
        "exact_above_bound_positions": 0,
        "max_exact_excess": -math.inf,
        "positions": 0,
        "seconds": {},
    }
    for d_index, dataset in enumerate(datasets):
        budgets = cell_budgets(config, len(datasets))
        for temperature in config.temperatures:
            positions = load_positions(cache_dir, config, dataset, float(temperature))
            p, q = position_probs(positions)
            clusters = positions.prompt + 1_000_000 * d_index
            checks["positions"] += positions.count
            order = np.random.default_rng([config.seed, d_index, int(temperature * 1000)]).permutation(
                positions.count
            )
            for n in config.ns:
                metrics = measure_n(p, q, n, config, rng, order=order, cell_budget=budgets)
                for law, bound in metrics.bounds.items():
                    collected[(dataset, temperature, n, law, BOUND_VERIFIER)] = _Collected(
                        bound,
                        bound,
                        np.zeros_like(bound),
                        clusters,
                        "exact",
                        metrics.clamped[law],
                        frozenset(),
                        metrics.bound_error[law],
                    )
                for (verifier, law), rate in metrics.rates.items():
                    collected[(dataset, temperature, n, law, verifier)] = _Collected(
                        rate.value,
                        metrics.bounds[law],
                        rate.mc_var,
                        clusters,
                        rate.method,
                        metrics.clamped[law],
                        frozenset(metrics.notes.get((verifier, law), ())),
                        metrics.bound_error[law],
                    )
                    if rate.method not in ("monte_carlo", SKIPPED):
                        excess = (rate.value - metrics.bounds[law])[~np.isnan(rate.value)]
                        slack = EXACT_SLACK + metrics.bound_error[law]
                        checks["exact_above_bound_positions"] += int((excess > slack).sum())
                        checks["max_exact_excess"] = max(
                            checks["max_exact_excess"], float(excess.max(initial=-np.inf))
                        )
                for what, spent in metrics.seconds.items():
                    checks["seconds"][what] = checks["seconds"].get(what, 0.0) + spent
                if "iid" in metrics.bounds and "without_replacement" in metrics.bounds:
                    slack = (
                        EXACT_SLACK + metrics.bound_error["without_replacement"] + metrics.bound_error["iid"]
                    )
                    below = metrics.bounds["without_replacement"] < metrics.bounds["iid"] - slack
                    checks["wor_below_iid_positions"] += int(below.sum())
                checks["max_bound_error"] = max(
                    checks.get("max_bound_error", 0.0), *metrics.bound_error.values()
                )
            if progress is not None:
                progress(1, f"{dataset} T={temperature} ({positions.count} positions)")

    rows = [_row(*key, c) for key, c in collected.items()]
    if len(datasets) > 1:
        keys = {key[1:] for key in collected}
        for key in sorted(keys, key=str):
            parts = [collected[(d,) + key] for d in datasets if (d,) + key in collected]
            pooled = _Collected(
                np.concatenate([c.value for c in parts]),
                np.concatenate([c.bound for c in parts]),
                np.concatenate([c.mc_var for c in parts]),
                np.concatenate([c.clusters for c in parts]),
                _pooled_method([c.method for c in parts]),
                sum(c.clamped for c in parts),
                frozenset().union(*(c.notes for c in parts)),
                max(c.bound_error for c in parts),
            )
            rows.append(_row(ALL_DATASETS, *key, pooled))
    order = {d: i for i, d in enumerate(datasets + [ALL_DATASETS])}
    rows.sort(
        key=lambda r: (
            order[r["dataset"]],
            r["temperature"],
            r["n"],
            r["law"],
            r["verifier"] != BOUND_VERIFIER,
            r["verifier"],
        )
    )
    return rows, checks
