"""Benchmark: early-exit ``mdsd.verify`` per position against the reference (output_law + draw).

Usage: python benchmarks/bench_verify.py [--vocab 32000] [--n 4] [--positions 200] [--repeats 3]

For every classic verifier and two temperatures, ``positions`` LLM-like pairs (p, q) (shared
Zipf-shaped logits plus independent noise, ``_common.llm_like_pair``, then both raised to 1 / T and
renormalised) with drafts drawn from the verifier's law. Per position, median over ``repeats`` of
a loop over the positions (one torch thread):

- fast:      ``mdsd.verify(p, q, x, verifier, check=False)``, one position per call (early exit);
- checked:   the same with ``check=True`` (the default: input checks included);
- checks:    the input checks alone (``mdsd.verifiers._prepare``);
- reference: ``categorical(output_law(p, q, x))`` on trusted rows (the pre-early-exit sampler);
- batched:   ``verifier.sample`` on all positions at once, per row;
- torch:     ``mdsd.verifiers.torch_api.verify(..., check=False)`` on CPU float64 tensors, one
             position per call, and all positions in one call (per row);
- cumsum:    one ``np.cumsum`` of a V-float64 row, the baseline of the ratios.

Also printed: the fraction of positions decided by the first test (branch 0) and the mean number
of tests before the exit. Ratios are same-run ratios against the cumsum and the reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import llm_like_pair, machine, print_table, timed  # noqa: E402

import mdsd  # noqa: E402
from mdsd.sampling import categorical  # noqa: E402
from mdsd.verifiers import (  # noqa: E402
    VERIFIERS,
    _prepare,
    torch_api,  # noqa: E402
)

TEMPERATURES = (0.7, 1.0)


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """probs ** (1 / T), renormalised (softmax of the logits divided by T)."""
    logits = np.log(probs) / temperature
    out = np.exp(logits - logits.max())
    return out / out.sum()


def positions(rng, vocab: int, count: int, temperature: float):
    pairs = [llm_like_pair(rng, vocab) for _ in range(count)]
    p = np.array([tempered(a, temperature) for a, _ in pairs])  # [P, V]
    q = np.array([tempered(b, temperature) for _, b in pairs])
    return p, q


def per_position(fn, count: int, repeats: int) -> float:
    """Median seconds per position of ``fn`` (a loop over ``count`` positions)."""
    return timed(fn, repeats)[0] / count


def bench_one(name, p, q, n_default, repeats, rng):
    verifier = VERIFIERS[name]
    law = mdsd.get_law(verifier.default_law)
    n = 2 if law.name == "spechub" else n_default
    x = law.sample(q, n, rng)  # [P, n]
    count = p.shape[0]
    rows = [(p[i], q[i], x[i]) for i in range(count)]
    trusted = [(p[i : i + 1], q[i : i + 1], x[i : i + 1]) for i in range(count)]
    gen = np.random.default_rng(1)

    def fast():
        for pi, qi, xi in rows:
            mdsd.verify(pi, qi, xi, name, rng=gen, check=False)

    def checked():
        for pi, qi, xi in rows:
            mdsd.verify(pi, qi, xi, name, rng=gen)

    def checks():
        for pi, qi, xi in rows:
            _prepare(pi, qi, xi, name, None, False)

    def reference():
        for pi, qi, xi in trusted:
            categorical(verifier.output_law(pi, qi, xi, law), gen)

    tp, tq, tx = torch.tensor(p), torch.tensor(q), torch.tensor(x)
    t_rows = [(tp[i], tq[i], tx[i]) for i in range(count)]
    generator = torch.Generator().manual_seed(1)

    def torch_single():
        for pi, qi, xi in t_rows:
            torch_api.verify(pi, qi, xi, name, generator=generator, check=False)

    def torch_batched():
        torch_api.verify(tp, tq, tx, name, generator=generator, check=False)

    uniforms = gen.random((count, verifier.uniforms_per_row(n)))
    _, branch = verifier.sample_with_branch(p, q, x, law, uniforms)
    tests = np.where(branch < verifier.uniforms_per_row(n) - 1, branch + 1, branch)
    fast()  # compile / warm up
    return {
        "n": n,
        "first": float(np.mean(branch == 0)),
        "tests": float(np.mean(tests)),
        "fast": per_position(fast, count, repeats),
        "checked": per_position(checked, count, repeats),
        "checks": per_position(checks, count, repeats),
        "reference": per_position(reference, count, repeats),
        "batched": timed(lambda: verifier.sample(p, q, x, law, gen), repeats)[0] / count,
        "torch": per_position(torch_single, count, repeats),
        "torch batched": timed(torch_batched, repeats)[0] / count,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--positions", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(2026)
    print(machine())
    print(f"numpy {np.__version__}, torch {torch.__version__}\n")
    row = rng.random(args.vocab)
    cumsum = timed(lambda: np.cumsum(row), 50)[0]
    print(f"one np.cumsum of a {args.vocab}-float64 row: {1e3 * cumsum:.3f} ms\n")
    table = []
    for temperature in TEMPERATURES:
        p, q = positions(rng, args.vocab, args.positions, temperature)
        for name in VERIFIERS:
            if name == "optimal":
                continue
            r = bench_one(name, p, q, args.n, args.repeats, rng)
            table.append(
                [
                    name,
                    f"{temperature:g}",
                    str(r["n"]),
                    f"{r['first']:.2f}",
                    f"{r['tests']:.2f}",
                    f"{1e3 * r['fast']:.3f}",
                    f"{r['fast'] / cumsum:.2f}",
                    f"{1e3 * r['checked']:.3f}",
                    f"{1e3 * r['checks']:.3f}",
                    f"{1e3 * r['reference']:.3f}",
                    f"{r['reference'] / r['fast']:.1f}",
                    f"{1e3 * r['batched']:.3f}",
                    f"{1e3 * r['torch']:.3f}",
                    f"{1e3 * r['torch batched']:.3f}",
                ]
            )
    print_table(
        [
            "verifier",
            "T",
            "n",
            "decided by test 1",
            "mean tests",
            "fast ms/pos",
            "fast / cumsum",
            "checked ms/pos",
            "checks alone ms",
            "reference ms/pos",
            "reference / fast",
            "batched ms/row",
            "torch ms/pos",
            "torch batched ms/row",
        ],
        table,
    )


if __name__ == "__main__":
    main()
