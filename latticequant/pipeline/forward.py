"""Running a model's decoder blocks one at a time: what the first block receives, and moving
a block's inputs between devices.

The inputs of the first decoder block are captured once per batch of windows (the model's
forward is stopped there), with the keyword arguments the model passes (attention mask,
positions, rotary embeddings); every later block receives the previous block's output with the
same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from latticequant.pipeline.layout import ModelLayout

__all__ = ["StopForward", "BlockInputs", "capture_first_block_inputs", "block_output", "to_device"]


class StopForward(Exception):
    """Raised inside a forward to stop it once what was needed has been seen."""


def to_device(obj, device):
    """``obj`` (tensors in tuples, lists and dicts) with every tensor moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockInputs:
    """Inputs of the current block for one batch of windows."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    mask: torch.Tensor | None  # (batch, seqlen) bool: tokens that enter the Hessians
    first_window: int = 0  # index of the batch's first window among all calibration windows
    float_hidden: torch.Tensor | None = None  # the float-outputs reference's hidden states

    def to(self, device) -> BlockInputs:
        mask = None if self.mask is None else self.mask.to(device)
        return BlockInputs(
            to_device(self.hidden, device),
            to_device(self.args, device),
            to_device(self.kwargs, device),
            mask,
            self.first_window,
            None if self.float_hidden is None else self.float_hidden.to(device),
        )

    def run(self, block: nn.Module, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output hidden states on these inputs (on ``hidden`` in their place)."""
        hidden = self.hidden if hidden is None else hidden
        return block_output(block(hidden, *self.args, **self.kwargs))


def block_output(out) -> torch.Tensor:
    """The hidden states of a block's return value (a tensor, or a tuple led by one)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_first_block_inputs(
    model: nn.Module,
    layout: ModelLayout,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    first_window: int = 0,
) -> list[BlockInputs]:
    """Run the model up to its first block for each batch and keep what that block receives.

    ``first_window``: the global index of ``input_ids``' first window (a rank's share starts
    there), which places each window in the Hessians' summation tree."""
    batches = []
    first = layout.blocks[0]
    seen: dict = {}

    def hook(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size]
            mask = None if attention_mask is None else attention_mask[start : start + batch_size]
            seen.clear()
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
            if "args" not in seen:
                raise RuntimeError("the model never called its first decoder block")
            args, kwargs = seen["args"], dict(seen["kwargs"])
            if args:
                hidden, args = args[0], tuple(args[1:])
            else:
                hidden = kwargs.pop("hidden_states")
            kwargs["use_cache"] = False
            token_mask = None if mask is None else mask.to(torch.bool)
            batches.append(
                BlockInputs(hidden.detach(), args, kwargs, token_mask, first_window + start)
            )
    finally:
        handle.remove()
    return batches
