import os

import pytest

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
SHARED_ICLEVR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "iclevr")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets the session's private cache folder, never the user's ~/.cache."""
    monkeypatch.setenv("DDPM_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A 20-scene synthetic root (60 images), rendered once per test session."""
    from lab.data.synthetic import write_root
    return write_root(tmp_path_factory.mktemp("data") / "tiny", scenes=20, seed=1, workers=1, progress=False)
