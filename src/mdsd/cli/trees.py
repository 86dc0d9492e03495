"""``mdsd trees``: exact tokens per step of tree verifiers on real positions of a model pair."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mdsd.cli import app
from mdsd.cli.core import check_model_path, cli_message, fail, progress_display
from mdsd.experiments import trees


@app.command("trees")
def trees_command(
    target: Annotated[
        str | None, typer.Option("--target", help="Target model directory (default: bundled).")
    ] = None,
    draft: Annotated[
        str | None,
        typer.Option(
            "--draft",
            help="Draft model: directory, hub id or mdsd-bundled/draft-distilled (default: bundled).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (trees.md, trees.json, trees.png).")
    ] = Path("runs/trees"),
    temperatures: Annotated[str, typer.Option("--temperatures", "-t", help="Comma list.")] = "0.3,0.7,1.0",
    shapes: Annotated[str, typer.Option("--shapes", help="Semicolon list of trees.")] = ";".join(
        trees.DEFAULT_SHAPES
    ),
    rules: Annotated[
        str, typer.Option("--rules", help="Comma list: node:<verifier>, traversal, hybrid.")
    ] = ",".join(trees.DEFAULT_RULES),
    law: Annotated[
        str, typer.Option("--law", help="Draft law of trees (chains draw i.i.d.).")
    ] = "without_replacement",
    top_k: Annotated[int, typer.Option("--top-k", help="Top-k of the sampling transform (0 = none).")] = 50,
    prompts: Annotated[
        int, typer.Option("--prompts", help="Bundled held-out prompts (domains alternate).")
    ] = 8,
    positions: Annotated[int, typer.Option("--positions", help="Sampled positions per prompt.")] = 12,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the run.")] = 0,
    threads: Annotated[int, typer.Option("--threads", help="torch intra-op threads.")] = 1,
):
    """Score node-by-node, traversal and hybrid verification on the same drafted trees."""
    from mdsd._threads import set_threads
    from mdsd.models import bundled_prompts, load_pair

    try:
        temps = tuple(float(t) for t in temperatures.split(","))
    except ValueError:
        fail(f"--temperatures must be a comma list of numbers, got {temperatures!r}")
    if any(t <= 0 for t in temps):
        fail(f"--temperatures must be > 0 (verification at T = 0 is a plain match), got {temperatures!r}")
    for name, value in (("--prompts", prompts), ("--positions", positions)):
        if value < 1:
            fail(f"{name} must be >= 1, got {value}")
    if top_k < 0:
        fail(f"--top-k must be >= 0 (0 = no truncation), got {top_k}")
    shape_list = [s.strip() for s in shapes.split(";") if s.strip()]
    rule_list = [r.strip() for r in rules.split(",") if r.strip()]
    check_model_path("--target", target)
    check_model_path("--draft", draft)
    set_threads(threads)
    try:
        pair = load_pair(target=target, draft=draft)
        by_domain: dict[str, list[str]] = {}
        for row in bundled_prompts():
            by_domain.setdefault(row["domain"], []).append(row["prompt"])
        texts = [p for group in zip(*by_domain.values()) for p in group][:prompts]
        with progress_display(Console(stderr=True)) as progress:
            task = progress.add_task("trees", total=len(temps) * len(shape_list))
            rows = trees.measure_trees(
                pair,
                texts,
                temperatures=temps,
                shapes=shape_list,
                rules=rule_list,
                law=law,
                top_k=top_k or None,
                positions_per_prompt=positions,
                seed=seed,
                progress=lambda name: progress.update(task, advance=1, description=name),
            )
    except (ValueError, KeyError) as err:
        fail(cli_message(err).strip("'\""))
    out.mkdir(parents=True, exist_ok=True)
    table = trees.markdown_table(rows)
    command = (
        f"mdsd trees --temperatures {temperatures} --shapes '{shapes}' --rules {rules} --law {law} "
        f"--top-k {top_k} --prompts {prompts} --positions {positions} --seed {seed}"
    )
    (out / "trees.md").write_text(
        f"# Tree verifiers on real positions\n\nCommand: `{command}`\n\n"
        "Mean exact tokens per step given the drafted tree (positions x one tree each); in brackets "
        "the paired difference with the first rule of the shape, ± its standard error.\n\n" + table + "\n"
    )
    (out / "trees.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    trees.plot(rows, out / "trees.png")
    typer.echo(table)
    typer.echo(f"\nwrote {out}/trees.md, trees.json, trees.png")
