"""Expected tokens per step of tree verifiers against the sequence-level LP optimum (small V).

Usage: python benchmarks/bench_tree_verification.py [--vocab 3] [--seeds 4] [--study]

For each tree shape and root draft law, draws ``--seeds`` random context-dependent target/draft
prefix models (Dirichlet(1) rows over V tokens, every prefix its own row) and prints the mean
expected tokens per step (exact, by enumeration of every drafted tree) of

- node / rrs_wor:  node-by-node walk with each law's classic verifier (rrs for iid,
                   rrs_without_replacement for without-replacement siblings);
- node / optimal:  node-by-node walk with the alpha*-optimal token verifier at every node;
- hybrid / optimal: the optimal token verifier at branching nodes, block verification on chains;
- traversal:       Traversal Verification (arXiv 2505.12398);
- LP optimum:      ``mdsd.lp.tree_optimum``, the best of all lossless verifiers;

and, in brackets, the mean gap to the LP optimum. Deeper single-child nodes draw one token (any
law). ``--study`` adds, per shape, the root's alpha* (the best first-position acceptance of any
verifier), the first-position acceptance P(|z| >= 2) of the LP solution HiGHS returns, the LP
optimum when P(|z| >= 2) >= alpha* is imposed, and the LP optimum of "root-myopic" verifiers (the
first token, and whether the block stops there, depend on the root's drafts only). Results depend on the
arguments only (seeded). CPU time: about 1 minute at the defaults; the table in
docs/tree_verification.md (``--seeds 8 --study``) took 3.5 CPU-minutes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix, vstack

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table  # noqa: E402

import mdsd  # noqa: E402
from mdsd.lp import _build_tree_lp, tree_optimum  # noqa: E402
from mdsd.sequence import (  # noqa: E402
    enumerate_drafted_trees,
    expected_block_length,
    marginal_block_law,
    random_prefix_table,
)

SHAPES = [
    ((2, 1), "without_replacement"),
    ((3, 1), "without_replacement"),
    ((2, 1, 1), "without_replacement"),
    ((2, 1), "iid"),
    ((2, 2), "iid"),
    ((2, 1, 1), "iid"),
    ((1, 1, 1), "iid"),
]
STUDY_SLACK = 1e-12  # alpha* is exact to ~1e-13; the constraint allows that much below it
RULES = [
    ("node / rrs_wor", "node", None),
    ("node / optimal", "node", "optimal"),
    ("hybrid / optimal", "hybrid", "optimal"),
    ("traversal", "traversal", None),
]


def root_myopic_optimum(widths, laws, target, draft) -> float:
    """The tree LP plus: the first token and whether the block stops there depend on the root's
    drafts only (trees with the same root children get the same conditional law of (z_1, |z| > 1)),
    i.e. the best verifier that decides the first position without looking at deeper drafts."""
    from mdsd.sequence.enumerate import PrefixModel

    target, draft = PrefixModel(target, "target"), PrefixModel(draft, "draft")
    lp = _build_tree_lp(widths, laws, target, draft, target.vocab, len(widths) + 1)
    groups: dict[tuple[int, ...], list[int]] = {}
    for t, (tree, _) in enumerate(lp.trees):
        groups.setdefault(tuple(tree.child_tokens(0).tolist()), []).append(t)
    starts = np.cumsum([0] + [len(b) for b in lp.tree_blocks])
    rows, cols, vals, row = [], [], [], 0
    for members in groups.values():
        ref = members[0]
        for t in members[1:]:
            for y in range(target.vocab):
                for more in (False, True):
                    for tree_id, scale in ((t, lp.trees[ref][1]), (ref, -lp.trees[t][1])):
                        for i, z in enumerate(lp.tree_blocks[tree_id]):
                            if z[0] == y and (len(z) > 1) == more:
                                rows.append(row)
                                cols.append(starts[tree_id] + i)
                                vals.append(scale)
                    row += 1
    extra = coo_matrix((vals, (rows, cols)), shape=(row, lp.a_eq.shape[1])).tocsr()
    a_eq = vstack([lp.a_eq, extra]).tocsr()
    b_eq = np.concatenate([lp.b_eq, np.zeros(row)])
    res = linprog(-lp.gain, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        res = linprog(
            -lp.gain, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs", options={"presolve": False}
        )
    assert res.status == 0, res.message
    return float(-res.fun)


def one_case(widths, law, vocab, seed, study):
    rng = np.random.default_rng(seed)
    depth = len(widths)
    target = random_prefix_table(vocab, depth + 1, rng)
    draft = random_prefix_table(vocab, depth + 1, rng)
    laws = [law] + ["iid"] * (depth - 1) if widths[1:] == (1,) * (depth - 1) else law
    trees = enumerate_drafted_trees(widths, laws, target, draft)
    values = {name: expected_block_length(marginal_block_law(trees, m, v)) for name, m, v in RULES}
    optimum = tree_optimum(widths, laws, target, draft, return_coupling=study)
    values["LP optimum"] = optimum.value
    if study:
        alpha = mdsd.optimal_acceptance(target[()], draft[()], widths[0], law)
        values["root alpha*"] = alpha
        first = sum(mass for plan in optimum.coupling for z, mass in plan.items() if len(z) >= 2)
        values["LP P(len>=2)"] = first
        values["LP, P(len>=2) >= alpha*"] = tree_optimum(
            widths, laws, target, draft, first_acceptance=alpha - STUDY_SLACK
        ).value
        values["LP, root-myopic"] = root_myopic_optimum(widths, laws, target, draft)
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--study", action="store_true", help="add the study columns")
    args = parser.parse_args()
    columns = [name for name, _, _ in RULES] + ["LP optimum"]
    if args.study:
        columns += ["root alpha*", "LP P(len>=2)", "LP, P(len>=2) >= alpha*", "LP, root-myopic"]
    rows = []
    for widths, law in SHAPES:
        if mdsd.get_law(law).distinct and max(widths) > args.vocab:
            continue
        cases = [one_case(widths, law, args.vocab, seed, args.study) for seed in range(args.seeds)]
        mean = {c: float(np.mean([case[c] for case in cases])) for c in columns}
        cells = []
        for c in columns:
            if c in dict((name, 0) for name, _, _ in RULES):
                gap = float(np.mean([case["LP optimum"] - case[c] for case in cases]))
                cells.append(f"{mean[c]:.4f} (-{gap:.4f})")
            else:
                cells.append(f"{mean[c]:.4f}")
        shape = "x".join(map(str, widths))
        rows.append([shape, law, *cells])
    seeds = f"seeds 0..{args.seeds - 1}"
    print(f"V = {args.vocab}, {args.seeds} random target/draft prefix models per row ({seeds})")
    print("mean expected tokens per step (mean gap to the LP optimum)\n")
    print_table(["widths", "root law", *columns], rows)


if __name__ == "__main__":
    main()
