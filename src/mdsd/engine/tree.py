"""Draft-tree shapes, built once into a frozen structure (parents, depths, positions, masks).

A shape is a tuple of widths per depth: ``(3, 2, 1)`` puts 3 children under the root, 2 under
each of those and 1 under each of those (3 + 6 + 6 = 15 nodes). ``chain_tree(n, depth)`` is the
SpecTr / Hu et al. "n x depth" shape ``(n, 1, ..., 1)``: n drafts at the first position, each
continued by a chain.

Node numbering is breadth first: depth-1 nodes are 0..m_1-1, then depth-2 nodes, etc. Node
``i``'s children are contiguous in the next level. The *root* is not a drafted node: it is the
last committed token (the "pending" token whose logits give the distribution of the depth-1
drafts); in arrays that include it, it is row/column 0 and node i is i + 1.

>>> t = build_tree((2, 1))
>>> t.parents.tolist(), t.depths.tolist()
([-1, -1, 0, 1], [1, 1, 2, 2])
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

import numpy as np

MAX_TREE_NODES = 4096  # a tree wider than this is certainly a typo (and would not fit a mask)
# The draft laws a tree is drafted by in one compiled call (``_llama_numba.sample_tree``), by code.
TREE_LAWS = {"iid": 0, "without_replacement": 1, "greedy": 2, "spechub": 3}


@dataclass(frozen=True, eq=False)
class DraftTree:
    """A frozen draft-tree structure; see the module docstring for the numbering.

    Attributes (N = number of drafted nodes, D = depth):
        widths:          children per node at each depth, length D.
        parents:         [N] int64, parent node of each node (-1 = the root).
        depths:          [N] int64, 1..D.
        level_starts:    [D + 1] int64, node range of depth d is level_starts[d-1]:level_starts[d].
        child_starts:    [N + 1] int64, first child of the root (entry 0) and of node i (entry
                         i + 1); a node at depth d has ``widths[d]`` children (none at depth D).
        ancestor_mask:   [N + 1, N + 1] bool, with the root as row/column 0: entry (a, b) is True
                         iff b is a or an ancestor of a. Every node sees the root.
        position_offsets: [N + 1] int64, depth of root (0) and of each node: the position id of
                         a node is (position of the root) + its depth.
    """

    widths: tuple[int, ...]
    parents: np.ndarray = field(repr=False)
    depths: np.ndarray = field(repr=False)
    level_starts: np.ndarray = field(repr=False)
    child_starts: np.ndarray = field(repr=False)
    ancestor_mask: np.ndarray = field(repr=False)
    position_offsets: np.ndarray = field(repr=False)

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def num_nodes(self) -> int:
        return int(self.parents.size)

    @property
    def max_width(self) -> int:
        return max(self.widths)

    @functools.cached_property
    def level_sizes(self) -> tuple[int, ...]:
        """Nodes per depth 1..D (Python ints, for per-step arithmetic without numpy)."""
        return tuple(int(size) for size in np.diff(self.level_starts))

    @functools.cached_property
    def widths_array(self) -> np.ndarray:
        """``widths`` as int64 [D] (read-only), for compiled code."""
        widths = np.asarray(self.widths, dtype=np.int64)
        widths.setflags(write=False)
        return widths

    def level(self, d: int) -> range:
        """Nodes at depth d (1..D)."""
        return range(int(self.level_starts[d - 1]), int(self.level_starts[d]))

    def children(self, node: int) -> range:
        """Children of ``node`` (-1 = the root); empty at depth D."""
        d = 0 if node < 0 else int(self.depths[node])
        if d >= self.depth:
            return range(0)
        start = int(self.child_starts[node + 1])
        return range(start, start + self.widths[d])

    def level_mask(self, d: int) -> np.ndarray:
        """[m_d, level_starts[d]] bool: which nodes of depths 1..d each depth-d node sees.

        The draft expands depth d in one forward whose keys are (committed tokens, depths 1..d);
        this is the tree part of its mask (columns of the committed tokens are all visible).
        """
        rows = np.arange(self.level_starts[d - 1], self.level_starts[d]) + 1
        return self.ancestor_mask[np.ix_(rows, np.arange(1, self.level_starts[d] + 1))]

    def describe(self) -> str:
        return ",".join(str(w) for w in self.widths)

    def __eq__(self, other):
        return isinstance(other, DraftTree) and self.widths == other.widths

    def __hash__(self):
        return hash(self.widths)


def build_tree(widths) -> DraftTree:
    """Build the frozen structure of the tree with ``widths`` children per node at each depth.

    Raises ValueError (naming ``tree``) on an empty shape, a width < 1 or more than
    ``MAX_TREE_NODES`` nodes.
    """
    widths = tuple(int(w) for w in widths)
    if not widths:
        raise ValueError("tree must have at least one level, got an empty shape")
    if any(w < 1 for w in widths):
        raise ValueError(f"tree widths must be >= 1, got {widths}")
    sizes = [math.prod(widths[: d + 1]) for d in range(len(widths))]  # nodes per depth
    total = sum(sizes)
    if total > MAX_TREE_NODES:
        raise ValueError(f"tree {widths} has {total} nodes, more than {MAX_TREE_NODES}")

    level_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    parents = np.empty(total, dtype=np.int64)
    depths = np.empty(total, dtype=np.int64)
    child_starts = np.full(total + 1, total, dtype=np.int64)
    child_starts[0] = 0
    for d, width in enumerate(widths, start=1):
        start = level_starts[d - 1]
        parent_level = [-1] if d == 1 else list(range(level_starts[d - 2], level_starts[d - 1]))
        for k, parent in enumerate(parent_level):
            first = start + k * width
            parents[first : first + width] = parent
            depths[first : first + width] = d
            child_starts[parent + 1] = first

    # 1. ancestor-or-self relation with the root as index 0
    ancestor = np.zeros((total + 1, total + 1), dtype=bool)
    ancestor[0, 0] = True
    for i in range(total):  # parents precede children, so the parent's row is complete
        ancestor[i + 1] = ancestor[parents[i] + 1]
        ancestor[i + 1, i + 1] = True
    for arr in (parents, depths, level_starts, child_starts, ancestor):
        arr.setflags(write=False)
    offsets = np.concatenate([[0], depths]).astype(np.int64)
    offsets.setflags(write=False)
    return DraftTree(widths, parents, depths, level_starts, child_starts, ancestor, offsets)


def chain_tree(drafts: int, depth: int) -> DraftTree:
    """The "n x depth" shape: ``drafts`` children at the root, then chains (widths n,1,...,1)."""
    if int(drafts) < 1:
        raise ValueError(f"drafts must be >= 1, got {drafts}")
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return build_tree((int(drafts),) + (1,) * (int(depth) - 1))


def parse_tree(text: str) -> DraftTree:
    """``"3,2,1"`` (widths per depth) or ``"3x4"`` (``chain_tree(3, 4)``).

    >>> parse_tree("3x2").widths, parse_tree("2,2").widths
    ((3, 1), (2, 2))
    """
    spec = str(text).strip().lower()
    match = re.fullmatch(r"(\d+)\s*x\s*(\d+)", spec)
    if match:
        return chain_tree(int(match.group(1)), int(match.group(2)))
    parts = [s.strip() for s in spec.split(",")]  # every part a number: no '-1', no empty '2,,3'
    if not parts or not all(s.isdigit() for s in parts):
        raise ValueError(
            f"tree must be widths per depth like '3,2,1' or drafts x depth like '3x4', got {text!r}"
        )
    return build_tree(int(s) for s in parts)
