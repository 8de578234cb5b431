"""MLflow tracking, the one module that writes to MLflow: one run per experiment (params from the resolved
config, metrics logged async), a sweep's parent run, compare.py's chart runs and final test scores.
Other modules hand it what to record; they may read runs, never write them.

What a user of MLflow expects is done the way MLflow itself does it: the standard run tags (user,
source, git commit) from MLflow's own context resolution, metrics through its asynchronous queue as they
happen, images with a key and a step (the run's charts show them with a step slider), system metrics
from its own monitor, and experiments tagged as model training.
"""
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils import git_utils
from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL, MLFLOW_SOURCE_NAME

from lab.config import flatten, to_yaml, training_key
from lab.errors import UserError
from lab.hardware import machine

MAX_PARAM_LENGTH = 6000  # MLflow's limit for one param value
# The experiment tag MLflow 3's UI reads to choose its model-training view over the GenAI one (the value
# is the UI's own). 3.17 reads it only when its GenAI/Model training switch is off; with the switch, the
# switch decides (README: the URL that opens the model-training view).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
EVALUATOR_EXPERIMENT = "evaluator"  # trainings of our evaluator: apart, so compare.py never tables them with generators


# A saved view of the runs table, kept on the experiment the way the UI's own "Share" button keeps one: the tag
# `mlflow.sharedViewState.<key>` holds the view (JSON), the URL names the key. Ours shows the headline figures as
# columns, best validation first (the UI's default columns are attributes only).
HEADLINE_VIEW = "headline"
HEADLINE_METRICS = ("best_val_accuracy", "best_val_exact_accuracy", "test_accuracy", "test_exact_accuracy",
                    "new_test_accuracy", "new_test_exact_accuracy", "heldout_test_accuracy", "train_minutes")


# MLflow's run page charts a metric `section/name` in a section of its own, placed before its plain "Model metrics":
# the curves go to two such sections, so the one-number results (best_*, test_*, ...) follow them, apart.
CURVE_SECTIONS = ("training", "validation")
TRAINING_CURVES = ("loss", "lr", "epoch", "images_per_s", "train_minutes", "input_size")


def mlflow_key(name):
    """The key MLflow keeps metric `name` under: `training/...` or `validation/...` for a curve, else `name`."""
    if name.startswith("val_") or name == "sample_s_per_image":
        return f"validation/{name}"
    if name in TRAINING_CURVES or name.startswith("loss_q"):
        return f"training/{name}"
    return name


def metric_name(key):
    """The metric's name from its MLflow key (`mlflow_key`'s inverse; keys without a section pass unchanged)."""
    section, _, name = key.partition("/")
    return name if section in CURVE_SECTIONS else key


def metric_history(client, run_id, name):
    """Metric `name`'s logged values: under its MLflow key, or under the plain name in a store written before the
    curves had sections."""
    return client.get_metric_history(run_id, mlflow_key(name)) or client.get_metric_history(run_id, name)


SAMPLE_IMAGES = ("test_samples", "new_test_samples", "heldout_test_samples", "val_samples", "denoising_strip")


def headline_view():
    """The view state MLflow's UI reads from a shared-view tag: the runs table's columns and sort; for its chart
    view a first section of sample grids captioned by run name alone (a card's default caption lists every param,
    hiding the image), then the curves' sections, then the one-number results; empty charts hidden."""
    columns = ["tags.`ablation`", *(f"metrics.`{mlflow_key(key)}`" for key in HEADLINE_METRICS)]
    # the UI keeps its own two sections last; it finds them by these names
    sections = [{"uuid": f"section-{name}", "name": name, "display": True, "isReordered": False}
                for name in ("samples", *CURVE_SECTIONS, "Model metrics", "System metrics")]
    grids = [{"uuid": f"card-{key}", "type": "IMAGE", "imageKeys": [key], "step": 0, "showRunParams": False,
              "metricSectionId": "section-samples", "isGenerated": True, "deleted": False, "runsCountToCompare": 10}
             for key in SAMPLE_IMAGES]
    return json.dumps({"selectedColumns": columns, "orderByKey": "metrics.`best_val_accuracy`", "orderByAsc": False,
                       "compareRunSections": sections, "compareRunCharts": grids, "hideEmptyCharts": True})


def experiment_url(experiment_id, base="http://127.0.0.1:5000"):
    """Where the UI shows an experiment's runs in the model-training view with the headline columns."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={HEADLINE_VIEW}"


def default_artifact_location(uri, name):
    """Where a new experiment of a SQLite store keeps its artifacts: `mlruns/` beside the database file (MLflow's
    own default is `./mlruns` under whatever folder the process happens to run in). Other stores: their own."""
    if not uri.startswith("sqlite:///"):
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] + "-" + hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns" / slug).as_uri()


def experiment_id(client, name, artifact_location=None):
    """The experiment's id, created (as a model-training experiment with the headline view) when missing; workers
    starting at once may race to create it. Experiments created before these tags existed get them too."""
    tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING}
    if name != EVALUATOR_EXPERIMENT:
        tags[f"mlflow.sharedViewState.{HEADLINE_VIEW}"] = headline_view()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            location = artifact_location or default_artifact_location(client.tracking_uri, name)
            return client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException as e:
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(name)  # another worker created it first
    for key, value in tags.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
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


def run_checkpoint(client, run_id, tmp):
    """A run's best.pt: the path its `best_checkpoint` tag names on this machine, else the MLflow artifact (a
    shared server) downloaded into `tmp`. A run that does not exist, or has neither, is one line."""
    try:
        tagged = client.get_run(run_id).data.tags.get("best_checkpoint")
    except MlflowException as e:
        raise UserError(run_id, f"no such MLflow run in {client.tracking_uri} ({str(e).splitlines()[0]})") from None
    if tagged and Path(tagged).is_file():
        return Path(tagged)
    try:
        return Path(client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp)))
    except Exception as e:  # MlflowException or OSError from the artifact store: one line either way
        raise UserError(run_id, f"best checkpoint not found: {tagged or 'no best_checkpoint tag'} is not a file "
                                f"here and the checkpoints/best.pt artifact is unavailable "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def log_samples(client, run_id, metrics, files):
    """lab.sample's figures (`sample/...` metrics) and images (artifacts under sample/) on a trained run."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()], synchronous=True)
    for path in files:
        client.log_artifact(run_id, str(path), "sample")


def log_final_scores(client, run_id, scores, seeds):
    """compare.py --final-test's scores on the chosen run: final_<split>_<figure> (accuracy, exact_accuracy, ...
    and their _std), tag final_test_seeds."""
    now = int(time.time() * 1000)
    metrics = [Metric(f"final_{Path(split).stem}_{key}", float(value), now, 0)
               for split, figures in scores.items() for key, value in figures.items()]
    client.log_batch(run_id, metrics=metrics, tags=[RunTag("final_test_seeds", str(seeds))], synchronous=True)


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

    def lifetime(self, killed=()):
        return contextlib.nullcontext(self)


class Tracker:
    """An MLflow run of one experiment: started fresh, or resumed by id after a restart. Its life is `lifetime()`:

        with tracker.lifetime():
            tracker.start(config, config_path)         # or start_evaluator_run(...)
            ...                                        # FINISHED at the end, KILLED on Ctrl-C, FAILED on an error
    """

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

    def start_evaluator(self, recipe, tags):
        """A run in the `evaluator` experiment for one training of our evaluator: the recipe as params, `tags`
        (data root, checkpoint, recipe digest), system metrics."""
        name = f"evaluator-{tags.get('recipe_digest', '')}".rstrip("-")
        self.run_id = self.client.create_run(experiment_id(self.client, EVALUATOR_EXPERIMENT), run_name=name,
                                             tags=run_context_tags({"mlflow.runName": name, **tags})).info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, json.dumps(v)[:MAX_PARAM_LENGTH])
                                                   for k, v in recipe.items()])
        self.start_system_metrics()
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
        batch = [Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
        self.sending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def flush(self):
        """Wait until MLflow has stored every metric logged so far (before a checkpoint, at the end)."""
        for operation in self.sending:
            if operation is not None:  # a store without async logging returns None
                operation.wait()
        self.sending = []

    def describe(self, markdown):
        """The run's description (MLflow's note): shown at the top of the run page and in the runs table."""
        self.set_tags({"mlflow.note.content": markdown})

    def experiment_id(self):
        return self.client.get_run(self.run_id).info.experiment_id

    def set_tags(self, tags):
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_image(self, image, key, step=None):
        """A PIL image under `key` at `step` (MLflow's 0 when None): the run's charts show each key with a step
        slider."""
        self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def log_artifact(self, path, artifact_dir=None):
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    @contextlib.contextmanager
    def lifetime(self, killed=(KeyboardInterrupt,)):
        """The run started inside the block ends with it: FINISHED when the block completes, KILLED when one of
        `killed` ends it (an interruption, a pruned trial), FAILED on any other error. Never left RUNNING: a rerun
        reopens it and resumes."""
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        except killed:
            status = "KILLED"
            raise
        finally:
            if self.run_id:
                self.end(status)

    def end(self, status="FINISHED"):
        self.flush()
        if self.monitor is not None:
            self.monitor.finish()  # its last samples go in before the run closes
            self.monitor = None
        self.client.set_terminated(self.run_id, status=status)
