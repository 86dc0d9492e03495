"""mdsd.experiments.report: the report from a results file alone, and the findings' rules."""

from __future__ import annotations

from mdsd.experiments.report import findings, render_report


def test_render_report_from_csv_only(measured, tmp_path):
    out, _ = measured
    (tmp_path / "results.csv").write_text((out / "results.csv").read_text())
    path = render_report(tmp_path)
    assert "Table 1" in path.read_text()


def test_greedy_finding_ignores_subsampled_rows():
    """A verifier rated on a subsample averages other positions: it must not be the comparison."""

    def row(verifier, law, acceptance, subsampled=0):
        return {
            "dataset": "all",
            "temperature": 0.3,
            "n": 3,
            "verifier": verifier,
            "law": law,
            "acceptance": acceptance,
            "bound": 0.95,
            "gap": 0.95 - acceptance,
            "gap_ci95": 0.01,
            "positions": 100,
            "subsampled": subsampled,
            "method": "closed_form",
            "max_excess": -1.0,
            "bound_error": 0.0,
        }

    rows = [
        row("greedy", "greedy", 0.80),
        row("rrs", "iid", 0.78),
        row("optimal", "without_replacement", 0.94, subsampled=1),
    ]
    lead = [f for f in findings(rows) if f["claim"].startswith("greedy beats")]
    assert len(lead) == 1 and lead[0]["detail"] == "T=0.3: greedy − rrs = +0.0200"
