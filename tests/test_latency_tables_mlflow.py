"""Latency tables copied through MLflow (flows.latency_tables): a real sqlite store, a real table
built on ONNX Runtime; what one host pushes another pulls and uses, and only for its machine key."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn as nn
from mlflow import MlflowClient

from export.latency import LatencySettings
from export.latency_table import GridSettings, build_latency_table, machine_key
from export.machine import describe_machine
from flows.config import PipelineConfig
from flows.latency_tables import KEY_TAG, TABLES_EXPERIMENT, pull_tables, push_tables
from flows.steps import latency_cache_dir
from flows.tracking import setup_mlflow
from pfp.config import LatencyTargetConfig
from pfp.files import stable_hash

pytest.importorskip("onnxruntime")
# Known-harmless: MLflow's sqlalchemy store itself uses the deprecated `noload` strategy.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

FAST = LatencySettings(warmup=1, warmup_s=0.0, min_iters=3, max_iters=20, min_time_s=0.0, max_time_s=0.05)
GRID = GridSettings(dense_upto=4, coarse_points=4, max_points=6, negligible=0.0)
SPEC = LatencyTargetConfig(backend="ort-cpu", batch=1, threads=1)
FILES = 3  # two blocks, and the ratios of the groups timed in the whole model


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


X = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _build(cache: Path, machine: dict):
    torch.manual_seed(0)
    return build_latency_table(Tiny().eval(), X, SPEC, cache_dir=cache, grid=GRID, block_settings=FAST,
                               model_settings=FAST, machine=machine)


@pytest.fixture(scope="module")
def here() -> dict:
    return describe_machine()


@pytest.fixture(scope="module")
def other(here) -> dict:
    return {**here, "cpu": {**(here.get("cpu") or {}), "model": "Other CPU"}}


@pytest.fixture(scope="module")
def built(tmp_path_factory, here):
    """This machine's table, measured once: its cache folder and the table."""
    cache = tmp_path_factory.mktemp("built_here")
    table = _build(cache, here)
    assert table.cached_blocks == 0 and len(table.blocks) == 2
    return cache, table


@pytest.fixture
def store(tmp_path):
    """A fresh sqlite store, set up as the compress flow does (its own experiment active)."""
    experiment_id = setup_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", "compress")
    yield experiment_id
    mlflow.set_tracking_uri(None)


def test_a_pushed_table_is_pulled_and_used_by_another_host(built, here, store, tmp_path):
    cache, table = built
    fresh = tmp_path / "fresh"
    assert pull_tables(fresh, machine=here) == 0  # no tables experiment yet: nothing, not an error

    assert push_tables(cache, machine=here) == FILES
    assert push_tables(cache, machine=here) == 0  # already there
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(TABLES_EXPERIMENT).experiment_id])
    assert len(runs) == 1 and runs[0].data.tags[KEY_TAG] == stable_hash(machine_key(here))
    with mlflow.start_run() as run:  # pushing did not switch the flow's experiment
        assert run.info.experiment_id == store

    assert pull_tables(fresh, machine=here) == FILES
    assert pull_tables(fresh, machine=here) == 0
    assert sorted(p.name for p in fresh.glob("*.json")) == sorted(p.name for p in cache.glob("*.json"))
    again = _build(fresh, here)
    assert again.cached_blocks == len(again.blocks) == 2  # read, not re-measured: only rescaled to this moment
    assert again.in_context == table.in_context == sorted(table.blocks)  # the in-context ratios travelled too
    for name, b in again.blocks.items():
        assert b.counts == table.blocks[name].counts


def test_files_of_another_machine_are_neither_pushed_nor_pulled(built, here, other, store, tmp_path):
    cache, _ = built
    # a copy under this machine's file names whose content says another machine built it
    edited = tmp_path / "edited"
    edited.mkdir()
    for f in cache.glob("*.json"):
        d = json.loads(f.read_text())
        (edited / f.name).write_text(json.dumps({**d, "machine": machine_key(other)}))
    assert push_tables(edited, machine=here) == 0
    assert push_tables(cache, machine=other) == 0  # this machine's files, pushed as the other's

    # the other machine's own run: its files never reach this machine's cache
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for f in edited.glob("*.json"):
        shutil.copy(f, theirs / f"{f.stem}-other.json")
    assert push_tables(theirs, machine=other) == FILES
    assert push_tables(cache, machine=here) == FILES
    mine = tmp_path / "mine"
    assert pull_tables(mine, machine=here) == FILES
    assert all(json.loads(p.read_text())["machine"] == machine_key(here) for p in mine.glob("*.json"))

    # a file in this machine's run that says another machine built it is not pulled either
    client = MlflowClient()
    run_id = client.search_runs([client.get_experiment_by_name(TABLES_EXPERIMENT).experiment_id],
                                f"tags.`{KEY_TAG}` = '{stable_hash(machine_key(here))}'")[0].info.run_id
    stray = next(theirs.glob("*.json"))
    client.log_artifact(run_id, str(stray), "tables")
    assert pull_tables(mine, machine=here) == 0 and not (mine / stray.name).exists()
    assert pull_tables(tmp_path / "elsewhere", machine=other) == FILES


def test_the_flow_copies_tables_only_for_latency_targets_run_here(tmp_path):
    cfg = PipelineConfig(name="t", prune={"target": "latency", "latency": {"cache_dir": str(tmp_path)}})
    assert latency_cache_dir(cfg) == str(tmp_path)
    assert latency_cache_dir(PipelineConfig(name="t")) is None
    dispatched = cfg.model_copy(update={"dispatch": cfg.dispatch.model_copy(update={"iteration": "pfp-iteration/gpu"})})
    assert latency_cache_dir(dispatched) is None
