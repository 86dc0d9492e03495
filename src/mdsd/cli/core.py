"""``mdsd bound`` and ``mdsd compare``: alpha* and verifier acceptance for one (p, q) pair (or a
batch of pairs, [B, V] files); plus the helpers every command shares (errors, progress, the
sampling-transform options)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from mdsd.acceptance import acceptance_rate
from mdsd.bound import optimal_bound
from mdsd.cli import app
from mdsd.experiments.vocabulary import sort_laws, verifier_rank
from mdsd.io import random_pair, read_pair
from mdsd.laws import LAWS, get_law
from mdsd.verifiers import VERIFIERS

DEFAULT_RANDOM_VOCAB = 1000

TargetArg = Annotated[
    Path | None,
    typer.Argument(help="File with p (or both p and q: .npz/.json with keys p,q or a [2, V] array)."),
]
DraftArg = Annotated[Path | None, typer.Argument(help="File with q (if not in TARGET).")]
LogitsOpt = Annotated[
    bool, typer.Option("--logits", help="Inputs are logits, not probabilities.", metavar="")
]
TempOpt = Annotated[
    float | None,
    typer.Option("--temperature", "-t", help="Temperature of the logits (--logits or --random; default 1)."),
]
TopKOpt = Annotated[
    int | None,
    typer.Option("--top-k", help="Keep the k most likely tokens (--logits or --random; 0: no truncation)."),
]
TopPOpt = Annotated[
    float | None, typer.Option("--top-p", help="Nucleus mass to keep, in (0, 1] (--logits or --random).")
]
RandomOpt = Annotated[
    int | None, typer.Option("--random", help="Use a random LM-like pair with this vocabulary size.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for --random and Monte Carlo.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.", metavar="")]
NormOpt = Annotated[
    bool, typer.Option("--normalize", help="Renormalise inputs that do not sum to 1.", metavar="")
]


def parse_ns(text: str) -> list[int]:
    """'3' -> [3]; '2,3,4' -> [2, 3, 4] (no empty items: '2,,3' is refused)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"-n must be an integer or a comma list like 2,3,4, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"-n values must be >= 1, got {text!r}")
    return values


def parse_names(text: str | None, registry, what: str) -> list[str]:
    """'a,b' -> ['a', 'b'], each checked against the registry; None -> every registered name."""
    if text is None:
        return list(registry)
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in registry:
            raise ValueError(f"unknown {what} {name!r}; choose from {sorted(registry)}")
    return names


def fail(message: str) -> None:
    """Print a one-line error and exit with code 2 (a usage error)."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    typer.echo(f"Error: {lines[0] if lines else 'failed'}", err=True)
    raise typer.Exit(2)


def cli_message(err: Exception) -> str:
    """A library error phrased for the command line (keyword arguments -> flags: a message that
    starts with ``target=``/``draft=``, e.g. ``mdsd.models.resolve_source``'s, or with
    ``max_new_tokens``, ``SamplingConfig``'s, names the option)."""
    message = str(err).replace("Pass normalize=True to renormalise", "Pass --normalize to renormalise")
    if message.startswith("max_new_tokens "):
        return "--max-new-tokens" + message[len("max_new_tokens") :]
    for argument in ("target", "draft"):
        if message.startswith(f"{argument}="):
            return f"--{argument} {message[len(argument) + 1 :]}"
        if message.startswith(f"{argument}:"):
            return f"--{argument}{message[len(argument) :]}"
    return message


def sampling_options(temperature, top_k, top_p, *, default_temperature: float = 1.0):
    """(temperature, top_k, top_p) checked with the flags' names; top-k 0 means no truncation
    (None), the one meaning of 0 in every command."""
    temperature = default_temperature if temperature is None else temperature
    if not temperature >= 0 or temperature == float("inf"):
        fail(f"--temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        fail(f"--top-k must be >= 0 (0: no truncation), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        fail(f"--top-p must be in (0, 1], got {top_p}")
    return temperature, (top_k or None), top_p


def check_model_path(flag: str, value: str | None) -> None:
    """Refuse a --target/--draft value that looks like a local path but does not exist (hub ids,
    ``org/name``, go through to the loader)."""
    if value is None:
        return
    path = Path(value).expanduser()
    looks_local = (
        value.startswith((".", "/", "~"))
        or value.endswith(("/", os.sep))
        or value.count("/") > 1
        or "\\" in value
    )
    if path.exists():
        if not path.is_dir():
            fail(f"{flag}: {value!r} is a file; give a model directory or a hub id")
    elif looks_local:
        fail(f"{flag}: directory {value!r} does not exist")


class PlainProgress:
    """Progress as plain lines (when stderr is not a terminal, e.g. piped to a file): the same
    ``add_task``/``update`` interface as ``rich.progress.Progress``; one line per update."""

    def __init__(self, console: Console):
        self.console = console
        self.tasks: dict[int, list] = {}
        self.start = time.perf_counter()

    def add_task(self, description: str, total: int | None = None, **_) -> int:
        self.tasks[len(self.tasks)] = [description, total, 0]
        return len(self.tasks) - 1

    def update(self, task: int, advance: int = 0, description: str | None = None, **_) -> None:
        entry = self.tasks[task]
        entry[2] += advance
        label = description or entry[0]
        total = f"/{entry[1]}" if entry[1] else ""
        elapsed = time.perf_counter() - self.start
        self.console.print(f"[{elapsed:6.0f} s] {entry[2]}{total} {label}", highlight=False, markup=False)


@contextlib.contextmanager
def progress_display(console: Console, *, disable: bool = False, transient: bool = False):
    """A rich progress bar on a terminal, plain progress lines otherwise (nothing if disabled)."""
    if disable:
        yield PlainProgress(Console(file=open(os.devnull, "w")))  # noqa: SIM115
        return
    if not console.is_terminal:
        yield PlainProgress(console)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=transient) as progress:
        yield progress


def load_inputs(target, draft, logits, temperature, top_k, top_p, random, seed):
    """(p, q, description) from files or --random (default: a random pair of V = 1000); p and q
    are [V] or [B, V] (a file with more leading axes is flattened to rows)."""
    if target is not None and random is not None:
        raise ValueError("give input files or --random, not both")
    if target is not None and not logits:
        given = [
            flag
            for flag, value in (("--temperature", temperature), ("--top-k", top_k), ("--top-p", top_p))
            if value is not None
        ]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            fail(f"{', '.join(given)} {verb} to logits: add --logits (the files hold probabilities)")
    temperature, top_k, top_p = sampling_options(temperature, top_k, top_p)
    if target is None:
        vocab = DEFAULT_RANDOM_VOCAB if random is None else random
        p, q = random_pair(vocab, seed, temperature=temperature, top_k=top_k, top_p=top_p)
        return p, q, f"random pair (V = {vocab}, seed = {seed})"
    p, q = read_pair(target, draft, logits=logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if p.shape != q.shape:
        raise ValueError(
            f"TARGET and DRAFT must have the same shape (same vocabulary), got {p.shape} and {q.shape}"
        )
    if p.ndim > 2:
        p, q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    return p, q, str(target) + (f" / {draft}" if draft else "")


def console() -> Console:
    """A console wide enough for the tables even when stdout is not a terminal."""
    c = Console()
    return c if c.is_terminal else Console(width=140)


def _values(x) -> float | list[float]:
    """A float for one pair, a list for a batch (JSON)."""
    arr = np.asarray(x, dtype=np.float64)
    return float(arr) if arr.ndim == 0 else arr.tolist()


def _summary(x) -> str:
    """'0.812345' for one pair; 'mean (min–max)' for a batch (table cells)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0:
        return f"{float(arr):.6f}"
    return f"{arr.mean():.6f} ({arr.min():.4f}–{arr.max():.4f})"


def _batch_and_caption(p: np.ndarray, source: str) -> tuple[int | None, str]:
    """The number of [B, V] rows (None for one [V] pair) and the tables' caption of the inputs."""
    batch = int(p.shape[0]) if p.ndim == 2 else None
    return batch, (f"{source}, {batch} rows: mean (min–max)" if batch else source)


def _echo_json(p: np.ndarray, source: str, **fields) -> None:
    """Print the --json output of ``bound`` / ``compare``: the inputs' description, then ``fields``."""
    batch, _ = _batch_and_caption(p, source)
    typer.echo(json.dumps({"source": source, "vocab_size": int(p.shape[-1]), "batch": batch} | fields))


@app.command()
def bound(
    target: TargetArg = None,
    draft: DraftArg = None,
    n: Annotated[str, typer.Option("-n", help="Number of drafts: 3 or a list 2,3,4.")] = "3",
    law: Annotated[str, typer.Option("--law", help=f"Draft law: {', '.join(LAWS)}.")] = "iid",
    logits: LogitsOpt = False,
    temperature: TempOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    random: RandomOpt = None,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    normalize: NormOpt = False,
):
    """Optimal acceptance rate alpha* of a draft law for one (p, q) pair, or per row of [B, V]
    inputs (the table shows the mean (min–max); --json lists every row)."""
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
                    "alpha_star": _values(result.alpha),
                    "optimal_set_size": np.asarray(result.optimal_set).sum(axis=-1).tolist(),
                }
            )
    except ValueError as err:
        fail(cli_message(err))
    batch, what = _batch_and_caption(p, source)
    if as_json:
        _echo_json(p, source, bounds=rows)
        return
    table = Table(title=f"alpha* ({what})")
    for col in ("n", "law", "alpha*", "|H*|"):
        table.add_column(col, justify="right")
    for row in rows:
        size = row["optimal_set_size"]
        size_text = str(size) if batch is None else f"{np.mean(size):.1f} (mean)"
        table.add_row(str(row["n"]), row["law"], _summary(row["alpha_star"]), size_text)
    console().print(table)


@app.command()
def compare(
    target: TargetArg = None,
    draft: DraftArg = None,
    n: Annotated[str, typer.Option("-n", help="Number of drafts: 3 or a list 2,3,4.")] = "2,3,4",
    laws: Annotated[str | None, typer.Option(help="Comma list of laws (default: all).")] = None,
    verifiers: Annotated[str | None, typer.Option(help="Comma list of verifiers (default: all).")] = None,
    logits: LogitsOpt = False,
    temperature: TempOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    random: RandomOpt = None,
    seed: SeedOpt = 0,
    samples: Annotated[int, typer.Option(help="Monte-Carlo draft sets where no exact method.")] = 4096,
    as_json: JsonOpt = False,
    normalize: NormOpt = False,
):
    """alpha* per draft law and every verifier's acceptance against the bound of its law, for one
    (p, q) pair or per row of [B, V] inputs (the table shows the mean (min–max); --json lists
    every row)."""
    try:
        p, q, source = load_inputs(target, draft, logits, temperature, top_k, top_p, random, seed)
        law_names = sort_laws(parse_names(laws, LAWS, "law"))
        verifier_names = sorted(parse_names(verifiers, VERIFIERS, "verifier"), key=verifier_rank)
        if samples < 2:
            raise ValueError(f"--samples must be >= 2, got {samples}")
        results = [
            compare_one(p, q, k, law_names, verifier_names, seed, samples, normalize) for k in parse_ns(n)
        ]
    except ValueError as err:
        fail(cli_message(err))
    if as_json:
        _echo_json(p, source, results=results)
        return
    _, what = _batch_and_caption(p, source)
    out = console()
    for res in results:
        table = Table(title=f"n = {res['n']} drafts — {what}")
        for col in ("verifier", "law", "acceptance", "method", "alpha* (law)", "gap"):
            table.add_column(col, justify="right" if col not in ("verifier", "law") else "left")
        for law, alpha in res["bounds"].items():
            table.add_row("[bold]bound[/bold]", law, "", "", _summary(alpha), "")
        for row in res["verifiers"]:
            method = row["method"]
            if method == "monte_carlo":
                stderr = np.asarray(row["stderr"], dtype=np.float64)
                # standard error of the mean over rows (independent estimates)
                method = f"MC ±{np.sqrt((stderr**2).sum()) / max(stderr.size, 1):.1e}"
            gap = np.asarray(row["gap"], dtype=np.float64)
            table.add_row(
                row["verifier"],
                row["law"],
                _summary(row["acceptance"]),
                method,
                _summary(row["bound"]),
                f"{gap.mean():.2e}",
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
        law: np.asarray(optimal_bound(p, q, n, law, normalize=normalize).alpha, dtype=np.float64)
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
                    "acceptance": _values(rate.rate),
                    "stderr": _values(rate.stderr),
                    "method": rate.method,
                    "bound": _values(bounds[law]),
                    "gap": _values(bounds[law] - np.asarray(rate.rate)),
                }
            )
    return {"n": n, "bounds": {law: _values(alpha) for law, alpha in bounds.items()}, "verifiers": rows}
