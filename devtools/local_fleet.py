"""A fleet on one machine, for trying the edge path and for its tests: a real Prefect server
on 127.0.0.1 and one real process worker per device, each started as its own process with
its own device folder, as real devices would run them.

    with LocalFleet(tmp, devices=[("orin-canary-01", "jetson-orin"), ...], mlflow_uri=uri) as fleet:
        fleet.register_deployments()           # pfp-device-{deploy,rollback,status}/<pool>
        deploy_flow(...)                        # with PREFECT_API_URL = fleet.api_url
        fleet.kill_worker("orin-fleet-02")      # a device lost mid-job

Nothing here is a stand-in: `prefect server start` and `prefect worker start` are Prefect's
own commands; the only local thing is that every "device" is a folder on this machine.
A developer helper: devtools is not installed with the product (pyproject's package list).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

import psutil

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def _pinned(cores: set[int] | None):
    """A preexec_fn that pins the child (and everything it starts) to `cores`."""
    if not cores:
        return None
    return lambda: os.sched_setaffinity(0, cores)


def _descendants(pid: int) -> list[psutil.Process]:
    """Every live process below `pid`."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


class LocalFleet:
    """A Prefect server and per-device process workers as subprocesses (see module doc)."""

    def __init__(self, home: str | Path, devices: Sequence[tuple[str, str]], *, mlflow_uri: str,
                 port: int | None = None, poll_s: float = 1.0, extra_env: dict[str, dict[str, str]] | None = None,
                 startup_timeout_s: float = 180.0, cpus: dict[str, set[int]] | None = None) -> None:
        self.home = Path(home).resolve()
        self.devices = list(devices)
        self.mlflow_uri = mlflow_uri
        self.port = port or free_port()
        self.poll_s = poll_s
        self.extra_env = extra_env or {}
        self.startup_timeout_s = startup_timeout_s
        # CPU cores per device name ("server" for the Prefect server): on one machine, pinning
        # keeps one device's benchmark off the cores the rest of the fleet works on.
        self.cpus = cpus or {}
        self.server: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        """The environment for anything that talks to this fleet's server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({
            "PREFECT_HOME": str(self.home / "prefect"), "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": str(self.poll_s),
            "PREFECT_WORKER_PREFETCH_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO",
            "MLFLOW_TRACKING_URI": self.mlflow_uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
        })
        return env

    def device_root(self, device: str) -> Path:
        return self.home / "devices" / device

    # --------------------------------------------------------------- lifecycle

    def start(self) -> "LocalFleet":
        (self.home / "prefect").mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        log = open(self.home / "logs" / "server.log", "ab")
        self.server = subprocess.Popen(
            [_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_pinned(self.cpus.get("server")))
        self._wait_healthy()
        for pool in sorted({p for _, p in self.devices}):
            subprocess.run([_prefect(), "work-pool", "create", pool, "--type", "process", "--overwrite"],
                           env=self.env(), check=True, capture_output=True, timeout=120)
        for device, pool in self.devices:
            self.start_worker(device, pool)
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self.server.returncode}); see {self.home / 'logs'}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"prefect server did not answer on {self.api_url} within {self.startup_timeout_s:g} s")

    def start_worker(self, device: str, pool: str | None = None, *, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start (or restart) the device's worker: its own process group, folder and queue."""
        pool = pool or dict(self.devices)[device]
        root = self.device_root(device)
        root.mkdir(parents=True, exist_ok=True)
        env = self.env() | {"PFP_DEVICE_NAME": device, "PFP_DEVICE_ROOT": str(root)} | self.extra_env.get(device, {}) | (extra_env or {})
        log = open(self.home / "logs" / f"worker-{device}.log", "ab")
        self.workers[device] = subprocess.Popen(
            [_prefect(), "worker", "start", "--pool", pool, "--work-queue", device, "--type", "process",
             "--name", f"worker-{device}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO),
            preexec_fn=_pinned(self.cpus.get(device)))
        return self.workers[device]

    def kill_worker(self, device: str, sig: int = signal.SIGKILL) -> None:
        """Kill the device's worker and every job it runs: power loss. (Prefect starts each job
        in a process group of its own, so the worker's group alone would leave the jobs running.)"""
        p = self.workers.pop(device, None)
        if p is None:
            return
        doomed = _descendants(p.pid)
        _signal(p, sig)
        for child in doomed:
            try:
                child.send_signal(sig)  # psutil checks the pid still names that same process
            except psutil.NoSuchProcess:
                pass
        p.wait(timeout=30)

    def register_deployments(self) -> list[str]:
        """The device flows' deployments on every pool (in a subprocess talking to this server)."""
        pools = sorted({p for _, p in self.devices})
        code = ("import sys; from flows.device_flows import register_device_deployments as r; "
                f"print('DEPLOYMENTS', *r({pools!r}, {str(REPO)!r}))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env(), cwd=str(REPO), capture_output=True,
                             text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"registering deployments failed: {out.stderr.strip().splitlines()[-1:]}")
        return next(line.split()[1:] for line in out.stdout.splitlines() if line.startswith("DEPLOYMENTS "))

    def stop(self) -> None:
        """Workers first (SIGINT, then SIGKILL after 15 s), then the server."""
        procs = list(self.workers.values())
        self.workers.clear()
        for group in (procs, [self.server] if self.server else []):
            for p in group:
                _signal(p, signal.SIGINT)
            deadline = time.monotonic() + 15
            for p in group:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal(p, signal.SIGKILL)
                    p.wait(timeout=10)
        self.server = None

    def __enter__(self) -> "LocalFleet":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def drain_prefect_clients() -> None:
    """Send what this process's Prefect log and event workers still hold, and stop them,
    before the fleet's server stops: left behind, they keep retrying a server that is gone,
    and the next Prefect test harness in the process waits on them for ever."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:
            pass  # never started
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


def register_demo_version(folder: str | Path, model_name: str, seed: int, *, arch: str = "lenet5",
                          input_size: int = 16, champion: bool = True) -> str:
    """Export a real bundle of a freshly initialised `arch` (weights from `seed`), log it to
    the active MLflow store, register it as a version of `model_name` (champion unless told
    otherwise); its version. For drills and tests of the edge path: real files, no training."""
    import mlflow
    import torch

    from deploy.gate import GateDecision
    from export.bundle import export_bundle
    from flows.registry import promote, register_candidate
    from flows.tracking import tracked_run
    from pfp.models import build_model
    from pfp.serialization import save_model

    torch.manual_seed(seed)
    spec = {"name": arch, "num_classes": 10, "in_channels": 1, "input_size": input_size}
    out = Path(folder) / f"{arch}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / "m.pt", build_model(**spec).eval(), spec)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 1, input_size, input_size, generator=g) for _ in range(2)]
    export_bundle(out / "m.pt", out / "bundle", batches, parity_samples=64, exporter="torchscript")
    with tracked_run(f"{arch} bundle, seed {seed}") as run:
        mlflow.log_artifacts(str(out / "bundle"), "bundle")
    v = register_candidate(model_name, run.info.run_id, "bundle", {})
    if champion:
        promote(model_name, v.version, GateDecision(passed=True, checks=[]))
    return v.version


__all__ = ["LocalFleet", "drain_prefect_clients", "free_port", "register_demo_version"]


def main(argv: Sequence[str] | None = None) -> None:
    """Try the edge path on this machine: deploy a registered model to a local fleet.

        make quickstart && .venv/bin/python -m devtools.local_fleet --devices 3
    """
    import argparse
    import json
    import tempfile

    import yaml

    ap = argparse.ArgumentParser(description="Deploy a registered model to a fleet of local Prefect workers.")
    ap.add_argument("--model", default="quickstart", help="registered model name (default: the quickstart's)")
    ap.add_argument("--version", default=None, help="registered version (default: the champion)")
    ap.add_argument("--mlflow", default=f"sqlite:///{Path('runs/mlflow.db').resolve()}", help="MLflow tracking URI")
    ap.add_argument("--devices", type=int, default=3, help="workers to start: one canary, the rest fleet")
    ap.add_argument("--home", default=None, help="folder for the server, logs and device folders (default: temporary)")
    args = ap.parse_args(argv)

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy_flow import RolloutStopped, deploy_flow
    from flows.tracking import check_tracking_server

    check_tracking_server(args.mlflow)
    home = Path(args.home or tempfile.mkdtemp(prefix="pfp-fleet-")).resolve()
    names = [f"edge-{i + 1:02d}" for i in range(args.devices)]
    targets = home / "targets.yaml"
    home.mkdir(parents=True, exist_ok=True)
    targets.write_text(yaml.safe_dump({"targets": [
        {"name": n, "work_pool": "edge-local", "role": "canary" if i == 0 else "fleet", "batch_sizes": [1, 8]}
        for i, n in enumerate(names)]}))
    with LocalFleet(home, [(n, "edge-local") for n in names], mlflow_uri=args.mlflow) as fleet:
        fleet.register_deployments()
        print(f"Prefect server {fleet.api_url} (UI: {fleet.api_url[:-4]}), {args.devices} workers; logs in {home / 'logs'}")
        with temporary_settings(updates={PREFECT_API_URL: fleet.api_url}):
            try:
                report = deploy_flow(str(targets), args.model, version=args.version, tracking_uri=args.mlflow,
                                     settings={"max_time_s": 1.0})
            except RolloutStopped as e:
                report = e.report
            finally:
                drain_prefect_clients()
    print(json.dumps({o["device"]: {"status": o["status"], "reason": o["reason"],
                                    "latency": (o.get("result") or {}).get("latency")} for o in report["outcomes"]},
                     indent=2))
    print(f"{report['summary']}; model repositories under {home / 'devices'}")


if __name__ == "__main__":
    main()
