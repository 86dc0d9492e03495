"""Random-threshold priority groups: the optimal rule for i.i.d. drafts and two to sixteen
without-replacement drafts (method ``threshold``; docs/optimal.md, "The construction" and "Without
replacement").

1. Order the tokens with q > 0 by s = p/q, decreasing (``common.priority_scan``): positions
   0..K-1, U_k the first k tokens, Q_k = q(U_k), P_k = p(U_k), Phi_k = P(set(x) meets U_k).
2. A *group rule* cuts the positions into consecutive groups; it accepts from the first group (in
   priority order) that holds a draft, the draft of that group drawn first. For i.i.d. drafts
   that draft is q-distributed within the group, independently of which group is met first, so
   the rule puts mass q_y * rho_G on y, rho_G = (Phi_hi - Phi_lo) / (Q_hi - Q_lo).
3. A *random-threshold* rule gives every boundary b a level theta_b in [0, 1], draws
   u ~ Uniform[0, 1) and cuts at the boundaries with theta_b <= u: a mixture of nested group
   rules whose mass vector m_y = q_y E_u[rho_{G_u(y)}] is computed exactly from the levels.
4. The levels are fitted so that m matches the curve A_k = sum_{i<=k} t_i q_i with rates
   t = clip(s, mu, c) (``_target_curve``; on H* a staircase of few rates, ``_staircase``). A is
   concave and below Phi, so it is a mixture of chord interpolants of Phi; peeling
   (``_peel``) finds the levels. Runs with one common rate are lumped first.
5. Capping (``common.cap_rule``) makes the rule exact whatever the levels; with the fitted levels
   the accepted mass is a = min(p, c q) and sum a = alpha*.

Two drafts without replacement: the first-drawn choice is not q-proportional inside a group (a
later draw decides whether an earlier group is met); the pair split of ``_pair_split`` is. Three
or more: the order split (``_threshold_numba.order_split_shares``, ``_order_split``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdsd.laws import DraftLaw, others_mass
from mdsd.verifiers.optimal.common import (
    OptimalFit,
    closed_curve,
    keep_or_recover,
    positions_of,
    priority_scan,
    splits_by_order,
    uses_order_split,
)

# The peeling treats the target as a single group once it is within this distance (probability
# units) of the chord: it can lose at most about this much acceptance per group.
CHORD_TOLERANCE = 1e-15
# Safety margin (relative and absolute) on the room Phi - A used by the H* staircase.
STAIR_MARGIN = 1e-12
# Largest ratios between the rate of one H* step and the s of its tokens, tried in turn while the
# staircase has more than _threshold_numba.STAIR_FEW_STEPS steps (a larger ratio spends the slack
# faster: where it runs out before the last step can form, every later token stands on its own, and
# a smaller ratio keeps the steps to tens; e.g. 11,054 -> 27 on a 32,000-token row, twelve drafts),
# and the shares of the slack 1 - Phi_m - p(H*) the steps may use before the last step takes the
# rest.
STAIR_RATIOS = (1.5, 1.2, 1.1, 1.05, 1.02)
STAIR_SHARES = (1.0, 0.5)


@dataclass(frozen=True)
class ThresholdRow:
    """The random-threshold rule of one position, in priority order (K = tokens with q > 0).

    order:      int64 [K]; token ids by p/q decreasing.
    levels:     float64 [K + 1]; theta_b of boundary b (between positions b - 1 and b); the rule
                cuts there when u >= theta_b, u ~ Uniform[0, 1). 0: always, 1: never.
    rule_mass:  float64 [K]; m, the mass the uncapped rule puts on each position.
    cum_mass:   float64 [K + 1]; q of the positions before each boundary.
    others:     float64 [K] or None; 1 - q of each position (two drafts without replacement only:
                the pair split).
    alpha_star: alpha* of the position.
    split_q:    float64 [K] or None; q of each position (three or more drafts without
                replacement: the order split, ``_threshold_numba.order_split_shares``).
    """

    order: np.ndarray
    levels: np.ndarray
    rule_mass: np.ndarray
    cum_mass: np.ndarray
    others: np.ndarray | None
    alpha_star: float
    split_q: np.ndarray | None = None


def uses_pair_split(law: DraftLaw, n: int) -> bool:
    """Two sequential draws without replacement take the pair split instead of the first draw."""
    return law.name == "without_replacement" and n == 2


def fit_threshold_row(p: np.ndarray, q: np.ndarray, n: int, law: DraftLaw) -> ThresholdRow:
    """One position [V], [V]: the priority scan, the target curve and its levels."""
    scan = priority_scan(p, q, n, law)
    order, phi, split = scan.order, scan.phi, scan.split
    ps, qs = scan.target_probs, scan.draft_probs
    levels, rate = _fit_levels(ps, qs, phi, split)
    others = others_mass(qs) if uses_pair_split(law, n) else None
    split_q = qs.copy() if splits_by_order(law, n) else None
    return ThresholdRow(order, levels, qs * rate, scan.draft_prefix, others, scan.alpha_star, split_q)


def _fit_levels(ps: np.ndarray, qs: np.ndarray, phi: np.ndarray, split: int):
    """(levels [K + 1], rate [K]) for the scan in priority order: ``_fit_levels_reference`` in one
    compiled kernel (``_threshold_numba.fit_levels``; equal up to rounding, tested)."""
    from mdsd.verifiers.optimal._threshold_numba import fit_levels  # lazy: numba costs ~0.3 s

    return fit_levels(ps, qs, phi, split, CHORD_TOLERANCE, STAIR_MARGIN, _RATIOS, _SHARES)


_RATIOS = np.array(STAIR_RATIOS)
_SHARES = np.array(STAIR_SHARES)


def _fit_levels_reference(ps: np.ndarray, qs: np.ndarray, phi: np.ndarray, split: int):
    """Target curve A (rates clip(s, mu, c)), the H* staircase, the lossless lumping of runs with
    one common rate (the target is linear there, so the peel only sees a run's two ends), and the
    mixture of group rules by peeling; in numpy. Returns (levels [K + 1], rate [K])."""
    cuts, curve = _lumped_curve(ps, qs, phi, split)
    coarse_levels, coarse_rate = _peel_reference(*curve)
    levels = np.ones(qs.size + 1)
    levels[cuts] = coarse_levels
    return levels, np.repeat(coarse_rate, np.diff(cuts))


def _lumped_curve(ps: np.ndarray, qs: np.ndarray, phi: np.ndarray, split: int):
    """What the fit peels: (cuts [U + 1], (q [U], Phi [U + 1], A [U + 1])) of the U units left
    when the target curve and the H* staircase's runs with one common rate are lumped (cuts:
    the positions where units start, then K)."""
    k = qs.size
    target, clipped = _target_curve(ps, qs, phi, split)
    run = np.where(clipped, np.where(np.arange(k) < split, 0, 1), -1)  # -1: a unit on its own
    target, run = _staircase(ps, qs, phi, split, target, run)
    same_run = (run[1:] == run[:-1]) & (run[1:] >= 0)
    cuts = np.concatenate([[0], 1 + np.flatnonzero(~same_run), [k]]) if k > 1 else np.array([0, k])
    return cuts, (np.add.reduceat(qs, cuts[:-1]), phi[cuts], target[cuts])


@dataclass(frozen=True)
class ThresholdFit(OptimalFit):
    """A batch of random-threshold fits (method ``threshold``), by token id. Besides the common
    fields (:class:`~mdsd.verifiers.optimal.common.OptimalFit`):

    rank:        int64 [B, V]; priority position of each token (q > 0 tokens first, by p/q
                 decreasing); tokens with q = 0 sit at positions >= support, never drafted.
    levels:      float64 [B, V + 1]; theta_b of boundary b; 1 beyond the support.
    rule_mass:   float64 [B, V]; m_y, the mass the uncapped rule puts on y (exact for the levels).
    cum_mass:    float64 [B, V + 1]; q of the positions before each boundary.
    others_mass: float64 [B, V] or None; 1 - q_y (two drafts without replacement: the pair split).
    split_mass:  float64 [B, V] or None; q_y (three or more drafts without replacement: the order
                 split).
    """

    method = "threshold"
    rank: np.ndarray
    levels: np.ndarray
    rule_mass: np.ndarray
    cum_mass: np.ndarray
    others_mass: np.ndarray | None
    split_mass: np.ndarray | None = None


@dataclass(frozen=True)
class TokenArrays:
    """A batch of threshold rows indexed by token id (fields as in :class:`ThresholdFit`)."""

    rank: np.ndarray
    levels: np.ndarray
    rule_mass: np.ndarray
    cum_mass: np.ndarray
    others_mass: np.ndarray | None
    split_mass: np.ndarray | None


def stack_rows(rows: list[ThresholdRow], q: np.ndarray) -> TokenArrays:
    """The token-indexed arrays of a batch of rows (q [B, V] places the q = 0 tokens last)."""
    batch, vocab = q.shape
    rank = np.empty((batch, vocab), dtype=np.int64)
    levels = np.ones((batch, vocab + 1))
    rule_mass = np.zeros((batch, vocab))
    cum_mass = np.zeros((batch, vocab + 1))
    others = None if rows[0].others is None else np.zeros((batch, vocab))
    split = None if rows[0].split_q is None else np.zeros((batch, vocab))
    for b, row in enumerate(rows):
        k = row.order.size
        full_order = np.concatenate([row.order, np.flatnonzero(q[b] <= 0)])
        rank[b, full_order] = np.arange(vocab)
        levels[b, : k + 1] = row.levels
        rule_mass[b, row.order] = row.rule_mass
        cum_mass[b, 1:] = np.cumsum(q[b, full_order])
        if others is not None:
            others[b, row.order] = row.others
        if split is not None:
            split[b, row.order] = row.split_q
    return TokenArrays(rank, levels, rule_mass, cum_mass, others, split)


# Uniforms one threshold draw uses: the threshold u, the pair split, the keep test, the residual.
NODE_UNIFORMS = 4
# Rows whose q has at most this many tokens are fitted and sampled by the compiled node
# (``verifier.node_plan``: the stable radix sort from ``RADIX_MIN`` tokens, one call); longer
# rows take ``fit_threshold_row``, whose priority order may use numpy's vectorised sort
# (``mdsd.bound.stable_argsort``). Hot, on the Intel VM of BENCHMARKS.md, the node and the row
# path cost the same on 4,096-8,192 synthetic tokens (0.15-0.31 ms for two drafts, 0.9-2.0 ms
# for three without replacement); in the decoding loop the node is one call (inside the
# engine's tree walk) where the row path is dozens of numpy calls.
NODE_KERNEL_MAX_SUPPORT = 8192


def sample_threshold_row(row: ThresholdRow, p: np.ndarray, drafts: np.ndarray, rng) -> int:
    """Draw the emitted token for one draft set [n] (draw order) from the rule of ``row``:
    :func:`pick_threshold_row` at ``NODE_UNIFORMS`` uniforms from rng."""
    return pick_threshold_row(row, p, drafts, rng.random(NODE_UNIFORMS))


def pick_threshold_row(row: ThresholdRow, p: np.ndarray, drafts: np.ndarray, uniforms: np.ndarray) -> int:
    """The emitted token for one draft set [n] (draw order) at uniforms [NODE_UNIFORMS].

    u = uniforms[0]; the first group met is [a, b) around the draft of smallest position p_1, b
    the first boundary after p_1 with level <= u; pick the earliest-drawn draft inside it (the
    pair split for two drafts without replacement, at uniforms[1]), keep it with probability
    min(1, p_y / m_y) (uniforms[2]), else draw from the residual (uniforms[3]). Same conditional
    law as :func:`threshold_output_law`.
    """
    levels = row.levels
    pos_of = positions_of(row.order, drafts, p.size)  # [n], draw order
    first = int(pos_of.min())
    u = uniforms[0]
    end = first + 1 + int(np.argmax(levels[first + 1 :] <= u))  # levels[K] = 0: always found
    inside = pos_of < end
    if row.others is not None and inside.all() and pos_of[0] != pos_of[1]:
        chosen = _pair_pick(row, first, int(pos_of.max()), end, u, uniforms[1])
    elif row.split_q is not None and np.count_nonzero(inside) >= 2:
        chosen = _order_pick(row, pos_of, end, u, uniforms[1])
    else:
        chosen = int(pos_of[np.argmax(inside)])  # the earliest draw inside the group
    return keep_or_recover(p, row.order, row.rule_mass, chosen, uniforms[2], uniforms[3])


def _pair_pick(row: ThresholdRow, y: int, z: int, end: int, u: float, u_pick: float) -> int:
    """Both drafts in the group [a, end): keep position y (the earlier) with probability
    (c_z + alpha (c_y - c_z)) / (c_y + c_z), c = 1 / (1 - q), alpha = Q_end / (Q_end - Q_a)."""
    start = y - int(np.argmax(row.levels[y::-1] <= u))  # levels[0] = 0: always found
    alpha = row.cum_mass[end] / (row.cum_mass[end] - row.cum_mass[start])
    c_y, c_z = 1.0 / row.others[y], 1.0 / row.others[z]
    return y if u_pick * (c_y + c_z) < c_z + alpha * (c_y - c_z) else z


def _order_pick(row: ThresholdRow, pos_of: np.ndarray, end: int, u: float, u_pick: float) -> int:
    """Two or more drafts (positions ``pos_of``, draw order) in the group [a, end): the position
    the order split picks at u_pick (``_threshold_numba.order_split_pick``)."""
    from mdsd.verifiers.optimal._threshold_numba import order_split_pick  # lazy: numba ~0.3 s

    levels, cum_mass = row.levels, row.cum_mass
    return int(order_split_pick(row.split_q, levels, cum_mass, pos_of, end, u, u_pick))


def threshold_node_applies(law: DraftLaw, n: int, support: int) -> bool:
    """Whether the compiled node (``verifier.node_plan``) serves a row: a closed-form curve
    (i.i.d. drafts, two without replacement, or three to sixteen by the order split:
    ``uses_order_split``) and at most ``NODE_KERNEL_MAX_SUPPORT`` tokens with q > 0."""
    closed = closed_curve(law, n) or uses_order_split(law, n, support)
    return closed and support <= NODE_KERNEL_MAX_SUPPORT


def threshold_node_arguments(n: int, law: DraftLaw, support: int) -> tuple[tuple, tuple]:
    """The arguments of ``_threshold_numba.threshold_node(p, q, *head, drafts, uniforms, *tail)``
    for n drafts of ``law`` whose q has ``support`` tokens: (head, tail); the race settings of
    the order split's curve (``_orders_numba.race_settings``; zeros where unused) end the tail."""
    from mdsd.verifiers.optimal import _orders_numba  # lazy: numba costs ~0.3 s

    race = _orders_numba.race_settings(n, support) if splits_by_order(law, n) else (0.0,) * 5
    head = (n, law.name == "without_replacement")
    return head, (CHORD_TOLERANCE, STAIR_MARGIN, _RATIOS, _SHARES, race)


def _target_curve(ps, qs, phi, split):
    """A_k = sum_{i < k} t_i q_i with t = min(s, c) before ``split`` and max(s, mu) after.

    c = max_{1<=j<=m} (D_m + P_j) / Q_j and mu = min_{m<=j<K} (1 - Phi_m - (P_j - P_m)) / q(tail_j)
    are the closed-form roots of sum min(p, c q) = Phi_m and sum max(p, mu q) = 1 - Phi_m.
    Returns (A [K + 1], clipped [K]: the rate is c or mu rather than s).
    """
    k = qs.size
    s = ps / qs
    rates = s.copy()
    clipped = np.zeros(k, dtype=bool)
    if split > 0:
        cum_q = np.cumsum(qs[:split])
        cum_p = np.cumsum(ps[:split])
        low = phi[split] - (cum_p[-1] - cum_p)  # D_m + P_j
        c = float(np.max(low / cum_q))
        rates[:split] = np.minimum(s[:split], c)
        clipped[:split] = s[:split] > c
    if split < k:
        hp, hq = ps[split:], qs[split:]
        tail_q = np.cumsum(hq[::-1])[::-1]  # q(positions >= j), j = m..K-1
        head_p = np.concatenate([[0.0], np.cumsum(hp)[:-1]])  # P_j - P_m
        mu = float(np.min(((1.0 - phi[split]) - head_p) / tail_q))
        rates[split:] = np.maximum(s[split:], mu)
        clipped[split:] = s[split:] < mu
    target = np.empty(k + 1)
    target[0] = 0.0
    target[1 : split + 1] = np.cumsum(rates[:split] * qs[:split])
    target[split + 1 :] = phi[split] + np.cumsum(rates[split:] * qs[split:])
    target[split], target[k] = phi[split], 1.0
    return target, clipped


def _staircase(ps, qs, phi, split, target, run):
    """The H* staircase (see _staircase_walk): for each ratio of ``STAIR_RATIOS`` in turn, the
    walk with the whole slack, then with half of it, until one forms; the first staircase of at
    most ``STAIR_FEW_STEPS`` steps, else the one with the fewest."""
    from mdsd.verifiers.optimal._threshold_numba import STAIR_FEW_STEPS, staircase_steps

    best, best_steps = (target, run), None
    for ratio in STAIR_RATIOS:
        for share in STAIR_SHARES:
            out, new_run = _staircase_walk(ps, qs, phi, split, target, run, share, ratio)
            if out is not target:
                steps = staircase_steps(new_run, split)
                if best_steps is None or steps < best_steps:
                    best, best_steps = (out, new_run), steps
                break
        if best_steps is not None and best_steps <= STAIR_FEW_STEPS:
            break
    return best


def _staircase_walk(ps, qs, phi, split, target, run, share, ratio):
    """``_staircase_walk_reference`` with the walk in the compiled kernel (same numbers)."""
    from mdsd.verifiers.optimal._threshold_numba import staircase_walk

    k = qs.size
    if k - split < 3:
        return target, run
    s, tail_q, ahead, cap = _staircase_inputs(ps, qs, phi, split, target, run, share)
    curve, new_run = target.copy(), run.copy()
    formed = staircase_walk(s, qs, tail_q, phi, ahead, cap, split, ratio, curve, new_run)
    return (curve, new_run) if formed else (target, run)


def _staircase_inputs(ps, qs, phi, split, target, run, share):
    """(s = p/q, q of positions >= j, the room still ahead, the cap on the surplus) for the walk."""
    s = ps / qs
    tail_q = np.cumsum(qs[::-1])[::-1]  # q(positions >= j)
    room = (phi - target) * (1.0 - STAIR_MARGIN) - STAIR_MARGIN
    # the surplus over p on H* can reach E = 1 - Phi_m - p(H*) in all; keep half for the last step
    cap = share * max(float(target[-1] - phi[split] - ps[split:].sum()), 0.0)
    # until the mu-region the surplus only grows: cap it by the smallest room still ahead there
    mu_start = int(np.flatnonzero(run == 1)[0]) if np.any(run == 1) else qs.size
    ahead = room.copy()
    ahead[split : mu_start + 1] = np.minimum.accumulate(room[split : mu_start + 1][::-1])[::-1]
    return s, np.ascontiguousarray(tail_q), ahead, cap


def _staircase_walk_reference(ps, qs, phi, split, target, run, share, ratio):
    """On H* only m >= p matters: replace the exact rates by a few constant steps when it is free.

    Walking H* in order, a token joins the current step (rate = the step's first, largest s, at
    most ``ratio`` times the token's s) while the surplus over the exact target stays below the
    room Phi - A after it. As soon as one last step can take the rest (its rate, fixed by the
    total 1 - Phi_m, is at least the largest s in it) the walk stops. The curve stays below Phi
    at every step boundary and every H* token keeps m >= p; nothing changes on L, so the fit is as
    optimal as with the exact target, with far fewer cuts at the full vocabulary.
    Returns (target, run ids); the inputs unchanged when no staircase forms.
    """
    k = qs.size
    if k - split < 3:
        return target, run
    s, tail_q, ahead, cap = _staircase_inputs(ps, qs, phi, split, target, run, share)
    new_run = run.copy()
    curve = target.copy()
    step, step_rate, surplus = 2, s[split], 0.0
    for j in range(split, k):
        rest_rate = (1.0 - curve[j]) / tail_q[j]  # one last step from j on
        if j > split and s[j] <= rest_rate <= step_rate and curve[j] <= phi[j]:
            new_run[j:] = step + 1
            curve[j + 1 :] = curve[j] + rest_rate * np.cumsum(qs[j:])
            curve[k] = target[k]
            return curve, new_run
        if j > split and not (
            step_rate <= ratio * s[j] and surplus + (step_rate - s[j]) * qs[j] <= min(ahead[j + 1], cap)
        ):
            step, step_rate = step + 1, s[j]
        surplus += (step_rate - s[j]) * qs[j]
        curve[j + 1] = curve[j] + step_rate * qs[j]
        new_run[j] = step
        if curve[j + 1] > phi[j + 1]:
            return target, run
    return target, run


def _peel(qs: np.ndarray, phi: np.ndarray, target: np.ndarray):
    """(levels [K + 1], rate [K]) of ``_peel_reference`` by the compiled kernel (same numbers)."""
    from mdsd.verifiers.optimal._threshold_numba import peel  # lazy: importing numba costs ~0.3 s

    return peel(
        np.ascontiguousarray(qs, dtype=np.float64),
        np.ascontiguousarray(phi, dtype=np.float64),
        np.ascontiguousarray(target, dtype=np.float64),
        CHORD_TOLERANCE,
    )


def _peel_reference(qs: np.ndarray, phi: np.ndarray, target: np.ndarray):
    """Write the target curve as a random-threshold mixture of group rules.

    On an interval [lo, hi] whose ends are cuts: take the largest share lam of the one-group rule
    (the chord of Phi) such that the remainder (A - lam chord) / (1 - lam) stays below Phi; the
    remainder touches Phi at some j, which becomes a cut with level offset + scale * lam; recurse
    on [lo, j] and [j, hi] with u rescaled to the remaining share. Returns (levels [K + 1],
    rate [K]) where rate_i = E_u[rho of the group of i] is computed from the rules actually used.
    """
    k = qs.size
    levels = np.ones(k + 1)
    levels[0] = levels[k] = 0.0
    rate = np.zeros(k)
    stack = [(0, k, target, 0.0, 1.0)]
    while stack:
        lo, hi, curve, offset, scale = stack.pop()
        local_q = np.cumsum(qs[lo:hi])  # q mass of positions lo..j-1, summed locally
        mass = local_q[-1]
        rho = (phi[hi] - phi[lo]) / mass
        if hi - lo == 1:
            rate[lo] += scale * rho
            continue
        chord = phi[lo] + (phi[hi] - phi[lo]) * (local_q[:-1] / mass)  # interior points
        excess = np.maximum(curve[1:-1] - chord, 0.0)  # A - chord >= 0 (A concave)
        room = phi[lo + 1 : hi] - chord  # Phi - chord
        if excess.max() <= CHORD_TOLERANCE:
            rate[lo:hi] += scale * rho
            continue
        # largest lam with excess <= (1 - lam) room; room <= excess means a touch: lam = 0
        share = np.where(room > excess, 1.0 - excess / np.where(room > 0, room, 1.0), 0.0)
        j = int(np.argmin(share))
        lam = float(share[j])
        rate[lo:hi] += scale * lam * rho
        cut = lo + 1 + j
        levels[cut] = offset + scale * lam
        rest = np.empty(hi - lo + 1)
        rest[0], rest[-1] = phi[lo], phi[hi]
        rest[1:-1] = chord + excess / (1.0 - lam)
        rest[j + 1] = phi[cut]
        child_offset, child_scale = offset + scale * lam, scale * (1.0 - lam)
        stack.append((lo, cut, rest[: j + 2], child_offset, child_scale))
        stack.append((cut, hi, rest[j + 1 :], child_offset, child_scale))
    return levels, rate


def _threshold_rates(qs: np.ndarray, phi: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Reference: E_u[rho of the group of each position] for any cut levels, O(K * #levels).

    levels [K + 1] with levels[0] = levels[K] = 0; between consecutive distinct levels the active
    cuts are fixed, and each group (lo, hi) has rate (Phi_hi - Phi_lo) / q(group).
    """
    k = qs.size
    steps = np.append(np.unique(levels[levels < 1.0]), 1.0)
    rate = np.zeros(k)
    for u_lo, u_hi in zip(steps[:-1], steps[1:]):
        cuts = np.flatnonzero(levels <= u_lo)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            rate[lo:hi] += (u_hi - u_lo) * (phi[hi] - phi[lo]) / qs[lo:hi].sum()
    return rate


def threshold_output_law(fit: ThresholdFit, x: np.ndarray, fr: np.ndarray) -> np.ndarray:
    """pi(. | x) of the random-threshold group rule for drafts x [R, n], row r served by fit row
    fr[r].

    With drafts sorted by priority position p_(1) <= ... <= p_(n), draft i shares the first group
    with draft 1 exactly when u < tau_i = min{theta_c : p_(1) < c <= p_(i)}; so for
    u in [tau_{i+1}, tau_i) the rule picks the earliest-drawn of the first i drafts. Each pick y
    is kept with probability accept_prob[y]; the rest of the mass goes to the residual law.
    """
    rows, n = x.shape
    pos = fit.rank[fr[:, None], x]  # [B, n]
    by_pos = np.argsort(pos, axis=1, kind="stable")  # drafts in priority order
    pos_sorted = np.take_along_axis(pos, by_pos, axis=1)
    # tau_i: running min of the levels of the boundaries after p_(1) -- [B, n]
    vocab = fit.vocab_size
    bounds = np.arange(vocab + 1)
    after_first = bounds[None, :] > pos_sorted[:, :1]
    running = np.minimum.accumulate(np.where(after_first, fit.levels[fr], 1.0), axis=1)
    tau = np.take_along_axis(running, pos_sorted, axis=1)
    tau[:, 0] = 1.0
    weight = tau - np.concatenate([tau[:, 1:], np.zeros((rows, 1))], axis=1)  # [B, n]
    if fit.others_mass is not None:  # two drafts without replacement
        kept, picked = _pair_split(fit, x, fr, by_pos, pos_sorted, tau)
    elif fit.split_mass is not None:  # three or more drafts without replacement
        kept, picked = _order_split(fit, x, fr, pos_sorted, tau)
    else:
        # the pick for "first i drafts": earliest draw index among them
        earliest = np.minimum.accumulate(by_pos, axis=1)
        picked = np.take_along_axis(x, earliest, axis=1)  # [B, n]
        kept = weight * fit.accept_prob[fr[:, None], picked]
    out = fit.recovered[fr] * np.maximum(1.0 - kept.sum(axis=1), 0.0)[:, None]
    np.add.at(out, (np.repeat(np.arange(rows), n), picked.ravel()), kept.ravel())
    return out


def _pair_split(fit, x, fr, by_pos, pos_sorted, tau):
    """Two drafts without replacement: the q-proportional split inside a shared group.

    When both drafts y (earlier position) and z share the first group met G = [a, b), keep y with
    probability (c_z + alpha (c_y - c_z)) / (c_y + c_z), c = 1 / (1 - q), alpha = q(U_b) / q(G).
    Summed over the draft pairs this puts mass exactly proportional to q on G (where the
    first-drawn choice does not: later draws decide whether an earlier group is met), and it is
    a probability because 1 - q_z >= 1 - q(G) >= q(U_a) / q(U_b). G depends on u through the
    cuts around the pair, so the choice is integrated over u in [0, tau_2) piece by piece.
    Returns (kept [B, 2], picked [B, 2]) for picks (y, z).
    """
    rows = x.shape[0]
    first = np.take_along_axis(x, by_pos, axis=1)  # [B, 2] (y, z) in priority order
    kept = np.empty((rows, 2))
    for r in range(rows):
        b = fr[r]
        p1, p2, tau2 = int(pos_sorted[r, 0]), int(pos_sorted[r, 1]), float(tau[r, 1])
        shared = _shared_alpha_integral(fit.levels[b], fit.cum_mass[b], p1, p2, tau2)
        c_y, c_z = 1.0 / fit.others_mass[b, first[r]]
        y_share = (c_z * tau2 + (c_y - c_z) * shared) / (c_y + c_z)
        y_share = min(max(y_share, 0.0), tau2)
        kept[r] = (1.0 - tau2 + y_share, tau2 - y_share)
    return kept * fit.accept_prob[fr[:, None], first], first


def _order_split(fit, x, fr, pos_sorted, tau):
    """Three or more drafts without replacement: the order split inside a shared group.

    For u in [tau_{i+1}, tau_i) the first group met holds the i drafts of smallest priority
    position (tau_{n+1} = 0); for i >= 2 draft y is picked with probability b0_y + alpha(u) b1_y
    (``_threshold_numba.order_split_shares``), alpha(u) = q(U_b) / q(G), so its share of the
    interval is
    b0_y (tau_i - tau_{i+1}) + b1_y times the integral of alpha over it (``_shared_alpha_integral``
    with the i-th draft as the group's last). For i = 1 the first draft is picked.
    Returns (kept [B, n], picked [B, n]) for picks x (draw order)."""
    from mdsd.verifiers.optimal._threshold_numba import order_split_shares, rest_mass

    rows, n = x.shape
    kept = np.zeros((rows, n))
    for r in range(rows):
        b = fr[r]
        pos = fit.rank[b, x[r]]  # draw order
        draft_q = fit.split_mass[b, x[r]]
        rest = rest_mass(fit.split_mass[b], x[r])  # q of the tokens outside the draft set
        bounds = np.append(tau[r], 0.0)  # tau_1 = 1, ..., tau_n, tau_{n+1} = 0
        levels, cum, p1 = fit.levels[b], fit.cum_mass[b], int(pos_sorted[r, 0])
        kept[r, np.argmin(pos)] += bounds[0] - bounds[1]
        for i in range(2, n + 1):
            lo, hi = bounds[i], bounds[i - 1]
            if hi <= lo:
                continue
            last = int(pos_sorted[r, i - 1])
            integral = _shared_alpha_integral(levels, cum, p1, last, hi) - _shared_alpha_integral(
                levels, cum, p1, last, lo
            )
            b0, b1 = order_split_shares(draft_q, pos <= last, rest)
            kept[r] += b0 * (hi - lo) + b1 * integral
    kept = np.clip(kept, 0.0, 1.0)
    return kept * fit.accept_prob[fr[:, None], x], x


def _shared_alpha_integral(levels, cum, p1, p2, tau2) -> float:
    """Integral over u in [0, tau2) of alpha(u) = Q_b / (Q_b - Q_a), [a, b) the group of the pair.

    a(u) = the largest cut c <= p1 with level <= u, b(u) = the smallest cut c > p2 with level <= u;
    both change only at the running minima of the levels going outwards from the pair.
    """
    if tau2 <= 0.0:
        return 0.0
    left = np.minimum.accumulate(levels[p1::-1])  # cuts p1, p1 - 1, ..., 0
    right = np.minimum.accumulate(levels[p2 + 1 :])  # cuts p2 + 1, ..., V
    edges = np.unique(np.concatenate([left, right, [0.0]]))
    edges = np.append(edges[edges < tau2], tau2)
    u = edges[:-1]
    a = p1 - np.searchsorted(-left, -u, side="left")
    b = p2 + 1 + np.searchsorted(-right, -u, side="left")
    alpha = cum[b] / (cum[b] - cum[a])
    return float(alpha @ np.diff(edges))
