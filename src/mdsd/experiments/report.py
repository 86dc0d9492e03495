"""Results files and the Markdown report of a measurement run.

``write_results`` stores the tidy rows as ``results.csv`` and ``results.json`` (with the run's
configuration, timings and per-position checks); ``table1`` renders a table shaped like Hu et al.
(ICLR 2025) Table 1; ``findings`` checks the paper's claims on the rows; ``render_report`` writes
``report.md`` with tables, figures and findings.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from mdsd.experiments.analysis import EXACT_SLACK
from mdsd.experiments.config import TABLE_N, TABLE_TEMPERATURE
from mdsd.experiments.vocabulary import (
    ALL_DATASETS,
    BASELINE_VERIFIER,
    BOUND_VERIFIER,
    sort_laws,
    sort_pairs,
)

COLUMNS = (
    "dataset",
    "temperature",
    "n",
    "law",
    "verifier",
    "acceptance",
    "ci95",
    "bound",
    "bound_ci95",
    "gap",
    "gap_ci95",
    "method",
    "mc_stderr",
    "positions",
    "prompts",
    "clamped",
    "max_excess",
    "bound_error",
    "subsampled",
)
_INT = {"n", "positions", "prompts", "clamped", "subsampled"}
_STR = {"dataset", "law", "verifier", "method"}
ZERO_GAP = 1e-6  # a gap this small (probability units) counts as attaining the bound


# ---------------------------------------------------------------- files
def write_results(out_dir: str | Path, rows: list[dict], run: dict) -> list[Path]:
    """results.csv (tidy, one row per dataset/T/n/law/verifier) and results.json (rows + run)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v) for k, v in row.items()})
    (out / "results.json").write_text(
        json.dumps({"run": run, "rows": rows}, indent=1, default=_json_default) + "\n"
    )
    return [out / "results.csv", out / "results.json"]


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {value!r}")


def read_results(out_dir: str | Path) -> tuple[list[dict], dict]:
    """(rows, run) from results.json, else rows from results.csv (run empty)."""
    out = Path(out_dir)
    if (out / "results.json").exists():
        data = json.loads((out / "results.json").read_text())
        return data["rows"], data.get("run", {})
    if not (out / "results.csv").exists():
        raise FileNotFoundError(f"{out} holds neither results.json nor results.csv (run `mdsd measure`)")
    rows = []
    with open(out / "results.csv", newline="") as f:
        for raw in csv.DictReader(f):
            rows.append({k: (v if k in _STR else int(v) if k in _INT else float(v)) for k, v in raw.items()})
    return rows, {}


# ---------------------------------------------------------------- tables
def fmt(value: float, digits: int = 4, small: bool = False) -> str:
    """Fixed-point, without a minus sign on values that round to zero; ``small``: scientific
    notation for nonzero values below 10^-digits."""
    if small and value != 0 and abs(value) < 10.0**-digits:
        return f"{value:.1e}"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _datasets(rows) -> list[str]:
    return list(dict.fromkeys(r["dataset"] for r in rows))


def _closest(values, target):
    values = sorted(set(values))
    return min(values, key=lambda v: (abs(v - target), v))


def table1(rows: list[dict], temperature: float = TABLE_TEMPERATURE, n: int = TABLE_N) -> str:
    """Markdown: per verifier (and its law) and dataset, α ± CI, the law's α*, and the gap α* − α."""
    temperature = _closest([r["temperature"] for r in rows], temperature)
    n = _closest([r["n"] for r in rows], n)
    sub = [
        r for r in rows if r["temperature"] == temperature and r["n"] == n and r["verifier"] != BOUND_VERIFIER
    ]
    datasets = _datasets(sub)
    keys = sort_pairs({(r["verifier"], r["law"]) for r in sub})
    index = {(r["dataset"], r["verifier"], r["law"]): r for r in sub}
    head = "| verifier | draft law | " + " | ".join(f"{d}: α | {d}: α* | {d}: gap" for d in datasets) + " |"
    lines = [
        f"**Table 1** (T = {temperature}, n = {n}): acceptance α (± 95% CI), the optimal "
        "acceptance α* of the verifier's draft law, and the gap α* − α (± paired 95% CI). "
        "Methods: exact unless marked † (Monte Carlo, see the CSV's mc_stderr); ‡: rated on a "
        "seeded random subsample of the positions (`--subsample-positions`; α* in that row is "
        "over the same positions).",
        "",
        head,
        "|" + "---|" * (2 + 3 * len(datasets)),
    ]
    for verifier, law in keys:
        cells = [verifier, law]
        for d in datasets:
            r = index.get((d, verifier, law))
            if r is None or not r["positions"]:
                cells += ["–", "–", "–"]
                continue
            mark = ("†" if r["method"] == "monte_carlo" else "") + ("‡" if r.get("subsampled") else "")
            cells += [
                f"{fmt(r['acceptance'])} ± {fmt(r['ci95'])}{mark}",
                fmt(r["bound"]),
                f"{fmt(r['gap'])} ± {fmt(r['gap_ci95'])}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bounds_table(rows: list[dict], n: int = TABLE_N) -> str:
    """Markdown: α* of every law vs temperature (pooled dataset where present), at n drafts."""
    n = _closest([r["n"] for r in rows], n)
    datasets = _datasets(rows)
    dataset = ALL_DATASETS if ALL_DATASETS in datasets else datasets[0]
    sub = [r for r in rows if r["verifier"] == BOUND_VERIFIER and r["n"] == n and r["dataset"] == dataset]
    laws = sort_laws({r["law"] for r in sub})
    temps = sorted({r["temperature"] for r in sub})
    index = {(r["law"], r["temperature"]): r for r in sub}
    lines = [
        f"**Optimal acceptance α*** by draft law (dataset: {dataset}, n = {n}; ± 95% CI)",
        "",
        "| law | " + " | ".join(f"T = {t}" for t in temps) + " |",
        "|---|" + "---|" * len(temps),
    ]
    for law in laws:
        cells = [
            f"{fmt(index[(law, t)]['bound'])} ± {fmt(index[(law, t)]['bound_ci95'])}"
            if (law, t) in index
            else "–"
            for t in temps
        ]
        lines.append(f"| {law} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gap_table(rows: list[dict], x_name: str, fixed: dict) -> str:
    """Markdown: gap α* − α of each verifier along temperature or n (pooled dataset)."""
    datasets = _datasets(rows)
    dataset = ALL_DATASETS if ALL_DATASETS in datasets else datasets[0]
    sub = [
        r
        for r in rows
        if r["dataset"] == dataset
        and r["verifier"] != BOUND_VERIFIER
        and r["verifier"] != BASELINE_VERIFIER
        and all(r[k] == v for k, v in fixed.items())
    ]
    xs = sorted({r[x_name] for r in sub})
    keys = sort_pairs({(r["verifier"], r["law"]) for r in sub})
    index = {(r["verifier"], r["law"], r[x_name]): r for r in sub if r["positions"]}
    label = "T" if x_name == "temperature" else "n"
    lines = [
        "| verifier [law] | " + " | ".join(f"{label} = {x}" for x in xs) + " |",
        "|---|" + "---|" * len(xs),
    ]
    for v, law in keys:
        cells = [
            fmt(index[(v, law, x)]["gap"]) + ("†" if index[(v, law, x)]["method"] == "monte_carlo" else "")
            if (v, law, x) in index
            else "–"
            for x in xs
        ]
        lines.append(f"| {v} [{law}] | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- findings
def _trend(points: list[tuple[float, float, float]]) -> str:
    """How a gap moves along x, from (x, gap, ci95) points: 'at its bound' when every gap is within
    its CI of 0 (and < ZERO_GAP), else 'grows' / 'shrinks' when the end-to-end change exceeds the
    two CIs and most steps agree, else 'non-monotone'."""
    points = sorted(points)
    if all(abs(g) <= max(ci, ZERO_GAP) for _, g, ci in points):
        return "at its bound"
    diffs = [b[1] - a[1] for a, b in zip(points, points[1:])]
    change = points[-1][1] - points[0][1]
    significant = abs(change) > points[0][2] + points[-1][2]
    if significant and change > 0 and sum(d > 0 for d in diffs) >= 0.75 * len(diffs):
        return "grows"
    if significant and change < 0 and sum(d < 0 for d in diffs) >= 0.75 * len(diffs):
        return "shrinks"
    return "non-monotone"


def findings(
    rows: list[dict], checks: dict | None = None, *, n: int = TABLE_N, temperature: float = TABLE_TEMPERATURE
) -> list[dict]:
    """The paper's claims checked on the rows: [{'claim', 'holds' (bool or None), 'detail'}]."""
    out = []
    bounds = {
        (r["dataset"], r["temperature"], r["n"], r["law"]): r for r in rows if r["verifier"] == BOUND_VERIFIER
    }

    # 1. without-replacement alpha* >= iid alpha*
    pairs = [
        (k, bounds[k], bounds[k[:3] + ("iid",)])
        for k in bounds
        if k[3] == "without_replacement" and k[:3] + ("iid",) in bounds
    ]
    if pairs:
        bad = [k for k, w, i in pairs if w["bound"] < i["bound"] - EXACT_SLACK]
        margin = min(w["bound"] - i["bound"] for _, w, i in pairs)
        per_position = (checks or {}).get("wor_below_iid_positions")
        detail = (
            f"{len(pairs) - len(bad)}/{len(pairs)} (dataset, T, n) settings; smallest mean "
            f"margin α*_wor − α*_iid = {margin:.2e}"
        )
        if per_position is not None:
            detail += f"; positions where it fails: {per_position}"
        out.append(
            {
                "claim": "without-replacement α* ≥ i.i.d. α*",
                "holds": not bad and not per_position,
                "detail": detail,
            }
        )

    # 2. every verifier <= its bound (exact: per position, to rounding; MC: within the paired CI)
    rates = [r for r in rows if r["verifier"] != BOUND_VERIFIER and r["positions"]]
    exact = [r for r in rates if r["method"] != "monte_carlo"]
    sampled = [r for r in rates if r["method"] == "monte_carlo"]
    worst = max((r["max_excess"] for r in exact), default=-math.inf)
    over = [r for r in exact if r["max_excess"] > EXACT_SLACK + r.get("bound_error", 0.0)]
    bad_mc = [r for r in sampled if r["gap"] + r["gap_ci95"] < 0]
    bound_error = max((r.get("bound_error", 0.0) for r in rows), default=0.0)
    detail = (
        f"exact rates ({len(exact)} rows): largest per-position excess α − α* = {worst:.1e}, "
        f"{len(over)} rows beyond the tolerance ({EXACT_SLACK:.0e} + the bound's own error "
        f"estimate, at most {bound_error:.1e})"
    )
    if worst > EXACT_SLACK:
        top = max(exact, key=lambda r: r["max_excess"])
        detail += (
            f"; the largest excess is {top['verifier']} [{top['law']}] at T = "
            f"{top['temperature']}, n = {top['n']}, {top['method']}"
        )
    if sampled:
        detail += (
            f"; Monte-Carlo rates ({len(sampled)} rows, verifiers "
            f"{sorted({r['verifier'] for r in sampled})}): {len(bad_mc)} with the gap's 95% CI "
            "entirely below 0"
        )
    out.append(
        {"claim": "every verifier ≤ the α* of its law", "holds": not over and not bad_mc, "detail": detail}
    )

    # 3./4. gap trends with T (at n) and with n (at T), pooled dataset
    datasets = _datasets(rows)
    dataset = ALL_DATASETS if ALL_DATASETS in datasets else datasets[0]
    n = _closest([r["n"] for r in rows], n)
    temperature = _closest([r["temperature"] for r in rows], temperature)
    main = [r for r in rates if r["dataset"] == dataset and r["verifier"] != BASELINE_VERIFIER]
    for x_name, fixed, what in (
        ("temperature", {"n": n}, f"temperature (n = {n})"),
        ("n", {"temperature": temperature}, f"n (T = {temperature})"),
    ):
        sub = [r for r in main if all(r[k] == v for k, v in fixed.items())]
        keys = sort_pairs({(r["verifier"], r["law"]) for r in sub})
        trends = {}
        for key in keys:
            pts = sorted(
                (r[x_name], r["gap"], r["gap_ci95"]) for r in sub if (r["verifier"], r["law"]) == key
            )
            if len(pts) > 1:
                trends[key] = (_trend(pts), pts[0], pts[-1])
        if not trends:
            continue
        growing = [k for k, t in trends.items() if t[0] == "grows"]
        at_bound = [k for k, t in trends.items() if t[0] == "at its bound"]
        parts = [
            f"{v} [{law}]: {t[0]} ({fmt(t[1][1], small=True)} at {t[1][0]} → "
            f"{fmt(t[2][1], small=True)} at {t[2][0]})"
            for (v, law), t in trends.items()
            if t[0] != "at its bound"
        ]
        detail = (
            f"grows for {len(growing)} of the {len(trends) - len(at_bound)} verifiers that "
            f"fall short: " + ("; ".join(parts) or "none")
        )
        if at_bound:
            detail += (
                f". At their bound throughout (gap within its CI of 0): "
                f"{', '.join(f'{v} [{law}]' for v, law in at_bound)}"
            )
        out.append({"claim": f"the gap α* − α grows with {what}", "holds": None, "detail": detail})

    # 5. greedy vs the best i.i.d./without-replacement verifier along temperature
    sub = [r for r in main if r["n"] == n]
    temps = sorted({r["temperature"] for r in sub})
    lead = []
    for t in temps:
        at = [r for r in sub if r["temperature"] == t]
        greedy = [r["acceptance"] for r in at if r["verifier"] == "greedy"]
        # rows rated on every position only: a subsample's mean is over other positions
        others = [
            r
            for r in at
            if r["law"] in ("iid", "without_replacement") and r["positions"] and not r.get("subsampled")
        ]
        if greedy and others:
            best = max(others, key=lambda r: r["acceptance"])
            lead.append(f"T={t}: greedy − {best['verifier']} = {greedy[0] - best['acceptance']:+.4f}")
    if lead:
        out.append(
            {
                "claim": f"greedy beats the best i.i.d./w-o-replacement verifier at low T, less "
                f"so near T = 1 (n = {n})",
                "holds": None,
                "detail": "; ".join(lead),
            }
        )
    return out


# ---------------------------------------------------------------- report
def render_report(
    out_dir: str | Path, *, n: int = TABLE_N, temperature: float = TABLE_TEMPERATURE, replot: bool = True
) -> Path:
    """Write ``report.md`` in ``out_dir`` (tables, figures, findings) from its results files."""
    from mdsd.experiments.plots import plot_all

    out = Path(out_dir)
    rows, run = read_results(out)
    figures = plot_all(rows, out, n=n, temperature=temperature) if replot else sorted(out.glob("figure*.png"))
    checks = run.get("checks")
    lines = ["# Multi-draft acceptance: measured rates vs the optimal α*", ""]
    if run:
        cfg = run.get("config", {})
        lines += [
            f"- Command: `{run.get('command', 'mdsd measure')}`",
            f"- Date: {run.get('date', '?')}; wall time {run.get('wall_s', float('nan')):.0f} s "
            f"(capture {run.get('capture_s', float('nan')):.0f} s, analysis "
            f"{run.get('analysis_s', float('nan')):.0f} s on "
            f"{run.get('analysis_workers', '1 process')}) on {run.get('machine', '?')}",
            f"- Pair: {run.get('pair', '?')}; prompts: {cfg.get('prompts') or 'bundled held-out'} "
            f"({cfg.get('num_prompts')} per dataset), up to {cfg.get('max_new_tokens')} generated "
            f"tokens, top-k {cfg.get('top_k')}, seed {cfg.get('seed')}",
            f"- Temperatures {cfg.get('temperatures')}, drafts n ∈ {cfg.get('ns')}; positions "
            f"measured per temperature: {run.get('positions_per_temperature', '?')}",
            "",
        ]
    lines += [
        "Protocol (Hu et al., ICLR 2025, Section 6): the target samples up to the token budget at "
        "temperature T; at every generated position the target's p and the draft's q (same "
        "temperature and top-k) are recorded, and α* of each draft law and the acceptance rate "
        "of each verifier under its law are computed exactly per position (Monte Carlo only where "
        "marked) and averaged over positions. 95% CIs are clustered by prompt.",
        "",
        "## Table 1",
        "",
        table1(rows, temperature, n),
        "",
        bounds_table(rows, n),
        "",
        "## Figures",
        "",
    ]
    for path in figures:
        if path.suffix == ".png":
            lines += [f"![{path.stem}]({path.name})", ""]
    lines += ["## Findings (checked automatically)", ""]
    for item in findings(rows, checks, n=n, temperature=temperature):
        mark = {True: "✅", False: "❌", None: "ℹ️"}[item["holds"]]
        lines += [f"- {mark} **{item['claim']}** — {item['detail']}", ""]
    temps_fixed = {"n": _closest([r["n"] for r in rows], n)}
    n_fixed = {"temperature": _closest([r["temperature"] for r in rows], temperature)}
    lines += [
        f"### Gap α* − α vs temperature (pooled, n = {temps_fixed['n']})",
        "",
        gap_table(rows, "temperature", temps_fixed),
        "",
        "### Gap α* − α vs number of drafts (pooled, T = {})".format(n_fixed["temperature"]),
        "",
        gap_table(rows, "n", n_fixed),
        "",
    ]
    methods = sorted(
        {
            (r["verifier"], r["law"], r["method"])
            for r in rows
            if r["verifier"] != BOUND_VERIFIER and r["method"] == "monte_carlo"
        }
    )
    if methods:
        lines += [
            "## Monte-Carlo rates",
            "",
            "No exact method was available for these (verifier, law, n): each position's "
            "rate is the mean exact conditional acceptance over "
            f"{(run.get('config') or {}).get('mc_samples', '?')} sampled draft sets "
            "(Rao-Blackwellised); the CSV column mc_stderr is the sampling standard error of "
            "each mean (the CI also includes it).",
            "",
        ]
        seen = sorted({(v, law) for v, law, _ in methods})
        ns_mc = {
            (v, law): sorted(
                {
                    r["n"]
                    for r in rows
                    if r["verifier"] == v and r["law"] == law and r["method"] == "monte_carlo"
                }
            )
            for v, law in seen
        }
        lines += [f"- {v} [{law}]: n ∈ {ns_mc[(v, law)]}" for v, law in seen] + [""]
    partial = sorted({(r["verifier"], r["law"]) for r in rows if r.get("subsampled")})
    if partial:
        cfg = run.get("config") or {}
        lines += [
            "## Subsampled rates",
            "",
            "These (verifier, law) pairs (configuration `subsample`) were rated on a seeded random "
            f"subsample of {cfg.get('subsample_positions', '?')} positions per (dataset, T), the "
            "same positions for every n and law (column `positions`; their bound and gap are over "
            "the same positions, and the figures draw that bound as a dotted line). The subsample "
            "depends on the seed only; `--subsample-positions 0` rates every position.",
            "",
        ]
        for v, law in partial:
            counts = [
                r["positions"]
                for r in rows
                if r["verifier"] == v and r["law"] == law and r["dataset"] != ALL_DATASETS
            ]
            lines.append(f"- {v} [{law}]: {min(counts)}–{max(counts)} positions per (dataset, T, n)")
        lines.append("")
    noted = {}
    for r in rows:
        for note in filter(None, (r.get("notes") or "").split(" | ")):
            noted.setdefault((r["verifier"], r["law"], note), set()).add(r["n"])
    if noted:
        lines += ["## Warnings raised by verifiers", ""]
        lines += [f"- {v} [{law}], n ∈ {sorted(ns)}: {note}" for (v, law, note), ns in noted.items()]
        lines.append("")
    seconds = (checks or {}).get("seconds")
    if seconds:
        lines += [
            "## Analysis time",
            "",
            "Seconds per computation, summed over the work units (on parallel workers the wall "
            "time is shorter).",
            "",
            "| computation | seconds |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.1f} |" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])]
        lines.append("")
    lines += [
        "Files: `results.csv` (tidy: dataset, temperature, n, law, verifier, acceptance, "
        "ci95, bound, bound_ci95, gap, gap_ci95, method, mc_stderr, positions, prompts, "
        "clamped, max_excess, bound_error, subsampled; verifier `alpha*` rows give each law's bound), "
        "`results.json`, `table1.md`, figures as PNG and SVG.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
