"""``mdsd bound`` and ``mdsd compare``: alpha* and verifier acceptance for one (p, q) pair."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from mdsd.acceptance import acceptance_rate
from mdsd.bound import optimal_bound
from mdsd.cli import app
from mdsd.io import random_pair, read_pair
from mdsd.laws import LAWS, get_law
from mdsd.verifiers import VERIFIERS

DEFAULT_RANDOM_VOCAB = 1000

TargetArg = Annotated[
    Path | None,
    typer.Argument(help="File with p (or both p and q: .npz/.json with keys p,q or a [2, V] array)."),
]
DraftArg = Annotated[Path | None, typer.Argument(help="File with q (if not in TARGET).")]
LogitsOpt = Annotated[bool, typer.Option("--logits", help="Inputs are logits, not probabilities.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="Temperature (0 = greedy).")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Keep the k most likely tokens.")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus mass to keep.")]
RandomOpt = Annotated[
    int | None, typer.Option("--random", help="Use a random LM-like pair with this vocabulary size.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for --random and Monte Carlo.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
NormOpt = Annotated[bool, typer.Option("--normalize", help="Renormalise inputs that do not sum to 1.")]


def parse_ns(text: str) -> list[int]:
    """'3' -> [3]; '2,3,4' -> [2, 3, 4]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"-n must be an integer or a comma list like 2,3,4, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"-n values must be >= 1, got {text!r}")
    return values


def parse_names(text: str | None, registry, what: str) -> list[str]:
    if text is None:
        return list(registry)
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in registry:
            raise typer.BadParameter(f"unknown {what} {name!r}; choose from {sorted(registry)}")
    return names


def load_inputs(target, draft, logits, temperature, top_k, top_p, random, seed):
    """(p, q, description) from files or --random (default: a random pair of V = 1000)."""
    if target is not None and random is not None:
        raise typer.BadParameter("give input files or --random, not both")
    if target is None:
        vocab = DEFAULT_RANDOM_VOCAB if random is None else random
        p, q = random_pair(vocab, seed, temperature=temperature, top_k=top_k, top_p=top_p)
        return p, q, f"random pair (V = {vocab}, seed = {seed})"
    p, q = read_pair(target, draft, logits=logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return p, q, str(target) + (f" / {draft}" if draft else "")


def console() -> Console:
    """A console wide enough for the tables even when stdout is not a terminal."""
    c = Console()
    return c if c.is_terminal else Console(width=140)


def fail(message: str) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def bound(
    target: TargetArg = None,
    draft: DraftArg = None,
    n: Annotated[str, typer.Option("-n", help="Number of drafts: 3 or a list 2,3,4.")] = "3",
    law: Annotated[str, typer.Option("--law", help=f"Draft law: {', '.join(LAWS)}.")] = "iid",
    logits: LogitsOpt = False,
    temperature: TempOpt = 1.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    random: RandomOpt = None,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    normalize: NormOpt = False,
):
    """Optimal acceptance rate alpha* of a draft law for one (p, q) pair."""
    try:
        p, q, source = load_inputs(target, draft, logits, temperature, top_k, top_p, random, seed)
        get_law(law)
        rows = []
        for k in parse_ns(n):
            result = optimal_bound(p, q, k, law, normalize=normalize)
            rows.append(
                {
                    "n": k,
                    "law": law,
                    "alpha_star": result.alpha,
                    "optimal_set_size": int(result.optimal_set.sum()),
                }
            )
    except ValueError as err:
        fail(str(err))
    if as_json:
        typer.echo(json.dumps({"source": source, "vocab_size": int(p.shape[-1]), "bounds": rows}))
        return
    table = Table(title=f"alpha* ({source})")
    for col in ("n", "law", "alpha*", "|H*|"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(str(row["n"]), row["law"], f"{row['alpha_star']:.6f}", str(row["optimal_set_size"]))
    console().print(table)


@app.command()
def compare(
    target: TargetArg = None,
    draft: DraftArg = None,
    n: Annotated[str, typer.Option("-n", help="Number of drafts: 3 or a list 2,3,4.")] = "2,3,4",
    laws: Annotated[str | None, typer.Option(help="Comma list of laws (default: all).")] = None,
    verifiers: Annotated[str | None, typer.Option(help="Comma list of verifiers (default: all).")] = None,
    logits: LogitsOpt = False,
    temperature: TempOpt = 1.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    random: RandomOpt = None,
    seed: SeedOpt = 0,
    samples: Annotated[int, typer.Option(help="Monte-Carlo draft sets where no exact method.")] = 4096,
    as_json: JsonOpt = False,
    normalize: NormOpt = False,
):
    """alpha* per draft law and every verifier's acceptance against the bound of its law."""
    try:
        p, q, source = load_inputs(target, draft, logits, temperature, top_k, top_p, random, seed)
        law_names = parse_names(laws, LAWS, "law")
        verifier_names = parse_names(verifiers, VERIFIERS, "verifier")
        results = [
            compare_one(p, q, k, law_names, verifier_names, seed, samples, normalize) for k in parse_ns(n)
        ]
    except ValueError as err:
        fail(str(err))
    if as_json:
        typer.echo(json.dumps({"source": source, "vocab_size": int(p.shape[-1]), "results": results}))
        return
    out = console()
    for res in results:
        table = Table(title=f"n = {res['n']} drafts — {source}")
        for col in ("verifier", "law", "acceptance", "method", "alpha* (law)", "gap"):
            table.add_column(col, justify="right" if col not in ("verifier", "law") else "left")
        for law, alpha in res["bounds"].items():
            table.add_row("[bold]bound[/bold]", law, "", "", f"{alpha:.6f}", "")
        for row in res["verifiers"]:
            method = row["method"]
            if method == "monte_carlo":
                method = f"MC ±{row['stderr']:.1e}"
            table.add_row(
                row["verifier"],
                row["law"],
                f"{row['acceptance']:.6f}",
                method,
                f"{row['bound']:.6f}",
                f"{row['gap']:.2e}",
            )
        out.print(table)


def applicable(law: str, q: np.ndarray, n: int) -> bool:
    try:
        get_law(law).check(q, n)
    except ValueError:
        return False
    return True


def compare_one(p, q, n, law_names, verifier_names, seed, samples, normalize):
    """alpha* per law and each verifier's acceptance under each of its laws, for n drafts."""
    bounds = {
        law: optimal_bound(p, q, n, law, normalize=normalize).alpha
        for law in law_names
        if applicable(law, q, n)
    }
    rows = []
    for name in verifier_names:
        for law in VERIFIERS[name].laws:
            if law not in bounds:
                continue
            rate = acceptance_rate(p, q, n, name, law, rng=seed, num_samples=samples, normalize=normalize)
            rows.append(
                {
                    "verifier": name,
                    "law": law,
                    "acceptance": rate.rate,
                    "stderr": rate.stderr,
                    "method": rate.method,
                    "bound": bounds[law],
                    "gap": bounds[law] - rate.rate,
                }
            )
    return {"n": n, "bounds": bounds, "verifiers": rows}
