"""compare.py on a hand-made MLflow store with known figures: tables, best run, charts, errors, final scoring."""
import re
import shutil
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from compare import main
from lab import charts, report, sampling
from lab.tracking import mlflow_key

EXPERIMENT = "iclevr-ablations"
BASE = {"experiment": EXPERIMENT, "model.unet": "reference", "model.conditioning": "time_add",
        "diffusion.beta_schedule": "cosine", "train.lr": "0.0001", "eval.sampler": "ddim", "eval.steps": "50",
        "eval.test_splits": "['test.json', 'new_test.json']", "train.batch_size": "64"}
# name -> (axis, what it changes, per seed: best_val_accuracy, test_accuracy, new_test_accuracy, s/image)
CONFIGS = {
    "base": ("base", {}, [0.50, 0.52, 0.54], [0.45, 0.47, 0.49], [0.40, 0.42, 0.44], 0.10),
    "cond_adagn": ("conditioning", {"model.conditioning": "adagn"},
                   [0.60, 0.61, 0.62], [0.30, 0.31, 0.32], [0.20, 0.21, 0.22], 0.12),
    # the worst validation scores and the best test scores: a selection peeking at test would pick these
    "sampler_dpmsolver20": ("sampler", {"eval.sampler": "dpmsolver++", "eval.steps": "20"},
                            [0.40, 0.43, 0.44], [0.99, 0.90, 0.91], [0.95, 0.90, 0.85], 0.04),
}
BEST_RUN = "cond_adagn-seed2"


def add_run(client, experiment_id, name, params, metrics, tags=None, status="FINISHED"):
    run = client.create_run(experiment_id, run_name=name, tags={"mlflow.runName": name, **(tags or {})})
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     params=[Param(k, v) for k, v in params.items()], synchronous=True)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The store, built once (creating an MLflow SQLite schema takes seconds); tests get a copy."""
    folder = tmp_path_factory.mktemp("store")
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=str(folder / "artifacts"))
    client.create_experiment("other")
    ids = {}
    for name, (axis, changes, vals, tests, new_tests, seconds) in CONFIGS.items():
        for seed, (val, test, new_test) in enumerate(zip(vals, tests, new_tests)):
            run_name = f"{name}-seed{seed}"
            checkpoint = folder / "runs" / run_name / "best.pt"
            checkpoint.parent.mkdir(parents=True)
            checkpoint.write_bytes(b"weights of " + run_name.encode())
            ids[run_name] = add_run(
                client, experiment_id, run_name,
                {**BASE, **changes, "ablation": axis, "seed": str(seed), "run_name": run_name},
                {"best_val_accuracy": val, "val_accuracy": val - 0.05, "best_val_exact_accuracy": val - 0.2,
                 "val_exact_accuracy": val - 0.25, "test_accuracy": test,
                 "test_accuracy_std": 0.01, "new_test_accuracy": new_test, "new_test_accuracy_std": 0.02,
                 "sample_s_per_image": seconds},
                {"ablation": axis, "seed": str(seed), "group": name, "best_checkpoint": str(checkpoint),
                 # the sampler row samples the base's weights of the same seed, as run_experiment's rescoring does
                 **({"trained_by": ids[f"base-seed{seed}"]} if axis == "sampler" else {})})
            client.log_metric(ids[run_name], "val_accuracy", val - 0.02, step=100)  # a second validation
    # never counted: a crashed run, a running one, a sweep's parent (its trial, base-seed2, counts), and a
    # finished run without the metric or any params (it would otherwise make every config key "vary")
    add_run(client, experiment_id, "notes", {}, {"loss": 1.0})
    add_run(client, experiment_id, "crashed", {**BASE, "ablation": "base", "seed": "7"},
            {"best_val_accuracy": 0.99}, {"ablation": "base"}, status="FAILED")
    add_run(client, experiment_id, "running", {**BASE, "ablation": "base", "seed": "8"},
            {"best_val_accuracy": 0.99}, {"ablation": "base"}, status="RUNNING")
    parent = add_run(client, experiment_id, "sweep", {}, {"best_val_accuracy": 0.98}, {"ablation": "sweep"})
    client.set_tag(ids["base-seed2"], "mlflow.parentRunId", parent)
    return folder, ids


@pytest.fixture
def store_uri(store, tmp_path, monkeypatch):
    """A private copy of the store as MLFLOW_TRACKING_URI, with the working directory in tmp_path."""
    folder, _ = store
    shutil.copy(folder / "mlflow.db", tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


MARKDOWN = """\
| change                        |        best_val_accuracy |   n |                 vs base | verdict        | exact |
| ----------------------------- | -----------------------: | --: | ----------------------: | -------------- | ----: |
| base                          |     0.520 [0.470, 0.570] |   3 |                         |                | 0.320 |
| conditioning=adagn            | **0.610 [0.585, 0.635]** |   3 |   +0.090 [0.048, 0.132] | better (Welch) | 0.410 |
| sampler=dpmsolver++, steps=20 |     0.423 [0.372, 0.475] |   3 | -0.097 [-0.111, -0.082] | worse (paired) | 0.223 |
"""

MARKDOWN_WIDE = """\
| ablation     | model.conditioning | eval.sampler | eval.steps |                best_val_accuracy |   n |                 vs base | verdict        | val_exact_accuracy | sample_s_per_image | test_accuracy | new_test_accuracy |
| ------------ | ------------------ | ------------ | ---------- | -------------------------------: | --: | ----------------------: | -------------- | -----------------: | -----------------: | ------------: | ----------------: |
| base         | time_add           | ddim         | 50         |     0.520 ± 0.020 [0.470, 0.570] |   3 |                         |                |      0.320 ± 0.020 |      0.100 ± 0.000 | 0.470 ± 0.020 |     0.420 ± 0.020 |
| conditioning | adagn              | ddim         | 50         | **0.610 ± 0.010 [0.585, 0.635]** |   3 |   +0.090 [0.048, 0.132] | better (Welch) |      0.410 ± 0.010 |      0.120 ± 0.000 | 0.310 ± 0.010 |     0.210 ± 0.010 |
| sampler      | time_add           | dpmsolver++  | 20         |     0.423 ± 0.021 [0.372, 0.475] |   3 | -0.097 [-0.111, -0.082] | worse (paired) |      0.223 ± 0.021 |      0.040 ± 0.000 | 0.933 ± 0.049 |     0.900 ± 0.050 |
"""

CSV = """\
ablation,model.conditioning,eval.sampler,eval.steps,best_val_accuracy_mean,best_val_accuracy_std,n,\
val_exact_accuracy_mean,val_exact_accuracy_std,sample_s_per_image_mean,sample_s_per_image_std,\
test_accuracy_mean,test_accuracy_std,new_test_accuracy_mean,new_test_accuracy_std,best,best_val_accuracy_low,\
best_val_accuracy_high,vs_base,vs_base_low,vs_base_high,within_noise,test,verdict
base,time_add,ddim,50,0.52,0.02,3,0.32,0.02,0.1,0,0.47,0.02,0.42,0.02,False,0.470317,0.569683,,,,False,,
conditioning,adagn,ddim,50,0.61,0.01,3,0.41,0.01,0.12,0,0.31,0.01,0.21,0.01,True,0.585159,0.634841,0.09,\
0.048446,0.131554,False,Welch,better
sampler,time_add,dpmsolver++,20,0.423333,0.0208167,3,0.223333,0.0208167,0.04,0,0.933333,0.0493288,0.9,0.05,\
False,0.371622,0.475045,-0.0966667,-0.111009,-0.0823245,False,paired,worse
"""


def test_markdown_table(store_uri, capsys):
    """One row per configuration over its 3 seeds, named by what it changes; failed, running and sweep-parent
    runs left out; the best validation mean in bold; the difference to base paired by seed for the sampler row
    (it samples the base's weights), Welch's for the other; then the other judge, as many columns as fit."""
    code, out, err = run_cli(capsys)
    assert code == 0, err
    assert out == MARKDOWN


def test_wide_markdown_table(store_uri, capsys):
    """--wide: every varying key and every figure, std beside each mean."""
    code, out, err = run_cli(capsys, "--wide")
    assert code == 0, err
    assert out == MARKDOWN_WIDE


def test_csv_table(store_uri, capsys):
    code, out, _ = run_cli(capsys, "--format", "csv", "--tracking-uri", store_uri)
    assert code == 0
    assert out == CSV


def test_latex_table(store_uri, capsys):
    code, out, _ = run_cli(capsys, "--format", "latex")
    assert code == 0
    assert out.startswith("\\begin{tabular}{llllrrrlrrrr}\n\\toprule\n")
    assert "ablation & model.conditioning & eval.sampler & eval.steps & best\\_val\\_accuracy & n & vs base" in out
    assert ("conditioning & adagn & ddim & 50 & \\textbf{0.610 $\\pm$ 0.010 [0.585, 0.635]} & 3 & +0.090 [0.048, 0.132] "
            "& better (Welch) & 0.410 $\\pm$ 0.010 & 0.120 $\\pm$ 0.000 & 0.310 $\\pm$ 0.010") in out
    assert out.endswith("\\bottomrule\n\\end{tabular}\n")


def test_group_by_params_and_filter(store_uri, capsys):
    client = report.open_store()
    table = report.ablation_table(report.load_runs(client, EXPERIMENT), ["model.conditioning"])
    assert table["model.conditioning"].tolist() == ["adagn", "time_add"]
    assert table["n"].tolist() == [3, 6]
    assert table["best_val_accuracy_mean"].round(6).tolist() == [0.61, 0.471667]
    assert table["best"].tolist() == [True, False]
    code, out, _ = run_cli(capsys, "--group-by", "group", "eval.steps", "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("group,eval.steps,best_val_accuracy_mean,")
    assert [line.split(",")[:2] for line in out.splitlines()[1:]] == [
        ["base", "50"], ["cond_adagn", "50"], ["sampler_dpmsolver20", "20"]]
    # a filter keeps the sampler runs; nothing varies among them, so only the axis is shown
    code, out, _ = run_cli(capsys, "--filter", "tags.ablation = 'sampler'")
    assert code == 0
    # and without a base row there is no difference to state
    assert out.splitlines()[0] == "| change  |        best_val_accuracy |   n | exact |  test |"
    assert out.splitlines()[2] == "| sampler | **0.423 [0.372, 0.475]** |   3 | 0.223 | 0.933 |"


def test_a_difference_within_noise_is_marked():
    """Two rows whose seeds overlap: the Welch interval of their difference contains 0 and says so."""
    import pandas as pd
    runs = pd.DataFrame({"run_id": list("abcdef"), "ablation": ["base"] * 3 + ["ema"] * 3,
                         "params.train.ema.enabled": ["True"] * 3 + ["False"] * 3,
                         "metrics.best_val_accuracy": [0.50, 0.56, 0.53, 0.52, 0.58, 0.49],
                         "metrics.val_wrong_colour": [0.2, 0.2, 0.2, 0.3, 0.3, 0.3]})
    table = report.ablation_table(runs)
    assert table["within_noise"].tolist() == [False, True]
    assert table["vs_base"][1] == pytest.approx(0.0)
    header, *rows = report.render(table, wide=True).splitlines()
    assert "vs base" in header and "val_wrong_colour" in header
    assert rows[-1].split("|")[5].strip() == "+0.000 [-0.094, 0.094] (noise)"  # Welch: 3.45 df, half-width 2.98 x 0.0316
    assert rows[-1].split("|")[6].strip() == "noise (Welch)"


def test_one_seed_makes_no_claim():
    """One training seed a row: no interval, so no verdict either way, whatever the difference."""
    import pandas as pd
    runs = pd.DataFrame({"run_id": list("ab"), "ablation": ["base", "guidance"], "params.seed": ["0", "0"],
                         "params.eval.guidance_scale": ["6.0", "3.0"], "tags.trained_by": [None, "a"],
                         "metrics.best_val_accuracy": [0.615, 0.581]})
    table = report.ablation_table(runs)
    assert table["verdict"].tolist() == ["", "no claim"] and table["test"].tolist() == ["", "paired"]
    assert table["vs_base"][1] == pytest.approx(-0.034)


def test_the_shipped_suites_table_fits_a_terminal():
    """The default table of the shipped ablation suite (every file in experiments/ablations/, 3 seeds, both
    judges' and the test figures logged) fits 120 characters; every row says what it changes, and no two alike."""
    import pandas as pd
    import yaml

    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", str(value)
    configs = {"base": {}}
    for path in sorted((Path(__file__).parent.parent / "experiments" / "ablations").glob("*.yaml")):
        delta = yaml.safe_load(path.read_text())
        configs[path.stem] = (delta.pop("ablation"), dict(flat({k: v for k, v in delta.items() if k != "base"})))
    keys = sorted({key for entry in list(configs.values())[1:] for key in entry[1]})
    rows = []
    for n, (name, entry) in enumerate(configs.items()):
        axis, changes = ("base", {}) if name == "base" else entry
        for seed in range(3):
            score = 0.5 + 0.01 * n + 0.02 * seed
            rows.append({"run_id": f"{name}-{seed}", "ablation": axis, "params.seed": str(seed),
                         **{f"params.{key}": changes.get(key, "base value") for key in keys},
                         **{f"metrics.{metric}": score for metric in (
                             "best_val_accuracy", "best_val_exact_accuracy", "val_accuracy", "val_exact_accuracy",
                             "val_extra_objects", "val_missing_objects", "val_wrong_colour", "val_wrong_shape",
                             "val_both_wrong", "sample_s_per_image", "test_accuracy", "test_exact_accuracy",
                             "new_test_accuracy", "new_test_exact_accuracy")}})
    table = report.ablation_table(pd.DataFrame(rows))
    lines = report.render(table).splitlines()
    assert max(map(len, lines)) <= 120, "\n".join(lines)
    assert len(lines) == 2 + len(configs)
    assert lines[0].split("|")[1].strip() == "change" and "vs base" in lines[0] and "verdict" in lines[0]
    assert "| conditioning=concat " in "\n".join(lines)
    changes = [line.split("|")[1].strip() for line in lines[2:]]
    assert len(set(changes)) == len(changes), changes  # a long change keeps its end: the two flow rows differ there


def test_binding_errors_are_the_chosen_validations():
    """Beside best_val_accuracy: the binding errors of the validation that chose best.pt (best_val_*), not of
    the last one; a run logged before those were recorded falls back to its last validation's."""
    import pandas as pd
    runs = pd.DataFrame({"run_id": list("ab"), "ablation": ["base", "base"],
                         "metrics.best_val_accuracy": [0.8, 0.9],
                         "metrics.val_wrong_colour": [0.3, 0.5], "metrics.best_val_wrong_colour": [0.1, None]})
    table = report.ablation_table(runs)
    assert table["val_wrong_colour_mean"].tolist() == [pytest.approx(0.3)]  # (0.1 + 0.5) / 2


def test_best_is_chosen_by_validation_never_by_test(store, store_uri, capsys):
    _, ids = store
    code, out, _ = run_cli(capsys, "--best")
    assert code == 0
    checkpoint = store[0] / "runs" / BEST_RUN / "best.pt"
    assert out.splitlines()[-1] == (f"best run by best_val_accuracy (validation): {ids[BEST_RUN]} ({BEST_RUN}), "
                                    f"best_val_accuracy 0.620; checkpoint {checkpoint}")
    runs = report.load_runs(report.open_store(), EXPERIMENT)
    assert report.select_best(runs)["run_id"] == ids[BEST_RUN]
    # whatever the test scores say, the choice stays; the selection never even receives them
    worst = runs["metrics.best_val_accuracy"].idxmin()
    for column in [c for c in runs.columns if "test" in c and c.startswith("metrics.")]:
        changed = runs.copy()
        changed[column] = 0.0
        changed.loc[worst, column] = 1.0
        assert report.select_best(changed)["run_id"] == ids[BEST_RUN]
    assert not any("test" in c for c in report.select_best(runs).index)
    no_tests = runs[[c for c in runs.columns if "test" not in c]]
    assert report.select_best(no_tests)["run_id"] == ids[BEST_RUN]
    # a lower-is-better validation metric picks the minimum
    runs["metrics.val_fd"] = runs["metrics.best_val_accuracy"]
    assert report.select_best(runs, "val_fd")["run_name"] == "sampler_dpmsolver20-seed0"


def test_charts_are_png_files(store_uri, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "--charts", "charts")
    assert code == 0
    names = ("accuracy_by_ablation.png", "accuracy_vs_sampler.png")
    assert out.splitlines()[-3:-1] == [f"chart: {tmp_path / 'charts' / name}" for name in names]  # absolute
    for name in names:
        assert (tmp_path / "charts" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same charts and the table on a compare run in the experiment, which later tables leave out
    client = report.open_store()
    compare_run = client.get_run(out.splitlines()[-1].split("MLflow run ")[1].split()[0])
    assert compare_run.info.status == "FINISHED" and compare_run.data.tags["compare"] == "true"
    logged = {a.path for a in client.list_artifacts(compare_run.info.run_id, "charts")}
    assert logged == {f"charts/{name}" for name in names}
    table_md = Path(client.download_artifacts(compare_run.info.run_id, "table.md", str(tmp_path))).read_text()
    assert table_md.startswith("| ablation") and "adagn" in table_md
    runs = report.load_runs(client, EXPERIMENT)
    assert compare_run.info.run_id not in set(runs["run_id"])
    table = report.ablation_table(runs)
    assert charts.row_labels(table) == ["base", "conditioning=adagn", "sampler=dpmsolver++, steps=20"]


@pytest.mark.parametrize("argv, message", [
    (["--experiment", "nope"], "error: --experiment: no experiment named 'nope' in sqlite:///"),
    (["--experiment", "other"], "error: --experiment: no finished runs in experiment 'other'"),
    (["--filter", "tags.ablation = sampler"], "error: --filter: 'tags.ablation = sampler': Parameter value is"),
    (["--group-by", "model.conditoning"],
     "error: --group-by: unknown key 'model.conditoning' (did you mean model.conditioning?)"),
    (["--metric", "val_acc"], "error: --metric: no run has a metric 'val_acc'"),
    (["--best", "--metric", "test_accuracy"], "error: --metric: 'test_accuracy' is a test metric"),
    (["--tracking-uri", "sqlite:///missing.db"], "error: --tracking-uri: no MLflow store at sqlite:///"),
    (["--seeds", "3"], "error: --seeds: only --final-test samples"),
], ids=["experiment", "no-runs", "filter", "group-by", "metric", "test-metric", "store", "seeds"])
def test_user_errors_are_one_line(store_uri, capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "missing.db").exists()


def fake_scores(calls):
    def score(path, seeds=None, device=None):
        calls.append((str(path), Path(path).read_bytes(), seeds))
        return {"test.json": {"accuracy": 0.7, "accuracy_std": 0.02},
                "new_test.json": {"accuracy": 0.6, "accuracy_std": 0.01}}, seeds or 1
    return score


def test_final_test_scores_the_chosen_checkpoint_and_logs_to_its_run(store, store_uri, capsys, monkeypatch):
    _, ids = store
    calls = []
    monkeypatch.setattr(sampling, "score_checkpoint", fake_scores(calls))
    code, out, err = run_cli(capsys, "--final-test", "--seeds", "4")
    assert code == 0, err
    assert calls == [(str(store[0] / "runs" / BEST_RUN / "best.pt"), f"weights of {BEST_RUN}".encode(), 4)]
    assert out.splitlines()[-4:] == [
        f"final test scores of {ids[BEST_RUN]} ({BEST_RUN}) over 4 sampling seeds:",
        "  test.json      0.700 ± 0.020",
        "  new_test.json  0.600 ± 0.010",
        f"logged to MLflow run {ids[BEST_RUN]} as final_test_accuracy, final_new_test_accuracy (and the other "
        "figures, _std)"]
    client = MlflowClient(store_uri)
    run = client.get_run(ids[BEST_RUN])
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("final_")} == {
        "final_test_accuracy": 0.7, "final_test_accuracy_std": 0.02,
        "final_new_test_accuracy": 0.6, "final_new_test_accuracy_std": 0.01}
    assert run.data.tags["final_test_seeds"] == "4"
    others = [client.get_run(i) for name, i in ids.items() if name != BEST_RUN]
    assert not any("final_test_accuracy" in r.data.metrics for r in others)
    # the final scores show up nowhere in the table, and change no choice
    code, out, _ = run_cli(capsys, "--best")
    assert out.startswith(MARKDOWN) and f"({BEST_RUN})" in out


def test_final_test_fetches_the_artifact_when_the_tagged_path_is_gone(store, store_uri, capsys, monkeypatch,
                                                                      tmp_path):
    _, ids = store
    client = MlflowClient(store_uri)
    weights = tmp_path / "best.pt"
    weights.write_bytes(b"from the artifact store")
    client.log_artifact(ids[BEST_RUN], str(weights), "checkpoints")
    client.set_tag(ids[BEST_RUN], "best_checkpoint", str(tmp_path / "elsewhere" / "best.pt"))
    calls = []
    monkeypatch.setattr(sampling, "score_checkpoint", fake_scores(calls))
    assert run_cli(capsys, "--final-test")[0] == 0
    assert calls[0][1:] == (b"from the artifact store", None)
    # neither the tagged file nor an artifact: one line
    client.set_tag(ids["base-seed0"], "best_checkpoint", str(tmp_path / "gone.pt"))
    runs = report.load_runs(client, EXPERIMENT)
    with pytest.raises(report.UserError, match="best checkpoint not found"):
        report.final_test(client, runs[runs["run_name"] == "base-seed0"].iloc[0])


@pytest.mark.slow
def test_final_test_on_a_real_tiny_checkpoint(tiny_experiment, capsys):
    """A real tiny training run (conftest's TINY config, one epoch), then --best --final-test on its best.pt."""
    from run_experiment import main as run_experiment
    assert run_experiment([str(tiny_experiment), "--set", "train.epochs=1", "--set", "eval.final_seeds=1",
                           "--set", "eval.guidance_scale=1.0"]) == 0
    capsys.readouterr()
    code, out, err = run_cli(capsys, "--experiment", "tiny", "--final-test", "--seeds", "2", "--device", "cpu")
    assert code == 0, err
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])[0]
    assert f"final test scores of {run.info.run_id} (tiny) over 2 sampling seeds:" in out
    for split in ("test", "new_test"):
        assert 0 <= run.data.metrics[f"final_{split}_accuracy"] <= 1
        assert f"  {split}.json " in out
    assert run.data.tags["final_test_seeds"] == "2"


def test_runs_of_two_presets_are_never_tabled_together():
    import pandas as pd
    runs = pd.DataFrame({"run_id": list("abcd"), "ablation": ["base"] * 4, "params.preset": ["base", "base", "cpu", "cpu"],
                         "metrics.best_val_accuracy": [0.5, 0.6, 0.2, 0.3]})
    with pytest.raises(report.UserError, match="2 presets \\(base, cpu\\).*params.preset = 'base'"):
        report.ablation_table(runs)
    assert report.ablation_table(runs[runs["params.preset"] == "cpu"])["n"].tolist() == [2]


def test_results_document_is_generated_from_the_store(store_uri, tmp_path, capsys):
    """docs/results.md: the command that wrote it, the table with intervals, the charts and learning
    curves it links (written beside it), and a hand-written reading kept across regenerations."""
    from lab.results import main as results
    out = tmp_path / "docs" / "results.md"
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / f"{EXPERIMENT}.md").write_text("Reading: adagn helps at this scale.\n")
    assert results(["--experiment", EXPERIMENT, "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"# Results\n\nGenerated by `python -m lab.results --experiment {EXPERIMENT} --out {out}` on ")
    assert "Reading: adagn helps at this scale." in text and "10 finished runs" in text
    span = re.search(r"started from (\S+ \S+) to (\S+ \S+) UTC", text)  # runs within one minute: "started X"
    assert (span is None and re.search(r", started \d{4}-\d\d-\d\d \d\d:\d\d UTC\.", text)) or span[1] != span[2]
    assert "| conditioning | adagn              | ddim         | 50         | **0.610 ± 0.010 [0.585, 0.635]** |" in text
    for chart in ("accuracy_by_ablation", "learning_curves"):
        assert f"![{chart}](results/{EXPERIMENT}/{chart}.png)" in text  # relative to docs/results.md
        assert (tmp_path / "docs" / "results" / EXPERIMENT / f"{chart}.png").stat().st_size > 10_000
    assert "Last validation of each run: base-seed0 0.480 after 6k images (" in text  # step 100 x batch 64
    assert results(["--experiment", "nope", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == "error: --experiment: no experiment 'nope' in the store"


@pytest.mark.parametrize("key", [mlflow_key, str], ids=["sectioned", "plain"])
def test_learning_curves_count_the_runs_clock_not_the_time_it_lay_stopped(store_uri, key):
    """A run killed and resumed an hour later: its curve's minutes are its `train_minutes`, not wall time; a
    run that predates the metric falls back to the time since its start. Stores written before the curves had
    sections (`validation/val_accuracy`) read the same."""
    from lab.results import learning_curves
    client = MlflowClient(store_uri)
    experiment_id = client.get_experiment_by_name("other").experiment_id
    start = int(time.time() * 1000)
    for name, clock in (("resumed", [2.0, 4.5]), ("older", None)):
        run = client.create_run(experiment_id, run_name=name, start_time=start)
        client.log_param(run.info.run_id, "train.batch_size", "32")
        for i, step in enumerate((100, 200)):
            later = start + (i * 60 + 3) * 60_000  # the second validation an hour after the first
            client.log_metric(run.info.run_id, "val_accuracy", 0.1 * (i + 1), timestamp=later, step=step)
            if clock:
                client.log_metric(run.info.run_id, "train_minutes", clock[i], timestamp=later, step=step)
        client.set_terminated(run.info.run_id, "FINISHED")
    curves = learning_curves(client, report.load_runs(client, "other")).set_index(["run_name", "images"])
    assert curves["minutes"].to_dict() == {("resumed", 3200.0): 2.0, ("resumed", 6400.0): 4.5,
                                           ("older", 3200.0): 3.0, ("older", 6400.0): 63.0}
