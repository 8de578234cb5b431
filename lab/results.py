"""`python -m lab.results`: docs/results.md written from the MLflow store, never typed by hand.

    python -m lab.results --experiment recipe-search --experiment iclevr-ablations-cpu --out docs/results.md

For each experiment: the table compare.py prints (mean ± std, 95% intervals, the difference to base),
its bar chart, and the learning curves of its runs (validation accuracy against training images seen
and against minutes since the run started) drawn from the metric histories MLflow holds. A hand-written
reading per experiment can sit in `docs/results/<experiment>.md`; it is copied in under the table, so
regenerating keeps it. The header names the command, the date and the machines the runs were tagged with.
"""
import argparse
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

from lab.errors import UserError, reports_user_errors
from lab.charts import row_labels, write_charts
from lab.report import load_runs, open_store
from lab.tables import DEFAULT_METRIC, ablation_table, render
from lab.tracking import metric_history

CURVE_METRIC = "val_accuracy"


def learning_curves(client, runs, metric=CURVE_METRIC):
    """One row per logged validation: run_name, images seen (step x batch size x world size), minutes of the
    run's clock (its `train_minutes` at that step: a resumed run's stop left out; wall time since the start for
    runs that predate that metric), and the value."""
    rows = []
    for _, run in runs.iterrows():
        batch = float(run.get("params.train.batch_size", "nan") or "nan")
        world = float(run.get("tags.world_size", 1) or 1)
        clock = {m.step: m.value for m in metric_history(client, run["run_id"], "train_minutes")}
        for m in metric_history(client, run["run_id"], metric):
            rows.append({"run_name": run["run_name"], "images": m.step * batch * world,
                         "minutes": clock.get(m.step, (m.timestamp - run["start_time"]) / 60_000),
                         metric: m.value})
    return pd.DataFrame(rows, columns=["run_name", "images", "minutes", metric])


def curve_chart(curves, path, title, metric=CURVE_METRIC):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    by_images, by_minutes = fig.subplots(1, 2, sharey=True)
    for name, curve in curves.groupby("run_name", sort=True):
        by_images.plot(curve["images"] / 1000, curve[metric], marker="o", ms=3, label=name)
        by_minutes.plot(curve["minutes"], curve[metric], marker="o", ms=3, label=name)
    by_images.set_ylim(0, 1)  # accuracies on their whole scale: small gains look small
    by_images.set_xlim(left=0)
    by_minutes.set_xlim(left=0)
    by_images.set_xlabel("training images seen (thousands)")
    by_minutes.set_xlabel("minutes of the run (training and its validations)")
    by_images.set_ylabel(f"{metric} (mean over the validation's sampling seeds)")
    by_minutes.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def machines(runs):
    column = runs.get("tags.machine")
    return sorted(set(column.dropna())) if column is not None else []


def section(client, experiment, out_dir, notes_dir, metric=DEFAULT_METRIC):
    runs = load_runs(client, experiment)
    lines = [f"## {experiment}", ""]
    if notes_dir is not None and (Path(notes_dir) / f"{experiment}.md").is_file():
        lines += [(Path(notes_dir) / f"{experiment}.md").read_text().strip(), ""]
    found = machines(runs)
    first, last = (pd.to_datetime(runs["start_time"].agg(edge), unit="ms") for edge in ("min", "max"))
    first, last = f"{first:%Y-%m-%d %H:%M}", f"{last:%Y-%m-%d %H:%M}"
    started = f"started {first}" if first == last else f"started from {first} to {last}"
    lines += [f"{len(runs)} finished run{'s' if len(runs) != 1 else ''}" + (f" on {'; '.join(found)}" if found else "")
              + f", {started} UTC.", ""]
    table = ablation_table(runs, metric=metric)
    lines += [render(table, "markdown", wide=True), ""]
    charts = [Path(p) for p in write_charts(runs, table, out_dir / experiment, metric)]
    curves = learning_curves(client, runs)
    if not curves.empty:
        charts.append(curve_chart(curves, out_dir / experiment / "learning_curves.png", experiment))
        last = curves.sort_values("images").groupby("run_name").tail(1).set_index("run_name").sort_index()
        lines += ["Last validation of each run: " + ", ".join(
            f"{name} {row[CURVE_METRIC]:.3f} after {row['images'] / 1000:.0f}k images ({row['minutes']:.1f} min)"
            for name, row in last.iterrows()) + ".", ""]
    # links relative to the document, which sits beside out_dir (docs/results.md, docs/results/<experiment>/)
    lines += [f"![{p.stem}]({p.relative_to(out_dir.parent)})" if p.is_relative_to(out_dir.parent)
              else f"![{p.stem}]({p})" for p in charts]
    return lines, row_labels(table)


@reports_user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lab.results", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", action="append", required=True, help="MLflow experiment (repeatable)")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--out", default="docs/results.md", help="the Markdown file (charts go beside it)")
    parser.add_argument("--metric", default=DEFAULT_METRIC)
    args = parser.parse_args(argv)
    out = Path(args.out)
    charts_dir = out.parent / out.stem
    client = open_store(args.tracking_uri)
    for name in args.experiment:
        if client.get_experiment_by_name(name) is None:
            raise UserError("--experiment", f"no experiment {name!r} in the store")
    command = "python -m lab.results " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))
    lines = ["# Results", "", f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
             "from the MLflow store; every table and chart below comes from the runs it holds. Machines: as "
             "each section says.", ""]
    for name in args.experiment:
        body, _ = section(client, name, charts_dir, charts_dir, args.metric)
        lines += [*body, ""]
    charts_dir.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out.resolve()} and its charts in {charts_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
