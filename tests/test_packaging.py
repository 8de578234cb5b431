"""The package installs from one lock: pyproject.toml's pins agree with requirements.lock, the lock pins
every package exactly, and the environment the tests run in is the one the lock describes."""
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parent.parent


def lock_pins():
    """requirements.lock -> [Requirement], one per package line (comments and `# via` lines skipped)."""
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return [Requirement(line) for line in lines if line and not line.startswith((" ", "#"))]


def test_the_lock_pins_every_package_exactly():
    pins = lock_pins()
    assert len(pins) > 100  # torch, mlflow and optuna bring many
    for pin in pins:
        assert len(pin.specifier) == 1 and next(iter(pin.specifier)).operator == "==", str(pin)


def test_pyproject_dependencies_are_in_the_lock_at_their_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = {canonicalize_name(p.name): str(p.specifier) for p in lock_pins()}
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        wanted = Requirement(line)
        assert locked.get(canonicalize_name(wanted.name)) == str(wanted.specifier), line


def test_this_environment_is_the_locked_one():
    """What `make` installs: a difference means .venv predates the lock (make reinstalls it)."""
    wrong = []
    for pin in lock_pins():
        if pin.marker is not None and not pin.marker.evaluate():
            continue  # another platform's package (pywin32, colorama, ...)
        try:
            installed = version(pin.name)
        except PackageNotFoundError:
            installed = None
        if installed is None or installed not in pin.specifier:
            wrong.append(f"{pin.name}: {installed or 'missing'}, locked {pin.specifier}")
    assert not wrong, wrong
