"""Save and load pruned models without pickling their classes.

A pruned network no longer has the channel counts its builder produces, and pickling
the module itself ties the file to the exact source code that made it (and needs
torch.load(weights_only=False), which runs arbitrary code). Instead a file records

* the spec: the keyword arguments that rebuild the *unpruned* architecture,
* for every submodule, the integer shape attributes that channel pruning changes,
* the state_dict,

and loading rebuilds the architecture, shrinks it to the recorded shapes and loads the
weights. Everything in the file is plain Python or tensors, so torch.load(weights_only=True)
reads it.
"""
from __future__ import annotations

import numbers
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pfp.errors import CoreError
from pfp.files import atomic_path

FORMAT = "pfp-model/1"

# Attributes that torch-pruning rewrites when it removes channels. Anything that is not
# an int or a tuple of ints on a given module (e.g. GroupNorm.affine) is skipped.
SHAPE_ATTRS: tuple[str, ...] = (
    "in_channels", "out_channels", "groups",            # ConvNd / ConvTransposeNd
    "in_features", "out_features",                      # Linear
    "num_features",                                     # BatchNorm / InstanceNorm
    "num_groups", "num_channels",                       # GroupNorm
    "normalized_shape",                                 # LayerNorm
    "num_parameters",                                   # PReLU
    "num_embeddings", "embedding_dim",                  # Embedding
    "embed_dim", "num_heads", "head_dim", "kdim", "vdim",  # MultiheadAttention
    "input_size", "hidden_size", "proj_size",           # RNN / LSTM / GRU
)


class CheckpointError(CoreError, RuntimeError):
    """A model or training checkpoint that cannot be read or does not fit the model."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save `obj` so that `path` is either the old file or the complete new one."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        torch.save(obj, f)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _plain(value: Any, where: str) -> Any:
    """`value` as plain Python (dict/list/str/int/float/bool/None), or a TypeError."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):  # also numpy ints
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} is not a plain Python value")


def _shape_attrs(module: nn.Module) -> dict[str, int | list[int]]:
    attrs: dict[str, int | list[int]] = {}
    for name in SHAPE_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            attrs[name] = value
        elif isinstance(value, (tuple, list)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            attrs[name] = list(value)
    return attrs


def save_model(path: str | Path, model: nn.Module, spec: dict, meta: dict | None = None) -> None:
    """Write `model` (possibly pruned) to `path` in the pfp-model/1 format.

    `spec` holds the keyword arguments of the builder that makes the unpruned
    architecture; `meta` is free-form plain data (accuracy, FLOPs, config, ...).
    """
    model = unwrap_model(model)
    modules = {}
    for name, module in model.named_modules():
        attrs = _shape_attrs(module)
        if attrs:
            modules[name] = attrs
    payload = {
        "format": FORMAT,
        "spec": _plain(spec, "spec"),
        "modules": modules,
        # CPU copies: the file must load on a machine without the GPU it was trained on.
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": _plain(meta or {}, "meta"),
    }
    atomic_torch_save(payload, path)


def _expected_shape(module: nn.Module, attr: str) -> tuple[int, ...] | None:
    """The shape that `module`'s current attributes call for, where the layer type is known."""
    if isinstance(module, nn.modules.conv._ConvNd):
        k = tuple(module.kernel_size)
        if attr == "weight":
            if module.transposed:
                return (module.in_channels, module.out_channels // module.groups, *k)
            return (module.out_channels, module.in_channels // module.groups, *k)
        if attr == "bias":
            return (module.out_channels,)
    elif isinstance(module, nn.Linear):
        if attr == "weight":
            return (module.out_features, module.in_features)
        if attr == "bias":
            return (module.out_features,)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        if attr in ("weight", "bias", "running_mean", "running_var"):
            return (module.num_features,)
    elif isinstance(module, nn.GroupNorm):
        if attr in ("weight", "bias"):
            return (module.num_channels,)
    elif isinstance(module, nn.LayerNorm):
        if attr in ("weight", "bias"):
            return tuple(module.normalized_shape)
    elif isinstance(module, nn.Embedding):
        if attr == "weight":
            return (module.num_embeddings, module.embedding_dim)
    elif isinstance(module, nn.PReLU):
        if attr == "weight":
            return (module.num_parameters,)
    return None


def _fail(path: Path, msg: str) -> CheckpointError:
    return CheckpointError(f"{path}: {msg}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def describe_load_error(e: BaseException) -> str:
    """A short reason why torch.load(weights_only=True) failed, for one-line errors."""
    if isinstance(e, pickle.UnpicklingError):
        # torch's own text is a paragraph suggesting weights_only=False; say what it means.
        if "Unsupported global" in str(e):
            return "it holds pickled Python objects, not plain data"
        return "corrupt, or not a file written by torch.save"
    return f"truncated or corrupt ({_first_line(e)})"


def load_model(path: str | Path, builder: Callable[..., nn.Module]) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by save_model.

    `builder(**spec)` must make the unpruned architecture (pfp.models.build_model).
    Returns (model on CPU, {"spec": ..., "meta": ...}). Raises CheckpointError, with one
    line naming the file and the first offending key, when the file is missing, corrupt,
    of another format, or does not fit the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _fail(path, f"not a readable model file: {describe_load_error(e)}") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise _fail(path, f"not a {FORMAT} file (no 'format' entry)")
    if payload["format"] != FORMAT:
        raise _fail(path, f"format {payload['format']!r} is not {FORMAT!r}")
    for key in ("spec", "modules", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise _fail(path, f"entry '{key}' is missing or not a mapping")
    spec, recorded, state = payload["spec"], payload["modules"], payload["state_dict"]

    try:
        model = builder(**spec)
    except Exception as e:
        raise _fail(path, f"cannot build the architecture from spec {spec}: {_first_line(e)}") from None

    # Shrink the freshly built modules to the recorded channel counts.
    modules = dict(model.named_modules())
    for name, attrs in recorded.items():
        if name not in modules:
            raise _fail(path, f"module '{name}' is not in the architecture built from spec {spec}")
        module = modules[name]
        for attr, value in attrs.items():
            current = getattr(module, attr, None)
            if current is None:
                raise _fail(path, f"module '{name}' ({type(module).__name__}) has no attribute '{attr}'")
            setattr(module, attr, tuple(value) if isinstance(current, (tuple, list)) else value)

    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise _fail(path, f"key '{unexpected[0]}' is not in the architecture built from spec {spec}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise _fail(path, f"key '{missing[0]}' is missing from the file")

    # Resize parameters/buffers whose saved shape differs. A difference is only accepted
    # where the owning module records shape attributes and, for known layer types, where
    # the saved shape is the one those attributes call for: a kernel size or a layer type
    # that differs from the spec's architecture is an error, not something to paper over.
    for key, saved in state.items():
        if expected[key].shape == saved.shape:
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = modules.get(owner_name)
        want = _expected_shape(owner, attr) if owner is not None else None
        built = want if want is not None else tuple(expected[key].shape)
        problem = f"key '{key}' has shape {list(saved.shape)} in the file but {list(built)} in the architecture"
        if owner is None or owner_name not in recorded or saved.dim() != len(built):
            raise _fail(path, problem)
        if want is not None and want != tuple(saved.shape):
            raise _fail(path, problem)
        if attr in owner._parameters and owner._parameters[attr] is not None:
            old = owner._parameters[attr]
            setattr(owner, attr, nn.Parameter(
                torch.empty(saved.shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
            ))
        elif attr in owner._buffers and owner._buffers[attr] is not None:
            old = owner._buffers[attr]
            setattr(owner, attr, torch.empty(saved.shape, dtype=old.dtype, device=old.device))
        else:  # state produced by a custom hook: nothing generic can resize it
            raise _fail(path, problem)

    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise _fail(path, f"state_dict does not fit the architecture ({_first_line(e)})") from None
    return model, {"spec": spec, "meta": payload.get("meta") or {}}


def _names(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(f"'{k}'" for k in keys[:n]) + more


def load_state_strict(model: nn.Module, state: dict, source: str | Path) -> None:
    """Load `state` into `model`, or one CheckpointError line naming `source` and the first few
    missing and unexpected keys (or the first key whose shape differs)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = ([f"missing keys {_names(missing)}"] if missing else []) + (
            [f"unexpected keys {_names(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{source}: the state_dict does not match the model: {'; '.join(parts)}")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry '{k}' is a {type(v).__name__}, not a tensor")
        if own[k].shape != v.shape:
            raise CheckpointError(f"{source}: the state_dict does not match the model: key '{k}' has shape "
                                  f"{list(v.shape)} in the file but {list(own[k].shape)} in the model")
    model.load_state_dict(state, strict=True)


def load_model_or_state(path: str | Path, builder: Callable[..., nn.Module],
                        fresh: Callable[[], nn.Module]) -> tuple[nn.Module, dict]:
    """A pretrained checkpoint in any of three forms: a pfp-model/1 file (rebuilt with `builder`,
    as load_model), a plain state_dict, or a file holding {"state_dict": ...} (both loaded into
    `fresh()`, the config's architecture). Returns (model on CPU, {"spec": ... or None, "meta": ...}).
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _fail(path, f"not a readable checkpoint: {describe_load_error(e)}") from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return load_model(path, builder)
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload or not all(isinstance(k, str) for k in payload):
        raise _fail(path, f"neither a {FORMAT} file nor a state_dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in payload):  # saved from inside DistributedDataParallel
        payload = {k[len("module."):]: v for k, v in payload.items()}
    model = fresh()
    load_state_strict(model, payload, path)
    return model, {"spec": None, "meta": {}}
