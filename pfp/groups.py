"""Channel groups of a network, found by Torch-Pruning's DependencyGraph.

A group is a set of channels that must be kept or removed together: the output channels
of one or more producers (a residual add ties several), the BatchNorm entries on them, and
the input channels of every consumer that reads them. Everything PFP needs of a group
(who produces, who consumes which input index, how many channels) is extracted once here,
so scoring, allocation and removal never walk Torch-Pruning's structures themselves.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from .config import ConfigError
from .hooks import eval_mode

log = logging.getLogger(__name__)

SCORABLE = (nn.Conv2d, nn.Linear)


class ChannelShuffleOp(torch.autograd.Function):
    """A channel shuffle as one autograd node, so Torch-Pruning's tracer sees one op.

    Traced as torchvision writes it (view to 5-D, transpose, view back), the shuffle breaks
    Torch-Pruning's reshape index mapping (a ZeroDivisionError while building the graph). As
    one node the tracer takes it for an element-wise op; its index mapping (identity) is then
    wrong, so every group whose channels reach it is kept whole (see `_reaches_shuffle`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, groups: int) -> torch.Tensor:
        ctx.groups = groups
        return _shuffle(x, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # the inverse permutation of a shuffle in g groups is a shuffle in C/g groups
        return _shuffle(grad, grad.shape[1] // ctx.groups), None


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _opaque_channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    return ChannelShuffleOp.apply(x, groups)


class WindowAttentionOp(torch.autograd.Function):
    """A window partition or attention (Swin's, MaxViT's) as one autograd node, for tracing only.

    Traced as written (pad, roll, window partition and merge, per-head reshapes), it stalls
    Torch-Pruning's index mapping for minutes even on a tiny Swin. Its width and head count are
    fixed anyway (`_ATTENTION_TYPES`), so the tracer needs only where the tensor flows: one
    node, and every group whose channels reach it is kept whole (see `_is_opaque_attention`).
    The weights are taken as constants; the graph is never differentiated.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # noqa: ARG004
        return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ARG004
        raise RuntimeError("WindowAttentionOp is a tracing stand-in; it has no gradient")


def _one_node(mod_name: str, attr: str) -> Callable:
    """`mod_name.attr` as one WindowAttentionOp node around its tensor input.

    `attr` is a function (the tensor is its first argument) or "Class.forward" (after self).
    """
    at = 1 if "." in attr else 0

    def stand_in(*args, **kwargs) -> torch.Tensor:
        original = _ORIGINALS[(mod_name, attr)]
        return WindowAttentionOp.apply(args[at], lambda t: original(*args[:at], t, *args[at + 1:], **kwargs))

    return stand_in


_SWIN, _MAXVIT = "torchvision.models.swin_transformer", "torchvision.models.maxvit"
# Functions that Torch-Pruning cannot trace, swapped for a one-node version while the graph
# is built: (module, attribute or Class.attribute, stand-in). The model itself is never modified.
# MaxViT's window/grid partitions and its attention reshape the channels into windows and
# heads: traced as written, a 2-stage, 16-wide MaxViT at 64 px had not built its groups in
# 10 minutes (and maxvit_t held 5.4 GB); as single nodes it builds in seconds.
TRACE_STAND_INS = [("torchvision.models.shufflenetv2", "channel_shuffle", _opaque_channel_shuffle),
                   (_SWIN, "shifted_window_attention", _one_node(_SWIN, "shifted_window_attention"))] + [
    (_MAXVIT, f"{cls}.forward", _one_node(_MAXVIT, f"{cls}.forward"))
    for cls in ("WindowPartition", "WindowDepartition", "RelativePositionalMultiHeadAttention")]
_ORIGINALS: dict[tuple[str, str], Callable] = {}  # what trace_stand_ins swapped out, for the stand-ins to call

# Attention blocks that reshape by a head count and a width they store (torchvision's ViT
# reads `hidden_dim`, Swin `num_heads`): the channels of their inputs and outputs are kept.
# Only the channels between two plain layers (the MLP's hidden units) are pruned there.
_ATTENTION_TYPES = [("torch.nn", "MultiheadAttention"),
                    (_SWIN, "ShiftedWindowAttention"),
                    (_MAXVIT, "RelativePositionalMultiHeadAttention")]


@contextlib.contextmanager
def trace_stand_ins() -> Iterator[None]:
    """Swap TRACE_STAND_INS in for the duration of a trace (modules not imported are left alone)."""
    saved = []
    try:
        for mod_name, attr, stand_in in TRACE_STAND_INS:
            owner = sys.modules.get(mod_name)
            *path, name = attr.split(".")
            for part in path:  # "Class.forward": the class in the module
                owner = getattr(owner, part, None)
            if owner is not None and hasattr(owner, name):
                saved.append((owner, name, getattr(owner, name)))
                _ORIGINALS[(mod_name, attr)] = getattr(owner, name)
                setattr(owner, name, stand_in)
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def attention_types() -> tuple[type, ...]:
    """The attention module classes of _ATTENTION_TYPES that are importable here."""
    found = []
    for mod_name, cls in _ATTENTION_TYPES:
        try:
            found.append(getattr(importlib.import_module(mod_name), cls))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


@dataclass
class Consumer:
    """A Conv2d/Linear that reads the group's channels: input index -> group channel."""

    name: str
    module: nn.Module
    in_idxs: torch.Tensor  # indices into the consumer's input dim (channels or features)
    root_idxs: torch.Tensor  # the group channel each of those indices carries


@dataclass
class Producer:
    name: str
    module: nn.Module
    out_idxs: torch.Tensor
    root_idxs: torch.Tensor


@dataclass
class ChannelGroup:
    """One prunable set of coupled channels."""

    gid: int
    root_name: str
    size: int
    producers: list[Producer]
    consumers: list[Consumer]
    unscorable: list[str]  # consumers whose type PFP cannot score
    # (module name, "in"|"out", number of that dim's indices in this group): the resource model
    members: list[tuple[str, str, int]]
    tp_group: object = field(repr=False, default=None)
    norms: list[Producer] = field(default_factory=list)  # BatchNorm entries on the channels

    @property
    def name(self) -> str:
        return self.root_name


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def find_output_layer(model: nn.Module, example_input: torch.Tensor) -> str | None:
    """The last Conv2d/Linear executed in a forward pass: the classifier, never pruned."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
        for n, m in model.named_modules()
        if isinstance(m, SCORABLE)
    ]
    with eval_mode(model, hooks), torch.no_grad():
        model(example_input)
    return order[-1] if order else None


class PruningGraph:
    """Dependency graph of a model plus its prunable channel groups."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignore_layers: list[str] = ()):
        self.model = model
        self.example_input = example_input
        names = dict(model.named_modules())
        unknown = [n for n in ignore_layers if n not in names]
        if unknown:
            raise ConfigError(f"prune.ignore_layers: no module named {unknown[0]!r} in the model")
        self.output_layer = find_output_layer(model, example_input)
        ignored = [names[n] for n in ignore_layers]
        if self.output_layer:
            ignored.append(names[self.output_layer])
        self.ignored_names = set(ignore_layers) | ({self.output_layer} if self.output_layer else set())
        with eval_mode(model), torch.enable_grad(), trace_stand_ins():  # Torch-Pruning traces through autograd
            self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
        self._names = {m: n for n, m in model.named_modules()}
        attn = attention_types()
        self._attention = [n for n, m in model.named_modules() if attn and isinstance(m, attn)]
        self.skipped: list[tuple[str, str]] = []
        self.groups = self._extract(ignored)

    def _extract(self, ignored: list[nn.Module]) -> list[ChannelGroup]:
        groups = []
        for tpg in self._tp_groups(ignored):
            producers, consumers, unscorable, members, norms = [], [], [], [], []
            skip_reason = None
            for item in tpg.items:
                dep, idxs = item.dep, item.idxs
                mod = dep.target.module
                if _is_shuffle(dep.target):
                    skip_reason = "its channels go through a channel shuffle (kept whole: the shuffle ties them across branches)"
                if _is_opaque_attention(dep.target) and not skip_reason:
                    skip_reason = "its channels enter or leave a window partition or attention (head count and width are fixed there)"
                if not isinstance(mod, nn.Module) or mod not in self._names:
                    continue
                name = self._names[mod]
                inside = self._inside_attention(name)
                if inside and not skip_reason:
                    skip_reason = f"its channels enter or leave the attention block {inside} (head count and width are fixed there)"
                is_out = self.dg.is_out_channel_pruning_fn(dep.handler)
                idx_t = torch.as_tensor(list(idxs), dtype=torch.long)
                root_t = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
                if isinstance(mod, nn.Conv2d) and mod.groups > 1 and not is_depthwise(mod):
                    # removing channels would have to keep every conv group equally sized
                    skip_reason = f"{name} is a grouped conv (groups={mod.groups})"
                if is_depthwise(mod):
                    # in and out of a depthwise conv are the same channels: one member, counted once
                    if not any(m[0] == name for m in members):
                        members.append((name, "out", len(idxs)))
                    continue
                members.append((name, "out" if is_out else "in", len(idxs)))
                if is_out and isinstance(mod, SCORABLE):
                    producers.append(Producer(name, mod, idx_t, root_t))
                elif is_out and isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
                    norms.append(Producer(name, mod, idx_t, root_t))
                elif not is_out:
                    if isinstance(mod, SCORABLE):
                        consumers.append(Consumer(name, mod, idx_t, root_t))
                    else:
                        unscorable.append(f"{name} ({type(mod).__name__})")
            root = tpg.items[0].dep.target.module
            if skip_reason:
                log.warning("not pruning the channels of %s: %s", self._names[root], skip_reason)
                self.skipped.append((self._names[root], skip_reason))
                continue
            if not producers:
                continue
            size = self.dg.get_pruner_of_module(root).get_out_channels(root)
            groups.append(
                ChannelGroup(
                    gid=len(groups),
                    root_name=self._names[root],
                    size=size,
                    producers=producers,
                    consumers=consumers,
                    unscorable=unscorable,
                    members=members,
                    tp_group=tpg,
                    norms=norms,
                )
            )
        return groups

    def _tp_groups(self, ignored: list[nn.Module]) -> Iterator:
        """Torch-Pruning's groups, one per root layer, as DependencyGraph.get_all_groups finds them.

        Unlike get_all_groups, a root whose group Torch-Pruning cannot resolve (its index
        mapping fails, e.g. behind a channel shuffle) is recorded in `skipped` and the others
        are still returned.
        """
        visited: set[nn.Module] = set()
        ignored = list(ignored) + list(self.dg.IGNORED_LAYERS_IN_TRACING)
        for m in list(self.dg.module2node):
            if m in ignored or not isinstance(m, SCORABLE) or m in visited:
                continue
            pruner = self.dg.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                group = self.dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
            except Exception as e:  # noqa: BLE001 - Torch-Pruning's index mappings fail in many ways
                why = f"Torch-Pruning cannot map its channels ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                log.warning("not pruning the channels of %s: %s", self._names.get(m, "?"), why)
                self.skipped.append((self._names.get(m, "?"), why))
                continue
            prunable = True
            for dep, _ in group:
                if self.dg.is_out_channel_pruning_fn(dep.handler):
                    visited.add(dep.target.module)
                    prunable = prunable and dep.target.module not in ignored
            if prunable:
                yield group

    def _inside_attention(self, name: str) -> str | None:
        for a in self._attention:
            if name == a or name.startswith(a + "."):
                return a
        return None

    def prune(self, keep: dict[int, torch.Tensor]) -> None:
        """Remove, physically, every channel of group gid not listed in keep[gid]."""
        modules = dict(self.model.named_modules())  # removal resizes modules in place: names stay valid
        for g in self.groups:
            if g.gid not in keep:
                continue
            kept = set(int(i) for i in keep[g.gid])
            drop = [i for i in range(g.size) if i not in kept]
            if not drop:
                continue
            root = modules[g.root_name]
            pruner = self.dg.get_pruner_of_module(root)
            # the root's own out-channel indices are untouched by other groups' removals
            group = self.dg.get_pruning_group(root, pruner.prune_out_channels, drop)
            group.prune()


def _node_is(node, op: type) -> bool:
    fn = getattr(node, "grad_fn", None)
    return fn is not None and hasattr(fn, "name") and fn.name().startswith(op.__name__)


def _is_shuffle(node) -> bool:
    return _node_is(node, ChannelShuffleOp)


def _is_opaque_attention(node) -> bool:
    return _node_is(node, WindowAttentionOp)


def kept_indices(groups: list[ChannelGroup], keep: dict[int, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(kept input indices of every consumer, kept output indices of every producer), original numbering.

    Only layers that lose something appear; computed before removal, since removal resizes
    the modules in place.
    """
    dropped: dict[tuple[str, str], set[int]] = {}
    dims: dict[tuple[str, str], int] = {}
    for g in groups:
        if g.gid not in keep:
            continue
        drop = torch.ones(g.size, dtype=torch.bool)
        drop[keep[g.gid]] = False
        for side, items in (("in", g.consumers), ("out", g.producers)):
            for it in items:
                m = it.module
                key = (it.name, side)
                if side == "in":
                    dims[key] = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
                else:
                    dims[key] = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                gone = it.in_idxs[drop[it.root_idxs]] if side == "in" else it.out_idxs[drop[it.root_idxs]]
                dropped.setdefault(key, set()).update(int(i) for i in gone)
    kept_in: dict[str, torch.Tensor] = {}
    kept_out: dict[str, torch.Tensor] = {}
    for (name, side), gone in dropped.items():
        if not gone:
            continue
        idx = torch.tensor([i for i in range(dims[(name, side)]) if i not in gone], dtype=torch.long)
        (kept_in if side == "in" else kept_out)[name] = idx
    return kept_in, kept_out
