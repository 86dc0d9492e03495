"""Benchmark: batched verifiers (numpy and torch) at LLM vocabularies, and exact acceptances.

Usage: python benchmarks/bench_verifiers.py [--batch 64] [--vocab 32000] [--n 4] [--repeats 5]

Prints a markdown table: operation, V, n, B, median wall and CPU time per row, the baseline (one
row-wise sort of the same [B, V] data: np.argsort for numpy, torch.sort for torch) per row, the
ratio, and the max error against the reference (numpy path for torch; K-SEQ against the 80-step
bisection; rrs_without_replacement acceptance against enumeration or Monte Carlo). torch runs on
one CPU thread (the machine may be shared) and, when CUDA is available, on the GPU (synchronised).
numpy rows of kseq and importance use the numba kernels of ``mdsd.verifiers._compiled``.
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
from mdsd.laws import top_tokens_reference  # noqa: E402
from mdsd.verifiers import VERIFIERS  # noqa: E402
from mdsd.verifiers import torch_api as tb  # noqa: E402
from mdsd.verifiers.classic import KSEQ  # noqa: E402
from mdsd.verifiers.classic_math import (  # noqa: E402
    kseq_rho,
    kseq_rho_reference,
    rrs_wor_acceptance_tree,
    rrs_wor_acceptance_two,
)


def numba_version():
    try:
        import numba
    except ImportError:
        return "not installed"
    return numba.__version__


def kseq_reference_law(p, q, x):
    """K-SEQ's output law with rho* from the bisection reference."""
    import mdsd.verifiers.classic as classic

    fast = classic.kseq_rho
    classic.kseq_rho = kseq_rho_reference
    try:
        return KSEQ().output_law(p, q, x, mdsd.get_law("iid"))
    finally:
        classic.kseq_rho = fast


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(2026)
    print(machine())
    print(
        f"numpy {np.__version__}, torch {torch.__version__}, numba {numba_version()}, "
        f"CUDA {torch.cuda.is_available()}\n"
    )
    batch, vocab = args.batch, args.vocab
    pairs = [llm_like_pair(rng, vocab) for _ in range(batch)]
    p, q = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    tp, tq = torch.tensor(p), torch.tensor(q)
    np_base = timed(lambda: np.argsort(q, axis=1), args.repeats)
    torch_base = timed(lambda: torch.sort(tq, dim=1), args.repeats)
    devices = ["cuda"] if torch.cuda.is_available() else []
    rows = []

    def row(name, n, backend, wall_cpu, base, error):
        wall, cpu = wall_cpu
        rows.append(
            [
                name,
                backend,
                str(vocab),
                str(n),
                str(batch),
                f"{1e3 * wall / batch:.3f}",
                f"{1e3 * cpu / batch:.3f}",
                f"{1e3 * base[0] / batch:.3f}",
                f"{wall / base[0]:.2f}",
                error,
            ]
        )

    for name, verifier in VERIFIERS.items():
        if name == "optimal":
            continue
        law = mdsd.get_law(verifier.default_law)
        n = 2 if law.name == "spechub" else args.n
        x = law.sample(q, n, rng)
        tx = torch.tensor(x)
        expected = mdsd.output_law(p, q, x, name)
        reference = "-"
        if name == "kseq":
            reference = f"{np.abs(expected - kseq_reference_law(p, q, x)).max():.1e} vs bisection"
        row(
            f"output_law {name}",
            n,
            "numpy",
            timed(lambda: mdsd.output_law(p, q, x, name), args.repeats),  # noqa: B023 (called at once)
            np_base,
            reference,
        )
        got = tb.output_law(tp, tq, tx, name).numpy()
        row(
            f"output_law {name}",
            n,
            "torch cpu",
            timed(lambda: tb.output_law(tp, tq, tx, name), args.repeats),  # noqa: B023 (called at once)
            torch_base,
            f"{np.abs(got - expected).max():.1e} vs numpy",
        )
        for device in devices:
            dp, dq, dx = tp.to(device), tq.to(device), tx.to(device)

            def run():
                tb.output_law(dp, dq, dx, name)  # noqa: B023 (called at once)
                torch.cuda.synchronize()

            def base():
                torch.sort(dq, dim=1)  # noqa: B023 (called at once)
                torch.cuda.synchronize()

            run()
            got = tb.output_law(dp, dq, dx, name).cpu().numpy()
            row(
                f"output_law {name}",
                n,
                device,
                timed(run, args.repeats),
                timed(base, args.repeats),
                f"{np.abs(got - expected).max():.1e} vs numpy",
            )
    x = mdsd.get_law("iid").sample(q, args.n, rng)
    row(
        "verify rrs (sample)",
        args.n,
        "numpy",
        timed(lambda: mdsd.verify(p, q, x, "rrs", rng=1), args.repeats),
        np_base,
        "-",
    )
    generator = torch.Generator().manual_seed(1)
    row(
        "verify rrs (sample)",
        args.n,
        "torch cpu",
        timed(lambda: tb.verify(tp, tq, torch.tensor(x), "rrs", generator=generator), args.repeats),
        torch_base,
        "-",
    )
    # K-SEQ's rho*: exact after one selection (numpy: numba buckets) or one sort (torch) vs the
    # 80-step bisection
    row(
        "kseq rho* (selection)",
        args.n,
        "numpy",
        timed(lambda: kseq_rho(p, q, args.n), args.repeats),
        np_base,
        "-",
    )
    row(
        "kseq rho* (one sort)",
        args.n,
        "torch cpu",
        timed(lambda: kseq_rho(tp, tq, args.n), args.repeats),
        torch_base,
        "-",
    )
    row(
        "kseq rho* (bisection, reference)",
        args.n,
        "numpy",
        timed(lambda: kseq_rho_reference(p, q, args.n), max(1, args.repeats // 2)),
        np_base,
        "-",
    )
    # exact rrs_without_replacement acceptance
    two = rrs_wor_acceptance_two(p, q)
    mc = mdsd.acceptance_rate(
        p[0], q[0], 2, "rrs_without_replacement", method="monte_carlo", num_samples=4096, rng=1
    )
    row(
        "acceptance rrs_without_replacement (n=2, closed form)",
        2,
        "numpy",
        timed(lambda: rrs_wor_acceptance_two(p, q), args.repeats),
        np_base,
        f"{abs(two[0] - mc.rate):.1e} vs MC (stderr {mc.stderr:.1e})",
    )
    top = top_tokens_reference(q[0], 64)
    q_top = np.zeros(vocab)
    q_top[top] = q[0, top]
    q_top /= q_top.sum()
    saved = batch
    batch = 1
    tree = rrs_wor_acceptance_tree(p[0], q_top, 4)
    mc = mdsd.acceptance_rate(
        p[0], q_top, 4, "rrs_without_replacement", method="monte_carlo", num_samples=4096, rng=1
    )
    row(
        "acceptance rrs_without_replacement (top-64, n=4, draw-tree DP)",
        4,
        "numpy",
        timed(lambda: rrs_wor_acceptance_tree(p[0], q_top, 4), 1),
        (np_base[0] / saved, 0.0),
        f"{abs(tree - mc.rate):.1e} vs MC (stderr {mc.stderr:.1e})",
    )
    print_table(
        [
            "operation",
            "backend",
            "V",
            "n",
            "B",
            "ms/row (wall)",
            "ms/row (CPU)",
            "sort ms/row",
            "ratio wall",
            "max error",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
