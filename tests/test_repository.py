"""A device's Triton model repository on real files: install, activate, rollback, crashes, locks.

Crashes and concurrency are real: subprocesses installing and activating, one of them
SIGKILLed mid-copy, and a subprocess holding the model's lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deploy.repository import (
    CONFIG_FILE,
    STATE_FILE,
    DeviceBusy,
    RepositoryError,
    activate,
    cleanup,
    device_root,
    install,
    is_alive,
    rollback,
    safe_join,
    served_version,
    status,
    validate_name,
)

REPO = Path(__file__).resolve().parents[1]
META = {
    "registry_name": "fmnist-lenet5-pfp",
    "registry_version": "7",
    "backend": "ort-cuda",
    "precision": "fp16",
    "latency": {"orin-gate-01": {"batch": 1, "p50_ms": 1.8, "p99_ms": 2.4}},
    "inputs": [{"name": "input", "dims": [-1, 1, 28, 28]}],
    "outputs": [{"name": "logits", "dims": [-1, 10]}],
}


def artifact(folder: Path, name: str, data: bytes) -> tuple[Path, str]:
    """A model file (bytes are enough: the repository copies and hashes, it does not parse)."""
    path = folder / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def put(root: Path, model: str, data: bytes, **kw) -> int:
    src, sha = artifact(root.parent, f"src-{hashlib.md5(data).hexdigest()[:8]}.onnx", data)
    return install(root, model, src, meta={**META, **kw.pop("meta", {})}, expected_sha256=sha, **kw)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (lock file aside: it records its last holder) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".pfp-lock"}


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A device's repository root; the artifacts to install are written beside it."""
    (tmp_path / "devices").mkdir()
    return device_root(tmp_path / "devices", "orin-gate-01")


def test_install_activate_rollback_round_trip(root: Path):
    assert put(root, "lenet", b"version one") == 1
    assert put(root, "lenet", b"version two") == 2
    assert not (root / "lenet" / CONFIG_FILE).exists()  # install does not activate

    state = activate(root, "lenet", 1)
    assert (state["active"], state["previous"]) == (1, None)
    state = activate(root, "lenet", 2)
    assert (state["active"], state["previous"]) == (2, 1)
    assert served_version(root / "lenet") == 2

    info = json.loads((root / "lenet" / "2" / "pfp.json").read_text())
    assert info["registry_name"] == "fmnist-lenet5-pfp" and info["registry_version"] == "7"
    assert info["sha256"] == hashlib.sha256(b"version two").hexdigest() == info["source_onnx_sha256"]
    assert info["backend"] == "ort-cuda" and info["precision"] == "fp16" and info["platform"] == "onnxruntime_onnx"
    assert info["latency"]["orin-gate-01"]["p50_ms"] == 1.8 and info["installed_at"]
    assert (root / "lenet" / "2" / "model.onnx").read_bytes() == b"version two"

    state = rollback(root, "lenet")
    assert (state["active"], state["previous"]) == (1, 2)
    assert served_version(root / "lenet") == 1
    assert (root / "lenet" / "2" / "model.onnx").is_file()  # rolled back from, still installed
    state = rollback(root, "lenet")  # a second rollback undoes the first
    assert (state["active"], state["previous"]) == (2, 1)
    assert [h["action"] for h in state["history"]] == ["install", "install", "activate", "activate",
                                                       "rollback", "rollback"]


def test_rollback_without_previous_is_one_line(root: Path):
    put(root, "lenet", b"only")
    activate(root, "lenet", 1)
    with pytest.raises(RepositoryError, match="no previous version") as e:
        rollback(root, "lenet")
    assert "\n" not in str(e.value)
    with pytest.raises(RepositoryError, match="no model 'absent'"):
        rollback(root, "absent")


def test_config_pbtxt_serves_only_the_active_version(root: Path):
    put(root, "lenet", b"a", meta={"max_batch_size": 0})
    put(root, "lenet", b"b")
    activate(root, "lenet", 2)
    text = (root / "lenet" / CONFIG_FILE).read_text()
    assert 'name: "lenet"' in text
    assert 'platform: "onnxruntime_onnx"' in text
    assert "max_batch_size: 0" in text
    assert "version_policy: { specific: { versions: [ 2 ] } }" in text
    assert 'name: "input"' in text and "dims: [ -1, 1, 28, 28 ]" in text and "data_type: TYPE_FP32" in text
    assert 'name: "logits"' in text and "dims: [ -1, 10 ]" in text
    # A TensorRT engine version switches the platform; batching comes from its meta.
    src, sha = artifact(root.parent, "engine.plan", b"serialized engine")
    v = install(root, "lenet", src, expected_sha256=sha,
                meta={**META, "backend": "tensorrt", "max_batch_size": 8,
                      "source_onnx_sha256": hashlib.sha256(b"b").hexdigest(),
                      "inputs": [{"name": "input", "dims": [1, 28, 28]}], "outputs": []})
    activate(root, "lenet", v)
    text = (root / "lenet" / CONFIG_FILE).read_text()
    assert 'platform: "tensorrt_plan"' in text and "max_batch_size: 8" in text and "output [" not in text
    assert f"versions: [ {v} ]" in text and (root / "lenet" / str(v) / "model.plan").is_file()


def test_tampered_artifact_refused_and_active_untouched(root: Path):
    put(root, "lenet", b"good one")
    activate(root, "lenet", 1)
    before = snapshot(root)
    src, sha = artifact(root.parent, "candidate.onnx", b"promoted bytes")
    src.write_bytes(b"promoted bytes, then changed")
    with pytest.raises(ValueError, match="does not match the expected") as e:
        install(root, "lenet", src, meta=META, expected_sha256=sha)
    assert str(src) in str(e.value) and "\n" not in str(e.value)
    assert snapshot(root) == before  # nothing written: no version, no temp folder, same state
    assert status(root)["lenet"]["active"] == 1

    # Nothing at all for a model not yet on the device: not even its folder.
    with pytest.raises(ValueError):
        install(root, "other", src, meta=META, expected_sha256=sha)
    assert not (root / "other").exists()


def test_changed_installed_version_is_not_activated(root: Path):
    put(root, "lenet", b"one")
    put(root, "lenet", b"two")
    activate(root, "lenet", 1)
    before = snapshot(root)
    (root / "lenet" / "2" / "model.onnx").write_bytes(b"bit rot")
    with pytest.raises(RepositoryError, match="was changed, not activated"):
        activate(root, "lenet", 2)
    after = snapshot(root)
    assert after.pop("lenet/2/model.onnx") == b"bit rot"
    before.pop("lenet/2/model.onnx")
    assert after == before and served_version(root / "lenet") == 1


@pytest.mark.parametrize("bad", ["a/b", "..", ".", "/etc", "", "../escape", "a\\b", "name\n", " lead",
                                 "-dash", "x" * 64, "sp ace"])
def test_unsafe_names_refused(tmp_path: Path, bad: str):
    with pytest.raises(ValueError) as e:
        validate_name(bad, "model name")
    assert "model name" in str(e.value) and repr(bad) in str(e.value)
    root = tmp_path / "repo"
    src, sha = artifact(tmp_path, "m.onnx", b"x")
    with pytest.raises(ValueError, match="model name"):
        install(root, bad, src, meta=META, expected_sha256=sha)
    with pytest.raises(ValueError, match="model name"):
        activate(root, bad, 1)
    with pytest.raises(ValueError, match="device name"):
        device_root(tmp_path, bad)
    assert not root.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_good_names_and_safe_join(tmp_path: Path):
    for ok in ("a", "orin-gate-01", "resnet56_pfp.v2", "X" * 63):
        assert validate_name(ok, "model name") == ok
    root = tmp_path / "repo"
    root.mkdir()
    assert safe_join(root, "m", "1") == (root / "m" / "1").resolve()
    for parts in (("..",), ("m", "..", ".."), ("/etc",), ("",)):
        with pytest.raises(ValueError):
            safe_join(root, *parts)
    (root / "link").symlink_to(tmp_path)  # a symlink out of the root is an escape too
    with pytest.raises(ValueError, match="escapes"):
        safe_join(root, "link", "x")


def test_versions_are_numbers_and_never_reused(root: Path):
    assert put(root, "lenet", b"v5", version=5) == 5
    assert put(root, "lenet", b"next") == 6
    with pytest.raises(RepositoryError, match="already installed"):
        put(root, "lenet", b"again", version=5)
    for bad in (0, -1, True, "3"):
        with pytest.raises(ValueError, match="positive integer"):
            put(root, "lenet", b"bad", version=bad)
    assert put(root, "lenet", b"seven") == 7
    activate(root, "lenet", 5)
    assert cleanup(root, "lenet", keep=0)["removed_versions"] == [6, 7]
    # 6 and 7 are gone but not forgotten: a new install is 8, not 6 again.
    assert put(root, "lenet", b"eight") == 8
    assert sorted(p.name for p in (root / "lenet").iterdir() if p.name[0].isdigit()) == ["5", "8"]


def test_meta_errors_are_one_line(root: Path):
    src, sha = artifact(root.parent, "m.onnx", b"x")
    with pytest.raises(RepositoryError, match=r"field 'backnd': unknown key"):
        install(root, "lenet", src, meta={**META, "backnd": "x"}, expected_sha256=sha)
    with pytest.raises(RepositoryError, match="cannot be recorded as backend 'tensorrt'"):
        install(root, "lenet", src, meta={**META, "backend": "tensorrt"}, expected_sha256=sha)
    plan, plan_sha = artifact(root.parent, "m.plan", b"engine")
    with pytest.raises(RepositoryError, match="source_onnx_sha256"):
        install(root, "lenet", plan, meta={**META, "backend": "tensorrt"}, expected_sha256=plan_sha)
    with pytest.raises(RepositoryError, match="unknown model file type"):
        install(root, "lenet", artifact(root.parent, "m.bin", b"x")[0], meta=META, expected_sha256=sha)
    assert not (root / "lenet").exists()


def test_cleanup_keeps_active_previous_and_newest(root: Path):
    for i in range(1, 7):
        put(root, "lenet", f"v{i}".encode())
    activate(root, "lenet", 1)
    activate(root, "lenet", 2)
    out = cleanup(root, "lenet", keep=2)
    assert out == {"removed_versions": [3, 4], "removed_temp": []}
    st = status(root)["lenet"]
    assert [v["version"] for v in st["versions"]] == [1, 2, 5, 6] and st["active"] == 2


def test_crash_mid_install_leaves_active_and_a_leftover(root: Path, tmp_path: Path):
    put(root, "lenet", b"serving")
    activate(root, "lenet", 1)
    big = tmp_path / "big.onnx"
    size = 50 << 20
    with open(big, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    proc = subprocess.Popen(python(f"""
        from deploy.repository import install
        install({str(root)!r}, "lenet", {str(big)!r}, meta={META!r}, expected_sha256={sha!r})
    """), env=child_env(), cwd=REPO)
    mdir = root / "lenet"
    seen = -1
    deadline = time.monotonic() + 30
    try:
        # Kill it once its copy is under way: the temporary folder holds part of the file.
        while time.monotonic() < deadline and proc.poll() is None:
            for p in mdir.glob(".pfp-tmp-install-*/model.onnx"):
                try:
                    seen = p.stat().st_size
                except FileNotFoundError:
                    continue
                if seen > 0:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            if seen > 0:
                break
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()  # reaped: its pid is gone, so status calls its folder a leftover
    assert proc.returncode == -signal.SIGKILL, f"the install finished (rc {proc.returncode}) before it was killed"
    assert 0 < seen < size
    (partial,) = mdir.glob(".pfp-tmp-install-v2-*/model.onnx")
    assert partial.stat().st_size < size  # killed mid-copy, not after it

    st = status(root)["lenet"]
    assert (st["active"], st["serving"], st["in_sync"]) == (1, 1, True)
    assert [v["version"] for v in st["versions"]] == [1]  # no half version 2
    assert len(st["leftovers"]) == 1 and st["leftovers"][0].startswith(".pfp-tmp-install-v2-")
    assert st["in_progress"] == []
    # The killed deploy's lock died with it: cleanup gets the lock and removes the leftover.
    out = cleanup(root, "lenet")
    assert out["removed_temp"] == st["leftovers"] and out["removed_versions"] == []
    st = status(root)["lenet"]
    assert st["leftovers"] == [] and st["active"] == 1 and not list(mdir.glob(".pfp-tmp-*"))
    assert put(root, "lenet", b"after the crash") == 2


ACTIVATE_CHILD = """
    import json, sys, time
    from deploy.repository import DeviceBusy, activate
    root, version, start, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    while time.time() < start:  # all children go at once
        pass
    try:
        activate(root, "lenet", version, lock_wait_s=wait)
        print(json.dumps({"version": version, "ok": True}))
    except DeviceBusy as e:
        print(json.dumps({"version": version, "ok": False, "error": str(e)}))
"""


@pytest.mark.parametrize("wait_s", [0.0, 10.0], ids=["no-wait", "wait"])
def test_concurrent_activations_do_not_interleave(root: Path, wait_s: float):
    for i in range(1, 5):
        put(root, "lenet", os.urandom(4 << 20))  # a few MB: each activation hashes its file
    activate(root, "lenet", 1)
    start = time.time() + 1.0
    procs = [subprocess.Popen([*python(ACTIVATE_CHILD), str(root), str(v), str(start), str(wait_s)],
                              env=child_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
             for v in (2, 3, 4)]
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    won = [r["version"] for r in results if r["ok"]]
    for r in results:
        if not r["ok"]:
            assert r["error"].startswith("device busy: another deploy holds ") and ".pfp-lock" in r["error"]
    assert won, results
    if wait_s:
        assert sorted(won) == [2, 3, 4]  # waiting, each got its turn

    # Consistent whatever the order: the activations form one chain, each one's previous
    # the one before it, and config.pbtxt serves the last.
    state = json.loads((root / "lenet" / STATE_FILE).read_text())
    chain = [h for h in state["history"] if h["action"] == "activate"]
    assert sorted(h["version"] for h in chain[1:]) == sorted(won)
    for before, after in zip(chain, chain[1:]):
        assert after["previous"] == before["version"]
    assert (state["active"], state["previous"]) == (chain[-1]["version"], chain[-2]["version"])
    assert served_version(root / "lenet") == state["active"]
    assert status(root)["lenet"]["in_sync"]


def test_device_busy_while_another_process_holds_the_lock(root: Path):
    put(root, "lenet", b"one")
    put(root, "lenet", b"two")
    activate(root, "lenet", 1)
    holder = subprocess.Popen(python(f"""
        import sys, time
        from deploy.repository import model_lock
        with model_lock({str(root)!r}, "lenet"):
            print("held", flush=True)
            sys.stdin.readline()
    """), env=child_env(), cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(DeviceBusy) as e:
            activate(root, "lenet", 2, lock_wait_s=0.3)
        assert time.monotonic() - t0 >= 0.3
        lockfile = root / "lenet" / ".pfp-lock"
        assert str(e.value).startswith(f"device busy: another deploy holds {lockfile}")
        assert f"pid {holder.pid}" in str(e.value) and "\n" not in str(e.value)
        assert served_version(root / "lenet") == 1
    finally:
        holder.communicate("\n", timeout=30)
    assert activate(root, "lenet", 2, lock_wait_s=0.3)["active"] == 2


def test_status_is_json_ready_and_flags_a_half_done_activation(root: Path):
    assert status(root) == {}
    put(root, "lenet", b"one")
    put(root, "lenet", b"two")
    put(root, "resnet", b"r1", meta={"registry_name": "cifar-resnet56"})
    activate(root, "lenet", 1)
    st = status(root)
    assert json.loads(json.dumps(st)) == st
    assert set(st) == {"lenet", "resnet"}
    assert st["resnet"]["active"] is None and st["resnet"]["versions"][0]["registry_name"] == "cifar-resnet56"
    assert st["lenet"]["platform"] == "onnxruntime_onnx" and st["lenet"]["problems"] == []

    # A crash between the state and config.pbtxt: the state is ahead of what Triton serves.
    config = (root / "lenet" / CONFIG_FILE).read_bytes()
    activate(root, "lenet", 2)
    (root / "lenet" / CONFIG_FILE).write_bytes(config)
    st = status(root)["lenet"]
    assert (st["active"], st["serving"], st["in_sync"]) == (2, 1, False)
    assert any("serves version 1" in p for p in st["problems"])
    state = activate(root, "lenet", 2)  # running it again completes it, previous kept
    assert (state["active"], state["previous"]) == (2, 1) and status(root)["lenet"]["in_sync"]


def test_deactivate_serves_nothing_and_rollback_restores(tmp_path):
    from deploy.repository import deactivate

    root = tmp_path / "repo"
    v1 = put(root, "m", b"one")
    activate(root, "m", v1)
    state = deactivate(root, "m")
    assert (state["active"], state["previous"]) == (None, v1)
    assert not (root / "m" / CONFIG_FILE).exists() and served_version(root / "m") is None
    st = status(root)["m"]
    assert st["in_sync"] and st["problems"] == [] and st["active"] is None
    assert rollback(root, "m")["active"] == v1
    assert served_version(root / "m") == v1
    with pytest.raises(RepositoryError, match="no model 'nope'"):
        deactivate(root, "nope")


def test_is_alive_running_zombie_and_reaped():
    import psutil

    assert not is_alive(None)
    proc = subprocess.Popen(python("import sys; sys.stdin.read()"), stdin=subprocess.PIPE)
    try:
        assert is_alive(proc.pid)
        proc.stdin.close()  # it exits; not reaped yet, so its pid is a zombie
        deadline = time.monotonic() + 30
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
        assert not is_alive(proc.pid)  # it writes nothing any more: its folders are leftovers
    finally:
        proc.wait(timeout=30)
    assert not is_alive(proc.pid)
