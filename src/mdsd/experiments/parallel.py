"""Runners of the analysis work units: local processes or an existing Dask cluster.

A runner takes the list of :class:`~mdsd.experiments.analysis.WorkUnit` and returns their results
in the same order; every unit is a pure function of its data (its random streams are seeded by
its names, docs/measure.md), so the rows are byte-identical whatever runs them. ``done(unit)`` is
called as each unit finishes (progress).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

from mdsd.experiments.analysis import UnitResult, WorkUnit, measure_unit, run_serial

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
