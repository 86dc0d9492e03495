"""Benchmark: the tree step's cache move (``_llama_numba.gather_positions``) against numpy.

Usage: python benchmarks/bench_cache_move.py [--target DIR] [--repeats 200]

After a tree step the accepted path's key and value entries move to the positions right after
the committed prefix (``StaticLlamaRunner.keep_positions``; the one-call loop's ``keep_path``).
For caches of the target's shape [layers, kv_heads, capacity, head_dim] (float32), paths of 1-4
entries whose sources lie 1-8 nodes further on, this times

- numpy: ``cache[:, :, base:base + k] = cache[:, :, extra]`` on keys and values (a fancy-index
  copy, then a strided assignment);
- slices: the same move compiled as numba slice assignments of whole [layers, kv_heads,
  head_dim] entries through a [k, layers, kv_heads, head_dim] temporary (mdsd's move before
  2026-12-05);
- compiled: ``gather_positions(keys, values, base, extra)`` (a (layer, head) block at a time,
  plain loops over contiguous rows),

warm (the caches just used) and cold (64 MB touched before every call, untimed: after a
forward the entries are out of the core's caches). Microseconds are medians over ``repeats``
calls, the three interleaved; the same entries move (checked).
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.resources import files
from pathlib import Path

import numba
import numpy as np
from _common import machine, print_table

from mdsd.engine._llama_numba import gather_positions


def numpy_move(keys: np.ndarray, values: np.ndarray, base: int, extra: np.ndarray) -> None:
    keys[:, :, base : base + extra.size] = keys[:, :, extra]
    values[:, :, base : base + extra.size] = values[:, :, extra]


@numba.njit(cache=True)
def _slices_move(keys, values, base, extra):
    k = extra.size
    kept_keys = np.empty((k, keys.shape[0], keys.shape[1], keys.shape[3]), dtype=keys.dtype)
    kept_values = np.empty_like(kept_keys)
    for i in range(k):
        kept_keys[i] = keys[:, :, extra[i]]
        kept_values[i] = values[:, :, extra[i]]
    for i in range(k):
        keys[:, :, base + i] = kept_keys[i]
        values[:, :, base + i] = kept_values[i]


def slices_move(keys: np.ndarray, values: np.ndarray, base: int, extra: np.ndarray) -> None:
    _slices_move(keys, values, base, extra)


def compiled_move(keys: np.ndarray, values: np.ndarray, base: int, extra: np.ndarray) -> None:
    gather_positions(keys, values, base, extra)


MOVES = (numpy_move, slices_move, compiled_move)


def median_us(arrays, base, extra, repeats, sweep) -> list[float]:
    """Median microseconds of each of ``MOVES`` on its own copy of the caches (``arrays``),
    interleaved; with ``sweep``, 64 MB written before every call (untimed)."""
    times = [[] for _ in MOVES]
    for _ in range(repeats):
        for move, caches, out in zip(MOVES, arrays, times):
            if sweep is not None:
                sweep += 1.0  # every line of 64 MB written: the caches leave the core's caches
            t0 = time.perf_counter_ns()
            move(*caches, base, extra)
            out.append(time.perf_counter_ns() - t0)
    return [float(np.median(t)) / 1e3 for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="Model directory (default: the bundled target).")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    directory = Path(args.target) if args.target else files("mdsd") / "data" / "models" / "target"
    config = json.loads((directory / "config.json").read_text())
    layers, heads = config["num_hidden_layers"], config["num_key_value_heads"]
    width = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    shape = (layers, heads, 512, width)
    rng = np.random.default_rng(0)
    keys, values = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)
    arrays = [(keys.copy(), values.copy()) for _ in MOVES]
    sweep = np.zeros(64 * 2**20 // 8)
    print(machine())
    print(f"caches {shape} float32 (keys and values), {args.repeats} calls each")
    base, rows = 200, []
    for extra in ([203], [202, 206], [201, 204, 207], [203, 205, 206, 208], [204, 208]):
        extra = np.asarray(extra)
        for move, caches in zip(MOVES, arrays):
            move(*caches, base, extra)
        assert all(np.array_equal(a, b) for caches in arrays[1:] for a, b in zip(arrays[0], caches))
        for state, touched in (("warm", None), ("cold", sweep)):
            a, b, c = median_us(arrays, base, extra, args.repeats, touched)
            rows.append(
                [
                    str(extra.tolist()),
                    state,
                    f"{a:.1f}",
                    f"{b:.1f}",
                    f"{c:.1f}",
                    f"{a / c:.2f}",
                    f"{b / c:.2f}",
                ]
            )
    header = ["path sources", "caches", "numpy us", "slices us", "compiled us", "numpy / compiled"]
    print_table(header + ["slices / compiled"], rows)


if __name__ == "__main__":
    main()
