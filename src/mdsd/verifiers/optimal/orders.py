"""Random priority orders: the optimal rule for more than twelve without-replacement drafts on
supports of up to 128 tokens and more than sixteen on any (fewer take ``threshold``'s order split)
and for conditional-Poisson drafts (method ``orders``; docs/optimal.md, "Priority orders").

When set(x) meets L = U_m* (the first m* tokens of the priority order, ``common.priority_scan``)
the rule accepts the drafted L-token that comes first in an order of L drawn from a mixture,
else the drafted token first in an order of H* (the rest). Each order's mass vector is a greedy
vertex of the coverage function (one Qall scan, ``priority_orders.order_vertex``); Wolfe's
minimum-norm-point algorithm (``priority_orders.decompose``) finds the point of each block's
coverage polytope closest to p as a mixture of at most |L| and |H*| + 1 orders. By the
optimality of H* that point is <= p on L and >= p on H* (Fujishige's theorem on minimum-norm
bases), so the capped rule (``common.cap_rule``) accepts alpha*.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from mdsd.laws import DraftLaw
from mdsd.verifiers.optimal.common import OptimalFit, keep_or_recover, positions_of, priority_scan
from mdsd.verifiers.optimal.priority_orders import (
    GAP_TOLERANCE,
    MATCH_TOLERANCE,
    WEIGHT_FLOOR,
    OrderMixture,
    decompose,
    decompose_compiled,
    order_vertex,
)

# Wolfe's norms tried in turn for a block, the short budget of each (at least size / 8
# iterations) and the budget of the final run with the norm that came closest. Blocks of at
# most ORDER_PLAIN_FIRST tokens (top-k rows) try the plain norm first: on the bundled pair's
# top-50 positions and on synthetic top-64 rows it reached the sign pattern in fewer iterations
# than the 1/q norm in 15 of 16 cases (up to 55% fewer; 2% more in one), and within the short
# budget where 1/q missed 1-4% of positions (``bench_optimal.py --norm-iterations``).
ORDER_NORMS = ("q", "plain", "q_floor")
PLAIN_FIRST_NORMS = ("plain", "q", "q_floor")
ORDER_PLAIN_FIRST = 256
ORDER_SHORT_BUDGET = 200
ORDER_FULL_BUDGET = 3000
# laws whose Wolfe loop runs compiled (``priority_orders.decompose_compiled``); others: the reference
COMPILED_LAWS = ("without_replacement", "conditional_poisson")


@dataclass(frozen=True)
class OrdersRow:
    """The random-priority-order rule of one position, in priority order (K = tokens with q > 0).

    order:      int64 [K]; token ids by p/q decreasing.
    split:      m*: positions < split form L, the rest H*.
    low, high:  the mixtures of orders of L and of H* (``OrderMixture``: orders [J, |block|] are
                indices into the block, first = top priority; weights [J]).
    rule_mass:  float64 [K]; m, the mass the uncapped rule puts on each position.
    alpha_star: alpha* of the position.
    """

    order: np.ndarray
    split: int
    low: OrderMixture
    high: OrderMixture
    rule_mass: np.ndarray
    alpha_star: float

    def blocks(self):
        """((block positions, mixture, positions before it, positions after it) for L, H*)."""
        k = self.order.size
        low, high, none = np.arange(self.split), np.arange(self.split, k), np.arange(0)
        return ((low, self.low, none, high), (high, self.high, low, none))

    def position_ranks(self, block: np.ndarray, mix: OrderMixture) -> np.ndarray:
        """[J, K]: the rank of each position in each order of ``mix`` (K outside the block)."""
        ranks = np.full((mix.weights.size, self.order.size), self.order.size, dtype=np.int64)
        np.put_along_axis(ranks, block[mix.orders], np.arange(block.size)[None, :], axis=1)
        return ranks


def fit_orders_row(p: np.ndarray, q: np.ndarray, n: int, law: DraftLaw) -> OrdersRow:
    """One position [V], [V]: the split m*, then each block's mixture (Wolfe).

    L = positions < m* (their rule runs when set(x) meets L), H* = the rest (rule on the draw
    sets inside H*, i.e. f contracted by L). Each block's mixture is the point of its coverage
    polytope closest to p (Wolfe). That point is <= p on L and >= p on H*: by the optimality of
    H*, g(A) = f(A) - p(A) is minimised over A in L by L itself, and f(L + B) - f(L) - p(B) over
    B in H* by the empty set, and the minimum-norm base z of a submodular g has {z < 0} = the
    smallest and {z <= 0} = the largest minimiser of g (Fujishige; also for the norm weighted by
    1/q used here). So the capped rule accepts f(L) on L and p on H*: alpha*. Wolfe stops as soon
    as that sign pattern holds.

    H*'s tokens with p = 0 (the last positions of the scan order, ``zero_tail``) come last in
    every order of H*: m >= p = 0 holds for them whatever their mass, and a draft kept there is
    never accepted, so Wolfe runs on the rest of H* only (those tokens join R, the tokens always
    in the scanned sets), and their mass is the same tail of every order's vertex.
    """
    scan = priority_scan(p, q, n, law, curve=False)
    order, split = scan.order, scan.split
    ps, qs = scan.target_probs, scan.draft_probs
    qs_law = qs / qs.sum()  # the law's Qall is over the support; q sums to 1 up to rounding
    k = order.size
    zeros = zero_tail(ps, split)
    low, high, none = np.arange(split), np.arange(split, k), np.arange(0)
    covered, tail = np.arange(split, k - zeros), np.arange(k - zeros, k)
    # without replacement, n = 2 has its own closed form in the law (not the race): reference
    compiled = law.name in COMPILED_LAWS and (law.name != "without_replacement" or n >= 3)
    if compiled:  # the same Wolfe loop and vertices, compiled (tested equal)
        from mdsd.verifiers.optimal import _orders_numba

        race = _orders_numba.race_settings(n, qs.size)

        def vertex(rest, block, before, sigma):
            code = _orders_numba.LAW_CODES[law.name]
            return _orders_numba.order_vertex(qs_law, n, code, rest, block, before, sigma, race)
    else:

        def vertex(rest, block, before, sigma):
            return order_vertex(law, qs_law, n, rest, block, before, sigma)

    mixtures = []
    for block, before, rest, side in ((low, none, high, "below"), (covered, low, tail, "above")):
        if compiled:
            wolfe = partial(decompose_compiled, law, qs_law, n, rest, block, before)
        else:
            wolfe = partial(decompose, partial(vertex, rest, block, before))
        mixtures.append(_order_mixture(wolfe, ps[block], qs[block], side))
    tail_mass = vertex(none, tail, np.arange(k - zeros), np.arange(zeros)) if zeros else np.zeros(0)
    high_mix = with_tail(mixtures[1], tail_mass)
    mass = np.concatenate((mixtures[0].mass, high_mix.mass))
    return OrdersRow(order, split, mixtures[0], high_mix, mass, scan.alpha_star)


def zero_tail(ps: np.ndarray, split: int) -> int:
    """How many positions of H* have p = 0: its last ones (the scan order is by p / q
    decreasing)."""
    return int(np.count_nonzero(ps[split:] == 0.0))


def with_tail(mix: OrderMixture, tail_mass: np.ndarray) -> OrderMixture:
    """H*'s mixture over its covered tokens extended by the p = 0 tail: each order continues with
    the tail in scan order, the tail's mass ``tail_mass`` (the same in every order) appended."""
    covered, size = mix.orders.shape[1], tail_mass.size
    tail = np.broadcast_to(np.arange(covered, covered + size), (mix.weights.size, size))
    orders = np.concatenate((mix.orders, tail), axis=1)
    return OrderMixture(
        orders, mix.weights, np.concatenate((mix.mass, tail_mass)), mix.residual, mix.iterations
    )


@dataclass(frozen=True)
class OrdersFit(OptimalFit):
    """A batch of priority-order fits (method ``orders``). Besides the common fields
    (:class:`~mdsd.verifiers.optimal.common.OptimalFit`):

    rank:      int64 [B, V]; priority position of each token (q = 0 tokens at positions >= support).
    rule_mass: float64 [B, V]; m_y, the mass the uncapped rule puts on y.
    rows:      the per-row rules (:class:`OrdersRow`: split, mixtures of L and H*).
    """

    method = "orders"
    rank: np.ndarray
    rule_mass: np.ndarray
    rows: tuple[OrdersRow, ...]


# Uniforms one order draw uses: the order, the keep test, the residual.
NODE_UNIFORMS = 3


def sample_orders_row(row: OrdersRow, p: np.ndarray, drafts: np.ndarray, rng) -> int:
    """Draw the emitted token for one draft set [n] from the rule of ``row``:
    :func:`pick_orders_row` at ``NODE_UNIFORMS`` uniforms from rng."""
    return pick_orders_row(row, p, drafts, rng.random(NODE_UNIFORMS))


def pick_orders_row(row: OrdersRow, p: np.ndarray, drafts: np.ndarray, uniforms: np.ndarray) -> int:
    """The emitted token for one draft set [n] at uniforms [NODE_UNIFORMS]: the block met first
    (L, else H*), an order of it drawn by weight (uniforms[0]), its first drafted token kept with
    probability min(1, p_y / m_y) (uniforms[1]), else the residual (uniforms[2]). Same
    conditional law as :func:`orders_output_law`."""
    pos = positions_of(row.order, drafts, p.size)  # [n]
    in_low = pos < row.split
    if in_low.any():
        mix, local = row.low, pos[in_low]
    else:
        mix, local = row.high, pos - row.split
    j = int(np.searchsorted(np.cumsum(mix.weights), uniforms[0] * mix.weights.sum(), side="right"))
    sigma = mix.orders[min(j, mix.weights.size - 1)]
    first = int(sigma[np.argmax(np.isin(sigma, local))])  # the drafted block index first in sigma
    chosen = first if mix is row.low else first + row.split
    return keep_or_recover(p, row.order, row.rule_mass, chosen, uniforms[1], uniforms[2])


def orders_node_applies(law: DraftLaw) -> bool:
    """Whether the compiled node (``verifier.node_plan``) serves the rows of the orders method
    for ``law``: the laws whose Wolfe loop runs compiled (``COMPILED_LAWS``)."""
    return law.name in COMPILED_LAWS


def orders_node_arguments(n: int, law: DraftLaw, support: int) -> tuple[tuple, tuple]:
    """The arguments of ``_orders_numba.orders_node(p, q, *head, drafts, uniforms, *tail)`` for
    n drafts of ``law`` whose q has ``support`` tokens: (head, tail)."""
    from mdsd.verifiers.optimal import _orders_numba  # lazy: numba costs ~0.3 s

    head = (n, _orders_numba.LAW_CODES[law.name])
    race = _orders_numba.race_settings(n, support)
    tail = (
        race, MATCH_TOLERANCE, GAP_TOLERANCE, WEIGHT_FLOOR, ORDER_SHORT_BUDGET, ORDER_FULL_BUDGET,
        ORDER_PLAIN_FIRST,
    )  # fmt: skip
    return head, tail


def orders_output_law(fit: OrdersFit, x: np.ndarray, fr: np.ndarray) -> np.ndarray:
    """pi(. | x) for drafts x [R, n], row r served by fit row fr[r]: the block met first (L, else
    H*), the first draft in each of its orders, kept with accept_prob; the rest recovered."""
    rows, n = x.shape
    out = np.zeros((rows, fit.vocab_size))
    kept_total = np.zeros(rows)
    for b in np.unique(fr):
        row = fit.rows[b]
        mine = np.flatnonzero(fr == b)
        pos = fit.rank[b, x[mine]]  # [R', n]
        meets_low = (pos < row.split).any(axis=1)
        for sel, (block, mix, _, _) in zip((meets_low, ~meets_low), row.blocks()):
            if not sel.any():
                continue
            ranks = row.position_ranks(block, mix)  # [J, K]
            first = np.argmin(ranks[:, pos[sel]], axis=2)  # [J, R']
            picked = np.take_along_axis(x[mine[sel]].T, first, axis=0)  # [J, R'] token ids
            kept = mix.weights[:, None] * fit.accept_prob[b, picked]  # [J, R']
            np.add.at(out, (np.broadcast_to(mine[sel], picked.shape), picked), kept)
            kept_total[mine[sel]] = kept.sum(axis=0)
    out += fit.recovered[fr] * np.maximum(1.0 - kept_total, 0.0)[:, None]
    return out


def orders_acceptance(
    law: DraftLaw,
    qs: np.ndarray,
    n: int,
    row: OrdersRow,
    keep: np.ndarray,
    recovered: np.ndarray,
    accepted_total: float,
) -> float:
    """Exact acceptance of a priority-order rule whatever its mixtures (tokens in scan order).

    A step accepts when the kept draft is emitted (sum a) or when a rejected step's residual
    token z was itself drafted:
        alpha = sum a + sum_z r_z sum_y (1 - keep_y) P(z in X, chosen = y),
    with, for an order whose rule picks y = sigma_k when X misses M_y (the block's tokens before
    y, and L for the H* block) and holds y,
        P(z in X, chosen = y) = P(chosen = y) - [Qall(C_y - z) - Qall(C_y - z - y)],  C_y = V - M_y,
    which is 0 for z in M_y and P(chosen = y) for z = y. Qall(C_y - z) over the orders' prefixes is
    one scan per (order, z) with z moved out of the scanned prefix.
    """
    k = qs.size
    residual = np.flatnonzero(recovered > 0)
    extra = 0.0
    for block, mix, before, rest in row.blocks():
        g = block.size
        reject = 1.0 - keep[block]  # indexed like block
        if g == 0 or not np.any(reject > 0):
            continue
        in_before = np.zeros(k, dtype=bool)
        in_before[before] = True
        for sigma, weight in zip(mix.orders, mix.weights):
            chosen = order_vertex(law, qs, n, rest, block, before, sigma)  # P(chosen = y), [g]
            position = np.full(k, g, dtype=np.int64)  # order position of each block token
            position[block[sigma]] = np.arange(g)  # (g: not in the block)
            block_reversed = block[sigma[::-1]]  # sigma_{G-1}, ..., sigma_0: C_y grows from the end
            for z in residual:
                if in_before[z]:
                    continue  # z in M_y for every y of this block
                z_in_block = int(position[z])
                scan_rest = rest[rest != z]
                scan_block = block_reversed[block_reversed != z]
                tokens = np.concatenate([scan_rest, scan_block, [z], before]).astype(np.int64)
                window = law.qall_window(
                    qs[tokens], n, scan_rest.size, scan_rest.size + scan_block.size, order=tokens
                )
                step = np.diff(window)  # step[c - 1]: Qall(C - z) - Qall(C - z - y), c = |C_y - z in block|
                ks = np.arange(min(z_in_block, g))  # y = sigma_k before z (or all when z not in block)
                counts = scan_block.size - ks  # sigma tokens of C_y - z: sigma_{>=k} without z
                both = chosen[sigma[ks]] - step[counts - 1]
                total = float(np.dot(reject[sigma[ks]], np.maximum(both, 0.0)))
                if z_in_block < g:  # y = z: P(z in X, chosen = z) = P(chosen = z)
                    total += reject[sigma[z_in_block]] * chosen[sigma[z_in_block]]
                extra += weight * recovered[z] * total
    return accepted_total + extra


def _order_mixture(wolfe, target: np.ndarray, qs: np.ndarray, side: str):
    """Wolfe on one block (``wolfe(target, start, scale=, side=, max_iter=)``: ``decompose`` with
    the block's vertex oracle, or its compiled form ``decompose_compiled``), trying the norms of
    ``ORDER_NORMS`` (``PLAIN_FIRST_NORMS`` for blocks of at most ``ORDER_PLAIN_FIRST`` tokens) in
    turn (each with a short budget);
    the first whose mixture has the sign pattern (<= p on L, >= p on H*) wins. Otherwise the norm
    that came closest runs again with the full budget. Every norm has the same sign pattern at its
    minimum-norm point, but how many iterations it takes to reach it varies by orders of magnitude
    between positions and norms."""
    size = target.size
    if size == 0:
        return wolfe(target, np.arange(0))
    scales = {"q": np.sqrt(qs), "plain": None, "q_floor": np.sqrt(qs + 1e-2 * qs.max())}
    short = max(ORDER_SHORT_BUDGET, size // 8)
    best, best_name, best_violation = None, None, np.inf
    for name in PLAIN_FIRST_NORMS if size <= ORDER_PLAIN_FIRST else ORDER_NORMS:
        # start from the order by p/q (the scan order; on L its vertex is often the answer)
        mix = wolfe(target, np.arange(size), scale=scales[name], side=side, max_iter=short)
        violation = _violation(mix.mass, target, side)
        if violation <= MATCH_TOLERANCE:
            return mix
        if violation < best_violation:
            best, best_name, best_violation = mix, name, violation
    full = min(10 * size + 50, ORDER_FULL_BUDGET)
    if full <= short:
        return best
    mix = wolfe(target, np.arange(size), scale=scales[best_name], side=side, max_iter=full)
    return mix if _violation(mix.mass, target, side) <= best_violation else best


def _violation(mass: np.ndarray, target: np.ndarray, side: str) -> float:
    """Total amount by which mass breaks the sign pattern: above target ("below"), under it."""
    off = mass - target
    return float(np.maximum(off if side == "below" else -off, 0.0).sum())
