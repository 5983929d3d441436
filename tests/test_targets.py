"""Deployment targets from YAML: the shipped example loads; mistakes are one-line errors naming the field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.targets import Target, TargetsFile, load_targets
from pfp.config import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "targets_example.yaml"


def write(tmp_path: Path, targets: list[dict]) -> Path:
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump({"targets": targets}))
    return path


def one_line_error(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_targets(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    return msg


def test_example_loads():
    assert EXAMPLE.read_text().startswith("#")
    targets = load_targets(EXAMPLE)
    assert len(targets) == 8
    roles = [t.role for t in targets]
    assert (roles.count("gate"), roles.count("canary"), roles.count("fleet")) == (1, 2, 5)
    assert {t.work_pool for t in targets} >= {"jetson-orin", "jetson-nano"}
    by_name = {t.name: t for t in targets}
    assert by_name["orin-canary-01"].work_queue == "orin-canary-01"  # default: its own name
    assert by_name["orin-fleet-03"].work_queue == "orin-lab"
    assert by_name["orin-canary-01"].backend_preference == ["tensorrt", "ort-cuda", "ort-cpu"]
    assert by_name["orin-canary-01"].batch_sizes == [1]


def test_defaults():
    t = Target(name="nano-01", work_pool="jetson-nano", role="fleet")
    assert (t.work_queue, t.latency_budget_ms, t.batch_sizes) == ("nano-01", None, [1])


def test_duplicate_names(tmp_path: Path):
    t = {"work_pool": "jetson-orin", "role": "fleet"}
    msg = one_line_error(write(tmp_path, [{"name": "a", **t}, {"name": "b", **t}, {"name": "a", **t}]))
    assert "field 'targets'" in msg and "duplicate target name 'a'" in msg and "targets.2.name" in msg


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".."])
def test_bad_name(tmp_path: Path, bad: str):
    msg = one_line_error(write(tmp_path, [{"name": bad, "work_pool": "jetson-orin", "role": "gate"}]))
    assert "field 'targets.0.name'" in msg and "target name" in msg


def test_bad_role(tmp_path: Path):
    t = {"work_pool": "jetson-orin", "role": "gate"}
    msg = one_line_error(write(tmp_path, [{"name": "a", **t}, {"name": "b", **t, "role": "canery"}]))
    assert "field 'targets.1.role'" in msg and "canary" in msg


@pytest.mark.parametrize("change, field", [
    ({"colour": "red"}, "targets.0.colour"),
    ({"backend_preference": ["torch-cpu"]}, "targets.0.backend_preference"),
    ({"batch_sizes": [0]}, "targets.0.batch_sizes"),
    ({"latency_budget_ms": -1}, "targets.0.latency_budget_ms"),
    ({"work_pool": None}, "targets.0.work_pool"),
])
def test_other_fields(tmp_path: Path, change: dict, field: str):
    t = {"name": "a", "work_pool": "jetson-orin", "role": "gate", **change}
    assert f"field '{field}'" in one_line_error(write(tmp_path, [t]))


def test_file_errors(tmp_path: Path):
    one_line_error(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets: [\n")
    assert "not valid YAML" in one_line_error(bad)
    bad.write_text("- name: a\n")
    assert "top level" in one_line_error(bad)
    bad.write_text("")
    assert "field 'targets'" in one_line_error(bad)
    assert TargetsFile.model_validate({"targets": [{"name": "a", "work_pool": "p", "role": "gate"}]})
