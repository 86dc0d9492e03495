"""Exponential-race quadrature: Qall(H) for sequential sampling without replacement.

Sequential sampling without replacement from ``q`` has the law of the arrival order of an
exponential race: token i arrives at T_i ~ Exp(rate q_i), independently, and the n drafts are the
first n arrivals. All n drafts lie in H exactly when the n-th arrival from H comes before the first
arrival from L = V \\ H, which arrives at an Exp(lambda) time with lambda = q(L). Hence (spec 3.2)

    Qall(H) = int_0^inf lambda * exp(-lambda t) * P(N_H(t) >= n) dt,

with N_H(t) ~ Poisson-binomial(1 - exp(-q_i t), i in H). Substituting t = e^u makes the integrand
analytic in the strip |Im u| < pi/2 and double-exponentially decaying on the right, so the
trapezoid rule with step h has error about exp(-pi^2 / h) (h = 0.3: ~5e-15).

This module is the plain reference: one pass over the tokens in scan order, carrying for every node
t_j the distribution of min(N, n). Cost O(V * n * nodes). Tails are cut with rigorous bounds:
the integrand is at most e^{(n+1)u} (so the left tail below u_lo is < 1e-17) and the right tail
beyond u_hi is exp(-lambda e^{u_hi}) < 1e-17 for every prefix with lambda > 0.
"""

from __future__ import annotations

import math

import numpy as np

TAIL = 1e-17  # mass allowed to be cut off at each end of the u-integral
STEP = 0.3  # trapezoid step in u = log t; discretisation error ~ exp(-pi^2 / STEP)


def race_nodes(min_rate: float, n: int, step: float = STEP) -> np.ndarray:
    """Quadrature nodes u_j (t_j = e^{u_j}) covering every prefix whose tail mass >= min_rate."""
    u_lo = math.log(TAIL) / (n + 1)
    u_hi = math.log(-math.log(TAIL) / min_rate)
    count = int(math.ceil((u_hi - u_lo) / step)) + 1
    return u_lo + step * np.arange(count)


def race_weights(tail_mass: np.ndarray, u: np.ndarray, step: float) -> np.ndarray:
    """Trapezoid weights h * lambda * t * exp(-lambda t) at t = e^u.  [..., K] x [J] -> [..., K, J]"""
    t = np.exp(u)
    lt = tail_mass[..., None] * t  # [..., K, J]
    return step * lt * np.exp(-lt)


def wor_qall_prefixes(draft_probs_ordered: np.ndarray, n: int, step: float = STEP) -> np.ndarray:
    """Qall(H_k) for the prefixes H_k = first k tokens of the given order, k = 0..V.

    draft_probs_ordered: [B, V] float64, q permuted into scan order. Returns [B, V + 1].
    Assumes every row has at least n tokens with positive mass (checked by the caller).
    """
    q = draft_probs_ordered
    batch, vocab = q.shape
    # tail_mass[:, k] = q(V \ H_k) = sum of q[:, k:], summed from the small end for accuracy.
    tail_mass = np.zeros((batch, vocab + 1))
    tail_mass[:, :vocab] = np.cumsum(q[:, ::-1], axis=1)[:, ::-1]
    positive = tail_mass[tail_mass > 0]
    min_rate = float(positive.min()) if positive.size else 1.0
    u = race_nodes(min_rate, n, step)
    t = np.exp(u)  # [J]

    qall = np.zeros((batch, vocab + 1))
    # state[b, j, m] = P(min(N_{H_k}(t_j), n) = m)
    state = np.zeros((batch, t.size, n + 1))
    state[:, :, 0] = 1.0
    for k in range(vocab):
        qt = q[:, k, None] * t  # [B, J]
        stay = np.exp(-qt)[..., None]  # token k has not arrived by t_j
        arrive = -np.expm1(-qt)[..., None]
        new = state * stay
        new[..., 1:] += state[..., :-1] * arrive
        new[..., n] += state[..., n] * arrive[..., 0]
        state = new
        weights = race_weights(tail_mass[:, k + 1], u, step)  # [B, J]
        qall[:, k + 1] = np.einsum("bj,bj->b", weights, state[..., n])
    # lambda = 0: no draft can fall outside H, so all n drafts lie in H surely.
    qall[tail_mass == 0] = 1.0
    return np.minimum(qall, 1.0)
