"""Analysis cost of ``mdsd measure`` per 1,000 positions, from a filled logit cache.

Runs every (dataset, T = 0.7, n) work unit of the default sweep in this process (one thread) and
prints the process CPU seconds per 1,000 positions of each unit and of the whole analysis at
that temperature (all n, laws and verifiers, with the default seeded subsample). CPU time, not
wall time, so that a busy machine does not inflate it; divide by the workers for the wall time.
Then, on the subsampled positions of the code dataset, the exact rate of RRS without replacement
at n = 4 by the compiled draw-tree walk (the analysis' path) against its numpy reference, with
the ratio of the two CPU times measured in this run.

    python benchmarks/bench_measure_cost.py runs/measure-cache

The cache must hold the default sweep (``mdsd measure --cache runs/measure-cache``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mdsd._threads import torch_threads
from mdsd.experiments import analysis, capture
from mdsd.experiments.config import DEFAULT
from mdsd.verifiers.classic_math import rrs_wor_acceptance_tree, rrs_wor_acceptance_walk

TEMPERATURE = 0.7


def main(cache_root: str) -> None:
    config = DEFAULT.with_(temperatures=(TEMPERATURE,))
    cache_dir = capture.cache_dir_for(Path(cache_root), config)
    units = analysis.work_units(config, cache_dir)
    analysis.measure_unit(units[-1])  # compile the numba kernels before timing
    total_cpu, positions = 0.0, {}
    print(f"{'unit':<28} {'positions':>9} {'CPU s':>8} {'CPU s / 1k positions':>22}")
    for unit in sorted(units, key=lambda u: (u.positions.dataset, u.n)):
        start = time.process_time()
        analysis.measure_unit(unit)
        cpu = time.process_time() - start
        total_cpu += cpu
        positions[unit.positions.dataset] = unit.positions.count
        per_1k = 1000 * cpu / unit.positions.count
        print(f"{unit.label:<28} {unit.positions.count:>9} {cpu:>8.2f} {per_1k:>22.2f}")
    count = sum(positions.values())
    print(
        f"all n at T = {TEMPERATURE}: {count} positions, {total_cpu:.1f} CPU s, "
        f"{1000 * total_cpu / count:.1f} CPU s per 1,000 positions (width <= 2 x top-k = "
        f"{2 * (config.top_k or 0)} tokens)"
    )

    tree_walk_against_reference(config, units)


def tree_walk_against_reference(config, units, n: int = 4) -> None:
    """CPU ms per position of ``rrs_wor_acceptance_walk`` and ``rrs_wor_acceptance_tree``."""
    positions = next(u.positions for u in units if u.positions.dataset == "code")
    p, q = analysis.position_probs(positions)
    rows = analysis.subsample_rows(config, "code", TEMPERATURE, p.shape[0])
    rrs_wor_acceptance_walk(p[rows[0]], q[rows[0]], n)  # compile
    times, values = {}, {}
    for name, rate in (("reference", rrs_wor_acceptance_tree), ("walk", rrs_wor_acceptance_walk)):
        start = time.process_time()
        values[name] = [rate(p[r], q[r], n) for r in rows]
        times[name] = 1000 * (time.process_time() - start) / rows.size
    diff = max(abs(a - b) for a, b in zip(values["reference"], values["walk"]) if a is not None)
    print(
        f"rrs_without_replacement n = {n}, {rows.size} positions: reference {times['reference']:.1f} ms, "
        f"compiled walk {times['walk']:.2f} ms per position ({times['reference'] / times['walk']:.1f}x), "
        f"max |difference| {diff:.1e}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with torch_threads(1):
        main(sys.argv[1])
