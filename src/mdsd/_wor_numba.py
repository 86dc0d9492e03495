"""Qall of the prefixes for three draws without replacement, in closed form (compiled).

Three sequential draws without replacement from q (total mass T) all land in H with probability

    Qall(H) = sum over ordered distinct (a, b, c) in H of  q_a q_b q_c / (T A_a D_ab),
    A_a = T - q_a,  D_ab = T - q_a - q_b.

Adding a token z to H (Q = q(H)) adds the triples that hold z once:

    z drawn first:   q_z / (T A_z) * sum_{b in H} q_b (Q - q_b) / D_zb
    z drawn second:  q_z / T * sum_{a in H} q_a (Q - q_a) / (A_a D_az)
    z drawn third:   q_z S(H),   S(H) = sum_{a != b in H} q_a q_b / (T A_a D_ab),

and S grows by q_z / T * sum_{a in H} q_a (1 / A_a + 1 / A_z) / D_az. So every prefix of a
K-token order costs O(K^2) in all, a few microseconds at the top-k supports of the optimal
verifier's priority orders, where the exponential-race quadrature (``mdsd._race``, any n) costs
O(K x nodes) with a hundred-odd nodes.

Every term is non-negative, and the complements are computed without cancellation: A of the
largest token is the sum of the others, D of the two largest the sum of the rest, and q(H) less
the largest or the second largest token a sum of its own; every other complement is at least half
of the mass it is subtracted from (A_a >= q_top >= q_a; D_ab >= q_b for the pairs left; q(H) >=
2 q_a when H holds the largest or second largest token), or enters divided by complements of at
least q_second. Tested against exact enumeration and the
race quadrature (``tests/test_laws.py``).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, error_model="numpy")
def three_draft_qall(q, k_lo, k_hi, out):
    """out[k - k_lo] = Qall(first k tokens of q) for k = k_lo..k_hi <= K (three draws without
    replacement), capped at 1. q: [K] float64 >= 0 in the order, at least 3 positive.

    Per added token z, the complements D_za and q(H) - q_a of every earlier a are written to two
    arrays (the few that need their own sum patched in), then ``_pair_sums`` adds the terms."""
    size = q.size
    top, second = _two_largest(q)
    total, rest_of_top, rest_of_two = 0.0, 0.0, 0.0
    for i in range(size):
        total += q[i]
        if i != top:
            rest_of_top += q[i]
            if i != second:
                rest_of_two += q[i]
    inv_total = 1.0 / total
    room_of = np.empty(size)  # A_a
    for i in range(size):
        room_of[i] = rest_of_top if i == top else total - q[i]
    inv_room = 1.0 / room_of
    room, other = np.empty(size), np.empty(size)  # D_za, q(H) - q_a for a < z
    if k_lo == 0:
        out[0] = 0.0
    qall, pairs, mass = 0.0, 0.0, 0.0  # Qall(H), S(H), q(H)
    mass_but_top, mass_but_second = 0.0, 0.0  # q(H) without the largest / second largest token
    for z in range(k_hi):
        qz = q[z]
        if qz > 0.0:
            if z == top:  # D_za = A_z - q_a, A_z summed directly
                for a in range(z):
                    room[a] = rest_of_top - q[a]
            else:
                for a in range(z):
                    room[a] = room_of[a] - qz
            partner = second if z == top else top if z == second else -1  # D = rest_of_two
            if 0 <= partner < z:
                room[partner] = rest_of_two
            for a in range(z):
                other[a] = mass - q[a]
            if top < z:
                other[top] = mass_but_top
            if second < z:
                other[second] = mass_but_second
            first, middle, grow = _pair_sums(q, room, other, inv_room, z)
            qall += qz * inv_total * (first * inv_room[z] + middle) + qz * pairs
            pairs += qz * inv_total * grow
            mass += qz
            if z != top:
                mass_but_top += qz
            if z != second:
                mass_but_second += qz
        if z + 1 >= k_lo:
            out[z + 1 - k_lo] = min(qall, 1.0)


@numba.njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _pair_sums(q, room, other, inv_room, z):
    """(sum_a q_a o_a / D_za, sum_a q_a o_a / (A_a D_za), sum_a q_a (1 / A_a + 1 / A_z) / D_za)
    over a < z, with o_a = q(H) - q_a (0 where D_za <= 0). Non-negative terms: any summation order
    is accurate, so the compiler may vectorise the three sums."""
    first, middle, grow = 0.0, 0.0, 0.0
    for a in range(z):
        inv = 1.0 / room[a] if room[a] > 0.0 else 0.0
        term = q[a] * other[a] * inv
        first += term
        middle += term * inv_room[a]
        grow += q[a] * inv * (inv_room[a] + inv_room[z])
    return first, middle, grow


@numba.njit(cache=True)
def _two_largest(q):
    """Positions of the largest and second largest entry (the first of ties)."""
    top, second = 0, -1
    for i in range(1, q.size):
        if q[i] > q[top]:
            top, second = i, top
        elif second < 0 or q[i] > q[second]:
            second = i
    return top, second
