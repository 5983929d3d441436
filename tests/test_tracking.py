"""flows.tracking against a real MLflow sqlite store (one per module: creating one costs ~2 s)."""
from __future__ import annotations

import math
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from flows.tracking import (
    MAX_PARAM_VAL_LENGTH, TrackingError, check_tracking_server, end_running_runs, flatten_params, is_transient,
    log_metrics_at, resolve_tracking_uri, run_tags, setup_mlflow, sqlite_path, tracked_run,
)

REPO = Path(__file__).resolve().parents[1]
# Known-harmless: MLflow's sqlalchemy store itself uses the deprecated `noload` strategy.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def exp(store, monkeypatch, request) -> str:
    """A fresh experiment in the module's sqlite store; MLFLOW_TRACKING_URI set for this test."""
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield setup_mlflow(uri, request.node.name)
    while mlflow.active_run():  # a failing test must not leave its runs to the next one
        mlflow.end_run("FAILED")
    mlflow.set_tracking_uri(None)


def status(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.status


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"
    uri = resolve_tracking_uri(None, tmp_path / "out dir")
    assert uri.startswith("sqlite:////") and (tmp_path / "out dir").is_dir()
    assert sqlite_path(uri) == tmp_path / "out dir" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert resolve_tracking_uri(None, tmp_path) == "sqlite:////elsewhere/mlflow.db"


def test_setup_puts_artifacts_next_to_the_db_and_leaves_the_env(exp, store, monkeypatch):
    import os

    assert os.environ["MLFLOW_TRACKING_URI"].endswith("mlflow.db")  # the fixture's, not clobbered
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    again = setup_mlflow(f"sqlite:///{store / 'mlflow.db'}", "test_setup_puts_artifacts_next_to_the_db_and_leaves_the_env")
    assert again == exp and "MLFLOW_TRACKING_URI" not in os.environ
    loc = MlflowClient().get_experiment(exp).artifact_location
    assert Path(loc.removeprefix("file://")).parent == store / "mlartifacts"
    MlflowClient().delete_experiment(exp)  # a deleted experiment of that name comes back
    assert setup_mlflow(f"sqlite:///{store / 'mlflow.db'}", "test_setup_puts_artifacts_next_to_the_db_and_leaves_the_env") == exp
    assert MlflowClient().get_experiment(exp).lifecycle_stage == "active"


def test_flatten_params():
    p = flatten_params({"name": "x", "prune": {"keep_ratios": [0.6, 0.4], "round_to": 8, "target": None},
                        "targets": [{"name": "cpu", "batch_sizes": [1, 8]}], "empty": {}, "ok": True,
                        "long": "y" * (MAX_PARAM_VAL_LENGTH + 10)})
    assert p["prune.keep_ratios"] == "[0.6,0.4]" and p["prune.round_to"] == "8" and p["prune.target"] == "None"
    assert p["targets"] == '[{"name":"cpu","batch_sizes":[1,8]}]'
    assert p["empty"] == "{}" and p["ok"] == "True" and p["name"] == "x"
    assert len(p["long"]) == MAX_PARAM_VAL_LENGTH and p["long"].endswith("...")
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as mlflow_limit

    assert MAX_PARAM_VAL_LENGTH == mlflow_limit


def test_success_finishes_and_nests_under_the_parent(exp):
    params = flatten_params({"a": {"b": [1, 2]}, **{f"p{i}": i for i in range(120)}})  # > one 100-param batch
    with tracked_run("parent", params=params, tags={"pfp.k": 1}) as parent:
        with tracked_run("child", nested=True) as child:
            assert mlflow.active_run().info.run_id == child.info.run_id
        assert mlflow.active_run().info.run_id == parent.info.run_id
    assert mlflow.active_run() is None
    assert status(parent.info.run_id) == status(child.info.run_id) == "FINISHED"
    c = MlflowClient().get_run(child.info.run_id)
    assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
    p = MlflowClient().get_run(parent.info.run_id)
    assert p.data.params["a.b"] == "[1,2]" and len(p.data.params) == 121 and p.data.tags["pfp.k"] == "1"
    assert p.info.run_name == "parent"


def test_exception_fails_the_run_and_its_open_children(exp):
    with pytest.raises(RuntimeError, match="boom"):
        with tracked_run("parent") as parent:
            with tracked_run("child", nested=True) as child:
                raise RuntimeError("boom")
    assert status(parent.info.run_id) == status(child.info.run_id) == "FAILED"
    # A nested run started with plain mlflow.start_run and never ended: with mlflow's own
    # context manager the parent would end the child and stay RUNNING itself.
    with pytest.raises(ValueError):
        with tracked_run("parent2") as parent2:
            stray = mlflow.start_run(run_name="stray", nested=True)
            raise ValueError("x")
    assert status(parent2.info.run_id) == status(stray.info.run_id) == "FAILED"
    assert mlflow.active_run() is None


def test_keyboard_interrupt_fails_the_run(exp):
    with pytest.raises(KeyboardInterrupt):
        with tracked_run("parent") as parent:
            with tracked_run("child", nested=True) as child:
                raise KeyboardInterrupt
    assert status(parent.info.run_id) == status(child.info.run_id) == "FAILED"
    assert mlflow.active_run() is None


def test_interrupt_in_a_subprocess_leaves_no_run_running(exp, store):
    """The real thing: SIGINT to a process inside tracked_run, then atexit and all."""
    import os
    import signal
    import sys

    # a process started in the background by a shell inherits SIGINT ignored; this one must hear it
    code = ("import signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from flows.tracking import setup_mlflow, tracked_run\n"
            f"setup_mlflow({('sqlite:///' + str(store / 'mlflow.db'))!r}, 'sigint')\n"
            "with tracked_run('p') as r:\n"
            "    print(r.info.run_id, flush=True); time.sleep(900)\n")  # only the interrupt ends it
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    run_id = proc.stdout.readline().strip()
    assert run_id, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)  # a loaded machine may take long to unwind; it cannot finish otherwise
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert status(run_id) == "FAILED"


def test_metrics_with_steps(exp):
    with tracked_run("m") as run:
        for step in range(3):
            logged = log_metrics_at({"acc": 90.0 + step, "coverage": None, "eps": math.nan}, step=step)
            assert logged == {"acc": 90.0 + step}
        log_metrics_at({"loss": 0.5})
    hist = MlflowClient().get_metric_history(run.info.run_id, "acc")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 90.0), (1, 91.0), (2, 92.0)]
    assert MlflowClient().get_metric_history(run.info.run_id, "coverage") == []
    assert MlflowClient().get_run(run.info.run_id).data.metrics["loss"] == 0.5
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        log_metrics_at({"acc": 1.0})
    log_metrics_at({"late": 2.0}, run_id=run.info.run_id)
    assert MlflowClient().get_run(run.info.run_id).data.metrics["late"] == 2.0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


def test_unreachable_server_fails_fast():
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    with pytest.raises(TrackingError) as e:
        check_tracking_server(uri, timeout=2.0)
    assert time.perf_counter() - start < 5
    msg = str(e.value)
    assert msg.startswith(f"MLflow tracking server {uri} is unreachable (") and "\n" not in msg
    assert "refused" in msg


def test_sqlite_and_file_store_checks(tmp_path):
    import os

    check_tracking_server(f"sqlite:///{tmp_path / 'new' / 'deeper' / 'mlflow.db'}")  # creatable: fine
    (tmp_path / "a-file").write_text("")
    with pytest.raises(TrackingError, match="is not writable"):
        check_tracking_server(f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")
    with pytest.raises(TrackingError, match="file store"):
        check_tracking_server(str(tmp_path / "mlruns"))
    check_tracking_server("postgresql://db.example/mlflow")  # not checked: no cheap probe
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root ignores the mode
        with pytest.raises(TrackingError, match="not writable"):
            check_tracking_server(f"sqlite:///{locked / 'mlflow.db'}")


def test_run_tags_have_provenance(exp):
    tags = run_tags("cfg123", None)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["git.commit"] == (head or "unknown")
    assert tags["git.dirty"] in ("true", "false", "unknown")
    assert tags["pfp.config_hash"] == "cfg123" and tags["pfp.data_hash"] == "unknown"
    assert tags["host"] == socket.gethostname() and "cores" in tags["machine"]
    with tracked_run("tagged", tags=run_tags("cfg123", "data456")) as run:
        pass
    got = MlflowClient().get_run(run.info.run_id).data.tags
    assert got["git.commit"] == tags["git.commit"] and got["pfp.data_hash"] == "data456"


def test_child_of_a_named_parent_and_ending_runs_from_outside(exp):
    with tracked_run("parent", tags={"pfp.flow_run_id": "fr-1"}) as parent:
        with tracked_run("child", parent_run_id=parent.info.run_id) as child:
            assert MlflowClient().get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    # A process killed outright ends nothing itself: its runs stay RUNNING until a hook ends them.
    left = MlflowClient().create_run(exp, tags={"pfp.flow_run_id": "fr-2"})
    left_child = MlflowClient().create_run(exp, tags={"mlflow.parentRunId": left.info.run_id})
    ended = end_running_runs(MlflowClient(), exp, "tags.`pfp.flow_run_id` = 'fr-2'", "KILLED", "cancelled")
    assert ended == [left.info.run_id]
    assert status(left.info.run_id) == status(left_child.info.run_id) == "KILLED"
    assert MlflowClient().get_run(left.info.run_id).data.tags["pfp.end_reason"] == "cancelled"
    assert status(parent.info.run_id) == "FINISHED"  # other flow runs' runs untouched
    assert end_running_runs(MlflowClient(), exp, "tags.`pfp.flow_run_id` = 'fr-1'", "KILLED", "x") == []


def test_is_transient():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    assert is_transient(ConnectionRefusedError()) and is_transient(TimeoutError())
    assert is_transient(MlflowException("server error", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(ValueError("bad bundle"))
