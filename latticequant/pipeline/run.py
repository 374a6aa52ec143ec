"""Quantize a causal LM block by block, feeding each block the outputs of the quantized ones.

:func:`quantize_model` is a composition of named steps: resolve the method and its config,
plan every linear layer (its config, or why it is skipped; the method refuses what its format
cannot store, before any forward pass), open the output folder (or resume an unfinished run),
capture the first block's inputs, quantize the blocks in turn (:mod:`latticequant.pipeline.blocks`),
and write the checkpoint (:mod:`latticequant.pipeline.checkpoint`), renamed into place only when
complete (:mod:`latticequant.pipeline.state`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from latticequant.methods import Method, UnsupportedConfigError, config_to_dict, get_method
from latticequant.pipeline.blocks import (
    BlockQuantizer,
    HessianBank,
    quantize_block_batched,
    quantize_block_lazy,
)
from latticequant.pipeline.checkpoint import (
    FLOAT_FORMAT,
    QuantizedLayer,
    float_reason,
    save_quantized,
)
from latticequant.pipeline.distributed import World, shard_range
from latticequant.pipeline.experts import ExpertPolicy, has_experts, unfuse_experts
from latticequant.pipeline.forward import BlockInputs, capture_first_block_inputs
from latticequant.pipeline.layout import (
    ModelLayout,
    describe_model,
    linear_weight,
    set_linear_weight,
)
from latticequant.pipeline.memory import check_run_memory, release_freed_memory
from latticequant.pipeline.offload import BlockStore, store_of
from latticequant.pipeline.overrides import Override, resolve_config, skip_reason
from latticequant.pipeline.state import (
    ResumeMismatchError,
    RunState,
    fingerprint,
    finish_output,
    prepare_output,
)
from latticequant.pipeline.target import TargetConfig, check_target

log = logging.getLogger(__name__)

__all__ = ["LayerPlan", "QuantizeSummary", "check_target_model", "plan_layers", "quantize_model"]


@dataclass
class LayerPlan:
    """What the run does with every linear layer of the model's blocks.

    configs: block index -> local layer name -> its config (the layers to quantize).
    skipped: full layer name -> why it stays in float (only what the user asked for).
    """

    configs: dict[int, dict[str, object]]
    skipped: dict[str, str]

    @property
    def n_quantized(self) -> int:
        return sum(len(c) for c in self.configs.values())

    def names(self, layout: ModelLayout) -> list[str]:
        """Full names of the layers to quantize, in the layout's order."""
        return [
            f"{layout.block_name(i)}.{local}"
            for i, block in self.configs.items()
            for local in block
        ]


@dataclass
class QuantizeSummary:
    """What a run did: one stats dict per quantized layer (in order), the layers skipped and
    why, and the time spent. Iterating over it, indexing it and ``len`` go over ``layers``."""

    layers: list[dict]
    skipped: dict[str, str] = field(default_factory=dict)
    time_s: float = 0.0
    blocks_resumed: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.layers)

    def __getitem__(self, index):
        return self.layers[index]


def _resolve_method(method: str | Method, config, checkpoint_format: str):
    """The registered method and a config of its class, carrying the checkpoint format."""
    if isinstance(method, str):
        method = get_method(method)
    if config is None:
        config = method.config_cls()
    if not isinstance(config, method.config_cls):
        raise ValueError(
            f"method {method.name!r} needs a {method.config_cls.__name__}, got "
            f"{type(config).__name__}"
        )
    if isinstance(getattr(config, "extra", None), dict):
        config = dataclasses.replace(
            config, extra={**config.extra, "checkpoint_format": checkpoint_format}
        )
    return method, config


def _check_run_inputs(calib_ids, attention_mask, batch_size, device) -> tuple[int, torch.device]:
    """Validate the calibration tensors and the device; returns ``(batch_size, device)``."""
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise ValueError("calib_ids must be a non-empty (n_windows, seqlen) tensor of token ids")
    if attention_mask is not None and attention_mask.shape != calib_ids.shape:
        raise ValueError("attention_mask must have the shape of calib_ids")
    batch_size = calib_ids.shape[0] if batch_size is None else int(batch_size)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available here")
    return batch_size, device


def check_target_model(layout: ModelLayout, target: TargetConfig) -> None:
    """Refuse a target the model's architecture cannot take, before any slow work."""
    if target.float_outputs and any(has_experts(b) for b in layout.blocks):
        raise ValueError(
            "--objective float-outputs is not supported for mixture-of-experts models (the "
            "float and quantized blocks route tokens differently); use --objective layer"
        )


def plan_layers(
    layout: ModelLayout,
    method: Method,
    config,
    overrides: Sequence[Override],
    blocks: tuple[int, int] | None = None,
    target: TargetConfig | None = None,
) -> LayerPlan:
    """Every linear layer's config after the overrides, each checked by the method (and by
    the rotation of ``target``, which needs a size it can factor).

    ``blocks``: ``(start, end)``, only the blocks ``start <= i < end`` are quantized; the
    layers of the others are skipped, saying so.

    Raises :class:`~latticequant.methods.UnsupportedConfigError` naming the first layer the
    method's format cannot store (so nothing slow has run yet), and ``ValueError`` when the
    skip patterns leave nothing to quantize.
    """
    n = len(layout.blocks)
    if blocks is not None and not 0 <= blocks[0] < blocks[1] <= n:
        raise ValueError(
            f"--blocks {blocks[0]}:{blocks[1]} is not a range of this model's {n} blocks "
            f"(START:END with 0 <= START < END <= {n})"
        )
    configs: dict[int, dict[str, object]] = {}
    skipped: dict[str, str] = {}
    for index in range(n):
        block = layout.blocks[index]
        configs[index] = {}
        outside = blocks is not None and not blocks[0] <= index < blocks[1]
        for subset in layout.subsets_of(index):
            for local in subset:
                name = f"{layout.block_name(index)}.{local}"
                if outside:
                    skipped[name] = f"outside --blocks {blocks[0]}:{blocks[1]}"
                    continue
                cfg = resolve_config(name, config, overrides)
                if cfg is None:
                    skipped[name] = skip_reason(name, overrides) or "skipped"
                    continue
                d_out, d_in = linear_weight(block.get_submodule(local)).shape
                try:
                    method.check(cfg, int(d_out), int(d_in))
                except UnsupportedConfigError as exc:
                    raise UnsupportedConfigError(
                        f"{name} ({method.name}, {d_out}x{d_in}): {exc}"
                    ) from None
                if target is not None:
                    check_target(target, name, int(d_in))
                configs[index][local] = cfg
    plan = LayerPlan(configs, skipped)
    if plan.n_quantized == 0:
        raise ValueError(
            f"no layer left to quantize: the skip patterns match all {len(skipped)} linear layers"
        )
    return plan


def _resume(
    model: nn.Module,
    state: RunState | None,
    store: BlockStore | None,
    batches: list[BlockInputs],
    work: Path | None,
    world: World,
) -> tuple[dict[str, QuantizedLayer], int]:
    """Put the finished blocks' quantized weights back and the next block's inputs in place.

    Only rank 0 holds the run state; it sends every other rank the finished blocks' weights
    and the inputs of their own windows, so any number of ranks resumes any run.
    """
    start = world.broadcast(0 if state is None else state.next_block(), "resume")
    layers: dict[str, QuantizedLayer] = {}
    for i in range(start):
        done, Qs, source = {}, None, None  # what rank 0 reads and sends
        if state is not None:
            done, Qs = state.load_block(i)
            source = state.source_checksum(i)
        light = {name: layer.without_tensors() for name, layer in done.items()}
        Qs, source, light = world.broadcast((Qs, source, light), "resume")
        if world.rank != 0:
            done = light
        if store is not None:
            store.load(i)
            if store.checksums[i] != source:
                store.release(i)
                raise ResumeMismatchError(
                    f"the weights of block {i} on disk changed since it was quantized; delete "
                    f"{work or 'the unfinished output'} or pass resume=False (--no-resume) to "
                    "start over"
                )
        for name, q in Qs.items():
            set_linear_weight(model.get_submodule(name), q)
        if store is not None:
            store.save_block(i, [f"{name}.weight" for name in Qs])
            store.release(i)
            done = {name: layer.without_tensors() for name, layer in done.items()}
        layers.update(done)
    if start:
        saved = None if state is None else state.load_hidden()
        saved = world.broadcast(saved, "resume")
        hidden = saved[0]
        float_hidden = saved[1] if len(saved) > 1 else None
        if (float_hidden is None) != (batches[0].float_hidden is None):
            raise ResumeMismatchError(
                "the unfinished run was made with another --objective; delete "
                f"{work or 'the unfinished output'} or pass resume=False (--no-resume)"
            )
        for b in batches:
            rows = slice(b.first_window, b.first_window + b.hidden.shape[0])
            b.hidden = hidden[rows].clone()
            if float_hidden is not None:
                b.float_hidden = float_hidden[rows].clone()
        log.info("resumed after %d finished blocks", start)
    return layers, start


def _quantize_block(
    layout: ModelLayout,
    index: int,
    method: Method,
    configs: dict[str, object],
    batches: list[BlockInputs],
    device: torch.device,
    hessian_dtype: torch.dtype,
    world: World,
    experts: ExpertPolicy,
    target: TargetConfig,
) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor], float]:
    """Quantize block ``index`` in place on ``device``; its outputs become ``batches``' inputs.

    Returns the block's layers (experts the ``float`` fallback keeps in float among them, with
    format ``"float"`` and no tensors), their weights and this rank's solve seconds."""
    block = layout.blocks[index]
    prefix = layout.block_name(index)
    block.to(device)
    on_device = [b.to(device) for b in batches]
    bq = BlockQuantizer(method, configs, hessian_dtype, device, world, experts, target)
    bq.prefix = prefix
    bank = HessianBank(hessian_dtype, device)
    subsets = layout.subsets_of(index)
    float_block = copy.deepcopy(block) if target.float_outputs else None
    if len(on_device) == 1 and not has_experts(block) and float_block is None:
        outputs = quantize_block_lazy(block, on_device[0], subsets, bq, bank)
    else:
        outputs = quantize_block_batched(block, on_device, subsets, bq, bank, float_block)
    if float_block is not None:  # the float model's next hidden states, then the copy goes
        for b, b_dev in zip(batches, on_device):
            b.float_hidden = b_dev.run(float_block).to("cpu")
        del float_block
    block.to("cpu")
    layers, Qs = {}, {}
    for local, stats in bq.floats.items():
        name = f"{prefix}.{local}"
        W = linear_weight(block.get_submodule(local))
        entry = {"name": name, "block": index, "method": "float", "shape": list(W.shape)}
        layers[name] = QuantizedLayer(
            name, FLOAT_FORMAT, {}, {**entry, **stats}, config_to_dict(configs[local])
        )
        Qs[name] = W.detach().contiguous()
    for local, lq in bq.results.items():
        name = f"{prefix}.{local}"
        W = linear_weight(block.get_submodule(local))
        entry = {"name": name, "block": index, "method": method.name, "shape": list(W.shape)}
        layers[name] = QuantizedLayer(
            name,
            method.format,
            {k: v.cpu() for k, v in lq.tensors.items()},
            {**entry, **lq.stats},
            config_to_dict(configs[local]),
        )
        Qs[name] = W.detach().contiguous()  # Q as written into the layer
    for b, h in zip(batches, outputs):
        b.hidden = h.to("cpu")
    return layers, Qs, bq.solve_s


def _keep_block(
    index: int,
    layers: dict[str, QuantizedLayer],
    Qs: dict[str, torch.Tensor],
    batches: list[BlockInputs],
    state: RunState | None,
    store: BlockStore | None,
    world: World,
    saving: bool,
    n_windows: int,
) -> dict[str, QuantizedLayer]:
    """Record a finished block: its state on disk (so a rerun resumes after it; rank 0 gathers
    every rank's block outputs for it) and, for a model kept on disk, its quantized weights in
    the store (codes are read back at save time)."""
    if saving:
        rows = [len(shard_range(n_windows, r, world.size)) for r in range(world.size)]
        hidden = [world.gather_rows(torch.cat([b.hidden for b in batches]), rows, "gather")]
        if batches[0].float_hidden is not None:  # the float model's, for the float objective
            mine = torch.cat([b.float_hidden for b in batches])
            hidden.append(world.gather_rows(mine, rows, "gather"))
        if state is not None:
            source = None if store is None else store.checksums[index]
            state.save_block(index, layers, Qs, hidden, source)
    if store is not None:
        store.save_block(index, [f"{name}.weight" for name in Qs])
        store.release(index)
    if store is not None or world.rank != 0:  # only rank 0 writes the checkpoint
        layers = {name: layer.without_tensors() for name, layer in layers.items()}
    return layers


def _summarize(
    layout: ModelLayout,
    plan: LayerPlan,
    layers: dict[str, QuantizedLayer],
    time_s: float,
    resumed: int,
    timings: dict[str, float] | None = None,
) -> QuantizeSummary:
    """The run's summary; a planned layer without a result is an error, never a float layer."""
    names = plan.names(layout)
    missing = [name for name in names if name not in layers]
    if missing:
        raise RuntimeError(f"{len(missing)} layers were not quantized, the first {missing[0]}")
    floats = {n: float_reason(layers[n].stats) for n in names if layers[n].format == FLOAT_FORMAT}
    return QuantizeSummary(
        [layers[name].stats for name in names if name not in floats],
        {**plan.skipped, **floats},
        time_s,
        resumed,
        timings or {},
    )


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    tokenizer,
    calib_ids: torch.Tensor,
    method: str | Method = "gptq",
    config=None,
    out_dir: str | os.PathLike | None = None,
    *,
    overrides: Iterable[Override] = (),
    resume: bool = True,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
    checkpoint_format: str = "gptq",
    hessian_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    on_block_done: Callable[[int], None] | None = None,
    world: World | None = None,
    run_info: dict | None = None,
    blocks: tuple[int, int] | None = None,
    experts: ExpertPolicy | None = None,
    target: TargetConfig | None = None,
) -> QuantizeSummary:
    """Quantize ``model``'s decoder blocks in place; write a checkpoint to ``out_dir`` if given.

    calib_ids: ``(n_windows, seqlen)`` token ids; ``attention_mask`` marks real tokens (padding
    never enters a Hessian). ``config`` is an instance of the method's config class (its
    defaults when None). ``overrides`` skip modules or change their config by name pattern.
    ``batch_size`` windows per forward (all at once by default: one pass per block).
    ``world``: the ranks sharing the run (:mod:`latticequant.pipeline.distributed`); every rank
    passes the same arguments, runs its share of the windows and ends with the same quantized
    model, identical to one process's; rank 0 writes ``out_dir``.
    Returns a :class:`QuantizeSummary` (a sequence of one stats dict per quantized layer).
    Every layer not skipped by an override is quantized, or the run fails naming it.
    Mixture-of-experts models have their fused experts split into per-expert linear layers
    first (:mod:`latticequant.pipeline.experts`); ``experts`` says what an expert with too few
    routed tokens is quantized on (``ExpertPolicy()`` by default). ``target`` chooses the
    problem each layer solves (:class:`~latticequant.pipeline.target.TargetConfig`: the
    float-outputs objective, the Hadamard rotation; each layer's own weights by default).
    """
    world = World() if world is None else world
    experts = ExpertPolicy() if experts is None else experts
    target = TargetConfig() if target is None else target
    with world.failing_together():  # the other ranks stop with this rank's line
        return _quantize_model(
            model, tokenizer, calib_ids, method, config, out_dir, overrides, resume, overwrite,
            device, attention_mask, batch_size, checkpoint_format, hessian_dtype, progress,
            on_block_done, world, run_info or {}, blocks, experts, target,
        )  # fmt: skip


def _quantize_model(
    model, tokenizer, calib_ids, method, config, out_dir, overrides, resume, overwrite, device,
    attention_mask, batch_size, checkpoint_format, hessian_dtype, progress, on_block_done, world,
    run_info, blocks, experts, target,
) -> QuantizeSummary:  # fmt: skip
    method, config = _resolve_method(method, config, checkpoint_format)
    overrides = list(overrides)
    _check_run_inputs(calib_ids, attention_mask, batch_size, device)
    unfuse_experts(model)
    layout = describe_model(model)
    model.eval()
    check_target_model(layout, target)
    plan = plan_layers(layout, method, config, overrides, blocks, target)
    last = max(i for i, c in plan.configs.items() if c)  # no block after it needs running
    store = store_of(model)  # blocks kept on disk: one in memory at a time
    check_run_memory(
        model,
        layout,
        calib_ids.shape[0],
        calib_ids.shape[1],
        batch_size,
        torch.device(device),
        hessian_dtype,
        world.size,
        target.float_outputs,
        target.rotated,
    )

    output = None
    if out_dir is not None and world.rank == 0:
        run_fingerprint = fingerprint(
            model,
            method,
            config,
            overrides,
            calib_ids,
            attention_mask,
            {
                "checkpoint_format": checkpoint_format,
                "batch_size": batch_size,
                **({"blocks": list(blocks)} if blocks else {}),
                **({} if target.is_default else {"target": dataclasses.asdict(target)}),
                **(
                    {"experts": dataclasses.asdict(experts)}
                    if any(has_experts(b) for b in layout.blocks)
                    else {}
                ),
            },
        )
        output = prepare_output(out_dir, overwrite, resume, run_fingerprint)
    state = None if output is None else output[2]

    share = world.shard(calib_ids.shape[0])
    ids = calib_ids[share.start : share.stop]
    mask = None if attention_mask is None else attention_mask[share.start : share.stop]
    batch_size, device = _check_run_inputs(ids, mask, batch_size, device)
    batches = capture_first_block_inputs(model, layout, ids, mask, batch_size, share.start)
    if target.float_outputs:  # the float model's hidden states, equal up to the first block
        for b in batches:
            b.float_hidden = b.hidden
    work = None if output is None else output[1]
    layers, start = _resume(model, state, store, batches, work, world)

    t_start = time.perf_counter()
    comm_before = dict(world.timings)
    solve_s = 0.0
    parked = contextlib.nullcontext() if store is None else store.parked_outside()
    bar = tqdm(
        range(start, last + 1),
        desc=f"quantize ({method.name})",
        unit="block",
        disable=not progress or world.rank != 0,
    )
    with parked:  # embeddings and head go back to disk while the blocks are quantized
        for index in bar:
            if store is not None:
                store.load(index)
            block_layers, Qs, block_solve_s = _quantize_block(
                layout,
                index,
                method,
                plan.configs[index],
                batches,
                device,
                hessian_dtype,
                world,
                experts,
                target,
            )
            solve_s += block_solve_s
            layers.update(
                _keep_block(
                    index,
                    block_layers,
                    Qs,
                    batches,
                    state,
                    store,
                    world,
                    out_dir is not None,
                    calib_ids.shape[0],
                )
            )
            del block_layers, Qs  # the block's quantized weights are on disk or in the model now
            release_freed_memory()  # a block's freed temporaries must not set the next one's peak
            if on_block_done is not None:
                on_block_done(index)
    time_s = time.perf_counter() - t_start
    comm = {k: t - comm_before.get(k, 0.0) for k, t in world.timings.items()}
    timings = {
        "forward_s": time_s - solve_s - sum(comm.values()),
        "solve_s": solve_s,
        **{f"{kind}_s": t for kind, t in comm.items()},
        "ranks": world.size,
    }
    summary = _summarize(layout, plan, layers, time_s, start, timings)

    error = None
    if output is not None:
        final, work, state = output
        try:
            save_quantized(
                model,
                work,
                layers,
                method=method,
                config=config,
                tokenizer=tokenizer,
                checkpoint_format=checkpoint_format,
                overrides=overrides,
                skipped=plan.skipped,
                block_tensors=None
                if store is None
                else (lambda i: state.load_block(i)[0] if i <= last else {}),
                run={
                    **run_info,
                    "quantize_time_s": summary.time_s,
                    "n_windows": calib_ids.shape[0],
                    "seqlen": calib_ids.shape[1],
                    "blocks_resumed": start,
                    "ranks": world.size,
                    **({} if target.is_default else {"target": dataclasses.asdict(target)}),
                },
            )
            finish_output(final, work)
        except (OSError, ValueError) as exc:
            if not world.distributed:
                raise
            error = str(exc).splitlines()[0]
    if out_dir is not None:
        world.barrier(error)  # every rank learns whether rank 0's checkpoint is written
    return summary
