"""Shared helpers for the benchmark scripts: LLM-like test pairs, timing, tables."""

from __future__ import annotations

import platform
import subprocess
import time

import numpy as np


def llm_like_pair(rng: np.random.Generator, vocab: int, zipf: float = 1.1, noise: float = 0.7):
    """(p, q) over ``vocab`` tokens: Zipf-shaped logits shared by both (random token order) plus
    independent N(0, noise^2) perturbations; heavy LLM-like tails, top probability ~0.1-0.3."""
    base = -zipf * np.log(np.arange(1, vocab + 1))[rng.permutation(vocab)]
    zp, zq = base + rng.normal(0, noise, vocab), base + rng.normal(0, noise, vocab)
    p, q = np.exp(zp - zp.max()), np.exp(zq - zq.max())
    return p / p.sum(), q / q.sum()


def timed(fn, repeats: int):
    """Median wall time and median process CPU time (seconds) of ``fn()`` over repeats."""
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)), float(np.median(cpus))


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        head = "\n".join(lscpu.splitlines()[:10])
    except (OSError, subprocess.CalledProcessError):
        head = platform.processor()
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = ["?"]
    return f"{head}\nload average at start: {' '.join(load)}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
