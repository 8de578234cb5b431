"""MLflow tracking, the one module that writes to MLflow: one run per experiment (params from the resolved
config, metrics logged async), a sweep's parent run, compare.py's chart runs and final test scores.
Other modules hand it what to record; they may read runs, never write them.

Embedded default: a SQLite store `mlflow.db` in the working directory (`mlflow ui --backend-store-uri
sqlite:///mlflow.db`); `tracking_uri` in the config or MLFLOW_TRACKING_URI points elsewhere.

What a user of MLflow expects is done the way MLflow itself does it: the standard run tags (user,
source, git commit) from MLflow's own context resolution, metrics through its asynchronous queue as they
happen, images with a key and a step (the run's charts show them with a step slider), system metrics
from its own monitor, and experiments tagged as model training.
"""
import contextlib
import json
import logging
import os
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils import git_utils
from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL, MLFLOW_SOURCE_NAME

from lab.config import flatten, to_yaml, tracking_uri_problem, training_key
from lab.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for one param value
# The experiment tag MLflow 3's UI reads to choose its model-training view over the GenAI one (the value
# is the UI's own). 3.17 reads it only when its GenAI/Model training switch is off; with the switch, the
# switch decides (README: the URL that opens the model-training view).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def resolve_uri(config_uri=None):
    """The tracking URI, with a relative SQLite path made absolute (MLflow caches stores by URI text,
    so `sqlite:///mlflow.db` from two working directories would otherwise share one database)."""
    uri = database_url(config_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
    return uri


def database_url(url):
    """`postgresql://` names psycopg 3 (the driver we install) explicitly: SQLAlchemy before 2.1 read it as
    psycopg2. Every database URL, MLflow's or Optuna's, goes through here."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def check_reachable(uri, where="tracking_uri"):
    """Fail in one line before anything starts, instead of MLflow retrying for minutes."""
    problem = tracking_uri_problem(uri)  # the config's key is checked with it; MLFLOW_TRACKING_URI only here
    if problem:
        raise UserError(where, problem)
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except (urllib.error.URLError, OSError) as e:
            raise UserError(where, f"MLflow tracking server {uri} is unreachable ({getattr(e, 'reason', e)})") from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
        if not path.parent.is_dir():
            raise UserError(where, f"folder {path.parent} of the SQLite store {uri} does not exist")
        if path.exists():
            check_sqlite(path, where)


def check_sqlite(path, where):
    """An existing store must be an SQLite database whose schema can be read (not truncated, not another file)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        raise UserError(where, f"{path} is not a readable SQLite database ({e})") from None


def experiment_id(client, name, artifact_location=None):
    """The experiment's id, created (as a model-training experiment) when missing; workers starting at
    once may race to create it. Experiments created before the kind tag existed get it too."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException as e:
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(name)  # another worker created it first
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


def run_context_tags(tags):
    """MLflow's standard run tags (mlflow.user, mlflow.source.name/type, mlflow.source.git.commit/branch/
    repoURL), then `tags`, and `git_dirty`: whether the checkout had uncommitted changes to tracked files.

    MLflow takes the git facts from the main script's folder; when that is no checkout (pytest, an
    entry point installed outside the repository) they come from the checkout this package lives in."""
    resolved = resolve_tags(tags)
    folder = str(Path(resolved.get(MLFLOW_SOURCE_NAME, ".")).resolve().parent)
    if MLFLOW_GIT_COMMIT not in resolved:
        folder = str(Path(__file__).resolve().parent)
        found = {MLFLOW_GIT_COMMIT: git_utils.get_git_commit(folder), MLFLOW_GIT_BRANCH: git_utils.get_git_branch(folder),
                 MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(folder)}
        resolved.update({k: v for k, v in found.items() if v is not None})
    dirty = git_dirty(folder) if MLFLOW_GIT_COMMIT in resolved else None
    if dirty is not None:
        resolved["git_dirty"] = str(dirty).lower()
    resolved.setdefault("machine", machine())
    return resolved


def machine(device=None):
    """What runs on `device` (default: the GPU when there is one), for every figure a report or the benchmark
    quotes: the GPU's name, or the CPU model, cores and torch threads."""
    import platform

    import torch
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def git_dirty(folder):
    """Uncommitted changes to tracked files (untracked ones, like mlflow.db or runs/, do not count)."""
    import git  # GitPython, which MLflow's own git tags use
    try:
        return git.Repo(folder, search_parent_directories=True).is_dirty(untracked_files=False)
    except (git.GitError, OSError):
        return None


def system_metrics_enabled():
    """On unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is set to false (MLflow's own switch; its
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL sets the interval, 10 s by default)."""
    return not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.defined or MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get()


COMPARE_TAG = "compare"  # marks compare.py's chart runs, which hold no training of their own


def log_compare_run(client, experiment, files, table_markdown, filter_string=None):
    """compare.py's charts and table as artifacts of a small FINISHED run in the compared experiment, so they
    sit beside the runs they summarise in the MLflow UI. Returns its run id."""
    tags = run_context_tags({COMPARE_TAG: "true", "mlflow.note.content": "compare.py: the table and charts of "
                             f"this experiment's finished runs{f' matching {filter_string}' if filter_string else ''}"})
    if filter_string:
        tags["compare_filter"] = filter_string
    name = time.strftime("compare-%Y%m%d-%H%M%S")
    run_id = client.create_run(experiment_id(client, experiment), run_name=name, tags=tags).info.run_id
    for path in files:
        client.log_artifact(run_id, str(path), "charts")
    client.log_text(run_id, table_markdown, "table.md")
    client.set_terminated(run_id, "FINISHED")
    return run_id


EVALUATOR_EXPERIMENT = "evaluator"  # trainings of our evaluator: apart, so compare.py never tables them with generators


def start_evaluator_run(uri, recipe, tags):
    """A run in the `evaluator` experiment for one training of our evaluator: the recipe as params,
    `tags` (data root, checkpoint, recipe digest), system metrics. Returns its Tracker."""
    tracker = Tracker(uri)
    name = f"evaluator-{tags.get('recipe_digest', '')}".rstrip("-")
    tracker.run_id = tracker.client.create_run(
        experiment_id(tracker.client, EVALUATOR_EXPERIMENT), run_name=name,
        tags=run_context_tags({"mlflow.runName": name, **tags})).info.run_id
    tracker.client.log_batch(tracker.run_id, params=[Param(k, json.dumps(v)[:MAX_PARAM_LENGTH])
                                                     for k, v in recipe.items()])
    tracker.start_system_metrics()
    return tracker


def log_final_scores(client, run_id, scores):
    """compare.py --final-test's scores on the chosen run: final_<split>_accuracy and _std, tag final_test_seeds."""
    now, metrics = int(time.time() * 1000), []
    for split, (mean, std, _) in scores.items():
        stem = Path(split).stem
        metrics += [Metric(f"final_{stem}_accuracy", float(mean), now, 0),
                    Metric(f"final_{stem}_accuracy_std", float(std), now, 0)]
    used = max(len(accs) for _, _, accs in scores.values())
    client.log_batch(run_id, metrics=metrics, tags=[RunTag("final_test_seeds", str(used))], synchronous=True)


# --- a sweep's parent run (lab/sweeps/parent.py decides which one; these write it) -----------------------

def reopen_parent_run(client, run_id):
    """Mark an existing parent run RUNNING again; False when it is gone (deleted, or another store)."""
    try:
        if client.get_run(run_id).info.lifecycle_stage == "active":
            client.update_run(run_id, status="RUNNING")
            return True
    except MlflowException:
        pass
    return False


def create_parent_run(client, experiment, name, sweep_yaml, tags):
    """A new parent run for a study, holding the resolved sweep file as sweep.yaml."""
    run = client.create_run(experiment_id(client, experiment), run_name=name, tags=run_context_tags(tags))
    client.log_text(run.info.run_id, sweep_yaml, "sweep.yaml")
    return run.info.run_id


def discard_run(client, run_id):
    client.delete_run(run_id)


def finish_parent_run(client, run_id, metrics, tags, step, status):
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])
    client.set_terminated(run_id, status=status)


def fail_run(client, run_id, tags):
    """A run a dead worker left RUNNING: FAILED, with tags saying why."""
    try:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        client.set_terminated(run_id, status="FAILED")
    except MlflowException:
        pass  # deleted meanwhile: nothing to mark


class NoTracker:
    """What processes other than the main one log: nothing."""
    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class Tracker:
    """An MLflow run of one experiment: started fresh, or resumed by id after a restart."""

    def __init__(self, uri, artifact_location=None):
        self.uri, self.artifact_location = uri, artifact_location  # where a new experiment keeps artifacts
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = None
        self.sending = []  # MLflow's handles of metric batches still being written in the background
        self.monitor = None

    def start(self, config, config_path, run_id=None, parent_run_id=None, extra_tags=None, on_created=None):
        """Create the run (params, tags, resolved YAML) or reopen `run_id`; `on_created(run_id)` is called the
        moment a new run exists, before anything else, so that it can be recorded for a resume."""
        if run_id:
            self.run_id = self._reopen(run_id)
            self.start_system_metrics(resume=True)
        else:
            tags = run_context_tags({"mlflow.runName": config.run_name, "config_file": str(config_path),
                                     "ablation": config.ablation, "seed": str(config.seed),
                                     "training_key": training_key(config), **(extra_tags or {})})
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            self.run_id = self.client.create_run(experiment_id(self.client, config.experiment, self.artifact_location),
                                                 run_name=config.run_name, tags=tags).info.run_id
            if on_created:
                on_created(self.run_id)
            self.start_system_metrics()
        params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(config).items()]
        if len(self.client.get_run(self.run_id).data.params) < len(params):  # new, or killed while logging them
            for i in range(0, len(params), 100):  # MLflow's batch limit for params
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.log_text(self.run_id, to_yaml(config), "config.yaml")
        return self.run_id

    def trained_run(self, config):
        """(run id, best.pt path) of a FINISHED run of `config`'s experiment that trained exactly what `config`
        trains (same training_key: only sampling or scoring differ) and whose best.pt is on this machine;
        None when there is none. Runs that reused another's training do not count."""
        experiment = self.client.get_experiment_by_name(config.experiment)
        if experiment is None:
            return None
        runs = self.client.search_runs([experiment.experiment_id], f"tags.training_key = '{training_key(config)}' "
                                       "and attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"])
        for run in runs:
            checkpoint = run.data.tags.get("best_checkpoint")
            if "trained_by" not in run.data.tags and checkpoint and Path(checkpoint).is_file():
                return run.info.run_id, Path(checkpoint)
        return None

    def _reopen(self, run_id):
        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException as e:
            raise UserError(self.uri, f"cannot reopen MLflow run {run_id} of this run folder "
                                      f"({str(e).splitlines()[0]}); pass --fresh to start a new run") from None
        return run_id

    def ensure_finished(self, run_id):
        """Mark a run FINISHED whose process died after its final checkpoint, before MLflow heard of the end."""
        try:
            if self.client.get_run(run_id).info.status != "FINISHED":
                self.client.set_terminated(run_id, status="FINISHED")
        except MlflowException:
            pass  # not in this store (another tracking URI): nothing to mark

    def start_system_metrics(self, resume=False):
        """MLflow's own monitor (CPU, memory, disk, network; GPU through nvidia-ml-py) as `system/*` metrics."""
        if system_metrics_enabled():
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            # its start/stop notices would print between the progress bars at every run; warnings still show
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            self.monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
            self.monitor.start()

    def log_metrics(self, metrics, step):
        """Hand the metrics to MLflow's asynchronous queue: they show up at once, training never waits
        (the queue merges what arrives meanwhile into one write)."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.sending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def flush(self):
        """Wait until MLflow has stored every metric logged so far (before a checkpoint, at the end)."""
        for operation in self.sending:
            if operation is not None:  # a store without async logging returns None
                operation.wait()
        self.sending = []

    def set_tags(self, tags):
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_image(self, image, key, step):
        """A PIL image under `key` at `step`: the run's charts show each key with a step slider."""
        self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def log_artifact(self, path, artifact_dir=None):
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def end(self, status="FINISHED"):
        self.flush()
        if self.monitor is not None:
            self.monitor.finish()  # its last samples go in before the run closes
            self.monitor = None
        self.client.set_terminated(self.run_id, status=status)
