"""Sweeps: sweep files are checked up front, storages open in Optuna and optuna-dashboard, and a tiny
sweep prunes through Optuna's pruner, nests its MLflow runs under one parent and resumes."""
import io
import json
import time
from itertools import count
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from lab import build, trainer
from lab.sweeps.parent import PARENT_RUN_ATTR
from lab.sweeps.schema import load_sweep
from lab.sweeps.storage import display_storage, make_storage
from lab.config import read_yaml
from lab.errors import UserError
from run_experiment import main

EXPERIMENTS = Path(__file__).parent.parent / "experiments"
SWEEPS = sorted((EXPERIMENTS / "sweeps").glob("*.yaml"))
GOOD_SPACE = "train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}"


def write_sweep(path, base, space=GOOD_SPACE, extra=""):
    path.write_text(f"sweep:\n  base: {base}\n  n_trials: 3\n{extra}  space:\n    {space}\n")
    return path


def dashboard_studies(storage):
    """What optuna-dashboard serves for a storage string (the same resolution as its command line)."""
    import optuna_dashboard
    app = optuna_dashboard.wsgi(storage)

    def get(path):
        environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
        setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
        assert status[0].startswith("200"), (path, status, body[:300])
        return json.loads(body)
    studies = get("/api/studies")["study_summaries"]
    return {s["study_name"]: get(f"/api/studies/{s['study_id']}") for s in studies}


# --- sweep files ------------------------------------------------------------------------------------

BAD_SWEEPS = [  # (space entry, other sweep keys, what the error says after the file name)
    ("train.lr: {type: float, low: 1.0e-2, high: 1.0e-4}", "", "train.lr: low > high"),
    ("train.lrr: {type: float, low: 1.0e-4, high: 1.0e-2}", "", "train.lrr: unknown key (a typo?)"),
    ("trian.lr: {type: float, low: 1.0e-4, high: 1.0e-2}", "", "trian.lr: trian: unknown key"),
    ("train.lr: {type: float, low: 1.0e-4, high: 2.0}", "", "train.lr: 2.0 gives an invalid config"),
    ("train.lr: {type: float, low: 0.0, high: 0.1, log: true}", "", "train.lr: log scale needs low > 0"),
    ("train.lr: {type: choice, choices: [1]}", "", "train.lr: type: expected float, int or categorical"),
    ("train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, choices: [1]}", "", "train.lr.choices: unknown key"),
    ("model.unet: {type: categorical, choices: [tiny, huge]}", "", "model.unet: 'huge' gives an invalid"),
    ("run_name: {type: categorical, choices: [a]}", "", "run_name: set by the sweep"),
    (GOOD_SPACE, "  n_trial: 3\n", "sweep.n_trial: unknown key (a typo?)"),
    (GOOD_SPACE, "  pruner: {name: hyperband, n_warmup_steps: 2}\n", "sweep.pruner: n_warmup_steps: not an option"),
    (GOOD_SPACE, "  sampler: {name: grid}\n", "sweep.sampler.name: Input should be 'tpe' or 'random'"),
    (GOOD_SPACE, "  set: {train.lr: 0.1}\n", "sweep.set.train.lr: also in sweep.space"),
    (GOOD_SPACE, "  set: {train.epochz: 3}\n", "sweep.set: train.epochz: unknown key (a typo?)"),
]


@pytest.mark.parametrize("space, extra, message", BAD_SWEEPS, ids=[case[2] for case in BAD_SWEEPS])
def test_bad_sweep_file_is_one_line(tmp_path, capsys, space, extra, message):
    """`message` is what follows the file name (`sweep.space.` left out for space entries)."""
    path = write_sweep(tmp_path / "bad.yaml", EXPERIMENTS / "base.yaml", space, extra)
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
    assert (message if message.startswith("sweep.") else f"sweep.space.{message}") in err, err


def test_flags_that_do_not_fit_the_file(tmp_path, capsys):
    assert main([str(EXPERIMENTS / "base.yaml"), "--n-trials", "3"]) == 1
    assert "only for sweep files" in capsys.readouterr().err
    path = write_sweep(tmp_path / "s.yaml", EXPERIMENTS / "base.yaml")
    assert main([str(path), "--seeds", "1", "2"]) == 1
    assert "not for sweep files" in capsys.readouterr().err
    assert main([str(path), "--storage", "optuna.sqlite3"]) == 1
    assert "expected an RDB URL" in capsys.readouterr().err


def test_dry_run_prints_a_sweep_file_that_loads_again(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", EXPERIMENTS / "base.yaml", extra="  pruner: {name: hyperband}\n")
    assert main([str(path), "--dry-run", "--n-trials", "7", "--set", "train.epochs=2"]) == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(capsys.readouterr().out)
    sweep = load_sweep(resolved)
    assert sweep.n_trials == 7 and sweep.study_name == "s" and sweep.config.train.epochs == 2
    assert sweep.spec.pruner.name == "hyperband" and sweep.storage == f"sqlite:///{Path.cwd() / 'optuna.db'}"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_files_load(path):
    base = (path.parent / read_yaml(path)["sweep"]["base"]).resolve()
    if not base.is_file():
        pytest.skip(f"{base.name} does not exist yet")
    sweep = load_sweep(path)
    assert sweep.spec.space and sweep.study_name


# --- storages ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sqlite", "journal_log", "journal_prefix",
                                  pytest.param("postgres", marks=pytest.mark.postgres)])
def test_storage_kinds_open_in_optuna_and_the_dashboard(tmp_path, monkeypatch, request, kind):
    monkeypatch.chdir(tmp_path)
    if kind == "postgres":  # a plain postgresql:// URL works in the sweeps and in optuna-dashboard (psycopg 3)
        url = request.getfixturevalue("postgres_url")
        spec, dashboard_arg = url, url
    else:
        spec, dashboard_arg = {"sqlite": ("sqlite:///studies/optuna.db", "sqlite:///studies/optuna.db"),
                               "journal_log": ("studies/optuna.log", "studies/optuna.log"),
                               "journal_prefix": ("journal:studies/optuna.journal", "studies/optuna.journal")}[kind]
    (tmp_path / "studies").mkdir()
    name = f"kinds-{tmp_path.name}"
    study = optuna.create_study(storage=make_storage(spec), study_name=name, direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    loaded = optuna.load_study(study_name=name, storage=make_storage(spec))
    assert [t.state for t in loaded.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert isinstance(make_storage(spec), optuna.storages.RDBStorage) == (kind in ("sqlite", "postgres"))
    assert len(dashboard_studies(dashboard_arg)[name]["trials"]) == 2
    if kind != "postgres":
        assert Path(display_storage(spec).removeprefix("sqlite:///")).is_file()


def test_bad_storages_are_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        make_storage(f"sqlite:///{tmp_path}/missing/optuna.db")
    with pytest.raises(UserError, match="does not exist"):
        make_storage(f"{tmp_path}/missing/optuna.log")
    with pytest.raises(UserError, match=r"cannot open the Optuna storage postgresql://u:\*\*\*@127.0.0.1:1/db"):
        make_storage("postgresql://u:secret@127.0.0.1:1/db")


def test_the_dashboard_opens_a_storage_no_sweep_has_used_yet(tmp_path, monkeypatch, capsys):
    """`python -m lab.dashboard` before the first sweep: an empty study list, not optuna-dashboard's traceback."""
    from lab import dashboard
    served = []
    monkeypatch.setattr(dashboard, "run_server", lambda storage, host, port: served.append((storage, host, port)))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert dashboard.main([url]) == 0
    assert served[0][1:] == ("127.0.0.1", 8080) and isinstance(served[0][0], optuna.storages.RDBStorage)
    assert f"optuna-dashboard on {url}: http://127.0.0.1:8080" in capsys.readouterr().out
    assert dashboard_studies(url) == {}  # the tables exist now: plain optuna-dashboard works too
    assert dashboard.main([f"sqlite:///{tmp_path}/missing/optuna.db"]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_dead_workers_trial_fails_and_is_retried(tmp_path, request, kind):
    """The distributed case: a trial whose heartbeat stopped becomes FAIL and comes back with its parameters."""
    url = request.getfixturevalue("postgres_url") if kind == "postgres" else f"sqlite:///{tmp_path}/optuna.db"
    storage = make_storage(url, heartbeat_interval=1, grace_period=1, max_retry=1)
    study = optuna.create_study(storage=storage, study_name=f"dead-{tmp_path.name}")
    dead = study.ask()
    x = dead.suggest_float("x", 0, 1)
    storage.record_heartbeat(dead._trial_id)  # what the dead worker's heartbeat thread did last
    time.sleep(2.5)  # SQLite's clock has whole seconds: more than the grace period for sure
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)  # fails stale trials first
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE"] and study.trials[1].params == {"x": x}
    assert study.trials[1].system_attrs["failed_trial"] == 0  # RetryHeartbeatStaleTrialCallback's mark


# --- a tiny sweep, end to end -----------------------------------------------------------------------

SWEEP = """
sweep:
  base: tiny.yaml
  study_name: tiny
  n_trials: 3
  sampler: {name: tpe, seed: 0}
  pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}
  space:
    train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    model.cfg_dropout: {type: float, low: 0.0, high: 0.2}
  set:
    train.grad_clip: 0.5
"""

# validation accuracies the evaluator reports per trial: trial 1 is below the finished trials' median at epoch 1,
# so the median pruner (1 startup trial) prunes it, and trial 4 too; trial 3 fails before it trains
ACCURACIES = {0: [0.5, 0.6], 1: [0.1, 0.9], 2: [0.7, 0.8], 3: RuntimeError("data went away"), 4: [0.2, 0.95]}


@pytest.fixture
def tiny_sweep(tiny_sweep_base, tmp_workdir, tmp_path, monkeypatch):
    tiny_sweep_base("tiny-sweep", epochs=2)
    prepare = build.prepare

    def prepare_with_known_accuracies(config, config_path, device=None, fresh=False):
        values, calls = ACCURACIES[int(config.run_name.rsplit("trial", 1)[1])], count()
        if isinstance(values, Exception):
            raise values
        setup = prepare(config, config_path, device, fresh)

        def accuracy(images, labels):
            return values[min(next(calls), len(values) - 1)]  # validations first, then the test split
        setup.evaluator.accuracy = accuracy  # what the final test scores call
        return setup

    def validate_with_known_accuracies(model, setup, reference_features, step, write=print):
        metrics, images, verdicts = validate(model, setup, reference_features, step, write)
        return {**metrics, "val_accuracy": setup.evaluator.accuracy(images, setup.val_labels)}, images, verdicts
    validate = trainer.validation_metrics
    monkeypatch.setattr(build, "prepare", prepare_with_known_accuracies)
    monkeypatch.setattr(trainer, "validation_metrics", validate_with_known_accuracies)
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, torch's spinning thread pool is many times slower than one thread
    yield path
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_tiny_sweep_prunes_nests_runs_and_resumes(tiny_sweep, tmp_path, capsys):
    assert main([str(tiny_sweep), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert [t.value for t in study.trials] == [0.6, 0.1, 0.8]  # a pruned trial keeps its last reported value
    assert study.trials[1].intermediate_values == {1: 0.1}  # pruned at its first validation (epoch 1)
    assert study.best_trial.number == 2 and "best trial 2: val_accuracy 0.8000" in out

    client = MlflowClient()
    parent_id = study.user_attrs[PARENT_RUN_ATTR]
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "tiny" and parent.info.status == "FINISHED" and parent_id in out
    assert parent.data.tags["optuna_study"] == "tiny" and parent.data.metrics["best_value"] == 0.8
    assert parent.data.tags["optuna_storage"] == f"sqlite:///{tmp_path / 'optuna.db'}"

    def trial_runs():
        runs = mlflow.search_runs(experiment_names=["tiny-sweep"], output_format="list")
        assert {r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags} == {parent_id}
        children = [r for r in runs if r.info.run_id != parent_id]
        assert all(r.data.tags["mlflow.parentRunId"] == parent_id for r in children)
        return {int(r.data.tags["optuna_trial"]): r for r in children}

    runs = trial_runs()
    assert sorted(runs) == [0, 1, 2]
    for trial in study.trials:
        run = runs[trial.number]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert Path(trial.user_attrs["checkpoint"]).is_file()
        assert trial.user_attrs["checkpoint"].endswith(f"runs/sweeps/tiny/tiny-trial{trial.number}/best.pt")
        assert run.info.run_name == f"tiny-trial{trial.number}" and run.data.tags["optuna_state"] == trial.state.name
        assert json.loads(run.data.tags["optuna_params"]) == trial.params
        assert float(run.data.params["train.lr"]) == trial.params["train.lr"]
        assert run.data.params["train.grad_clip"] == "0.5"
    assert [runs[n].info.status for n in range(3)] == ["FINISHED", "KILLED", "FINISHED"]
    assert runs[1].data.tags["pruned"] == "true" and runs[1].data.tags["pruned_at_epoch"] == "1"
    assert "best_val_accuracy" not in runs[1].data.metrics and runs[0].data.metrics["best_val_accuracy"] == 0.6

    # the study opens in optuna-dashboard, with the trials' MLflow run ids among their user attrs
    detail = dashboard_studies("sqlite:///optuna.db")["tiny"]
    assert [t["state"] for t in detail["trials"]] == ["Complete", "Pruned", "Complete"]
    assert detail["objective_names"] == ["val_accuracy"]  # the dashboard's axis label, not "Objective 0"

    # resuming: the same command has nothing to do; a higher target runs only the missing trial (it fails),
    # and the next run makes up for the failure (trial 4, pruned); all under the same parent run
    assert main([str(tiny_sweep)]) == 0
    assert "0 run now" in capsys.readouterr().out
    assert main([str(tiny_sweep), "--n-trials", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "1 run now" in out and "trial 3 failed: RuntimeError: data went away" in out
    assert main([str(tiny_sweep), "--n-trials", "4", "--device", "cpu"]) == 0
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "COMPLETE", "FAIL", "PRUNED"]
    assert study.user_attrs[PARENT_RUN_ATTR] == parent_id
    runs = trial_runs()
    assert sorted(runs) == [0, 1, 2, 3, 4]
    assert runs[3].info.status == "FAILED" and runs[3].data.tags["optuna_state"] == "FAIL"
    assert runs[3].data.tags["failure"] == study.trials[3].user_attrs["failure"] == "RuntimeError: data went away"
    assert study.trials[3].user_attrs["mlflow_run_id"] == runs[3].info.run_id
    assert runs[4].info.status == "KILLED" and study.trials[4].intermediate_values == {1: 0.2}
    parent = client.get_run(parent_id)
    assert parent.data.metrics["trials_pruned"] == 2 and parent.data.metrics["trials_fail"] == 1
    assert parent.data.tags["best_trial"] == "2" and parent.data.tags["best_run_id"] == runs[2].info.run_id
