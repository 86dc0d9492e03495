"""Benchmark: the lean forward's backends: projections and whole forwards by number of rows.

Usage: python benchmarks/bench_matmul.py [--target DIR] [--rows 1,2,4,6,8,12,16] [--repeats 20]

Table 1, every projection of the target model (fused q/k/v, output, fused gate/up, down, the
output layer), multiplied in model order so that the weights stream from memory as in a forward
(they do not stay in cache between passes), for ``rows`` input rows (1 = an autoregressive step,
2-16 = tree forwards):

- torch: ``F.linear(x, W)`` on the model's [out, in] weights (torch's CPU BLAS);
- numpy: ``x @ W^T`` on C-contiguous [in, out] copies (numpy's BLAS);
- panels: ``mdsd.engine._llama_numba.project`` on the weight panels of
  ``mdsd.engine._panel_gemm`` (the compiled kernel up to ``PANEL_MAX_ROWS`` rows, np.dot beyond),
  the projections of ``StaticLlamaRunner(matmul="numba")``, the default for float32 on the CPU.

Table 2, the whole forward of ``rows`` new tokens after a 64-token context plus the output layer
on one row (``StaticLlamaRunner.causal``), per backend ("torch", "numpy", "numba"), against the
numba forward of one row: what a tree forward costs relative to an autoregressive step.

Table 3, the panel kernel alone over the same projections (``rows`` and 24) by vector width: 8
floats against 16 where the CPU has AVX-512 (rows per pass ``_panel_gemm.MAX_ROWS``, printed);
the same products bit for bit.

Table 4, the panel kernel alone over the same projections with the weights coming from memory
(96 MB touched before every call, untimed), without software prefetch and with the kernel's
``PREFETCH_BYTES``: the state of a decode step, where the target's weights do not stay in cache.

Table 5, the one-token forward with the output layer (64-token context) on the runner's pooled
panels (``_panel_gemm.pool_panels``: one allocation, backed by 2 MiB pages where Linux allows)
against a runner whose panels are copied back to one array per matrix, hot and after touching 64
MB (untimed); ``repeats`` x 10 pairs.

Table 6, the panel kernel on one matrix of the target's shape (hidden x hidden) that stays in
the core's L2 cache, float32 panels against the model's 16-bit ones, by rows: the arithmetic
alone, without the weights' stream; microseconds per call (best of 7 blocks of 200 calls). Where
a pass's fused multiply-adds and the 16-bit weights' widening take as long as the weights take to
arrive from memory, more rows stop being free (BENCHMARKS.md).

Milliseconds are medians over ``repeats``, backends interleaved within each repeat.
``--threads`` threads (default 1) in torch and in the BLAS.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from mdsd._threads import set_threads
from mdsd.engine import _llama_numba as kernels
from mdsd.engine.static_llama import StaticLlamaRunner
from mdsd.models import load_pair


def _interleaved_ms(fns: dict, repeats: int, before=None) -> dict[str, float]:
    """Median milliseconds of each function, the functions run in turn within each repeat
    (``before()``, untimed, ahead of every call when given)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def projection_table(pair, rows_list, repeats) -> None:
    runner = StaticLlamaRunner(pair.target, matmul="numba")
    linears = runner.projections()
    torch_weights = [torch.from_numpy(np.ascontiguousarray(lin.weight_t.T)) for lin in linears]
    megabytes = sum(w.numel() for w in torch_weights) * 4 / 1e6
    print(f"Projections: {len(linears)} matrices, {megabytes:.1f} MB of float32 weights\n")
    print(
        "| rows | torch ms | numpy ms | panels ms | numpy / torch | panels / numpy | torch vs 1 row "
        "| numpy vs 1 row | panels vs 1 row |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    gen = np.random.default_rng(0)
    base = {}
    for rows in rows_list:
        x = {
            k: gen.standard_normal((rows, k)).astype(np.float32) for k in {w.shape[1] for w in torch_weights}
        }
        xt = {k: torch.from_numpy(v) for k, v in x.items()}
        with torch.inference_mode():
            ms = _interleaved_ms(
                {
                    "torch": lambda xt=xt: [F.linear(xt[w.shape[1]], w) for w in torch_weights],
                    "numpy": lambda x=x: [x[lin.weight_t.shape[0]] @ lin.weight_t for lin in linears],
                    "panels": lambda x=x: [
                        kernels.project(
                            x[lin.weight_t.shape[0]], lin.panels, lin.weight_t, lin.bias_np, lin.gemm
                        )
                        for lin in linears
                    ],
                },
                repeats,
            )
        for name in ms:
            base.setdefault(name, ms[name])
        t, n, p = ms["torch"], ms["numpy"], ms["panels"]
        print(
            f"| {rows} | {t:.2f} | {n:.2f} | {p:.2f} | {n / t:.2f} | {p / n:.2f} | {t / base['torch']:.2f} | "
            f"{n / base['numpy']:.2f} | {p / base['panels']:.2f} |"
        )


def forward_table(pair, rows_list, repeats) -> None:
    runners = {m: StaticLlamaRunner(pair.target, matmul=m) for m in ("torch", "numpy", "numba")}
    context = np.arange(2, 66)
    with torch.inference_mode():
        for runner in runners.values():
            runner.reset(len(context) + max(rows_list) + 1)
            runner.causal(context)
    cached = len(context)

    def forward(runner, ids):
        runner._length = cached  # the same context before every forward
        runner.causal(ids, keep=1)

    print("\nWhole forward (64-token context, output layer on one row):\n")
    print(
        "| rows | torch ms | numpy ms | numba ms | numba / numpy | torch vs numba 1 row "
        "| numpy vs numba 1 row | numba vs numba 1 row |"
    )
    print("|---|---|---|---|---|---|---|---|")
    one = None
    for rows in rows_list:
        ids = np.arange(3, 3 + rows)
        with torch.inference_mode():
            ms = _interleaved_ms(
                {m: lambda r=r, ids=ids: forward(r, ids) for m, r in runners.items()}, repeats
            )
        one = one or ms["numba"]
        t, n, c = ms["torch"], ms["numpy"], ms["numba"]
        cells = [t, n, c, c / n, t / one, n / one, c / one]
        print(f"| {rows} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")


def _panel_products(linears, rows: int, gen: np.random.Generator):
    """run(kernel): every projection of ``linears`` by the panel kernel ``kernel`` on ``rows``
    random rows, in model order."""
    from mdsd.engine._panel_gemm import PANEL

    x = {
        lin.panels.shape[1]: gen.standard_normal((rows, lin.panels.shape[1])).astype(np.float32)
        for lin in linears
    }
    out = {lin.panels.shape[0]: np.empty((rows, lin.panels.shape[0] * PANEL), np.float32) for lin in linears}

    def run(kernel):
        for lin in linears:
            n_panels, k_dim, _ = lin.panels.shape
            o = out[n_panels]
            kernel(
                x[k_dim].ctypes.data, lin.panels.ctypes.data, o.ctypes.data, rows, n_panels, k_dim, o.shape[1]
            )

    return run


def width_table(pair, rows_list, repeats) -> None:
    """The panel kernel alone over every projection of the target, by vector width: 8 floats
    and, where the CPU has AVX-512, 16 floats (rows per pass ``MAX_ROWS`` of each width)."""
    from mdsd.engine._panel_gemm import MAX_ROWS, gemm_kernel, host_width

    runner = StaticLlamaRunner(pair.target, matmul="numba")
    linears = runner.projections()
    widths = sorted({8, host_width()})
    fmt = runner.panel_format
    passes = [MAX_ROWS[w] for w in widths]
    print(f"\nThe panel kernel alone by vector width ({fmt} panels; rows per pass {passes}):\n")
    print("| rows | " + " | ".join(f"{w} floats ms" for w in widths) + " | ratio |")
    print("|---|" + "---|" * (len(widths) + 1))
    gen = np.random.default_rng(0)
    for rows in rows_list:
        run = _panel_products(linears, rows, gen)
        ms = _interleaved_ms({w: lambda w=w, run=run: run(gemm_kernel(fmt, w)) for w in widths}, repeats)
        cells = [ms[w] for w in widths] + [ms[widths[-1]] / ms[widths[0]]]
        print(f"| {rows} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")


def prefetch_table(pair, rows_list, repeats, evict_mb: int = 96) -> None:
    """The panel kernel from memory: every projection of the target after touching ``evict_mb``
    MB (untimed), as in a decode step, where the draft's forwards and the rest of the loop have
    evicted the target's weights; without software prefetch and with ``PREFETCH_BYTES``."""
    from mdsd.engine._panel_gemm import PREFETCH_BYTES, gemm_kernel

    runner = StaticLlamaRunner(pair.target, matmul="numba")
    linears = runner.projections()
    fmt = runner.panel_format
    evict = np.zeros(evict_mb * 2**20 // 8)

    def flush():
        evict[::8] += 1.0  # one write per 64-byte line

    distances = (0, PREFETCH_BYTES)
    print(f"\nThe panel kernel from memory ({fmt} panels, {evict_mb} MB touched before each call):\n")
    print("| rows | no prefetch ms | prefetch " + f"{PREFETCH_BYTES} B ms | ratio | vs 1 row, no prefetch |")
    print("|---|---|---|---|---|")
    gen = np.random.default_rng(0)
    one = None
    for rows in rows_list:
        run = _panel_products(linears, rows, gen)
        ms = _interleaved_ms(
            {d: lambda d=d, run=run: run(gemm_kernel(fmt, None, d)) for d in distances}, repeats, flush
        )
        one = one or ms[0]
        cells = [ms[0], ms[PREFETCH_BYTES], ms[PREFETCH_BYTES] / ms[0], ms[PREFETCH_BYTES] / one]
        print(f"| {rows} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")


def pool_table(pair, repeats, evict_mb: int = 64) -> None:
    """The one-token forward on pooled panels (the runner's) against one array per matrix."""
    runners = {"apart": StaticLlamaRunner(pair.target, matmul="numba")}
    for lin in runners["apart"].projections():
        lin.panels = lin.panels.copy()  # one allocation per matrix, as before pooling
    runners["apart"]._compiled_layers = runners["apart"]._compiled_weights()
    runners["pooled"] = StaticLlamaRunner(pair.target, matmul="numba")
    context = np.arange(2, 66)
    with torch.inference_mode():
        for runner in runners.values():
            runner.reset(len(context) + 2)
            runner.causal(context)
    evict = np.zeros(evict_mb * 2**20 // 8)

    def flush():
        evict[::8] += 1.0

    def forward(runner):
        runner._length = len(context)
        runner.causal(np.array([3]), keep=1)

    try:  # Linux: how much of this process's memory huge pages back
        with open("/proc/self/smaps_rollup") as fh:
            huge = next((ln.split()[1] for ln in fh if ln.startswith("AnonHugePages")), "?")
    except OSError:
        huge = "?"
    print(f"\nPooled panels against one array per matrix (AnonHugePages of this process: {huge} kB):\n")
    print("| state | one array per matrix ms | pooled ms | pooled / apart |")
    print("|---|---|---|---|")
    for state, before in (("hot", None), (f"after touching {evict_mb} MB", flush)):
        with torch.inference_mode():
            ms = _interleaved_ms(
                {k: lambda r=r: forward(r) for k, r in runners.items()}, 10 * repeats, before
            )
        print(f"| {state} | {ms['apart']:.3f} | {ms['pooled']:.3f} | {ms['pooled'] / ms['apart']:.3f} |")


def in_cache_table(pair, rows_list) -> None:
    """The panel kernel on one hidden x hidden matrix held in L2, float32 against 16-bit panels."""
    from mdsd.engine._panel_gemm import PANEL, gemm_kernel, pack_panels

    fmt = StaticLlamaRunner(pair.target, matmul="numba").panel_format
    hidden = int(pair.target.config.hidden_size)
    gen = np.random.default_rng(0)
    weight_t = gen.standard_normal((hidden, hidden)).astype(np.float32)  # timing only
    formats = ["f32"] + ([fmt] if fmt != "f32" else [])
    print(f"\nThe panel kernel in cache ({hidden} x {hidden} weights; microseconds per call):\n")
    print("| rows | " + " | ".join(f"{f} us" for f in formats) + " | ratio | vs 1 row (last) |")
    print("|---|" + "---|" * (len(formats) + 2))
    one = None
    for rows in rows_list:
        x = gen.standard_normal((rows, hidden)).astype(np.float32)
        us = {}
        for f in formats:
            panels, kernel = pack_panels(weight_t, f), gemm_kernel(f)
            out = np.empty((rows, panels.shape[0] * PANEL), np.float32)
            args = (
                x.ctypes.data,
                panels.ctypes.data,
                out.ctypes.data,
                rows,
                panels.shape[0],
                hidden,
                out.shape[1],
            )
            for _ in range(50):
                kernel(*args)
            blocks = []
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(200):
                    kernel(*args)
                blocks.append((time.perf_counter() - start) / 200)
            us[f] = 1e6 * min(blocks)
        one = one or us[formats[-1]]
        cells = [us[f] for f in formats] + [us[formats[-1]] / us["f32"], us[formats[-1]] / one]
        print(f"| {rows} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target")
    ap.add_argument("--rows", default="1,2,4,6,8,12,16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    pair = load_pair(target=args.target, draft=args.target)
    rows_list = [int(r) for r in args.rows.split(",")]
    print(f"{pair.target.config.model_type} target; {args.threads} thread(s); median of {args.repeats}\n")
    projection_table(pair, rows_list, args.repeats)
    forward_table(pair, rows_list, args.repeats)
    width_table(pair, sorted(set(rows_list) | {24}), args.repeats)
    prefetch_table(pair, sorted(set(rows_list) | {3}), args.repeats)
    pool_table(pair, args.repeats)
    in_cache_table(pair, sorted(set(rows_list) | {3, 4, 6, 8, 14}))


if __name__ == "__main__":
    main()
