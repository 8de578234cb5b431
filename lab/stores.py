"""Where runs and studies are kept: MLflow tracking URIs and Optuna storages, resolved, checked before anything
starts, and shown without passwords. No MLflow, Optuna or torch here: a config and a dry run check a store with
these functions alone.

Embedded default: a SQLite store `mlflow.db` in the working directory (`mlflow ui --backend-store-uri
sqlite:///mlflow.db`); `tracking_uri` in the config or MLFLOW_TRACKING_URI points elsewhere.
"""
import contextlib
import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import sqlalchemy.engine
import sqlalchemy.exc

from lab.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_STORAGE = "sqlite:///optuna.db"
JOURNAL_SUFFIXES = (".log", ".jsonl")

# The schemes of MLflow's tracking stores (mlflow.tracking._tracking_service.utils); '' is a local folder.
TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                    "databricks-uc", "uc")


def tracking_uri_problem(uri):
    """Why MLflow could not open `uri` as a store, or None: checked before anything starts."""
    scheme = urlparse(uri).scheme.partition("+")[0]  # postgresql+psycopg2://...: a database and its driver
    if scheme not in TRACKING_SCHEMES:
        return f"unknown scheme {scheme!r} in {uri!r}; MLflow stores use {', '.join(filter(None, TRACKING_SCHEMES))} or a folder"
    return None


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


def display_storage(spec):
    """The storage as others can open it: absolute file paths, no password."""
    spec = spec or DEFAULT_STORAGE
    if spec.startswith("journal:") or (spec.endswith(JOURNAL_SUFFIXES) and "://" not in spec):
        return str(Path(spec.removeprefix("journal:")).expanduser().resolve())
    if spec.startswith("sqlite:///") and not spec.startswith("sqlite:////") and spec != "sqlite:///:memory:":
        return "sqlite:///" + str(Path(spec.removeprefix("sqlite:///")).expanduser().resolve())
    try:
        return sqlalchemy.engine.make_url(spec).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return spec
