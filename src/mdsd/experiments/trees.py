"""Tokens per step of tree verifiers on real positions of a model pair (``mdsd trees``).

For each temperature, text is sampled from the target after each prompt; at every sampled
position the draft model drafts one tree of each shape exactly as the engine does
(``TreeDecoder.draft_tree``: the pair's own q at every node, the configured law), the target gives
p at the root and every node (one tree forward), and every verification rule is scored on that
same drafted tree by its *exact* expected tokens per step given the drafts
(``mdsd.sequence.tree_emission_law`` then ``expected_block_length``). Averaging over positions
estimates E[tokens per step]; sharing the drafted trees between rules makes the differences
between rules far less noisy than the rates themselves (paired differences, with their standard
errors).

Rules: node-by-node verification with each token-level verifier given (``node:<verifier>``),
Traversal Verification (``traversal``, arXiv 2505.12398) and the hybrid (``hybrid``: node steps
at branching nodes, block verification on chains). On chains (widths 1,...,1) traversal is block
verification (arXiv 2403.10444) and ``node:rrs`` token-by-token verification.
Everything is a function of the arguments and the seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_SHAPES = ("1x2", "1x3", "1x4", "1x5", "2x3", "3x3", "3,2,1")
DEFAULT_TEMPERATURES = (0.3, 0.7, 1.0)
DEFAULT_RULES = ("node:rrs", "node:rrs_without_replacement", "node:optimal", "traversal", "hybrid")


@dataclass(frozen=True)
class TreeRow:
    """Mean exact tokens per step of one rule on one shape at one temperature.

    tokens_per_step: mean over positions of E[tokens emitted | drafted tree].
    stderr:          its standard error over positions.
    gain:            mean paired difference with the first rule of the run (0 for it).
    gain_stderr:     standard error of that paired difference.
    """

    temperature: float
    shape: str
    rule: str
    positions: int
    tokens_per_step: float
    stderr: float
    gain: float
    gain_stderr: float


def _rule_law(rule: str, shape_widths: tuple[int, ...], law: str) -> str:
    """The draft law of a rule: single-draft chains draw i.i.d.; trees use ``law``."""
    return "iid" if all(w == 1 for w in shape_widths) else law


def _contexts(pair, prompts, sampling, positions_per_prompt: int, rng) -> list[list[int]]:
    """Contexts at positions of text sampled from the target (plain sampling, seeded)."""
    from mdsd.engine import Autoregressive

    sampler = Autoregressive(pair, sampling)
    out = []
    for prompt in prompts:
        generation = sampler.generate_one(prompt, rng)
        ids = generation.prompt_ids + generation.token_ids
        base = len(generation.prompt_ids)
        out.extend(ids[: base + i] for i in range(min(positions_per_prompt, len(generation.token_ids))))
    return out


def _scores(decoder, context: list[int], rules: Sequence[str], rng) -> list[float]:
    """Exact expected tokens per step of every rule on one tree drafted after ``context``."""
    from mdsd.sequence import expected_block_length, tree_emission_law

    for runner in (decoder.target, decoder.draft):
        runner.reset(len(context) + decoder.tree.num_nodes + 2)
    drafted = decoder.draft_tree(context, rng)
    logits = decoder.target.logits(decoder.target_hidden(context, drafted))  # [N + 1, V]
    tree, _ = decoder.sequence_tree(drafted, lambda node: decoder.sampling.row_probs(logits[node + 1]))
    out = []
    for rule in rules:
        method, _, verifier = rule.partition(":")
        law = tree_emission_law(tree, method, verifier or None)
        out.append(expected_block_length(law))
    return out


def measure_trees(
    pair,
    prompts: Sequence,
    *,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    rules: Sequence[str] = DEFAULT_RULES,
    law: str = "without_replacement",
    top_k: int | None = 50,
    positions_per_prompt: int = 16,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[TreeRow]:
    """Score every rule on the same drafted trees (see the module docstring); rows per
    (temperature, shape, rule). Rules on a chain that need several drafts per node are skipped."""
    from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder

    rows = []
    for t_index, temperature in enumerate(temperatures):
        sampling = SamplingConfig(temperature, top_k, None, max_new_tokens=positions_per_prompt)
        rng = np.random.default_rng([seed, t_index])
        with torch.inference_mode():
            contexts = _contexts(pair, prompts, sampling, positions_per_prompt, rng)
            for shape in shapes:
                widths = TreeConfig.make(shape).tree.widths
                shape_law = _rule_law("", widths, law)
                shape_rules = [r for r in rules if _applies(r, shape_law)]
                decoder = TreeDecoder(
                    pair, TreeConfig.make(shape, shape_law, "traversal"), sampling, check_attention=False
                )
                scores = np.array([_scores(decoder, c, shape_rules, rng) for c in contexts])  # [P, R]
                rows += _summarise(temperature, shape, shape_rules, scores)
                if progress:
                    progress(f"T = {temperature}, {shape}")
    return rows


def _applies(rule: str, law: str) -> bool:
    """Whether a rule is exact for the law (node verifiers name their laws)."""
    from mdsd.verifiers import VERIFIERS

    method, _, verifier = rule.partition(":")
    if method != "node":
        return True
    return law in VERIFIERS[verifier].laws


def _summarise(temperature, shape, rules, scores) -> list[TreeRow]:
    positions = scores.shape[0]
    root = np.sqrt(max(positions, 1))
    first = scores[:, 0]
    out = []
    for j, rule in enumerate(rules):
        diff = scores[:, j] - first
        out.append(
            TreeRow(
                float(temperature),
                shape,
                rule,
                positions,
                float(scores[:, j].mean()),
                float(scores[:, j].std(ddof=1) / root) if positions > 1 else float("nan"),
                float(diff.mean()),
                float(diff.std(ddof=1) / root) if positions > 1 else float("nan"),
            )
        )
    return out


def markdown_table(rows: Sequence[TreeRow]) -> str:
    """Rows as a Markdown table: shape x rule, one column per temperature."""
    temperatures = sorted({r.temperature for r in rows})
    lines = [
        "| shape | rule | " + " | ".join(f"T = {t}" for t in temperatures) + " |",
        "|---|---|" + "---|" * len(temperatures),
    ]
    key = {(r.shape, r.rule, r.temperature): r for r in rows}
    shapes = list(dict.fromkeys(r.shape for r in rows))
    pairs = list(dict.fromkeys((r.shape, r.rule) for r in rows))  # each shape's rules in run order
    for shape, rule in sorted(pairs, key=lambda pair: shapes.index(pair[0])):
        cells = []
        for t in temperatures:
            r = key.get((shape, rule, t))
            if r is None:
                cells.append("-")
            elif r.gain == 0 and r.gain_stderr == 0:
                cells.append(f"{r.tokens_per_step:.3f}")
            else:
                cells.append(f"{r.tokens_per_step:.3f} ({r.gain:+.3f} ± {r.gain_stderr:.3f})")
        if any(c != "-" for c in cells):
            lines.append(f"| {shape} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[TreeRow], path) -> None:
    """Bars of tokens per step by shape and rule, one panel per temperature (PNG or SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = sorted({r.temperature for r in rows})
    shapes = list(dict.fromkeys(r.shape for r in rows))
    rules = list(dict.fromkeys(r.rule for r in rows))
    fig, axes = plt.subplots(1, len(temperatures), figsize=(4.5 * len(temperatures), 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    width = 0.8 / len(rules)
    for ax, t in zip(axes, temperatures):
        for j, rule in enumerate(rules):
            values = [
                next(
                    (r.tokens_per_step for r in rows if (r.temperature, r.shape, r.rule) == (t, s, rule)),
                    np.nan,
                )
                for s in shapes
            ]
            ax.bar(np.arange(len(shapes)) + j * width, values, width, label=rule)
        ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2, shapes)
        ax.set_title(f"T = {t}")
        ax.set_xlabel("tree shape")
    axes[0].set_ylabel("exact tokens per step (mean over positions)")
    values = [r.tokens_per_step for r in rows]
    axes[0].set_ylim(max(0.0, min(values) - 0.25), max(values) + 0.1)  # the differences, not the bars' feet
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(rules), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
    plt.close(fig)
