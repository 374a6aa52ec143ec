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
from latticequant.pipeline.distributed import World, assign_owners, solve_cost
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

    def add(
        self, name: str, x: torch.Tensor, mask: torch.Tensor | None, first_window: int = 0
    ) -> None:
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
        self.acc[name].add(x.detach(), token_mask, first_window)

    def get(self, name: str) -> HessianAccumulator:
        return self.acc[self.alias.get(name, name)]

    def input_of(self, name: str) -> torch.Tensor | None:
        """The tensor ``name`` (or the layer it shares an accumulator with) read in this batch."""
        leader = self.alias.get(name, name)
        return next((x for x, n in self._batch_inputs if n == leader), None)


class BlockQuantizer:
    """Quantizes the linear layers of one block with the configured method.

    Layers are quantized a group at a time (:meth:`quantize_group`); across ranks
    (:class:`~latticequant.pipeline.distributed.World`), the group's Hessians are reduced first,
    each layer is solved by the rank the balance assigns, and every rank receives every result.
    ``timings`` adds up this rank's solve seconds.
    """

    def __init__(
        self,
        method: Method,
        configs: dict[str, object],
        hessian_dtype,
        device,
        world: World | None = None,
    ):
        self.method = method
        self.configs = configs  # local name -> config; only the layers to quantize
        self.hessian_dtype, self.device = hessian_dtype, device
        self.world = world if world is not None else World()
        self.results: dict[str, LayerQuant] = {}
        self.solve_s = 0.0

    def _solve(self, name: str, module: nn.Module, acc: HessianAccumulator) -> LayerQuant:
        """One layer's result on its Hessian; any failure is an error naming the layer."""
        W = linear_weight(module).detach()
        if W.dtype not in (torch.float32, torch.float64):
            W = W.float()
        t0 = time.perf_counter()
        try:
            lq = self.method.quantize(W, acc.H, self.configs[name])
        except ValueError as exc:
            raise ValueError(f"cannot quantize {name}: {exc}") from exc
        elapsed = time.perf_counter() - t0
        self.solve_s += elapsed
        lq.stats.setdefault("time_s", elapsed)
        lq.stats["layer_time_s"] = elapsed
        lq.stats["n_tokens"] = acc.n_tokens
        lq.stats["rank"] = self.world.rank
        return lq

    def quantize_group(self, block: nn.Module, accs: dict[str, HessianAccumulator]) -> None:
        """Quantize the layers of one group (``accs``: name -> its Hessian's accumulator) and
        write each ``Q`` into its layer (a layer meant to be quantized never stays in float)."""
        accs = {n: acc for n, acc in accs.items() if n not in self.results}
        world = self.world
        if not world.distributed:
            for name, acc in accs.items():
                lq = self._solve(name, block.get_submodule(name), acc)
                set_linear_weight(block.get_submodule(name), lq.Q)
                self.results[name] = lq
            return
        reduced: dict[int, HessianAccumulator] = {}
        for acc in accs.values():  # layers that share an input share one reduction
            if id(acc) not in reduced:
                reduced[id(acc)] = world.reduce_hessian(acc)
        costs = {name: solve_cost(*linear_weight(block.get_submodule(name)).shape) for name in accs}
        owners = assign_owners(costs, world.size, world.loads)
        mine, error = {}, None
        for name, acc in accs.items():
            if owners[name] != world.rank:
                continue
            try:
                mine[name] = self._solve(name, block.get_submodule(name), reduced[id(acc)])
            except ValueError as exc:
                error = str(exc)
                break
        for part in world.all_gather(mine, "results", error):
            for name, lq in part.items():
                set_linear_weight(block.get_submodule(name), lq.Q)
                self.results[name] = lq


def _group_of(subsets, configs) -> dict[str, list[str]]:
    """Layer name -> the layers of its group that are to be quantized."""
    groups = {}
    for subset in subsets:
        names = [n for n in subset if n in configs]
        for n in names:
            groups[n] = names
    for n in configs:  # a layer the description does not group is its own group
        groups.setdefault(n, [n])
    return groups


def quantize_block_lazy(block, batch: BlockInputs, subsets, bq: BlockQuantizer, bank: HessianBank):
    """One pass: when the first layer of a group is about to run, the whole group (whose
    layers read the same input) is quantized on that input, then the forward goes on."""
    modules = {name: block.get_submodule(name) for name in bq.configs}
    groups = _group_of(subsets, bq.configs)
    handles = []

    def make_hook(name):
        def hook(module, args):
            if name in bq.results:  # quantized with its group: it must read the group's input
                seen = bank.input_of(groups[name][0])
                x = args[0]
                if seen is None or not (x is seen or torch.equal(x, seen)):
                    raise RuntimeError(
                        f"{name} does not read the same input as {groups[name][0]}, the first "
                        "layer of its group in the architecture's description"
                    )
                return None
            bank.add(name, args[0], batch.mask, batch.first_window)
            acc = bank.get(name)
            bq.quantize_group(block, {n: acc for n in groups[name]})
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
                bank.add(name, args[0], current["mask"], current["first_window"])
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
                current["first_window"] = batch.first_window
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
        bq.quantize_group(block, {name: bank.get(name) for name in names})
    return [block_output(block(b.hidden, *b.args, **b.kwargs)) for b in batches]
