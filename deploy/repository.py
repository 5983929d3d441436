"""A device's model repository, laid out as a Triton Inference Server model repository.

    <root>/<model>/config.pbtxt          what Triton serves: platform, I/O, version_policy
    <root>/<model>/<N>/model.onnx        (platform onnxruntime_onnx)  or  model.plan (tensorrt_plan)
    <root>/<model>/<N>/pfp.json          what version N is: registry name+version, sha256s, backend, ...
    <root>/<model>/pfp-state.json        active and previous version, and a short history
    <root>/<model>/.pfp-lock             the per-model lock (filelock.FileLock: flock(2) on Linux)
    <root>/<model>/.pfp-tmp-*            versions being written, or left by a crash

Which version is active: ``pfp-state.json`` records the decision (active, previous) and
``config.pbtxt`` carries it out: its ``version_policy: { specific: { versions: [N] } }``
names exactly the active version, so Triton serves that one and no other, whatever other
numbered folders (candidates, the previous version kept for rollback) lie beside it. There
is no separate ACTIVE pointer file: a third file would be one more thing to disagree.
`activate` writes the state first and config.pbtxt second, each atomically (temporary file
in the same folder, fsync, os.replace). A crash between the two leaves the state ahead of
what Triton serves; `status` shows that (``serving`` != ``active``, ``in_sync`` false) and
running the same `activate` again completes it, because re-activating the active version
keeps `previous` and only rewrites config.pbtxt. Writing config.pbtxt first would instead
leave Triton on a version the state does not know, and a rollback would then skip it.

Versions are immutable folders: `install` verifies the artifact's sha256 before anything is
written, copies it (hashing again while copying) into a temporary folder in the model's
folder, fsyncs, and renames the folder to its number in one step, so a reader (Triton
polling the repository, `status`) sees a version whole or not at all. Triton ignores
folders whose names are not numbers, so the temporary ones are invisible to it. Version
numbers are never reused: the default is one past the highest ever installed (recorded in
the state), so a number names one artifact for good, in logs and in Triton's metrics.

Every change to a model (install, activate, rollback, cleanup) holds the model's lock, an
exclusive ``filelock.FileLock`` on ``.pfp-lock`` (flock(2) underneath), waited for a short
while and then refused with "device busy: another deploy holds <lockfile>". The kernel drops the lock
when its holder dies, SIGKILL included, so whoever holds the lock knows that no other
deploy is writing in that model's folder: every temporary folder it finds there is a crash
leftover, and `cleanup` removes them (not only those older than the current process, which
would miss a crash of a deploy started after it). `status` takes no lock (readers never
wait); it calls a temporary folder a leftover when the process named in it is gone, and
"in progress" otherwise. flock needs a local file system (the repository is on the device).

Names that become paths (device, model) pass `validate_name`, and every path is built with
`safe_join`, which refuses anything that would resolve outside the repository root.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal

import psutil
from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deploy.errors import DeployError
from pfp.config import format_validation_error
from pfp.files import fsync_dir, write_text_atomic

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")  # Triton ignores folders named 0 or with leading zeros
_SHA_RE = re.compile(r"[0-9a-f]{64}")

CONFIG_FILE = "config.pbtxt"
STATE_FILE = "pfp-state.json"
VERSION_META = "pfp.json"
LOCK_FILE = ".pfp-lock"
TMP_PREFIX = ".pfp-tmp-"
STATE_FORMAT = "pfp-repository-state/1"
VERSION_FORMAT = "pfp-repository-version/1"
LOCK_WAIT_S = 2.0
HISTORY_KEPT = 50

# Artifact suffix -> (file name in the version folder, Triton platform, backends that run it).
_PLATFORMS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    ".onnx": ("model.onnx", "onnxruntime_onnx", ("ort-cpu", "ort-cuda")),
    ".plan": ("model.plan", "tensorrt_plan", ("tensorrt",)),
    ".engine": ("model.plan", "tensorrt_plan", ("tensorrt",)),
}
_MODEL_FILES = {name for name, _, _ in _PLATFORMS.values()}
# Temporary files of pfp.files.atomic_path for the two files written here.
_ATOMIC_TMP_RE = re.compile(rf"\.({re.escape(CONFIG_FILE)}|{re.escape(STATE_FILE)})\.\d+\.[0-9a-f]+\.tmp")


class RepositoryError(DeployError, ValueError):
    """A repository operation that cannot be done; one line saying why."""


class DeviceBusy(RepositoryError):
    """Another deploy holds the model's lock."""


# --- names and paths -------------------------------------------------------------------


def validate_name(name: str, what: str) -> str:
    """`name` if it is safe as one path component (device, model); ValueError naming `what` otherwise.

    Allowed: a letter or digit, then up to 62 letters, digits, '_', '.', '-'. So no
    separators, no traversal, no absolute paths, no empty or whitespace names.
    """
    if not isinstance(name, str):
        raise RepositoryError(f"{what} {name!r} is not a string")
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise RepositoryError(f"{what} {name!r} is not allowed: it must be one folder name, not a path")
    # fullmatch, not match + '$': '$' also matches before a trailing newline.
    if not _NAME_RE.fullmatch(name):
        raise RepositoryError(f"{what} {name!r} is not allowed: it must match ^{NAME_PATTERN}$")
    return name


def safe_join(root: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """`root` / parts, resolved; ValueError if a part is absolute or empty, or the result
    (after '..' and symlinks) is outside `root`."""
    base = Path(root).resolve()
    for part in parts:
        text = os.fspath(part)
        if not text or os.path.isabs(text):
            raise RepositoryError(f"path part {text!r} under {base} is empty or absolute")
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        raise RepositoryError(f"path {os.path.join(*map(os.fspath, parts))!r} escapes the repository root {base}")
    return target


def device_root(base: str | os.PathLike, device: str) -> Path:
    """The repository root of `device` under `base` (one folder per device)."""
    return safe_join(base, validate_name(device, "device name"))


def model_dir(root: str | os.PathLike, model_name: str) -> Path:
    """The folder of `model_name` under the repository `root` (the name checked, the path kept inside)."""
    return safe_join(root, validate_name(model_name, "model name"))


def _check_version(version: Any) -> int:
    # bool is an int subclass; True would become version 1 silently.
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RepositoryError(f"version {version!r} is not a positive integer (Triton needs numeric version folders)")
    if not _VERSION_RE.fullmatch(str(version)):
        raise RepositoryError(f"version {version} is too large")
    return version


# --- what a version says about itself --------------------------------------------------


class TensorSpec(BaseModel):
    """One input or output of the model, as config.pbtxt declares it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    data_type: Literal["TYPE_FP32", "TYPE_FP16", "TYPE_INT8", "TYPE_UINT8", "TYPE_INT32", "TYPE_INT64",
                       "TYPE_BOOL"] = "TYPE_FP32"
    dims: list[int] = Field(min_length=1, description="-1 for a dynamic axis; without the batch axis "
                                                      "when max_batch_size > 0")

    @field_validator("dims")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d == 0 or d < -1 for d in v):
            raise ValueError(f"dims {v}: each must be positive or -1")
        return v


class VersionMeta(BaseModel):
    """The `meta` that `install` takes: what the artifact is and where it came from."""

    model_config = ConfigDict(extra="forbid")

    registry_name: str = Field(min_length=1, description="registered model name (MLflow)")
    registry_version: str = Field(min_length=1, description="registered model version")
    backend: Literal["ort-cpu", "ort-cuda", "tensorrt"]
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    source_onnx_sha256: str | None = Field(None, description="the ONNX file the artifact is or was built "
                                                             "from; required for an engine")
    latency: dict[str, Any] | list[dict[str, Any]] | None = Field(None, description="latency figures, as measured")
    max_batch_size: int = Field(0, ge=0, description="0: no batching by Triton; dims include the batch axis")
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    engine: dict[str, Any] | None = Field(None, description="TensorRT engine record (export.engine_record)")
    reference_check: dict[str, Any] | None = Field(None, description="the device's check against the "
                                                                     "bundle's reference outputs")

    @field_validator("registry_version", mode="before")
    @classmethod
    def _version_text(cls, v: Any) -> Any:
        # MLflow gives versions as strings of digits; callers may hold them as ints.
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("source_onnx_sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not _SHA_RE.fullmatch(v.lower()):
            raise ValueError(f"{v!r} is not a hex sha256")
        return v.lower() if v else v


def _platform_of(artifact: Path, backend: str) -> tuple[str, str]:
    """(file name in the version folder, Triton platform) for `artifact`, checked against `backend`."""
    try:
        file_name, platform, backends = _PLATFORMS[artifact.suffix.lower()]
    except KeyError:
        raise RepositoryError(f"{artifact}: unknown model file type {artifact.suffix!r}; "
                              f"expected one of {', '.join(_PLATFORMS)}") from None
    if backend not in backends:
        # The record would lie: Triton runs this file with `platform`, not with `backend`.
        raise RepositoryError(f"{artifact}: a {platform} model cannot be recorded as backend {backend!r} "
                              f"(expected {' or '.join(backends)})")
    return file_name, platform


# --- the lock --------------------------------------------------------------------------


@contextlib.contextmanager
def model_lock(root: str | os.PathLike, model_name: str, *, wait_s: float = LOCK_WAIT_S) -> Iterator[Path]:
    """Hold the model's lock for the block (creating the model folder); DeviceBusy after `wait_s`."""
    mdir = model_dir(root, model_name)
    mdir.mkdir(parents=True, exist_ok=True)
    path = mdir / LOCK_FILE
    # preserve_lock_file keeps the native flock and never falls back to a soft (pid-file)
    # lock, which a SIGKILLed holder would leave behind: the kernel must drop a dead one's lock.
    lock = FileLock(path, timeout=max(0.0, wait_s), poll_interval=0.02, preserve_lock_file=True,
                    on_acquired=_write_holder)
    try:
        lock.acquire()
    except Timeout:
        raise DeviceBusy(f"device busy: another deploy holds {path}{_holder(path)}") from None
    try:
        yield mdir
    finally:
        lock.release()


def _write_holder(fd: int) -> None:
    # Who holds it, for the busy message of the next one; informative only.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)


def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")[:200].strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


# --- state -----------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RepositoryError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise RepositoryError(f"{path}: not a JSON object")
    return data


def read_state(mdir: Path) -> dict:
    """The model folder's pfp-state.json (an empty state when there is none yet); RepositoryError if unreadable."""
    path = mdir / STATE_FILE
    if not path.exists():
        return {"format": STATE_FORMAT, "model_name": mdir.name, "active": None, "previous": None,
                "last_installed": None, "history": []}
    state = _read_json(path)
    if state.get("format") != STATE_FORMAT:
        raise RepositoryError(f"{path}: format is not {STATE_FORMAT!r}")
    return state


def _write_state(mdir: Path, state: dict) -> None:
    state["updated_at"] = _now()
    state["history"] = state.get("history", [])[-HISTORY_KEPT:]
    write_text_atomic(mdir / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _versions_on_disk(mdir: Path) -> list[int]:
    if not mdir.is_dir():
        return []
    return sorted(int(p.name) for p in mdir.iterdir() if p.is_dir() and _VERSION_RE.fullmatch(p.name))


def read_version_meta(mdir: Path, version: int) -> dict:
    """Version `version`'s pfp.json record in the model folder `mdir`; RepositoryError if missing or not one."""
    vdir = mdir / str(version)
    if not vdir.is_dir():
        raise RepositoryError(f"{vdir}: version {version} of {mdir.name} is not installed")
    meta = _read_json(vdir / VERSION_META)
    if meta.get("format") != VERSION_FORMAT or meta.get("file") not in _MODEL_FILES:
        raise RepositoryError(f"{vdir / VERSION_META}: not a {VERSION_FORMAT} record")
    return meta


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# --- install ---------------------------------------------------------------------------


def install(
    root: str | os.PathLike,
    model_name: str,
    artifact: str | os.PathLike,
    *,
    version: int | None = None,
    meta: dict,
    expected_sha256: str,
    lock_wait_s: float = LOCK_WAIT_S,
) -> int:
    """Install `artifact` (.onnx, or a TensorRT .plan/.engine) as a new version of `model_name`.

    The artifact must match `expected_sha256` (checked before anything is written; a
    mismatch is a ValueError naming the file). `meta` is a VersionMeta as a dict. The
    version is `version`, or one past the highest ever installed; it must not exist yet.
    The version is not activated. Returns the version number.
    """
    artifact = Path(artifact)
    mdir = model_dir(root, model_name)
    if version is not None:
        _check_version(version)
    try:
        info = VersionMeta.model_validate(meta)
    except ValidationError as e:
        raise RepositoryError(format_validation_error(e, f"install {model_name}: meta")) from None
    file_name, platform = _platform_of(artifact, info.backend)
    want = str(expected_sha256).lower()
    if not _SHA_RE.fullmatch(want):
        raise RepositoryError(f"expected_sha256 {expected_sha256!r} is not a hex sha256")
    if not artifact.is_file():
        raise RepositoryError(f"{artifact}: artifact not found")
    if platform == "tensorrt_plan" and info.source_onnx_sha256 is None:
        raise RepositoryError(f"{artifact}: a TensorRT engine needs meta source_onnx_sha256 (the ONNX it was built from)")
    got = _sha256_file(artifact)
    if got != want:
        raise RepositoryError(f"{artifact}: sha256 {got[:12]}… does not match the expected {want[:12]}…; "
                              "not installed (the file was changed or is not the one promoted)")

    with model_lock(root, model_name, wait_s=lock_wait_s):
        state = read_state(mdir)
        on_disk = _versions_on_disk(mdir)
        if version is None:
            version = max([*on_disk, state.get("last_installed") or 0]) + 1
        elif version in on_disk:
            raise RepositoryError(f"{mdir / str(version)}: version {version} of {model_name} is already "
                                  "installed; versions are immutable, install a new one")
        vdir = mdir / str(version)
        tmp = mdir / f"{TMP_PREFIX}install-v{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            copied = _copy_hashing(artifact, tmp / file_name)
            if copied != want:
                # The artifact changed between the check and the copy.
                raise RepositoryError(f"{artifact}: changed while being installed (sha256 {copied[:12]}… "
                                      f"!= {want[:12]}…); not installed")
            record = {
                "format": VERSION_FORMAT,
                "model_name": model_name,
                "version": version,
                "file": file_name,
                "sha256": copied,
                "platform": platform,
                **info.model_dump(mode="json", exclude={"source_onnx_sha256"}),
                "source_onnx_sha256": info.source_onnx_sha256 or (copied if platform == "onnxruntime_onnx" else None),
                "artifact": str(artifact),
                "installed_at": _now(),
            }
            with open(tmp / VERSION_META, "x") as f:
                f.write(json.dumps(record, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            # os.rename onto an existing *empty* folder succeeds on Linux; the lock and
            # this check make sure there is none.
            if vdir.exists():
                raise RepositoryError(f"{vdir}: exists; not installed")
            os.rename(tmp, vdir)
            fsync_dir(mdir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        state["last_installed"] = max(version, state.get("last_installed") or 0)
        state["history"] = [*state.get("history", []), {"action": "install", "version": version, "at": _now()}]
        _write_state(mdir, state)
    return version


def _copy_hashing(src: Path, dst: Path) -> str:
    """Copy `src` to the new file `dst` (fsynced); the sha256 of the bytes written."""
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while block := fin.read(1 << 20):
            h.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


# --- activate and roll back ------------------------------------------------------------


def activate(
    root: str | os.PathLike,
    model_name: str,
    version: int,
    *,
    verify: bool = True,
    lock_wait_s: float = LOCK_WAIT_S,
) -> dict:
    """Make `version` the one Triton serves; the active one so far becomes `previous`.

    With `verify`, the version's model file must still match its pfp.json sha256.
    Activating the active version again keeps `previous` and rewrites config.pbtxt (which
    completes an activation cut short by a crash). Returns the new state.
    """
    _check_version(version)
    mdir = model_dir(root, model_name)
    if not mdir.is_dir():
        raise RepositoryError(f"{mdir}: no model {model_name!r} in the repository")
    with model_lock(root, model_name, wait_s=lock_wait_s):
        return _activate_locked(mdir, version, "activate", verify)


def rollback(root: str | os.PathLike, model_name: str, *, lock_wait_s: float = LOCK_WAIT_S) -> dict:
    """Re-activate the previous version; the one rolled back from stays installed and becomes
    `previous` (so a second rollback undoes the first). Returns the new state."""
    mdir = model_dir(root, model_name)
    if not mdir.is_dir():
        raise RepositoryError(f"{mdir}: no model {model_name!r} in the repository")
    with model_lock(root, model_name, wait_s=lock_wait_s):
        state = read_state(mdir)
        previous = state.get("previous")
        if previous is None:
            raise RepositoryError(f"{mdir / STATE_FILE}: {model_name} has no previous version to roll back to "
                                  f"(active: {state.get('active')})")
        return _activate_locked(mdir, previous, "rollback", verify=True)


def deactivate(root: str | os.PathLike, model_name: str, *, lock_wait_s: float = LOCK_WAIT_S) -> dict:
    """Serve no version of `model_name` (config.pbtxt removed; the active one becomes
    `previous`, so a rollback re-activates it). For a first version that failed its check."""
    mdir = model_dir(root, model_name)
    if not mdir.is_dir():
        raise RepositoryError(f"{mdir}: no model {model_name!r} in the repository")
    with model_lock(root, model_name, wait_s=lock_wait_s):
        state = read_state(mdir)
        if state.get("active") is not None:
            state["previous"], state["active"] = state["active"], None
        state["history"] = [*state.get("history", []), {"action": "deactivate", "previous": state["previous"],
                                                        "at": _now()}]
        # State first, as in activate: a crash in between leaves status saying "run it again".
        _write_state(mdir, state)
        (mdir / CONFIG_FILE).unlink(missing_ok=True)
        fsync_dir(mdir)
        return state


def _activate_locked(mdir: Path, version: int, action: str, verify: bool) -> dict:
    meta = read_version_meta(mdir, version)
    model_file = mdir / str(version) / meta["file"]
    if verify:
        if not model_file.is_file():
            raise RepositoryError(f"{model_file}: missing; version {version} cannot be activated")
        got = _sha256_file(model_file)
        if got != meta.get("sha256"):
            raise RepositoryError(f"{model_file}: sha256 {got[:12]}… does not match {VERSION_META} "
                                  f"({str(meta.get('sha256'))[:12]}…); the file was changed, not activated")
    state = read_state(mdir)
    if state.get("active") != version:
        state["previous"] = state.get("active")
        state["active"] = version
    state["history"] = [*state.get("history", []),
                        {"action": action, "version": version, "previous": state["previous"], "at": _now()}]
    # State first, then config.pbtxt: see the module docstring for why this order.
    _write_state(mdir, state)
    write_text_atomic(mdir / CONFIG_FILE, render_config(mdir.name, meta, version))
    return state


def _pb_string(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_config(model_name: str, meta: dict, version: int) -> str:
    """config.pbtxt serving exactly `version`, from that version's pfp.json `meta`."""
    lines = [
        f"# Written by pfp (deploy/repository.py); {STATE_FILE} records active and previous.",
        f"name: {_pb_string(model_name)}",
        f"platform: {_pb_string(meta['platform'])}",
        f"max_batch_size: {int(meta.get('max_batch_size') or 0)}",
        f"version_policy: {{ specific: {{ versions: [ {int(version)} ] }} }}",
    ]
    for section in ("input", "output"):
        tensors = meta.get(f"{section}s") or []
        if not tensors:
            continue  # Triton can read the interface from an ONNX file or engine itself
        lines.append(f"{section} [")
        for i, t in enumerate(tensors):
            lines += [
                "  {",
                f"    name: {_pb_string(t['name'])}",
                f"    data_type: {t.get('data_type', 'TYPE_FP32')}",
                f"    dims: [ {', '.join(str(int(d)) for d in t['dims'])} ]",
                "  }" + ("," if i < len(tensors) - 1 else ""),
            ]
        lines.append("]")
    return "\n".join(lines) + "\n"


_SERVED_RE = re.compile(r"^version_policy:\s*\{\s*specific:\s*\{\s*versions:\s*\[?\s*(\d+)", re.MULTILINE)


def served_version(model_dir: str | os.PathLike) -> int | None:
    """The version config.pbtxt tells Triton to serve (None: no config, or not one specific version)."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        match = _SERVED_RE.search(path.read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


# --- status and cleanup ----------------------------------------------------------------


def _temp_entries(mdir: Path) -> list[Path]:
    return sorted(p for p in mdir.iterdir() if p.name.startswith(TMP_PREFIX) or _ATOMIC_TMP_RE.fullmatch(p.name))


def _owner_pid(name: str) -> int | None:
    m = re.search(r"-v\d+-(\d+)-[0-9a-f]+$", name) or re.search(r"\.(\d+)\.[0-9a-f]+\.tmp$", name)
    return int(m.group(1)) if m else None


def is_alive(pid: int | None) -> bool:
    """Whether process `pid` is running (a zombie is not: it writes nothing any more)."""
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's live process


def status(root: str | os.PathLike) -> dict:
    """Per model: active, previous, the version config.pbtxt serves, installed versions with
    their pfp.json, temporary folders (crash leftovers, or installs in progress) and problems.
    JSON-ready; takes no lock."""
    base = Path(root).resolve()
    out: dict[str, Any] = {}
    if not base.is_dir():
        return out
    for mdir in sorted(base.iterdir()):
        if not mdir.is_dir() or not _NAME_RE.fullmatch(mdir.name):
            continue
        problems: list[str] = []
        try:
            state = read_state(mdir)
        except RepositoryError as e:
            problems.append(str(e))
            state = {}
        versions = []
        for v in _versions_on_disk(mdir):
            try:
                versions.append(read_version_meta(mdir, v))
            except RepositoryError as e:
                problems.append(str(e))
                versions.append({"version": v, "error": str(e)})
        serving = served_version(mdir)
        active = state.get("active")
        installed = {v["version"] for v in versions}
        if active is not None and active not in installed:
            problems.append(f"active version {active} is not installed")
        if serving != active:
            problems.append(f"{CONFIG_FILE} serves version {serving} but the state says {active}; "
                            f"run activate({active}) again")
        leftovers, in_progress = [], []
        for p in _temp_entries(mdir):
            (in_progress if is_alive(_owner_pid(p.name)) else leftovers).append(p.name)
        out[mdir.name] = {
            "active": active,
            "previous": state.get("previous"),
            "serving": serving,
            "in_sync": serving == active,
            "platform": next((v.get("platform") for v in versions if v.get("version") == serving), None),
            "versions": versions,
            "leftovers": leftovers,
            "in_progress": in_progress,
            "problems": problems,
            "updated_at": state.get("updated_at"),
        }
    return out


def cleanup(
    root: str | os.PathLike,
    model_name: str,
    keep: int = 3,
    *,
    lock_wait_s: float = LOCK_WAIT_S,
) -> dict:
    """Remove installed versions but the `keep` newest, the active and the previous one, and
    every temporary folder or file (under the lock they can only be crash leftovers).
    Returns {"removed_versions": [...], "removed_temp": [...]}."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise RepositoryError(f"keep {keep!r} is not a non-negative integer")
    mdir = model_dir(root, model_name)
    if not mdir.is_dir():
        raise RepositoryError(f"{mdir}: no model {model_name!r} in the repository")
    removed_versions: list[int] = []
    removed_temp: list[str] = []
    with model_lock(root, model_name, wait_s=lock_wait_s):
        for p in _temp_entries(mdir):
            _remove(p)
            removed_temp.append(p.name)
        state = read_state(mdir)
        on_disk = _versions_on_disk(mdir)
        kept = set(on_disk[-keep:] if keep else []) | {state.get("active"), state.get("previous"),
                                                         served_version(mdir)}
        for v in on_disk:
            if v in kept:
                continue
            # Rename out of Triton's sight first, so no reader sees a half-deleted version;
            # a crash during rmtree leaves a temporary folder for the next cleanup.
            trash = mdir / f"{TMP_PREFIX}remove-v{v}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(mdir / str(v), trash)
            _remove(trash)
            removed_versions.append(v)
        if removed_versions or removed_temp:
            fsync_dir(mdir)
            state["history"] = [*state.get("history", []), {"action": "cleanup", "removed": removed_versions,
                                                            "temp": removed_temp, "at": _now()}]
            if (mdir / STATE_FILE).exists():
                _write_state(mdir, state)
    return {"removed_versions": removed_versions, "removed_temp": removed_temp}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


__all__ = [
    "DeviceBusy", "RepositoryError", "TensorSpec", "VersionMeta", "activate", "cleanup", "deactivate", "device_root",
    "install", "is_alive", "model_dir", "model_lock", "read_state", "read_version_meta", "render_config", "rollback",
    "safe_join", "served_version", "status", "validate_name",
]
