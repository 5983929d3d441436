"""Running a model for measurement: eval mode and forward hooks for one block, then restored.

Scoring, FLOP counting, coverage and graph tracing all run the network in eval mode with
hooks attached; this puts the model back in its previous mode and removes the hooks
whatever happens inside the block.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch.nn as nn
from torch.utils.hooks import RemovableHandle


@contextmanager
def eval_mode(model: nn.Module, handles: Iterable[RemovableHandle] = ()) -> Iterator[nn.Module]:
    """`model` in eval mode for the block; afterwards its mode is restored and `handles` removed."""
    handles = list(handles)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
