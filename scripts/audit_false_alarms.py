"""No false alarms: every mdsd verifier x exact law passes differently seeded audits.

Each audit has a family-wise false-positive rate <= 1e-4, so over S seeds x P pairs at most
S x P x 1e-4 false alarms are expected (0.03 for 20 x 14): every audit should pass.

    PYTHONPATH=src python scripts/audit_false_alarms.py --seeds 20
    PYTHONPATH=src python scripts/audit_false_alarms.py --seeds 20 --pairs optimal --seed-major
    PYTHONPATH=src python scripts/audit_false_alarms.py --seeds 20 --first-seed 6 --pairs optimal

One line per audit (pair, seed, verdict, smallest p-value, seconds), then one per pair
(passed / audits run, smallest p-value, seconds per audit). ``--seed-major`` runs seed 0 of every
pair, then seed 1, ...: a run stopped early has the same number of seeds for every pair.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import mdsd
from mdsd.testing import audit_verifier, verifier_fn


@dataclass
class PairTally:
    """Audits of one (law, verifier) pair so far."""

    passed: int = 0
    run: int = 0
    smallest: float = 1.0
    seconds: list[float] = field(default_factory=list)


def exact_pairs(selected: str | None) -> list[tuple[str, str]]:
    """(law, verifier) pairs of mdsd.VERIFIERS, the slowest (optimal's per-row sampling,
    conditional-Poisson draws) last; ``selected``: comma list of verifier names or law/verifier."""
    pairs = sorted((law, name) for name, v in mdsd.VERIFIERS.items() for law in v.laws)
    pairs.sort(key=lambda pair: (pair[1] == "optimal", pair[0] == "conditional_poisson"))
    if selected:
        wanted = {part.strip() for part in selected.split(",")}
        pairs = [(law, v) for law, v in pairs if v in wanted or f"{law}/{v}" in wanted]
        if not pairs:
            raise SystemExit(f"--pairs {selected!r} selects no (law, verifier) pair")
    return pairs


def audit_once(law: str, verifier: str, seed: int, sizes, trials) -> tuple[bool, float, float]:
    """(passed, smallest per-case p-value, seconds) of one audit; prints the summary on a loss."""
    n = 2 if law == "spechub" else 3
    start = time.perf_counter()
    result = audit_verifier(
        verifier_fn(verifier, law), law=law, n=n, batched=True, seed=seed,
        vocab_sizes=sizes, trials=trials,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    smallest = min([1.0] + [r.pvalue for r in result.rows if r.status != "skipped"])
    if not result.passed:
        print(result.summary(), flush=True)
    return result.passed, smallest, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed..seeds-1")
    parser.add_argument("--vocab-sizes", default="3,5,50,1000")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--pairs", default=None, help="comma list: verifier names or law/verifier")
    parser.add_argument("--seed-major", action="store_true", help="loop over seeds outside pairs")
    args = parser.parse_args()
    sizes = tuple(int(v) for v in args.vocab_sizes.split(","))
    pairs = exact_pairs(args.pairs)
    tallies = {pair: PairTally() for pair in pairs}
    order = (
        [(seed, pair) for seed in range(args.first_seed, args.seeds) for pair in pairs]
        if args.seed_major
        else [(seed, pair) for pair in pairs for seed in range(args.first_seed, args.seeds)]
    )
    for seed, (law, verifier) in order:
        passed, smallest, elapsed = audit_once(law, verifier, seed, sizes, args.trials)
        tally = tallies[(law, verifier)]
        tally.passed += passed
        tally.run += 1
        tally.smallest = min(tally.smallest, smallest)
        tally.seconds.append(elapsed)
        verdict = "passed" if passed else "LOSS"
        print(
            f"  {law}/{verifier} seed {seed}: {verdict}, smallest p {smallest:.2g}, {elapsed:.1f} s",
            flush=True,
        )
    for (law, verifier), tally in tallies.items():
        per_audit = sum(tally.seconds) / max(tally.run, 1)
        print(
            f"{law:>20} {verifier:>24}: {tally.passed}/{tally.run} passed, smallest p-value "
            f"{tally.smallest:.2g}, {per_audit:.1f} s per audit",
            flush=True,
        )
    print(f"false alarms: {sum(t.run - t.passed for t in tallies.values())}")


if __name__ == "__main__":
    main()
