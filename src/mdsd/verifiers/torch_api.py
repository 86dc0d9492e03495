"""The verifiers on torch tensors (CPU or CUDA): ``output_law`` and ``verify`` for a batch.

Same verifiers, same laws, same results as :func:`mdsd.output_law` and :func:`mdsd.verify` (the
verifier code is shared through ``mdsd._array_ops``), computed in float64 on the inputs' device
(on CPU, ``verify``'s early-exit draws run the compiled kernels of the numpy path on views of the
same rows). Randomness comes from a ``torch.Generator`` on that device.
(The torch API of the verifiers, hence the name; the array operations both share are
``mdsd._array_ops``.)

Inputs: target_probs p and draft_probs q, [V] or [B, V] (any float dtype: promoted to float64);
drafts [n] or [B, n] integer token ids in draw order. Validation is done on the device and costs
a few reductions; ``check=False`` skips it for trusted inputs (an engine's hot loop).

>>> import torch
>>> output_law(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), torch.tensor([1])).tolist()
[0.0, 1.0]
"""

from __future__ import annotations

import torch

from mdsd._validate import SUM_TOLERANCE
from mdsd.verifiers import resolve
from mdsd.verifiers.base import EarlyExitVerifier, check_drafts_for_law

# The optimal verifier is fitted per position on the host (LP / peeling); it has no torch path.
HOST_ONLY = ("optimal",)


def _as_probs(x, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    if not torch.is_floating_point(t):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if t.ndim not in (1, 2) or t.shape[-1] == 0:
        raise ValueError(f"{name} must be [V] or [B, V] with V >= 1, got shape {tuple(t.shape)}")
    sums = t.sum(dim=-1, keepdim=True)
    bad = ~torch.isfinite(sums) | (t.amin(dim=-1, keepdim=True) < 0)
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite and non-negative")
    if bool(((sums - 1.0).abs() > SUM_TOLERANCE).any()):
        raise ValueError(f"{name} must sum to 1 along its last axis (within {SUM_TOLERANCE:g})")
    return t / sums


def _prepare(target_probs, draft_probs, drafts, verifier, law, check):
    device = target_probs.device if isinstance(target_probs, torch.Tensor) else None
    the_verifier, the_law = resolve(verifier, law)
    if the_verifier.name in HOST_ONLY:
        raise ValueError(f"verifier {the_verifier.name!r} has no torch path; use mdsd.output_law")
    if check:
        p = _as_probs(target_probs, "target_probs", device)
        q = _as_probs(draft_probs, "draft_probs", p.device)
    else:
        p = torch.as_tensor(target_probs, device=device).to(torch.float64)
        q = torch.as_tensor(draft_probs, device=p.device).to(torch.float64)
    x = torch.as_tensor(drafts, device=p.device).long()
    single = p.ndim == 1
    p2, q2 = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    x2 = x.reshape(1, -1) if single else x
    if check:
        if p.shape != q.shape:
            raise ValueError(
                f"target_probs and draft_probs must have the same shape, got "
                f"{tuple(p.shape)} and {tuple(q.shape)}"
            )
        if x2.ndim != 2 or x2.shape[0] != p2.shape[0] or x2.shape[1] == 0:
            raise ValueError(f"drafts must be [n] or [B, n] matching target_probs, got {tuple(x.shape)}")
        if bool(((x2 < 0) | (x2 >= p2.shape[1])).any()):
            raise ValueError(f"drafts hold a token id outside the vocabulary [0, {p2.shape[1]})")
        n = x2.shape[1]
        if the_law.name == "spechub" and n != 2:
            raise ValueError(f"law 'spechub' is defined for n = 2 drafts only, got n = {n}")
        if the_law.distinct:
            smallest = int((q2 > 0).sum(dim=-1).min())
            if n > smallest:
                raise ValueError(
                    f"n = {n} drafts are more than the support of draft_probs "
                    f"({smallest} tokens); law {the_law.name!r} draws distinct tokens"
                )
        check_drafts_for_law(q2, x2, the_law)
    return p2, q2, x2, the_verifier, the_law, single


def output_law(target_probs, draft_probs, drafts, verifier="rrs", law=None, *, check=True):
    """pi(. | x) of the verifier's emitted token given the drafts, as float64 on the inputs' device.

    Shapes as :func:`mdsd.output_law`: [V], [V], [n] -> [V]; [B, V], [B, V], [B, n] -> [B, V].
    """
    p, q, x, the_verifier, the_law, single = _prepare(target_probs, draft_probs, drafts, verifier, law, check)
    out = the_verifier.output_law(p, q, x, the_law)
    return out[0] if single else out


def _early_exit_tokens(verifier, p, q, x, law, uniforms) -> torch.Tensor:
    """tokens [B] of an early-exit verifier from uniforms [B, k]: on CPU by the numpy path (its
    compiled kernels, ``mdsd.verifiers._early_exit``) on numpy views of p, q [B, V] float64,
    x [B, n] and the uniforms; on other devices by the vectorised torch version."""
    if p.device.type == "cpu":
        p_rows, q_rows, x_rows, u_rows = (t.detach().numpy() for t in (p, q, x, uniforms))
        return torch.from_numpy(verifier.sample_with_branch(p_rows, q_rows, x_rows, law, u_rows)[0])
    return verifier.sample_with_branch(p, q, x, law, uniforms)[0]


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One inverse-CDF draw per row of probs [B, V] -> [B] int64; zero-mass tokens never drawn."""
    cdf = torch.cumsum(probs, dim=1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype, device=probs.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    return torch.clamp(idx, max=probs.shape[1] - 1)


def verify(target_probs, draft_probs, drafts, verifier="rrs", law=None, *, generator=None, check=True):
    """Run a verifier: y ~ pi(. | x). Returns (tokens [B], accepted [B] bool) as tensors (0-d
    tensors for one position). ``generator``: a torch.Generator on the inputs' device.

    The classic verifiers exit early (``EarlyExitVerifier.sample_with_branch``, vectorised over
    the batch): all rows take the first test from O(1) numbers, and only the rows it rejects go
    on to the residual passes over the vocabulary; the uniforms, a fixed number per row, are drawn
    up front from ``generator``. On CPU tensors the rows go to the compiled kernels of the numpy
    path instead (numpy views of the same float64 rows, the same uniforms: the same draws as the
    vectorised version, tested). Other verifiers draw once from ``output_law`` (``sample_rows``).
    """
    p, q, x, the_verifier, the_law, single = _prepare(target_probs, draft_probs, drafts, verifier, law, check)
    if isinstance(the_verifier, EarlyExitVerifier):
        shape = (p.shape[0], the_verifier.uniforms_per_row(x.shape[1]))
        uniforms = torch.rand(shape, generator=generator, dtype=p.dtype, device=p.device)
        tokens = _early_exit_tokens(the_verifier, p, q, x, the_law, uniforms)
    else:
        tokens = sample_rows(the_verifier.output_law(p, q, x, the_law), generator)
    accepted = (x == tokens[:, None]).any(dim=1)
    if single:
        return tokens[0], accepted[0]
    return tokens, accepted


__all__ = ["output_law", "sample_rows", "verify"]
