"""The optimal-transport linear program behind alpha*, solved with scipy's HiGHS (small V only).

Variables pi(x, y) >= 0 for every draft tuple x with P(x) > 0 and every token y:

    maximise   sum_x sum_{y in set(x)} pi(x, y)          (acceptance)
    subject to sum_y pi(x, y) = P(x)      for every x    (the drafts have their law)
               sum_x pi(x, y) = p(y)      for every y    (the output has the target's law)

The objective depends on x only through its set, so the LP is solved over distinct draft sets
(same value) and the plan is split back over the tuples in proportion to P(x). This is the oracle
the fast bound is tested against; it is exponential in V and refuses large problems.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from mdsd._validate import as_probs
from mdsd.laws import get_law

MAX_VARIABLES = 2_000_000  # sets x tokens; beyond this HiGHS needs more memory than is sensible
# HiGHS feasibility tolerances, tightest first: 1e-10 declares some problems with 1e-14 tuple
# masses infeasible, so we start at 1e-9 and fall back to HiGHS's default 1e-7.
TOLERANCES = (1e-9, 1e-7)


@dataclass(frozen=True)
class LPResult:
    """alpha* from the LP, the plan pi[tuple, token] and the tuples it refers to."""

    alpha: float
    plan: np.ndarray  # [M, V]
    tuples: np.ndarray  # [M, n]
    tuple_probs: np.ndarray  # [M]


def solve_lp(target_probs, tuples, tuple_probs) -> LPResult:
    """Solve the transport LP for an explicit draft-tuple distribution.

    Args:
        target_probs: p, [V].
        tuples: [M, n] int draft tuples (any law, given explicitly).
        tuple_probs: [M] their probabilities (sum to 1).
    """
    p = as_probs(target_probs, "target_probs")
    if p.ndim != 1:
        raise ValueError(f"target_probs must be 1-D for the LP, got shape {p.shape}")
    tuples = np.asarray(tuples, dtype=np.int64)
    if tuples.ndim != 2:
        raise ValueError(f"tuples must be [M, n], got shape {tuples.shape}")
    if np.any(tuples < 0) or np.any(tuples >= p.size):
        raise ValueError(f"tuples hold token ids outside [0, {p.size})")
    probs = as_probs(tuple_probs, "tuple_probs")
    if probs.shape != (tuples.shape[0],):
        raise ValueError(f"tuple_probs must have shape ({tuples.shape[0]},), got {probs.shape}")

    vocab = p.size
    keys = [frozenset(t) for t in tuples.tolist()]
    sets = sorted(set(keys), key=sorted)
    index = {s: i for i, s in enumerate(sets)}
    set_of_tuple = np.array([index[k] for k in keys])
    set_probs = np.bincount(set_of_tuple, weights=probs, minlength=len(sets))
    num_vars = len(sets) * vocab
    if num_vars > MAX_VARIABLES:
        raise ValueError(
            f"the LP would have {num_vars:,} variables ({len(sets):,} draft sets x {vocab} tokens), "
            f"more than MAX_VARIABLES = {MAX_VARIABLES:,}; use a smaller vocabulary or n"
        )

    # variable (s, y) has column s * V + y
    cols = np.arange(num_vars)
    row_set = cols // vocab  # sum_y pi(s, y) = P(s)
    row_tok = len(sets) + cols % vocab  # sum_s pi(s, y) = p(y)
    a_eq = coo_matrix(
        (np.ones(2 * num_vars), (np.concatenate([row_set, row_tok]), np.tile(cols, 2))),
        shape=(len(sets) + vocab, num_vars),
    ).tocsr()
    b_eq = np.concatenate([set_probs, p])
    gain = np.zeros((len(sets), vocab))
    for s, i in index.items():
        gain[i, list(s)] = 1.0
    for tolerance in TOLERANCES:
        res = linprog(
            -gain.ravel(),
            A_eq=a_eq,
            b_eq=b_eq,
            bounds=(0, None),
            method="highs",
            options={"primal_feasibility_tolerance": tolerance, "dual_feasibility_tolerance": tolerance},
        )
        if res.status == 0:
            break
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on the transport LP: {res.message}")
    set_plan = np.maximum(res.x.reshape(len(sets), vocab), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(set_probs[set_of_tuple] > 0, probs / set_probs[set_of_tuple], 0.0)
    plan = set_plan[set_of_tuple] * share[:, None]
    return LPResult(alpha=float(-res.fun), plan=plan, tuples=tuples, tuple_probs=probs)


def lp_optimal_acceptance(target_probs, draft_probs, n: int, law="iid") -> LPResult:
    """alpha* of a named law by the LP over its enumerated tuples (small V only)."""
    q = as_probs(draft_probs, "draft_probs")
    the_law = get_law(law)
    n = the_law.check(q, n)
    count = the_law.num_tuples(q, n)
    if count * q.shape[-1] > 50 * MAX_VARIABLES:
        raise ValueError(
            f"law {the_law.name!r} with n = {n} has {count:,} draft tuples over {q.shape[-1]} "
            f"tokens: too many to enumerate for the LP; use a smaller vocabulary or n"
        )
    tuples, probs = the_law.enumerate(q, n)
    return solve_lp(target_probs, tuples, probs)


# -- the sequence-level optimum over drafted trees ------------------------------------------
MAX_TREE_LP_VARIABLES = 2_000_000  # (tree, block) pairs; beyond this the LP is too large to build
MAX_TREE_LP_SEQUENCES = 100_000  # V^(D+1) losslessness rows at most


@dataclass(frozen=True)
class TreeOptimum:
    """The best expected block length of any lossless verifier for a drafting setup.

    value:           max E|z| (tokens emitted per step, accepted drafts + 1).
    status:          HiGHS's message.
    max_violation:   max |A x - b| over the equality rows at the solution (HiGHS's tolerance is
                     1e-10 when it converges at the first attempts).
    num_trees:       drafted trees with positive probability.
    num_variables:   columns: (tree, block) pairs, and 2 per prefix of length 1..D+1.
    num_constraints: equality rows (trees, 2 per prefix of length 1..D+1, sequences of length D+1).
    trees:           [(DraftedTree, P(tree))] when the coupling was requested, else None.
    coupling:        per tree, {block: pi(T, z)} (sums to P(T)) when requested, else None.
    """

    value: float
    status: str
    max_violation: float
    num_trees: int
    num_variables: int
    num_constraints: int
    trees: list | None = None
    coupling: list | None = None


def _tree_blocks(tree, target) -> list[tuple[int, ...]]:
    """Blocks a verifier may emit for this tree: a root path's tokens plus one token, p(z) > 0."""
    from mdsd.sequence.enumerate import sequence_probability

    paths = {()}
    prefix_of = {-1: ()}
    for i, parent in enumerate(tree.parents.tolist()):
        prefix_of[i] = prefix_of[parent] + (int(tree.tokens[i]),)
        paths.add(prefix_of[i])
    blocks = []
    for path in sorted(paths, key=lambda s: (len(s), s)):
        if sequence_probability(target, path) == 0.0:
            continue
        row = target(path)
        blocks += [path + (y,) for y in np.flatnonzero(row > 0).tolist()]
    return blocks


@dataclass(frozen=True)
class _TreeLP:
    a_eq: object  # csr [rows, columns]
    b_eq: np.ndarray  # [rows]
    gain: np.ndarray  # [columns] block length of each pi(T, z) column, 0 elsewhere
    trees: list  # [(DraftedTree, P(T))]
    tree_blocks: list  # per tree, its blocks: the pi(T, z) columns in this order
    num_pairs: int


def _build_tree_lp(widths, laws, target, draft, vocab: int, length: int) -> _TreeLP:
    """The equality system of ``tree_optimum``.

    Columns: pi(T, z) for every tree and block; P(u) and G(u) for every prefix u of length
    1..D+1. G(u) = P(the block is a prefix of u and its target continuation starts with u), so
    G(y) = P(y), G(u y) = P(u y) + p(y | u) G(u), and losslessness is G(s) = p(s) for |s| = D+1.
    This recursion keeps every row short with coefficients in [0, 1] (the expanded form, with
    products of p along each continuation, is much worse conditioned for HiGHS).
    """
    import itertools

    from mdsd.sequence.enumerate import enumerate_drafted_trees, sequence_probability

    trees = enumerate_drafted_trees(widths, laws, target, draft)
    tree_blocks = [_tree_blocks(tree, target) for tree, _ in trees]
    num_pairs = sum(len(b) for b in tree_blocks)
    if num_pairs > MAX_TREE_LP_VARIABLES:
        raise ValueError(
            f"the tree LP would have {num_pairs:,} (tree, block) variables, more than "
            f"MAX_TREE_LP_VARIABLES = {MAX_TREE_LP_VARIABLES:,}; use a smaller vocabulary or tree"
        )
    prefixes = [u for size in range(1, length + 1) for u in itertools.product(range(vocab), repeat=size)]
    index = {u: i for i, u in enumerate(prefixes)}
    col_p, col_g = num_pairs, num_pairs + len(prefixes)  # first P(u) and G(u) columns
    rows, cols, vals, rhs = [], [], [], []
    gain = np.zeros(num_pairs + 2 * len(prefixes))

    # 1. sum_z pi(T, z) = P(T)
    col = 0
    for t, ((_, tree_prob), blocks) in enumerate(zip(trees, tree_blocks)):
        rows += [t] * len(blocks)
        cols += list(range(col, col + len(blocks)))
        vals += [1.0] * len(blocks)
        gain[col : col + len(blocks)] = [len(z) for z in blocks]
        rhs.append(tree_prob)
        col += len(blocks)
    # 2. P(u) - sum_T pi(T, u) = 0
    row0 = len(trees)
    col = 0
    for blocks in tree_blocks:
        rows += [row0 + index[z] for z in blocks]
        cols += list(range(col, col + len(blocks)))
        vals += [-1.0] * len(blocks)
        col += len(blocks)
    rows += [row0 + i for i in range(len(prefixes))]
    cols += [col_p + i for i in range(len(prefixes))]
    vals += [1.0] * len(prefixes)
    rhs += [0.0] * len(prefixes)
    # 3. G(u y) - P(u y) - p(y | u) G(u) = 0 (no G(u) term for |u y| = 1)
    row0 += len(prefixes)
    for u, i in index.items():
        rows += [row0 + i, row0 + i]
        cols += [col_g + i, col_p + i]
        vals += [1.0, -1.0]
        if len(u) > 1:
            rows.append(row0 + i)
            cols.append(col_g + index[u[:-1]])
            vals.append(-float(target(u[:-1])[u[-1]]))
    rhs += [0.0] * len(prefixes)
    # 4. losslessness: G(s) = p(s) for every s of length D + 1
    row0 += len(prefixes)
    full = [u for u in prefixes if len(u) == length]
    rows += [row0 + k for k in range(len(full))]
    cols += [col_g + index[s] for s in full]
    vals += [1.0] * len(full)
    rhs += [sequence_probability(target, s) for s in full]
    shape = (row0 + len(full), gain.size)
    a_eq = coo_matrix((vals, (rows, cols)), shape=shape).tocsr()
    return _TreeLP(a_eq, np.asarray(rhs), gain, trees, tree_blocks, num_pairs)


def tree_optimum(
    widths, laws, target, draft, *, return_coupling: bool = False, first_acceptance: float | None = None
) -> TreeOptimum:
    """Maximise the expected emitted tokens per step over all lossless tree verifiers (small V).

    Args:
        widths: children per node at each depth (D = len(widths)); (1,) * k is a chain.
        laws: the draft law of each depth's children: one name or one per depth.
        target, draft: prefix models p(. | prefix), q(. | prefix): callables prefix tuple -> [V]
            or dicts {prefix tuple: [V]} (see ``mdsd.sequence.enumerate``).
        return_coupling: also return the drafted trees and the optimal plan.
        first_acceptance: if given, also require P(|z| >= 2) >= first_acceptance (the first
            draft position is accepted at least that often): the best E|z| of verifiers that
            are that good at the root, e.g. first_acceptance = alpha* of the root's drafts.

    Variables pi(T, z) >= 0 for every drafted tree T (``enumerate_drafted_trees``) and block z
    (a root path of T plus one token); auxiliaries P(z) = sum_T pi(T, z). Constraints:
    sum_z pi(T, z) = P(T), and losslessness: for every s in V^(D+1),
    sum_j P(z = s_1..s_{j+1}) p(s_{j+2..D+1} | s_1..s_{j+1}) = p(s). Objective: max sum pi |z|.
    On a chain the value is block verification's expected length (Sun et al., arXiv 2403.10444;
    Thomas & Pal, arXiv 2602.16961). Refuses (ValueError) problems above
    ``MAX_TREE_LP_VARIABLES`` variables, ``MAX_TREE_LP_SEQUENCES`` sequences, or the drafted-tree
    limit of ``enumerate_drafted_trees``. See docs/tree_verification.md.
    """

    from mdsd.sequence.enumerate import PrefixModel, check_widths

    widths = check_widths(widths)
    target, draft = PrefixModel(target, "target"), PrefixModel(draft, "draft")
    vocab, length = target.vocab, len(widths) + 1
    if vocab**length > MAX_TREE_LP_SEQUENCES:
        raise ValueError(
            f"the LP needs V^(D+1) = {vocab**length:,} losslessness rows, more than "
            f"MAX_TREE_LP_SEQUENCES = {MAX_TREE_LP_SEQUENCES:,}; use a smaller vocabulary or depth"
        )
    lp = _build_tree_lp(widths, laws, target, draft, vocab, length)
    a_eq, b_eq, gain, trees, tree_blocks = lp.a_eq, lp.b_eq, lp.gain, lp.trees, lp.tree_blocks
    num_pairs = lp.num_pairs
    num_rows, num_vars = a_eq.shape
    a_ub = b_ub = None
    if first_acceptance is not None:
        # -sum_{|z| >= 2} pi(T, z) <= -first_acceptance
        a_ub = -(gain >= 2).astype(np.float64)[None, :]
        b_ub = np.array([-float(first_acceptance)])
    # Tightest tolerance first, as in solve_lp. HiGHS's presolve can declare these problems
    # infeasible when some trees have probabilities ~1e-14 (they are feasible: node-by-node
    # verification is a solution, ~1e-16 residual), so the later attempts run without it.
    for tolerance, presolve in TREE_LP_ATTEMPTS:
        res = linprog(
            -gain,
            A_ub=a_ub,
            b_ub=b_ub,
            A_eq=a_eq,
            b_eq=b_eq,
            bounds=(0, None),
            method="highs",
            options={
                "primal_feasibility_tolerance": tolerance,
                "dual_feasibility_tolerance": tolerance,
                "presolve": presolve,
            },
        )
        if res.status == 0:
            break
    if res.status == 2 and first_acceptance is not None:
        raise ValueError(f"first_acceptance = {first_acceptance} is more than any lossless verifier attains")
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on the tree LP: {res.message}")
    coupling = None
    if return_coupling:
        plan = np.maximum(res.x[:num_pairs], 0.0)
        coupling, col = [], 0
        for blocks in tree_blocks:
            coupling.append({z: float(plan[col + i]) for i, z in enumerate(blocks) if plan[col + i] > 0})
            col += len(blocks)
    return TreeOptimum(
        value=float(-res.fun),
        status=str(res.message),
        max_violation=float(np.abs(a_eq @ res.x - b_eq).max()),
        num_trees=len(trees),
        num_variables=num_vars,
        num_constraints=num_rows,
        trees=trees if return_coupling else None,
        coupling=coupling,
    )


TREE_LP_ATTEMPTS = ((1e-10, True), (1e-10, False), (1e-9, False), (1e-7, False))
