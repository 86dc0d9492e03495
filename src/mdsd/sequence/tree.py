"""Verifying one drafted tree: node by node, or by Traversal Verification (leaf to root).

A drafted tree has N nodes; node i holds token ``tokens[i]`` and hangs under ``parents[i]``
(-1 = the root, the last committed position). Each node's children were drawn, in node-index
order, from q(. | path to the node) by the node's draft law. The target gives p(. | path) at the
root and at every node. A tree verifier emits a block: the tokens of an accepted root path, then
one more token (recovered, or a bonus token at an accepted leaf). It is lossless when the block,
continued by target sampling, has the target's law; see docs/tree_verification.md for both rules
and their proof sketches.

``node``       The classic walk (SpecInfer, arXiv 2305.09781): at a node, run a token-level
               verifier of ``mdsd.verifiers`` over its children with p(. | path); if it emits a
               child's token, descend into the first child holding it; otherwise the emitted
               token ends the step; at a leaf, emit a bonus token from p(. | path).
``traversal``  Traversal Verification (Weng et al., arXiv 2505.12398): block verification run
               over the tree in depth-first post-order. A node carries a weight w (root 1) and a
               current target p. Its children are visited in draw order, each with its whole
               subtree; child c enters with w_c = min(1, w p(c) / q(c)), where q is the law of
               c given its earlier siblings (``sibling_conditional``: q for iid; q without the
               earlier tokens for without_replacement; point masses and q' for greedy and
               spechub). When a child's subtree is rejected, the node is updated with that q:
               p <- max(w p - q, 0) normalised, w <- r / (r + 1 - w), r = sum max(w p - q, 0).
               When every child is rejected, accept the node with probability w and emit
               y ~ p (its current residual); else reject it. The root always accepts (its w
               stays 1). On a chain this is block verification. The paper states it for iid and
               without-replacement siblings; the sibling conditionals extend its proof to greedy
               and spechub (docs/tree_verification.md).
``hybrid``     ``node`` at every node with two or more children, then, from the first node whose
               subtree is a chain, block verification of that chain (traversal from weight 1).
               Lossless because the chain below an accepted node was drawn independently of the
               decisions above it; on "n x D" trees it is never worse than ``node`` with the
               same token-level verifier (block >= token on every chain).

``tree_emission_law`` gives the exact law {emitted token tuple: probability} by visiting every
branch once (the node states after a run of rejections are deterministic); ``tree_verify`` samples
it with early exit and also returns the accepted node path (what the engine keeps in its cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdsd._validate import as_drafts, as_probs, check_choice
from mdsd.laws import complement_renormalised, get_law, top_tokens
from mdsd.sampling import categorical
from mdsd.verifiers import NATURAL_VERIFIERS, natural_verifier, resolve
from mdsd.verifiers.base import check_drafts_for_law, residual

TREE_METHODS = ("node", "traversal", "hybrid")
TRAVERSAL_LAWS = ("iid", "without_replacement", "greedy", "spechub")
# The token-level verifier node-by-node verification uses at a node when none is named: the
# verifier layer's table (``mdsd.verifiers.NATURAL_VERIFIERS``), shared with the engine.
DEFAULT_NODE_VERIFIER = NATURAL_VERIFIERS


@dataclass(frozen=True, eq=False)
class DraftedTree:
    """One drafted tree with its target and draft probabilities (build with :func:`drafted_tree`).

    Rows of the probability arrays: row 0 is the root, row i + 1 is node i.

    parents:      [N] int64, parent of node i (-1 = root); parents precede their children.
    tokens:       [N] int64, the drafted token of each node.
    target_probs: [N + 1, V] float64, p(. | path to the row's node).
    draft_probs:  [N + 1, V] float64, q(. | path), the law the row's children were drawn from
                  (rows of childless nodes are not used).
    laws:         [N + 1] draft-law names: how each row's children were drawn (n = their count).
    children:     [N + 1] tuples of node ids, the children of each row in draw order.
    """

    parents: np.ndarray
    tokens: np.ndarray
    target_probs: np.ndarray
    draft_probs: np.ndarray
    laws: tuple[str, ...]
    children: tuple[tuple[int, ...], ...]

    @property
    def num_nodes(self) -> int:
        return int(self.parents.size)

    @property
    def vocab(self) -> int:
        return int(self.target_probs.shape[1])

    def child_tokens(self, row: int) -> np.ndarray:
        return self.tokens[list(self.children[row])]


@dataclass(frozen=True)
class TreeResult:
    """One verified tree.

    path:     accepted node ids, root side first (empty: only the root was accepted).
    tokens:   emitted block: the path's tokens, then one recovered or bonus token.
    accepted: len(path).
    bonus:    True when the last token came from p at an accepted leaf.
    """

    path: tuple[int, ...]
    tokens: tuple[int, ...]
    accepted: int
    bonus: bool


def drafted_tree(parents, tokens, target_probs, draft_probs, law="iid", *, normalize=False) -> DraftedTree:
    """Validate and freeze one drafted tree (see :class:`DraftedTree` for the arrays).

    ``law`` is one draft-law name for every node or a sequence of N + 1 names (row 0 = root).
    Raises ValueError naming the argument: parents out of order, shapes, a drafted token with
    q = 0, repeated tokens for a law drawing distinct tokens, a law that cannot draw the node's
    number of children.
    """
    parents = np.asarray(parents, dtype=np.int64).reshape(-1)
    num_nodes = parents.size
    if np.any(parents < -1) or np.any(parents >= np.arange(num_nodes)):
        raise ValueError("parents must satisfy -1 <= parents[i] < i (parents precede children)")
    p = as_probs(target_probs, "target_probs", normalize=normalize)
    if p.ndim != 2 or p.shape[0] != num_nodes + 1:
        raise ValueError(f"target_probs must be [N + 1, V] = [{num_nodes + 1}, V], got shape {p.shape}")
    vocab = p.shape[1]
    x = as_drafts(tokens, vocab, "tokens") if num_nodes else np.zeros(0, dtype=np.int64)
    if x.shape != (num_nodes,):
        raise ValueError(f"tokens must be [N] = [{num_nodes}], got shape {x.shape}")
    q = np.array(draft_probs, dtype=np.float64)
    if q.shape != p.shape:
        raise ValueError(f"draft_probs must have the shape of target_probs {p.shape}, got {q.shape}")
    laws = (law,) * (num_nodes + 1) if isinstance(law, str) else tuple(law)
    if len(laws) != num_nodes + 1:
        raise ValueError(f"law must be one name or N + 1 = {num_nodes + 1} names, got {len(laws)}")
    kids: list[list[int]] = [[] for _ in range(num_nodes + 1)]
    for i, parent in enumerate(parents.tolist()):
        kids[parent + 1].append(i)
    inner = [r for r in range(num_nodes + 1) if kids[r]]
    if inner:
        q[inner] = as_probs(q[inner], "draft_probs", normalize=normalize)
    for r in inner:
        the_law = get_law(laws[r])
        drafts = x[kids[r]][None, :]
        try:
            the_law.check(q[r : r + 1], drafts.shape[1])
            check_drafts_for_law(q[r : r + 1], drafts, the_law)
        except ValueError as err:
            raise ValueError(f"tokens of the children of row {r} (node {r - 1}): {err}") from None
    for arr in (parents, x, p, q):
        arr.setflags(write=False)
    return DraftedTree(parents, x, p, q, tuple(get_law(name).name for name in laws), tuple(map(tuple, kids)))


def chain_as_tree(target_probs, draft_probs, drafts, law="iid") -> DraftedTree:
    """A drafted chain ([k + 1, V], [k, V], [k]) as a tree of widths (1, ..., 1)."""
    p = np.asarray(target_probs, dtype=np.float64)
    q = np.asarray(draft_probs, dtype=np.float64)
    k = np.asarray(drafts).size
    if q.ndim != 2 or p.ndim != 2:
        raise ValueError("target_probs and draft_probs must be [k + 1, V] and [k, V]")
    q_rows = np.concatenate([q, np.full((1, q.shape[1]), 1.0 / q.shape[1])])  # leaf row unused
    return drafted_tree(np.arange(k) - 1, drafts, p, q_rows, law)


# -- node by node --------------------------------------------------------------------------
def _node_verifier(tree: DraftedTree, row: int, verifier):
    law = tree.laws[row]
    name = natural_verifier(law) if verifier is None else verifier
    return resolve(name, law)


def _node_output_law(tree: DraftedTree, row: int, verifier) -> np.ndarray:
    the_verifier, the_law = _node_verifier(tree, row, verifier)
    drafts = tree.child_tokens(row)[None, :]
    p, q = tree.target_probs[row : row + 1], tree.draft_probs[row : row + 1]
    return the_verifier.output_law(p, q, drafts, the_law)[0]


def _chain_rows(tree: DraftedTree) -> frozenset[int]:
    """Rows whose subtree is a chain (every row in it has at most one child)."""
    chain = set()
    for row in range(len(tree.children) - 1, -1, -1):  # children come after their parents
        kids = tree.children[row]
        if not kids or (len(kids) == 1 and kids[0] + 1 in chain):
            chain.add(row)
    return frozenset(chain)


def _node_law(tree: DraftedTree, verifier, hybrid: bool = False) -> dict[tuple[int, ...], float]:
    out: dict[tuple[int, ...], float] = {}
    chains = _chain_rows(tree) if hybrid else frozenset()

    def visit(row: int, prefix: tuple[int, ...], mass: float) -> None:
        if row in chains:  # hybrid: block verification of the chain below, from weight 1
            _traversal_visit(tree, out, row, 1.0, prefix, mass)
            return
        kids = tree.children[row]
        pi = tree.target_probs[row] if not kids else _node_output_law(tree, row, verifier)
        drafts = tree.child_tokens(row)
        for y in np.flatnonzero(pi > 0).tolist():
            hits = np.flatnonzero(drafts == y)
            if hits.size:
                visit(kids[int(hits[0])] + 1, prefix + (y,), mass * pi[y])
            else:
                _add(out, prefix + (y,), mass * pi[y])

    visit(0, (), 1.0)
    return out


def _node_sample(tree: DraftedTree, verifier, rng: np.random.Generator, hybrid: bool = False) -> TreeResult:
    chains = _chain_rows(tree) if hybrid else frozenset()
    row, path = 0, []
    while True:
        if row in chains:
            return _traversal_sample_from(tree, row, path, rng)
        kids = tree.children[row]
        if not kids:
            y = int(categorical(tree.target_probs[row], rng))
            return _result(tree, path, y, bonus=True)
        the_verifier, the_law = _node_verifier(tree, row, verifier)
        drafts = tree.child_tokens(row)
        p, q = tree.target_probs[row : row + 1], tree.draft_probs[row : row + 1]
        y = int(the_verifier.sample(p, q, drafts[None, :], the_law, rng)[0])
        hits = np.flatnonzero(drafts == y)
        if hits.size == 0:
            return _result(tree, path, y, bonus=False)
        path.append(kids[int(hits[0])])
        row = path[-1] + 1


# -- traversal verification ----------------------------------------------------------------
def sibling_conditional(law: str, draft_probs: np.ndarray, drawn: list[int], n: int) -> np.ndarray:
    """The law of a node's next child given its earlier children ``drawn`` (n children in all).

    iid: q. without_replacement: q without the drawn tokens, renormalised. greedy: the i-th of the
    top-(n-1) tokens of q (a point mass) for i < n, then q without them, renormalised. spechub
    (hub a = argmax q): q first; then q without a if the first child is a, else a point mass at a.
    [V] -> [V].
    """
    q = draft_probs
    i = len(drawn)
    if n == 1 or law == "iid" or i == 0 and law in ("without_replacement", "spechub"):
        return q  # a single child is one draw from q under every law
    if law == "without_replacement":
        return complement_renormalised(q, np.asarray(drawn, dtype=np.int64))
    if law == "greedy":
        top = top_tokens(q, n - 1)
        return np.eye(q.size)[top[i]] if i < n - 1 else complement_renormalised(q, top)
    if law == "spechub":
        hub = int(np.argmax(q))
        return complement_renormalised(q, np.array([hub])) if drawn[0] == hub else np.eye(q.size)[hub]
    raise ValueError(f"method 'traversal' has no sibling conditionals for law {law!r}")


@dataclass
class _NodeState:
    """The running (w, p) of one node during traversal verification, and its children's law."""

    weight: float
    target: np.ndarray  # [V] current p (a residual after rejections)
    law: str
    base_draft: np.ndarray  # [V] q(. | path to the node)
    num_children: int
    drawn: list[int]  # the children folded in so far (all rejected)

    @property
    def draft(self) -> np.ndarray:
        """The law of the next child given the earlier ones.  [V]"""
        return sibling_conditional(self.law, self.base_draft, self.drawn, self.num_children)

    def child_weight(self, token: int) -> float:
        """w_c = min(1, w p(c) / q(c)), q the child's conditional law (q(c) > 0: it was drawn)."""
        return min(1.0, self.weight * self.target[token] / self.draft[token])

    def reject(self, token: int) -> None:
        """Fold a rejected child into the node (see the module docstring)."""
        weight, draft = self.weight, self.draft
        if weight < 1.0:
            scaled = weight * self.target
            excess = float(np.maximum(scaled - draft, 0.0).sum())
            deficit = float(np.maximum(draft - scaled, 0.0).sum())  # = excess + 1 - w > 0
            self.weight = excess / deficit
        # w = 1 keeps w = 1, as r / (r + 1 - w) = 1; an exact tie p = q has rejection probability 0
        if weight > 0.0:
            self.target = _weighted_residual(self.target, draft, weight)
        self.drawn = self.drawn + [token]


def _weighted_residual(target: np.ndarray, draft: np.ndarray, weight: float) -> np.ndarray:
    """max(w p - q, 0) normalised; p when that is (numerically) empty (see verifiers.base.residual)."""
    return residual((weight * target)[None, :], draft[None, :])[0]


def _state(tree: DraftedTree, row: int, weight: float) -> _NodeState:
    law, kids = tree.laws[row], tree.children[row]
    return _NodeState(weight, tree.target_probs[row], law, tree.draft_probs[row], len(kids), [])


def _check_traversal(tree: DraftedTree, rows=None) -> None:
    """Traversal needs the siblings' sequential conditionals (``sibling_conditional``); a single
    child is one draw from q under every law, so rows with one child may have any law."""
    for row, kids in enumerate(tree.children):
        if (rows is None or row in rows) and len(kids) > 1 and tree.laws[row] not in TRAVERSAL_LAWS:
            raise ValueError(
                f"method 'traversal' is exact for laws {list(TRAVERSAL_LAWS)}; row {row} drew its "
                f"{len(kids)} children with law {tree.laws[row]!r}"
            )


def _traversal_visit(tree, out, row: int, weight: float, prefix: tuple[int, ...], mass: float) -> float:
    """Traversal of the subtree of ``row``, entered with probability ``mass`` and weight w: add
    its accepting outcomes to ``out`` and return the probability that it is entered and rejected.
    Every node is visited once: the node states after a run of rejections are deterministic."""
    state = _state(tree, row, weight)
    for child in tree.children[row]:
        token = int(tree.tokens[child])
        mass = _traversal_visit(tree, out, child + 1, state.child_weight(token), prefix + (token,), mass)
        if mass <= 0.0:
            return 0.0
        state.reject(token)
    accept = mass * state.weight
    if accept > 0.0:
        for y in np.flatnonzero(state.target > 0).tolist():
            _add(out, prefix + (y,), accept * state.target[y])
    return mass * (1.0 - state.weight)


def _traversal_law(tree: DraftedTree) -> dict[tuple[int, ...], float]:
    out: dict[tuple[int, ...], float] = {}
    _traversal_visit(tree, out, 0, 1.0, (), 1.0)
    return out


def _traversal_sample_from(tree: DraftedTree, start: int, path: list[int], rng) -> TreeResult:
    """Traversal of the subtree of row ``start`` (reached by ``path``) with weight 1."""

    def visit(row: int, weight: float, path: list[int]) -> TreeResult | None:
        state = _state(tree, row, weight)
        kids = tree.children[row]
        for child in kids:
            token = int(tree.tokens[child])
            found = visit(child + 1, state.child_weight(token), path + [child])
            if found is not None:
                return found
            state.reject(token)
        if row == start or rng.random() < state.weight:  # the start's weight stays 1
            return _result(tree, path, int(categorical(state.target, rng)), bonus=not kids)
        return None

    return visit(start, 1.0, list(path))


# -- front doors ---------------------------------------------------------------------------
def _add(out: dict, key: tuple[int, ...], mass: float) -> None:
    out[key] = out.get(key, 0.0) + mass


def _result(tree: DraftedTree, path: list[int], y: int, bonus: bool) -> TreeResult:
    tokens = tuple(int(tree.tokens[i]) for i in path) + (y,)
    return TreeResult(path=tuple(path), tokens=tokens, accepted=len(path), bonus=bonus)


def _check_method(tree: DraftedTree, method: str, verifier) -> None:
    check_choice(method, TREE_METHODS, "method")
    if method == "traversal":
        if verifier is not None:
            raise ValueError("verifier is used by methods 'node' and 'hybrid' only; pass verifier=None")
        _check_traversal(tree)
        return
    chains = _chain_rows(tree) if method == "hybrid" else frozenset()
    for row, kids in enumerate(tree.children):
        if kids and row not in chains:
            _node_verifier(tree, row, verifier)  # raises for an inexact (verifier, law) pair
    _check_traversal(tree, chains)


def tree_emission_law(tree: DraftedTree, method="traversal", verifier=None) -> dict[tuple[int, ...], float]:
    """Exact law of the emitted block of one drafted tree: {token tuple: probability}.

    Args:
        tree: a :class:`DraftedTree` (see :func:`drafted_tree`).
        method: ``"traversal"`` (Traversal Verification, arXiv 2505.12398; siblings drawn iid or
            without replacement), ``"node"`` (node-by-node walk with a token-level verifier) or
            ``"hybrid"`` (node steps at branching nodes, block verification on chain subtrees).
        verifier: for ``"node"`` and ``"hybrid"``: a name from ``mdsd.VERIFIERS`` exact for
            every node's law, or None for each law's natural verifier
            (``mdsd.verifiers.natural_verifier``).

    The keys are the accepted path's tokens plus one token; the values sum to 1.
    """
    _check_method(tree, method, verifier)
    if method == "traversal":
        return _traversal_law(tree)
    return _node_law(tree, verifier, hybrid=method == "hybrid")


def tree_verify(tree: DraftedTree, method="traversal", verifier=None, rng=None) -> TreeResult:
    """Verify one drafted tree: a draw from ``tree_emission_law`` (early exit).

    ``rng`` is a ``numpy.random.Generator`` or an int seed (None: fresh entropy). Returns a
    :class:`TreeResult` with the accepted node path and the emitted tokens.
    """
    _check_method(tree, method, verifier)
    rng = np.random.default_rng(rng)
    if method == "traversal":
        return _traversal_sample_from(tree, 0, [], rng)
    return _node_sample(tree, verifier, rng, hybrid=method == "hybrid")


def expected_block_length(block_law: dict[tuple[int, ...], float]) -> float:
    """Expected tokens per step, sum_z P(z) |z|, of a block law."""
    return float(sum(len(z) * prob for z, prob in block_law.items()))
