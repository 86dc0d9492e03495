"""Benchmark of the optimal verifier: speed of fit + verification, and its gap to alpha*.

    python benchmarks/bench_optimal.py [--positions 20] [--full-positions 3] [--quick] [--model]
    python benchmarks/bench_optimal.py --decode-only [--decode-repeats 50]
    python benchmarks/bench_optimal.py --no-optimality   (speed and decoding-path tables only)
    python benchmarks/bench_optimal.py --full-profile    (V = 32,000 decoding path by parts)
    python benchmarks/bench_optimal.py --model-nodes [--positions 300]   (the bundled pair's nodes)
    python benchmarks/bench_optimal.py --norm-iterations [--positions 120]   (Wolfe's norms)
    python benchmarks/bench_optimal.py --peel [--positions 8]   (the peel against its reference)

Inputs are synthetic LM-like pairs (``mdsd.io.random_pair``: target logits N(0, 3^2), draft logits
perturbed by N(0, 1.5^2)) at V = 8192 (and 32000 for the full-vocabulary timings), processed by
temperature T and optionally top-k = 64 (the same transform for p and q). With ``--model`` the
optimality table uses real positions instead: the bundled model pair's logits at every token of
the first bundled prompts of each domain (V = 8192).

Tables (markdown):
1. speed: median milliseconds of ``fit_optimal`` and of one ``output_law_from_fit`` call, and the
   split of the threshold fit into its parts (the priority scan: sort, then Phi in one compiled
   pass; the compiled levels kernel: target, staircase, lumping, peel); for the priority-orders
   fit (without_replacement n >= 3, conditional_poisson) the number of Wolfe iterations instead;
1b. decoding path: median milliseconds of ``OptimalVerifier.sample`` for one position (fit +
   sample, what the engine calls per tree node) and of the reference ``Verifier.sample`` (fit,
   output law, categorical draw) in the same run, with their ratio, ``np.argsort`` of the
   vocabulary as a yardstick for the machine's load (medians of this process's CPU time), and
   the minor page faults per ``sample`` call. A fit at V = 32,000 allocates a few MB of arrays;
   glibc returns freed heap to the system above a threshold that grows with the largest buffer
   the process has freed, so a fresh process such as this one may fault those pages in again
   on every call (~1-2 ms here), where a process that has freed a model-sized buffer does not;
1c. ``--model-nodes``: the decoding path on the bundled pair's positions (top-k 50, as in the
   decoding benchmarks), each node as the engine verifies it (p and q on the union of their
   supports, drafts drawn from q): mean, median and 90th percentile of ``OptimalVerifier.sample``
   against the law's natural verifier (rrs / rrs_without_replacement) on the same nodes. Real
   positions are harder than the synthetic ones: where p's mass on q's support is coverable
   (alpha* = p(supp q)), Wolfe's loop takes tens to hundreds of iterations on H*;
1d. ``--norm-iterations``: Wolfe's iterations on H* (the block that takes them) with each of
   the norms 1/q and plain, from the scan order with the short budget
   (``orders.ORDER_SHORT_BUDGET``), and the share of positions certified within it, on the bundled
   pair's positions (top-k 50) and on synthetic top-64 rows: what ``orders.PLAIN_FIRST_NORMS``
   rests on;
1e. ``--peel``: the threshold fit's peel (``threshold._peel``, the compiled kernel) against
   ``threshold._peel_reference`` (numpy, the rescaled remainder interval by interval) on the same
   lumped target curves, whole vocabularies: synthetic rows (V = 32,000) and the bundled pair's
   positions (every fourth of the first ``4 * --positions``; V = 8192, no top-k); units (lumped
   positions), cuts, CPU milliseconds of each, their ratio, and the largest distance of each
   one's rule mass from the target curve's increments;
2. optimality: mean and max of alpha* - acceptance over positions (acceptance of the rule actually
   used: exact for ``threshold`` and ``orders``; Monte Carlo, 4096 draft sets, for a fallback),
   and the median fit time. Full-vocabulary ``orders`` fits (without_replacement n >= 3,
   conditional_poisson) take seconds each, so they run on the first ``--full-positions``
   positions per temperature only.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time
import warnings
from functools import partial

import numpy as np

import mdsd
from mdsd.io import random_pair
from mdsd.logits import process_logits
from mdsd.verifiers import optimal as opt
from mdsd.verifiers.base import Verifier
from mdsd.verifiers.optimal import orders, threshold
from mdsd.verifiers.optimal.common import priority_order, priority_scan

TOP_K = 64


def timed(fn, repeats, clock=time.perf_counter):
    """Median time of fn() in milliseconds (wall clock, or the given clock), and its last result."""
    times, out = [], None
    for _ in range(repeats):
        start = clock()
        out = fn()
        times.append(clock() - start)
    return 1e3 * float(np.median(times)), out


def fit_parts(p, q, n, law, repeats):
    """Milliseconds of the threshold fit's steps for one position: the priority scan (sort, Phi)
    and the compiled levels kernel (target, staircase, lumping, peel)."""
    the_law = mdsd.get_law(law)
    t_scan, scan = timed(lambda: priority_scan(p, q, n, the_law), repeats)
    args = (scan.target_probs, scan.draft_probs, scan.phi, scan.split)
    t_levels, _ = timed(lambda: threshold._fit_levels(*args), repeats)
    return t_scan, t_levels


def decode_table(args):
    """Fit + sample of one position (``OptimalVerifier.sample``, the engine's per-node call)
    against the reference path (``Verifier.sample``: fit, output law, one categorical draw) and
    a same-run ``np.argsort`` of the vocabulary (machine-load yardstick)."""
    verifier = mdsd.get_verifier("optimal")
    cases = [(law, n) for law, ns in DECODE_CASES.items() for n in ns]
    rows = []
    for vocab, top_k in ((8192, TOP_K), (32000, None)):
        for law, n in cases:
            if top_k is None and opt.verifier.method_for(mdsd.get_law(law), n, vocab) != "threshold":
                continue  # full-vocabulary orders fits: seconds, see the speed table
            for temperature in (0.7, 1.0):
                p, q = random_pair(vocab, seed=1, temperature=temperature, top_k=top_k)
                the_law = mdsd.get_law(law)
                rng = np.random.default_rng(0)
                x = the_law.sample(q, n, rng)[None]
                inputs = (p[None], q[None], x, the_law, rng)
                repeats = args.decode_repeats if top_k else max(3, args.decode_repeats // 10)
                cpu = {"clock": time.process_time}  # this process's CPU time: a shared machine
                verifier.sample(*inputs)  # warm-up (numba's compiled kernels load once)
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t_sample, _ = timed(partial(verifier.sample, *inputs), repeats, **cpu)
                faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats
                t_reference, _ = timed(partial(Verifier.sample, verifier, *inputs), repeats, **cpu)
                t_sort, _ = timed(partial(np.argsort, p), repeats, **cpu)
                rows.append(
                    (law, vocab, top_k or "full", n, temperature, t_sample, t_reference, t_sort, faults)
                )
    print("\n### Decoding path: fit + sample of one position (OptimalVerifier.sample; CPU ms)\n")
    print(
        "| law | V | support | n | T | sample ms | reference ms | reference / sample "
        "| argsort(V) ms | sample / argsort | page faults / sample |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for law, vocab, support, n, temperature, t_sample, t_reference, t_sort, faults in rows:
        print(
            f"| {law} | {vocab} | {support} | {n} | {temperature} | {t_sample:.3f} | {t_reference:.3f} "
            f"| {t_reference / t_sample:.1f} | {t_sort:.3f} | {t_sample / t_sort:.1f} | {faults:.0f} |",
            flush=True,
        )


DECODE_CASES = {"iid": (2, 4, 8), "without_replacement": (2, 3, 4, 8, 12, 16), "conditional_poisson": (2, 4)}
MODEL_NODE_CASES = (
    ("iid", 3, "rrs"),
    ("without_replacement", 2, "rrs_without_replacement"),
    ("without_replacement", 3, "rrs_without_replacement"),
    ("without_replacement", 4, "rrs_without_replacement"),
    ("without_replacement", 8, "rrs_without_replacement"),
    ("conditional_poisson", 2, "sample_check"),
    ("conditional_poisson", 4, "sample_check"),
)


def model_nodes_table(args):
    """Per-node sampling time on the bundled pair's positions (top-k 50), optimal against the
    law's natural verifier, each on the union of the supports of p and q (the engine's form)."""
    target, draft = model_logits(args.positions, args.draft)
    optimal = mdsd.get_verifier("optimal")
    print("\n### Decoding path on the bundled pair's positions (top-k 50; wall ms per node)\n")
    print(
        "| law | n | T | nodes | optimal mean | median | p90 | natural verifier | mean | median "
        "| optimal / natural (means) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for temperature in (0.7, 1.0):
        rows = [
            (process_logits(t, temperature, 50), process_logits(d, temperature, 50))
            for t, d in zip(target, draft)
        ]
        for law, n, natural_name in MODEL_NODE_CASES:
            the_law, natural = mdsd.get_law(law), mdsd.get_verifier(natural_name)
            rng = np.random.default_rng(0)
            times = {"optimal": [], "natural": []}
            for p, q in rows:
                support = np.flatnonzero((p > 0) | (q > 0))
                p_local, q_local = p[support][None], q[support][None]
                if np.count_nonzero(q_local) < n:
                    continue
                x = the_law.sample(q_local[0], n, rng)[None]
                for name, verifier in (("optimal", optimal), ("natural", natural)):
                    verifier.sample(p_local, q_local, x, the_law, rng)  # warm-up
                    start = time.perf_counter()
                    verifier.sample(p_local, q_local, x, the_law, rng)
                    times[name].append(1e3 * (time.perf_counter() - start))
            opt_ms, nat_ms = np.array(times["optimal"]), np.array(times["natural"])
            optimal_cells = f"{opt_ms.mean():.3f} | {np.median(opt_ms):.3f} | {np.percentile(opt_ms, 90):.3f}"
            natural_cells = f"{natural_name} | {nat_ms.mean():.3f} | {np.median(nat_ms):.3f}"
            print(
                f"| {law} | {n} | {temperature} | {opt_ms.size} | {optimal_cells} | {natural_cells} "
                f"| {opt_ms.mean() / nat_ms.mean():.1f} |",
                flush=True,
            )


NORM_CASES = (
    ("without_replacement", 3),
    ("without_replacement", 4),
    ("conditional_poisson", 2),
    ("conditional_poisson", 4),
)


def h_star_iterations(p, q, n, law, norm):
    """(Wolfe iterations on H*, certified) for one position [K] with the norm "q" or "plain",
    from the scan order with the short budget, as ``orders._order_mixture`` runs its first try;
    None where H* is empty."""
    from mdsd.verifiers.optimal.priority_orders import MATCH_TOLERANCE, decompose_compiled

    scan = priority_scan(p, q, n, law, curve=False)
    ps, qs, split = scan.target_probs, scan.draft_probs, scan.split
    zeros = orders.zero_tail(ps, split)
    covered, tail = np.arange(split, ps.size - zeros), np.arange(ps.size - zeros, ps.size)
    if covered.size == 0:
        return None
    target = ps[covered]
    mix = decompose_compiled(
        law, qs / qs.sum(), n, tail, covered, np.arange(split), target, np.arange(covered.size),
        scale=np.sqrt(qs[covered]) if norm == "q" else None, side="above",
        max_iter=max(orders.ORDER_SHORT_BUDGET, covered.size // 8),
    )  # fmt: skip
    return mix.iterations, np.maximum(target - mix.mass, 0.0).sum() <= MATCH_TOLERANCE


def norm_rows(source: str, temperature: float, logits) -> list:
    """[(p, q)] of one source at one temperature: the bundled pair's positions at top-k 50, or 60
    synthetic top-64 rows."""
    if logits is None:
        return [random_pair(8192, seed=100 + s, temperature=temperature, top_k=TOP_K) for s in range(60)]
    return [(process_logits(t, temperature, 50), process_logits(d, temperature, 50)) for t, d in zip(*logits)]


def norm_iterations_table(args):
    """Wolfe's iterations on H* by norm, on the bundled pair's positions and synthetic rows."""
    sources = {
        "bundled pair, top-k 50": model_logits(args.positions, args.draft),
        "synthetic, top-k 64": None,
    }
    print("\n### Wolfe's iterations on H* by norm (short budget; mean, share certified)\n")
    print("| positions | law | n | T | rows | 1/q norm | plain norm |")
    print("|---|---|---|---|---|---|---|")
    for (source, logits), (law_name, n), temperature in itertools.product(
        sources.items(), NORM_CASES, (0.7, 1.0)
    ):
        law = mdsd.get_law(law_name)
        cells = {"q": [], "plain": []}
        for p, q in norm_rows(source, temperature, logits):
            support = np.flatnonzero((p > 0) | (q > 0))
            if np.count_nonzero(q) <= n:
                continue
            for norm, results in cells.items():
                result = h_star_iterations(p[support], q[support], n, law, norm)
                if result is not None:
                    results.append(result)
        stats = [np.array(v, dtype=float) for v in cells.values()]
        text = " | ".join(f"{v[:, 0].mean():.1f} ({v[:, 1].mean():.3f})" for v in stats)
        print(f"| {source} | {law_name} | {n} | {temperature} | {len(stats[0])} | {text} |", flush=True)


def full_profile_table(args):
    """The full-vocabulary decoding path (V = 32,000: iid n = 4, without_replacement n = 2) split
    into its parts, CPU-time medians of this process: ``OptimalVerifier.sample`` (fit + sample),
    the priority scan (the order, then Phi in one compiled pass) and of it the order alone (a sort
    of the support), the compiled levels kernel (target, staircase, lumping, peel) with the number
    of cuts it places, the sampling from a fitted row; ``np.argsort`` and ``np.cumsum`` of the
    vocabulary as yardsticks."""
    verifier = mdsd.get_verifier("optimal")
    repeats = max(5, args.decode_repeats // 5)
    print("\n### Full vocabulary: the decoding path by parts (CPU ms)\n")
    print(
        "| law | n | T | sample ms | priority scan ms | order ms | levels ms | cuts | sample row ms "
        "| argsort ms | cumsum ms | sample / argsort |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for law, n in (("iid", 4), ("without_replacement", 2)):
        for temperature in (0.7, 1.0):
            p, q = random_pair(32000, seed=1, temperature=temperature)
            the_law = mdsd.get_law(law)
            rng = np.random.default_rng(0)
            x = the_law.sample(q, n, rng)
            scan = priority_scan(p, q, n, the_law)
            ps, qs = scan.target_probs, scan.draft_probs
            row = threshold.fit_threshold_row(p, q, n, the_law)
            cpu = {"clock": time.process_time}
            parts = [
                partial(verifier.sample, p[None], q[None], x[None], the_law, rng),
                partial(priority_scan, p, q, n, the_law),
                partial(priority_order, p, q),
                partial(threshold._fit_levels, ps, qs, scan.phi, scan.split),
                partial(threshold.sample_threshold_row, row, p, x, rng),
                partial(np.argsort, p),
                partial(np.cumsum, p),
            ]
            ms = [timed(fn, repeats, **cpu)[0] for fn in parts]
            cuts = int(np.count_nonzero(row.levels < 1.0))  # boundaries some rule cuts at
            print(
                f"| {law} | {n} | {temperature} | " + " | ".join(f"{t:.3f}" for t in ms[:4]) + f" | {cuts} "
                f"| {ms[4]:.3f} | {ms[5]:.3f} | {ms[6]:.3f} | {ms[0] / ms[5]:.1f} |",
                flush=True,
            )


def peel_table(args):
    """The peel (compiled) against its numpy reference on the same lumped curves (table 1e)."""
    cases = []
    for temperature in (0.7, 1.0):
        p, q = random_pair(32000, seed=1, temperature=temperature)
        cases += [(f"synthetic V=32000 T={temperature}", p, q)]
    target_logits, draft_logits = model_logits(4 * args.positions, args.draft)
    for temperature in (0.7, 1.0):
        for i in range(0, 4 * args.positions, 4):  # every fourth position of the first prompts
            t, d = target_logits[i], draft_logits[i]
            p, q = process_logits(t, temperature), process_logits(d, temperature)
            cases += [(f"bundled pair position {i} T={temperature}", p, q)]
    print("\n### The peel against its reference (CPU ms, whole vocabularies)\n")
    print(
        "| row | law | n | units | cuts | peel ms | reference ms | reference / peel "
        "| mass error | reference's |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    cpu = {"clock": time.process_time}
    for label, p, q in cases:
        for law, n in (("iid", 4), ("without_replacement", 2), ("without_replacement", 3)):
            scan = priority_scan(p, q, n, mdsd.get_law(law))
            _, (qs, phi, target) = threshold._lumped_curve(
                scan.target_probs, scan.draft_probs, scan.phi, scan.split
            )
            t_peel, (levels, rate) = timed(partial(threshold._peel, qs, phi, target), 3, **cpu)
            t_ref, (_, ref_rate) = timed(partial(threshold._peel_reference, qs, phi, target), 1, **cpu)
            error = np.abs(rate * qs - np.diff(target)).max()
            ref_error = np.abs(ref_rate * qs - np.diff(target)).max()
            print(
                f"| {label} | {law} | {n} | {qs.size} | {np.count_nonzero(levels < 1)} | {t_peel:.3f} "
                f"| {t_ref:.1f} | {t_ref / t_peel:.0f} | {error:.1e} | {ref_error:.1e} |",
                flush=True,
            )


def speed_table(args):
    rows = []
    cases = [("iid", 8192, TOP_K, n, 1.0) for n in (2, 4, 8)]
    cases += [("without_replacement", 8192, TOP_K, n, t) for n in (2, 3, 4, 8) for t in (0.7, 1.0)]
    cases += [("conditional_poisson", 8192, TOP_K, n, 1.0) for n in (2, 4)]
    cases += [("without_replacement", 8192, k, 4, 1.0) for k in (128, 256)]
    if not args.quick:
        cases += [("iid", v, None, n, t) for v in (8192, 32000) for t in (0.7, 1.0) for n in (2, 4, 8)]
        cases += [("without_replacement", v, None, 2, t) for v in (8192, 32000) for t in (0.7, 1.0)]
        cases += [
            (law, v, None, 4, t)
            for law in ("without_replacement", "conditional_poisson")
            for v in (8192, 32000)
            for t in (0.7, 1.0)
        ]
    rng = np.random.default_rng(0)
    for law, vocab, top_k, n, temperature in cases:
        p, q = random_pair(vocab, seed=1, temperature=temperature, top_k=top_k)
        small = top_k is not None
        drafts = mdsd.get_law(law).sample(q, n, rng)
        t_fit, fit = timed(partial(opt.fit_optimal, p, q, n, law), 1)
        is_threshold = fit.method == "threshold"
        repeats = 200 if (small and is_threshold) else 50 if small and top_k == TOP_K else 5
        if small or is_threshold:  # a full-vocabulary orders fit (seconds): the one run above
            t_fit, fit = timed(partial(opt.fit_optimal, p, q, n, law), repeats)
        t_verify, _ = timed(partial(opt.output_law_from_fit, fit, drafts), 20 if small else 5)
        if is_threshold:
            parts = "{:.2f} / {:.2f}".format(*fit_parts(p, q, n, law, repeats))
        else:
            row = orders.fit_orders_row(p, q, n, mdsd.get_law(law))
            parts = f"Wolfe iterations L {row.low.iterations} + H* {row.high.iterations}"
        rows.append(
            (
                law,
                vocab,
                top_k or "full",
                n,
                temperature,
                int(fit.support[0]),
                fit.method,
                t_fit,
                t_verify,
                t_fit + t_verify,
                parts,
            )
        )
    print("\n### Speed (one position, one draft set; CPU)\n")
    print(
        "| law | V | support | n | T | K | method | fit ms | verify ms | fit+verify ms "
        "| scan / levels kernel ms (threshold) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} | {r[7]:.2f} "
            f"| {r[8]:.3f} | {r[9]:.2f} | {r[10]} |"
        )


def gap_of(p, q, n, law):
    """(alpha*, acceptance of the rule used, method, fit seconds)."""
    start = time.perf_counter()
    fit = opt.fit_optimal(p, q, n, law)
    seconds = time.perf_counter() - start
    bound = mdsd.optimal_acceptance(p, q, n, law)
    if fit.method not in ("threshold", "orders"):  # a fallback: its exact rate, else Monte Carlo
        result = mdsd.acceptance_rate(p, q, n, "optimal", law, method="auto", rng=0)
        if result.method != "closed_form":
            result = mdsd.acceptance_rate(p, q, n, "optimal", law, method="monte_carlo", rng=0)
        return bound, result.rate, fit.method, seconds
    return bound, float(fit.acceptance[0]), fit.method, seconds


def model_logits(count: int, draft_model: str | None = None):
    """Logits (target [count, V], draft [count, V]) of the bundled pair (``draft_model``: another
    draft, e.g. ``mdsd-bundled/draft-distilled``) at every token of the first bundled prompts,
    alternating domains, until ``count`` positions."""
    import torch

    from mdsd.models import bundled_domains, bundled_prompts, load_pair

    pair = load_pair(draft=draft_model)
    by_domain = [bundled_prompts(d) for d in bundled_domains()]
    target, draft, have = [], [], 0
    for i in range(max(len(rows) for rows in by_domain)):
        for rows in by_domain:
            if have >= count or i >= len(rows):
                continue
            ids = pair.tokenizer(rows[i]["prompt"], return_tensors="pt").input_ids[:, :64]
            with torch.no_grad():
                target.append(pair.target(ids).logits[0].double().numpy())
                draft.append(pair.draft(ids).logits[0].double().numpy())
            have += ids.shape[1]
    return np.concatenate(target)[:count], np.concatenate(draft)[:count]


def positions_of(args, temperature, top_k, seed_base=100):
    """[(p, q)] at one temperature / top-k: synthetic pairs, or the bundled pair's positions."""
    if args.model:
        target, draft = args.model_logits
        return [
            (process_logits(t, temperature, top_k), process_logits(d, temperature, top_k))
            for t, d in zip(target, draft)
        ]
    return [
        random_pair(8192, seed=seed_base + seed, temperature=temperature, top_k=top_k)
        for seed in range(args.positions)
    ]


def optimality_table(args):
    source = "positions of the bundled model pair" if args.model else "synthetic positions"
    print(f"\n### Optimality (alpha* - acceptance over {args.positions} {source}, V = 8192)\n")
    print("| law | support | T | n | method | positions | mean alpha* | mean gap | max gap | median fit ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for law in args.laws:
        for top_k in (TOP_K, None):
            if law != "iid" and top_k is None and args.quick:
                continue
            for temperature in (0.3, 0.7, 1.0):
                pairs = positions_of(args, temperature, top_k)
                for n in (2, 3, 4, 8):
                    costly = law != "iid" and top_k is None and (law == "conditional_poisson" or n > 2)
                    used = pairs[: args.full_positions] if costly else pairs
                    gaps, bounds, methods, times = [], [], set(), []
                    for p, q in used:
                        bound, rate, method, seconds = gap_of(p, q, n, law)
                        times.append(seconds)
                        gaps.append(bound - rate)
                        bounds.append(bound)
                        methods.add(method)
                    print(
                        f"| {law} | {top_k or 'full'} | {temperature} | {n} "
                        f"| {'+'.join(sorted(methods))} | {len(used)} | {np.mean(bounds):.4f} "
                        f"| {np.mean(gaps):.2e} | {np.max(gaps):.2e} "
                        f"| {1e3 * np.median(times):.1f} |",
                        flush=True,
                    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=20)
    parser.add_argument(
        "--full-positions",
        type=int,
        default=3,
        help="positions per T for full-vocabulary orders fits (seconds each)",
    )
    parser.add_argument("--quick", action="store_true", help="top-k timings and iid only")
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="only the decoding-path table (fit + sample against the reference path)",
    )
    parser.add_argument("--decode-repeats", type=int, default=50, help="runs per decoding-path row (top-k)")
    parser.add_argument("--no-optimality", action="store_true", help="skip the optimality table")
    parser.add_argument(
        "--full-profile",
        action="store_true",
        help="only the V = 32,000 decoding path split into its parts (~20 s)",
    )
    parser.add_argument("--laws", nargs="+", default=["iid", "without_replacement", "conditional_poisson"])
    parser.add_argument(
        "--model-nodes",
        action="store_true",
        help="only the per-node decoding path on the bundled pair's positions (top-k 50)",
    )
    parser.add_argument(
        "--norm-iterations",
        action="store_true",
        help="only Wolfe's iterations on H* by norm (the bundled pair's positions and synthetic rows)",
    )
    parser.add_argument(
        "--peel",
        action="store_true",
        help="only the peel against its reference on whole vocabularies (synthetic and the bundled pair)",
    )
    parser.add_argument(
        "--draft",
        help="with --model / --model-nodes / --norm-iterations: the draft (default: the bundled draft)",
    )
    parser.add_argument(
        "--model",
        action="store_true",
        help="optimality on the bundled pair's positions (skips the speed table)",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning, once per fit
    if args.decode_only:
        decode_table(args)
        return
    if args.full_profile:
        full_profile_table(args)
        return
    if args.model_nodes:
        model_nodes_table(args)
        return
    if args.norm_iterations:
        norm_iterations_table(args)
        return
    if args.peel:
        peel_table(args)
        return
    if args.model:
        args.model_logits = model_logits(args.positions, args.draft)
    else:
        speed_table(args)
        decode_table(args)
    if not args.no_optimality:
        optimality_table(args)


if __name__ == "__main__":
    main()
