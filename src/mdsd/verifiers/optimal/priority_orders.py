"""Random priority orders: a target mass vector as a mixture of "first drafted token" rules.

Coverage function. For a draft law and a set A of tokens let f(A) = P(set(x) meets A)
= 1 - Qall(V minus A). f is submodular and nondecreasing (a coverage probability).

Priority-order rule. Fix a block G of tokens, the tokens B that take precedence over it (the rule
for G is used only when set(x) misses B) and an order sigma of G. The rule accepts the drafted
token of G that comes first in sigma. Its mass vector is the greedy vertex of the coverage
function contracted by B:

    v_{sigma_k} = f(B + sigma_{<=k}) - f(B + sigma_{<k})
                = Qall(R + sigma_{>=k}) - Qall(R + sigma_{>k}),    R = V minus B minus G,

exact, for any law whose Qall of the prefixes of a token order is known (``DraftLaw.qall_prefixes``
on the order [R, sigma reversed, B]): one scan per vertex.

Mixtures. Drawing sigma at random from a finite mixture (weights lambda_j) gives the mass vector
sum_j lambda_j v(sigma_j). By Edmonds' theorem these mixtures reach exactly the base polytope
{v >= 0 : v(A) <= f_B(A) for every A in G, v(G) = f_B(G)}, f_B(A) = f(B + A) - f(B). A target t
in it is written as such a mixture by Wolfe's minimum-norm-point algorithm on ||v - t||^2 over the
polytope (for t outside it: the closest point): its linear oracle, min_v <x - t, v>, is the greedy
vertex of the order by x - t increasing; the active vertices and their weights are the mixture.
``decompose`` returns them.
The rule mass used downstream is sum_j lambda_j v_j recomputed from the kept vertices, so an
imperfect decomposition changes how much is accepted, never what the caller believes the rule
does.

Shapes: q over the block's support; orders are int64 [J, |G|] (position -> index into G).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdsd.laws import DraftLaw

# Stop when every coordinate of the mixture is this close to the target (probability units).
MATCH_TOLERANCE = 1e-14
# Wolfe's optimality test <x - t, x - v> <= GAP_TOLERANCE * ||x - t|| * max ||v - t||: x is the
# closest point of the polytope to t up to rounding.
GAP_TOLERANCE = 1e-12
# Vertices whose weight falls below this are dropped from the active set.
WEIGHT_FLOOR = 1e-16
# A new vertex c whose distance to the active points' affine hull is so small that the
# Schur complement rho^2 <= DEPENDENT * (1 + |c|^2) ends the loop (the affine minimiser would be
# rounding noise; Wolfe's test lets no such vertex in in exact arithmetic).
DEPENDENT = 1e-14


@dataclass(frozen=True)
class OrderMixture:
    """A random priority order over a block: orders [J, G] (indices into the block, first =
    highest priority), weights [J] (sum 1), mass [G] = sum_j weights_j * v(orders_j), and the
    distance max |mass - target| left by the decomposition."""

    orders: np.ndarray
    weights: np.ndarray
    mass: np.ndarray
    residual: float
    iterations: int


def order_vertex(
    law: DraftLaw,
    q: np.ndarray,
    n: int,
    rest: np.ndarray,
    block: np.ndarray,
    before: np.ndarray,
    sigma: np.ndarray,
) -> np.ndarray:
    """Mass vector of the priority-order rule sigma on ``block`` given that set(x) misses ``before``.

    q: [K] draft probabilities of the support (sum 1); rest, block, before: disjoint int64 index
    arrays covering 0..K-1 (R, G, B); sigma: [|G|] order of the block (indices into ``block``).
    Returns v [|G|] indexed like ``block``: v_{sigma_k} = Qall(R + sigma_{>=k}) - Qall(R + sigma_{>k}).
    """
    g = block.size
    tokens = np.concatenate([rest, block[sigma[::-1]], before])
    # Qall of the prefixes of lengths |R| .. |R| + |G|: window[i] = Qall(first |R| + i tokens)
    window = law.qall_window(q[tokens], n, rest.size, rest.size + g, order=tokens)  # [G + 1]
    v = np.empty(g)
    # prefix R + sigma_{>=k} has length |R| + |G| - k: window index G - k
    v[sigma] = np.maximum(np.diff(window)[::-1], 0.0)
    return v


def _empty_mixture() -> OrderMixture:
    """The mixture of an empty block: one empty order of weight 1."""
    return OrderMixture(np.zeros((1, 0), dtype=np.int64), np.ones(1), np.zeros(0), 0.0, 0)


def _loop_settings(size: int, max_iter: int | None, scale) -> tuple[int, np.ndarray]:
    """Wolfe's iteration budget (default 10 |G| + 50) and the norm's scale (default ones) [G]."""
    max_iter = max_iter if max_iter is not None else 10 * size + 50
    return max_iter, (np.ones(size) if scale is None else np.asarray(scale, dtype=np.float64))


def decompose(
    vertex,
    target: np.ndarray,
    start: np.ndarray,
    *,
    scale: np.ndarray | None = None,
    side: str | None = None,
    max_iter: int | None = None,
) -> OrderMixture:
    """Wolfe's minimum-norm-point algorithm: write ``target`` as a mixture of order vertices.

    vertex(sigma) -> v [G] is the mass vector of the order sigma; start is the first order tried.
    Major cycle: with x the current mixture and g = x - t, the vertex of the order by g increasing
    minimises <g, v>; if it cannot decrease ||x - t|| (Wolfe's test) x is optimal, else it joins
    the active set. Minor cycle: move x to the affine minimiser of ||. - t|| over the active
    vertices, or as far towards it as the weights stay >= 0, dropping the vertices that reach 0.
    """
    size = target.size
    if size == 0:  # an empty block: one empty order
        return _empty_mixture()
    max_iter, scale = _loop_settings(size, max_iter, scale)
    mass_of = vertex
    target = target / scale

    def vertex(sigma):
        return mass_of(sigma) / scale

    orders = [np.asarray(start, dtype=np.int64)]
    # active vertices minus the target, rows 0..count-1 of a buffer that grows by doubling (no
    # copy of the active set per iteration: at a full vocabulary it holds hundreds of rows)
    buffer = np.empty((8, size))
    buffer[0] = vertex(orders[0]) - target
    count = 1
    gram = buffer[:1] @ buffer[:1].T  # [s, s], kept up to date as vertices come and go
    weights = np.ones(1)
    g = buffer[0].copy()  # x - t
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        off = g * scale  # mass - t
        if np.max(np.abs(off), initial=0.0) <= MATCH_TOLERANCE:
            break
        if side is not None and np.maximum(off if side == "below" else -off, 0.0).sum() <= (MATCH_TOLERANCE):
            break
        # the greedy vertex of this order minimises <g, v / scale>
        sigma = np.argsort(g / scale, kind="stable")
        c = vertex(sigma) - target
        spread = max(np.linalg.norm(c), np.linalg.norm(g))
        if g @ (g - c) <= GAP_TOLERANCE * np.linalg.norm(g) * spread:
            break  # Wolfe's test: no vertex gets closer to t than x
        if not _affinely_independent(gram, buffer[:count], c):
            break  # c in the active points' affine hull to rounding: no step can follow
        orders.append(sigma)
        row = buffer[:count] @ c
        if count == buffer.shape[0]:
            buffer = np.concatenate([buffer, np.empty_like(buffer)])
        buffer[count] = c
        count += 1
        grown = np.empty((count, count))
        grown[:-1, :-1], grown[:-1, -1], grown[-1, :-1], grown[-1, -1] = gram, row, row, c @ c
        gram = grown
        weights = np.append(weights, 0.0)
        while True:  # minor cycle
            alpha = _affine_minimiser(gram)
            if np.all(alpha > WEIGHT_FLOOR):
                weights = alpha
                break
            # step from weights towards alpha until the first weight reaches 0
            falling = alpha < weights
            theta = np.min(weights[falling] / (weights[falling] - alpha[falling]), initial=1.0)
            theta = min(max(theta, 0.0), 1.0)
            weights = (1.0 - theta) * weights + theta * alpha
            keep = weights > WEIGHT_FLOOR
            if keep.all():  # rounding: drop the smallest so the cycle makes progress
                keep[np.argmin(weights)] = False
            kept = np.flatnonzero(keep)  # the others keep their order
            buffer[: kept.size] = buffer[kept]
            count = kept.size
            orders = [orders[i] for i in kept]
            gram = gram[np.ix_(kept, kept)]
            weights = weights[kept] / weights[kept].sum()
            if weights.size == 1:
                break
        g = weights @ buffer[:count]
    shifted = buffer[:count]
    mass = (weights @ shifted + target) * scale
    return OrderMixture(
        np.stack(orders), weights, mass, float(np.max(np.abs(mass - target * scale))), iterations
    )


def decompose_compiled(
    law: DraftLaw,
    q: np.ndarray,
    n: int,
    rest: np.ndarray,
    block: np.ndarray,
    before: np.ndarray,
    target: np.ndarray,
    start: np.ndarray,
    *,
    scale: np.ndarray | None = None,
    side: str | None = None,
    max_iter: int | None = None,
) -> OrderMixture:
    """``decompose`` with the vertex oracle ``order_vertex`` of ``law`` (without replacement or
    conditional Poisson), the whole loop compiled (``_orders_numba.decompose``; tests compare it
    with this module's reference). Arguments as in ``order_vertex`` and ``decompose``."""
    from mdsd.verifiers.optimal import _orders_numba

    size = target.size
    if size == 0:  # an empty block: one empty order
        return _empty_mixture()
    max_iter, scale = _loop_settings(size, max_iter, scale)
    index = [np.ascontiguousarray(a, dtype=np.int64) for a in (rest, block, before, start)]
    orders, weights, mass, iterations = _orders_numba.decompose(
        np.ascontiguousarray(q, dtype=np.float64),
        int(n),
        _orders_numba.LAW_CODES[law.name],
        *index[:3],
        np.ascontiguousarray(target, dtype=np.float64),
        index[3],
        np.ascontiguousarray(scale),
        {None: 0, "below": 1, "above": 2}[side],
        int(max_iter),
        _orders_numba.race_settings(n, q.size),
        MATCH_TOLERANCE,
        GAP_TOLERANCE,
        WEIGHT_FLOOR,
    )
    residual = float(np.max(np.abs(mass - (target / scale) * scale)))
    return OrderMixture(orders, weights, mass, residual, int(iterations))


def _affinely_independent(gram: np.ndarray, active: np.ndarray, c: np.ndarray) -> bool:
    """Whether c adds a dimension to the affine hull of the active points [s, G] (Gram matrix
    ``gram``): the Schur complement rho^2 = 1 + c.c - m^T M^-1 m of M = 1 1^T + gram, m = 1 +
    active c, exceeds DEPENDENT (1 + c.c) (the compiled loop's Cholesky factor gets rho as its
    new diagonal entry)."""
    column = active @ c + 1.0
    top = 1.0 + c @ c
    return bool(top - column @ np.linalg.solve(gram + 1.0, column) > DEPENDENT * top)


def _affine_minimiser(gram: np.ndarray) -> np.ndarray:
    """argmin ||S^T a|| over a with sum a = 1, from the Gram matrix S S^T [s, s]: the KKT system
    [[G, 1], [1^T, 0]] [a; mu] = [0; 1] (least squares where it is singular)."""
    size = gram.shape[0]
    if size == 1:
        return np.ones(1)
    kkt = np.ones((size + 1, size + 1))
    kkt[:size, :size] = gram
    kkt[size, size] = 0.0
    rhs = np.zeros(size + 1)
    rhs[size] = 1.0
    try:
        solution = np.linalg.solve(kkt, rhs)
    except np.linalg.LinAlgError:
        solution = None
    if solution is None or not np.all(np.isfinite(solution)):
        solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    alpha = solution[:size]
    return alpha / alpha.sum()


def first_in_order(ranks: np.ndarray, drafts: np.ndarray) -> np.ndarray:
    """The draft that comes first in each order: ranks [J, V] (token -> position, large for tokens
    outside the block), drafts [n] -> token ids [J]."""
    return drafts[np.argmin(ranks[:, drafts], axis=1)]


def mixture_mass_reference(
    law: DraftLaw,
    q: np.ndarray,
    n: int,
    block: np.ndarray,
    before: np.ndarray,
    orders: np.ndarray,
    weights: np.ndarray,
) -> np.ndarray:
    """Plain reference: the mixture's mass on the block by enumerating every draft tuple."""
    tuples, probs = law.enumerate(q, n)
    in_block = np.isin(np.arange(q.size), block)
    in_before = np.isin(np.arange(q.size), before)
    ranks = np.full((len(orders), q.size), q.size, dtype=np.int64)
    for j, sigma in enumerate(orders):
        ranks[j, block[sigma]] = np.arange(block.size)
    mass = np.zeros(q.size)
    for x, prob in zip(np.asarray(tuples), np.asarray(probs)):
        if in_before[x].any() or not in_block[x].any():
            continue
        np.add.at(mass, first_in_order(ranks, x), prob * weights)
    return mass[block]
