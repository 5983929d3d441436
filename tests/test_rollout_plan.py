"""deploy.rollout_plan without Prefect: device jobs are checked field by field, stages come out
canary first then fleet in waves, and the report says which device stopped the rollout."""
from __future__ import annotations

import pytest

from deploy.rollout_plan import (
    DeviceJob,
    DeviceOutcome,
    DeviceResult,
    JobError,
    RolloutReport,
    RolloutSettings,
    job_for,
    parse_job,
    plan_stages,
)
from deploy.targets import Target

BASE = {"device": "orin-canary-01", "model_name": "fmnist-lenet5", "version": "7", "rollout_id": "0123456789ab"}
RESULT = {"device": "canary-01", "mode": "deploy", "model": "fmnist-lenet5", "version": "7", "rollout_id": "rid-1",
          "backend": "ort-cpu", "precision": "fp32", "artifact_sha256": "ab" * 32,
          "skipped_backends": {"tensorrt": "not installed"},
          "latency": {"b1": {"p50_ms": 0.42, "p99_ms": 0.5}, "b8": {"p50_ms": 2.0, "p99_ms": 2.5}},
          "parity": {"max_rel_diff": 1e-6, "top1": 1.0}, "repository_version": 3, "previous_repository_version": 2,
          "seconds": {"flow": 4.2}}


def job_error(params: dict) -> str:
    with pytest.raises(JobError) as e:
        parse_job(params)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("device job: field '")
    return msg


def target(name: str, role: str, **kw) -> Target:
    return Target(name=name, work_pool="jetson-orin", role=role, **kw)


# --------------------------------------------------------------------------- parse_job


def test_parse_job_defaults():
    job = parse_job(BASE)
    assert isinstance(job, DeviceJob)
    assert (job.device, job.model_name, job.version, job.rollout_id) == (
        "orin-canary-01", "fmnist-lenet5", "7", "0123456789ab")
    assert job.mode == "deploy" and job.precision == "fp32" and job.budget_metric == "p50"
    assert job.backend_preference == ["tensorrt", "ort-cuda", "ort-cpu"] and job.batch_sizes == [1]
    assert (job.latency_budget_ms, job.threads, job.max_time_s, job.busy_timeout_s, job.keep_versions) == (
        None, None, 5.0, 60.0, 3)


@pytest.mark.parametrize("version, want", [(7, "7"), (123, "123"), ("42", "42")])
def test_parse_job_accepts_int_versions(version, want: str):
    job = parse_job({**BASE, "version": version})
    assert job.version == want and isinstance(job.version, str)


@pytest.mark.parametrize("field, bad, words", [
    ("device", "../etc", "device name '../etc' is not allowed: it must be one folder name, not a path"),
    ("device", "a/b", "device name 'a/b' is not allowed: it must be one folder name, not a path"),
    ("device", "", "device name '' is not allowed"),
    ("model_name", "../models", "model name '../models' is not allowed"),
    ("model_name", "a/b", "model name 'a/b' is not allowed"),
    ("rollout_id", "x/../y", "rollout id 'x/../y' is not allowed"),
    ("version", "1; rm", "'1; rm' is not a registered model version number"),
    ("version", "-1", "'-1' is not a registered model version number"),
    ("version", -1, "-1 is not a registered model version number"),
    ("version", "01", "'01' is not a registered model version number"),
    ("version", "0", "'0' is not a registered model version number"),
    ("version", True, "True is not a registered model version number"),
    ("version", 1.0, "1.0 is not a registered model version number"),
    ("backend_preference", ["torch-cpu"], "backend 'torch-cpu' cannot be deployed"),
    ("backend_preference", ["ort-cpu", "onnx"], "backend 'onnx' cannot be deployed"),
    ("batch_sizes", [1, 1], "batch sizes [1, 1] must be distinct positive integers"),
    ("batch_sizes", [0], "batch sizes [0] must be distinct positive integers"),
    ("mode", "train", "'deploy' or 'benchmark'"),
    ("latency_budget_ms", 0, "greater than 0"),
])
def test_parse_job_refuses(field: str, bad, words: str):
    msg = job_error({**BASE, field: bad})
    assert msg.startswith(f"device job: field '{field}': ")
    assert words in msg


@pytest.mark.parametrize("extra", ["colour", "root", "path"])
def test_parse_job_refuses_extra_keys(extra: str):
    assert job_error({**BASE, extra: "/etc"}) == f"device job: field '{extra}': unknown key"


def test_parse_job_missing_field():
    params = dict(BASE)
    del params["version"]
    assert job_error(params).startswith("device job: field 'version': ")


# --------------------------------------------------------------------------- job_for


def test_job_for_takes_the_targets_settings():
    t = target("orin-canary-01", "canary", latency_budget_ms=4.5, batch_sizes=[1, 8],
               backend_preference=["ort-cuda", "ort-cpu"])
    job = job_for(t, "fmnist-lenet5", 7, "0123456789ab")
    assert job == DeviceJob(device="orin-canary-01", model_name="fmnist-lenet5", version="7",
                            rollout_id="0123456789ab", backend_preference=["ort-cuda", "ort-cpu"],
                            batch_sizes=[1, 8], latency_budget_ms=4.5)
    job = job_for(t, "fmnist-lenet5", "8", "r1", mode="benchmark", max_time_s=1.5, threads=2, busy_timeout_s=5)
    assert (job.mode, job.version, job.max_time_s, job.threads, job.busy_timeout_s) == ("benchmark", "8", 1.5, 2, 5.0)
    assert job.device == t.name and job.latency_budget_ms == 4.5


def test_job_for_checks_what_it_is_given():
    t = target("orin-fleet-01", "fleet")
    with pytest.raises(JobError, match=r"field 'model_name'.*'\.\./m'"):
        job_for(t, "../m", "7", "r1")
    with pytest.raises(JobError, match="field 'version'"):
        job_for(t, "m", "7 ", "r1")
    with pytest.raises(JobError, match="field 'max_time_s'"):
        job_for(t, "m", "7", "r1", max_time_s=0)
    with pytest.raises(JobError, match="field 'colour': unknown key"):
        job_for(t, "m", "7", "r1", colour="red")


# --------------------------------------------------------------------------- plan_stages


@pytest.fixture
def targets() -> list[Target]:
    return [target("fleet-01", "fleet"), target("gate-01", "gate"), target("canary-01", "canary"),
            *(target(f"fleet-0{i}", "fleet") for i in range(2, 6)), target("canary-02", "canary")]


def names(stages) -> list[tuple[str, list[list[str]]]]:
    return [(s.role, [[t.name for t in w] for w in s.waves]) for s in stages]


def test_plan_stages_canary_then_fleet_in_waves(targets):
    stages = plan_stages(targets, RolloutSettings(max_parallel=2))
    assert names(stages) == [
        ("canary", [["canary-01", "canary-02"]]),
        ("fleet", [["fleet-01", "fleet-02"], ["fleet-03", "fleet-04"], ["fleet-05"]]),
    ]  # the gate is not part of a default rollout
    assert names(plan_stages(targets, RolloutSettings())) == [
        ("canary", [["canary-01", "canary-02"]]),
        ("fleet", [["fleet-01", "fleet-02", "fleet-03", "fleet-04"], ["fleet-05"]]),
    ]
    assert names(plan_stages(targets, RolloutSettings(max_parallel=1, roles=["gate", "canary"]))) == [
        ("gate", [["gate-01"]]), ("canary", [["canary-01"], ["canary-02"]]),
    ]
    # The roles' order is the stages' order.
    assert [s.role for s in plan_stages(targets, RolloutSettings(roles=["fleet", "canary"]))] == ["fleet", "canary"]


def test_plan_stages_only(targets):
    stages = plan_stages(targets, RolloutSettings(max_parallel=2), only=["fleet-05", "canary-02", "fleet-01"])
    assert names(stages) == [("canary", [["canary-02"]]), ("fleet", [["fleet-01", "fleet-05"]])]
    # A role left without devices is no stage.
    assert names(plan_stages(targets, RolloutSettings(), only=["fleet-03"])) == [("fleet", [["fleet-03"]])]
    # A device outside `only` stays out even when its role is a stage.
    assert names(plan_stages(targets, RolloutSettings(roles=["gate", "canary"]), only=["canary-02"])) == [
        ("canary", [["canary-02"]])]
    with pytest.raises(ValueError, match="device 'fleet-99' is not in the targets file"):
        plan_stages(targets, RolloutSettings(), only=["fleet-01", "fleet-99"])
    with pytest.raises(ValueError, match="no targets with role canary or fleet to deploy to"):
        plan_stages(targets, RolloutSettings(), only=["gate-01"])


def test_plan_stages_without_targets_for_the_roles():
    with pytest.raises(ValueError, match="no targets with role canary or fleet to deploy to"):
        plan_stages([target("gate-01", "gate")], RolloutSettings())
    with pytest.raises(ValueError, match="no targets with role gate to deploy to"):
        plan_stages([target("fleet-01", "fleet")], RolloutSettings(roles=["gate"]))
    with pytest.raises(ValueError):
        plan_stages([], RolloutSettings())


# --------------------------------------------------------------------------- RolloutReport


def test_report_all_ok():
    r = RolloutReport("fmnist-lenet5", "7", "rid")
    assert r.passed and r.summary() == "fmnist-lenet5 v7: 0 of 0 devices ok"
    r.add(DeviceOutcome("canary-01", "canary", "active"))
    r.add(DeviceOutcome("fleet-01", "fleet", "benchmarked"))
    assert r.passed and r.stopped_by is None
    assert r.summary() == "fmnist-lenet5 v7: 2 of 2 devices ok"
    d = r.to_dict()
    assert d["passed"] is True and d["stopped_by"] is None and [o["status"] for o in d["outcomes"]] == [
        "active", "benchmarked"]


def test_report_stopped_by_the_first_failure():
    r = RolloutReport("fmnist-lenet5", "7", "rid")
    r.add(DeviceOutcome("canary-01", "canary", "active"))
    r.add(DeviceOutcome("fleet-01", "fleet", "skipped", reason="earlier wave failed"))
    assert r.stopped_by is None and not r.passed  # a skipped device is not ok, but stops nothing
    r.add(DeviceOutcome("fleet-02", "fleet", "offline", reason="no worker took the job in 120 s"))
    r.add(DeviceOutcome("fleet-03", "fleet", "failed", reason="reference mismatch"))
    assert r.stopped_by == "fleet-02 (fleet): offline: no worker took the job in 120 s"
    assert not r.passed
    assert r.summary() == ("fmnist-lenet5 v7: 1 of 4 devices ok; rollout stopped by "
                           "fleet-02 (fleet): offline: no worker took the job in 120 s")
    assert r.to_dict()["stopped_by"] == r.stopped_by and r.to_dict()["passed"] is False


@pytest.mark.parametrize("status", ["failed", "offline", "timed_out", "busy"])
def test_report_every_non_ok_status_stops(status: str):
    r = RolloutReport("m", "1", "rid")
    r.add(DeviceOutcome("d1", "canary", status, reason="why"))
    assert r.stopped_by == f"d1 (canary): {status}: why" and not r.passed


def test_report_markdown_escapes_pipes():
    r = RolloutReport("fmnist-lenet5", "7", "rid-1")
    r.add(DeviceOutcome("canary-01", "canary", "active", result=DeviceResult.model_validate(RESULT)))
    r.add(DeviceOutcome("fleet-01", "fleet", "failed", reason="reference mismatch", rolled_back=True))
    r.add(DeviceOutcome("fleet-02", "fleet", "failed", reason="a | b\n  c||d", rolled_back=False))
    r.add(DeviceOutcome("fleet-03", "fleet", "busy", reason="x" * 400))
    md = r.to_markdown()
    lines = md.splitlines()
    assert lines[:4] == [
        f"**Rollout rid-1**: {r.summary()}", "",
        "| device | stage | status | backend | p50 ms (smallest batch) | rolled back | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    assert lines[4:] == [
        "| canary-01 | canary | active | ort-cpu | 0.42 | - |  |",
        "| fleet-01 | fleet | failed | - | - | True | reference mismatch |",
        "| fleet-02 | fleet | failed | - | - | False | a / b c//d |",
        f"| fleet-03 | fleet | busy | - | - | - | {'x' * 300} |",
    ]
    assert all(line.count("|") == 8 for line in lines[2:])  # every row keeps its 7 columns
    assert md.endswith("|\n")


def test_outcome_round_trips_with_its_typed_result():
    out = DeviceOutcome("canary-01", "canary", "active", flow_run_id="fr", result=DeviceResult.model_validate(RESULT))
    d = out.to_dict()
    assert d["result"] == RESULT                                   # JSON-ready, every field kept
    back = DeviceOutcome(**d)                                      # as a Prefect task result comes back
    assert isinstance(back.result, DeviceResult) and back == out
    assert DeviceOutcome("d", "fleet", "offline").to_dict()["result"] is None


def test_device_result_status_line_is_short():
    r = DeviceResult.model_validate(RESULT)
    assert r.status_line() == "active on ort-cpu, p50 0.42 ms at b1, repository version 3"
    bench = r.model_copy(update={"mode": "benchmark", "repository_version": None, "latency": {}})
    assert bench.status_line() == "benchmarked on ort-cpu"
    with pytest.raises(ValueError, match="latency"):
        DeviceResult.model_validate({**RESULT, "latency": {"b1": {"p50_ms": "fast"}}})
