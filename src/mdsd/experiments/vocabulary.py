"""The shared vocabulary of measurement rows: special row names and the display order of laws and
verifiers, used by the analysis, Table 1, the report, the figures and the CLI tables (one owner,
so that every output lists verifiers and laws in the same order)."""

from __future__ import annotations

BOUND_VERIFIER = "alpha*"  # the verifier column of the rows that report a law's bound itself
ALL_DATASETS = "all"  # the dataset column of the rows pooling every dataset
BASELINE_VERIFIER = "sample_check"  # the baseline: listed last, drawn only under i.i.d. drafts

# The laws measured by default (spechub joins at n = 2 when a verifier needs it).
MEASURED_LAWS = ("iid", "without_replacement", "greedy", "conditional_poisson")
LAW_ORDER = ("iid", "without_replacement", "greedy", "spechub", "conditional_poisson")
VERIFIER_ORDER = ("rrs", "kseq", "importance", "rrs_without_replacement", "greedy", "spechub", "optimal")
LAW_LABELS = {
    "iid": "i.i.d.",
    "without_replacement": "w/o replacement",
    "greedy": "greedy",
    "conditional_poisson": "cond. Poisson",
    "spechub": "SpecHub",
}


def law_rank(law: str) -> int:
    """Position of a law in the display order (unknown laws last)."""
    return LAW_ORDER.index(law) if law in LAW_ORDER else len(LAW_ORDER)


def verifier_rank(verifier: str, law: str = "") -> tuple:
    """Sort key of a (verifier, law) row: known verifiers in display order, then others by name,
    the baseline last; within a verifier, its laws in display order."""
    known = VERIFIER_ORDER.index(verifier) if verifier in VERIFIER_ORDER else len(VERIFIER_ORDER)
    return (verifier == BASELINE_VERIFIER, known, verifier, law_rank(law))


def sort_laws(laws) -> list[str]:
    return sorted(laws, key=law_rank)


def sort_pairs(pairs) -> list[tuple[str, str]]:
    """(verifier, law) pairs in display order."""
    return sorted(pairs, key=lambda pair: verifier_rank(*pair))
