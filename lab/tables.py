"""Ablation tables from finished runs: one row per configuration (or per value of any config key or tag), the
metric's mean ± std over seeds with its 95% interval, each row's difference to the base row, and the figures
reported beside it; rendered as Markdown, CSV or LaTeX.

    table = ablation_table(runs)                           # runs: lab.report.load_runs
    print(render(table, "markdown"))

Tables are ranked by a validation metric only: a test metric is refused as the ranking metric.
"""
import difflib
import math
import re

import pandas as pd

from lab.config import ExperimentConfig, flatten
from lab.errors import UserError
from lab.stats import difference_interval, mean_interval, within_noise

DEFAULT_METRIC = "best_val_accuracy"
DEFAULT_GROUP_BY = ("ablation",)
# Params that differ between the seeds of one configuration, or only say where things go: never a table column.
RUN_KEYS = {"experiment", "run_name", "ablation", "seed", "seeds", "tracking_uri", "output_dir", "preset"}
LOWER_IS_BETTER = ("val_fd", "val_kid", "loss", "sample_s_per_image")
CONFIG_ORDER = list(flatten(ExperimentConfig()))  # columns follow the schema: model.*, diffusion.*, train.*, eval.*


def is_test_metric(name):
    """test_accuracy, new_test_accuracy_std, final_test_accuracy, heldout_test_accuracy, eval.test_splits...
    (a word of the name, so that `latest_*` is not one)."""
    return "test" in re.split(r"[._/-]", name.lower())


def lower_is_better(metric):
    return metric.startswith(LOWER_IS_BETTER)


def varying_params(runs):
    """Config keys whose values differ across the runs (so differ from the base run where it is one of them)."""
    keys = [c.removeprefix("params.") for c in runs.columns if c.startswith("params.")]
    keys = [k for k in keys if k not in RUN_KEYS and runs[f"params.{k}"].fillna("").nunique() > 1]
    order = {k: i for i, k in enumerate(CONFIG_ORDER)}
    return sorted(keys, key=lambda k: (order.get(k, len(order)), k))


def resolve_key(runs, key):
    """A --group-by key -> its column: a param (model.conditioning), a tag (group), or the ablation axis."""
    if key == "ablation":
        candidates = ["ablation"]
    elif key.startswith(("params.", "tags.")):
        candidates = [key]
    else:
        candidates = [f"params.{key}", f"tags.{key}"]
    for column in candidates:
        if column in runs.columns:
            return column
    known = [c.split(".", 1)[1] for c in runs.columns if c.startswith(("params.", "tags."))]
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise UserError("--group-by", f"unknown key {key!r}{hint}; use a logged config key (model.conditioning, "
                                  "eval.sampler, ...), a tag (group, seed) or ablation")


def metric_column(runs, metric):
    column = f"metrics.{metric}"
    if column not in runs.columns:
        metrics = sorted(c.removeprefix("metrics.") for c in runs.columns if c.startswith("metrics."))
        raise UserError("--metric", f"no run has a metric {metric!r} (metrics: {', '.join(metrics)})")
    return column


def reported_test_metrics(runs):
    """The test scores to report beside the validation metric: test_accuracy, new_test_accuracy, others."""
    names = [c.removeprefix("metrics.") for c in runs.columns if c.startswith("metrics.")]
    found = [n for n in names if is_test_metric(n) and n.endswith("_accuracy") and not n.startswith("final_")]
    first = [n for n in ("test_accuracy", "new_test_accuracy") if n in found]
    return first + sorted(set(found) - set(first))


# Validation figures reported beside the ranking metric when the runs have them: the other judge's, the strict
# judge's extra and missing objects, the binding errors (shares of the true labels missed), seconds per image.
BESIDE = ("val_accuracy", "val_exact_accuracy", "val_extra_objects", "val_missing_objects", "val_wrong_colour",
          "val_wrong_shape", "val_both_wrong", "sample_s_per_image")


def beside_values(runs, name):
    """A BESIDE figure per run: from the validation that chose best.pt where the run logged it (best_<name>),
    else from its last validation (runs logged before that was recorded)."""
    last = runs[f"metrics.{name}"]
    chosen = f"metrics.best_{name}"
    return runs[chosen].fillna(last) if chosen in runs.columns else last


def ablation_table(runs, group_by=DEFAULT_GROUP_BY, metric=DEFAULT_METRIC):
    """One row per group: its keys, `<metric>_mean/_std` and n over the group's runs (seeds), the binding
    errors and sampling time, the test scores' mean/std (reported only), and `best` on the row with the
    best validation mean. The metric also gets its 95% t interval (`_low/_high`) and, when a `base` row
    exists, each row's difference to it with a Welch interval (`vs_base`, `vs_base_low/_high`) and
    `within_noise` where that interval contains 0.

    group_by ("ablation",): a row per configuration (runs that differ only in seed), labelled by its axis
    and the config keys that vary across the runs. Other keys (params or tags): a row per distinct value.
    """
    if is_test_metric(metric):
        raise UserError("--metric", f"{metric!r} is a test metric; tables are ranked by a validation metric")
    runs = runs.dropna(subset=[metric_column(runs, metric)])  # a run without the metric is no data point here
    presets = sorted(runs["params.preset"].dropna().unique()) if "params.preset" in runs.columns else []
    if len(presets) > 1:
        raise UserError("--filter", f"these runs come from {len(presets)} presets ({', '.join(presets)}); a table "
                                    f"compares one scale: add --filter \"params.preset = '{presets[0]}'\"")
    if list(group_by) == ["ablation"]:
        keys = ["ablation", *varying_params(runs)]
        columns = ["ablation", *[f"params.{k}" for k in keys[1:]]]
    else:
        keys = list(dict.fromkeys(group_by))
        columns = [resolve_key(runs, k) for k in keys]
    frame = runs[columns].fillna("").astype(str).set_axis(keys, axis=1)
    frame["_seed"] = runs["params.seed"].fillna("") if "params.seed" in runs.columns else ""
    frame["_sampling_only"] = sampling_only(runs)
    beside = [name for name in BESIDE if f"metrics.{name}" in runs.columns and metric not in (name, f"best_{name}")]
    stats = [metric, *beside, *reported_test_metrics(runs)]
    for name in stats:
        frame[name] = beside_values(runs, name) if name in beside else runs[f"metrics.{name}"]
    grouped = frame.groupby(keys, sort=False, dropna=False)
    table = grouped[stats].agg(["mean", "std"])
    table.columns = [f"{name}_{stat}" for name, stat in table.columns]
    table.insert(2, "n", grouped[metric].count())
    table = table.reset_index()
    table = table.iloc[sorted(range(len(table)), key=lambda i: _row_order(table.loc[i, keys], keys))]
    table = table.reset_index(drop=True)
    means = table[f"{metric}_mean"]
    table["best"] = False
    if means.notna().any():
        table.loc[means.idxmin() if lower_is_better(metric) else means.idxmax(), "best"] = True
    return add_intervals(table, frame, keys, metric)


def sampling_only(runs):
    """Per run: whether it reuses another run's training (a guidance or sampler row sampling the base's weights:
    tagged `trained_by`), so that its seeds pair with the base's."""
    return runs["tags.trained_by"].notna() if "tags.trained_by" in runs.columns else pd.Series(False, index=runs.index)


def add_intervals(table, frame, keys, metric):
    """The metric's t interval per row and, against the `base` row, the interval of the difference: paired by
    training seed for a row that samples the base's own weights (the difference of each seed's two scores),
    Welch's for an independently trained one. `test` names which, `verdict` reads it (better, worse, noise)."""
    groups = {k if isinstance(k, tuple) else (k,): group for k, group in frame.groupby(keys, sort=False, dropna=False)}
    rows = [groups[tuple(row[k] for k in keys)] for _, row in table.iterrows()]
    intervals = [mean_interval(list(group[metric])) for group in rows]
    table[f"{metric}_low"] = [interval[2] for interval in intervals]
    table[f"{metric}_high"] = [interval[3] for interval in intervals]
    base = table.index[table["ablation"] == "base"] if "ablation" in keys else []
    if len(base) == 1 and len(table) > 1:
        reference = rows[base[0]]
        tests = ["paired" if group["_sampling_only"].all() else "Welch" for group in rows]
        differences = [paired_difference(group, reference, metric) if test == "paired"
                       else difference_interval(list(group[metric]), list(reference[metric]))
                       for group, test in zip(rows, tests)]
        table["vs_base"], table["vs_base_low"], table["vs_base_high"] = (list(c) for c in zip(*differences))
        table["within_noise"] = [within_noise(low, high) for _, low, high in differences]
        table["test"] = tests
        table["verdict"] = [verdict(difference, low, high, metric) for difference, low, high in differences]
        table.loc[base[0], ["vs_base", "vs_base_low", "vs_base_high", "within_noise", "test", "verdict"]] = \
            [math.nan] * 3 + [False, "", ""]
    return table


def paired_difference(group, reference, metric):
    """(mean difference, low, high) over the training seeds both rows have: each seed's score minus the base's."""
    ours = dict(zip(group["_seed"], group[metric]))
    theirs = dict(zip(reference["_seed"], reference[metric]))
    mean, _, low, high = mean_interval([ours[seed] - theirs[seed] for seed in ours if seed in theirs])
    return mean, low, high


def verdict(difference, low, high, metric):
    """better, worse, noise (the interval holds 0), or no claim (one seed, or one pair, has no interval)."""
    if math.isnan(difference) or math.isnan(low) or math.isnan(high):
        return "no claim"
    if within_noise(low, high):
        return "noise"
    return "better" if (difference < 0) == lower_is_better(metric) else "worse"


def _row_order(values, keys):
    """base first, then each axis, then numbers by value (20 < 100 < 1000), the rest alphabetically."""
    def natural(v):
        try:
            return (0, float(v), "")
        except ValueError:
            return (1, 0.0, v)
    head = (values["ablation"] != "base",) if "ablation" in keys else ()
    return (*head, *(natural(values[k]) for k in keys))


def label_columns(table):
    """The leading key columns of a table (everything before the first statistic)."""
    columns = list(table.columns)
    return columns[:next(i for i, c in enumerate(columns) if c.endswith("_mean"))]


def _number(x):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}" if x == 0 or abs(x) >= 0.0005 else f"{x:.1e}"  # 3 decimals unless they would read 0.000


def _interval(low, high):
    return "" if pd.isna(low) or pd.isna(high) else f" [{_number(low)}, {_number(high)}]"


def row_changes(table):
    """Per row, what it changes against the base row, in short: "conditioning=concat", "sampler=ddim, steps=100"
    (the keys that vary, by their last part); "" for the base row, or every key when there is none."""
    keys = [k for k in label_columns(table) if k != "ablation"]
    is_base = table["ablation"] == "base" if "ablation" in table.columns else pd.Series(False, index=table.index)
    base = table[is_base].iloc[0] if is_base.any() else None
    return ["" if is_base[i] else ", ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in keys
                                            if base is None or row[k] != base[k])
            for i, row in table.iterrows()]


def _shorten(text, width=30):
    """The start and the end of a long label: rows that differ in a change's last value stay apart."""
    head = (width - 1) // 2
    return text if len(text) <= width else text[:head] + "…" + text[len(text) - (width - 1 - head):]


def display_rows(table, pm="±", bold=lambda s: f"**{s}**", noise="(noise)", wide=True):
    """Header and rows of strings. Wide: keys, `mean ± std [95% interval]` for the metric (std and interval
    left out for n = 1), n, the difference to base with its interval (`noise` marks one within noise), its
    test and verdict, then `mean ± std` of the other figures; the best metric in bold. Narrow (a terminal's
    width): what the row changes (its axis for the base row), the metric's mean with its interval, n, the
    difference to base and the verdict, then the means of the other judge's figure and the test accuracy."""
    keys = label_columns(table)
    stats = [c.removesuffix("_mean") for c in table.columns if c.endswith("_mean")]
    versus = "vs_base" in table.columns
    rows = []
    for _, row in table.iterrows():
        cells = {}
        for name in stats:
            mean, std = row[f"{name}_mean"], row[f"{name}_std"]
            cells[name] = _number(mean) + ("" if not wide or pd.isna(std) or pd.isna(mean) else f" {pm} {_number(std)}")
        cells[stats[0]] += _interval(row.get(f"{stats[0]}_low"), row.get(f"{stats[0]}_high"))
        if row["best"]:
            cells[stats[0]] = bold(cells[stats[0]])
        if versus:
            difference = "" if pd.isna(row["vs_base"]) else f"{row['vs_base']:+.3f}"
            cells["vs base"] = (difference + _interval(row["vs_base_low"], row["vs_base_high"])
                                + (f" {noise}" if wide and difference and row["within_noise"] else ""))
            cells["verdict"] = f"{row['verdict']} ({row['test']})" if row["verdict"] else ""
        rows.append(cells)
    if wide:
        header = [*keys, stats[0], "n", *(["vs base", "verdict"] if versus else []), *stats[1:]]
        return header, [[*(str(row[k]) for k in keys), cells[stats[0]], str(row["n"]),
                         *([cells["vs base"], cells["verdict"]] if versus else []), *(cells[s] for s in stats[1:])]
                        for (_, row), cells in zip(table.iterrows(), rows)]
    beside = [name for name in ("val_exact_accuracy", "val_accuracy") if name in stats[1:]][:1] + \
        [name for name in ("test_accuracy", "test_exact_accuracy") if name in stats[1:]]
    labels = row_changes(table) if "ablation" in keys else [", ".join(str(row[k]) for k in keys)
                                                            for _, row in table.iterrows()]
    if "ablation" in keys:  # the base row, or a row whose axis is all a filter kept: named by its axis
        labels = [label or row["ablation"] for (_, row), label in zip(table.iterrows(), labels)]
    header = ["change" if "ablation" in keys else " / ".join(keys), stats[0], "n",
              *(["vs base", "verdict"] if versus else []), *(NARROW_BESIDE[name] for name in beside)]
    return header, [[_shorten(label), cells[stats[0]], str(row["n"]),
                     *([cells["vs base"], cells["verdict"]] if versus else []), *(cells[s] for s in beside)]
                    for (_, row), label, cells in zip(table.iterrows(), labels, rows)]


# What a narrow table shows beside the ranking metric, by its short header, as many as fit NARROW_WIDTH: the
# other judge's validation figure (the first found), then the test scores.
NARROW_BESIDE = {"val_exact_accuracy": "exact", "val_accuracy": "course", "test_accuracy": "test",
                 "test_exact_accuracy": "test exact"}
NARROW_WIDTH = 120  # a terminal's width: a wrapped row hides its answer


def to_markdown(table, wide=False):
    header, rows = display_rows(table, wide=wide)
    widths = [max(3, *(len(r[i]) for r in [header, *rows])) for i in range(len(header))]  # GFM: "--:" at least
    core = header.index("verdict") + 1 if "verdict" in header else 3
    while not wide and len(header) > core and sum(widths) + 3 * len(widths) + 1 > NARROW_WIDTH:
        header, rows, widths = header[:-1], [r[:-1] for r in rows], widths[:-1]
    labels = len(label_columns(table)) if wide else 1
    numeric = [i >= labels and header[i] != "verdict" for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)) + " |"
    rule = "| " + " | ".join("-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line(header), rule, *map(line, rows)]) + "\n"


def to_csv(table):
    """Machine-readable: means and stds in separate columns, `best` as True/False."""
    return table.to_csv(index=False, float_format="%.6g", lineterminator="\n")


def to_latex(table):
    """A booktabs tabular (written here: pandas' to_latex needs jinja2, which is not pinned)."""
    header, rows = display_rows(table, pm="$\\pm$", bold=lambda s: f"\\textbf{{{s}}}")
    keys = len(label_columns(table))
    spec = "l" * keys + "".join("l" if name == "verdict" else "r" for name in header[keys:])
    lines = ["\\begin{tabular}{" + spec + "}", "\\toprule", " & ".join(map(_latex_escape, header)) + " \\\\",
             "\\midrule"]
    lines += [" & ".join([*map(_latex_escape, r[:keys]), *r[keys:]]) + " \\\\" for r in rows]
    return "\n".join([*lines, "\\bottomrule", "\\end{tabular}"]) + "\n"


LATEX_SPECIAL = {"\\": "\\textbackslash{}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}",
                 **{c: "\\" + c for c in "&%$#_{}"}}


def _latex_escape(text):
    return re.sub(r"[\\~^&%$#_{}]", lambda m: LATEX_SPECIAL[m.group()], text)


def render(table, fmt="markdown", wide=False):
    """Markdown (narrow unless `wide`), CSV (every column) or a LaTeX tabular (wide)."""
    if fmt == "markdown":
        return to_markdown(table, wide)
    return {"csv": to_csv, "latex": to_latex}[fmt](table)


def headline(chosen, scores, select_by, seeds):
    """A run's figures as a Markdown table, a row for the validation that chose its best.pt (`chosen`: its val_*
    metrics) and one per test split (`scores`: {split: figures}), both judges' columns as mean ± std over seeds."""
    def cell(figures, key):
        return f"{figures[key]:.3f} ± {figures[key + '_std']:.3f}" if key in figures else "-"
    columns = {"accuracy": "course rule", "exact_accuracy": "exact scenes", "extra_objects": "extra objects",
               "missing_objects": "missing objects"}
    rows = [("validation (chose best.pt)", {k.removeprefix("val_"): v for k, v in chosen.items()}),
            *((f"{name} ({seeds} seeds)", figures) for name, figures in scores.items())]
    lines = ["| | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(figures, key) for key in columns) + " |" for name, figures in rows]
    return "\n".join(lines) + f"\n\nbest.pt chosen by {select_by}; the test splits scored once, at the end."
