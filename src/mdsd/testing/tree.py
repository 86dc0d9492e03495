"""Tree-level audit: does a tree (or chain) verifier emit blocks that continue into the target law?

A drafted tree T holds, at each node, children drawn by a draft law from q(. | path); a tree
verifier emits a block z = (accepted path, one more token). It is lossless iff z, continued by
sampling from the target's conditionals to a fixed length D + 1 (D = tree depth), has exactly the
target's sequence law p(s) = prod_i p(s_i | s_<i) (docs/audit.md; Sun et al., arXiv:2403.10444,
define the same criterion for block verification). The audit builds random per-prefix
conditional tables p(. | prefix) and q(. | prefix) on a small vocabulary, drafts trees by the law,
calls ``fn(tree, rng)`` with each tree as the project's tree record
:class:`mdsd.sequence.DraftedTree` (docs/tree_verification.md), extends each block, and G-tests
the law of the V^(D+1) sequences.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mdsd._validate import check_choice
from mdsd.laws import DraftLaw, get_law
from mdsd.sampling import categorical
from mdsd.sequence import TREE_METHODS, DraftedTree, TreeResult, drafted_tree, tree_verify
from mdsd.testing._calls import FnError, as_token, describe_call_error
from mdsd.testing.result import AuditResult, CaseRow, WorstCase
from mdsd.testing.stats import law_test
from mdsd.testing.token import DEFAULT_ALPHA, finish

DEFAULT_TREE_VOCABS = (3, 4)
DEFAULT_WIDTHS = (2, 1)
DEFAULT_TREE_TRIALS = 3000
TREE_FAMILIES = ("lm_like", "dirichlet", "zeros", "p_equals_q", "peaked_q")


def node_by_node(token_verifier: Callable) -> Callable:
    """A tree verifier from a token-level one ``fn(p, q, drafts, rng) -> token``.

    The walk of ``mdsd.tree_verify(tree, method="node")`` (docs/tree_verification.md) with a
    user's token verifier: from the root row, verify the row's children with its p and q rows; if
    the token emitted is a child's, descend into the first child holding it, else stop; at a row
    without children emit a bonus token from its p row. Lossless whenever the token-level verifier
    is lossless for the law the children were drawn by.
    """

    def tree_verifier(tree: DraftedTree, rng: np.random.Generator) -> list[int]:
        row, emitted = 0, []
        while True:
            p, q = tree.target_probs[row], tree.draft_probs[row]  # [V], [V]
            if not tree.children[row]:
                emitted.append(int(categorical(p, rng)))
                return emitted
            drafts = tree.child_tokens(row)  # [n]
            token = int(token_verifier(p, q, drafts, rng))
            emitted.append(token)
            hits = np.flatnonzero(drafts == token)
            if hits.size == 0:
                return emitted
            row = tree.children[row][int(hits[0])] + 1

    tree_verifier.__qualname__ = f"node_by_node({getattr(token_verifier, '__qualname__', 'fn')})"
    return tree_verifier


def tree_method_fn(method: str = "traversal", verifier: str | None = None) -> Callable:
    """One of mdsd's sequence rules, ``mdsd.tree_verify(tree, method, verifier)``, as a tree
    verifier for :func:`audit_tree_verifier` (methods ``node``, ``traversal``, ``hybrid``;
    docs/tree_verification.md)."""
    check_choice(method, TREE_METHODS, "method")

    def tree_verifier(tree: DraftedTree, rng: np.random.Generator) -> TreeResult:
        return tree_verify(tree, method, verifier, rng=rng)

    suffix = f", {verifier}" if verifier else ""
    tree_verifier.__qualname__ = tree_verifier.__name__ = f"tree_verify[{method}{suffix}]"
    tree_verifier.__module__ = "mdsd"
    return tree_verifier


# ---------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class ConditionalTables:
    """p(. | prefix) and q(. | prefix) for every prefix of length 0..depth, float64 [V]."""

    name: str
    vocab: int
    depth: int
    target: dict
    draft: dict

    def sequence_law(self) -> tuple[list[tuple[int, ...]], np.ndarray]:
        """Every sequence s of length depth + 1 and p(s) = prod_i p(s_i | s_<i)."""
        seqs = list(itertools.product(range(self.vocab), repeat=self.depth + 1))
        probs = np.array([np.prod([self.target[s[:i]][s[i]] for i in range(len(s))]) for s in seqs])
        return seqs, probs


def make_tables(
    family: str, vocab: int, depth: int, rng: np.random.Generator, min_support: int
) -> ConditionalTables:
    """Random per-prefix tables of one family; q keeps at least ``min_support`` tokens."""
    target, draft = {}, {}
    for length in range(depth + 1):
        for prefix in itertools.product(range(vocab), repeat=length):
            target[prefix], draft[prefix] = _pair(family, vocab, rng, min_support)
    return ConditionalTables(family, vocab, depth, target, draft)


def _pair(family, vocab, rng, min_support):
    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    z = 2.0 * rng.standard_normal(vocab)
    p, q = softmax(z), softmax(z + 1.5 * rng.standard_normal(vocab))
    if family == "dirichlet":
        p, q = rng.dirichlet(np.full(vocab, 0.7)), rng.dirichlet(np.full(vocab, 0.7))
    elif family == "zeros":  # p lacks q's mode; q lacks one other token when it can
        p[np.argmax(q)] = 0.0
        p /= p.sum()
        if vocab - 1 >= min_support:
            q[rng.choice(np.delete(np.arange(vocab), np.argmax(q)))] = 0.0
            q /= q.sum()
    elif family == "p_equals_q":
        q = p.copy()
    elif family == "peaked_q":
        q = np.full(vocab, 0.25 / (vocab - 1))
        q[int(rng.integers(vocab))] = 0.75
    return p, q


# ---------------------------------------------------------------------------- drafting
class DraftPool:
    """Draft sets drawn ahead, one batched ``law.sample`` per prefix; each set is used once.

    The children of a node depend on its prefix only, so drawing the sets of each prefix in a
    batch and handing them out in order gives every node a fresh, independent draw.
    """

    def __init__(self, tables: ConditionalTables, widths, law: DraftLaw, trials: int, rng):
        self.sets, self.used = {}, {}
        for prefix, q in tables.draft.items():
            if len(prefix) < len(widths):
                count = trials * int(np.prod(widths[: len(prefix)]))
                qb = np.broadcast_to(q, (count, q.size))
                self.sets[prefix] = law.sample(qb, widths[len(prefix)], rng)
                self.used[prefix] = 0
        self.law = law.name

    def take(self, prefix) -> np.ndarray:
        i = self.used[prefix]
        self.used[prefix] = i + 1
        return self.sets[prefix][i]


def draft_tree(tables: ConditionalTables, widths, pool: DraftPool) -> DraftedTree:
    """Draft a tree: each node at depth d < len(widths) gets widths[d] children, from the pool
    of its prefix (drawn from its q row by the law); built and validated by
    :func:`mdsd.sequence.drafted_tree` (rows: the root, then node i at row i + 1)."""
    parents, tokens, paths = [], [], []
    frontier = [(-1, ())]
    for _ in widths:
        next_frontier = []
        for node, path in frontier:
            drafts = pool.take(path)
            for token in np.atleast_1d(drafts).tolist():
                parents.append(node)
                tokens.append(int(token))
                paths.append(path + (int(token),))
                next_frontier.append((len(tokens) - 1, paths[-1]))
        frontier = next_frontier
    rows = [()] + paths
    target = np.array([tables.target[r] for r in rows])  # [N + 1, V]
    draft = np.array([tables.draft[r] for r in rows])  # [N + 1, V]
    return drafted_tree(parents, tokens, target, draft, pool.law)


def extend(block: list[int], tables: ConditionalTables, rng) -> tuple[int, ...]:
    """Continue a block by sampling the target's conditionals to length depth + 1."""
    seq = tuple(block)
    while len(seq) < tables.depth + 1:
        seq = seq + (int(categorical(tables.target[seq], rng)),)
    return seq


# ---------------------------------------------------------------------------- the audit
def audit_tree_verifier(
    fn: Callable,
    *,
    law: str | DraftLaw,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    vocab_sizes: Sequence[int] = DEFAULT_TREE_VOCABS,
    trials: int | None = None,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    name: str | None = None,
    exhaustive: bool = False,
) -> AuditResult:
    """Audit a tree verifier ``fn(tree: DraftedTree, rng) -> emitted tokens`` for losslessness.

    Args:
        fn: gets each drafted tree as a :class:`mdsd.sequence.DraftedTree` (read-only arrays;
            ``tree.children[row]``, ``tree.child_tokens(row)``, ``tree.target_probs[row]``,
            ``tree.draft_probs[row]``, ``tree.laws[row]``; row 0 = the root, row i + 1 = node i)
            and a ``numpy.random.Generator``; returns the emitted block: the accepted path's
            tokens and one more (recovered or bonus) token, 1 to depth + 1 tokens, as a
            sequence of ints or a :class:`mdsd.sequence.TreeResult` (what ``mdsd.tree_verify``
            returns).
        law: draft law of every node's children (``mdsd.LAWS``).
        widths: children per node at each depth, e.g. (2, 1): two root children, one child each.
        vocab_sizes: small vocabularies (the test has V^(depth + 1) cells).
        trials: drafted trees per case (default 3000).
        seed, alpha, name, exhaustive: as in :func:`mdsd.testing.audit_verifier`.

    >>> from mdsd.sequence import tree_verify
    >>> traversal = lambda tree, rng: tree_verify(tree, "traversal", rng=rng)
    >>> audit_tree_verifier(traversal, law="iid", trials=300).passed
    True
    """
    the_law = get_law(law)
    widths = _check_widths(widths)
    trials = DEFAULT_TREE_TRIALS if trials is None else int(trials)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    depth = len(widths)
    sizes = [int(v) for v in vocab_sizes]
    if not sizes or min(sizes) < 2:
        raise ValueError(f"vocab_sizes must be integers >= 2, got {list(vocab_sizes)!r}")
    plan = [(vocab, family) for vocab in sizes for family in TREE_FAMILIES]
    threshold = alpha / (2 * len(plan))  # skipped cases still count: conservative
    results, error = [], None
    for index, (vocab, family) in enumerate(plan):
        try:
            row, worst = _tree_case(fn, family, vocab, depth, widths, the_law, trials, (int(seed), index))
        except FnError as err:
            error = str(err)
            break
        results.append((row, worst))
        if not exhaustive and row.status != "skipped" and row.pvalue < threshold:
            break
    label = name or f"{getattr(fn, '__module__', '')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
    return finish(
        "tree", label, the_law.name, max(widths), seed, results, alpha, error, planned_cases=len(plan)
    )


def _tree_case(fn, family, vocab, depth, widths, law, trials, case_seed):
    rng = np.random.default_rng(list(case_seed))
    name = f"{family}"
    tables = make_tables(family, vocab, depth, rng, max(widths))
    try:
        for q in tables.draft.values():
            for width in set(widths):
                law.check(q, width)
    except ValueError as err:
        return CaseRow(name, vocab, 0, status="skipped", note=str(err)), None
    seqs, probs = tables.sequence_law()
    cell = {s: i for i, s in enumerate(seqs)}
    counts = np.zeros(len(seqs))
    emitted_lengths = 0
    where = f"on case {name!r} (V = {vocab}, widths {list(widths)})"
    pool = DraftPool(tables, widths, law, trials, rng)
    for _ in range(trials):
        tree = draft_tree(tables, widths, pool)
        block = _call(fn, tree, rng, vocab, depth, where)
        emitted_lengths += len(block)
        counts[cell[extend(block, tables, rng)]] += 1
    fit = law_test(counts, probs, rng)
    row = CaseRow(name, vocab, trials, fit.pvalue, fit.tv, fit.tv_low, fit.tv_high, fit.impossible)
    worst = WorstCase(
        kind="tree",
        name=name,
        law=law.name,
        n=max(widths),
        trials=trials,
        case_seed=tuple(case_seed),
        target_probs=np.array(tables.target[()]),
        draft_probs=np.array(tables.draft[()]),
        labels=tuple("-".join(map(str, s)) for s in seqs),
        observed=counts / trials,
        expected=probs,
        law_pvalue=fit.pvalue,
        tv=fit.tv,
        details={
            "widths": list(widths),
            "mean block length": round(emitted_lengths / trials, 4),
            "replay": f"audit_tree_verifier(fn, law={law.name!r}, widths={tuple(widths)}, "
            f"vocab_sizes=({vocab},), seed={case_seed[0]}) (case index {case_seed[1]})",
        },
    )
    return row, worst


def _call(fn, tree, rng, vocab, depth, where) -> list[int]:
    try:
        value = fn(tree, rng)
    except Exception as err:  # noqa: BLE001 -- fn is user code
        raise FnError(f"fn raised {describe_call_error(err)} {where}") from None
    if isinstance(value, TreeResult):
        value = value.tokens
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise FnError(f"fn returned {type(value).__name__} {where}; expected a list of token ids")
    if not 1 <= len(value) <= depth + 1:
        raise FnError(f"fn returned {len(value)} tokens {where}; a block holds 1 to {depth + 1}")
    return [as_token(v, vocab, where) for v in value]


def _check_widths(widths) -> tuple[int, ...]:
    try:
        out = tuple(int(w) for w in widths)
    except (TypeError, ValueError):
        raise ValueError(f"widths must be a sequence of integers >= 1, got {widths!r}") from None
    if not out or any(w < 1 for w in out):
        raise ValueError(f"widths must be a sequence of integers >= 1, got {widths!r}")
    return out
