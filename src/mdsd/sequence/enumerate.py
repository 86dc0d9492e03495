"""Exact enumeration over drafted trees, for small vocabularies: the testing and LP backbone.

A *prefix model* gives a probability vector over V for every token prefix (the context is fixed
and implicit): a callable ``prefix (tuple of ints) -> [V]`` or a dict {prefix tuple: [V]}. With a
target model p and a draft model q, a tree shape (widths per depth) and a draft law per depth,

- :func:`enumerate_drafted_trees` lists every drafted tree with its probability (children of a
  node drawn from q(. | path) by the depth's law, tuples from ``DraftLaw.enumerate``);
- :func:`marginal_block_law` averages a verifier's block law over the drafted trees;
- :func:`lossless_error` measures how far a block law is from losslessness:
  max over s in V^(D+1) of | sum_j P(z = s_1..s_{j+1}) p(s_{j+2..D+1} | s_1..s_{j+1}) - p(s) |.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mdsd._validate import as_probs
from mdsd.laws import get_law
from mdsd.sequence.tree import DraftedTree, drafted_tree, tree_emission_law

MAX_ENUMERATED_TREES = 200_000  # drafted trees listed by enumerate_drafted_trees at most


class PrefixModel:
    """A validated, cached prefix model: ``model(prefix) -> [V]`` float64 (read-only)."""

    def __init__(self, model, name: str):
        if isinstance(model, PrefixModel):
            model = model._model
        if not (callable(model) or isinstance(model, dict)):
            raise ValueError(f"{name} must be a callable prefix -> [V] or a dict {{prefix: [V]}}")
        self._model = model
        self._name = name
        self._cache: dict[tuple[int, ...], np.ndarray] = {}

    def __call__(self, prefix) -> np.ndarray:
        key = tuple(int(t) for t in prefix)
        row = self._cache.get(key)
        if row is None:
            if isinstance(self._model, dict):
                if key not in self._model:
                    raise ValueError(f"{self._name} has no entry for prefix {key}")
                raw = self._model[key]
            else:
                raw = self._model(key)
            row = as_probs(raw, f"{self._name}{list(key)}")
            if row.ndim != 1:
                raise ValueError(f"{self._name}{list(key)} must be a [V] vector, got shape {row.shape}")
            row.setflags(write=False)
            self._cache[key] = row
        return row

    @property
    def vocab(self) -> int:
        return int(self(()).size)


def random_prefix_table(
    vocab: int, length: int, rng: np.random.Generator, concentration: float = 1.0, zero_prob: float = 0.0
) -> dict[tuple[int, ...], np.ndarray]:
    """A random prefix model: a Dirichlet(concentration) vector for every prefix of length < length.

    ``zero_prob`` zeroes each entry with that probability (at least one entry stays positive),
    to exercise supports smaller than V.
    """
    table = {}
    for size in range(length):
        for prefix in itertools.product(range(vocab), repeat=size):
            row = rng.dirichlet(np.full(vocab, concentration))
            if zero_prob > 0:
                keep = rng.random(vocab) >= zero_prob
                keep[rng.integers(vocab)] = True
                row = np.where(keep, row, 0.0)
                row /= row.sum()
            table[prefix] = row
    return table


def _per_depth(laws, depth: int) -> tuple[str, ...]:
    names = (laws,) * depth if isinstance(laws, str) else tuple(laws)
    if len(names) != depth:
        raise ValueError(f"laws must be one name or one per depth ({depth}), got {len(names)}")
    return tuple(get_law(name).name for name in names)


def check_widths(widths) -> tuple[int, ...]:
    widths = tuple(int(w) for w in widths)
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty sequence of integers >= 1, got {widths}")
    return widths


def tree_count_bound(widths: Sequence[int], vocab: int) -> int:
    """An upper bound on the number of drafted trees: V^width choices per node, every node."""
    bound, parents = 1, 1
    for width in widths:
        bound *= vocab ** (width * parents)
        parents *= width
    return bound


@dataclass(frozen=True)
class _Node:
    parent: int
    token: int
    prefix: tuple[int, ...]


def enumerate_drafted_trees(
    widths, laws, target, draft, *, max_trees: int = MAX_ENUMERATED_TREES
) -> list[tuple[DraftedTree, float]]:
    """Every drafted tree of the shape with positive probability: [(DraftedTree, P(tree))].

    Args:
        widths: children per node at each depth, e.g. (2, 1) (breadth-first node numbering).
        laws: one draft-law name or one per depth (depth d's nodes draw their children by it).
        target, draft: prefix models (callable or dict), p(. | prefix) and q(. | prefix).
        max_trees: refuse (ValueError) when ``tree_count_bound`` exceeds this.
    """
    widths = check_widths(widths)
    names = _per_depth(laws, len(widths))
    target, draft = PrefixModel(target, "target"), PrefixModel(draft, "draft")
    vocab = target.vocab
    if draft.vocab != vocab:
        raise ValueError(f"draft has {draft.vocab} tokens per prefix, target has {vocab}")
    bound = tree_count_bound(widths, vocab)
    if bound > max_trees:
        raise ValueError(
            f"widths {widths} over {vocab} tokens may draft up to {bound:,} trees, more than "
            f"max_trees = {max_trees:,}; use a smaller vocabulary or tree"
        )
    partial: list[tuple[list[_Node], float]] = [([], 1.0)]
    level_ids = [-1]
    for depth, (width, name) in enumerate(zip(widths, names)):
        the_law = get_law(name)
        grown = []
        for nodes, prob in partial:
            choices = []
            for parent_id in level_ids:
                prefix = () if parent_id < 0 else nodes[parent_id].prefix
                tuples, probs = the_law.enumerate(draft(prefix), width)
                choices.append([(parent_id, prefix, t, pr) for t, pr in zip(tuples.tolist(), probs)])
            for combo in itertools.product(*choices):
                new_nodes = list(nodes)
                mass = prob
                for parent_id, prefix, tup, pr in combo:
                    mass *= pr
                    new_nodes += [_Node(parent_id, int(t), prefix + (int(t),)) for t in tup]
                if mass > 0:
                    grown.append((new_nodes, mass))
        partial = grown
        start = sum(math.prod(widths[:d]) for d in range(1, depth + 1))
        level_ids = list(range(start, start + math.prod(widths[: depth + 1])))
    out = []
    for nodes, prob in partial:
        rows = [()] + [n.prefix for n in nodes]
        depth_of_row = [0] + [len(n.prefix) for n in nodes]
        row_laws = [names[d] if d < len(names) else names[-1] for d in depth_of_row]
        q_rows = np.array([draft(r) for r in rows])
        tree = drafted_tree(
            [n.parent for n in nodes],
            [n.token for n in nodes],
            np.array([target(r) for r in rows]),
            q_rows,
            row_laws,
        )
        out.append((tree, prob))
    return out


def marginal_block_law(
    trees: list[tuple[DraftedTree, float]], method="traversal", verifier=None
) -> dict[tuple[int, ...], float]:
    """sum_T P(T) * (block law of T): the law of the emitted block over the drafting."""
    out: dict[tuple[int, ...], float] = {}
    for tree, prob in trees:
        for block, mass in tree_emission_law(tree, method, verifier).items():
            out[block] = out.get(block, 0.0) + prob * mass
    return out


def sequence_probability(target: Callable, sequence: Sequence[int], start: int = 0) -> float:
    """p(s_{start+1..} | s_1..s_start) under a prefix model."""
    prob = 1.0
    for i in range(start, len(sequence)):
        prob *= float(target(tuple(sequence[:i]))[sequence[i]])
        if prob == 0.0:
            break
    return prob


def lossless_error(block_law: dict[tuple[int, ...], float], target, length: int) -> float:
    """max over s in V^length of |P(block, continued by target sampling, starts with s) - p(s)|.

    A lossless verifier has error 0 (blocks are at most ``length`` tokens long).
    """
    target = PrefixModel(target, "target")
    vocab = target.vocab
    if any(len(z) > length or len(z) == 0 for z in block_law):
        raise ValueError(f"block_law holds a block longer than length = {length} (or empty)")
    worst = 0.0
    for seq in itertools.product(range(vocab), repeat=length):
        lhs = 0.0
        for j in range(1, length + 1):
            mass = block_law.get(seq[:j], 0.0)
            if mass:
                lhs += mass * sequence_probability(target, seq, j)
        worst = max(worst, abs(lhs - sequence_probability(target, seq)))
    return worst
