"""Latency tables in MLflow: a device class measures its blocks once, every host of it reuses them.

export.latency_table caches each block (and a model's ratios timed in context) as a JSON file
named by a hash of the block (or the model's blocks) and of the machine key. This module copies those files to and from experiment `pfp-latency-tables`: one
run per machine key, tagged `pfp.machine_key` (the key's hash), the files under `tables/`.
Only files recorded as built on the machine key are pushed or pulled, so a host never gets
another device class's timings. Uses the tracking URI already set (flows.tracking.setup_mlflow).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from export.latency_table import machine_key
from export.machine import describe_machine, machine_summary
from flows.tracking import ensure_experiment
from pfp.files import stable_hash, write_text_atomic

log = logging.getLogger(__name__)

TABLES_EXPERIMENT = "pfp-latency-tables"
KEY_TAG = "pfp.machine_key"
SUMMARY_TAG = "pfp.machine"
ARTIFACT_DIR = "tables"


def _recorded_machine(path: Path) -> dict | None:
    """The machine key a block file says it was built on; None if unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("machine") if isinstance(data, dict) else None


def _runs(client: MlflowClient, experiment_id: str, key_hash: str) -> list:
    # Oldest first: two hosts creating the key's run at once make two; every reader sees both.
    return client.search_runs([experiment_id], f"tags.`{KEY_TAG}` = '{key_hash}'",
                              order_by=["attributes.start_time ASC"])


def _logged(client: MlflowClient, run_id: str) -> set[str]:
    return {Path(f.path).name for f in client.list_artifacts(run_id, ARTIFACT_DIR) if f.path.endswith(".json")}


def pull_tables(cache_dir: str | Path, machine: dict | None = None) -> int:
    """Download this machine key's block files missing from `cache_dir`; how many were added.

    `machine`: a machine description (as build_latency_table's), None for this machine.
    """
    key = machine_key(describe_machine() if machine is None else machine)
    client = MlflowClient()
    exp = client.get_experiment_by_name(TABLES_EXPERIMENT)
    if exp is None:
        return 0
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    added = 0
    with tempfile.TemporaryDirectory(prefix="pfp-tables-") as tmp:
        for run in _runs(client, exp.experiment_id, stable_hash(key)):
            for name in sorted(_logged(client, run.info.run_id)):
                path = cache / name
                if path.exists():
                    continue
                with FileLock(str(path) + ".lock"):  # the builder's lock: never under a block being measured
                    if path.exists():
                        continue
                    local = download_artifacts(run_id=run.info.run_id, artifact_path=f"{ARTIFACT_DIR}/{name}",
                                               dst_path=tmp, tracking_uri=client.tracking_uri)
                    if _recorded_machine(Path(local)) != key:  # a run's tag does not vouch for every file in it
                        log.info("latency table %s in run %s not pulled: built on another machine",
                                 name, run.info.run_id)
                        continue
                    write_text_atomic(path, Path(local).read_text())
                    added += 1
    log.info("latency tables: %d block file(s) pulled from MLflow into %s", added, cache)
    return added


def push_tables(cache_dir: str | Path, machine: dict | None = None) -> int:
    """Log `cache_dir`'s block files built on this machine key and not yet in MLflow to the
    key's run (created when missing); how many were logged."""
    desc = describe_machine() if machine is None else machine
    key = machine_key(desc)
    key_hash = stable_hash(key)
    files = [p for p in sorted(Path(cache_dir).glob("*.json")) if _recorded_machine(p) == key]
    if not files:
        return 0
    client = MlflowClient()
    experiment_id = ensure_experiment(TABLES_EXPERIMENT, client)
    runs = _runs(client, experiment_id, key_hash)
    logged = set().union(*(_logged(client, r.info.run_id) for r in runs))
    new = [p for p in files if p.name not in logged]
    if not new:
        return 0
    if runs:
        run_id = runs[0].info.run_id
    else:
        summary = machine_summary(desc)
        run_id = client.create_run(experiment_id, run_name=f"latency tables: {summary}"[:250],
                                   tags={KEY_TAG: key_hash, SUMMARY_TAG: summary,
                                         "pfp.machine_key.json": json.dumps(key, sort_keys=True)[:5000]}).info.run_id
        # A store of files, not a job: finished at once, written to again by later pushes.
        client.set_terminated(run_id)
    with tempfile.TemporaryDirectory(prefix="pfp-tables-") as tmp:
        for p in new:  # one upload call for all of them
            shutil.copy2(p, Path(tmp) / p.name)
        client.log_artifacts(run_id, tmp, ARTIFACT_DIR)
    log.info("latency tables: %d block file(s) pushed to MLflow run %s", len(new), run_id)
    return len(new)
