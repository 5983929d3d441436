"""MLflow helpers for the flows: where to track, failing early, runs that always end.

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir)
    check_tracking_server(uri)                 # one line, before any work, if it cannot work
    setup_mlflow(uri, "my-experiment")
    with tracked_run("parent", params=flatten_params(config), tags=run_tags(h, dh)):
        with tracked_run("round 1", nested=True):
            log_metrics_at({"acc": 91.2, "coverage": None}, step=1)

MLflow details these helpers handle (MLflow 3.17):
- `set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ; setup_mlflow puts the
  variable back, so a later resolve_tracking_uri(None, other_dir) in the same process (a
  long-lived `pfp serve`) does not inherit the previous config's store.
- With a sqlite store and no server, MLflow puts artifacts under ./mlruns of the *current
  directory*; setup_mlflow gives new experiments a folder `mlartifacts` next to the db.
- `mlflow.start_run()`'s context manager ends whatever run is on top of the (thread-local)
  active-run stack, which is not its own run when a nested run was left open, and
  `end_run` pops the stack before writing the status, so a failed write leaves the run
  RUNNING; MLflow's atexit hook then ends leftovers as FINISHED. tracked_run ends its own
  run (and anything left open above it) FAILED on any exception, KeyboardInterrupt and
  Prefect's TerminationSignal included (tests/test_tracking.py shows each case), which is
  why it wraps `mlflow.start_run` instead of using its context manager.
- A process that is killed outright runs no `finally`; `end_running_runs` ends its runs
  from outside (a Prefect on_cancellation/on_crashed hook, the next run's orphan sweep).
- The fluent `mlflow.log_*` calls start a run when none is active; log_metrics_at refuses
  instead of creating a stray run.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from flows.errors import FlowError

REPO = Path(__file__).resolve().parents[1]

# mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (6000 in MLflow 2.x and 3.x); longer values
# are rejected, and a flattened config easily has one (a list of targets as JSON).
MAX_PARAM_VAL_LENGTH = 6000
_TRUNCATED = "..."
_SQLITE = "sqlite:///"
_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


class TrackingError(FlowError, ValueError):
    """The tracking store cannot be used (server unreachable, folder not writable)."""


# --------------------------------------------------------------------------- where


def sqlite_uri(db_path: str | Path) -> str:
    """sqlite:///<absolute path> (four slashes on POSIX: the path itself starts with '/')."""
    return _SQLITE + urllib.request.pathname2url(str(Path(db_path).expanduser().resolve()))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (relative paths are relative to the current
    directory, as SQLAlchemy reads them); None for other URIs and in-memory databases."""
    if not uri.startswith(_SQLITE):
        return None
    path = unquote(uri[len(_SQLITE):].split("?", 1)[0])
    return None if path in ("", ":memory:") else Path(path).absolute()


def resolve_tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    (output_dir is created: MLflow's sqlite store does not create folders)."""
    if configured:
        return configured
    if os.environ.get(_ENV):
        return os.environ[_ENV]
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    return sqlite_uri(out / "mlflow.db")


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else OSError(str(e.reason))
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return " ".join(str(e).split()) or type(e).__name__


def _http_status(url: str, timeout: float) -> int:
    """HTTP status of a GET (an HTTP error status is an answer too); raises if no answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http(s) only, checked by caller
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def _check_http(uri: str, timeout: float) -> None:
    base = uri.rstrip("/")
    try:
        # The MLflow server answers /health with 200 "OK"; behind a proxy or another
        # server it may not exist, so the REST API is the second opinion.
        if _http_status(f"{base}/health", timeout) == 200:
            return
        status = _http_status(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout)
    except Exception as e:  # noqa: BLE001 - any failure to get an answer means unreachable
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({_reason(e)})") from None
    # 401/403: a server that wants credentials (MLflow reads them from its env vars later).
    if status not in (200, 401, 403):
        raise TrackingError(f"MLflow tracking server {uri} is unreachable (HTTP {status} from its REST API; "
                            "is this an MLflow tracking server?)")


def _check_sqlite(uri: str) -> None:
    db = sqlite_path(uri)
    if db is None:
        return
    if db.exists():
        if not os.access(db, os.R_OK | os.W_OK):
            raise TrackingError(f"MLflow tracking database {db} is not writable")
        return
    # The db (and maybe its folder) is created later: the nearest existing folder must take it.
    folder = db.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingError(f"MLflow tracking database {db}: folder {folder} is not writable")


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail early, in one line (TrackingError), if the tracking store at `uri` cannot work:
    an http(s) server that does not answer within `timeout` s, a sqlite db whose folder is
    not writable, or a file store (refused by MLflow since 3.13). Other schemes pass."""
    scheme = urlparse(uri).scheme.lower()
    if uri == "databricks":  # MLflow's name for the default Databricks workspace, not a path
        return
    if scheme in ("http", "https"):
        _check_http(uri, timeout)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise TrackingError(f"MLflow tracking URI {uri} is a file store, which MLflow refuses since 3.13; "
                            f"use a database such as {sqlite_uri('mlflow.db')}")


# --------------------------------------------------------------------------- experiment


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "experiment"


def setup_mlflow(uri: str, experiment: str) -> str:
    """Track to `uri` in `experiment` (created if missing, restored if deleted); returns its id.

    For a sqlite store, new experiments keep their artifacts in `mlartifacts/<experiment>`
    next to the db (MLflow's default would be ./mlruns of the current directory).
    """
    previous = os.environ.get(_ENV)
    mlflow.set_tracking_uri(uri)
    # set_tracking_uri exported the URI to os.environ; put the variable back (see module doc).
    if previous is None:
        os.environ.pop(_ENV, None)
    else:
        os.environ[_ENV] = previous
    experiment_id = ensure_experiment(experiment)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def ensure_experiment(experiment: str, client: MlflowClient | None = None) -> str:
    """The id of `experiment` in the current tracking store, created (artifacts next to a
    sqlite db, as setup_mlflow) or restored as needed; the active experiment is left as it is."""
    client = client or MlflowClient()
    db = sqlite_path(client.tracking_uri)
    artifacts = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        artifacts = str(db.parent / "mlartifacts" / _slug(experiment))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=artifacts)
        except MlflowException as e:
            # Another process created it between our look-up and create: use theirs.
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        experiment_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    # MLflow 3 opens experiments in its GenAI view unless told this is model training.
    if (exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) is None):
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    return experiment_id


# --------------------------------------------------------------------------- params, tags, metrics


def _param_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        s = json.dumps(list(v), separators=(",", ":"), default=str)
    elif isinstance(v, dict):  # only an empty dict gets here; say so rather than drop the key
        s = "{}"
    else:
        s = str(v)
    if len(s) > MAX_PARAM_VAL_LENGTH:
        s = s[: MAX_PARAM_VAL_LENGTH - len(_TRUNCATED)] + _TRUNCATED
    return s


def flatten_params(d: dict, prefix: str = "") -> dict[str, str]:
    """{"prune": {"keep_ratios": [0.6, 0.4]}} -> {"prune.keep_ratios": "[0.6,0.4]"}: dotted
    keys, lists as compact JSON, scalars as str, values cut to MLflow's param length limit."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = _param_value(value)
    return out


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _machine() -> str:
    # Imported here: export.machine probes torch and the GPUs; once per process is enough.
    from export.machine import describe_machine, machine_summary

    return machine_summary(describe_machine())


def run_tags(config_hash: str, data_hash: str | None) -> dict[str, str]:
    """Provenance tags: git commit and dirtiness, config and data hashes, host and machine."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
        "pfp.config_hash": str(config_hash),
        "pfp.data_hash": str(data_hash) if data_hash else "unknown",
        "host": socket.gethostname(),
        "machine": _machine(),
    }


def log_metrics_at(metrics: dict[str, float | None], step: int | None = None, *,
                   run_id: str | None = None) -> dict[str, float]:
    """Log the numeric metrics (None and NaN skipped) at `step` to `run_id` or the active
    run; returns what was logged. Without an active run it raises rather than letting
    MLflow start a stray run."""
    values: dict[str, float] = {}
    for key, value in metrics.items():
        if value is None:
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {key!r}: {value!r} is not a number") from None
        if not math.isnan(v):
            values[key] = v
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_metrics_at: no active MLflow run (use tracked_run or pass run_id)")
        run_id = active.info.run_id
    if values:
        mlflow.log_metrics(values, step=step, run_id=run_id)
    return values


# --------------------------------------------------------------------------- runs


def sigterm_raises() -> None:
    """SIGTERM would end Python without running `finally` blocks and leave MLflow runs
    RUNNING; turn it into KeyboardInterrupt. Still needed inside a flow called in-process:
    with Prefect 3.8's own SIGTERM bridge alone, such a flow did not end on SIGTERM
    (tests/test_flows.py::test_crash_and_resume); the flow's on_crashed/on_cancellation
    hooks cover the runs a killed worker process leaves."""
    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):  # noqa: ARG001 - signal handler signature
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, handler)


def _end_runs_above(outer_id: str | None, status: str) -> None:
    """End every active run above `outer_id` on this thread's stack (ours and any nested
    run left open inside it) with `status`."""
    first_error: BaseException | None = None
    while (top := mlflow.active_run()) is not None and top.info.run_id != outer_id:
        run_id = top.info.run_id
        try:
            mlflow.end_run(status)
        except BaseException as e:  # a second Ctrl-C, a locked db: end_run popped already
            first_error = first_error or e
            try:
                MlflowClient().set_terminated(run_id, status)
            except Exception:  # noqa: BLE001 - reported through first_error below
                pass
    if first_error is not None:
        raise first_error


@contextmanager
def tracked_run(name: str, *, nested: bool = False, parent_run_id: str | None = None, tags: dict | None = None,
                params: dict | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start a run (nested under the active run if `nested`, a child of `parent_run_id` if
    given), log `params`, yield it; end it FINISHED, or FAILED on any exception including
    KeyboardInterrupt (re-raised). Runs started inside and left open are ended with it."""
    outer = mlflow.active_run()
    outer_id = outer.info.run_id if outer is not None else None
    run = mlflow.start_run(run_name=name, nested=nested or parent_run_id is not None, parent_run_id=parent_run_id,
                           tags={k: str(v) for k, v in (tags or {}).items()})
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        if params:
            mlflow.log_params({k: str(v) for k, v in params.items()})
        yield run
        status = RunStatus.to_string(RunStatus.FINISHED)
    finally:
        _end_runs_above(outer_id, status)


def end_running_runs(client: MlflowClient, experiment_id: str, filter_string: str, status: str,
                     reason: str) -> list[str]:
    """End the RUNNING runs of `experiment_id` that match `filter_string`, and their RUNNING
    children, with `status` (FAILED, KILLED) and a `pfp.end_reason` tag. Returns the ids
    of the matching runs. For runs whose process can no longer end them itself."""
    ended = []
    running = f"{filter_string} and attributes.status = 'RUNNING'"
    for run in client.search_runs([experiment_id], running):
        parent = f"tags.mlflow.parentRunId = '{run.info.run_id}'"
        for child in client.search_runs([experiment_id], f"{parent} and attributes.status = 'RUNNING'"):
            client.set_tag(child.info.run_id, "pfp.end_reason", reason)
            client.set_terminated(child.info.run_id, status)
        client.set_tag(run.info.run_id, "pfp.end_reason", reason)
        client.set_terminated(run.info.run_id, status)
        ended.append(run.info.run_id)
    return ended


def is_transient(exc: BaseException) -> bool:
    """A network or server hiccup worth retrying (connection refused or reset, timeout,
    HTTP 5xx/429 from the tracking server), not a bad request that fails again."""
    if isinstance(exc, (ConnectionError, TimeoutError, urllib.error.URLError)):
        return True
    if isinstance(exc, MlflowException):
        code = getattr(exc, "get_http_status_code", lambda: 500)()
        return code >= 500 or code == 429 or exc.error_code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR")
    try:
        import httpx
    except ImportError:  # pragma: no cover - Prefect depends on httpx
        return False
    return isinstance(exc, httpx.TransportError)


__all__ = [
    "MAX_PARAM_VAL_LENGTH", "TrackingError", "check_tracking_server", "end_running_runs", "ensure_experiment",
    "flatten_params",
    "is_transient", "log_metrics_at", "resolve_tracking_uri", "run_tags", "setup_mlflow", "sigterm_raises",
    "sqlite_path", "sqlite_uri", "tracked_run",
]
