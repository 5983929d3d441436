"""Tasks: what a model is trained for and judged by.

A task gives the training loss for a batch, an evaluation returning a dict of metrics, and
the name and direction of the one metric that the cascade's tolerance and the gate use.
Classification (cross-entropy, top-1 accuracy in percent) is the default; users name their
own as "package.module:Task" in the config's `task` field. PFP's scoring needs only inputs,
so every pruning method works on every task.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .errors import CoreError
from .imports import resolve


class TaskError(CoreError, ValueError):
    """A task that cannot be loaded, or whose evaluation lacks its own metric."""


class Task:
    """Base class of a task; subclass it and override `loss` and `evaluate`.

    `metric` names the key of `evaluate`'s dict that the tolerance and the gate read;
    `higher_is_better` tells its direction (accuracy: True, MSE: False).
    """

    name: str = "task"
    metric: str = "score"
    higher_is_better: bool = True

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The scalar training loss of `model` on one batch."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, device: torch.device) -> dict[str, float]:
        """Metrics of `model` over `loader` (the model is in eval mode, gradients off)."""
        raise NotImplementedError

    def change(self, new: float, old: float) -> float:
        """How much better `new` is than `old` (negative: worse), whatever the direction."""
        return (new - old) if self.higher_is_better else (old - new)

    def divergence(self, y: torch.Tensor, y_hat: torch.Tensor) -> float:
        """How far the pruned network's outputs `y_hat` are from the unpruned ones `y` (no labels):
        what the measuring allocators (holdout, search) minimise. Default: relative squared error."""
        return relative_squared_error(y, y_hat)


def relative_squared_error(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """||y_hat - y||^2 / ||y||^2."""
    return float((y_hat - y).pow(2).sum() / y.pow(2).sum().clamp(min=1e-30))


def softmax_kl(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Mean KL(softmax(y) || softmax(y_hat)) per point, for [N, classes] logits."""
    return float(F.kl_div(F.log_softmax(y_hat, 1), F.log_softmax(y, 1), log_target=True, reduction="batchmean"))


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class Classification(Task):
    """Cross-entropy training; top-1 accuracy in percent (`acc`) and mean cross-entropy (`loss`)."""

    name = "classification"
    metric = "acc"
    higher_is_better = True

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs), targets)

    def divergence(self, y: torch.Tensor, y_hat: torch.Tensor) -> float:
        if y.dim() == 2 and y.shape[1] > 1:
            return softmax_kl(y, y_hat)
        return relative_squared_error(y, y_hat)

    def evaluate(self, model: nn.Module, loader, device: torch.device, amp: bool = False) -> dict[str, float]:
        # float64 sums: float32 loses integer precision past 16M samples.
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        with torch.no_grad():
            for images, targets in loader:
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                with torch.autocast(device.type, enabled=amp):
                    logits = model(images)
                if not isinstance(logits, torch.Tensor):
                    raise TaskError(
                        f"the model returns {type(logits).__name__}, not a tensor of logits: name a task "
                        "that reads it in the config's `task` field ('package.module:Task')")
                totals[0] += F.cross_entropy(logits.float(), targets, reduction="sum")
                totals[1] += (logits.argmax(dim=1) == targets).sum()
                totals[2] += targets.numel()
        loss_sum, correct, count = _all_reduce(totals).tolist()
        if count == 0:
            return {"acc": 0.0, "loss": float("nan")}
        return {"acc": 100.0 * correct / count, "loss": loss_sum / count}


DEFAULT_TASK = "classification"


def load_task(name: str | None) -> Task:
    """The task named in a config: None or "classification", or "package.module:Task"
    (a Task subclass, an instance, or a callable returning one)."""
    if name is None or name.strip().lower() == DEFAULT_TASK:
        return Classification()
    obj = resolve(name, "task")
    if isinstance(obj, type) and issubclass(obj, Task) or not isinstance(obj, Task) and callable(obj):
        try:
            obj = obj()
        except Exception as e:  # a user's constructor
            raise TaskError(f"task: {name}() raised {type(e).__name__}: {e}") from e
    if not isinstance(obj, Task):
        raise TaskError(f"task: {name!r} is a {type(obj).__name__}, not a pfp.tasks.Task")
    return obj


def is_classification(task: Task | None) -> bool:
    """True for the default task (None or a Classification): the one with accuracy and label smoothing."""
    return task is None or isinstance(task, Classification)


def check_output(task: Task, model: nn.Module, example_input: torch.Tensor, source: str = "the model") -> None:
    """One TaskError line when `model` (named `source`) fails on the example input, or when
    classification would read an output that is not a tensor of logits."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_input)
    except Exception as e:  # a user's model: any error means it does not fit the data
        first = (str(e).strip().splitlines() or [""])[0]
        shape = "x".join(str(d) for d in example_input.shape[1:])
        raise TaskError(f"{source} fails on an input of shape {shape} from the data ({type(e).__name__}: {first})") from None
    finally:
        model.train(was_training)
    if is_classification(task) and not isinstance(out, torch.Tensor):
        raise TaskError(
            f"{source} returns {type(out).__name__}, not a tensor of logits, and no task reads it: name one in "
            "the config's `task` field ('package.module:Task')")


def check_metrics(task: Task, metrics: dict[str, float]) -> float:
    """The task's own metric out of its evaluation, or one line naming what is there."""
    if task.metric not in metrics:
        raise TaskError(
            f"task {task.name!r}: metric {task.metric!r} is not in its evaluation's result "
            f"(keys: {', '.join(sorted(metrics)) or 'none'})")
    return float(metrics[task.metric])
