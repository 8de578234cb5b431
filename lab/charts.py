"""compare.py's charts: the metric per ablation row, and the metric against sampler cost. PNG files, drawn
with matplotlib's Figure (no pyplot: no GUI backend, no global state)."""
from pathlib import Path

import pandas as pd

from lab.tables import DEFAULT_METRIC, row_changes


def write_charts(runs, table, out_dir, metric=DEFAULT_METRIC):
    """PNG charts: the metric per table row (error bars: std over seeds), and for sampler runs the metric
    against sampler steps and sampling seconds per image. Returns the paths written."""
    from matplotlib.figure import Figure  # loaded only when charts are asked for
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_bar_chart(Figure, table, out / "accuracy_by_ablation.png", metric)]
    sampler = _sampler_chart(Figure, runs, out / "accuracy_vs_sampler.png", metric)
    return paths + ([sampler] if sampler else [])


def row_labels(table):
    """Short labels: what the row changes ('sampler=dpmsolver++, steps=20'), or its axis ('base')."""
    changes = row_changes(table)
    if "ablation" not in table.columns:
        return changes
    return [change or row["ablation"] for (_, row), change in zip(table.iterrows(), changes)]


def _bar_chart(Figure, table, path, metric):
    labels = row_labels(table)
    means = table[f"{metric}_mean"].to_numpy(dtype=float)
    stds = table[f"{metric}_std"].fillna(0).to_numpy(dtype=float)
    axes_names = list(dict.fromkeys(table["ablation"])) if "ablation" in table else [""]
    colors = [f"C{axes_names.index(a) % 10}" for a in table["ablation"]] if "ablation" in table else ["C0"] * len(table)
    fig = Figure(figsize=(max(6, 0.8 * len(table) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(range(len(table)), means, yerr=stds, capsize=4, color=colors,
                  edgecolor=["black" if b else "none" for b in table["best"]], linewidth=2)
    for bar, n in zip(bars, table["n"]):
        ax.annotate(f"n={n}", (bar.get_x() + bar.get_width() / 2, 0), xytext=(0, 3), textcoords="offset points",
                    ha="center", fontsize=8, color="white")
    ax.set_xticks(range(len(table)), labels, rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(f"{metric} per ablation (outlined: best)")
    fig.savefig(path, dpi=120)
    return path


def _sampler_chart(Figure, runs, path, metric):
    """Per (sampler, steps): the metric against steps and against sampling time. Only base and sampler runs
    when the sampler axis is there, so that other ablations at DDIM-50 do not blur the points."""
    if not {"params.eval.sampler", "params.eval.steps"} <= set(runs.columns):
        return None
    picked = runs[runs["ablation"].isin(["base", "sampler"])] if (runs["ablation"] == "sampler").any() else runs
    frame = pd.DataFrame({"sampler": picked["params.eval.sampler"].fillna("?"),
                          "steps": pd.to_numeric(picked["params.eval.steps"], errors="coerce"),
                          "value": picked[f"metrics.{metric}"],
                          "seconds": picked.get("metrics.sample_s_per_image", pd.Series(float("nan"),
                                                                                          index=picked.index))})
    points = frame.dropna(subset=["steps", "value"]).groupby(["sampler", "steps"]).agg(
        mean=("value", "mean"), std=("value", "std"), seconds=("seconds", "mean")).reset_index()
    if points.empty:
        return None
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    by_steps, by_time = fig.subplots(1, 2, sharey=True)
    for i, (name, group) in enumerate(points.groupby("sampler")):
        group = group.sort_values("steps")
        style = dict(marker="o", capsize=4, color=f"C{i}", label=name)
        by_steps.errorbar(group["steps"], group["mean"], yerr=group["std"].fillna(0), **style)
        timed = group.dropna(subset=["seconds"])
        by_time.errorbar(timed["seconds"], timed["mean"], yerr=timed["std"].fillna(0), **style)
        for _, p in timed.iterrows():
            by_time.annotate(f"{p['steps']:g} steps", (p["seconds"], p["mean"]), xytext=(4, 4),
                             textcoords="offset points", fontsize=8)
    for ax, xlabel in ((by_steps, "sampler steps"), (by_time, "sampling seconds per image")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    steps = sorted(points["steps"].unique())
    by_steps.set_xticks(steps, [f"{s:g}" for s in steps], minor=False)
    by_steps.minorticks_off()
    by_steps.set_ylabel(f"{metric} (mean ± std over seeds)")
    by_steps.legend()
    fig.suptitle(f"{metric} against sampler cost")
    fig.savefig(path, dpi=120)
    return path
