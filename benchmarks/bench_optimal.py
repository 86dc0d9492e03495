"""Benchmark of the optimal verifier: speed of fit + verification, and its gap to alpha*.

    /work/venv/bin/python benchmarks/bench_optimal.py [--positions 20] [--quick]

Inputs are synthetic LM-like pairs (``mdsd.io.random_pair``: target logits N(0, 3^2), draft logits
perturbed by N(0, 1.5^2)) at V = 8192 (and 32000 for the full-vocabulary timings), processed by
temperature T and optionally top-k = 64 (the same transform for p and q). The bundled model pair is
used instead when ``src/mdsd/data/models/target`` exists and ``--model`` is given.

Tables (markdown):
1. speed: median milliseconds of ``fit_optimal`` and of one ``output_law_from_fit`` call, and the
   split of the fit into its parts (sort, coverage curve Phi, target + staircase + peeling);
2. optimality: mean and max of alpha* - acceptance over positions (acceptance of the rule actually
   used: exact closed form for iid and for the without-replacement plan; Monte Carlo, 4096 draft
   sets, for the without-replacement fallback).
"""

from __future__ import annotations

import argparse
import time
import warnings
from functools import partial

import numpy as np

import mdsd
from mdsd.io import random_pair
from mdsd.verifiers import optimal as opt

TOP_K = 64


def timed(fn, repeats):
    """Median wall time of fn() in milliseconds, and its last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), out


def fit_parts(p, q, n, law, repeats):
    """Milliseconds of the fit's steps for one position: sort, Phi, target + peel."""
    the_law = mdsd.get_law(law)

    def sort():
        order = np.flatnonzero(q > 0)
        return order[np.argsort(-(p[order] / q[order]), kind="stable")]

    t_sort, order = timed(sort, repeats)
    t_phi, phi = timed(lambda: opt._coverage_curve(q[order], n, the_law), repeats)
    t_all, _ = timed(lambda: opt._fit_row(p, q, n, the_law), repeats)
    return t_sort, t_phi, max(t_all - t_sort - t_phi, 0.0)


def speed_table(args):
    rows = []
    cases = [("iid", 8192, TOP_K, n, 1.0) for n in (2, 4, 8)]
    cases += [("without_replacement", 8192, TOP_K, n, 1.0) for n in (2, 3)]
    if not args.quick:
        cases += [("iid", v, None, n, t) for v in (8192, 32000) for t in (0.7, 1.0)
                  for n in (2, 4, 8)]
        cases += [("without_replacement", v, None, 2, t) for v in (8192, 32000)
                  for t in (0.7, 1.0)]
    rng = np.random.default_rng(0)
    for law, vocab, top_k, n, temperature in cases:
        p, q = random_pair(vocab, seed=1, temperature=temperature, top_k=top_k)
        small = top_k is not None
        repeats = 200 if (small and (law == "iid" or n <= 2)) else 3
        drafts = mdsd.get_law(law).sample(q, n, rng)
        t_fit, fit = timed(partial(opt.fit_optimal, p, q, n, law), repeats)
        t_verify, _ = timed(partial(opt.output_law_from_fit, fit, drafts), 20 if small else 5)
        exact = law == "iid" or n <= 2
        parts = fit_parts(p, q, n, law, repeats) if exact else (np.nan,) * 3
        rows.append((law, vocab, top_k or "full", n, temperature, int(fit.support[0]), t_fit,
                     t_verify, t_fit + t_verify, *parts))
    print("\n### Speed (one position, one draft set; CPU)\n")
    print("| law | V | support | n | T | K | fit ms | verify ms | fit+verify ms "
          "| sort ms | Phi ms | target+peel ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]:.2f} | {r[7]:.3f} "
              f"| {r[8]:.2f} | {r[9]:.2f} | {r[10]:.2f} | {r[11]:.2f} |")


def gap_of(p, q, n, law):
    """(alpha*, acceptance of the rule used, method)."""
    fit = opt.fit_optimal(p, q, n, law)
    bound = mdsd.optimal_acceptance(p, q, n, law)
    if fit.method == "rrs_without_replacement":
        rate = mdsd.acceptance_rate(p, q, n, "optimal", law, method="monte_carlo", rng=0).rate
        return bound, rate, fit.method
    return bound, float(fit.acceptance[0]), fit.method


def optimality_table(args):
    print(f"\n### Optimality (alpha* - acceptance over {args.positions} synthetic positions, "
          f"V = 8192)\n")
    print("| law | support | T | n | method | mean alpha* | mean gap | max gap |")
    print("|---|---|---|---|---|---|---|---|")
    ns = (2, 3, 4, 8)
    for law in ("iid", "without_replacement"):
        for top_k in (TOP_K, None):
            if law == "without_replacement" and top_k is None and args.quick:
                continue
            for temperature in (0.3, 0.7, 1.0):
                for n in ns:
                    positions = args.positions
                    if law == "without_replacement" and (n > 2 or top_k is None):
                        positions = min(positions, args.fallback_positions)  # Monte Carlo
                    gaps, bounds, method = [], [], ""
                    for seed in range(positions):
                        p, q = random_pair(8192, seed=100 + seed, temperature=temperature,
                                           top_k=top_k)
                        bound, rate, method = gap_of(p, q, n, law)
                        gaps.append(bound - rate)
                        bounds.append(bound)
                    print(f"| {law} | {top_k or 'full'} | {temperature} | {n} | {method} "
                          f"| {np.mean(bounds):.4f} | {np.mean(gaps):.2e} | {np.max(gaps):.2e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=20)
    parser.add_argument("--fallback-positions", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="top-k timings and iid only")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning, once per fit
    speed_table(args)
    optimality_table(args)


if __name__ == "__main__":
    main()
