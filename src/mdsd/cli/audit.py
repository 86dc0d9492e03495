"""``mdsd audit``: test a verifier, tree verifier or decoder for losslessness (mdsd.testing).

Exit codes: 0 the audit passed; 1 it found a loss, or the function failed (raised, returned a
non-token); 2 usage error (bad option, target not importable).
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.table import Table

from mdsd.cli import app
from mdsd.cli.core import console, fail
from mdsd.laws import LAWS

KINDS = ("token", "tree", "decoder")
SHOWN_ROWS = 20  # table rows: the failing and the closest calls


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{what} must be a comma list of integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what} must not be empty")
    return values


def resolve_target(target: str, kind: str, law: str | None, widths):
    """The callable to audit: ``MODULE:FUNCTION``, ``path/file.py:FUNCTION``, ``mdsd:VERIFIER``
    (one of mdsd's verifiers: batched at token level, node by node in trees, in the TreeDecoder
    for decoders) or, for tree audits, ``mdsd:METHOD`` (``mdsd.tree_verify`` with method node,
    traversal or hybrid). Returns (fn, batched). Raises ValueError in one line."""
    from mdsd.sequence import TREE_METHODS
    from mdsd.testing import engine_generate_fn, node_by_node, tree_method_fn, verifier_fn
    from mdsd.testing._calls import load_function
    from mdsd.verifiers import VERIFIERS

    if kind == "tree" and target.startswith("mdsd:") and target[5:] in TREE_METHODS:
        return tree_method_fn(target[5:]), False
    if target.startswith("mdsd:") and target[5:] in VERIFIERS:
        name = target[5:]
        if kind == "token":
            return verifier_fn(name, law), True
        if kind == "tree":
            return node_by_node(verifier_fn(name, law)), False
        return engine_generate_fn(",".join(map(str, widths)), law, name), False
    return load_function(target), False


@app.command()
def audit(
    target: Annotated[
        str,
        typer.Argument(
            help="MODULE:FUNCTION, path/to/file.py:FUNCTION, mdsd:VERIFIER (mdsd's own), or with "
            "--kind tree mdsd:node / mdsd:traversal / mdsd:hybrid (mdsd.tree_verify)."
        ),
    ],
    kind: Annotated[str, typer.Option("--kind", help="token, tree or decoder.")] = "token",
    law: Annotated[str | None, typer.Option("--law", help=f"Draft law: {', '.join(LAWS)}.")] = None,
    n: Annotated[int, typer.Option("-n", help="Drafts per position (token audits).")] = 3,
    trials: Annotated[
        int | None, typer.Option("--trials", help="Per case: emissions, trees or generations.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every draw.")] = 0,
    batched: Annotated[bool, typer.Option("--batched", help="fn takes [B, V], [B, V], [B, n].")] = False,
    vocab_sizes: Annotated[
        str | None, typer.Option("--vocab-sizes", help="Comma list (token default 3,5,50,1000; tree 3,4).")
    ] = None,
    widths: Annotated[str, typer.Option("--widths", help="Tree widths per depth (tree, decoder).")] = "2,1",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Decoder: tokens per run.")] = 2,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Decoder temperature.")] = 1.0,
    exhaustive: Annotated[bool, typer.Option("--exhaustive", help="Run every case after a loss.")] = False,
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="Decoder: torch intra-op threads (1 is fastest for tiny models)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    save_worst: Annotated[
        str | None, typer.Option("--save-worst", help="Write the worst case to FILE (.npz or .json).")
    ] = None,
):
    """Test a verifier or decoder for losslessness against the exact target law."""
    from mdsd.testing import audit_decoder, audit_tree_verifier, audit_verifier

    start = time.perf_counter()
    try:
        if kind not in KINDS:
            raise ValueError(f"unknown --kind {kind!r}; choose one of {list(KINDS)}")
        if kind != "decoder" and law is None:
            raise ValueError("--law is required for token and tree audits")
        if save_worst is not None and not save_worst.endswith((".npz", ".json")):
            raise ValueError(f"--save-worst must end in .npz or .json, got {save_worst!r}")
        tree_widths = _int_list(widths, "--widths")
        fn, is_mdsd_batched = resolve_target(target, kind, law, tree_widths)
        sizes = _int_list(vocab_sizes, "--vocab-sizes") if vocab_sizes else None
        common = {"seed": seed, "name": target}
        if kind == "token":
            extra = {"vocab_sizes": sizes} if sizes else {}
            result = audit_verifier(
                fn, law=law, n=n, trials=trials, batched=batched or is_mdsd_batched,
                exhaustive=exhaustive, **extra, **common,
            )  # fmt: skip
        elif kind == "tree":
            extra = {"vocab_sizes": sizes} if sizes else {}
            result = audit_tree_verifier(
                fn, law=law, widths=tree_widths, trials=trials, exhaustive=exhaustive, **extra, **common
            )
        else:
            if threads is not None:
                from mdsd._threads import set_threads

                set_threads(max(1, threads))
            result = audit_decoder(
                fn, max_new_tokens=max_new_tokens, runs=trials, temperature=temperature, **common
            )
    except ValueError as err:
        fail(str(err))
    elapsed = time.perf_counter() - start
    if save_worst is not None and result.worst is not None:
        result.worst.save(save_worst)
    if as_json:
        out = result.as_dict()
        out["elapsed_s"] = round(elapsed, 2)
        typer.echo(json.dumps(out))
    else:
        _print(result, elapsed, save_worst)
    raise typer.Exit(0 if result.passed else 1)


def _print(result, elapsed: float, save_worst: str | None) -> None:
    out = console()
    lines = result.summary().splitlines()
    out.print(lines[0], markup=False, highlight=False)
    if result.status != "error":
        out.print(_table(result))
    style = "bold green" if result.passed else "bold red"
    out.print(lines[1], style=style, markup=False, highlight=False)
    for line in lines[2:]:
        out.print(line, markup=False, highlight=False)
    saved = f"; worst case saved to {save_worst}" if save_worst and result.worst is not None else ""
    out.print(f"({elapsed:.1f} s{saved})", markup=False, highlight=False)


def _table(result) -> Table:
    rows = [r for r in result.rows if r.status != "skipped"]
    shown = sorted(rows, key=lambda r: r.pvalue)[:SHOWN_ROWS]
    table = Table(
        title=f"cases (per-test threshold {result.threshold:.2g}; {len(shown)} of {len(rows)} shown)"
    )
    for col in ("case", "V", "trials", "G-test p", "TV [95% CI]", "accept", "alpha*", "accept p", "verdict"):
        table.add_column(col, justify="left" if col in ("case", "verdict") else "right")
    for r in shown:
        accept = "-" if r.acceptance != r.acceptance or r.bound != r.bound else f"{r.acceptance:.4f}"
        bound = "-" if r.bound != r.bound else f"{r.bound:.4f}"
        verdict = "ok" if r.status == "ok" else f"LOSS: {r.note}"
        table.add_row(
            r.name, str(r.vocab), str(r.trials), f"{r.law_pvalue:.2g}",
            f"{r.tv:.4f} [{r.tv_low:.4f}, {r.tv_high:.4f}]", accept, bound,
            "-" if bound == "-" else f"{r.acceptance_pvalue:.2g}", verdict,
        )  # fmt: skip
    return table
