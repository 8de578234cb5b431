"""Finished MLflow runs -> ablation tables (lab/tables.py), charts (lab/charts.py), best-checkpoint selection and
final test scores: what `compare.py` does.

    runs = load_runs(open_store(uri), "iclevr-ablations")  # one row per finished run: params.*, tags.*, metrics.*
    table = ablation_table(runs)                           # one row per configuration, mean ± std over seeds
    print(render(table, "markdown"))
    best = select_best(runs)                               # by validation accuracy; test columns are never seen

Model selection uses the validation metric only. The test metrics are reported next to it, never used
to choose; `final_test` scores the chosen checkpoint once on the test splits and logs the scores.
"""
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lab import charts
from lab.errors import UserError
from lab.stores import check_reachable, resolve_uri
from lab.tables import (DEFAULT_GROUP_BY, DEFAULT_METRIC, ablation_table, is_test_metric, lower_is_better,
                        metric_column, render)
from lab.tracking import COMPARE_TAG, log_compare_run, log_final_scores, metric_name, run_checkpoint

# --- loading -------------------------------------------------------------------------------------------

def open_store(uri=None):
    """An MlflowClient on an existing store: a typo'd SQLite path must not create an empty database."""
    uri = resolve_uri(uri)
    check_reachable(uri, "--tracking-uri")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).expanduser().is_file():
        raise UserError("--tracking-uri", f"no MLflow store at {uri} (run an experiment first, or set "
                                          "MLFLOW_TRACKING_URI / --tracking-uri)")
    return MlflowClient(tracking_uri=uri)


def load_runs(client, experiment, filter_string=None):
    """The experiment's FINISHED runs as a DataFrame (columns run_id, run_name, params.*, tags.*, metrics.*).

    Running, failed and killed (pruned) runs are left out, and so are sweep parents (runs that another
    run names as its `mlflow.parentRunId`) and compare.py's own chart runs: they hold no training.
    """
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        raise UserError("--experiment", f"no experiment named {experiment!r} in {client.tracking_uri} "
                                        f"(experiments there: {', '.join(names) or 'none'})")
    try:
        runs = _search(client, found.experiment_id, filter_string or "")
    except MlflowException as e:
        raise UserError("--filter", f"{filter_string!r}: {str(e).splitlines()[0]}") from None
    everything = runs if not filter_string else _search(client, found.experiment_id, "")
    parents = {r.data.tags.get("mlflow.parentRunId") for r in everything} - {None}
    rows = []
    for run in runs:
        if run.info.status != "FINISHED" or run.info.run_id in parents or COMPARE_TAG in run.data.tags:
            continue
        rows.append({"run_id": run.info.run_id, "run_name": run.info.run_name, "start_time": run.info.start_time,
                     **{f"params.{k}": v for k, v in run.data.params.items()},
                     **{f"tags.{k}": v for k, v in run.data.tags.items()},
                     **{f"metrics.{metric_name(k)}": v for k, v in run.data.metrics.items()}})
    if not rows:
        where = f" matching {filter_string!r}" if filter_string else ""
        raise UserError("--experiment", f"no finished runs{where} in experiment {experiment!r}")
    frame = pd.DataFrame(rows).sort_values(["start_time", "run_id"], kind="stable").reset_index(drop=True)
    # The axis: the param (the resolved config), else the tag; runs from elsewhere may have neither.
    axis = frame["params.ablation"] if "params.ablation" in frame else pd.Series(pd.NA, index=frame.index)
    if "tags.ablation" in frame:
        axis = axis.fillna(frame["tags.ablation"])
    frame["ablation"] = axis.fillna("")
    return frame


def _search(client, experiment_id, filter_string):
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


# --- model selection -----------------------------------------------------------------------------------

def validation_view(runs):
    """The runs without any test column: what model selection is allowed to see."""
    return runs[[c for c in runs.columns if not is_test_metric(c)]]


def select_best(runs, metric=DEFAULT_METRIC):
    """The single run with the best validation metric (ties: the earliest run). Test metrics are dropped
    before anything is compared, so no test score can change the choice."""
    if is_test_metric(metric):
        raise UserError("--metric", f"{metric!r} is a test metric; the best checkpoint is chosen by validation only")
    seen = validation_view(runs)
    column = metric_column(seen, metric)
    scored = seen.dropna(subset=[column])
    if scored.empty:
        raise UserError("--metric", f"no finished run has a {metric!r} value")
    ordered = scored.sort_values([column, "start_time", "run_id"], ascending=[lower_is_better(metric), True, True],
                                 kind="stable")
    return ordered.iloc[0]


def describe_best(best, metric=DEFAULT_METRIC):
    checkpoint = best.get("tags.best_checkpoint")
    checkpoint = checkpoint if isinstance(checkpoint, str) else "none recorded"
    return (f"best run by {metric} (validation): {best['run_id']} ({best['run_name']}), "
            f"{metric} {best[f'metrics.{metric}']:.3f}; checkpoint {checkpoint}")


# --- final test scoring --------------------------------------------------------------------------------

def final_test(client, best, seeds=None, device=None):
    """Score the chosen run's best.pt on its test splits over `seeds` sampling seeds (None: its config's
    eval.final_seeds); log the scores to that run (final_<split>_accuracy, ..., tag final_test_seeds). Returns
    ({split: figures}, the seeds used)."""
    from lab import sampling  # diffusers and the model zoo load only for --final-test
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        scores, used = sampling.score_checkpoint(run_checkpoint(client, best["run_id"], tmp), seeds=seeds,
                                                 device=device)
    log_final_scores(client, best["run_id"], scores, used)
    return scores, used


def describe_scores(best, scores, seeds):
    lines = [f"final test scores of {best['run_id']} ({best['run_name']}) over {seeds} sampling seeds:"]
    width = max(len(s) for s in scores)
    for split, figures in scores.items():
        exact = (f", exact scenes {figures['exact_accuracy']:.3f} ± {figures['exact_accuracy_std']:.3f}"
                 if "exact_accuracy" in figures else "")
        lines.append(f"  {split.ljust(width)}  {figures['accuracy']:.3f} ± {figures['accuracy_std']:.3f}{exact}")
    lines.append(f"logged to MLflow run {best['run_id']} as "
                 + ", ".join(f"final_{Path(s).stem}_accuracy" for s in scores) + " (and the other figures, _std)")
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------------------

def compare(experiment, tracking_uri=None, filter_string=None, group_by=DEFAULT_GROUP_BY, metric=DEFAULT_METRIC,
            fmt="markdown", out_dir=None, best=False, final=False, seeds=None, device=None, log=print, wide=False):
    """What compare.py does: the table, then charts, the best run and its final test scores when asked."""
    client = open_store(tracking_uri)
    runs = load_runs(client, experiment, filter_string)
    table = ablation_table(runs, group_by, metric)
    log(render(table, fmt, wide).rstrip("\n"))
    if out_dir:
        paths = [path.resolve() for path in charts.write_charts(runs, table, out_dir, metric)]
        for path in paths:
            log(f"chart: {path}")
        run_id = log_compare_run(client, experiment, paths, render(table, "markdown", wide=True), filter_string)
        log(f"charts logged to MLflow run {run_id} (experiment {experiment}, artifacts charts/ and table.md)")
    if best or final:
        chosen = select_best(runs, metric)
        log(describe_best(chosen, metric))
        if final:
            log(describe_scores(chosen, *final_test(client, chosen, seeds, device)))
    return table
