"""Channel groups of a network, found by Torch-Pruning's DependencyGraph.

A group is a set of channels that must be kept or removed together: the output channels
of one or more producers (a residual add ties several), the BatchNorm entries on them, and
the input channels of every consumer that reads them. Everything PFP needs of a group
(who produces, who consumes which input index, how many channels) is extracted once here,
so scoring, allocation and removal never walk Torch-Pruning's structures themselves.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from .config import ConfigError
from .hooks import eval_mode

log = logging.getLogger(__name__)

SCORABLE = (nn.Conv2d, nn.Linear)


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
        with eval_mode(model), torch.enable_grad():  # Torch-Pruning traces through autograd
            self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
        self._names = {m: n for n, m in model.named_modules()}
        self.skipped: list[tuple[str, str]] = []
        self.groups = self._extract(ignored)

    def _extract(self, ignored: list[nn.Module]) -> list[ChannelGroup]:
        groups = []
        for tpg in self.dg.get_all_groups(ignored_layers=ignored, root_module_types=SCORABLE):
            producers, consumers, unscorable, members, norms = [], [], [], [], []
            skip_reason = None
            for item in tpg.items:
                dep, idxs = item.dep, item.idxs
                mod = dep.target.module
                if not isinstance(mod, nn.Module) or mod not in self._names:
                    continue
                name = self._names[mod]
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
