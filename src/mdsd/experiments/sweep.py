"""One measurement run: capture (or reuse) the logits, analyse, write results, table and figures.

The front door behind ``mdsd measure``; each step is a separate module so that re-analysis and
re-plotting never rerun the models.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from mdsd._threads import torch_threads
from mdsd.experiments.analysis import Runner, analyse
from mdsd.experiments.capture import capture, load_prompts, missing_files
from mdsd.experiments.config import TABLE_N, TABLE_TEMPERATURE, MeasureConfig
from mdsd.experiments.plots import plot_all
from mdsd.experiments.report import table1, write_results

Progress = Callable[[str, int], Callable[[int, str], None]]  # (phase, total) -> advance callback


def run_sweep(
    config: MeasureConfig,
    out_dir: str | Path,
    *,
    cache_root: str | Path | None = None,
    command: str = "mdsd measure",
    pair=None,
    progress: Progress | None = None,
    runner: Runner | None = None,
    workers: str = "1 process",
    capture_only: bool = False,
    capture_workers: int = 1,
    warm_kernels: bool = False,
) -> dict:
    """Capture, analyse and write ``results.csv``/``results.json``/``table1.md``/figures to out_dir.

    runner: how the analysis work units run (default: serially in this process; see
        ``mdsd.experiments.parallel``); ``workers`` describes it in the run record. The results
        do not depend on it.
    capture_only: fill the cache and stop (e.g. on a GPU machine; analyse elsewhere from a copy
        of the cache, docs/measure.md); returns the capture record and writes nothing to out_dir.
    capture_workers: local processes generating the missing prompts (each loads the pair); the
        cached files do not depend on it.
    warm_kernels: when something is to be captured, compile the analysis' numba kernels on a
        process of their own meanwhile (``mdsd.experiments.parallel.start_warm_kernels``), so
        that local analysis processes load them from numba's cache instead of each compiling
        them; useless for a cluster runner, whose workers compile their own.

    Returns the run record (also stored in results.json under ``run``).
    """
    with torch_threads(config.threads):
        return _run(
            config,
            Path(out_dir),
            cache_root,
            command,
            pair,
            progress,
            runner,
            workers,
            capture_only,
            capture_workers,
            warm_kernels,
        )


def _run(
    config, out, cache_root, command, pair, progress, runner, workers, capture_only, capture_workers, warm
) -> dict:
    cache_root = Path(cache_root) if cache_root is not None else out / "cache"
    start = time.perf_counter()
    prompts = load_prompts(config.prompts, config.num_prompts)
    total = len(prompts) * len(config.temperatures)
    warming = None
    if warm and not capture_only and missing_files(config, cache_root):
        from mdsd.experiments.parallel import start_warm_kernels

        warming = start_warm_kernels(config)
    summary = capture(
        config,
        cache_root,
        pair=pair,
        progress=progress("capture", total) if progress else None,
        workers=capture_workers,
    )
    captured = time.perf_counter()
    if warming is not None:
        warming.join()
    warmed = time.perf_counter()
    if capture_only:
        return {
            "cache_dir": str(summary.cache_dir),
            "generated_files": summary.generated,
            "cached_files": summary.cached,
            "capture_s": captured - start,
            "wall_s": captured - start,
        }
    datasets = list(dict.fromkeys(p.dataset for p in prompts))
    units = len(datasets) * len(config.temperatures) * len(config.ns)
    rows, checks = analyse(
        config,
        summary.cache_dir,
        progress=progress("analysis", units) if progress else None,
        runner=runner,
    )
    analysed = time.perf_counter()
    per_temperature = checks["positions"] // max(1, len(config.temperatures))
    meta_path = summary.cache_dir / "meta.json"
    pair_name = pair.name if pair is not None else None
    if pair_name is None and meta_path.exists():
        import json

        pair_name = json.loads(meta_path.read_text()).get("pair")
    run = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "config": config.to_json(),
        "pair": pair_name,
        "cache_dir": str(summary.cache_dir),
        "generated_files": summary.generated,
        "cached_files": summary.cached,
        "positions_per_temperature": per_temperature,
        "checks": checks,
        "capture_s": captured - start,
        "warm_up_wait_s": warmed - captured,  # the kernels' warm-up (own process) outlasting the capture
        "analysis_s": analysed - warmed,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
        "analysis_workers": workers,
        "capture_workers": capture_workers,
    }
    run["wall_s"] = time.perf_counter() - start
    write_results(out, rows, run)
    (out / "table1.md").write_text(table1(rows, TABLE_TEMPERATURE, TABLE_N))
    plot_all(rows, out, n=TABLE_N, temperature=TABLE_TEMPERATURE)
    run["wall_s"] = time.perf_counter() - start
    write_results(out, rows, run)
    return run
