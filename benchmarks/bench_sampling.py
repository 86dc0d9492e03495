"""Draft sampling kernels against their numpy references, same run (BENCHMARKS.md, "Sampling").

    python benchmarks/bench_sampling.py [--repeats 2000]

Rows: ``mdsd.sampling.categorical`` (the compiled inverse CDF: a four-accumulator sum and a
blocked search) against ``np.cumsum`` + ``np.searchsorted`` of the same row; without-replacement
drafts (``WithoutReplacement.sample``: n compiled draws up to ``SEQUENTIAL_DRAWS_MAX``) against
the Gumbel-top-n path (``_sample_gumbel``); the sampling transform's softmax of a float32 logits
row at T = 0.7 (``mdsd.logits.process_logits_row``'s compiled ``tempered_softmax``) against the
numpy steps it replaced (float64 copy, division, max, shift, exp, sum, division); the transform's
top-50 of a float32 logits row (``mdsd.logits.top_k_indices``, compiled: block maxima bound the
50th value) against ``top_k_indices_reference`` (``np.argpartition``) of the same row; the
transform's top-p set (``mdsd._topp_numba.top_p_kept``, compiled: only the entries a histogram of
the mass leaves as candidates are sorted) against ``top_p_kept_reference`` (a stable
``np.argsort`` of the whole row) on softmax(logits / 0.7) of a peaked (3 x standard normal) and a
flat (1 x) row. Rows are Dirichlet(0.1) laws over V tokens (logits: 3 x standard normal);
medians of ``--repeats`` calls, microseconds, one thread.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np

from mdsd._softmax_numba import tempered_softmax
from mdsd._threads import set_threads
from mdsd._topp_numba import top_p_kept
from mdsd.laws import WithoutReplacement
from mdsd.logits import top_k_indices, top_k_indices_reference, top_p_kept_reference
from mdsd.sampling import categorical


def median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def cumsum_draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """The numpy inverse CDF (the engine's draw before the compiled one)."""
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), probs.size - 1)


def numpy_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The numpy steps of the row transform's softmax (before the compiled one)."""
    z = logits.astype(np.float64)
    z /= temperature
    z -= z.max()
    np.exp(z, out=z)
    z /= z.sum()
    return z


def row(name: str, vocab: int, n: int, fast_us: float, slow_us: float) -> str:
    return f"| {name} | {vocab} | {n} | {fast_us:.1f} | {slow_us:.1f} | {slow_us / fast_us:.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2000)
    args = ap.parse_args()
    set_threads(1)
    gen = np.random.default_rng(0)
    law = WithoutReplacement()
    rng, nucleus_gen = np.random.default_rng(1), np.random.default_rng(2)
    few = max(50, args.repeats // 10)
    print("| operation | V | n | mdsd us | reference us | reference / mdsd |")
    print("|---|---|---|---|---|---|")
    for vocab in (2048, 8192, 32000):
        probs = gen.dirichlet(np.full(vocab, 0.1))
        fast = median_us(partial(categorical, probs, rng), args.repeats)
        slow = median_us(partial(cumsum_draw, probs, rng), args.repeats)
        print(row("categorical (vs cumsum + searchsorted)", vocab, 1, fast, slow))
        logits = (3.0 * gen.standard_normal(vocab)).astype(np.float32)
        fast = median_us(partial(tempered_softmax, logits, 0.7), args.repeats)  # (probs, zeros)
        slow = median_us(partial(numpy_softmax, logits, 0.7), args.repeats)
        print(row("softmax of logits / T (vs numpy)", vocab, 1, fast, slow))
        fast = median_us(partial(top_k_indices, logits, 50), args.repeats)
        slow = median_us(partial(top_k_indices_reference, logits, 50), args.repeats)
        print(row("top-50 of logits (vs np.argpartition)", vocab, 1, fast, slow))
        for scale in (3.0, 1.0):
            nucleus_logits = (scale * nucleus_gen.standard_normal(vocab)).astype(np.float32)
            probs_row = tempered_softmax(nucleus_logits, 0.7)[0]
            kept = top_p_kept(probs_row, 0.95).size
            fast = median_us(partial(top_p_kept, probs_row, 0.95), args.repeats)
            slow = median_us(partial(top_p_kept_reference, probs_row, 0.95), few)
            print(row(f"top-p 0.95 set, {kept} kept (vs np.argsort)", vocab, 1, fast, slow))
        for n in (1, 2, 4, 8):
            fast = median_us(partial(law.sample, probs, n, rng), args.repeats)
            slow = median_us(partial(law._sample_gumbel, probs, n, rng), few)
            print(row("without_replacement draws (vs Gumbel-top-n)", vocab, n, fast, slow), flush=True)


if __name__ == "__main__":
    main()
