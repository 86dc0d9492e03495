"""Benchmark: the draws of a token-level audit case (one position repeated for many draft sets).

Usage: python benchmarks/bench_audit_draws.py [--rows 2000] [--vocab 50,1000] [--repeats 3]

An audit case (``mdsd.testing.audit_verifier``) draws ``rows`` draft sets for one (p, q) and runs
the verifier on all of them: every row of the batch is the same position. Per vocabulary size, on
an LLM-like pair (``_common.llm_like_pair``), median wall time over ``repeats`` of

- cp batched:    ``ConditionalPoisson.sample`` of n = 3 (one DP per run of equal rows, one pass
                 over the tokens for all rows) against its reference, the token-by-token
                 ``_sample_row`` per row (timed on rows / 20 rows and scaled);
- wor partition: ``WithoutReplacement.sample`` of n = 3 (top-n Gumbel keys by argpartition)
                 against a full stable argsort of the same keys;
- optimal reuse: ``OptimalVerifier.sample`` (iid, n = 3), which fits a run of equal rows once,
                 against the same rows made distinct by a 1e-12 relative jitter of p (one fit per
                 row, as before the reuse).

Ratios are same-run ratios (reference / fast).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import llm_like_pair, machine, print_table, timed  # noqa: E402

import mdsd  # noqa: E402
from mdsd.laws import get_law  # noqa: E402


def cp_times(q, rows, repeats):
    law = get_law("conditional_poisson")
    batch = np.broadcast_to(q, (rows, q.size))
    fast, _ = timed(lambda: law.sample(batch, 3, np.random.default_rng(0)), repeats)
    few = max(1, rows // 20)
    rng = np.random.default_rng(0)
    slow, _ = timed(lambda: [law._sample_row(q, 3, rng) for _ in range(few)], repeats)
    return fast, slow * rows / few


def wor_times(q, rows, repeats):
    law = get_law("without_replacement")
    batch = np.broadcast_to(q, (rows, q.size))

    def full_sort():
        rng = np.random.default_rng(0)
        with np.errstate(divide="ignore"):
            keys = np.log(batch) + rng.gumbel(size=batch.shape)
        return np.argsort(-keys, axis=-1, kind="stable")[..., :3]

    fast, _ = timed(lambda: law.sample(batch, 3, np.random.default_rng(0)), repeats)
    slow, _ = timed(full_sort, repeats)
    return fast, slow


def optimal_times(p, q, rows, repeats):
    verifier, law = mdsd.VERIFIERS["optimal"], get_law("iid")
    pb, qb = np.broadcast_to(p, (rows, p.size)), np.broadcast_to(q, (rows, q.size))
    drafts = law.sample(qb, 3, np.random.default_rng(1))
    jitter = 1.0 + 1e-12 * np.arange(rows)[:, None]  # distinct rows: one fit each
    distinct = pb * jitter / (pb * jitter).sum(axis=1, keepdims=True)
    verifier.sample(distinct[:2], qb[:2], drafts[:2], law, np.random.default_rng(0))  # warm-up (compiles)
    fast, _ = timed(lambda: verifier.sample(pb, qb, drafts, law, np.random.default_rng(0)), repeats)
    slow, _ = timed(lambda: verifier.sample(distinct, qb, drafts, law, np.random.default_rng(0)), repeats)
    return fast, slow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--vocab", default="50,1000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    print(f"rows = {args.rows}, repeats = {args.repeats}\n")
    table = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        p, q = llm_like_pair(np.random.default_rng(vocab), vocab)
        for name, (fast, slow) in (
            ("cp batched", cp_times(q, args.rows, args.repeats)),
            ("wor partition", wor_times(q, args.rows, args.repeats)),
            ("optimal reuse", optimal_times(p, q, args.rows, args.repeats)),
        ):
            table.append([name, str(vocab), f"{fast * 1e3:.1f}", f"{slow * 1e3:.1f}", f"{slow / fast:.1f}x"])
    print_table(["draws", "V", "fast ms", "reference ms", "ratio"], table)


if __name__ == "__main__":
    main()
