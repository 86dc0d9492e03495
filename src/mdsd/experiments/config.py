"""Typed configuration of a measurement sweep (Hu et al., ICLR 2025, Section 6 protocol).

``DEFAULT`` takes 3-4.5 CPU-minutes with the bundled pair (capture + analysis, docs/measure.md);
``PAPER`` is the paper-scale sweep (up to 128 generated tokens; use 200 prompts per domain, all
the bundled held-out prompts).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from mdsd.experiments.vocabulary import MEASURED_LAWS

DEFAULT_TEMPERATURES = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
DEFAULT_NS = (1, 2, 3, 4, 6, 8)
TABLE_TEMPERATURE = 0.7  # the paper's default setting, used for Table 1
TABLE_N = 3


@dataclass(frozen=True)
class MeasureConfig:
    """What to capture and how to analyse it.

    Capture (changes the cached logits): target, draft, prompts, num_prompts, max_new_tokens,
    top_k, seed, temperatures. Analysis only: ns, laws, verifiers, mc_samples, subsample,
    subsample_positions.

    top_k: the sampling transform keeps the top_k logits of each model (HF ``generate``'s
        default is 50). p and q are then exactly zero off their top-k sets, the cache stores only
        the kept logits, and every rate is computed on the union of the two supports (exact, no
        dropped mass). None: the full vocabulary (dense float16 cache, much slower analysis).
    mc_samples: draft sets sampled per position where a (verifier, law) has no exact method.
    subsample: entries ``verifier`` (all its laws and n), ``verifier:law`` or ``verifier:law:n``
        rated on a seeded subsample of ``subsample_positions`` positions per (dataset, T), the same
        for every n and law. By default the costly exact rates: ``optimal``'s per-position fits
        (~1-15 ms each) and ``rrs_without_replacement`` at n = 4 (its exact draw-tree enumeration,
        ~5 ms per position at top-k 50; at n >= 6 the tree is too large and Monte Carlo is cheap).
        Results depend on these two values and the seed only. ``subsample=()`` or
        ``subsample_positions=None``: every position (an exact run).
    """

    target: str | None = None  # None: the bundled pair
    draft: str | None = None
    prompts: str | None = None  # JSONL file; None: the bundled held-out prompts of every domain
    num_prompts: int = 16  # per dataset
    max_new_tokens: int = 64
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    ns: tuple[int, ...] = DEFAULT_NS
    laws: tuple[str, ...] = MEASURED_LAWS
    verifiers: tuple[str, ...] | None = None  # None: every verifier in the registry
    top_k: int | None = 50
    seed: int = 0
    device: str = "cpu"
    mc_samples: int = 16
    subsample: tuple[str, ...] = ("optimal", "rrs_without_replacement:without_replacement:4")
    subsample_positions: int | None = 64
    threads: int | None = 1  # torch threads during the run (None: leave torch's setting). One
    # thread is much faster for these small models on a shared CPU (less contention).
    extra: dict = field(default_factory=dict)

    def capture_key(self) -> str:
        """Short hash of everything that changes the cached logits (not the temperatures: each
        (dataset, T, prompt) has its own file, so adding a temperature reuses the rest)."""
        payload = {
            "target": self.target,
            "draft": self.draft,
            "max_new_tokens": self.max_new_tokens,
            "top_k": self.top_k,
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]

    def to_json(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> MeasureConfig:
        return replace(self, **changes)


DEFAULT = MeasureConfig()
PAPER = MeasureConfig(num_prompts=200, max_new_tokens=128)
