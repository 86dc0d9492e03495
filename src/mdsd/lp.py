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
