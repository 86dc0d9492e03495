"""Benchmark: the lean forward's projection backends, numpy's BLAS against torch's ``F.linear``.

Usage: python benchmarks/bench_matmul.py [--target DIR] [--rows 1,2,4,8,16] [--repeats 20]

Every projection of the target model (fused q/k/v, output, fused gate/up, down, the output
layer), multiplied in model order so that the weights stream from memory as in a forward (they
do not stay in cache between passes), for ``rows`` input rows (1 = an autoregressive step, 2-16 =
tree forwards):

- torch: ``F.linear(x, W)`` on the model's [out, in] weights (torch's CPU BLAS);
- numpy: ``x @ W^T`` on C-contiguous [in, out] copies (numpy's BLAS; ``StaticLlamaRunner``'s
  default for float32 on the CPU, ``mdsd.engine.static_llama._Linear``).

Prints the milliseconds per pass (median over ``repeats``), the numpy / torch ratio and, per
backend, the cost of ``rows`` rows relative to one row (what a tree forward costs against an
autoregressive step). ``--threads`` threads (default 1) in torch and in the BLAS.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from mdsd._threads import set_threads
from mdsd.engine.static_llama import StaticLlamaRunner
from mdsd.models import load_pair


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    pair = load_pair(target=args.target, draft=args.target)
    numpy_runner = StaticLlamaRunner(pair.target, matmul="numpy")
    torch_runner = StaticLlamaRunner(pair.target, matmul="torch")

    def projections(runner):
        layers = [(ly.qkv, ly.out, ly.gate_up, ly.down) for ly in runner._layers]
        return [lin for group in layers for lin in group] + [runner._output]

    torch_weights = [lin.weight for lin in projections(torch_runner)]  # [out, in]
    numpy_weights = [lin.weight_t for lin in projections(numpy_runner)]  # [in, out]
    megabytes = sum(w.numel() for w in torch_weights) * 4 / 1e6
    print(
        f"{pair.target.config.model_type} target, {len(torch_weights)} projections, "
        f"{megabytes:.1f} MB of float32 weights; {args.threads} thread(s); median of {args.repeats}\n"
    )
    print("| rows | torch ms | numpy ms | numpy / torch | torch vs 1 row | numpy vs 1 row |")
    print("|---|---|---|---|---|---|")
    gen = np.random.default_rng(0)
    base = {}
    for rows in [int(r) for r in args.rows.split(",")]:
        inputs = {
            w.shape[1]: gen.standard_normal((rows, w.shape[1])).astype(np.float32) for w in torch_weights
        }
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        with torch.inference_mode():
            t = _median_ms(
                lambda x=tensors: [F.linear(x[w.shape[1]], w) for w in torch_weights], args.repeats
            )
        n = _median_ms(lambda x=inputs: [x[w.shape[0]] @ w for w in numpy_weights], args.repeats)
        base.setdefault("torch", t)
        base.setdefault("numpy", n)
        print(
            f"| {rows} | {t:.2f} | {n:.2f} | {n / t:.2f} | {t / base['torch']:.2f} | "
            f"{n / base['numpy']:.2f} |"
        )


if __name__ == "__main__":
    main()
