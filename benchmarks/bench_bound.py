"""Benchmark: alpha* (``optimal_acceptance``) at LLM vocabularies, against np.argsort in the same run.

Usage: python benchmarks/bench_bound.py [--repeats 7] [--no-check] [--batch 64]

Prints a markdown table: operation, V, n, B, median wall time per (p, q) pair, median CPU time,
ratio to one np.argsort of a V-vector timed interleaved in the same run (wall and CPU), and the
max error against the plain reference (without_replacement: the Python-loop race quadrature at a
fine step over every prefix; iid / greedy / spechub: the stable-sort scan and closed forms).
The machine may be shared: the CPU-time column is the process's own time, the ratio columns
compare like with like. With CUDA, the race quadrature is also timed on the GPU (device="cuda").
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
from mdsd.bound import scan_reference  # noqa: E402

REFERENCE_STEP = 0.2  # reference quadrature step for the error column (~1e-15 at n <= 8)


def reference_alpha(p, q, n, law):
    return scan_reference(p, q, n, law, step=REFERENCE_STEP)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-check", action="store_true", help="skip the (slow) reference errors")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(2026)
    print(machine())
    print(f"numpy {np.__version__}, torch {torch.__version__}, CUDA {torch.cuda.is_available()}\n")

    cases = [("without_replacement", 32000, 8), ("without_replacement", 32000, 4),
             ("without_replacement", 128000, 8), ("iid", 32000, 8), ("iid", 128000, 8),
             ("greedy", 32000, 8), ("spechub", 32000, 2)]
    rows = []
    for law, vocab, n in cases:
        pairs = [llm_like_pair(rng, vocab) for _ in range(3)]
        keys = rng.random(vocab)
        wall, cpu, base_wall, base_cpu = [], [], [], []
        for p, q in pairs:
            w, c = timed(lambda: mdsd.optimal_acceptance(p, q, n, law), args.repeats)  # noqa: B023 (called at once)
            bw, bc = timed(lambda: np.argsort(keys), max(args.repeats, 21))  # noqa: B023 (called at once)
            wall.append(w), cpu.append(c), base_wall.append(bw), base_cpu.append(bc)
        check = not args.no_check and (law != "without_replacement" or vocab <= 32000)
        error = max(abs(mdsd.optimal_acceptance(p, q, n, law) - reference_alpha(p, q, n, law))
                    for p, q in pairs[:1]) if check else float("nan")
        w, c, bw, bc = (float(np.median(x)) for x in (wall, cpu, base_wall, base_cpu))
        rows.append([f"optimal_acceptance {law}", str(vocab), str(n), "1", f"{1e3 * w:.2f}",
                     f"{1e3 * c:.2f}", f"{1e3 * bw:.3f}", f"{w / bw:.1f}", f"{c / bc:.1f}",
                     "-" if np.isnan(error) else f"{error:.1e}"])
        if law == "without_replacement" and torch.cuda.is_available():
            p, q = pairs[0]
            mdsd.optimal_acceptance(p, q, n, law, device="cuda")  # warm-up
            gw, gc = timed(lambda: mdsd.optimal_acceptance(p, q, n, law, device="cuda"), args.repeats)  # noqa: B023 (called at once)
            gpu_error = abs(mdsd.optimal_acceptance(p, q, n, law, device="cuda")
                            - mdsd.optimal_acceptance(p, q, n, law))
            rows.append([f"optimal_acceptance {law} (cuda)", str(vocab), str(n), "1",
                         f"{1e3 * gw:.2f}", f"{1e3 * gc:.2f}", f"{1e3 * bw:.3f}", f"{gw / bw:.1f}",
                         f"{gc / bc:.1f}", f"{gpu_error:.1e} vs cpu"])
        # batched input: per-row cost of a [B, V] call vs one row
        if vocab == 32000 and n in (2, 8):
            batch = args.batch if law != "without_replacement" else max(8, args.batch // 8)
            more = [llm_like_pair(rng, vocab) for _ in range(batch)]
            pb, qb = np.array([a for a, _ in more]), np.array([b for _, b in more])
            bwall, bcpu = timed(lambda: mdsd.optimal_acceptance(pb, qb, n, law), 3)  # noqa: B023 (called at once)
            rows.append([f"optimal_acceptance {law} batched", str(vocab), str(n), str(batch),
                         f"{1e3 * bwall / batch:.2f}", f"{1e3 * bcpu / batch:.2f}",
                         f"{1e3 * bw:.3f}", f"{bwall / batch / bw:.1f}",
                         f"{bcpu / batch / bc:.1f}", "per row"])
    print_table(["operation", "V", "n", "B", "median ms (wall)", "median ms (CPU)",
                 "argsort ms", "ratio wall", "ratio CPU", "max error vs reference"], rows)


if __name__ == "__main__":
    main()
