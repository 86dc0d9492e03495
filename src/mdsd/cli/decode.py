"""``mdsd generate`` and ``mdsd bench``: tree speculative decoding on a target/draft pair."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from typing import Annotated

import typer

from mdsd.cli import app
from mdsd.cli.core import check_model_path, cli_message, console, fail, progress_display, sampling_options

TargetOpt = Annotated[
    str | None, typer.Option("--target", help="Target model directory (default: the bundled target).")
]
DraftOpt = Annotated[
    str | None,
    typer.Option(
        "--draft",
        help="Draft model: directory, hub id or mdsd-bundled/draft-distilled (default: the bundled draft).",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
DtypeOpt = Annotated[
    str | None, typer.Option("--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU).")
]
TreeOpt = Annotated[
    str | None,
    typer.Option(
        "--tree",
        help="Widths per depth, e.g. 3,2,1 (or 3x4 = --drafts 3 --depth 4), or 'auto': the shape "
        "of highest predicted tokens/s from a calibration of the pair on this machine "
        "(possibly plain sampling).",
    ),
]
DraftsOpt = Annotated[int, typer.Option("--drafts", "-n", help="Drafts at the first position.")]
DepthOpt = Annotated[int, typer.Option("--depth", help="Tree depth (chains below the first level).")]
LawOpt = Annotated[str | None, typer.Option("--law", help="Draft law (default: the verifier's own law).")]
VerifierOpt = Annotated[str, typer.Option("--verifier", help="Verifier name.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="Temperature (0 = greedy).")]
TopKOpt = Annotated[
    int | None, typer.Option("--top-k", help="Keep the k most likely tokens (0: no truncation).")
]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus mass to keep.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-m", help="Tokens to generate.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the run (numpy Generator).")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="torch intra-op threads (default: torch's choice; 1 is often fastest "
        "for small models on a busy CPU).",
    ),
]
MatmulOpt = Annotated[
    str,
    typer.Option(
        "--matmul",
        help="Backend of the lean forward: auto (numba for float32 on the CPU, else torch), numba "
        "(compiled layers, small-row products on weight panels), numpy (numpy's BLAS), torch.",
    ),
]
DraftVocabOpt = Annotated[
    int | None,
    typer.Option(
        "--draft-vocab",
        help="Draft over its K most likely tokens only (a smaller draft output layer, still exact; "
        "default: the whole vocabulary).",
    ),
]
DraftWeightsOpt = Annotated[
    str,
    typer.Option(
        "--draft-weights",
        help="exact (the draft's own weights) or int8 (int8 weights and activations on the "
        "compiled CPU forward of a Llama-family draft: a faster draft, still exact).",
    ),
]
NoEosOpt = Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at end of sequence.", metavar="")]
SMALL_MACHINE_CORES = 4  # on this many cores or fewer, bench defaults to one torch thread


def _tree_text(tree: str | None, drafts: int, depth: int) -> str:
    return tree if tree is not None else f"{drafts}x{depth}"


def optimal_needs_top_k(config, top_k: int | None) -> bool:
    """True when ``optimal`` will fit priority orders over the whole vocabulary at every node
    (without replacement with >= 3 drafts, conditional Poisson): milliseconds per node at top-k
    50, seconds at a full vocabulary (docs/optimal.md)."""
    if config.verifier != "optimal" or top_k is not None:
        return False
    widest = 4 if config.tree is None else max(config.tree.widths)  # auto: up to 4 drafts
    return (config.law == "conditional_poisson" and widest >= 2) or (
        config.law == "without_replacement" and widest >= 3
    )


def _load(target, draft, device, dtype, threads):
    from mdsd._threads import set_threads
    from mdsd.models import load_pair

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        set_threads(threads)
    check_model_path("--target", target)
    check_model_path("--draft", draft)
    try:
        return load_pair(target=target, draft=draft, device=device, dtype=dtype)
    except OSError as err:  # hub ids that cannot be resolved, unreadable weights
        raise ValueError(
            f"cannot load the model pair ({target or 'bundled'}, {draft or 'bundled'}): {err}"
        ) from err


@contextlib.contextmanager
def _quiet_libraries():
    """Silence library deprecation notices during a bench (transformers logs one per HF assisted
    call, e.g. about generation_config, which tears the progress bar; they are not the user's to
    fix); restores the previous settings."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(previous)


def _bench_texts(prompts_file, domain, prompts) -> list[str]:
    """The prompts of a bench run: the first ``prompts`` of ``prompts_file`` (JSONL records with a
    ``prompt`` field like the bundled sets, or plain text, one prompt per line) or of the bundled
    held-out prompts (domains alternating unless ``domain`` is given)."""
    from mdsd.models import bundled_prompts

    if prompts_file is not None:
        rows = _read_prompts_file(prompts_file)
        if domain is not None:
            rows = [r for r in rows if r.get("domain") == domain]
            if not rows:
                raise ValueError(f"--prompts-file {str(prompts_file)!r} has no prompt of domain {domain!r}")
        return [r["prompt"] for r in rows][:prompts]
    rows = bundled_prompts(domain)
    if domain is None:  # alternate the domains
        by = {}
        for r in rows:
            by.setdefault(r["domain"], []).append(r["prompt"])
        return [t for group in zip(*by.values()) for t in group][:prompts]
    return [r["prompt"] for r in rows][:prompts]


def _read_prompts_file(path) -> list[dict]:
    """Records {'prompt', 'domain'?} from a .jsonl file, else one prompt per non-empty line."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts-file {str(path)!r} does not exist")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts-file {str(path)!r}: cannot read it ({err})") from None
    if not lines:
        raise ValueError(f"--prompts-file {str(path)!r} holds no prompt")
    if path.suffix.lower() != ".jsonl":
        return [{"prompt": line} for line in lines]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--prompts-file {str(path)!r} line {number}: not JSON ({err})") from None
        text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text:
            raise ValueError(f"--prompts-file {str(path)!r} line {number}: no 'prompt' string field")
        rows.append({"prompt": text, "domain": record.get("domain")})
    return rows


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    target: TargetOpt = None,
    draft: DraftOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = None,
    tree: TreeOpt = None,
    drafts: DraftsOpt = 3,
    depth: DepthOpt = 4,
    law: LawOpt = None,
    verifier: VerifierOpt = None,
    temperature: TempOpt = 0.7,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    max_new_tokens: MaxNewOpt = 128,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    matmul: MatmulOpt = "auto",
    draft_vocab: DraftVocabOpt = None,
    draft_weights: DraftWeightsOpt = "exact",
    ignore_eos: NoEosOpt = False,
    stats: Annotated[bool, typer.Option("--stats/--no-stats", help="Print metrics to stderr.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print text and metrics as JSON.")] = False,
):
    """Generate text with multi-draft tree speculative decoding (streams to stdout)."""
    from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder

    temperature, top_k, top_p = sampling_options(temperature, top_k, top_p, default_temperature=0.7)
    try:
        sampling = SamplingConfig(temperature, top_k, top_p, max_new_tokens, not ignore_eos)
        config = TreeConfig.make(_tree_text(tree, drafts, depth), law, verifier, draft_vocab, draft_weights)
        if optimal_needs_top_k(config, top_k):
            typer.echo(
                f"note: {config.describe()} fits priority orders over the whole vocabulary "
                "at every node (seconds each); --top-k 50 makes that ~1 ms.",
                err=True,
            )
        pair = _load(target, draft, device, dtype, threads)
        decoder = TreeDecoder(pair, config, sampling, matmul=matmul)
        if config.tree is None:  # --tree auto: calibrate on the prompt before streaming
            choice = decoder.choose_tree([prompt])
            typer.echo(
                f"auto tree: {choice.describe()} (predicted {choice.tokens_per_s:.1f} tokens/s, "
                f"{choice.predicted_speedup:.2f}x autoregressive)",
                err=True,
            )
        tok = pair.tokenizer
        shown = {"ids": [], "text": ""}

        def stream(_, new_ids):
            if as_json:
                return
            shown["ids"] += new_ids
            text = tok.decode(shown["ids"])
            sys.stdout.write(text[len(shown["text"]) :])
            sys.stdout.flush()
            shown["text"] = text

        if not as_json:
            sys.stdout.write(prompt)
        result = decoder.generate([prompt], seed=seed, on_tokens=stream)[0]
    except ValueError as err:
        fail(cli_message(err))
    choice = decoder.auto_choice
    described = config.describe()
    if choice is not None:  # --tree auto: name what ran
        described = f"{described}: {choice.describe()}"
    metrics = result.stats.as_dict() | {"stop_reason": result.stop_reason, "config": described}
    if as_json:
        typer.echo(
            json.dumps(
                {"prompt": prompt, "text": result.text, "token_ids": result.token_ids, "metrics": metrics}
            )
        )
        return
    sys.stdout.write("\n")
    if stats:
        s = result.stats
        if s.steps:  # a tree ran
            depth_acc = ", ".join(f"{a:.2f}" for a in s.acceptance_by_depth)
            tree = f"{s.block_efficiency:.2f} tokens/step, acceptance by depth [{depth_acc}], "
        else:  # --tree auto chose plain sampling
            tree = ""
        typer.echo(
            f"[{described}] {s.new_tokens} tokens, {s.target_calls} target calls, {tree}"
            f"{s.tokens_per_second:.1f} tokens/s (draft {s.draft_time:.2f}s, target "
            f"{s.target_time:.2f}s, verify {s.verify_time:.2f}s); stop: {result.stop_reason}",
            err=True,
        )


@app.command()
def bench(
    target: TargetOpt = None,
    draft: DraftOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = None,
    config: Annotated[
        list[str] | None,
        typer.Option(
            "--config",
            "-c",
            help="LAW:VERIFIER:TREE[:DRAFT_VOCAB], repeatable (default: single-draft chains and "
            "multi-draft trees, plus a 1x2 chain and the auto tree with the draft over a quarter of "
            "the vocabulary).",
        ),
    ] = None,
    prompts: Annotated[int, typer.Option("--prompts", help="Number of prompts.")] = 6,
    prompts_file: Annotated[
        str | None,
        typer.Option(
            "--prompts-file",
            help="Prompts to use: JSONL like the bundled sets ({'prompt': ..., 'domain': ...}) or "
            "plain text, one prompt per line (default: the bundled held-out prompts).",
        ),
    ] = None,
    domain: Annotated[
        str | None, typer.Option("--domain", help="Prompt domain (code, prose; default: alternate both).")
    ] = None,
    temperature: TempOpt = 0.7,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    max_new_tokens: MaxNewOpt = 64,
    seed: SeedOpt = 0,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help=f"torch intra-op threads (default: 1 on machines with <= {SMALL_MACHINE_CORES} cores, "
            "else torch's choice). CPU speedups depend on it.",
        ),
    ] = None,
    matmul: MatmulOpt = "auto",
    draft_vocab: DraftVocabOpt = None,
    draft_weights: DraftWeightsOpt = "exact",
    repeats: Annotated[
        int,
        typer.Option(
            "--repeats",
            help="Decode each prompt this many times per method and keep the fastest run (the "
            "tokens are the same each time; filters out a shared machine's slow spells).",
        ),
    ] = 1,
    no_hf: Annotated[bool, typer.Option("--no-hf", help="Skip HF assisted generation.", metavar="")] = False,
    ignore_eos: Annotated[
        bool,
        typer.Option(
            "--ignore-eos/--stop-at-eos",
            help="Generate max-new-tokens per prompt (equal work per method) or stop at end of sequence.",
            metavar="",
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.", metavar="")] = False,
):
    """Autoregressive vs HF assisted generation vs mdsd trees: same prompts, seeds, transform."""
    import os

    from rich.console import Console
    from rich.table import Table

    from mdsd.engine import SamplingConfig, TreeConfig
    from mdsd.engine.bench import auto_note, default_configs, prefill_note, run_bench

    temperature, top_k, top_p = sampling_options(temperature, top_k, top_p, default_temperature=0.7)
    if threads is None and (os.cpu_count() or 1) <= SMALL_MACHINE_CORES:
        threads = 1
    try:
        sampling = SamplingConfig(temperature, top_k, top_p, max_new_tokens, not ignore_eos)
        configs = [TreeConfig.from_spec(c, draft_vocab, draft_weights) for c in config or []]
        if prompts < 1:
            raise ValueError(f"--prompts must be >= 1, got {prompts}")
        if repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {repeats}")
        texts = _bench_texts(prompts_file, domain, prompts)
        pair = _load(target, draft, device, dtype, threads)
        configs = configs or default_configs(int(pair.target.config.vocab_size), draft_vocab, draft_weights)
        methods = (1 if no_hf else 2) + len(configs)
        with (
            progress_display(Console(stderr=True), disable=as_json, transient=True) as progress,
            _quiet_libraries(),
        ):
            task = progress.add_task("bench", total=methods * len(texts) * repeats)

            def tick(name):
                progress.update(task, advance=1, description=name[:40])

            result = run_bench(
                pair,
                texts,
                sampling,
                configs,
                seed=seed,
                hf=not no_hf,
                matmul=matmul,
                repeats=repeats,
                progress=tick,
            )
    except ValueError as err:
        fail(cli_message(err))
    if as_json:
        typer.echo(
            json.dumps(
                {"pair": pair.name, "prompts": len(texts), "sampling": sampling.__dict__, "rows": result}
            )
        )
        return
    table = Table(
        title=f"{pair.name}: {len(texts)} prompts, T = {temperature}, top-k {top_k}, "
        f"top-p {top_p}, {max_new_tokens} new tokens, seed {seed}, {threads or 'default'} torch threads"
        + (f", fastest of {repeats} runs per prompt" if repeats > 1 else "")
    )
    for col in (
        "method",
        "tokens",
        "target calls",
        "tokens/call",
        "tokens/step",
        "accept by depth",
        "draft/target/verify s",
        "AR steps: draft level/target/other",
        "tokens/s",
        "vs AR",
        "vs AR, decoding only",
        "vs HF",
    ):
        table.add_column(col, justify="right" if col != "method" else "left")

    def f(x, fmt):
        return "-" if x is None or x != x else format(x, fmt)

    for r in result:
        depth = ",".join(f"{a:.2f}" for a in r["acceptance_by_depth"]) or "-"
        table.add_row(
            r["method"],
            str(r["new_tokens"]),
            str(r["target_calls"]),
            f(r["tokens_per_call"], ".2f"),
            f(r["block_efficiency"], ".2f"),
            depth,
            "/".join(f(r[k], ".2f") for k in ("draft_time_s", "target_time_s", "verify_time_s")),
            "/".join(
                f(r.get(k), ".2f")
                for k in ("draft_level_ar_steps", "target_forward_ar_steps", "overhead_ar_steps")
            ),
            f(r["tokens_per_second"], ".1f"),
            f(r["speedup_vs_autoregressive"], ".2f"),
            f(r.get("decode_speedup_vs_autoregressive"), ".2f"),
            f(r["speedup_vs_hf_assisted"], ".2f"),
        )
    wide = console()
    if not wide.is_terminal:
        wide = Console(width=200)
    wide.print(table)
    note = prefill_note(result)
    if note:
        wide.print(note)
    for r in result:
        if "chosen_tree" in r:
            wide.print(auto_note(r))
