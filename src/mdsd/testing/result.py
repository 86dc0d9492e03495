"""The audit's result records: one row per case, the worst case, and the verdict."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SHOWN_CELLS = 8  # rows of the observed-vs-expected table in a summary
SHOWN_VOCAB = 8  # print p and q in full up to this vocabulary


@dataclass(frozen=True)
class CaseRow:
    """One audited case.

    name, vocab: the case family and its vocabulary size (tree: V; decoder: V of the models).
    trials: emissions (token), drafted trees (tree) or generations (decoder).
    law_pvalue: G-test p-value of the emitted law against the target's; tv with its 95% interval.
    acceptance, acceptance_stderr, bound, acceptance_pvalue: observed acceptance rate vs alpha*
        (nan where not applicable: tree and decoder audits, or a drafter without a law).
    status: "ok", "loss" or "skipped"; note: why (for skipped and failing rows).
    """

    name: str
    vocab: int
    trials: int
    law_pvalue: float = 1.0
    tv: float = 0.0
    tv_low: float = 0.0
    tv_high: float = 0.0
    impossible: int = 0
    acceptance: float = math.nan
    acceptance_stderr: float = math.nan
    bound: float = math.nan
    acceptance_pvalue: float = 1.0
    status: str = "ok"
    note: str = ""

    @property
    def pvalue(self) -> float:
        """The smaller of the two p-values (the row fails when it is below the threshold)."""
        return min(self.law_pvalue, self.acceptance_pvalue)


@dataclass(frozen=True)
class WorstCase:
    """The case that reproduces a failure most simply (or the closest call when none failed).

    kind: "token", "tree" or "decoder". For token cases target_probs/draft_probs are p and q,
    law and n the draft law, and ``case_seed`` the generator seed ([seed, case index]) that
    replays the same draws (:func:`mdsd.testing.replay`). ``labels`` name the cells of
    ``observed`` / ``expected`` (tokens, or token sequences), both as frequencies.
    """

    kind: str
    name: str
    law: str | None
    n: int | None
    trials: int
    case_seed: tuple[int, ...]
    target_probs: np.ndarray
    draft_probs: np.ndarray
    labels: tuple[str, ...]
    observed: np.ndarray
    expected: np.ndarray
    law_pvalue: float
    tv: float
    acceptance: float = math.nan
    bound: float = math.nan
    acceptance_pvalue: float = 1.0
    details: dict = field(default_factory=dict)

    def save(self, path) -> Path:
        """Write the case as .npz (arrays + a JSON header) or .json (lists); returns the path."""
        path = Path(path)
        record = _jsonable(asdict(self))
        if path.suffix == ".npz":
            arrays = {
                k: np.asarray(record.pop(k)) for k in ("target_probs", "draft_probs", "observed", "expected")
            }
            np.savez(path, header=np.array(json.dumps(record)), **arrays)
        elif path.suffix == ".json":
            path.write_text(json.dumps(record, indent=1))
        else:
            raise ValueError(f"path must end in .npz or .json, got {str(path)!r}")
        return path

    @classmethod
    def load(cls, path) -> WorstCase:
        """Read a case written by :meth:`save`."""
        path = Path(path)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                record = json.loads(str(data["header"]))
                for key in ("target_probs", "draft_probs", "observed", "expected"):
                    record[key] = data[key]
        elif path.suffix == ".json":
            record = json.loads(path.read_text())
        else:
            raise ValueError(f"path must end in .npz or .json, got {str(path)!r}")
        for key in ("target_probs", "draft_probs", "observed", "expected"):
            record[key] = np.asarray(record[key], dtype=np.float64)
        record["case_seed"] = tuple(record["case_seed"])
        record["labels"] = tuple(record["labels"])
        record["law_pvalue"] = float(record["law_pvalue"])
        return cls(**record)

    def describe(self) -> str:
        """Human-readable reproduction: the inputs, then observed vs expected frequencies."""
        lines = [
            f"worst case: {self.name!r} ({self.kind}), {self.trials} trials, case seed {list(self.case_seed)}"
        ]
        if self.kind == "token":
            lines.append(
                f"  law {self.law!r}, n = {self.n}" if self.law else f"  custom drafter, n = {self.n}"
            )
            lines.append(f"  target_probs = {_vector(self.target_probs)}")
            lines.append(f"  draft_probs  = {_vector(self.draft_probs)}")
        for key, value in self.details.items():
            lines.append(f"  {key}: {value}")
        lines.append(f"  {'cell':<14}{'expected':>10}{'observed':>10}")
        for i in _largest_deviations(self.observed, self.expected, self.trials):
            lines.append(f"  {self.labels[i]:<14}{self.expected[i]:>10.4f}{self.observed[i]:>10.4f}")
        lines.append(f"  TV (binned) = {self.tv:.4f}; G-test p = {self.law_pvalue:.3g}")
        if not math.isnan(self.bound):
            lines.append(
                f"  acceptance {self.acceptance:.4f} vs alpha* {self.bound:.4f} "
                f"(p = {self.acceptance_pvalue:.3g})"
            )
        return "\n".join(lines)


def _largest_deviations(observed, expected, trials) -> list[int]:
    """Indices of the cells with the largest standardised deviation, in cell order."""
    if observed.size <= SHOWN_CELLS:
        return list(range(observed.size))
    score = np.abs(observed - expected) / np.sqrt(np.maximum(expected, 1.0 / max(trials, 1)))
    return sorted(np.argsort(-score, kind="stable")[:SHOWN_CELLS].tolist())


def _vector(values: np.ndarray) -> str:
    if values.size <= SHOWN_VOCAB:
        return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"
    top = np.argsort(-values, kind="stable")[:4]
    shown = ", ".join(f"{int(t)}: {values[t]:.4g}" for t in top)
    return f"V = {values.size}, largest {{{shown}, ...}} (saved in full by --save-worst)"


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass(frozen=True)
class AuditResult:
    """Verdict of an audit.

    passed: no case rejected losslessness and ``fn`` never failed.
    status: "passed", "loss" (some case rejected it) or "error" (``fn`` raised or returned
        something that is not a token; ``error`` says what, in one line).
    rows: one :class:`CaseRow` per case; worst: the failing case with the smallest vocabulary
        (then smallest p-value), or the closest call when none failed.
    alpha: family-wise false-positive rate; threshold: the per-test level alpha / tests
        (Bonferroni over the two tests of every planned case); planned_cases: cases planned (an
        audit stops at the first case proving a loss unless asked to be exhaustive).
    """

    kind: str
    target: str
    law: str | None
    n: int | None
    seed: int
    passed: bool
    status: str
    rows: tuple[CaseRow, ...]
    worst: WorstCase | None
    alpha: float
    threshold: float
    error: str | None = None
    planned_cases: int = 0

    @property
    def verdict(self) -> str:
        """One line: PASSED / LOSS FOUND / ERROR and why."""
        tested = [r for r in self.rows if r.status != "skipped"]
        failed = [r for r in tested if r.status == "loss"]
        if self.status == "error":
            return f"ERROR: {self.error}"
        if failed:
            stopped = len(tested) < self.planned_cases
            ran = f"{len(tested)} cases run" + (f" of {self.planned_cases} planned" if stopped else "")
            return (
                f"LOSS FOUND: {len(failed)} of {ran} reject losslessness "
                f"(family-wise false-positive rate <= {self.alpha:g})"
            )
        return (
            f"PASSED: {len(tested)} cases, no loss detected (family-wise false-positive rate "
            f"<= {self.alpha:g})"
        )

    def summary(self) -> str:
        """Readable text: header, verdict, the worst case as a reproduction."""
        if self.kind == "decoder":
            setting = ""
        elif self.law is None:
            setting = f"custom drafter, n = {self.n}, "
        else:
            setting = f"law {self.law!r}, n = {self.n}, "
        trials = sum(r.trials for r in self.rows if r.status != "skipped")
        lines = [
            f"mdsd audit ({self.kind}) of {self.target}: {setting}{len(self.rows)} cases, "
            f"{trials} trials, seed {self.seed}, per-test threshold {self.threshold:.3g}",
            self.verdict,
        ]
        if self.worst is not None and self.status != "error":
            lines.append(self.worst.describe())
        return "\n".join(lines)

    def as_dict(self) -> dict:
        out = _jsonable(asdict(self))
        out["verdict"] = self.verdict
        return out
