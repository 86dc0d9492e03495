"""The statistics of the audit: a pooled G-test, a total-variation effect size, and a one-sided
test of the acceptance rate against alpha*.

G-test (likelihood-ratio goodness of fit). Observed counts O_k of N emitted tokens are compared
with the expected counts E_k = N p_k. Tokens with p_k = 0 are *impossible*: one such emission
proves a loss (p-value 0). The others are pooled into bins of expected count >= ``MIN_EXPECTED``
(each token with E_k >= MIN_EXPECTED is its own bin; the rest are merged in increasing order of
p), so that the chi-square approximation of G = 2 sum O ln(O / E) with (bins - 1) degrees of
freedom stays valid at large vocabularies. Pooling can only lose power, never validity.

Effect size: the plug-in total variation TV = 1/2 sum_k |O_k / N - p_k| over coarser bins of
expected count >= ``TV_MIN_EXPECTED``, the rarest one possibly short (the TV of the binned law,
a lower bound of the per-token TV; restricting to bins that carry mass keeps its noise small),
with a 95% interval [TV - e, TV + e] from the triangle inequality, e the 95% quantile of the
sampling error TV(O / N, theta) of the frequencies (parametric bootstrap). The plug-in is biased
upward by about 0.4 sqrt(bins / N) (0.01-0.04 at the default trials); the interval accounts for
that bias, so for a lossless verifier it contains 0 about 95% of the time at any vocabulary size
(tests/testing/test_stats.py). The verdict comes from the G-test, never from the interval.

Acceptance: a lossless verifier accepts with probability <= alpha* (the optimal-transport bound,
Hu et al., arXiv:2502.18779; docs/optimal.md). With K accepted of N, the p-value of
"rate <= alpha*" is P(Binomial(N, alpha*) >= K): a small value proves that the verifier cannot be
lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom, chi2

MIN_EXPECTED = 10.0  # smallest expected count of a G-test bin
TV_MIN_EXPECTED = 100.0  # smallest expected count of a bin of the TV effect size
BOOTSTRAP = 200  # resamples for the TV interval
ALPHA_TOL = 1e-9  # alpha* is computed to ~1e-12; rates within this are "at the bound"


@dataclass(frozen=True)
class LawTest:
    """Goodness of fit of emitted counts to an expected law.

    pvalue:  G-test p-value (0 when an impossible token was emitted).
    g: the G statistic; dof: degrees of freedom (bins - 1).
    tv, tv_low, tv_high: total variation over the bins and its 95% interval.
    impossible: how many emissions had expected probability 0.
    """

    pvalue: float
    g: float
    dof: int
    tv: float
    tv_low: float
    tv_high: float
    impossible: int


@dataclass(frozen=True)
class AcceptanceTest:
    """Observed acceptance rate vs the bound: rate, its standard error, alpha*, p-value."""

    rate: float
    stderr: float
    bound: float
    pvalue: float


def pool_bins(
    expected_probs: np.ndarray, trials: int, min_expected: float = MIN_EXPECTED, keep_short: bool = False
) -> np.ndarray:
    """Bin index of each category, [K] int64; -1 for categories of probability 0.

    Categories with trials * p >= min_expected get a bin each; the others, in increasing order
    of p, are merged greedily until each bin reaches min_expected; a last, short bin joins the
    previous one (or the least likely big bin when it is the only small one), unless
    ``keep_short`` (the TV effect size, which needs no minimum count for validity and would lose
    a deviation confined to the rare tokens by merging it into a big bin).
    """
    probs = np.asarray(expected_probs, dtype=np.float64)
    bins = np.full(probs.size, -1, dtype=np.int64)
    expected = trials * probs
    big = np.flatnonzero(expected >= min_expected)
    bins[big] = np.arange(big.size)
    small = np.flatnonzero((probs > 0) & (expected < min_expected))
    small = small[np.argsort(probs[small], kind="stable")]
    current, filled = big.size, 0.0
    for token in small:
        bins[token] = current
        filled += expected[token]
        if filled >= min_expected:
            current, filled = current + 1, 0.0
    if filled > 0 and not keep_short:  # the last small bin is short
        if current > big.size:
            bins[bins == current] = current - 1
        elif big.size:
            bins[bins == current] = bins[big[np.argmin(probs[big])]]
    return bins


def law_test(counts: np.ndarray, expected_probs: np.ndarray, rng: np.random.Generator) -> LawTest:
    """G-test of ``counts`` [K] against ``expected_probs`` [K] (pooled), with the TV interval."""
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(expected_probs, dtype=np.float64)
    trials = counts.sum()
    bins = pool_bins(probs, int(trials))
    impossible = int(counts[bins < 0].sum())
    nbins = int(bins.max()) + 1 if (bins >= 0).any() else 0
    observed = np.bincount(bins[bins >= 0], counts[bins >= 0], minlength=nbins)
    expected = np.bincount(bins[bins >= 0], probs[bins >= 0], minlength=nbins)
    tv, low, high = _effect_size(counts, probs, int(trials), rng)
    if impossible:
        return LawTest(0.0, float("inf"), max(nbins - 1, 0), tv, low, high, impossible)
    g = _g_statistic(observed, trials * expected)
    dof = nbins - 1
    pvalue = float(chi2.sf(g, dof)) if dof > 0 else 1.0
    return LawTest(pvalue, g, dof, tv, low, high, 0)


def _effect_size(counts, probs, trials, rng) -> tuple[float, float, float]:
    """TV over coarse bins (impossible emissions: one more bin of expected mass 0), with its
    95% interval."""
    bins = pool_bins(probs, trials, TV_MIN_EXPECTED, keep_short=True)
    nbins = int(bins.max()) + 1 if (bins >= 0).any() else 0
    observed = np.append(
        np.bincount(bins[bins >= 0], counts[bins >= 0], minlength=nbins), counts[bins < 0].sum()
    )
    expected = np.append(np.bincount(bins[bins >= 0], probs[bins >= 0], minlength=nbins), 0.0)
    freq = observed / trials
    tv = 0.5 * float(np.abs(freq - expected).sum())
    low, high = _tv_interval(freq, expected, trials, tv, rng)
    return tv, low, high


def _g_statistic(observed: np.ndarray, expected: np.ndarray) -> float:
    seen = observed > 0
    return float(2.0 * np.sum(observed[seen] * np.log(observed[seen] / expected[seen])))


def _tv_interval(freq, expected, trials, tv, rng) -> tuple[float, float]:
    """95% interval of the TV from the triangle inequality: [tv - e, tv + e] clipped to [0, 1].

    With theta the emitted (binned) law and theta_hat its frequencies [K],
    |TV(theta_hat, p) - TV(theta, p)| <= TV(theta_hat, theta), so the interval covers TV(theta, p)
    whenever the sampling error TV(theta_hat, theta) <= e. e is its 95% quantile, by parametric
    bootstrap: TV(theta*, theta_hat) with theta* ~ Multinomial(N, theta_hat) / N. Unlike a
    bootstrap of the plug-in around itself, it keeps 0 inside at p = theta, whatever the number
    of bins (the plug-in's upward bias is at most e).
    """
    resampled = rng.multinomial(trials, freq / freq.sum(), size=BOOTSTRAP) / trials  # [R, K]
    errors = 0.5 * np.abs(resampled - freq[None, :]).sum(axis=1)  # [R]
    margin = float(np.quantile(errors, 0.95))
    return float(np.clip(tv - margin, 0.0, 1.0)), float(np.clip(tv + margin, 0.0, 1.0))


def acceptance_test(accepted: int, trials: int, bound: float | None) -> AcceptanceTest:
    """One-sided binomial test of "acceptance rate <= bound" (p-value 1 when bound is None)."""
    rate = accepted / trials
    stderr = float(np.sqrt(max(rate * (1 - rate), 0.0) / trials))
    if bound is None or not np.isfinite(bound):
        return AcceptanceTest(rate, stderr, float("nan"), 1.0)
    level = min(1.0, bound + ALPHA_TOL)
    pvalue = 1.0 if level >= 1.0 else float(binom.sf(accepted - 1, trials, level))
    return AcceptanceTest(rate, stderr, float(bound), pvalue)
