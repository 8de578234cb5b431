"""MLflow tracking: one run per experiment, params from the resolved config, metrics logged async.

Embedded default: a SQLite store `mlflow.db` in the working directory (`mlflow ui --backend-store-uri
sqlite:///mlflow.db`); `tracking_uri` in the config or MLFLOW_TRACKING_URI points elsewhere.
"""
import contextlib
import io
import os
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lab.config import flatten, to_yaml, tracking_uri_problem
from lab.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for one param value


def resolve_uri(config_uri=None):
    """The tracking URI, with a relative SQLite path made absolute (MLflow caches stores by URI text,
    so `sqlite:///mlflow.db` from two working directories would otherwise share one database)."""
    uri = config_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
    return uri


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


def git_commit(path="."):
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(path).resolve().parent if Path(path).is_file()
                              else path, capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """An MLflow run of one experiment: started fresh, or resumed by id after a restart."""

    def __init__(self, uri):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = None
        self.pending = []
        self.sending = []  # MLflow's handles of batches still being written in the background

    def start(self, config, config_path, run_id=None, parent_run_id=None, extra_tags=None, on_created=None):
        """Create the run (params, tags, resolved YAML) or reopen `run_id`; `on_created(run_id)` is called the
        moment a new run exists, before anything else, so that it can be recorded for a resume."""
        if run_id:
            self.run_id = self._reopen(run_id)
        else:
            experiment = self.client.get_experiment_by_name(config.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(config.experiment)
            tags = {"mlflow.runName": config.run_name, "config_file": str(config_path), "ablation": config.ablation,
                    "seed": str(config.seed), "git_commit": git_commit(config_path), **(extra_tags or {})}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            self.run_id = self.client.create_run(experiment_id, run_name=config.run_name, tags=tags).info.run_id
            if on_created:
                on_created(self.run_id)
        params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(config).items()]
        if len(self.client.get_run(self.run_id).data.params) < len(params):  # new, or killed while logging them
            for i in range(0, len(params), 100):  # MLflow's batch limit for params
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.log_text(self.run_id, to_yaml(config), "config.yaml")
        return self.run_id

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

    def log_metrics(self, metrics, step):
        """Queue metrics; they are sent in one batch, asynchronously, so training never waits."""
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) >= 200:
            self.flush()

    def flush(self):
        if self.pending:
            self.sending.append(self.client.log_batch(self.run_id, metrics=self.pending, synchronous=False))
            self.pending = []

    def set_tags(self, tags):
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_image(self, image, artifact_file):
        """A PIL image as a PNG artifact."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(buffer.getvalue())
            self.client.log_artifact(self.run_id, str(path), str(Path(artifact_file).parent) or None)

    def log_artifact(self, path, artifact_dir=None):
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def sync(self):
        """Send what is queued and wait until MLflow has written it (before a checkpoint, at the end)."""
        self.flush()
        for operation in self.sending:
            if operation is not None:
                operation.wait()
        self.sending = []

    def end(self, status="FINISHED"):
        self.sync()
        self.client.set_terminated(self.run_id, status=status)
