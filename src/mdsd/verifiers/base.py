"""What every verifier shares: the interface, the residual, and the draft checks.

A verifier maps (p, q, drafts) to the *conditional output law* pi(. | x) of the emitted token
(docs/theory.md §1). Sampling is one categorical draw from it; exactness is the identity
sum_x Pdraft(x) pi(. | x) = p; the acceptance given x is sum_{y in set(x)} pi(y | x).

Terms used throughout: a draft is *accepted* when the emitted token is one of the drafts (in a
tree: descend into that child); otherwise the emitted token is the *recovered* token drawn from a
residual law, and the step ends.

All arrays here are float64 [B, V] (target_probs, draft_probs) and int64 [B, n] (drafts), as
numpy arrays or torch tensors (CPU or CUDA): the helpers dispatch through ``mdsd._array_ops``, so
every verifier runs on both. The public functions in ``mdsd.verifiers`` (numpy) and
``mdsd.verifiers.torch_api`` (torch) add and remove the batch axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdsd._array_ops import NumpyOps, backend, holds_top, top_mask
from mdsd.laws import DraftLaw
from mdsd.sampling import categorical

# Below this total mass a residual is treated as empty: the rejection that would use it has
# probability ~0, and we fall back to emitting from the current target law (see ``residual``).
EMPTY_MASS = 1e-300


def residual(target, draft):
    """resid(a, b) = max(a - b, 0) / sum max(a - b, 0), row-wise.  [B, V] x [B, V] -> [B, V]

    If a row's positive part is (numerically) empty, a equals b to rounding and the rejection
    leading here has probability ~0; that row returns ``target`` unchanged so the law stays valid.
    """
    ops = backend(target)
    diff = ops.positive_part_(target - draft)
    total = ops.row_sum(diff, keepdim=True)
    empty = total <= EMPTY_MASS
    if ops.any(empty):
        return ops.where(empty, target, diff / ops.where(empty, 1.0, total))
    diff /= total
    return diff


def safe_ratio(num, den, when_zero: float = 1.0):
    """min(1, num / den), with ``when_zero`` where den = 0 (the branch then has no mass)."""
    ops = backend(num)
    return ops.minimum(ops.divide_safe(num, den, when_zero), 1.0)


def gather(values, tokens):
    """values[b, tokens[b]] for [B, V] and [B] (or [B, k]) -> [B] (or [B, k])."""
    return backend(values).gather(values, tokens)


def scatter_add(out, tokens, amount) -> None:
    """out[b, tokens[b]] += amount[b], in place."""
    backend(out).scatter_add(out, tokens, amount)


def draft_set_mask(drafts, vocab: int):
    """Boolean [B, V]: token y is among the drafts of row b."""
    return backend(drafts).mask_of(drafts, vocab)


def accepted_mass(output_law, drafts):
    """Acceptance given the drafts: sum_{y in set(x)} pi(y | x).  -> [B]"""
    ops = backend(output_law)
    mask = ops.mask_of(drafts, output_law.shape[1])
    return ops.row_sum(ops.where(mask, output_law, 0.0))


@dataclass(frozen=True)
class Verifier:
    """A multi-draft verifier.

    name:  registry name (``mdsd.output_law(..., verifier=name)``).
    laws:  the draft laws it is exact for; using it with another law raises ValueError.
    """

    name: str = ""
    laws: tuple[str, ...] = ()

    @property
    def default_law(self) -> str:
        return self.laws[0]

    def output_law(self, target_probs, draft_probs, drafts, law: DraftLaw):
        """pi(. | x) for a batch: [B, V], [B, V], [B, n] -> [B, V] float64."""
        raise NotImplementedError

    def sample(self, target_probs, draft_probs, drafts, law: DraftLaw, rng: np.random.Generator):
        """Draw the emitted token y ~ pi(. | x) for each row: [B, V], [B, V], [B, n] -> [B] int64.

        Reference implementation: build ``output_law`` and draw once from it by inverse CDF.
        Verifiers override it with an early-exit sampler of the same conditional law (decide the
        drafts in order from their ratios, touch the vocabulary only on a rejection); tests
        compare every override with this reference. Inputs are validated numpy arrays.
        """
        return categorical(self.output_law(target_probs, draft_probs, drafts, law), rng)

    def acceptance(self, target_probs, draft_probs, n: int, law: DraftLaw):
        """Exact acceptance rate in closed form, [B] -- or None where there is none."""
        return None

    def acceptance_method(self, n: int) -> str:
        """How ``acceptance`` computes its value for n drafts (reported by acceptance_rate)."""
        return "closed_form"


def inverse_cdf(values, uniforms):
    """One inverse-CDF draw per row of ``values`` [B, V] (need not be normalised) at uniforms [B]:
    the first token whose cumulative mass exceeds u * total, clipped to V - 1 (as
    ``mdsd.sampling.categorical``; zero-mass tokens are never drawn).  -> [B] int64"""
    ops = backend(values)
    cdf = ops.cumsum(values)  # [B, V]
    threshold = uniforms[:, None] * cdf[:, -1:]
    drawn = ops.row_sum(cdf <= threshold)
    return (
        drawn.clip(max=values.shape[1] - 1) if ops.name == "torch" else np.minimum(drawn, values.shape[1] - 1)
    )


@dataclass(frozen=True)
class EarlyExitVerifier(Verifier):
    """A verifier that samples pi(. | x) by early exit instead of building it.

    Subclasses run their chain of tests (draft t_j accepted with probability a_j, computed from the
    state earlier rejections left; if every test rejects, y ~ a final law R) on uniforms drawn up
    front: ``uniforms_per_row(n)`` of them per row, so the draws are a function of the seed and one
    batched call draws what the same rows drawn one by one from the same generator would.
    ``sample_with_branch`` returns (tokens [B], branch [B]): the test that accepted (0-based), or
    the number of tests when the token came from R. The reference is ``Verifier.sample`` (build
    ``output_law``, draw once); tests/verifiers/test_early_exit.py compares the two, exactly.
    """

    def uniforms_per_row(self, n: int) -> int:
        """Uniforms one row consumes for n drafts: one per test, one for the final draw."""
        raise NotImplementedError

    def sample_with_branch(self, target_probs, draft_probs, drafts, law, uniforms, vectorised=False):
        """(tokens [B] int64, branch [B] int64) from uniforms [B, uniforms_per_row(n)].

        numpy rows run the compiled kernels of ``mdsd.verifiers._early_exit``; torch tensors (and
        numpy with ``vectorised=True``) run the batch-vectorised version: all rows take test 1
        together, and only the rows it rejects go on to touch the vocabulary."""
        raise NotImplementedError

    def sample(self, target_probs, draft_probs, drafts, law: DraftLaw, rng: np.random.Generator):
        uniforms = rng.random((target_probs.shape[0], self.uniforms_per_row(drafts.shape[1])))
        return self.sample_with_branch(target_probs, draft_probs, drafts, law, uniforms)[0]


def check_drafts_for_law(draft_probs, drafts, law: DraftLaw) -> None:
    """Refuse drafts that the law cannot produce (they would make the output law wrong)."""
    ops = backend(draft_probs)
    drafted_mass = ops.gather(draft_probs, drafts)
    if ops.any(drafted_mass <= 0):
        b, i = np.argwhere(np.asarray(_cpu(drafted_mass)) <= 0)[0]
        raise ValueError(
            f"drafts[{b}, {i}] = {int(drafts[b, i])} has draft_probs 0: it cannot have been drawn "
            f"from the draft distribution (was q processed differently for drafting?)"
        )
    n = drafts.shape[1]
    if law.distinct and n > 1:
        ordered = ops.sort(drafts)
        if ops.any(ordered[:, 1:] == ordered[:, :-1]):
            raise ValueError(f"drafts repeat a token, but law {law.name!r} draws distinct tokens")
    if law.name == "greedy" and n > 1:
        if ops is NumpyOps:  # the same test without the mask (O(V), two comparisons a row)
            wrong = not np.all(holds_top(draft_probs, drafts[:, :-1]))
        else:
            given = ops.mask_of(drafts[:, :-1], draft_probs.shape[1])
            wrong = ops.any(given != top_mask(draft_probs, n - 1))
        if wrong:
            raise ValueError(
                "drafts[:, :n-1] must be the n-1 most probable tokens of draft_probs (ties by "
                "lower index) for law 'greedy'"
            )
    if law.name == "spechub":
        hub = ops.argmax(draft_probs)
        if ops.any((drafts[:, 0] == hub) == (drafts[:, 1] == hub)):
            raise ValueError("law 'spechub' drafts hold the hub argmax(draft_probs) exactly once")


def _cpu(values):
    return values.detach().cpu().numpy() if hasattr(values, "detach") else values
