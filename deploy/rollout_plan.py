"""A rollout's plan and its outcome, in plain Python (flows.deploy_flow runs it on Prefect).

    job = parse_job(params)                            # a device job, every field checked
    stages = plan_stages(targets, RolloutSettings())   # canary first, then the fleet, in waves
    report = RolloutReport(model, version, rollout_id)
    report.add(DeviceOutcome(device="orin-canary-01", stage="canary", status="active", ...))
    report.stopped_by                                  # the first failure, which stops the rollout

A stage runs its devices in waves of at most `max_parallel`; after each wave, any failure
stops the rollout: the remaining waves and stages are skipped and recorded as such. The
devices that failed are rolled back (the device flow does it itself when its own check
fails; the rollout asks again when the device may have been cut off mid-way).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deploy.errors import DeployError
from deploy.repository import validate_name
from deploy.targets import DEPLOY_BACKENDS, Target
# Renamed by a parallel change to format_validation_error; switch when it lands.
from pfp.config import format_validation_error

_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
ROLES = ("gate", "canary", "fleet")


class DeviceJob(BaseModel):
    """What a device is asked to do: the parameters of the device flow, all validated
    before anything touches the device's files."""

    model_config = ConfigDict(extra="forbid")

    device: str
    model_name: str
    version: str = Field(description="registered model version (digits)")
    rollout_id: str = Field(description="ties the device's MLflow run to the rollout")
    mode: Literal["deploy", "benchmark"] = "deploy"
    backend_preference: list[str] = Field(default_factory=lambda: list(DEPLOY_BACKENDS), min_length=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1)
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    latency_budget_ms: float | None = Field(None, gt=0, allow_inf_nan=False)
    budget_metric: Literal["p50", "p99"] = "p50"
    max_time_s: float = Field(5.0, gt=0, le=600, allow_inf_nan=False, description="timing budget per batch size")
    threads: int | None = Field(None, ge=1)
    busy_timeout_s: float = Field(60.0, ge=0, le=3600, description="wait this long for the device's slot")
    keep_versions: int = Field(3, ge=1, description="installed versions kept besides active and previous")

    @field_validator("device", "model_name", "rollout_id")
    @classmethod
    def _names(cls, v: str, info) -> str:
        return validate_name(v, {"device": "device name", "model_name": "model name"}.get(info.field_name, "rollout id"))

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> str:
        text = str(v) if isinstance(v, int) and not isinstance(v, bool) else v
        if not isinstance(text, str) or not _VERSION_RE.fullmatch(text):
            raise ValueError(f"{v!r} is not a registered model version number")
        return text

    @field_validator("backend_preference")
    @classmethod
    def _backends(cls, v: list[str]) -> list[str]:
        bad = [b for b in v if b not in DEPLOY_BACKENDS]
        if bad:
            raise ValueError(f"backend {bad[0]!r} cannot be deployed; choose from {', '.join(DEPLOY_BACKENDS)}")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v) or len(set(v)) != len(v):
            raise ValueError(f"batch sizes {v} must be distinct positive integers")
        return v


class JobError(DeployError, ValueError):
    """A device job's parameters are not acceptable; one line naming the field."""


def parse_job(params: dict) -> DeviceJob:
    """The DeviceJob in `params`; JobError (one line, naming the field) otherwise."""
    try:
        return DeviceJob.model_validate(params)
    except ValidationError as e:
        raise JobError(format_validation_error(e, "device job")) from None


def job_for(target: Target, model_name: str, version: str, rollout_id: str, *, mode: str = "deploy",
            **settings: Any) -> DeviceJob:
    """The job that deploys (or benchmarks) `version` on `target`."""
    return parse_job({
        "device": target.name, "model_name": model_name, "version": str(version), "rollout_id": rollout_id,
        "mode": mode, "backend_preference": target.backend_preference, "batch_sizes": target.batch_sizes,
        "latency_budget_ms": target.latency_budget_ms, **settings,
    })


class RolloutSettings(BaseModel):
    """How a rollout waits and how far it fans out."""

    model_config = ConfigDict(extra="forbid")

    roles: list[Literal["gate", "canary", "fleet"]] = Field(default_factory=lambda: ["canary", "fleet"],
                                                            min_length=1, description="stages, in order")
    max_parallel: int = Field(4, ge=1, description="devices deployed at once within a stage")
    pickup_timeout_s: float = Field(120.0, gt=0, description="no worker took the job by then: device offline")
    run_timeout_s: float = Field(1800.0, gt=0, description="a job still running by then is cancelled (device lost)")
    lost_after_s: float = Field(60.0, gt=0, description="a device whose queue no worker polled for this long is "
                                                        "offline, or lost mid-job (workers poll every 10 s by default)")
    busy_timeout_s: float = Field(60.0, ge=0, description="how long a device job waits for the device's slot")
    max_time_s: float = Field(5.0, gt=0, le=600, description="timing budget per batch size on the device")
    threads: int | None = Field(None, ge=1, description="CPU threads for CPU backends on the device")


class LatencyFigures(BaseModel):
    """Latency at one batch size on the device, in milliseconds."""

    p50_ms: float
    p99_ms: float


class DeviceResult(BaseModel):
    """What a device job returns: the engine it built and checked, its figures, and (mode
    "deploy") the repository version it installed. Stored whole as the job's MLflow artifact
    device/result.json; the rollout reads it back from there."""

    device: str
    mode: Literal["deploy", "benchmark"]
    model: str
    version: str
    rollout_id: str | None = None
    backend: str
    precision: str
    artifact_sha256: str
    skipped_backends: dict[str, str] = Field(default_factory=dict, description="backend -> why not on this device")
    latency: dict[str, LatencyFigures] = Field(default_factory=dict, description='"b<batch>" -> figures')
    parity: dict[str, float] = Field(default_factory=dict, description="max_rel_diff and top1 against the reference")
    repository_version: int | None = None
    previous_repository_version: int | None = None
    seconds: dict[str, float] = Field(default_factory=dict, description="time per step, as the device measured it")

    def status_line(self) -> str:
        """One short line for a tag: outcome, backend, p50 at the smallest batch, version installed."""
        head = f"{'active' if self.mode == 'deploy' else 'benchmarked'} on {self.backend}"
        if self.latency:
            key = min(self.latency, key=lambda b: int(b[1:]) if b[1:].isdigit() else 0)
            head += f", p50 {self.latency[key].p50_ms:.3g} ms at {key}"
        if self.repository_version is not None:
            head += f", repository version {self.repository_version}"
        return head


@dataclass
class Stage:
    role: str
    waves: list[list[Target]]


def plan_stages(targets: Sequence[Target], settings: RolloutSettings, only: Sequence[str] | None = None) -> list[Stage]:
    """The stages in `settings.roles` order, each split into waves of `max_parallel` devices.
    `only` restricts the rollout to those device names (each must be a target)."""
    chosen = list(targets)
    if only is not None:
        if not only:
            raise JobError("the list of devices to deploy to is empty")
        names = {t.name for t in targets}
        unknown = [d for d in only if d not in names]
        if unknown:
            raise JobError(f"device {unknown[0]!r} is not in the targets file")
        chosen = [t for t in targets if t.name in set(only)]
    stages = []
    for role in settings.roles:
        members = [t for t in chosen if t.role == role]
        if members:
            n = settings.max_parallel
            stages.append(Stage(role, [members[i:i + n] for i in range(0, len(members), n)]))
    if not stages:
        raise JobError(f"no targets with role {' or '.join(settings.roles)} to deploy to")
    return stages


Status = Literal["active", "benchmarked", "failed", "offline", "lost", "timed_out", "busy", "skipped"]


@dataclass
class DeviceOutcome:
    """What happened on one device."""

    device: str
    stage: str
    status: Status
    reason: str = ""
    flow_run_id: str | None = None
    result: DeviceResult | None = None          # what the device job returned (None: it returned nothing)
    rolled_back: bool | None = None             # None: not needed / not attempted
    seconds: float = 0.0                        # dispatch to end, as the orchestrator saw it

    def __post_init__(self) -> None:
        # DeviceOutcome(**outcome.to_dict()) round-trips through Prefect task results.
        if isinstance(self.result, dict):
            self.result = DeviceResult.model_validate(self.result)

    @property
    def ok(self) -> bool:
        return self.status in ("active", "benchmarked")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, the result included."""
        return {**asdict(self), "result": self.result.model_dump(mode="json") if self.result else None}


@dataclass
class RolloutReport:
    model: str
    version: str
    rollout_id: str
    outcomes: list[DeviceOutcome] = field(default_factory=list)
    stopped_by: str | None = None

    def add(self, outcome: DeviceOutcome) -> None:
        self.outcomes.append(outcome)
        if not outcome.ok and outcome.status != "skipped" and self.stopped_by is None:
            self.stopped_by = f"{outcome.device} ({outcome.stage}): {outcome.status}: {outcome.reason}"

    @property
    def passed(self) -> bool:
        return self.stopped_by is None and all(o.ok for o in self.outcomes)

    def summary(self) -> str:
        ok = sum(o.ok for o in self.outcomes)
        head = f"{self.model} v{self.version}: {ok} of {len(self.outcomes)} devices ok"
        return head if self.passed else f"{head}; rollout stopped by {self.stopped_by}"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "rollout_id": self.rollout_id,
                "passed": self.passed, "stopped_by": self.stopped_by, "summary": self.summary(),
                "outcomes": [o.to_dict() for o in self.outcomes]}

    def to_markdown(self) -> str:
        lines = [f"**Rollout {self.rollout_id}**: {' '.join(self.summary().split())}", "",
                 "| device | stage | status | backend | p50 ms (smallest batch) | rolled back | reason |",
                 "|---|---|---|---|---|---|---|"]
        for o in self.outcomes:
            lat = next(iter(o.result.latency.values()), None) if o.result else None
            lines.append(f"| {o.device} | {o.stage} | {o.status} | {o.result.backend if o.result else '-'} | "
                         f"{lat.p50_ms if lat else '-'} | {'-' if o.rolled_back is None else o.rolled_back} | "
                         f"{' '.join(o.reason.split()).replace('|', '/')[:300]} |")
        return "\n".join(lines) + "\n"


__all__ = [
    "DeviceJob", "DeviceOutcome", "DeviceResult", "JobError", "LatencyFigures", "ROLES", "RolloutReport",
    "RolloutSettings", "Stage", "job_for",
    "parse_job", "plan_stages",
]
