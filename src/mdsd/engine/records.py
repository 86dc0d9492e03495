"""The engine's typed records: the sampling transform and stopping rules (``SamplingConfig``), the
tree shape / draft law / verifier of a run (``TreeConfig``), the counters of runs
(``DecodeStats``) and one generated sequence (``Generation``). The decoders that use them are in
``mdsd.engine.decode``; all four are importable from ``mdsd.engine``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mdsd.engine.static_llama import WEIGHTS
from mdsd.engine.tree import DraftTree, build_tree, parse_tree
from mdsd.logits import SupportProbs, process_logits, process_logits_row
from mdsd.verifiers import natural_verifier

DRAFT_WEIGHTS = WEIGHTS  # TreeConfig.draft_weights: static_llama.StaticLlamaRunner's weights

SEQUENCE_VERIFIERS = {  # sequence-level rules (mdsd.sequence): name -> tree method
    "traversal": "traversal",  # Traversal Verification, arXiv 2505.12398
    "hybrid": "hybrid",  # node steps at branching nodes, block verification on chains
    "block": "traversal",  # block verification (arXiv 2403.10444) = traversal on a chain
}


# ---------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SamplingConfig:
    """The sampling transform (identical for target and draft) and stopping rules.

    temperature 0 is greedy decoding (the tree then holds the draft's greedy chain and decoding
    reproduces the target's greedy continuation exactly).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 64
    stop_on_eos: bool = True

    def __post_init__(self):
        if self.temperature is None or not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """float64 sampling probabilities from logits [..., V] (``mdsd.logits.process_logits``)."""
        return process_logits(logits, self.temperature, self.top_k, self.top_p)

    @property
    def softmax_only(self) -> bool:
        """Whether the transform is softmax(logits / temperature) alone (temperature > 0, no
        top-k or top-p truncation): the compiled draft chain's case
        (``StaticLlamaRunner.sample_chain``)."""
        return self.temperature > 0 and self.top_k is None and (self.top_p is None or self.top_p >= 1.0)

    @property
    def compiled_transform(self) -> bool:
        """Whether the transform is softmax(logits / temperature) after an optional top-k and
        top-p (temperature > 0, not greedy): the case of the compiled paths (plain sampling,
        ``StaticLlamaRunner.sample_chain`` and ``sample_tree``, the compiled walks), which apply
        it by ``mdsd._topp_numba.truncated_softmax``."""
        return self.temperature > 0

    def row_probs(
        self, logits: np.ndarray, token_ids: np.ndarray | None = None, vocab: int = 0
    ) -> SupportProbs:
        """The same transform of one trusted logits row [V], stored on its support
        (``mdsd.logits.process_logits_row``: the engine's fast path, tested equal to ``probs``).

        With ``token_ids`` [K] ascending: ``logits`` [K] are those tokens' logits and every other
        token of the ``vocab`` has logit -inf (a draft output layer over part of the vocabulary,
        ``mdsd.engine.vocab``); the result is over the whole vocabulary.
        """
        drop_zeros = token_ids is not None  # the result is stored on its support
        probs = process_logits_row(logits, self.temperature, self.top_k, self.top_p, drop_zeros=drop_zeros)
        if token_ids is None:
            return probs
        indices = token_ids if probs.indices is None else token_ids[probs.indices]
        return SupportProbs(indices, probs.values, vocab)


@dataclass(frozen=True)
class TreeConfig:
    """Tree shape, draft law and verifier of a speculative run; ``draft_vocab`` K: the draft's
    output layer over its K most likely tokens only (``mdsd.engine.vocab``; None: all);
    ``draft_weights``: "exact" (the draft's own weights) or "int8" (its projections and output
    layer in int8, its activations quantized per row: a faster, slightly different draft,
    ``static_llama.StaticLlamaRunner``; exact all the same, as the verifier is given the q the
    draft computes)."""

    tree: DraftTree | None = field(default_factory=lambda: build_tree((3, 1, 1, 1)))  # None: auto
    law: str | None = "without_replacement"
    verifier: str = "rrs_without_replacement"
    draft_vocab: int | None = None
    draft_weights: str = "exact"

    def __post_init__(self):
        k = self.draft_vocab
        if k is not None and (isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1):
            raise ValueError(f"draft_vocab must be a positive integer or None, got {k!r}")
        if self.draft_weights not in DRAFT_WEIGHTS:
            raise ValueError(
                f"draft_weights must be one of {list(DRAFT_WEIGHTS)}, got {self.draft_weights!r}"
            )

    @classmethod
    def make(cls, tree="3x4", law=None, verifier=None, draft_vocab=None, draft_weights="exact") -> TreeConfig:
        """From a tree spec ("3x4", "3,2,1", widths, a DraftTree or "auto"), a law, a verifier,
        a draft vocabulary size and the draft's weights ("exact" or "int8").

        ``"auto"``: the decoder chooses the shape (possibly plain sampling) from a calibration of
        the pair on this machine (``mdsd.engine.auto``). Defaults: no law and no verifier =
        without_replacement / rrs_without_replacement; a law alone gets its natural verifier
        (``mdsd.verifiers.natural_verifier``); a verifier alone its own law.
        """
        if isinstance(tree, str) and tree.strip().lower() == "auto":
            tree = None
        elif isinstance(tree, str):
            tree = parse_tree(tree)
        elif not isinstance(tree, DraftTree):
            tree = build_tree(tree)
        if verifier is None:
            if law is None:
                law = "without_replacement"
            verifier = natural_verifier(law)
        elif verifier in SEQUENCE_VERIFIERS and law is None:
            law = "iid" if verifier == "block" else "without_replacement"
        return cls(tree, law, verifier, draft_vocab, draft_weights)

    @classmethod
    def from_spec(cls, spec: str, draft_vocab: int | None = None, draft_weights: str = "exact") -> TreeConfig:
        """``LAW:VERIFIER:TREE[:DRAFT_VOCAB[:DRAFT_WEIGHTS]]``, e.g. ``greedy:greedy:3x4``,
        ``iid:rrs:1x3:2048`` or ``iid:rrs:1x3:4096:int8`` (the form of ``mdsd bench --config``);
        an empty field takes the default (``draft_vocab`` and ``draft_weights`` for the last two).
        Raises ValueError naming ``config`` for another form."""
        parts = str(spec).split(":")
        if len(parts) not in (3, 4, 5):
            raise ValueError(
                "config must be LAW:VERIFIER:TREE[:DRAFT_VOCAB[:DRAFT_WEIGHTS]] (e.g. greedy:greedy:3x4), "
                f"got {spec!r}"
            )
        law, verifier, tree = parts[:3]
        if len(parts) >= 4 and parts[3]:
            if not parts[3].isdigit():
                raise ValueError(f"config: DRAFT_VOCAB must be a positive integer, got {parts[3]!r}")
            draft_vocab = int(parts[3])
        if len(parts) == 5 and parts[4]:
            if parts[4] not in DRAFT_WEIGHTS:
                raise ValueError(
                    f"config: DRAFT_WEIGHTS must be one of {list(DRAFT_WEIGHTS)}, got {parts[4]!r}"
                )
            draft_weights = parts[4]
        return cls.make(tree, law or None, verifier or None, draft_vocab, draft_weights)

    def describe(self) -> str:
        """Short name, e.g. ``without_replacement/rrs_without_replacement 3x4`` (+ ``vocab K``,
        + ``int8 draft``)."""
        vocab = "" if self.draft_vocab is None else f" vocab {self.draft_vocab}"
        vocab += " int8 draft" if self.draft_weights == "int8" else ""
        if self.tree is None:
            return f"{self.law or 'default'}/{self.verifier} auto{vocab}"
        widths = self.tree.widths
        shape = f"{widths[0]}x{len(widths)}" if all(w == 1 for w in widths[1:]) else self.tree.describe()
        return f"{self.law or 'default'}/{self.verifier} {shape}{vocab}"


# ---------------------------------------------------------------------- statistics
@dataclass
class DecodeStats:
    """Counters of one or more runs; ``merge`` adds runs (e.g. the prompts of a batch)."""

    depth: int = 0
    sequences: int = 0
    new_tokens: int = 0
    target_calls: int = 0
    steps: int = 0  # verification steps (tree forwards of the target)
    step_tokens: int = 0  # tokens emitted by verification steps, before truncation
    accepted: int = 0  # accepted drafts (tree nodes) over all steps
    draft_calls: int = 0
    depth_tries: np.ndarray = None  # [D] steps that verified some node at this depth
    depth_accepts: np.ndarray = None  # [D] of those, accepted
    depth_expected: np.ndarray = None  # [D] sum of acceptance probabilities given the drafts
    draft_time: float = 0.0
    target_time: float = 0.0
    verify_time: float = 0.0
    total_time: float = 0.0
    draft_model_time: float = 0.0  # inside the draft's forwards and output layer
    target_model_time: float = 0.0  # inside the target's forwards and output layer
    # the target's first forward of each sequence: the prompt's (a tree's also holds its first
    # nodes), which every method pays; part of target_time
    prefill_time: float = 0.0

    def __post_init__(self):
        for name in ("depth_tries", "depth_accepts", "depth_expected"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.depth))

    def add_walk(self, result) -> None:
        """Count one verification step from its walk (``mdsd.engine.walk.WalkResult``): the
        emitted tokens, the accepted drafts and, per visited depth, a try, the expected
        acceptance and the outcome. Entry by entry: a step visits a few depths, and numpy's slice
        arithmetic cost several microseconds a call in the decoding loop."""
        kept = len(result.path)
        self.steps += 1
        self.step_tokens += len(result.emitted)
        self.accepted += kept
        tries, expected, accepts = self.depth_tries, self.depth_expected, self.depth_accepts
        for d, value in enumerate(result.expected_accept):  # depths 0 .. visited - 1
            tries[d] += 1
            expected[d] += value
        for d in range(kept):
            accepts[d] += 1

    def add_step(self, kept: int, bonus: bool) -> None:
        """``add_walk`` of a walk that kept ``kept`` drafts and ended with a bonus token or a
        rejection, its expected acceptances the outcomes (1 per kept draft, 0 at the rejection):
        the steps the compiled loop records as numbers (``_step_numba.tree_steps``)."""
        self.steps += 1
        self.step_tokens += kept + 1
        self.accepted += kept
        for d in range(kept):
            self.depth_tries[d] += 1
            self.depth_expected[d] += 1.0
            self.depth_accepts[d] += 1
        if not bonus:
            self.depth_tries[kept] += 1

    def merge(self, other: DecodeStats) -> DecodeStats:
        if self.depth != other.depth:
            raise ValueError("cannot merge statistics of trees of different depths")
        out = DecodeStats(depth=self.depth)
        for name in (
            "sequences",
            "new_tokens",
            "target_calls",
            "steps",
            "step_tokens",
            "accepted",
            "draft_calls",
            "draft_time",
            "target_time",
            "verify_time",
            "total_time",
            "draft_model_time",
            "target_model_time",
            "prefill_time",
        ):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name in ("depth_tries", "depth_accepts", "depth_expected"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    @property
    def block_efficiency(self) -> float:
        """Mean tokens emitted per verification step (accepted drafts + 1)."""
        return self.step_tokens / self.steps if self.steps else float("nan")

    @property
    def tokens_per_call(self) -> float:
        """Generated tokens per target forward call (prefill included)."""
        return self.new_tokens / self.target_calls if self.target_calls else float("nan")

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.steps if self.steps else float("nan")

    @property
    def acceptance_by_depth(self) -> list[float]:
        """P(accept at depth d | verification reached depth d), d = 1..D: the mean of the exact
        acceptance given the drafts (``exact_acceptance=True``) or of the 0/1 outcomes."""
        return [e / t if t else float("nan") for e, t in zip(self.depth_expected, self.depth_tries)]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_time if self.total_time > 0 else float("nan")

    def as_dict(self) -> dict:
        return {
            "sequences": self.sequences,
            "new_tokens": self.new_tokens,
            "target_calls": self.target_calls,
            "draft_calls": self.draft_calls,
            "steps": self.steps,
            "block_efficiency": self.block_efficiency,
            "tokens_per_call": self.tokens_per_call,
            "mean_accepted": self.mean_accepted,
            "acceptance_by_depth": self.acceptance_by_depth,
            "draft_time_s": self.draft_time,
            "target_time_s": self.target_time,
            "verify_time_s": self.verify_time,
            "total_time_s": self.total_time,
            "draft_model_time_s": self.draft_model_time,
            "target_model_time_s": self.target_model_time,
            "prefill_time_s": self.prefill_time,
            "tokens_per_second": self.tokens_per_second,
        }


@dataclass
class Generation:
    """One generated sequence: new token ids, decoded text, why it stopped, its statistics."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    stop_reason: str  # "eos", "length" or "context"
    stats: DecodeStats
