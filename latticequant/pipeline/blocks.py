"""One decoder block, quantized layer by layer on the Hessians of the inputs each layer sees.

Each linear layer is quantized *just before it runs*: a forward pre-hook sees the layer's whole
input, accumulates the Hessian, quantizes the layer and writes ``Q`` into its weight, and the
forward continues with the quantized layer. So every layer's Hessian comes from inputs that
already went through the quantized layers before it (true-sequential quantization in its finest
form), and the same single pass yields the block's output. When the windows come in several
batches, each group of layers of the architecture's description is captured by a pass that stops
as soon as the group has run, then quantized, and one last pass gives the block's output.

Blocks of routed experts (:mod:`latticequant.pipeline.experts`) always take the second way: which
experts run depends on the tokens, so ranks would not meet in the same hooks, and an expert that
gets no token never runs at all. Each expert layer's input is placed back in its windows
(:func:`~latticequant.pipeline.experts.routed_input`); an expert with too few tokens follows the
run's :class:`~latticequant.pipeline.experts.ExpertPolicy`, decided on the count over all ranks.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
from torch import nn

from latticequant.core.hessian import CrossGramAccumulator, HessianAccumulator
from latticequant.core.objective import output_factor, output_target
from latticequant.core.result import row_losses
from latticequant.formats.protocol import Format
from latticequant.methods.registry import LayerQuant, Method, row_chunks
from latticequant.pipeline.distributed import World, assign_owners, solve_cost
from latticequant.pipeline.experts import (
    ExpertMLP,
    ExpertPolicy,
    RoutedExperts,
    expert_layer_input,
    expert_of,
    experts_of,
    routed_input,
)
from latticequant.pipeline.forward import BlockInputs, StopForward, block_output
from latticequant.pipeline.layout import linear_weight, set_linear_weight
from latticequant.pipeline.memory import release_freed_memory
from latticequant.pipeline.target import TargetConfig, solve_layer

__all__ = ["HessianBank", "BlockQuantizer", "quantize_block_lazy", "quantize_block_batched"]


class HessianBank:
    """Hessians of a block's layers; layers fed the very same tensor share one accumulator.

    The latest input seen in the current batch is kept alive (the later layers of its group
    are checked against it), the earlier ones are followed by weak references: an equal
    address is the same tensor only while that tensor lives, and one freed since, whose memory
    may have been reused, is passed over. Holding them all kept every group's input alive to
    the block's end, on top of the MLP's activations at their peak.
    """

    def __init__(self, dtype: torch.dtype, device) -> None:
        self.dtype, self.device = dtype, device
        self.acc: dict[str, HessianAccumulator] = {}
        self.cross: dict[str, CrossGramAccumulator] = {}  # float-outputs: X^T X~ per input
        self.alias: dict[str, str] = {}
        self._batch_inputs: list[tuple[weakref.ref, str]] = []
        self._latest: torch.Tensor | None = None
        self.gram_s = 0.0  # seconds spent accumulating (host clock: the device's are queued)

    def new_batch(self) -> None:
        self._batch_inputs.clear()
        self._latest = None

    def _seen(self):
        """``(tensor, leader)`` for the inputs of this batch that are still alive."""
        for ref, leader in self._batch_inputs:
            seen = ref()
            if seen is not None:
                yield seen, leader

    def add(
        self,
        name: str,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        first_window: int = 0,
        source: torch.Tensor | None = None,
        float_x: torch.Tensor | None = None,
    ) -> None:
        """``source``: the tensor the layer really read, when ``x`` is built from it (an
        expert's routed tokens placed in their windows); layers that read the same source
        share one accumulator. ``float_x``: the float block's input of the same layer on the
        same tokens, whose cross Gram with ``x`` the float-outputs objective needs."""
        source = x if source is None else source
        for seen, leader in self._seen():
            if (
                leader != name
                and seen.data_ptr() == source.data_ptr()
                and seen.shape == source.shape
                and seen.stride() == source.stride()
                and seen.dtype == source.dtype
            ):
                self.alias[name] = leader
                return
        self._batch_inputs.append((weakref.ref(source), name))
        self._latest = source
        if name not in self.acc:
            self.acc[name] = HessianAccumulator(x.shape[-1], dtype=self.dtype, device=self.device)
        if mask is not None and mask.numel() * x.shape[-1] != x.numel():
            raise ValueError(f"cannot match the padding mask to the input of {name}")
        token_mask = None if mask is None else mask.reshape(x.shape[:-1])
        t0 = time.perf_counter()
        self.acc[name].add(x.detach(), token_mask, first_window)
        if float_x is not None:
            if name not in self.cross:
                self.cross[name] = CrossGramAccumulator(
                    x.shape[-1], dtype=self.dtype, device=self.device
                )
            self.cross[name].add(float_x.detach(), x.detach(), token_mask, first_window)
        self.gram_s += time.perf_counter() - t0

    def get(self, name: str) -> HessianAccumulator:
        return self.acc[self.alias.get(name, name)]

    def get_cross(self, name: str) -> CrossGramAccumulator | None:
        return self.cross.get(self.alias.get(name, name))

    def get_or_empty(self, name: str, d_in: int) -> HessianAccumulator:
        """The layer's accumulator; an empty one for an expert no token was routed to."""
        key = self.alias.get(name, name)
        if key not in self.acc:
            self.acc[key] = HessianAccumulator(d_in, dtype=self.dtype, device=self.device)
        return self.acc[key]

    def input_of(self, name: str) -> torch.Tensor | None:
        """The tensor ``name`` (or the layer it shares an accumulator with) read in this batch."""
        leader = self.alias.get(name, name)
        return next((x for x, n in self._seen() if n == leader), None)


class BlockQuantizer:
    """Quantizes the linear layers of one block with the configured method.

    Layers are quantized a group at a time (:meth:`quantize_group`); across ranks
    (:class:`~latticequant.pipeline.distributed.World`), the group's Hessians are reduced first,
    each row block (or whole layer) is solved by the rank the balance assigns, and every rank
    receives every result.
    ``solve_s`` adds up this rank's solve seconds. ``floats``: expert layers kept in float by
    the ``float`` fallback, with their stats.
    """

    def __init__(
        self,
        method: Method,
        configs: dict[str, object],
        hessian_dtype,
        device,
        world: World | None = None,
        experts: ExpertPolicy | None = None,
        target: TargetConfig | None = None,
        fmt: Format | None = None,
    ):
        self.method = method
        self.format = fmt  # what the method packs (its default when None)
        self.target = target if target is not None else TargetConfig()
        self.configs = configs  # local name -> config; only the layers to quantize
        self.hessian_dtype, self.device = hessian_dtype, device
        self.world = world if world is not None else World()
        self.experts = experts if experts is not None else ExpertPolicy()
        self.results: dict[str, LayerQuant] = {}
        self.floats: dict[str, dict] = {}
        self.solve_s = 0.0
        self.prefix = ""  # the block's name in the model, for layer names (rotation seeds)

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def _solve(
        self,
        name: str,
        module: nn.Module,
        hessian: tuple[torch.Tensor, int],
        cross: CrossGramAccumulator | None = None,
    ) -> LayerQuant:
        """One layer's result on its Hessian ``(H, n_tokens)``; any failure is an error naming
        the layer."""
        H, n_tokens = hessian
        W = linear_weight(module).detach()
        if W.dtype not in (torch.float32, torch.float64):
            W = W.float()
        t0 = time.perf_counter()
        try:
            C = None if cross is None else cross.H
            lq = solve_layer(
                self.method, W, H, self.configs[name], self.target, self.full_name(name), C,
                self.format,
            )  # fmt: skip
        except ValueError as exc:
            raise ValueError(f"cannot quantize {name}: {exc}") from exc
        elapsed = time.perf_counter() - t0
        self.solve_s += elapsed
        lq.stats.setdefault("time_s", elapsed)
        lq.stats["layer_time_s"] = elapsed
        lq.stats["n_tokens"] = n_tokens
        lq.stats["rank"] = self.world.rank
        return lq

    def quantize_group(
        self,
        block: nn.Module,
        accs: dict[str, HessianAccumulator],
        all_tokens: Callable[[list[str]], dict[str, HessianAccumulator]] | None = None,
        crosses: dict[str, CrossGramAccumulator] | None = None,
    ) -> None:
        """Quantize the layers of one group (``accs``: name -> its Hessian's accumulator) and
        write each ``Q`` into its layer (a layer meant to be quantized never stays in float,
        unless it is an expert the ``float`` fallback keeps so, which ``floats`` records).
        ``all_tokens(names)``: this rank's all-token accumulators of expert layers, for the
        ``all-tokens`` fallback (with the float-outputs objective, their cross Gram matrices
        too)."""
        accs = {n: acc for n, acc in accs.items() if n not in self.results}
        world = self.world
        reduced: dict[int, HessianAccumulator] = {}
        for acc in accs.values():  # layers that share an input share one reduction
            if id(acc) not in reduced:
                reduced[id(acc)] = world.reduce_hessian(acc) if world.distributed else acc
        solve_on, extra, fell = self._expert_fallbacks(block, accs, reduced, all_tokens)
        accs = {n: a for n, a in accs.items() if n not in self.floats}
        cross_on: dict[str, CrossGramAccumulator | None] = dict.fromkeys(accs)
        if self.target.float_outputs:
            own = [n for n in accs if n not in fell]  # a fallback's Hessian brings its own C
            if crosses is None or any(crosses.get(n) is None for n in own):
                raise RuntimeError("the float-outputs objective needs every layer's cross Gram")
            done: dict[int, CrossGramAccumulator] = {}
            cross_on.update({n: fell[n] for n in accs if n in fell})
            for name in own:
                c = crosses[name]
                if id(c) not in done:
                    done[id(c)] = world.reduce_hessian(c) if world.distributed else c
                cross_on[name] = done[id(c)]
        # the heap goes back once a group: the paused forward's freed temporaries before the
        # solves, and the solves' float64 temporaries after them (the forward resumes, and heap
        # kept from them would add to the activations' peak: 80 MB on the protocol's model).
        # Between one row block's solve and the next, the next reuses what the last freed:
        # giving it back each time only had it faulted in again (10% of a protocol block)
        release_freed_memory()
        self._solve_units(block, accs, solve_on, cross_on, extra)
        release_freed_memory()

    def _row_solver(self):
        """The method's row solver when its layers are solved by row blocks: every target but
        the rotated one (whose rotation is drawn for the whole layer's problem), every format
        but one that fixes each layer's grid itself (GGUF)."""
        if self.target.rotated or (self.format is not None and self.format.fixes_grid):
            return None  # a rotation or a file format's own grid is drawn for the whole layer
        return self.method.rows

    def _solve_units(self, block, accs, solve_on, cross_on, extra) -> None:
        """Solve the group's layers, a row block or a whole layer per unit of work, each unit
        on the rank the balance assigns it; every rank combines and writes every layer.

        A row-separable method's layer is cut into the fixed blocks of
        :func:`~latticequant.methods.registry.row_chunks`, each costing ``rows d_in^2``; a
        rank solving any block of a layer factors its H once for the whole group (layers that
        share an input share the factor). One process solves the same blocks in order."""
        world, rows = self.world, self._row_solver()
        units: dict[str, tuple[str, tuple[int, int] | None]] = {}
        costs: dict[str, float] = {}
        for name in accs:
            d_out, d_in = linear_weight(block.get_submodule(name)).shape
            if rows is None:
                units[name] = (name, None)
                costs[name] = solve_cost(d_out, d_in)
                continue
            for a, b in row_chunks(d_out):
                key = f"{name}#{a}"
                units[key] = (name, (a, b))
                costs[key] = float((b - a) * d_in * d_in)
        if world.distributed:
            owners = assign_owners(costs, world.size, world.loads)
        else:
            owners = dict.fromkeys(units, 0)
        caches: dict = {}
        if world.distributed and rows is not None and rows.prepare is not None:
            # the factors of the group's Hessians, made by all ranks together, in layer order
            for name in accs:
                cache_key = (id(solve_on[name]), _config_key(self.configs[name]))
                if cache_key in caches:
                    continue
                H, _ = _hessian(solve_on[name])
                caches[cache_key] = {}
                t0, sent = time.perf_counter(), world.timings["factor"]
                try:
                    rows.prepare(H, self.configs[name], caches[cache_key], world)
                except ValueError as exc:  # every rank takes the same decisions: all raise
                    raise ValueError(f"cannot quantize {name}: {exc}") from exc
                # the exchanges count as such (``timings["factor"]``), the rest as solving
                self.solve_s += time.perf_counter() - t0 - (world.timings["factor"] - sent)
        mine: dict[str, object] = {}
        error = None
        pending = dict.fromkeys(accs, 0)
        for name, _ in units.values():
            pending[name] += 1
        for key, (name, chunk) in units.items():
            if owners[key] != world.rank:
                continue
            try:
                if chunk is None:
                    mine[key] = self._solve(
                        name, block.get_submodule(name), _hessian(solve_on[name]), cross_on[name]
                    )
                    mine[key].stats.update(extra.get(name, {}))
                else:
                    mine[key] = self._solve_rows(
                        block, name, solve_on[name], chunk, caches, cross_on[name]
                    )
            except ValueError as exc:
                error = str(exc)
                break
            pending[name] -= 1
            if not world.distributed and not pending[name]:  # write before the next layer
                self._finish(block, name, units, mine, solve_on, extra)
                mine = {}
        if not world.distributed:
            if error is not None:
                raise ValueError(error)
            return
        done: dict[str, object] = {}
        for part in world.all_gather(mine, "results", error):
            done.update(part)
        for name in accs:
            self._finish(block, name, units, done, solve_on, extra)

    def _solve_rows(self, block, name: str, acc, chunk: tuple[int, int], caches: dict, cross):
        """One row block of a layer: ``(rank, seconds, part, target stats)``. With the
        float-outputs objective the block's rows of the target are made first, on a factor
        of H~ shared by the layer's blocks (:func:`~latticequant.core.objective.output_target`
        is row by row)."""
        rows = self.method.rows
        W = linear_weight(block.get_submodule(name)).detach()
        if W.dtype not in (torch.float32, torch.float64):
            W = W.float()
        H, _ = _hessian(acc)
        config = self.configs[name]
        cache = caches.setdefault((id(acc), _config_key(config)), {})
        context = self.method.context(self.format, self.full_name(name))
        a, b = chunk
        t0 = time.perf_counter()
        try:
            T, shift = W[a:b], None
            if self.target.float_outputs:
                if cross is None:
                    raise RuntimeError(f"{name}: the float-outputs objective needs C")
                key = ("C", id(cross))
                if key not in cache:
                    C = cross.H
                    cache[key] = (C, output_factor(H, C, self.target.damp))
                C, factor = cache[key]
                T64, used = output_target(T, H, C, self.target.damp, factor)
                shift = (float(row_losses(T64, H, T.to(torch.float64)).sum()), used)
                T = T64.to(W.dtype)
            part = rows.solve(T, H, config, context, a, cache)
        except ValueError as exc:
            raise ValueError(f"cannot quantize {name}: {exc}") from exc
        elapsed = time.perf_counter() - t0
        self.solve_s += elapsed
        return (self.world.rank, elapsed, part, shift)

    def _finish(self, block, name, units, done, solve_on, extra) -> None:
        """Write layer ``name`` from its solved units: the whole layer's result, or its row
        blocks combined (the same on every rank: the combination reads no H)."""
        keys = [k for k, (n, _) in units.items() if n == name]
        if units[keys[0]][1] is None:
            self._write(block, name, done[keys[0]])
            return
        solved = [done[k] for k in keys]
        W = linear_weight(block.get_submodule(name)).detach()
        if W.dtype not in (torch.float32, torch.float64):
            W = W.float()
        context = self.method.context(self.format, self.full_name(name))
        try:
            parts = [p for _, _, p, _ in solved]
            lq = self.method.rows.combine(parts, W, self.configs[name], context)
        except ValueError as exc:
            raise ValueError(f"cannot quantize {name}: {exc}") from exc
        if self.target.float_outputs:  # added block by block in row order, as one process does
            shifts = [s for *_, s in sorted(solved, key=lambda x: x[2].start)]
            lq.stats["objective"] = self.target.objective
            lq.stats["float_reference"] = self.target.reference
            lq.stats["target_shift"] = sum(s for s, _ in shifts)
            lq.stats["target_damp"] = shifts[0][1]
        elapsed = sum(t for _, t, _, _ in solved)
        lq.stats["layer_time_s"] = elapsed
        lq.stats["n_tokens"] = int(solve_on[name].n_tokens)
        ranks = sorted({r for r, *_ in solved})
        lq.stats["rank"] = solved[0][0]
        lq.stats["row_ranks"] = len(ranks)
        lq.stats.update(extra.get(name, {}))
        self._write(block, name, lq)

    def _write(self, block: nn.Module, name: str, lq: LayerQuant) -> None:
        """Write Q into its layer and keep the rest: from here on the layer's own weight is
        Q, in the model's dtype (a block of float32 copies beside it would be 0.9 GB at 8B)."""
        set_linear_weight(block.get_submodule(name), lq.Q)
        self.results[name] = replace(lq, Q=None)

    def _expert_fallbacks(self, block, accs, reduced, all_tokens):
        """The Hessian each layer is solved on, the stats of expert layers (their routed
        token count over all ranks and the fallback it called for) and, for the float-outputs
        objective, the cross Gram matrix that goes with each fallback's Hessian: every token's
        (``all-tokens``), or the identity itself (``rtn``: ``C = H``, the target stays ``W``).
        Every rank takes the same decisions (the counts are global), so collectives stay in
        step."""
        solve_on = {n: reduced[id(acc)] for n, acc in accs.items()}
        fell: dict[str, object] = {}
        extra: dict[str, dict] = {}
        policy = self.experts
        short = []
        for name in accs:
            if expert_of(block, name) is None:
                continue
            n = int(solve_on[name].n_tokens)
            extra[name] = {"expert_tokens": n, "expert_fallback": None}
            if policy.falls_back(n):
                extra[name]["expert_fallback"] = policy.fallback
                short.append(name)
        if not short:
            return solve_on, extra, fell
        world = self.world
        if policy.fallback == "all-tokens":
            if all_tokens is None:
                raise RuntimeError("the all-tokens fallback needs the block's inputs")
            local, local_cross = all_tokens(short)
            for name in short:
                acc = local[name]
                solve_on[name] = world.reduce_hessian(acc) if world.distributed else acc
                if name in local_cross:
                    c = local_cross[name]
                    fell[name] = world.reduce_hessian(c) if world.distributed else c
        elif policy.fallback == "rtn":
            for name in short:
                d_in = linear_weight(block.get_submodule(name)).shape[1]
                eye = torch.eye(d_in, dtype=self.hessian_dtype, device=self.device)
                solve_on[name] = fell[name] = _FixedHessian(eye, 0)
        else:  # float: recorded, left as it is
            for name in short:
                self.floats[name] = extra[name]
        return solve_on, extra, fell


def _config_key(config) -> object:
    """A key under which layers with equal configs share a factor (identity for configs that
    hold tensors, whose equality is not a truth value)."""
    try:
        hash(config)
        return (type(config), repr(config), hash(config))
    except TypeError:
        return id(config)


def _hessian(acc) -> tuple[torch.Tensor, int]:
    """A layer's ``(H, n_tokens)``. A group's accumulators have no use after its solves but
    to give the same H again (layers reading one input share one), so they are finished:
    H is made in the memory of their sums (:meth:`HessianAccumulator.finish`)."""
    finish = getattr(acc, "finish", None)
    return (finish() if callable(finish) else acc.H), int(acc.n_tokens)


class _FixedHessian:
    """A Hessian given outright (the identity of the ``rtn`` fallback)."""

    def __init__(self, H: torch.Tensor, n_tokens: int) -> None:
        self.H, self.n_tokens = H, n_tokens


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


def quantize_block_lazy(
    block,
    batch: BlockInputs,
    subsets,
    bq: BlockQuantizer,
    bank: HessianBank,
    float_block: nn.Module | None = None,
):
    """One pass: when the first layer of a group is about to run, the whole group (whose
    layers read the same input) is quantized on that input, then the forward goes on.

    ``float_block``: the block's float copy (the float-outputs objective). It runs once,
    first, on the batch's float hidden states, keeping what every layer reads in it for its
    group's cross Gram. The float copy never changes, so one pass serves every group: the
    batched path runs it up to each group again."""
    modules = {name: block.get_submodule(name) for name in bq.configs}
    groups = _group_of(subsets, bq.configs)
    float_x = {} if float_block is None else float_inputs(float_block, batch, list(modules))
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
            fx = float_x.get(name)
            for n in groups[name]:  # the group's float input goes once its cross Gram holds it
                float_x.pop(n, None)
            bank.add(name, args[0], batch.mask, batch.first_window, float_x=fx)
            acc = bank.get(name)
            crosses = None if fx is None else {n: bank.get_cross(name) for n in groups[name]}
            bq.quantize_group(block, {n: acc for n in groups[name]}, crosses=crosses)
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


def float_inputs(float_block: nn.Module, batch: BlockInputs, names: list[str]) -> dict:
    """What the layers ``names`` of the float block read on the batch's float hidden states
    (the forward stops once all have run). An expert layer's entry is its experts' input on
    every token, ``(B * T, d)``: the float router's choice is not the one that counts, the
    quantized block's is (:func:`_float_input`)."""
    sources = {n: _float_source(float_block, n) for n in names}
    wanted = list(dict.fromkeys(sources.values()))
    seen: dict[str, torch.Tensor] = {}

    def make_hook(source):
        def hook(module, args):
            seen[source] = args[0]
            if len(seen) == len(wanted):
                raise StopForward
            return None

        return hook

    handles = [float_block.get_submodule(s).register_forward_pre_hook(make_hook(s)) for s in wanted]
    try:
        float_block(batch.float_hidden, *batch.args, **batch.kwargs)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(wanted) - set(seen))
    if missing:
        raise RuntimeError(f"modules {missing} never ran in the float block")
    return {n: seen[s] for n, s in sources.items()}


def _float_source(float_block: nn.Module, name: str) -> str:
    """The module whose input :func:`float_inputs` captures for layer ``name``: the layer, or
    for an expert's layer the routed experts that hold it (``mlp.experts.3.up_proj`` ->
    ``mlp.experts``)."""
    return name if expert_of(float_block, name) is None else name.rsplit(".", 2)[0]


def _float_input(
    float_block: nn.Module,
    expert: ExpertMLP | None,
    name: str,
    fx: torch.Tensor,
    windows: tuple[int, int],
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """The float block's input of layer ``name`` on the tokens the quantized block gave it,
    placed in the windows as :func:`routed_input` places the quantized one: for an expert's
    layer, the float block's expert input (or the float expert's intermediate) at the rows
    the *quantized* router sent to ``expert``; other layers read every token in both."""
    if expert is not None:
        float_expert = float_block.get_submodule(name.rpartition(".")[0])
        fx = expert_layer_input(float_expert, name, fx, expert.routed_tokens)
    return routed_input(expert, fx, windows, mask)[0]


def quantize_block_batched(
    block,
    batches: list[BlockInputs],
    subsets,
    bq: BlockQuantizer,
    bank: HessianBank,
    float_block: nn.Module | None = None,
):
    """Group by group: capture the group's inputs over all batches (stopping the forward once
    the group has run), quantize it, then one last pass for the block's outputs.

    A group of expert layers is captured by whole forwards (an expert no token chose never
    runs, so nothing says when all have been seen) and may run the all-token passes of its
    fallbacks. ``float_block``: the block's float copy (the float-outputs objective): before
    each batch's pass its float inputs of the group are captured on the float hidden states,
    and each layer's cross Gram is accumulated beside its Hessian, an expert's on the tokens
    the quantized router sent it."""
    for subset in subsets:
        names = [n for n in subset if n in bq.configs]
        if not names:
            continue
        routed = {n for n in names if expert_of(block, n) is not None}
        pending: set[str] = set()
        current: dict = {}
        handles = []

        def make_hook(name, pending=pending, current=current, stop=not routed):
            expert = expert_of(block, name)

            def hook(module, args):
                x, mask = routed_input(expert, args[0], current["windows"], current["mask"])
                fx = current["float"].get(name)
                if fx is not None:
                    fx = _float_input(float_block, expert, name, fx, current["windows"], mask)
                bank.add(name, x, mask, current["first_window"], source=args[0], float_x=fx)
                current["called"].add(name)
                pending.discard(name)
                if not pending and stop:
                    raise StopForward
                return None

            return hook

        for name in names:
            handles.append(block.get_submodule(name).register_forward_pre_hook(make_hook(name)))
        try:
            for batch in batches:
                pending.clear()
                pending.update(set(names) - routed)
                current["mask"] = batch.mask
                current["first_window"] = batch.first_window
                current["windows"] = tuple(batch.hidden.shape[:2])
                current["called"] = set()
                current["float"] = (
                    {} if float_block is None else float_inputs(float_block, batch, names)
                )
                bank.new_batch()
                try:
                    block(batch.hidden, *batch.args, **batch.kwargs)
                except StopForward:
                    pass
                if pending:
                    raise RuntimeError(f"layers {sorted(pending)} were never called")
                missed = routed - current["called"]
                _add_empty_windows(block, bank, batch, missed, cross=float_block is not None)
                current["float"] = {}
        finally:
            for h in handles:
                h.remove()
        accs = {
            n: bank.get_or_empty(n, linear_weight(block.get_submodule(n)).shape[1]) for n in names
        }
        crosses = None if float_block is None else {n: bank.get_cross(n) for n in names}
        every = partial(all_token_hessians, block, batches, bank=bank, float_block=float_block)
        bq.quantize_group(block, accs, every, crosses)
    return [block_output(block(b.hidden, *b.args, **b.kwargs)) for b in batches]


def _add_empty_windows(
    block, bank: HessianBank, batch: BlockInputs, names: set[str], cross: bool = False
) -> None:
    """Empty leaves for the windows of a batch in which these expert layers never ran, so that
    their summation trees are the same whatever the batching (a zero added is exact, a tree
    with a gap is a different order of additions); ``cross``: in their cross Gram too."""
    B, T = batch.hidden.shape[:2]
    shared: dict = {}
    none = torch.zeros(B, T, dtype=torch.bool, device=batch.hidden.device)
    for name in sorted(names):
        d_in = linear_weight(block.get_submodule(name)).shape[1]
        key = (id(expert_of(block, name)), d_in)  # an expert's gate and up share one input
        if key not in shared:
            zero = torch.zeros(1, 1, d_in, dtype=batch.hidden.dtype, device=batch.hidden.device)
            shared[key] = zero.expand(B, T, d_in)
        zero = shared[key]
        bank.add(name, zero, none, batch.first_window, float_x=zero if cross else None)


def all_token_hessians(
    block,
    batches: list[BlockInputs],
    names: list[str],
    bank: HessianBank,
    float_block: nn.Module | None = None,
) -> tuple[dict[str, HessianAccumulator], dict[str, CrossGramAccumulator]]:
    """For expert layers ``names``: the Hessian of their input had every token of the block
    been routed to their expert (``gate``/``up``: the experts' input; ``down``: the expert's
    intermediate on it, after its quantized ``gate`` and ``up``), over this rank's batches.
    With ``float_block`` (the float-outputs objective), also each one's cross Gram with the
    float block's input of the same layer on every token (empty without)."""
    by_container: dict[int, tuple[RoutedExperts, list[str]]] = {}
    for name in names:
        container = experts_of(block, name)
        by_container.setdefault(id(container), (container, []))[1].append(name)

    def accumulators(kind) -> dict:
        d_in = {n: linear_weight(block.get_submodule(n)).shape[1] for n in names}
        return {n: kind(d_in[n], dtype=bank.dtype, device=bank.device) for n in names}

    accs = accumulators(HessianAccumulator)
    crosses = {} if float_block is None else accumulators(CrossGramAccumulator)
    current: dict = {}

    def make_hook(key, layers):
        def hook(module, args):
            B, T = current["windows"]
            h = args[0].reshape(B, T, -1)
            at = (current["mask"], current["first_window"])
            for name in layers:
                x = expert_layer_input(expert_of(block, name), name, h)
                accs[name].add(x, *at)
                if crosses:
                    fh = current["float"][name].reshape(B, T, -1)
                    crosses[name].add(expert_layer_input(expert_of(float_block, name), name, fh),
                                      x, *at)  # fmt: skip
            current["left"].discard(key)
            if not current["left"]:
                raise StopForward
            return None

        return hook

    handles = [c.register_forward_pre_hook(make_hook(k, ls)) for k, (c, ls) in by_container.items()]
    try:
        for batch in batches:
            current.update(
                windows=tuple(batch.hidden.shape[:2]),
                mask=batch.mask,
                first_window=batch.first_window,
                left=set(by_container),
                float={} if float_block is None else float_inputs(float_block, batch, names),
            )
            try:
                block(batch.hidden, *batch.args, **batch.kwargs)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return accs, crosses
