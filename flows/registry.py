"""The MLflow model registry: candidates in, champions only through the gate.

    v = register_candidate("resnet56-cifar10", run_id, "bundle", {"onnx_sha256": sha, "acc": "93.1"})
    promote("resnet56-cifar10", v.version, decision)     # alias `champion` only if decision.passed
    download_version("resnet56-cifar10", get_by_alias("resnet56-cifar10", "champion").version, "deploy/")

A version's source is the run's bundle folder (`runs:/<run_id>/<artifact_path>`: model.onnx,
model.pt, export.json). Every registered version gets the alias `candidate`; the alias
`champion` moves only when the gate passed, and every gate decision is kept on its version
as tags, so a rejected candidate still says why. Downloads are checked against the
version's `onnx_sha256` tag before they land where a deployment would pick them up.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from deploy.gate import GateDecision
from flows.errors import FlowError
from pfp.files import sha256_file

CANDIDATE = "candidate"
CHAMPION = "champion"
BUNDLE_FILES = ("model.onnx", "model.pt", "export.json")
SHA_TAG = "onnx_sha256"
# What a device checks besides the ONNX file: the reference inputs/outputs it verifies its engine with.
REFERENCE_FILE = "reference.npz"
REFERENCE_TAG = "reference_sha256"
# MLflow's registry tag value limit is 100k characters; a summary never needs more than this.
_MAX_TAG = 5000


class RegistryError(FlowError, ValueError):
    """A registered version or its run that lacks a file or whose files do not match their hashes."""


def _tag_key(name: str) -> str:
    # Registry tag keys allow letters, digits, '_', '-', '.', ' ' and '/'.
    return re.sub(r"[^\w./ -]", "_", name)


def _str_version(mv: ModelVersion) -> ModelVersion:
    # The sqlite store hands out `version` as an int, a tracking server (REST) as a str;
    # a round trip through the proto (a string field) gives the same type everywhere.
    return ModelVersion.from_proto(mv.to_proto())


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _logged_sha256(client: MlflowClient, run_id: str, artifact_path: str, file: str = "model.onnx") -> str:
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, f"{artifact_path}/{file}", tmp)
        return sha256_file(Path(local))


def register_candidate(model_name: str, run_id: str, artifact_path: str, tags: dict) -> ModelVersion:
    """Register the bundle folder the run logged at `artifact_path` as a new version of
    `model_name` (created if missing), with `tags`, and point the alias `candidate` at it.
    Returns the version with `version` as a str ("1"), whatever the store.

    The registry itself accepts any source, even one with no files; this checks that the
    run logged model.onnx, model.pt and export.json there (RegistryError naming what is
    missing). Without an `onnx_sha256` tag, it is computed from the logged model.onnx.
    """
    client = MlflowClient()
    artifact_path = artifact_path.strip("/")
    present = {Path(a.path).name for a in client.list_artifacts(run_id, artifact_path) if not a.is_dir}
    missing = [f for f in BUNDLE_FILES if f not in present]
    if missing:
        raise RegistryError(f"run {run_id} has no {', '.join(missing)} under artifact path {artifact_path!r}; "
                         f"log the bundle folder first (mlflow.log_artifacts(bundle_dir, {artifact_path!r}))")
    version_tags = {str(k): str(v) for k, v in tags.items()}
    if not version_tags.get(SHA_TAG):
        version_tags[SHA_TAG] = _logged_sha256(client, run_id, artifact_path)
    if REFERENCE_FILE in present and not version_tags.get(REFERENCE_TAG):
        version_tags[REFERENCE_TAG] = _logged_sha256(client, run_id, artifact_path, REFERENCE_FILE)

    # Not mlflow.register_model: for a runs:/ source it requires an MLflow model (an MLmodel
    # file or a LoggedModel) at that path (MLflow 3.x), and a bundle is plain files.
    _ensure_registered_model(client, model_name)
    mv = client.create_model_version(model_name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                     tags=version_tags)
    client.set_registered_model_alias(model_name, CANDIDATE, str(mv.version))
    return _str_version(client.get_model_version(model_name, str(mv.version)))  # now with its alias


def _check_tag(c: dict) -> str:
    def num(x):
        return "-" if x is None else f"{x:.6g}" if isinstance(x, float) else str(x)

    text = f"{'pass' if c['passed'] else 'FAIL'}: value {num(c.get('value'))}, limit {num(c.get('limit'))}"
    if c.get("reason"):
        text += f" ({c['reason']})"
    return text[:_MAX_TAG]


def promote(model_name: str, version: str, decision: GateDecision) -> bool:
    """Record the gate decision on the version (tags `gate.passed`, `gate.summary`,
    `gate.check.<name>`) and move the alias `champion` to it only if the gate passed; the
    previous champion stays otherwise. Returns whether it was promoted."""
    client = MlflowClient()
    version = str(version)
    tags = {"gate.passed": str(decision.passed).lower(), "gate.summary": decision.summary()[:_MAX_TAG]}
    tags |= {_tag_key(f"gate.check.{c['name']}"): _check_tag(c) for c in decision.checks}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    # Alias last: a crash above leaves the old champion in place, never an unrecorded one.
    if decision.passed:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    return decision.passed


def get_by_alias(model_name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points at (`version` a str), or None (no such alias or model)."""
    try:
        return _str_version(MlflowClient().get_model_version_by_alias(model_name, alias))
    except MlflowException as e:
        # A missing alias is INVALID_PARAMETER_VALUE, a missing model RESOURCE_DOES_NOT_EXIST.
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _verify(folder: Path, expected: dict[str, str], label: str) -> None:
    for file, tag in (("model.onnx", SHA_TAG), (REFERENCE_FILE, REFERENCE_TAG)):
        if tag not in expected:
            continue
        path = folder / file
        if not path.is_file():
            raise RegistryError(f"{label}: the download has no {file}")
        actual = sha256_file(path)
        if actual != expected[tag]:
            raise RegistryError(f"{label}: {file} sha256 {actual} does not match the version's {tag} tag {expected[tag]}")
    # export.json records both files' hashes; check them too where present.
    meta_file = folder / "export.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    for key in ("onnx", "model", "reference"):
        entry = meta.get(key) if isinstance(meta.get(key), dict) else {}
        if entry.get("file") and entry.get("sha256"):
            f = folder / entry["file"]
            if f.is_file() and sha256_file(f) != entry["sha256"]:
                raise RegistryError(f"{label}: {entry['file']} does not match the sha256 in export.json")


def download_version(model_name: str, version: str, dst: str | Path, *, require_reference: bool = False) -> Path:
    """Download version `version`'s bundle into the folder `dst` and return it.

    model.onnx must match the version's `onnx_sha256` tag, and reference.npz its
    `reference_sha256` tag where the version has one (required with `require_reference`,
    as a device needs the references); RegistryError naming the file otherwise. The files are
    fetched and checked in a staging folder beside `dst`, so a bundle that fails the check
    never appears in `dst`.
    """
    client = MlflowClient()
    version = str(version)
    mv = client.get_model_version(model_name, version)
    label = f"{model_name} v{version}"
    expected = {tag: mv.tags[tag] for tag in (SHA_TAG, REFERENCE_TAG) if mv.tags.get(tag)}
    if SHA_TAG not in expected:
        raise RegistryError(f"{label} has no {SHA_TAG} tag; its model.onnx cannot be verified")
    if require_reference and REFERENCE_TAG not in expected:
        raise RegistryError(f"{label} has no {REFERENCE_TAG} tag; its reference outputs cannot be verified "
                         "(register it again from a bundle with reference.npz)")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=str(staging))
        _verify(staging, expected, label)
        dst.mkdir(exist_ok=True)
        for item in staging.iterdir():
            target = dst / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


__all__ = ["BUNDLE_FILES", "CANDIDATE", "CHAMPION", "REFERENCE_TAG", "SHA_TAG", "download_version", "get_by_alias", "promote",
           "register_candidate"]
