"""Runners of the analysis work units: local processes or an existing Dask cluster.

A runner takes the list of :class:`~mdsd.experiments.analysis.WorkUnit` and returns their results
in the same order; every unit is a pure function of its data (its random streams are seeded by
its names, docs/measure.md), so the rows are byte-identical whatever runs them. ``done(unit)`` is
called as each unit finishes (progress).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

from mdsd.experiments.analysis import UnitResult, WorkUnit, measure_unit, run_serial
from mdsd.experiments.capture import Positions, compress_logits
from mdsd.experiments.config import MeasureConfig

Done = Callable[[WorkUnit], None] | None
MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """min(CPU cores, 4): more processes than cores only add contention."""
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


def _init_worker() -> None:
    """One torch / BLAS thread per worker process: the processes are the parallelism."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # the analysis itself does not need torch
        pass


def process_runner(workers: int) -> Callable[[list[WorkUnit], Done], list[UnitResult]]:
    """Run the units on ``workers`` local processes (``spawn``: no state inherited from the
    parent, which may hold torch threads); 1 runs them in this process."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def run(units: list[WorkUnit], done: Done = None) -> list[UnitResult]:
        if workers == 1 or len(units) <= 1:
            return run_serial(units, done)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=min(workers, len(units)), mp_context=context, initializer=_init_worker
        ) as pool:
            futures = {pool.submit(measure_unit, unit): i for i, unit in enumerate(units)}
            results: list[UnitResult | None] = [None] * len(units)
            for future in as_completed(futures):
                index = futures[future]
                results[index] = future.result()
                if done is not None:
                    done(units[index])
        return results

    return run


def dask_runner(address: str) -> Callable[[list[WorkUnit], Done], list[UnitResult]]:
    """Run the units on the Dask distributed cluster at ``address`` (``tcp://host:8786``, or a
    ``distributed.LocalCluster``/``Client`` object). Needs ``pip install "mdsd[cluster]"``; the
    workers need mdsd installed, not the models or the cache (units carry their positions)."""
    try:
        from distributed import Client
        from distributed import as_completed as dask_completed
    except ImportError as err:
        raise ValueError(
            'cluster: Dask is not installed; pip install "dask[distributed]" (or mdsd[cluster])'
        ) from err

    def run(units: list[WorkUnit], done: Done = None) -> list[UnitResult]:
        try:
            client = Client(address)
        except OSError as err:
            raise ValueError(f"cluster: cannot connect to the Dask scheduler at {address!r}: {err}") from err
        try:
            futures = client.map(measure_unit, units, pure=False)
            index = {future.key: i for i, future in enumerate(futures)}
            for future in dask_completed(futures):
                if done is not None:
                    done(units[index[future.key]])
            return client.gather(futures)
        finally:
            client.close()

    return run


# ---------------------------------------------------------------- compiled kernels
WARM_POSITIONS = 8  # synthetic positions per (T, n) of the warm-up
WARM_VOCAB = 160  # their vocabulary (above the default top-k 50, so the top-k layout is exercised)


def warm_positions(config: MeasureConfig, temperature: float) -> Positions:
    """A few synthetic positions in the cache's form (top-k or dense as ``config.top_k``): rows
    from flat to peaked, so the analysis takes the paths the real positions take (fits of
    several blocks, enumeration and Monte Carlo, clamped rows)."""
    rng = np.random.default_rng([config.seed, WARM_POSITIONS, WARM_VOCAB])
    vocab = max(WARM_VOCAB, 2 * (config.top_k or 0))
    scale = np.geomspace(0.3, 12.0, WARM_POSITIONS)[:, None]  # [B, 1]
    forms = [
        compress_logits(
            (scale * rng.standard_normal((WARM_POSITIONS, vocab))).astype(np.float32), config.top_k
        )
        for _ in range(2)
    ]  # target, draft
    return Positions(
        dataset="warm-up",
        temperature=temperature,
        target_logits=forms[0]["logits"],
        draft_logits=forms[1]["logits"],
        target_index=forms[0].get("index"),
        draft_index=forms[1].get("index"),
        prompt=np.arange(WARM_POSITIONS) // 2,
    )


def warm_kernels(config: MeasureConfig) -> float:
    """Compile every numba kernel the analysis of ``config`` calls (or load it from numba's
    on-disk cache, ``cache=True``) by analysing :func:`warm_positions` at the lowest and highest
    temperature for every n; returns the seconds taken. Compiling takes about a CPU-minute, once
    per installation: every analysis process would otherwise pay it on a cold cache
    (docs/measure.md, "Runtime"). The results are discarded."""
    start = time.perf_counter()
    for temperature in sorted({min(config.temperatures), max(config.temperatures)}):
        positions = warm_positions(config, float(temperature))
        for n in config.ns:
            measure_unit(WorkUnit(config, 0, positions, n))
    return time.perf_counter() - start


def start_warm_kernels(config: MeasureConfig) -> multiprocessing.Process:
    """:func:`warm_kernels` on a spawned daemon process (one thread), e.g. while the capture runs,
    so that the analysis processes started after ``join()`` load compiled kernels. A daemon: it
    ends with this process if the run stops early; its exit code is not an error of the run
    (the analysis compiles whatever is missing)."""
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_warm_in_process, args=(config,), name="mdsd-warm-kernels", daemon=True)
    process.start()
    return process


def _warm_in_process(config: MeasureConfig) -> None:
    _init_worker()
    warm_kernels(config)
