"""``mdsd measure`` and ``mdsd report``: the paper's acceptance measurements on a model pair."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mdsd.cli import app
from mdsd.cli.core import check_model_path, cli_message, fail, parse_names, progress_display
from mdsd.experiments.config import DEFAULT, MeasureConfig
from mdsd.experiments.vocabulary import MEASURED_LAWS
from mdsd.laws import LAWS
from mdsd.verifiers import VERIFIERS


def _floats(text: str, what: str) -> tuple[float, ...]:
    """'0.3,0.7' -> (0.3, 0.7); empty items ('0.3,,0.7') are refused."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        fail(f"{what} must be a comma list of numbers like 0.3,0.7, got {text!r}")


def _ints(text: str, what: str) -> tuple[int, ...]:
    values = _floats(text, what)
    if any(v != int(v) or v < 1 for v in values):
        fail(f"{what} must be positive integers, got {text!r}")
    return tuple(int(v) for v in values)


def _names(text: str | None, registry, what: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    try:
        return tuple(parse_names(text, registry, what))
    except ValueError as err:
        fail(str(err))


def _subsample(text: str) -> tuple[str, ...]:
    """'optimal,rrs:iid,kseq:iid:4' -> the entries, each VERIFIER[:LAW[:N]]; 'none' or '' -> ()."""
    entries = tuple(t.strip() for t in text.split(",") if t.strip() and t.strip() != "none")
    for entry in entries:
        verifier, law, n, *rest = entry.split(":") + ["", ""]
        if verifier not in VERIFIERS:
            fail(f"--subsample: unknown verifier {verifier!r}; choose from {sorted(VERIFIERS)}")
        if law and law not in LAWS:
            fail(f"--subsample: unknown law {law!r} in {entry!r}")
        if (n and not n.isdigit()) or any(rest):
            fail(f"--subsample entries are VERIFIER[:LAW[:N]], got {entry!r}")
    return entries


def _progress_factory(progress):
    def make(phase: str, total: int):
        task = progress.add_task(phase, total=total)

        def advance(step: int, description: str) -> None:
            progress.update(task, advance=step, description=f"{phase}: {description}")

        return advance

    return make


@app.command()
def measure(
    target: Annotated[
        str | None, typer.Option(help="Target model (directory or hub id); default: bundled.")
    ] = None,
    draft: Annotated[
        str | None,
        typer.Option(
            help="Draft model (directory, hub id or mdsd-bundled/draft-distilled); default: bundled."
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="JSONL prompts ({'prompt': ..., 'domain': ...}); default: bundled held-out prompts."
        ),
    ] = None,
    temperatures: Annotated[str, typer.Option(help="Comma list of temperatures (> 0).")] = ",".join(
        map(str, DEFAULT.temperatures)
    ),
    n: Annotated[str, typer.Option("--n", "-n", help="Comma list of draft counts.")] = ",".join(
        map(str, DEFAULT.ns)
    ),
    laws: Annotated[str, typer.Option(help="Comma list of draft laws.")] = ",".join(MEASURED_LAWS),
    verifiers: Annotated[
        str | None, typer.Option(help="Comma list of verifiers; default: every registered one.")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(help="Tokens generated per prompt (paper: 128).")
    ] = DEFAULT.max_new_tokens,
    num_prompts: Annotated[
        int, typer.Option(help="Prompts per dataset (paper scale: 200).")
    ] = DEFAULT.num_prompts,
    top_k: Annotated[
        int,
        typer.Option(
            help="Top-k of the sampling transform (0: no truncation, the full vocabulary; much slower)."
        ),
    ] = DEFAULT.top_k,
    mc_samples: Annotated[
        int, typer.Option(help="Draft sets per position where no exact rate exists (Monte Carlo).")
    ] = DEFAULT.mc_samples,
    subsample: Annotated[
        str,
        typer.Option(
            help="Comma list of VERIFIER[:LAW[:N]] rated on a seeded subsample of positions "
            "('none': rate everything on every position)."
        ),
    ] = ",".join(DEFAULT.subsample),
    subsample_positions: Annotated[
        int,
        typer.Option(
            help="Positions per (dataset, T) of the --subsample pairs, chosen by the seed "
            "(0: every position, a fully exact run)."
        ),
    ] = DEFAULT.subsample_positions,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Local processes for the analysis and, on the CPU, the capture (default: min(cores, 4); "
            "each capture process loads the pair); results do not depend on it."
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            help="Run the analysis on an existing Dask cluster at this scheduler address "
            "(tcp://host:8786; needs dask.distributed, the 'cluster' extra); results do not depend on it."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for generation and Monte Carlo.")] = DEFAULT.seed,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = DEFAULT.device,
    threads: Annotated[
        int,
        typer.Option(help="Torch threads (0: leave torch's default). One is fastest on a small shared CPU."),
    ] = 1,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/measure"),
    cache: Annotated[Path | None, typer.Option(help="Logit cache directory; default OUT/cache.")] = None,
    report: Annotated[bool, typer.Option(help="Also write OUT/report.md.", metavar="")] = True,
    capture_only: Annotated[
        bool,
        typer.Option(
            "--capture-only",
            help="Only fill the logit cache (e.g. on a GPU machine), then stop; analyse later from "
            "the cache (--cache), anywhere.",
            metavar="",
        ),
    ] = False,
) -> None:
    """Measure acceptance rates and alpha* on a model pair (Hu et al. 2025, Table 1, Figs 1-2).

    p and q at every generated position are cached per (dataset, T, prompt): reruns resume.

    Rates are exact where the core allows; Monte Carlo otherwise (marked in the outputs).
    """
    from mdsd.experiments.parallel import dask_runner, default_workers, process_runner
    from mdsd.experiments.report import render_report
    from mdsd.experiments.sweep import run_sweep

    if any(t <= 0 for t in _floats(temperatures, "--temperatures")):
        fail("--temperatures must be > 0")
    if max_new_tokens < 1 or num_prompts < 1:
        fail("--max-new-tokens and --num-prompts must be >= 1")
    if mc_samples < 2:
        fail(f"--mc-samples must be >= 2, got {mc_samples}")
    if top_k < 0:
        fail(f"--top-k must be >= 0 (0: no truncation), got {top_k}")
    if subsample_positions < 0:
        fail(f"--subsample-positions must be >= 0 (0: every position), got {subsample_positions}")
    if workers is not None and workers < 1:
        fail(f"--workers must be >= 1, got {workers}")
    if workers is not None and cluster is not None:
        fail("give --workers or --cluster, not both")
    if prompts is not None and not prompts.is_file():
        fail(f"--prompts: file {str(prompts)!r} does not exist")
    for flag, value in (("--target", target), ("--draft", draft)):
        check_model_path(flag, value)
    config = MeasureConfig(
        target=target,
        draft=draft,
        prompts=str(prompts) if prompts else None,
        num_prompts=num_prompts,
        max_new_tokens=max_new_tokens,
        temperatures=_floats(temperatures, "--temperatures"),
        ns=_ints(n, "--n"),
        laws=_names(laws, LAWS, "law"),
        verifiers=_names(verifiers, VERIFIERS, "verifier"),
        top_k=top_k or None,
        seed=seed,
        device=device,
        mc_samples=mc_samples,
        threads=threads or None,
        subsample=_subsample(subsample),
        subsample_positions=subsample_positions or None,
    )
    count = default_workers() if workers is None else workers
    if cluster is not None:
        runner, described = dask_runner(cluster), f"Dask cluster {cluster}"
    else:
        runner, described = process_runner(count), f"{count} local process" + ("es" if count > 1 else "")
    # the capture runs here: on the CPU on as many processes (each loads the pair), on a GPU in one
    capture_workers = count if device == "cpu" else 1
    console = Console(stderr=True)
    command = "mdsd " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        with progress_display(console) as progress:
            run = run_sweep(
                config,
                out,
                cache_root=cache,
                command=command,
                progress=_progress_factory(progress),
                runner=runner,
                workers=described,
                capture_only=capture_only,
                capture_workers=capture_workers,
                warm_kernels=cluster is None,
            )
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(cli_message(err))
    if capture_only:
        console.print(
            f"cached {run['cache_dir']} in {run['wall_s']:.0f} s ({run['generated_files']} sequences "
            f"generated, {run['cached_files']} from cache); analyse with the same options and "
            "--cache pointing at the cache root"
        )
        return
    if report:
        render_report(out, replot=False)
    console.print(
        f"wrote {out}/results.csv, results.json, table1.md, figures"
        + (", report.md" if report else "")
        + f" in {run['wall_s']:.0f} s (analysis on {described}; {run['generated_files']} "
        f"sequences generated, {run['cached_files']} from cache)"
    )


@app.command("report")
def report_command(
    directory: Annotated[Path, typer.Argument(help="Output directory of `mdsd measure`.")],
    temperature: Annotated[float, typer.Option(help="Temperature of Table 1 and Figure 2.")] = 0.7,
    n: Annotated[int, typer.Option("--n", "-n", help="Drafts of Table 1 and Figure 1.")] = 3,
) -> None:
    """Render DIR/report.md (tables, figures, automatically checked findings) from DIR/results.*."""
    from mdsd.experiments.report import render_report

    try:
        path = render_report(directory, n=n, temperature=temperature)
    except FileNotFoundError as err:
        fail(str(err))
    Console(stderr=True).print(f"wrote {path}")
