"""Reproducing the measurements of Hu et al. (ICLR 2025, Section 6) on any target/draft pair.

Layers: ``config`` (typed sweep settings), ``capture`` (run the models, cache p/q logits per
(dataset, T, prompt)), ``analysis`` (exact per-position alpha* and acceptance rates, clustered
95% CIs), ``plots`` (Figures 1-2 and gap figures), ``report`` (results files, Table 1, findings,
report.md), ``sweep`` (the front door behind ``mdsd measure``).
"""

from mdsd.experiments.config import DEFAULT, PAPER, MeasureConfig

__all__ = ["DEFAULT", "PAPER", "MeasureConfig"]
