"""Figures like Hu et al. (ICLR 2025): acceptance vs temperature (Figure 1) and vs the number of
drafts (Figure 2), each verifier as a solid line and each law's alpha* dashed in the law's colour;
plus the gap to the bound vs T and n. Input: the tidy rows of ``mdsd.experiments.analysis``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mdsd.experiments.vocabulary import (  # noqa: E402
    ALL_DATASETS,
    BASELINE_VERIFIER,
    BOUND_VERIFIER,
    LAW_LABELS,
    sort_laws,
    sort_pairs,
)

LAW_COLORS = {
    "iid": "#1f77b4",
    "without_replacement": "#ff7f0e",
    "greedy": "#2ca02c",
    "conditional_poisson": "#9467bd",
    "spechub": "#d62728",
}
LAW_DASHES = {
    "iid": (0, (6, 2)),
    "without_replacement": (0, (2, 1.5)),
    "greedy": (0, (6, 1.5, 1.5, 1.5)),
    "conditional_poisson": (0, (1, 1.5)),
    "spechub": (0, (3, 3)),
}
MIN_POSITIONS = 30  # points rated on fewer positions (a tiny subsample) are left out of the figures
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", (0, (5, 1)), "-.", (0, (1, 1))]
FORMATS = ("png", "svg")


def curve_keys(rows: list[dict], include_baseline: bool = False) -> list[tuple[str, str]]:
    """(verifier, law) pairs to draw: each verifier under its laws; sample_check only if asked."""
    keys = []
    for r in rows:
        key = (r["verifier"], r["law"])
        if r["verifier"] == BOUND_VERIFIER or key in keys:
            continue
        if r["verifier"] == BASELINE_VERIFIER and not (include_baseline and r["law"] == "iid"):
            continue
        keys.append(key)
    return sort_pairs(keys)


def _style(keys):
    """Colour by law; marker and line style by verifier within the law."""
    styles, seen = {}, {}
    for verifier, law in keys:
        i = seen.get(law, 0)
        seen[law] = i + 1
        styles[(verifier, law)] = dict(
            color=LAW_COLORS.get(law, "black"),
            marker=MARKERS[i % len(MARKERS)],
            linestyle=LINESTYLES[i % len(LINESTYLES)] if verifier != BASELINE_VERIFIER else ":",
        )
    return styles


def _subsample_bound(ax, sub, x_name, verifier, law, color):
    """A subsampled verifier's rate is over other positions than its law's α* curve: draw α* over
    the verifier's own positions (the row's ``bound``) dotted, so the pair is compared like for
    like and no curve appears to cross its bound."""
    pts = sorted(
        (r[x_name], r["bound"])
        for r in sub
        if r["verifier"] == verifier and r["law"] == law and r.get("subsampled")
    )
    if pts:
        xs, ys = zip(*pts)
        ax.plot(
            xs,
            ys,
            linestyle=":",
            linewidth=1.2,
            color=color,
            marker="x",
            markersize=6,
            label=f"α* {LAW_LABELS.get(law, law)} on {verifier}'s subsample",
        )


def _datasets(rows):
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    return [d for d in names if d != ALL_DATASETS] or names


def _select(rows, **fixed):
    return [r for r in rows if all(r[k] == v for k, v in fixed.items())]


def _sweep_figure(rows, x_name, fixed, xlabel, title, path_stem, gap=False):
    datasets = _datasets(rows)
    keys = curve_keys(rows, include_baseline=not gap)
    styles = _style(keys)
    fig, axes = plt.subplots(
        1,
        len(datasets),
        figsize=(5.0 * len(datasets) + 3.2, 4.6),
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    for ax, dataset in zip(axes[0], datasets):
        sub = [r for r in _select(rows, dataset=dataset, **fixed) if r["positions"] >= MIN_POSITIONS]
        if not gap:
            laws = sort_laws({r["law"] for r in sub if r["verifier"] == BOUND_VERIFIER})
            for law in laws:
                pts = sorted(
                    (r[x_name], r["bound"])
                    for r in sub
                    if r["law"] == law and r["verifier"] == BOUND_VERIFIER
                )
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(
                        xs,
                        ys,
                        linestyle=LAW_DASHES.get(law, "--"),
                        linewidth=2.0,
                        alpha=0.7,
                        color=LAW_COLORS.get(law, "gray"),
                        marker="_",
                        markersize=12,
                        label=f"α* {LAW_LABELS.get(law, law)} (bound)",
                    )
        for verifier, law in keys:
            pts = sorted(
                (r[x_name], r["gap" if gap else "acceptance"], r["gap_ci95" if gap else "ci95"])
                for r in sub
                if r["verifier"] == verifier and r["law"] == law
            )
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            mc = any(
                r["method"] == "monte_carlo" for r in sub if r["verifier"] == verifier and r["law"] == law
            )
            label = f"{verifier} [{LAW_LABELS.get(law, law)}]" + (" (Monte Carlo)" if mc else "")
            if not gap:
                _subsample_bound(ax, sub, x_name, verifier, law, styles[(verifier, law)]["color"])
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                capsize=2,
                markersize=5,
                linewidth=1.4,
                label=label,
                **styles[(verifier, law)],
            )
        if gap:
            ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"{dataset}")
        if x_name == "n":
            ax.set_xticks(sorted({r["n"] for r in sub}))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(
        "gap α* − α (acceptance probability)" if gap else "acceptance rate α (probability per position)"
    )
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    paths = []
    for fmt in FORMATS:
        path = path_stem.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=130 if fmt == "png" else None)
        paths.append(path)
    plt.close(fig)
    return paths


def plot_all(rows: list[dict], out_dir: str | Path, *, n: int = 3, temperature: float = 0.7) -> list[Path]:
    """Write figure1 (α vs T at n), figure2 (α vs n at T) and figure3 (gaps) as PNG and SVG."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ns = sorted({r["n"] for r in rows})
    temps = sorted({r["temperature"] for r in rows})
    n = n if n in ns else ns[len(ns) // 2]
    temperature = temperature if temperature in temps else temps[len(temps) // 2]
    paths = []
    if len(temps) > 1:
        paths += _sweep_figure(
            rows,
            "temperature",
            {"n": n},
            "temperature T",
            f"Acceptance vs temperature (n = {n} drafts); dashed: optimal α* of each draft law",
            out / "figure1_temperature",
        )
    if len(ns) > 1:
        paths += _sweep_figure(
            rows,
            "n",
            {"temperature": temperature},
            "number of drafts n",
            f"Acceptance vs number of drafts (T = {temperature})",
            out / "figure2_drafts",
        )
    if len(temps) > 1:
        paths += _sweep_figure(
            rows,
            "temperature",
            {"n": n},
            "temperature T",
            f"Gap to the bound of each verifier's law vs temperature (n = {n})",
            out / "figure3_gap_temperature",
            gap=True,
        )
    if len(ns) > 1:
        paths += _sweep_figure(
            rows,
            "n",
            {"temperature": temperature},
            "number of drafts n",
            f"Gap to the bound vs number of drafts (T = {temperature})",
            out / "figure4_gap_drafts",
            gap=True,
        )
    return paths
