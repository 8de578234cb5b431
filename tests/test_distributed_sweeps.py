"""Distributed sweeps: two worker processes share one Optuna study in PostgreSQL and log to one MLflow
tracking server (itself on PostgreSQL); one worker is killed mid-trial, the heartbeat turns its trial into
FAIL and the other worker retries it with the same parameters.

Everything runs on loopback and is stopped at the end, failed or not: the workers and the MLflow server
(process groups) after the test, the PostgreSQL server (conftest.py, with the test's two databases) at the
end of the session.
"""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from lab.sweeps.parent import PARENT_RUN_ATTR
from lab.tracking import mlflow_key

pytestmark = [pytest.mark.slow, pytest.mark.postgres,
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

ROOT = Path(__file__).parent.parent
N_TRIALS = 4

# seed null: two workers opening an empty study at once would otherwise draw the same values
SWEEP = f"""
sweep:
  base: tiny.yaml
  study_name: distributed
  n_trials: {N_TRIALS}
  sampler: {{name: tpe, seed: null}}
  pruner: {{name: median, n_startup_trials: 1, n_warmup_steps: 1}}
  heartbeat: {{interval: 1, grace_period: 3, max_retry: 2}}
  space:
    train.lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
    model.cfg_dropout: {{type: float, low: 0.0, high: 0.2}}
"""

GONE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def create_database(server_url, name):
    """A new database on the throwaway server; its URL, plain `postgresql://` (psycopg 3, as installed)."""
    import psycopg
    # CREATE DATABASE cannot run in a transaction
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def databases(postgres_url):
    """Two fresh databases on the session's PostgreSQL server: the Optuna study's and the MLflow server's.

    Not dropped (DROP DATABASE takes seconds): they go with the server at the end of the session."""
    return {kind: create_database(postgres_url, f"{kind}_{uuid.uuid4().hex[:8]}") for kind in ("optuna", "mlflow")}


class Processes:
    """Subprocesses in their own process groups, each with a log file; all of them stopped at teardown."""

    def __init__(self, folder):
        self.folder, self.started = folder, []

    def start(self, name, args, **kwargs):
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)
        proc.name, proc.log = name, log
        self.started.append(proc)
        return proc

    def output(self, proc, tail=4000):
        proc.log.flush()
        return f"--- {proc.name} (exit code {proc.poll()}) ---\n" + \
            (self.folder / f"{proc.name}.log").read_text(errors="replace")[-tail:]

    def stop_all(self, grace=15):
        """SIGTERM to each group, SIGKILL to what is left after `grace` seconds. A process already reaped
        (the test waited for it) is left alone: its pid, and so its group id, may belong to another by now."""
        running = [proc for proc in self.started if proc.returncode is None]
        for proc in running:  # the whole group: the MLflow server's uvicorn process too
            kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in running:
            while not exited(proc) and time.monotonic() < deadline:
                time.sleep(0.1)
            kill_group(proc, signal.SIGKILL)  # the leader is at most a zombie here: its group id is still ours
            proc.wait()
        for proc in self.started:
            proc.log.close()


def exited(proc):
    """Whether the process has exited, without reaping it."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def kill_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture
def mlflow_server(databases, processes, tmp_path, free_port):
    """`mlflow server` on loopback, runs in PostgreSQL, artifacts in a folder; its http:// URI."""
    port = free_port
    server = processes.start("mlflow-server", [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", databases["mlflow"],
        "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1"], cwd=tmp_path,
        # no job runner (GenAI jobs, seven more processes): the tracking API is all the sweep needs
        env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri, started = f"http://127.0.0.1:{port}", time.monotonic()
    deadline = started + 180  # the first start migrates the database schema
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            print(f"\nMLflow server up after {time.monotonic() - started:.0f} s")
            return uri
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the MLflow server did not come up\n{processes.output(server)}")
            time.sleep(0.5)


@pytest.fixture
def sweep_file(tiny_sweep_base, tmp_path):
    # A trial trains 4 epochs and validates after each (a few seconds on 2 CPU cores), so a kill after the
    # first validation lands mid-trial.
    tiny_sweep_base("distributed-sweep", epochs=4)
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    return path


def wait_for(what, condition, procs, processes, timeout):
    """Poll `condition()` until it returns something truthy; fail when a process in `procs` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{proc.name} exited while waiting for {what}\n{processes.output(proc)}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n" + "\n".join(processes.output(p) for p in procs))


def test_two_workers_share_a_study_and_a_killed_workers_trial_is_retried(
        databases, mlflow_server, processes, sweep_file, tmp_path):
    """Two workers start at once on an empty Optuna database; A is SIGKILLed once its first trial has
    validated (its MLflow run shows it); B runs on: after the grace period, the next trial B starts fails
    A's stale trial and re-runs it (B has to run all 4 finished trials itself, so it starts several)."""
    started = time.monotonic()
    storage = databases["optuna"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "run_experiment.py"), str(sweep_file), "--storage", storage,
               "--device", "cpu"]
    a = processes.start("worker-a", command, cwd=tmp_path, env=env)  # both at once, on an empty database
    b = processes.start("worker-b", command, cwd=tmp_path, env=env)
    worker_a = f"{socket.gethostname()}:{a.pid}"
    engine = sqlalchemy.create_engine(storage)

    def study_created():  # looked up without Optuna: opening an RDBStorage would create its tables
        with engine.connect() as db:
            return sqlalchemy.inspect(db).has_table("studies") and db.execute(
                sqlalchemy.text("SELECT count(*) FROM studies WHERE study_name = 'distributed'")).scalar()

    wait_for("the study", study_created, [a, b], processes, timeout=120)  # workers on an empty database
    engine.dispose()
    reader = optuna.storages.RDBStorage(storage)  # only reads: no heartbeat

    client = MlflowClient(tracking_uri=mlflow_server)

    def a_mid_trial():
        """A's RUNNING trial once it has validated once and its MLflow run on the server shows that."""
        study = optuna.load_study(study_name="distributed", storage=reader)
        trial = next((t for t in study.get_trials(states=(TrialState.RUNNING,))
                      if t.user_attrs.get("worker") == worker_a and t.intermediate_values), None)
        if trial and mlflow_key("val_accuracy") in client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics:
            return trial
        return None

    killed = wait_for("worker A to be mid-trial", a_mid_trial, [a, b], processes, timeout=240)
    kill_group(a, signal.SIGKILL)  # the worker, as a lost machine would: no chance to clean up
    assert a.wait(timeout=30) == -signal.SIGKILL
    killed_at = time.monotonic()

    try:
        assert b.wait(timeout=300) == 0, processes.output(b)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker B did not finish\n{processes.output(b)}")
    finished_at = time.monotonic()
    out_b = processes.output(b, tail=100_000)

    # --- the study: every trial ended, numbers unique, the target reached, the dead trial failed and retried
    study = optuna.load_study(study_name="distributed", storage=reader)
    trials = study.get_trials()
    states = Counter(t.state for t in trials)
    assert all(t.state in GONE for t in trials), (states, out_b)  # none RUNNING or WAITING
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))), numbers  # unique, no gaps
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == N_TRIALS, (states, out_b)

    dead = study.trials[killed.number]
    assert dead.state == TrialState.FAIL and dead.params == killed.params
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == dead.number]
    assert len(retries) == 1, [(t.number, t.system_attrs) for t in trials]
    retry = retries[0]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) and retry.params == dead.params
    assert RetryHeartbeatStaleTrialCallback.retry_history(retry) == [dead.number]
    assert retry.user_attrs["worker"] == f"{socket.gethostname()}:{b.pid}"
    assert dead.user_attrs["worker"] == worker_a
    # A died in its first trial: every other trial is B's, and none failed
    assert states[TrialState.FAIL] == 1 and all(t.user_attrs["worker"] != worker_a for t in trials if t != dead)

    # --- MLflow: one parent run, every trial's run on the server, nested under it, in the trial's state
    parent_id = study.user_attrs[PARENT_RUN_ATTR]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent_id in out_b
    assert parent.data.metrics["trials_fail"] == 1
    experiment = client.get_experiment_by_name("distributed-sweep")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [parent_id]  # one parent
    children = {r.info.run_id: r for r in runs if r.info.run_id != parent_id}
    assert len(children) == len(trials)  # one run per trial, no strays
    mlflow_status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])  # on the server
        assert run.info.run_id in children
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["optuna_trial"] == str(trial.number)
        assert run.data.tags["optuna_worker"] == trial.user_attrs["worker"]
        assert run.data.tags["optuna_state"] == trial.state.name, (trial.number, run.data.tags)
        assert run.info.status == mlflow_status[trial.state], (trial.number, run.info.status)
        assert "config.yaml" in [f.path for f in client.list_artifacts(run.info.run_id)]  # through the server
    dead_run = client.get_run(dead.user_attrs["mlflow_run_id"])  # FAILED by the retry, which names itself
    assert dead_run.data.tags["optuna_retried_as"] == str(retry.number)
    reason = f"worker {worker_a} stopped sending heartbeats; retried as trial {retry.number}"
    assert dead_run.data.tags["failure"] == reason
    assert f"trial {dead.number} failed: {reason}" in out_b  # B's summary
    history = client.get_metric_history(dead_run.info.run_id, mlflow_key("val_accuracy"))  # what A logged before it died
    assert history and history[0].value == dead.intermediate_values[1]
    assert client.get_run(retry.user_attrs["mlflow_run_id"]).data.tags["optuna_retry_of"] == str(dead.number)
    assert (tmp_path / "artifacts").is_dir() and any((tmp_path / "artifacts").rglob("config.yaml"))

    print(f"\nkill after {killed_at - started:.0f} s, worker B done after {finished_at - started:.0f} s; "
          f"trials: {', '.join(f'{t.number} {t.state.name}' for t in trials)}; killed {dead.number}, "
          f"retried as {retry.number}")
