"""``mdsd measure`` and ``mdsd report``: the paper's acceptance measurements on a model pair."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mdsd.cli import app
from mdsd.experiments.config import ALL_LAWS, DEFAULT, MeasureConfig
from mdsd.laws import LAWS
from mdsd.verifiers import VERIFIERS


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise typer.BadParameter(f"{what} must be a comma list of numbers, got {text!r}") from err
    if not values:
        raise typer.BadParameter(f"{what} is empty")
    return values


def _ints(text: str, what: str) -> tuple[int, ...]:
    values = _floats(text, what)
    if any(v != int(v) or v < 1 for v in values):
        raise typer.BadParameter(f"{what} must be positive integers, got {text!r}")
    return tuple(int(v) for v in values)


def _names(text: str | None, registry, what: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    for name in names:
        if name not in registry:
            raise typer.BadParameter(f"unknown {what} {name!r}; choose from {sorted(registry)}")
    return names


def _progress_factory(progress: Progress):
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
        str | None, typer.Option(help="Draft model (directory or hub id); default: bundled.")
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
    laws: Annotated[str, typer.Option(help="Comma list of draft laws.")] = ",".join(ALL_LAWS),
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
        int, typer.Option(help="Top-k of the sampling transform (0: full vocabulary; exact but much slower).")
    ] = DEFAULT.top_k,
    mc_samples: Annotated[
        int, typer.Option(help="Draft sets per position where no exact rate exists (Monte Carlo).")
    ] = DEFAULT.mc_samples,
    verifier_budget: Annotated[
        float,
        typer.Option(
            help="Analysis seconds per verifier over the sweep; slower verifiers are rated on a random "
            "subsample of positions (0: no limit)."
        ),
    ] = DEFAULT.verifier_budget,
    seed: Annotated[int, typer.Option(help="Seed for generation and Monte Carlo.")] = DEFAULT.seed,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = DEFAULT.device,
    threads: Annotated[
        int,
        typer.Option(help="Torch threads (0: leave torch's default). One is fastest on a small shared CPU."),
    ] = 1,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/measure"),
    cache: Annotated[Path | None, typer.Option(help="Logit cache directory; default OUT/cache.")] = None,
    report: Annotated[bool, typer.Option(help="Also write OUT/report.md.")] = True,
) -> None:
    """Measure acceptance rates and alpha* on a model pair (Hu et al. 2025, Table 1, Figs 1-2).

    p and q at every generated position are cached per (dataset, T, prompt): reruns resume.

    Rates are exact where the core allows; Monte Carlo otherwise (marked in the outputs).
    """
    from mdsd.experiments.report import render_report
    from mdsd.experiments.sweep import run_sweep

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
        verifier_budget=verifier_budget or None,
    )
    if any(t <= 0 for t in config.temperatures):
        raise typer.BadParameter("--temperatures must be > 0")
    if max_new_tokens < 1 or num_prompts < 1 or mc_samples < 2 or top_k < 0:
        raise typer.BadParameter(
            "--max-new-tokens, --num-prompts must be >= 1, --mc-samples >= 2, --top-k >= 0"
        )
    console = Console(stderr=True)
    command = "mdsd " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            run = run_sweep(
                config, out, cache_root=cache, command=command, progress=_progress_factory(progress)
            )
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    if report:
        render_report(out, replot=False)
    console.print(
        f"wrote {out}/results.csv, results.json, table1.md, figures"
        + (", report.md" if report else "")
        + f" in {run['wall_s']:.0f} s ({run['generated_files']} sequences generated, "
        f"{run['cached_files']} from cache)"
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
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    Console(stderr=True).print(f"wrote {path}")
