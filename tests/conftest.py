import os
import re
import shutil
import socket
import subprocess
import tempfile
from glob import glob
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# hypothesis keeps caches in ./.hypothesis unless told otherwise: a test run writes nothing into the checkout
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="ddpm-lab-hypothesis-"))
EXPERIMENTS = Path(__file__).parent.parent / "experiments"


@pytest.fixture
def fault_rng():
    """A seeded random.Random for fault timing; the seed is printed (shown when a test fails) and
    DDPM_LAB_FAULT_SEED=<seed> replays it."""
    import random
    seed = int(os.environ.get("DDPM_LAB_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    print(f"fault seed: {seed} (replay with DDPM_LAB_FAULT_SEED={seed})")
    return random.Random(seed)


def working_tree_files():
    """Files in the checkout outside git's index, ignored ones too (mlruns/, mlflow.db, runs/), but for
    bytecode and the installed environment: what a test may never leave behind."""
    root = Path(__file__).parent.parent
    listed = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--ignored", "--directory"],
                            cwd=root, capture_output=True, text=True).stdout.split()
    ordinary = ("__pycache__", ".venv", ".pytest_cache", ".cache", ".whl", ".egg-info")
    return {path for path in listed if not any(part in path for part in ordinary)}


@pytest.fixture(scope="session", autouse=True)
def tests_write_nothing_into_the_working_tree():
    """The suite's own check: after every test, the checkout holds no file it did not hold before."""
    before = working_tree_files()
    yield
    left = working_tree_files() - before
    assert not left, f"tests left files in the working tree: {sorted(left)}"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets the session's private cache folder, never the user's ~/.cache."""
    monkeypatch.setenv("DDPM_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A 20-scene synthetic root (60 images), rendered once per test session."""
    from lab.data.synthetic import write_root
    return write_root(tmp_path_factory.mktemp("data") / "tiny", scenes=20, seed=1, workers=1, progress=False)


TINY = """
base: {base}
experiment: tiny
data:
  root: {root}
  image_size: 32
model:
  unet: tiny
  cfg_dropout: 0.2
diffusion:
  num_train_timesteps: 50
train:
  epochs: 3
  batch_size: 8
  lr: 1.0e-3
  warmup_steps: 2
  log_every: 2
eval:
  every_epochs: 2
  steps: 3
  guidance_scale: 2.0
  evaluator: {evaluator}
  val_seeds: 2
  final_seeds: 2
"""


@pytest.fixture
def experiments_dir():
    return EXPERIMENTS


@pytest.fixture
def random_evaluator(tmp_path):
    """A randomly initialised evaluator in the course's format (accuracies are arbitrary): its path."""
    from lab.eval import build_resnet, save_evaluator
    torch.manual_seed(0)
    save_evaluator(build_resnet(), tmp_path / "evaluator.pth")
    return tmp_path / "evaluator.pth"


@pytest.fixture
def write_tiny_config(tiny_root, random_evaluator):
    """write_tiny_config(path, template=TINY, **fields): the template filled with base.yaml, the tiny root and
    the random evaluator (and `fields`), written to `path`."""
    def write(path, template=TINY, **fields):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(base=EXPERIMENTS / "base.yaml", root=tiny_root, evaluator=random_evaluator,
                                        **fields))
        return path
    return write


@pytest.fixture
def tiny_template():
    return TINY


@pytest.fixture
def tmp_workdir(tmp_path, monkeypatch):
    """The test's tmp_path as working directory, with an MLflow store of its own there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture
def tiny_experiment(write_tiny_config, tmp_workdir):
    return write_tiny_config(tmp_workdir / "tiny.yaml")


# A tiny base config for sweeps: every epoch validates on new_test.json (32 label sets instead of val.json's
# 64: half the sampling).
TINY_SWEEP_BASE = """
base: {base}
experiment: {experiment}
data:
  root: {root}
  image_size: 32
model:
  unet: tiny
diffusion:
  num_train_timesteps: 20
train:
  epochs: {epochs}
  batch_size: 16
  warmup_steps: 0
  log_every: 3
eval:
  every_epochs: 1
  split: new_test.json
  steps: 2
  evaluator: {evaluator}
  test_splits: [test.json]
  final_seeds: 1
"""


@pytest.fixture
def tiny_sweep_base(write_tiny_config, tmp_path):
    """tiny_sweep_base(experiment, epochs): tmp_path/tiny.yaml, the base config of a tiny sweep."""
    return lambda experiment, epochs: write_tiny_config(tmp_path / "tiny.yaml", TINY_SWEEP_BASE,
                                                        experiment=experiment, epochs=epochs)


# --- a throwaway PostgreSQL server (tests marked `postgres`) ----------------------------------------

def postgres_programs():
    """initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest first), else None."""
    folders = sorted(glob("/usr/lib/postgresql/*/bin"), key=lambda f: [int(n) for n in re.findall(r"\d+", f)],
                     reverse=True)
    for path in [None] + folders:
        initdb, pg_ctl = shutil.which("initdb", path=path), shutil.which("pg_ctl", path=path)
        if initdb and pg_ctl:
            return initdb, pg_ctl
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """A TCP port on loopback that nothing listens on."""
    return _free_port()


def skip_or_fail(reason):
    """CI (.ci/run installs PostgreSQL) must run the postgres tests; elsewhere they are skipped."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI=true: .ci/run installs Debian's postgresql package)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server (initdb + pg_ctl on loopback, a free port, user `lab`, trust auth),
    stopped at the end of the session. Yields the URL of its `postgres` database."""
    programs = postgres_programs()
    if not programs:
        skip_or_fail("PostgreSQL's initdb and pg_ctl are not installed (not on PATH, not in /usr/lib/postgresql)")
    initdb, pg_ctl = programs
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as postgres (Debian's package makes it)
        if not shutil.which("runuser"):
            skip_or_fail("running as root without runuser to start PostgreSQL as another user")
        has_postgres = subprocess.run(["id", "postgres"], check=False, capture_output=True).returncode == 0
        as_user = ["runuser", "-u", "postgres" if has_postgres else "nobody", "--"]
    folder = Path(tempfile.mkdtemp(prefix="ddpm-lab-postgres-"))  # not under pytest's root-only folders
    if as_user:
        shutil.chown(folder, as_user[2])
    port, data = _free_port(), str(folder / "data")

    def pg(*args, check=True):  # in `folder`: the server's user may not enter the working directory
        return subprocess.run(as_user + list(args), cwd=folder, check=check, capture_output=True, text=True)
    try:
        pg(initdb, "-D", data, "-A", "trust", "-U", "lab")
        pg(pg_ctl, "-D", data, "-l", str(folder / "log"), "-w", "start",
           "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1")
    except subprocess.CalledProcessError as e:
        log = (folder / "log").read_text() if (folder / "log").is_file() else ""
        pg(pg_ctl, "-D", data, "-m", "immediate", "stop", check=False)  # in case it came up after all
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"starting PostgreSQL failed: {e.cmd}: {e.stderr}{e.stdout}{log}")
    try:
        yield f"postgresql://lab@127.0.0.1:{port}/postgres"
    finally:
        pg(pg_ctl, "-D", data, "-m", "immediate", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)
