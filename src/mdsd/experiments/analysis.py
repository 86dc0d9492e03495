"""Per-position acceptance metrics from cached logits, and their aggregation with 95% CIs.

For one (dataset, T, n) -- a *work unit* -- all positions are processed at once as [B, W] arrays
(W = the vocabulary, or with top-k drafting the union of the two models' top-k sets, which holds
all of p's and q's mass):

* alpha* of every draft law (``mdsd.optimal_bound``, batched, with its error estimate);
* the acceptance rate of every (verifier, law) pair with the verifier exact for the law, by
  :func:`mdsd.acceptance_rate` (closed form, else enumeration of all draft tuples when every row
  of a chunk has at most ``ENUM_LIMIT`` tuples, else Rao-Blackwellised Monte Carlo with
  ``mc_samples`` draft sets per position, marked ``monte_carlo`` with its standard error).

Every result is a function of the configuration and the seed only: the Monte-Carlo generator of
each (dataset, T, n, verifier, law) is seeded from those names, and the (verifier, law) pairs of
``config.subsample`` are rated on a seeded subsample of ``config.subsample_positions`` positions
per (dataset, T) -- the same positions for every n and law, so bound and rate stay paired. So the
work units can run in any order, on any number of processes (``mdsd.experiments.parallel``).

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
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mdsd.acceptance import acceptance_rate
from mdsd.bound import optimal_bound
from mdsd.experiments.capture import Positions, datasets_in, load_positions
from mdsd.experiments.config import MeasureConfig
from mdsd.experiments.vocabulary import ALL_DATASETS, BOUND_VERIFIER, law_rank, verifier_rank
from mdsd.laws import get_law
from mdsd.logits import process_logits
from mdsd.verifiers import VERIFIERS, get_verifier

Z95 = 1.959963984540054
ENUM_LIMIT = 2_000  # enumerate draft tuples exactly when every row of a chunk has at most this many
CHUNK_ELEMENTS = 2_000_000  # rows x width evaluated at once (memory of the batched kernels)
EXACT_CHUNK_ROWS = 256  # rows per method choice (a chunk without a closed form falls back alone)
EXACT_SLACK = 1e-9  # an exact rate may exceed its bound by rounding only (plus the bound's own
# error estimate, e.g. the race quadrature's for without_replacement)

__all__ = ["ALL_DATASETS", "BOUND_VERIFIER", "analyse", "measure_unit", "position_probs", "work_units"]


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


# ---------------------------------------------------------------- rates of one unit
@dataclass(frozen=True)
class RateArrays:
    """Per-position acceptance of one (verifier, law): value [B] (NaN at positions not rated),
    Monte-Carlo variance of each position's estimate (0 for exact methods), and the method."""

    value: np.ndarray
    mc_var: np.ndarray
    method: str


def _chunks(rows: int, width: int, per_row: int = 1):
    size = max(1, CHUNK_ELEMENTS // max(1, width * per_row))
    for start in range(0, rows, size):
        yield slice(start, min(start + size, rows))


def stream_seed(config: MeasureConfig, *names) -> list[int]:
    """Seed material of one random stream: the run's seed and stable hashes of ``names`` (dataset,
    T, n, verifier, law), so a stream never depends on what ran before it or where."""
    return [config.seed] + [zlib.crc32(repr(name).encode()) for name in names]


def subsample_rows(config: MeasureConfig, dataset: str, temperature: float, count: int) -> np.ndarray:
    """Sorted positions [k] rated by the subsampled (verifier, law) pairs at (dataset, T): the
    first ``config.subsample_positions`` of a seeded permutation (all positions when None or
    when there are fewer)."""
    limit = config.subsample_positions
    if limit is None or count <= limit:
        return np.arange(count)
    order = np.random.default_rng(stream_seed(config, "subsample", dataset, temperature)).permutation(count)
    return np.sort(order[:limit])


def is_subsampled(config: MeasureConfig, verifier: str, law: str, n: int) -> bool:
    """Whether an entry of ``config.subsample`` covers (verifier, law, n): ``verifier`` (all its
    laws and n), ``verifier:law`` (every n) or ``verifier:law:n``."""
    return any(
        entry in (verifier, f"{verifier}:{law}", f"{verifier}:{law}:{n}") for entry in config.subsample
    )


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


def _pair_rates(p, q, n, rows, verifier, law_name, bounds, rng, samples) -> RateArrays:
    """Rates of one (verifier, law) at the given rows (of [B] positions; NaN elsewhere)."""
    value, mc_var, methods = np.full(p.shape[0], np.nan), np.zeros(p.shape[0]), set()
    for group, n_eff, law in _law_groups(q[rows], n, law_name):
        sel = rows[group]
        if law.name not in verifier.laws:  # spechub rows clamped to one draft: greedy = its bound
            value[sel] = bounds[law_name][sel]
            methods.add("closed_form")
            continue
        got = acceptance_rate(
            p[sel],
            q[sel],
            n_eff,
            verifier.name,
            law.name,
            rng=rng,
            num_samples=samples,
            max_tuples=ENUM_LIMIT,
            chunk_rows=EXACT_CHUNK_ROWS,
        )
        value[sel], mc_var[sel] = got.rate, np.square(got.stderr)
        methods.update(got.method.split("+"))
    method = "monte_carlo" if "monte_carlo" in methods else "+".join(sorted(methods))
    return RateArrays(value, mc_var, method)


def _bounds(p, q, n, laws):
    """alpha* [B] per law, the clamped row counts, the error estimates and the seconds spent."""
    bounds, clamped, bound_error, seconds = {}, {}, {}, {}
    for law_name in laws:
        start = time.perf_counter()
        out = np.empty(p.shape[0])
        groups = _law_groups(q, n, law_name)
        clamped[law_name] = int(sum(rows.size for rows, value, _ in groups if value < n))
        bound_error[law_name] = 0.0
        for rows, value, law in groups:
            for part in _chunks(rows.size, p.shape[1], value + 1):
                sel = rows[part]
                result = optimal_bound(p[sel], q[sel], value, law.name)
                out[sel] = result.alpha
                error = float(getattr(result, "error_estimate", 0.0))
                bound_error[law_name] = max(bound_error[law_name], error)
        bounds[law_name] = out
        seconds[f"bound {law_name}"] = time.perf_counter() - start
    return bounds, clamped, bound_error, seconds


def measure_n(
    p: np.ndarray,
    q: np.ndarray,
    n: int,
    config: MeasureConfig,
    *,
    dataset: str = "",
    temperature: float = 0.0,
) -> PositionMetrics:
    """alpha* of each law at every position and the rate of each (verifier, law) pair at every
    position (at the :func:`subsample_rows` positions for the pairs of ``config.subsample``).

    ``dataset`` and ``temperature`` name the unit: they seed its random streams.
    """
    laws, pairs = active_pairs(config, n)
    bounds, clamped, bound_error, seconds = _bounds(p, q, n, laws)
    every_row = np.arange(p.shape[0])
    some_rows = subsample_rows(config, dataset, temperature, p.shape[0])
    rates, notes = {}, {}
    for verifier_name, law_name in pairs:
        rows = some_rows if is_subsampled(config, verifier_name, law_name, n) else every_row
        rng = np.random.default_rng(stream_seed(config, dataset, temperature, n, verifier_name, law_name))
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rates[(verifier_name, law_name)] = _pair_rates(
                p, q, n, rows, get_verifier(verifier_name), law_name, bounds, rng, config.mc_samples
            )
        seconds[f"{verifier_name} [{law_name}]"] = time.perf_counter() - start
        # one note per kind of warning (numbers stripped), e.g. a verifier's fallback
        notes[(verifier_name, law_name)] = {re.sub(r"[\d,.]+\d", "#", str(w.message)) for w in caught}
    return PositionMetrics(n, bounds, rates, clamped, notes, seconds, bound_error)


# ---------------------------------------------------------------- work units
@dataclass(frozen=True)
class WorkUnit:
    """One (dataset, T, n) of the analysis: self-contained (positions, not a cache path), so it can
    be shipped to another process or cluster worker."""

    config: MeasureConfig
    dataset_index: int
    positions: Positions
    n: int

    @property
    def label(self) -> str:
        return f"{self.positions.dataset} T={self.positions.temperature} n={self.n}"


@dataclass(frozen=True)
class UnitResult:
    """A work unit's per-position metrics and the prompt (cluster) id of each position."""

    dataset: str
    temperature: float
    metrics: PositionMetrics
    clusters: np.ndarray


def measure_unit(unit: WorkUnit) -> UnitResult:
    """Run one work unit (a pure function of the unit: any process, any order)."""
    positions = unit.positions
    p, q = position_probs(positions)
    metrics = measure_n(
        p, q, unit.n, unit.config, dataset=positions.dataset, temperature=float(positions.temperature)
    )
    clusters = positions.prompt + 1_000_000 * unit.dataset_index
    return UnitResult(positions.dataset, float(positions.temperature), metrics, clusters)


def work_units(config: MeasureConfig, cache_dir: Path) -> list[WorkUnit]:
    """Every (dataset, T, n) of the sweep, positions loaded from the cache (costliest n first, so
    that a pool finishes evenly)."""
    units = []
    for d_index, dataset in enumerate(datasets_in(cache_dir, config)):
        for temperature in config.temperatures:
            positions = load_positions(cache_dir, config, dataset, float(temperature))
            units += [WorkUnit(config, d_index, positions, n) for n in config.ns]
    return sorted(units, key=lambda u: -u.n)


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
    keep = ~np.isnan(c.value)  # positions outside a subsample are NaN
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
    return "monte_carlo" if "monte_carlo" in methods else "+".join(sorted(set("+".join(methods).split("+"))))


Runner = Callable[[list[WorkUnit], Callable[[WorkUnit], None] | None], list[UnitResult]]


def run_serial(units: list[WorkUnit], done: Callable[[WorkUnit], None] | None = None) -> list[UnitResult]:
    """Run the work units one after the other in this process."""
    results = []
    for unit in units:
        results.append(measure_unit(unit))
        if done is not None:
            done(unit)
    return results


def analyse(
    config: MeasureConfig,
    cache_dir: Path,
    *,
    progress: Callable[[int, str], None] | None = None,
    runner: Runner | None = None,
) -> tuple[list[dict], dict]:
    """Tidy rows (one per dataset, T, n, law, verifier; ``alpha*`` rows give each law's bound) for
    every dataset and for all datasets pooled, and the per-position checks.

    runner: how the work units run (default :func:`run_serial`; ``mdsd.experiments.parallel``
        has process-pool and Dask runners). The rows do not depend on it.
    """
    datasets = datasets_in(cache_dir, config)
    units = work_units(config, cache_dir)
    done = None if progress is None else (lambda unit: progress(1, unit.label))
    results = (runner or run_serial)(units, done)
    collected, checks = _collect(results)
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
            law_rank(r["law"]),
            r["law"],
            r["verifier"] != BOUND_VERIFIER,
            verifier_rank(r["verifier"]),
        )
    )
    return rows, checks


def _collect(results: list[UnitResult]) -> tuple[dict[tuple, _Collected], dict]:
    """Per-(dataset, T, n, law, verifier) arrays and the per-position checks of the units
    (sums and maxima: independent of the order the units finished in)."""
    collected: dict[tuple, _Collected] = {}
    checks = {
        "wor_below_iid_positions": 0,
        "exact_above_bound_positions": 0,
        "max_exact_excess": -math.inf,
        "max_bound_error": 0.0,
        "positions": 0,
        "seconds": {},
    }
    first_n = min((r.metrics.n for r in results), default=0)
    for result in results:
        metrics, clusters = result.metrics, result.clusters
        key = (result.dataset, result.temperature, metrics.n)
        if metrics.n == first_n:  # count each (dataset, T) once
            checks["positions"] += int(clusters.size)
        for law, bound in metrics.bounds.items():
            collected[key + (law, BOUND_VERIFIER)] = _Collected(
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
            collected[key + (law, verifier)] = _Collected(
                rate.value,
                metrics.bounds[law],
                rate.mc_var,
                clusters,
                rate.method,
                metrics.clamped[law],
                frozenset(metrics.notes.get((verifier, law), ())),
                metrics.bound_error[law],
            )
            if rate.method != "monte_carlo":
                excess = (rate.value - metrics.bounds[law])[~np.isnan(rate.value)]
                slack = EXACT_SLACK + metrics.bound_error[law]
                checks["exact_above_bound_positions"] += int((excess > slack).sum())
                checks["max_exact_excess"] = max(
                    checks["max_exact_excess"], float(excess.max(initial=-np.inf))
                )
        for what, spent in metrics.seconds.items():
            checks["seconds"][what] = checks["seconds"].get(what, 0.0) + spent
        if "iid" in metrics.bounds and "without_replacement" in metrics.bounds:
            slack = EXACT_SLACK + metrics.bound_error["without_replacement"] + metrics.bound_error["iid"]
            below = metrics.bounds["without_replacement"] < metrics.bounds["iid"] - slack
            checks["wor_below_iid_positions"] += int(below.sum())
        checks["max_bound_error"] = max(checks["max_bound_error"], *metrics.bound_error.values(), 0.0)
    return collected, checks
