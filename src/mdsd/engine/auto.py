"""``--tree auto``: choose the draft tree that maximises expected tokens per second.

Two measurements, one model (after Sequoia, Chen et al. 2024, arXiv 2402.12374, which searches tree
shapes by dynamic programming over a per-position acceptance vector; ours are uniform trees, few
enough to enumerate):

1. **Acceptance profile** of the pair under the sampling transform, law and verifier: at real
   positions of text sampled from the target on the given prompts, the exact acceptance rate
   ``rates[n - 1]`` = mean over positions of P(accept | n drafts), n = 1..max_width
   (``mdsd.acceptance_rate``: closed form or enumeration; Rao-Blackwellised Monte Carlo with
   ``PROFILE_SAMPLES`` draft sets per position only where no exact method exists).
2. **Cost model** of this machine: time of a target forward with m new tokens, of a draft level
   with m nodes (forward, output layer, sampling transform per row), of the output layer and
   transform per visited target node, and of one verification per node with n drafts.

A tree with widths (w_1..w_D) has m_d = w_1 ... w_d nodes at depth d. Treating acceptance as the
same at every depth (the stationary approximation Sequoia also makes), the expected tokens per
step are E = 1 + sum_d prod_{i <= d} rates[w_i - 1] and the walk visits about E nodes, so

    step time = draft_root + sum_{d < D} draft(m_d) + target(1 + N) + head + E verify + a + b N
    tokens/s  = E / step time,   against 1 / (a real plain-sampling step) for plain sampling,

(for chains on the decoder's lean loop, draft_root + sum_d draft(m_d) is the time of drafting the
whole chain as that loop does, ``chain_draft(D)``: one compiled call where it applies),

where N = sum_d m_d, head is one output-layer call on every row for a tree of at most
``HEAD_BATCH_ROWS`` rows (plus a transform per visited row), else E single-row calls, and a + b N
the loop's own work per step, from real steps of ``OVERHEAD_SHAPES`` (real tree steps and
plain-sampling steps in alternating blocks, ``_real_steps``): b the slope in N of their time
outside the models, a their mean time beyond the predicted items less b N (``_step_overhead``).
Where chains run the decoder's lean loop (``TreeDecoder.lean_chains``), chains and trees get a
line each, from two shapes of their own (``LEAN_OVERHEAD_SHAPES``).

``choose_tree`` enumerates every shape with widths <= max_width, depth <= max_depth and at most
max_nodes nodes, and returns the best, or plain sampling (depth 0) unless the best is predicted
to beat it by ``MIN_SPEEDUP`` (a margin for calibration noise), over a whole generation when its
length is given (the tree also pays the draft's prefill); ``ceiling`` scores the shapes
with drafting, verification and the loop's work free, a bound on what speculation can gain. The
choice depends on timings, so it is machine-dependent (the output law is the target's whatever
the tree); the calibration is cached on disk per (pair, dtype, device, threads, sampling, law,
verifier), and ``TreeDecoder`` reports the chosen shape so a run can be pinned with ``--tree``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from mdsd.engine.decode import HEAD_BATCH_ROWS, plain_tokens
from mdsd.engine.walk import RuleBook, draft_children, verify_node
from mdsd.sampling import categorical

MAX_WIDTH = 4
MAX_DEPTH = 6
MAX_NODES = 64
# Sampled positions per prompt. The first tokens after a prompt are the hardest to draft: on the
# bundled pair (T = 0.7) single-draft acceptance averaged 0.60 over tokens 1-24 and 0.65 over
# tokens 25-96, so a profile of the first 24 alone made every tree look worse than it runs.
CALIBRATION_TOKENS = 64
CALIBRATION_PROMPTS = 4
DIGEST_VALUES = 4096  # leading values of each parameter hashed into the calibration key
TIMING_REPEATS = 7
# A tree must be predicted this much faster than plain sampling: calibration noise on a shared
# CPU (every item is timed in interleaved rounds, after the forward that precedes it in the loop).
MIN_SPEEDUP = 1.05
PROFILE_SAMPLES = 64  # Monte-Carlo draft sets per position where no exact method exists
TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64)  # forward sizes timed for the cost model


@dataclass(frozen=True)
class AcceptanceProfile:
    """rates[n - 1]: mean exact P(accept | n drafts) at one node, n = 1..len(rates)."""

    rates: tuple[float, ...]
    positions: int


@dataclass(frozen=True)
class CostModel:
    """Seconds per operation on this machine (medians of timed repeats).

    target_s[i]: a forward with ``tokens[i]`` new tokens, timed right after a draft forward (as
    in the loop, where the draft's levels evict part of the target's weights from the CPU
    caches); draft_s[i]: a draft level of ``tokens[i]`` nodes (forward, output layer and sampling
    transform on every row) right after another draft level, draft_root_s: the first level (one
    token) right after a target forward, whose weights evicted the draft's; head_s: output layer
    and transform of one visited target row; head_rows_s[r - 1]: the output layer alone on r
    rows at once (a small tree's rows, ``decode.HEAD_BATCH_ROWS``); verify_s[n - 1]: one node
    verification with n drafts; sample_s: one draw from the target (plain sampling's per-token
    extra); step_overhead_s + step_overhead_per_node_s * N: what real steps of a tree of N nodes
    take beyond (or below) the model of these items (drafting the children, the walk, cache and
    statistics bookkeeping, cache effects), a line from real steps of small shapes
    (``_step_overhead``) added to every tree's step; chain_overhead_s +
    chain_overhead_per_node_s * N: the same for chains where they run the decoder's lean loop
    (``TreeDecoder.lean_chains``; None: chains are on the trees' line);
    autoregressive_step_s: the median of real plain-sampling steps (forward, output layer,
    transform, draw), the baseline of the speedups;
    draft_body_s[i]: the draft's forward of ``tokens[i]`` tokens without the output layer (its
    prompt's prefill, ``draft_prefill``);
    chain_draft_s[d - 1]: drafting a chain of depth d as the lean loop does
    (``TreeDecoder.draft_chain``: every level's forward, q and draw; the whole chain in one
    compiled call where it applies, each level then costing a fraction of a ``draft_s`` level),
    right after a target forward; () where chains do not run the lean loop.
    """

    tokens: tuple[int, ...]
    target_s: tuple[float, ...]
    draft_s: tuple[float, ...]
    draft_root_s: float
    head_s: float
    head_rows_s: tuple[float, ...]
    verify_s: tuple[float, ...]
    sample_s: float
    autoregressive_s: float  # the target's 1-token forward alone (no draft in between)
    step_overhead_s: float = 0.0  # real steps minus their predicted time at N = 0 (may be < 0)
    step_overhead_per_node_s: float = 0.0  # ... and per node of the tree (>= 0)
    autoregressive_step_s: float = 0.0  # a real plain-sampling step (0: the sum of its items)
    draft_body_s: tuple[float, ...] = ()  # the draft's forward alone, per ``tokens`` (): unmeasured
    chain_overhead_s: float | None = None  # chains on the lean loop: their own line (None: the above)
    chain_overhead_per_node_s: float = 0.0
    chain_draft_s: tuple[float, ...] = ()  # chains on the lean loop, by depth (): unmeasured

    def chain_draft(self, depth: int) -> float | None:
        """Seconds to draft a chain of ``depth`` on the lean loop (linear beyond the deepest
        timed), or None where unmeasured."""
        if not self.chain_draft_s:
            return None
        if depth <= len(self.chain_draft_s):
            return self.chain_draft_s[depth - 1]
        depths = np.arange(1, len(self.chain_draft_s) + 1)
        return _extrapolate(depths, self.chain_draft_s, depth) if depths.size > 1 else None

    def overhead(self, widths: tuple[int, ...]) -> float:
        """The loop's own seconds per step of a tree of ``widths`` beyond the items: a + b N on
        the line of its loop (chains' own line where they run the lean loop)."""
        nodes = sum(level_sizes(widths))
        if self.chain_overhead_s is not None and max(widths) == 1:
            return self.chain_overhead_s + self.chain_overhead_per_node_s * nodes
        return self.step_overhead_s + self.step_overhead_per_node_s * nodes

    def target(self, m: float) -> float:
        return float(
            np.interp(m, self.tokens, self.target_s, right=_extrapolate(self.tokens, self.target_s, m))
        )

    def draft(self, m: float) -> float:
        return float(
            np.interp(m, self.tokens, self.draft_s, right=_extrapolate(self.tokens, self.draft_s, m))
        )

    def draft_prefill(self, m: float) -> float:
        """A prompt of m tokens through the draft (its forward, then the output layer and the
        transform on the last row): what a tree pays before its first step and plain sampling
        does not; 0 where the draft's forward alone was not measured."""
        if not self.draft_body_s:
            return 0.0
        body = np.interp(
            m, self.tokens, self.draft_body_s, right=_extrapolate(self.tokens, self.draft_body_s, m)
        )
        return float(body + self.draft_s[0] - self.draft_body_s[0])

    def autoregressive_step(self) -> float:
        if self.autoregressive_step_s > 0:
            return self.autoregressive_step_s
        return self.autoregressive_s + self.head_s + self.sample_s


def _extrapolate(xs, ys, x) -> float:
    """Linear continuation of the last segment beyond the largest timed size."""
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return ys[-1] + slope * (x - xs[-1])


@dataclass(frozen=True)
class TreeChoice:
    """The chosen shape (empty = plain sampling) with its predicted throughput."""

    widths: tuple[int, ...]
    expected_tokens: float
    step_s: float
    tokens_per_s: float
    autoregressive_tokens_per_s: float

    @property
    def predicted_speedup(self) -> float:
        return self.tokens_per_s / self.autoregressive_tokens_per_s

    def describe(self) -> str:
        return ",".join(map(str, self.widths)) if self.widths else "autoregressive"


@dataclass(frozen=True)
class Calibration:
    profile: AcceptanceProfile
    cost: CostModel


# ---------------------------------------------------------------------- the model
def level_sizes(widths: tuple[int, ...]) -> list[int]:
    """m_d = w_1 ... w_d, the nodes at each depth of a uniform tree (their sum: N)."""
    return list(itertools.accumulate(widths, lambda a, b: a * b))


def expected_tokens(widths: tuple[int, ...], rates: tuple[float, ...]) -> float:
    """E = 1 + sum_d prod_{i <= d} rates[w_i - 1]: accepted drafts + the final token."""
    total, reach = 1.0, 1.0
    for w in widths:
        reach *= rates[w - 1]
        total += reach
    return total


def predict(widths: tuple[int, ...], calibration: Calibration) -> TreeChoice:
    """Predicted tokens per second of a tree shape (empty = plain sampling)."""
    cost = calibration.cost
    ar = 1.0 / cost.autoregressive_step()
    if not widths:
        return TreeChoice((), 1.0, cost.autoregressive_step(), ar, ar)
    rates = calibration.profile.rates
    sizes = level_sizes(widths)
    e = expected_tokens(widths, rates)
    verify = _mean_verify(widths, cost)
    rows = 1 + sum(sizes)
    if rows <= len(cost.head_rows_s):  # one output-layer call on every row, a transform per visit
        head = cost.head_rows_s[rows - 1] + e * (cost.head_s - cost.head_rows_s[0])
    else:
        head = e * cost.head_s
    drafting = cost.chain_draft(len(widths)) if max(widths) == 1 else None
    if drafting is None:  # level by level
        drafting = cost.draft_root_s + sum(cost.draft(m) for m in sizes[:-1])
    step = drafting + cost.target(rows) + head + e * verify + cost.overhead(widths)
    return TreeChoice(tuple(widths), float(e), float(step), float(e / step), ar)


def choose_tree(
    calibration: Calibration,
    *,
    max_width: int = MAX_WIDTH,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
    min_width: int = 1,
    min_speedup: float = MIN_SPEEDUP,
    prompt_tokens: float = 0.0,
    new_tokens: int | None = None,
) -> TreeChoice:
    """The shape of highest predicted tokens/s; plain sampling (depth 0) unless that shape is
    predicted to beat it by at least ``min_speedup``.

    Without ``new_tokens`` the two are compared per token in the steady state. With it, over a
    whole generation of ``new_tokens`` tokens after a prompt of ``prompt_tokens``: both pay the
    target's prefill, the tree also the draft's (``CostModel.draft_prefill``), so a short
    generation can keep plain sampling where a long one would take the tree.
    """
    max_width = min(max_width, len(calibration.profile.rates))
    plain = best = predict((), calibration)
    for depth in range(1, max_depth + 1):
        for widths in itertools.product(range(min_width, max_width + 1), repeat=depth):
            if sum(level_sizes(widths)) > max_nodes:
                continue
            choice = predict(widths, calibration)
            if choice.tokens_per_s > best.tokens_per_s:
                best = choice
    if new_tokens is None:
        return best if best.tokens_per_s >= min_speedup * plain.tokens_per_s else plain
    cost = calibration.cost
    shared = cost.target(prompt_tokens) if prompt_tokens else 0.0
    plain_s = shared + new_tokens / plain.tokens_per_s
    tree_s = shared + cost.draft_prefill(prompt_tokens) + new_tokens / best.tokens_per_s
    return best if plain_s >= min_speedup * tree_s else plain


def ceiling(
    calibration: Calibration,
    *,
    max_width: int = MAX_WIDTH,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
) -> TreeChoice:
    """The best shape if drafting, verification and the loop's own work cost nothing: a step
    is then the target's tree forward and its output layer (with the transform of each visited
    row), against a real plain-sampling step.

    Its ``predicted_speedup`` bounds, within the model's approximations, what any tree of these
    shapes can gain with this pair's acceptance profile on this machine. Near 1, each extra row of
    the target's forward costs about what its accepted tokens save (on a CPU whose one-row
    forward streams the weights near the memory bound, every extra row adds its arithmetic), and
    no faster draft model or verifier makes speculation pay.

    A negative fitted intercept (``step_overhead_s`` < 0: real steps are faster than the timed
    items, which were timed apart from the loop) is a correction of the items, not loop work,
    and is kept, so the ceiling is never below the prediction of any shape."""
    cost = calibration.cost
    free = replace(
        cost,
        draft_s=(0.0,) * len(cost.draft_s),
        draft_root_s=0.0,
        chain_draft_s=(0.0,) * len(cost.chain_draft_s),
        verify_s=(0.0,) * len(cost.verify_s),
        step_overhead_s=min(cost.step_overhead_s, 0.0),
        step_overhead_per_node_s=0.0,
        chain_overhead_s=None if cost.chain_overhead_s is None else min(cost.chain_overhead_s, 0.0),
        chain_overhead_per_node_s=0.0,
    )
    return choose_tree(
        Calibration(calibration.profile, free),
        max_width=max_width,
        max_depth=max_depth,
        max_nodes=max_nodes,
        min_speedup=1.0,
    )


# ---------------------------------------------------------------------- calibration
def calibrate(decoder, prompts, rng: np.random.Generator, *, max_width: int = MAX_WIDTH) -> Calibration:
    """Measure the acceptance profile and the cost model with a ``TreeDecoder``'s runners."""
    contexts, targets, drafts = _sample_positions(decoder, prompts, rng)
    profile = _acceptance_profile(targets, drafts, decoder.book, max_width)
    cost = _cost_model(decoder, contexts, targets, drafts, max_width, rng)
    lean = decoder.lean_chains()
    if lean:
        cost = replace(cost, chain_draft_s=_chain_draft_times(decoder, contexts[0], rng))
    if decoder.config.verifier == "block":
        shapes = CHAIN_OVERHEAD_SHAPES
    else:
        shapes = LEAN_OVERHEAD_SHAPES if lean else OVERHEAD_SHAPES
    real = _real_steps(decoder, contexts[0], shapes, rng)
    items = Calibration(profile, cost)
    trees = [w for w in shapes if max(w) > 1] if lean else shapes
    base, per_node = _step_overhead(real, items, trees or shapes)  # block: chains only
    cost = replace(
        cost, step_overhead_s=base, step_overhead_per_node_s=per_node, autoregressive_step_s=real.plain_s
    )
    if lean:
        chain_base, chain_per_node = _step_overhead(real, items, [w for w in shapes if max(w) == 1])
        cost = replace(cost, chain_overhead_s=chain_base, chain_overhead_per_node_s=chain_per_node)
    return Calibration(profile, cost)


# Bumped whenever the calibration measures differently, so that cached calibrations are redone.
# 5: the draft's forward alone timed; real steps timed after 5 of their kind; 6: the overhead
# line's slope from the loop's own work of real steps (``_step_overhead``); 7: a line of their own
# for chains on the lean loop (``LEAN_OVERHEAD_SHAPES``); 8: chains' drafting timed as the lean loop
# drafts them (``CostModel.chain_draft_s``); 9: block-verified chains on the lean loop; 10: steps
# of one compiled call each, plain sampling timed in its compiled loop (``decode.plain_tokens``);
# 11: the output layer timed on up to ``HEAD_BATCH_ROWS`` rows (24 with AVX-512)
CALIBRATION_METHOD = 11
STEP_ROUNDS = 5  # rounds of real steps; in each, a block of every kind of step
STEP_BLOCK = 10  # steps of one kind in a row ...
STEP_WARMUP = 5  # ... the first of which are untimed (the caches settle into the kind's own state)


@dataclass(frozen=True)
class RealSteps:
    """Typical real decoding steps (``_real_steps``), in seconds per step.

    seconds: {tree widths: a whole step}; loop_seconds: {tree widths: the step's time outside
    the two models' forwards and output layers, the loop's own work}; plain_s: a plain-sampling
    step.
    """

    seconds: dict
    loop_seconds: dict
    plain_s: float


def _real_steps(decoder, context, shapes, rng) -> RealSteps:
    """Typical seconds of real decoding steps after ``context``, per tree shape and for plain
    sampling (the steps of ``decode.Autoregressive``: one-token forward, output layer,
    transform, draw). In each of ``STEP_ROUNDS`` rounds every kind runs a block of
    ``STEP_BLOCK`` steps in a row, on a sequence that grows from ``context`` again in every round
    (a forward's attention grows with the context, ~6% per 100 tokens on the bundled target, so
    contexts stay as long as a generation's): a block sees the caches as a
    loop of its own kind leaves them (plain sampling's weights stay warm; a tree step follows a
    tree step) and the rounds spread every kind over the same states of a shared machine. The
    first ``STEP_WARMUP`` steps of a block (after another kind) are untimed: plain sampling's
    steps after tree steps took ~15% longer for three or four steps before they settled to the
    plain loop's time (its weights filling the caches again), and timing them from the second
    step on made every predicted speedup ~10% high (BENCHMARKS.md). A block's steps are averaged (a tree
    step's cost depends on its outcome, and throughput follows the mean) and the median over the
    rounds is kept: one slow spell of a shared machine hitting one block of three 1-4 node shapes
    would otherwise tilt the overhead line fitted to them (``_step_overhead``; a spell during a
    bfloat16 calibration once made it 0.63 ms per node, ten times the loop's real cost, and the
    choice a single draft at 1.5x where a 1x3 chain made 1.97x). The same medians are kept of
    each block's time outside the models (``RealSteps.loop_seconds``)."""
    from mdsd.engine.records import DecodeStats
    from mdsd.engine.tree import build_tree

    trees = {widths: build_tree(widths) for widths in shapes}
    per_round = STEP_BLOCK * (sum(tree.depth + 1 for tree in trees.values()) + 1)  # tokens at most
    row_probs, target = decoder.sampling.row_probs, decoder.target
    blocks = {widths: [] for widths in shapes} | {(): []}  # block means per kind, one per round
    loops = {widths: [] for widths in shapes}  # ... of the time outside the models

    def model_time():
        return decoder.target.model_time + decoder.draft.model_time

    for _ in range(STEP_ROUNDS):
        seq = list(context)
        for runner in (decoder.target, decoder.draft):
            runner.reset(len(seq) + per_round + 1)
        for widths, tree in trees.items():
            decoder._use_tree(tree)
            stats = DecodeStats(depth=tree.depth, sequences=1)
            times, outside = [], []
            for i in range(STEP_BLOCK):
                start, inside = time.perf_counter(), model_time()
                seq += decoder.step(seq, rng, stats)
                if i >= STEP_WARMUP:
                    times.append(time.perf_counter() - start)
                    outside.append(times[-1] - (model_time() - inside))
            blocks[widths].append(np.mean(times))
            loops[widths].append(np.mean(outside))
        plain = plain_tokens(target, decoder.sampling, seq, STEP_BLOCK, None, (), rng)  # compiled
        if plain is not None:  # as plain sampling runs: its tokens in one compiled call
            seq += plain.tokens
            blocks[()].append(float(plain.seconds[STEP_WARMUP:].sum(axis=1).mean()))
            continue
        times = []
        for i in range(STEP_BLOCK):
            start = time.perf_counter()
            probs = row_probs(target.causal(np.asarray(seq[target.cached :]), keep=1)[0])
            seq.append(probs.token(int(categorical(probs.values, rng))))
            if i >= STEP_WARMUP:
                times.append(time.perf_counter() - start)
        blocks[()].append(np.mean(times))
    decoder.tree = None  # the caller adopts the chosen shape
    typical = {widths: float(np.median(means)) for widths, means in blocks.items()}
    loop = {widths: float(np.median(means)) for widths, means in loops.items()}
    return RealSteps({w: t for w, t in typical.items() if w}, loop, typical[()])


OVERHEAD_SHAPES = ((1,), (1, 1), (2, 1))  # 1, 2 and 4 nodes; width 2 suits every law
CHAIN_OVERHEAD_SHAPES = ((1,), (1, 1), (1, 1, 1))  # for rules that verify chains only (block)
# where chains run the lean loop (``TreeDecoder.lean_chains``): two chains, two trees
LEAN_OVERHEAD_SHAPES = ((1,), (1, 1), (2,), (2, 1))


def _step_overhead(real: RealSteps, calibration: Calibration, shapes=None) -> tuple[float, float]:
    """The loop's own seconds per step that the cost items miss (or count twice), as a line
    a + b N in the tree's node count N, from the real steps of ``shapes`` (None: all of them).
    The slope b >= 0 is the least-squares slope in N of the real steps' time outside the
    models (``RealSteps.loop_seconds``: wider trees draft, transform and verify more rows per
    step) less their predicted verification; a is the mean of the real steps' times minus
    their predicted step times minus b N (it also takes the models' costs in the loop beyond
    the items timed alone, e.g. caches evicted by the other model).

    The slope comes from the time outside the models because the whole steps' residuals carry
    the models' spells of a shared machine: in bfloat16 (steps of ~9 ms) their slope came out at
    0.30 and 0.48 ms per node in two calibrations, ten times the loop's work, and auto chose
    one- and two-node chains where 1x4 and 1x6 chains measured 2-15% faster (BENCHMARKS.md).
    Returns (a, b)."""
    shapes = list(real.seconds if shapes is None else shapes)
    nodes = np.array([sum(level_sizes(w)) for w in shapes])
    predicted = [predict(w, calibration) for w in shapes]
    verify = [p.expected_tokens * _mean_verify(w, calibration.cost) for w, p in zip(shapes, predicted)]
    loop = np.array([real.loop_seconds[w] for w in shapes]) - np.array(verify)
    per_node = max(0.0, float(np.polyfit(nodes, loop, 1)[0]))
    residuals = np.array([real.seconds[w] - p.step_s for w, p in zip(shapes, predicted)])
    return float(np.mean(residuals - per_node * nodes)), per_node


def _mean_verify(widths: tuple[int, ...], cost: CostModel) -> float:
    """The predicted seconds of one node verification in a tree of ``widths`` (``predict``'s)."""
    return float(np.mean([cost.verify_s[w - 1] for w in widths]))


def _sample_positions(decoder, prompts, rng):
    """(context ids, p, q) at positions of text sampled from the target after each prompt."""
    from mdsd.engine.decode import encode_prompt

    contexts, targets, drafts = [], [], []
    row_probs = decoder.sampling.row_probs
    for prompt in list(prompts)[:CALIBRATION_PROMPTS]:
        ids = encode_prompt(decoder.pair, prompt)
        for runner in (decoder.target, decoder.draft):
            runner.reset(len(ids) + CALIBRATION_TOKENS + 1)
        pending = list(ids)
        for _ in range(CALIBRATION_TOKENS):
            p = row_probs(decoder.target.causal(np.asarray(pending), keep=1)[0])
            q = decoder.draft_probs(decoder.draft.causal(np.asarray(pending), keep=1)[0])
            contexts.append(list(ids))
            targets.append(p)
            drafts.append(q)
            token = p.token(int(categorical(p.values, rng)))
            ids.append(token)
            pending = [token]
    if not targets:
        raise ValueError("prompts: --tree auto needs at least one prompt to calibrate on")
    return contexts, targets, drafts


def _acceptance_profile(targets, drafts, book: RuleBook, max_width: int) -> AcceptanceProfile:
    """Mean acceptance per number of drafts over the sampled positions, all positions at once.

    ``mdsd.acceptance_rate`` per group of positions sharing a node rule (the law drafts fewer
    than n tokens where the support is smaller): exact (closed form or enumeration) where it has
    a method, else Rao-Blackwellised Monte Carlo with ``PROFILE_SAMPLES`` draft sets per position.
    """
    from mdsd.acceptance import acceptance_rate

    target = np.stack([p.dense() for p in targets])  # [P, V]
    draft = np.stack([q.dense() for q in drafts])  # [P, V]
    support = np.count_nonzero(draft, axis=1)
    rates = []
    for n in range(1, max_width + 1):
        groups: dict = {}
        for row, size in enumerate(support):
            groups.setdefault(book.rule(n, int(size)), []).append(row)
        total = 0.0
        for rule, rows in groups.items():
            result = acceptance_rate(
                target[rows],
                draft[rows],
                rule.n_eff,
                verifier=rule.verifier.name,
                law=rule.law.name,
                num_samples=PROFILE_SAMPLES,
                chunk_rows=16,
            )
            total += float(np.sum(result.rate))
        rates.append(total / len(targets))
    # more drafts never lower the optimum; keep the profile monotone against estimation noise
    return AcceptanceProfile(tuple(np.maximum.accumulate(rates)), len(targets))


def _median_time(fn, repeats: int = TIMING_REPEATS, setup=None) -> float:
    """Median time of ``fn()``; ``setup()`` runs untimed before each call (e.g. the other
    model's forward, which evicts this one's weights from the caches as in the decoding loop)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _interleaved_times(items: dict, repeats: int = TIMING_REPEATS) -> dict:
    """Median seconds of each ``fn`` of ``items`` = {key: (fn, setup)}, timed in rounds (every
    item once per round) so that a change of the machine's load during calibration affects every
    item alike; ``setup()`` runs untimed right before its ``fn()``."""
    for fn, _ in items.values():
        fn()  # warm-up
    times = {key: [] for key in items}
    for _ in range(repeats):
        for key, (fn, setup) in items.items():
            setup()
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: float(np.median(t)) for key, t in times.items()}


def _cost_model(decoder, contexts, targets, drafts, max_width: int, rng) -> CostModel:
    """Forwards and output layers are timed as the loops run them: plain sampling's forward right
    after another target forward; a tree's target forward right after a draft forward, a draft
    level right after a target forward (which evicts the draft's weights from the CPU caches);
    the target's output layer right after a target forward of the body."""
    vocab = decoder.vocab
    context = contexts[0]
    row_probs = decoder.sampling.row_probs
    counts = tuple(m for m in TOKEN_COUNTS if m <= MAX_NODES + 1)
    for runner in (decoder.target, decoder.draft):
        runner.reset(len(context) + max(counts) + 1)
        runner.causal_hidden(np.asarray(context[:-1]), keep=1)  # the prefill is not timed
    one = rng.integers(0, vocab, size=1)
    target_one = lambda: _tree_forward(decoder.target, context, one, None)  # noqa: E731
    draft_one = lambda: _tree_forward(decoder.draft, context, one, None)  # noqa: E731
    draft_probs = decoder.draft_probs
    draft_level = lambda: _tree_forward(decoder.draft, context, one, draft_probs)  # noqa: E731
    hidden = decoder.target.causal_hidden(np.asarray(context[-1:]), keep=1)  # [1, H]
    stacked = [hidden.expand(r, -1).contiguous() for r in range(1, HEAD_BATCH_ROWS + 1)]  # [r, H]
    items = {"autoregressive": (target_one, target_one)}
    for m in counts:
        tokens = rng.integers(0, vocab, size=m)
        items[("target", m)] = (lambda t=tokens: _tree_forward(decoder.target, context, t, None), draft_one)
        items[("draft", m)] = (
            lambda t=tokens: _tree_forward(decoder.draft, context, t, draft_probs),
            draft_level,
        )
        items[("draft body", m)] = (
            lambda t=tokens: _tree_forward(decoder.draft, context, t, None),
            target_one,
        )
    items["draft root"] = (lambda: _tree_forward(decoder.draft, context, one, draft_probs), target_one)
    items["head"] = (lambda: row_probs(decoder.target.logits(hidden)[0]), target_one)
    for r, h in enumerate(stacked, start=1):
        items[("head", r)] = (lambda h=h: decoder.target.logits(h), target_one)
    seconds = _interleaved_times(items)
    autoregressive_s = seconds["autoregressive"]
    target_s = [seconds["target", m] for m in counts]
    draft_s = [seconds["draft", m] for m in counts]
    head_s = seconds["head"]
    head_rows_s = tuple(seconds["head", r] for r in range(1, HEAD_BATCH_ROWS + 1))
    p0 = targets[0]
    sample_s = _median_time(lambda: categorical(p0.values, rng))
    verify_s = []
    for n in range(1, max_width + 1):
        cases = []
        for p, q in list(zip(targets, drafts))[:8]:
            kids, rule = draft_children(q, n, decoder.book, rng)
            cases.append((p, q, kids, rule))
        verify_s.append(
            _median_time(lambda c=cases: [verify_node(p, q, k, r, rng) for p, q, k, r in c]) / len(cases)
        )
    return CostModel(
        counts,
        tuple(target_s),
        tuple(draft_s),
        seconds["draft root"],
        head_s,
        head_rows_s,
        tuple(verify_s),
        sample_s,
        autoregressive_s,
        draft_body_s=tuple(seconds["draft body", m] for m in counts),
    )


def _tree_forward(runner, context, tokens, row_probs) -> None:
    """One forward of ``tokens`` as a chain after the cached ``context[:-1]`` (cost does not
    depend on the mask), then back to that cache; with ``row_probs``, the output layer and
    transform on every row (a draft level)."""
    base = runner.cached
    m = len(tokens)
    mask = runner.additive(np.tril(np.ones((m, m), dtype=bool)))
    hidden = runner.tree_hidden(tokens, 0, mask, np.arange(1, m + 1), len(context) - 1, keep=m)
    if row_probs is not None:
        for row in runner.logits(hidden):
            row_probs(row)
    runner.keep_positions(base, np.zeros(0, dtype=np.int64))


def _chain_draft_times(decoder, context, rng, depths: int = MAX_DEPTH) -> tuple[float, ...]:
    """Seconds of ``TreeDecoder.draft_chain`` for chains of depth 1..``depths`` after the cached
    ``context[:-1]`` (one fresh token), each right after a target forward as in the loop, timed
    in interleaved rounds; the caches go back to ``context[:-1]`` after every call."""
    from mdsd.engine.tree import build_tree

    for runner in (decoder.target, decoder.draft):
        runner.reset(len(context) + depths + 1)
        runner.causal_hidden(np.asarray(context[:-1]), keep=1)  # the prefill is not timed
    one = rng.integers(0, decoder.vocab, size=1)
    seq = list(context)
    trees = {d: build_tree((1,) * d) for d in range(1, depths + 1)}

    def drafted(depth):
        base = decoder.draft.cached
        if decoder.tree is not trees[depth]:  # the untimed warm-up call runs without its setup
            decoder._use_tree(trees[depth])
        decoder.draft_chain(seq, rng)
        decoder.draft.keep_positions(base, np.zeros(0, dtype=np.int64))

    def target_forward(depth):
        decoder._use_tree(trees[depth])  # untimed: the chain's shape
        _tree_forward(decoder.target, context, one, None)

    items = {d: (lambda d=d: drafted(d), lambda d=d: target_forward(d)) for d in trees}
    seconds = _interleaved_times(items)
    decoder.tree = None  # the caller adopts the chosen shape
    return tuple(seconds[d] for d in trees)


# ---------------------------------------------------------------------- cache
def calibration_key(decoder, prompts) -> str:
    """Digest of what the calibration depends on (models, dtype, device, threads, matmul, sampling,
    law, verifier, calibration prompts)."""
    pair = decoder.pair
    parts = {
        "pair": pair.name,
        "target": [weights_digest(pair.target), str(pair.target.dtype)],
        "draft": [weights_digest(pair.draft), str(pair.draft.dtype)],
        "device": str(pair.target.device),
        "threads": torch.get_num_threads(),
        "runner": type(decoder.target).__name__,
        "matmul": getattr(decoder.target, "matmul", None),
        "panels": [getattr(r, "panel_format", None) for r in (decoder.target, decoder.draft)],
        "draft_vocab": _ids_digest(decoder.draft.output_ids),
        "sampling": repr(decoder.sampling),
        "law": decoder.book.law.name,
        "verifier": decoder.book.verifier.name,
        "prompts": [str(p) for p in list(prompts)[:CALIBRATION_PROMPTS]],
        "limits": [CALIBRATION_TOKENS, MAX_WIDTH, TOKEN_COUNTS],
        "cost_model": [f.name for f in fields(CostModel)],  # a calibration of an older layout is stale
        "method": CALIBRATION_METHOD,  # ... and one measured the old way
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def weights_digest(model) -> str:
    """Digest of a model's weights: every parameter's name, shape, dtype, float64 sum and first
    ``DIGEST_VALUES`` values. A model retrained under the same name or path (a new release of a
    bundled model, a local checkpoint trained further) gets another key, so its calibration is
    redone rather than read from the cache."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            head = flat[:DIGEST_VALUES].to(device="cpu", dtype=torch.float64).numpy()
            total = float(flat.sum(dtype=torch.float64))  # accumulated in float64, no copy
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{total!r}|".encode())
            digest.update(head.tobytes())
    return digest.hexdigest()[:16]


def _ids_digest(token_ids) -> str | None:
    if token_ids is None:
        return None
    return hashlib.sha256(np.asarray(token_ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MDSD_CACHE_DIR", Path.home() / ".cache" / "mdsd")) / "auto-tree"


def load_or_calibrate(decoder, prompts, rng, cache_dir: Path | None) -> Calibration:
    """The cached calibration for this setting, or a new one (then cached)."""
    path = None if cache_dir is None else Path(cache_dir) / f"{calibration_key(decoder, prompts)}.json"
    if path is not None and path.exists():
        data = json.loads(path.read_text())
        return Calibration(AcceptanceProfile(**_tuples(data["profile"])), CostModel(**_tuples(data["cost"])))
    calibration = calibrate(decoder, prompts, rng)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(calibration)))
    return calibration


def _tuples(record: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}


__all__ = [
    "AcceptanceProfile",
    "Calibration",
    "CostModel",
    "TreeChoice",
    "calibrate",
    "ceiling",
    "choose_tree",
    "expected_tokens",
    "load_or_calibrate",
    "predict",
]
