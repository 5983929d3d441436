"""Export a (pruned) PyTorch model to ONNX with a dynamic batch axis, and check the file.

The exporter is torch's own (the torch.export-based one by default; the TorchScript one
on request). Every file is written atomically and passes ``onnx.checker`` before it is
reported as exported; a file that fails the checker is an error naming the file.
Graph simplification (onnxslim) is optional and kept only when it removes nodes.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from export.errors import ExportPackageError
from pfp.files import atomic_path, sha256_file  # noqa: F401 - sha256_file re-exported

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
MAX_BATCH = 4096


class ExportError(ExportPackageError, ValueError):
    """An export or an ONNX file that cannot be used; one line naming the file."""


@dataclass
class OnnxInfo:
    """What an ONNX file takes and gives, as read back from the file."""

    path: Path
    input_name: str
    input_shape: tuple[int | str, ...]   # the batch axis is a name when dynamic
    output_name: str
    output_shape: tuple[int | str, ...]
    opset: int
    nodes: int
    sha256: str

    @property
    def dynamic_batch(self) -> bool:
        return isinstance(self.input_shape[0], str)


def _dims(value_info) -> tuple[int | str, ...]:
    out: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_param if d.dim_param else int(d.dim_value))
    return tuple(out)


def check_onnx(path: str | Path) -> OnnxInfo:
    """Run onnx.checker (full check, with shape inference) on `path` and read its interface.

    ExportError naming the file when it is missing, unreadable or fails the checker, or
    when it does not have exactly one input and one output.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means an unusable file
        raise ExportError(f"{path}: not a readable ONNX file ({type(e).__name__}: {_first(e)})") from None
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001 - checker raises several types
        raise ExportError(f"{path}: fails onnx.checker ({_first(e)})") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ExportError(
            f"{path}: expected one input and one output, found {len(inputs)} and {len(model.graph.output)}"
        )
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return OnnxInfo(
        path=path,
        input_name=inputs[0].name,
        input_shape=_dims(inputs[0]),
        output_name=model.graph.output[0].name,
        output_shape=_dims(model.graph.output[0]),
        opset=int(opset),
        nodes=len(model.graph.node),
        sha256=sha256_file(path),
    )


def _first(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch's exporters print progress and deprecation notes; keep the CLI's output ours."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int],
    *,
    opset: int = DEFAULT_OPSET,
    exporter: Literal["dynamo", "torchscript"] = "dynamo",
    simplify: bool = False,
    max_batch: int = MAX_BATCH,
) -> OnnxInfo:
    """Export `model` (eval mode, CPU) to `path` with input (batch, *input_shape).

    The batch axis is dynamic (1..max_batch). Returns the checked file's OnnxInfo.
    ExportError, naming the file, if torch cannot export the model or the result fails
    the checker; `path` is then left as it was.
    """
    path = Path(path)
    model = model.eval().cpu()
    example = torch.zeros(2, *input_shape)  # batch 2: a size-1 axis would be specialised
    with atomic_path(path) as tmp:
        try:
            with _quiet(), torch.no_grad():
                if exporter == "dynamo":
                    batch = torch.export.Dim("batch", min=1, max=max_batch)
                    torch.onnx.export(
                        model, (example,), str(tmp), dynamo=True, external_data=False,
                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                        dynamic_shapes=({0: batch},), opset_version=opset, optimize=True,
                    )
                elif exporter == "torchscript":
                    torch.onnx.export(
                        model, (example,), str(tmp), dynamo=False,
                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                        opset_version=opset,
                    )
                else:
                    raise ExportError(f"{path}: exporter {exporter!r} is not 'dynamo' or 'torchscript'")
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - torch raises many types; one line for the user
            raise ExportError(f"{path}: torch.onnx.export failed ({type(e).__name__}: {_first(e)})") from None
        info = check_onnx(tmp)
        if not info.dynamic_batch:
            raise ExportError(f"{path}: the exported input has a fixed batch axis {info.input_shape}")
        if simplify:
            simplify_onnx(tmp)
    return check_onnx(path)


def simplify_onnx(path: str | Path) -> tuple[int, int]:
    """Simplify `path` in place with onnxslim when that removes nodes; (nodes before, after).

    Kept only if the result passes the checker; parity against PyTorch is checked by the
    caller afterwards either way.
    """
    import onnx

    path = Path(path)
    try:
        import onnxslim
    except ImportError:
        raise ExportError(f"{path}: simplification needs onnxslim (pip install onnxslim)") from None
    before = onnx.load(str(path))
    n_before = len(before.graph.node)
    with _quiet():
        slim = onnxslim.slim(before)
    n_after = len(slim.graph.node)
    if n_after >= n_before:
        return n_before, n_before
    with atomic_path(path) as tmp:
        onnx.save(slim, str(tmp))
        check_onnx(tmp)
    return n_before, n_after
