"""Benchmark: alpha* (``optimal_acceptance``) at LLM vocabularies, against np.argsort in the same run.

Usage: python benchmarks/bench_bound.py [--repeats 7] [--no-check] [--batch 64]

Prints a markdown table: operation, V, n, B, median wall time per (p, q) pair, median CPU time,
ratio to one np.argsort of a V-vector timed interleaved in the same run (wall and CPU), and the
max error against the plain reference (without_replacement: the Python-loop race quadrature at a
fine step over every prefix; iid / greedy / spechub: the stable-sort scan and closed forms).
without_replacement runs on the default CPU kernel (numba) and, in "(torch kernel)" rows, on the
torch kernel (``optimal_acceptance(..., kernel="torch")``); "p = q" rows are the case where the bounds
prune nothing (alpha* = 1, every prefix integrated).
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
from mdsd._race import KERNELS  # noqa: E402
from mdsd.bound import scan_reference  # noqa: E402

REFERENCE_STEP = 0.2  # reference quadrature step for the error column (~1e-15 at n <= 8)


def numba_version():
    try:
        import numba
    except ImportError:
        return "not installed"
    return numba.__version__


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
    print(
        f"numpy {np.__version__}, torch {torch.__version__}, numba {numba_version()}, "
        f"CUDA {torch.cuda.is_available()}\n"
    )

    wor = "without_replacement"
    # (law, V, n, p = q, CPU kernels of the race quadrature)
    cases = [
        (wor, 32000, 8, False, KERNELS),
        (wor, 32000, 4, False, KERNELS),
        (wor, 128000, 8, False, KERNELS),
        (wor, 32000, 8, True, KERNELS),
        ("iid", 32000, 8, False, ["numba"]),
        ("iid", 128000, 8, False, ["numba"]),
        ("greedy", 32000, 8, False, ["numba"]),
        ("spechub", 32000, 2, False, ["numba"]),
    ]
    rows = []
    for law, vocab, n, same, kernels in cases:
        pairs = [llm_like_pair(rng, vocab) for _ in range(3)]
        if same:
            pairs = [(p, p) for p, _ in pairs]
        keys = rng.random(vocab)
        check = not args.no_check and (law != wor or vocab <= 32000)
        reference = reference_alpha(*pairs[0], n, law) if check else float("nan")
        for kernel in kernels:
            mdsd.optimal_acceptance(
                *pairs[0], n, law, kernel=kernel
            )  # warm-up (numba: load the compiled kernel)
            wall, cpu, base_wall, base_cpu = [], [], [], []
            for p, q in pairs:
                w, c = timed(lambda: mdsd.optimal_acceptance(p, q, n, law, kernel=kernel), args.repeats)  # noqa: B023 (called at once)
                bw, bc = timed(lambda: np.argsort(keys), max(args.repeats, 21))  # noqa: B023 (called at once)
                wall.append(w), cpu.append(c), base_wall.append(bw), base_cpu.append(bc)
            error = abs(mdsd.optimal_acceptance(*pairs[0], n, law, kernel=kernel) - reference)
            w, c, bw, bc = (float(np.median(x)) for x in (wall, cpu, base_wall, base_cpu))
            label = f"optimal_acceptance {law}" + (" p = q" if same else "")
            label += " (torch kernel)" if kernel == "torch" else ""
            rows.append(
                [
                    label,
                    str(vocab),
                    str(n),
                    "1",
                    f"{1e3 * w:.2f}",
                    f"{1e3 * c:.2f}",
                    f"{1e3 * bw:.3f}",
                    f"{w / bw:.1f}",
                    f"{c / bc:.1f}",
                    "-" if np.isnan(error) else f"{error:.1e}",
                ]
            )
        if law == wor and torch.cuda.is_available() and not same:
            p, q = pairs[0]
            mdsd.optimal_acceptance(p, q, n, law, device="cuda")  # warm-up
            gw, gc = timed(lambda: mdsd.optimal_acceptance(p, q, n, law, device="cuda"), args.repeats)  # noqa: B023 (called at once)
            gpu_error = abs(
                mdsd.optimal_acceptance(p, q, n, law, device="cuda") - mdsd.optimal_acceptance(p, q, n, law)
            )
            rows.append(
                [
                    f"optimal_acceptance {law} (cuda)",
                    str(vocab),
                    str(n),
                    "1",
                    f"{1e3 * gw:.2f}",
                    f"{1e3 * gc:.2f}",
                    f"{1e3 * bw:.3f}",
                    f"{gw / bw:.1f}",
                    f"{gc / bc:.1f}",
                    f"{gpu_error:.1e} vs cpu",
                ]
            )
        # batched input: per-row cost of a [B, V] call vs one row
        if vocab == 32000 and n in (2, 8) and not same:
            batch = args.batch if law != wor else max(8, args.batch // 8)
            more = [llm_like_pair(rng, vocab) for _ in range(batch)]
            pb, qb = np.array([a for a, _ in more]), np.array([b for _, b in more])
            bwall, bcpu = timed(lambda: mdsd.optimal_acceptance(pb, qb, n, law), 3)  # noqa: B023 (called at once)
            rows.append(
                [
                    f"optimal_acceptance {law} batched",
                    str(vocab),
                    str(n),
                    str(batch),
                    f"{1e3 * bwall / batch:.2f}",
                    f"{1e3 * bcpu / batch:.2f}",
                    f"{1e3 * bw:.3f}",
                    f"{bwall / batch / bw:.1f}",
                    f"{bcpu / batch / bc:.1f}",
                    "per row",
                ]
            )
    print_table(
        [
            "operation",
            "V",
            "n",
            "B",
            "median ms (wall)",
            "median ms (CPU)",
            "argsort ms",
            "ratio wall",
            "ratio CPU",
            "max error vs reference",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
