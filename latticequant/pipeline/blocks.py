"""One decoder block, quantized layer by layer on the Hessians of the inputs each layer sees.

Each linear layer is quantized *just before it runs*: a forward pre-hook sees the layer's whole
input, accumulates the Hessian, quantizes the layer and writes ``Q`` into its weight, and the
forward continues with the quantized layer. So every layer's Hessian comes from inputs that
already went through the quantized layers before it (true-sequential quantization in its finest
form), and the same single pass yields the block's output. When the windows come in several
batches, each group of layers of the architecture's description is captured by a pass that stops
as soon as the group has run, then quantized, and one last pass gives the block's output.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from latticequant.core.hessian import HessianAccumulator
from latticequant.methods.registry import LayerQuant, Method
from latticequant.pipeline.forward import BlockInputs, StopForward, block_output
from latticequant.pipeline.layout import linear_weight, set_linear_weight

__all__ = ["HessianBank", "BlockQuantizer", "quantize_block_lazy", "quantize_block_batched"]


class HessianBank:
    """Hessians of a block's layers; layers fed the very same tensor share one accumulator.

    The inputs seen in the current batch are kept alive, so that an equal address really is
    the same tensor and not a freed one whose memory was reused.
    """

    def __init__(self, dtype: torch.dtype, device) -> None:
        self.dtype, self.device = dtype, device
        self.acc: dict[str, HessianAccumulator] = {}
        self.alias: dict[str, str] = {}
        self._batch_inputs: list[tuple[torch.Tensor, str]] = []

    def new_batch(self) -> None:
        self._batch_inputs.clear()

    def add(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        for seen, leader in self._batch_inputs:
            if (
                leader != name
                and seen.data_ptr() == x.data_ptr()
                and seen.shape == x.shape
                and seen.stride() == x.stride()
                and seen.dtype == x.dtype
            ):
                self.alias[name] = leader
                return
        self._batch_inputs.append((x, name))
        if name not in self.acc:
            self.acc[name] = HessianAccumulator(x.shape[-1], dtype=self.dtype, device=self.device)
        if mask is not None and mask.numel() * x.shape[-1] != x.numel():
            raise ValueError(f"cannot match the padding mask to the input of {name}")
        token_mask = None if mask is None else mask.reshape(x.shape[:-1])
        self.acc[name].add(x.detach(), token_mask)

    def get(self, name: str) -> HessianAccumulator:
        return self.acc[self.alias.get(name, name)]


class BlockQuantizer:
    """Quantizes the linear layers of one block with the configured method."""

    def __init__(self, method: Method, configs: dict[str, object], hessian_dtype, device):
        self.method = method
        self.configs = configs  # local name -> config; only the layers to quantize
        self.hessian_dtype, self.device = hessian_dtype, device
        self.results: dict[str, LayerQuant] = {}

    def quantize(self, name: str, module: nn.Module, acc: HessianAccumulator) -> None:
        """Quantize one layer on its Hessian and write ``Q`` into it; any failure is an error
        naming the layer (a layer meant to be quantized never stays in float)."""
        W = linear_weight(module).detach()
        if W.dtype not in (torch.float32, torch.float64):
            W = W.float()
        t0 = time.perf_counter()
        try:
            lq = self.method.quantize(W, acc.H, self.configs[name])
        except ValueError as exc:
            raise ValueError(f"cannot quantize {name}: {exc}") from exc
        lq.stats.setdefault("time_s", time.perf_counter() - t0)
        lq.stats["layer_time_s"] = time.perf_counter() - t0
        lq.stats["n_tokens"] = acc.n_tokens
        set_linear_weight(module, lq.Q)
        self.results[name] = lq


def quantize_block_lazy(block, batch: BlockInputs, bq: BlockQuantizer, bank: HessianBank):
    """One pass: each layer is quantized by a pre-hook on the inputs it is about to use."""
    modules = {name: block.get_submodule(name) for name in bq.configs}
    handles = []

    def make_hook(name):
        def hook(module, args):
            if name in bq.results:
                return None
            bank.add(name, args[0], batch.mask)
            bq.quantize(name, module, bank.get(name))
            return None

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        bank.new_batch()
        out = block_output(block(batch.hidden, *batch.args, **batch.kwargs))
    finally:
        for h in handles:
            h.remove()
    not_run = sorted(set(bq.configs) - set(bq.results))
    if not_run:
        raise RuntimeError(f"layers {not_run} were never called by their block's forward")
    return [out]


def quantize_block_batched(
    block, batches: list[BlockInputs], subsets, bq: BlockQuantizer, bank: HessianBank
):
    """Group by group: capture the group's inputs over all batches (stopping the forward once
    the group has run), quantize it, then one last pass for the block's outputs."""
    for subset in subsets:
        names = [n for n in subset if n in bq.configs]
        if not names:
            continue
        pending: set[str] = set()
        current: dict = {}
        handles = []

        def make_hook(name, pending=pending, current=current):
            def hook(module, args):
                bank.add(name, args[0], current["mask"])
                pending.discard(name)
                if not pending:
                    raise StopForward
                return None

            return hook

        for name in names:
            handles.append(block.get_submodule(name).register_forward_pre_hook(make_hook(name)))
        try:
            for batch in batches:
                pending.clear()
                pending.update(names)
                current["mask"] = batch.mask
                bank.new_batch()
                try:
                    block(batch.hidden, *batch.args, **batch.kwargs)
                except StopForward:
                    pass
                if pending:
                    raise RuntimeError(f"layers {sorted(pending)} were never called")
        finally:
            for h in handles:
                h.remove()
        for name in names:
            bq.quantize(name, block.get_submodule(name), bank.get(name))
    return [block_output(block(b.hidden, *b.args, **b.kwargs)) for b in batches]
