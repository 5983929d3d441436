"""`pfp deploy` and `pfp device` refuse bad input in one line before anything starts; pipeline
configs with gate devices are validated against the targets file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "targets_example.yaml"
cli = CliRunner()


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture
def no_servers(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_deploy_refuses_a_missing_targets_file(no_servers, tmp_path):
    msg = one_line_error(cli.invoke(app, ["deploy", str(tmp_path / "nope.yaml"), "--model", "m"]))
    assert "nope.yaml: targets file not found" in msg


def test_deploy_needs_a_real_prefect_server(no_servers):
    msg = one_line_error(cli.invoke(app, ["deploy", str(EXAMPLE), "--model", "m"]))
    assert "PREFECT_API_URL is not set" in msg


def test_deploy_needs_the_registry(no_servers, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert "MLFLOW_TRACKING_URI is not set" in one_line_error(cli.invoke(app, ["deploy", str(EXAMPLE), "--model", "m"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    msg = one_line_error(cli.invoke(app, ["deploy", str(EXAMPLE), "--model", "m"]))
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in msg


def test_device_commands_name_the_unknown_device(no_servers):
    msg = one_line_error(cli.invoke(app, ["device", "status", "nope", str(EXAMPLE)]))
    assert "no target named 'nope'" in msg
    msg = one_line_error(cli.invoke(app, ["device", "rollback", "nope", str(EXAMPLE), "--model", "m"]))
    assert "no target named 'nope'" in msg


def test_targets_with_a_path_in_a_name_are_refused(no_servers, tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text(yaml.safe_dump({"targets": [{"name": "a/../../b", "work_pool": "p", "role": "fleet"}]}))
    msg = one_line_error(cli.invoke(app, ["deploy", str(bad), "--model", "m"]))
    assert "targets.0.name" in msg and "not allowed" in msg


def pipeline(tmp_path: Path, gate_latency: list[dict], targets_file: Path = EXAMPLE) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"edge": {"targets_file": str(targets_file)}, "gate": {"latency": gate_latency}}))
    return path


def test_pipeline_gate_may_name_gate_devices(tmp_path):
    ok = pipeline(tmp_path, [{"target": "orin-gate-01", "batch": 8, "max_ms": 4.0}])
    result = cli.invoke(app, ["validate", str(ok)])
    assert result.exit_code == 0, result.output
    for check, expect in [
        ({"target": "orin-gate-01", "batch": 4, "max_ms": 4.0}, "batch: 4 is not measured on gate device"),
        ({"target": "orin-gate-01", "batch": 1, "min_speedup": 1.2}, "times only the candidate"),
        ({"target": "orin-canary-01", "batch": 1, "max_ms": 4.0}, "is not one of backends ['local-cpu'] or gate devices"),
    ]:
        msg = one_line_error(cli.invoke(app, ["validate", str(pipeline(tmp_path, [check]))]))
        assert expect in msg, msg
    msg = one_line_error(cli.invoke(app, ["validate", str(pipeline(tmp_path, [], tmp_path / "none.yaml"))]))
    assert "edge.targets_file" in msg and "targets file not found" in msg
