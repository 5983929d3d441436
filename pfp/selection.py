"""Reconstruction-aware channel selection: drop the channels the refit can best do without.

PFP's objective is to keep every consumer's pre-activations; `pfp.reconstruct` refits each
consumer on the channels that stay. So the channels to drop are those whose loss the refit
repairs best. For each consumer c of a group, with X its unfolded input on held-out images
and Y = X W its unpruned pre-activation, the least-squares residual of keeping feature set A
is r_c(A) = ||Y||^2 - B_A^T G_AA^-1 B_A (G = X^T X, B = X^T Y). Removing channel j (its K
kernel features J) raises it by tr(W_J^T (H_JJ)^-1 W_J), with H = (G + lam I)^-1 and W = H B
(the block form of the classic downdate), so a whole backward elimination costs a few small
solves per channel. The group's channels are eliminated one at a time by the sum over its
consumers of the relative rise, ties broken by the method's scores; the result is a ranking
(last eliminated first) that budgets and selection use in place of the scores.
"""
from __future__ import annotations

import torch

from .grams import Gram
from .groups import ChannelGroup


class Elimination:
    """One consumer's least-squares state over the input channels of one group."""

    def __init__(self, G: torch.Tensor, B: torch.Tensor, yy: float, k: int, pairs: torch.Tensor, ridge: float):
        lam = ridge * float(G.diagonal().mean()) + 1e-12
        self.H = torch.linalg.inv(G + lam * torch.eye(G.shape[0], dtype=G.dtype))
        self.W = self.H @ B
        self.k = k
        self.yy = max(yy, 1e-30)
        # feature positions of each group channel (the consumer's other inputs stay); a channel
        # read by a Linear after flatten has one input index per position
        pos: dict[int, list[int]] = {}
        for i, ch in pairs.tolist():
            pos.setdefault(int(ch), []).extend(range(int(i) * k, int(i) * k + k))
        self.pos = {ch: torch.tensor(v) for ch, v in pos.items()}
        widths = {len(v) for v in pos.values()}
        # channels read at one width each (every conv and flatten we trace): one [channels, K'] table,
        # so a step looks all of them up in one indexing op instead of one per channel
        self.table = (torch.stack([self.pos[ch] for ch in sorted(pos)]) if len(widths) == 1
                      and sorted(pos) == list(range(len(pos))) else None)

    def rises(self, chans: list[int]) -> torch.Tensor:
        """The relative residual rise of removing each channel in chans (one batched solve)."""
        if self.table is not None:
            J = self.table[torch.as_tensor(chans)]  # [n, K']
        else:
            idx = [self.pos[ch] for ch in chans]
            if len({len(i) for i in idx}) > 1:  # channels read at different numbers of inputs: one at a time
                return torch.cat([self.rises([ch]) for ch in chans])
            J = torch.stack(idx)
        if J.shape[1] == 1:  # one feature a channel (a 1x1 conv or a Linear): the solves are divisions
            j = J[:, 0]
            return self.W[j].pow(2).sum(1) / self.H[j, j] / self.yy
        HJ = self.H[J.unsqueeze(2), J.unsqueeze(1)]  # [n, K', K']
        WJ = self.W[J]  # [n, K', O]
        return (WJ * torch.linalg.solve(HJ, WJ)).sum((1, 2)) / self.yy

    def remove(self, *chs: int) -> None:
        """Drop channels chs (one block downdate for all of them).

        The Schur complement is written in place over the full matrices and the dropped rows
        and columns are zeroed: the alive entries are exactly those of the shrunken matrices,
        without copying them every step (the copies, not the arithmetic, were the cost).
        """
        J = torch.cat([self.pos[ch] for ch in chs])
        HJ = self.H[J]  # [|J|, F]: rows, since H is symmetric (a column gather is many times slower)
        G = HJ / HJ[:, J] if len(J) == 1 else torch.linalg.solve(HJ[:, J], HJ)  # H_JJ^-1 H_J. : [|J|, F]
        self.W.addmm_(G.t(), self.W[J], alpha=-1)
        self.H.addmm_(HJ.t(), G, alpha=-1)
        self.H[J] = 0
        self.H[:, J] = 0
        self.W[J] = 0


def refit_ranking(groups: list[ChannelGroup], scores: dict[int, torch.Tensor], grams: dict[str, Gram],
                  ridge: float = 1e-4, exact_upto: int = 256) -> dict[int, torch.Tensor]:
    """A score per channel of each group (higher = kept longer) from backward elimination.

    Groups with a consumer that has no Gram statistics (grouped convs, too wide) keep their
    scores. The result ranks like scores do: the last channel eliminated scores highest.
    While more than 2 * exact_upto channels are alive, the alive // exact_upto lowest rises
    go in one step: each step's downdate costs the square of the alive features, so one at a
    time is cubic in the width (a 3072-wide ConvNeXt MLP took minutes); the last channels,
    the ones a budget keeps, are still eliminated one at a time. The price: two channels that
    carry each other look free alone and can go in the same step; groups of at most
    2 * exact_upto - 1 channels (every layer of our CIFAR-style models) are exact.
    """
    out = dict(scores)
    for g in groups:
        if not g.consumers or any(c.name not in grams for c in g.consumers):
            continue
        states = []
        for name in dict.fromkeys(c.name for c in g.consumers):
            pairs = torch.cat([torch.stack([c.in_idxs, c.root_idxs], 1) for c in g.consumers if c.name == name])
            gr = grams[name]
            states.append(Elimination(gr.G, gr.B, gr.yy, gr.kernel, pairs, ridge))
        if any(len(s.pos) != g.size for s in states):
            continue
        tie = scores[g.gid].double()
        tie = tie / max(float(tie.abs().max()), 1e-30) * 1e-9
        alive = list(range(g.size))
        rank = torch.zeros(g.size, dtype=torch.float64)
        step = 0
        while len(alive) > 1:
            rises = sum(s.rises(alive) for s in states) - tie[alive]
            n = max(1, len(alive) // exact_upto)
            order = [int(torch.argmin(rises))] if n == 1 else torch.argsort(rises, stable=True)[:n].tolist()
            chs = [alive[j] for j in order]
            for ch in chs:  # within a step, the lower rise goes first
                rank[ch] = step
                step += 1
            gone = set(chs)
            alive = [ch for ch in alive if ch not in gone]
            for s in states:
                s.remove(*chs)
        rank[alive[0]] = g.size - 1
        out[g.gid] = rank
    return out
