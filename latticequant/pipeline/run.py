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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from latticequant.methods import config_to_dict
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
from latticequant.pipeline.experts import has_experts
from latticequant.pipeline.forward import BlockInputs, capture_first_block_inputs
from latticequant.pipeline.gguf_file import write_gguf
from latticequant.pipeline.layout import ModelLayout, linear_weight, set_linear_weight
from latticequant.pipeline.memory import release_freed_memory
from latticequant.pipeline.offload import BlockStore, store_of
from latticequant.pipeline.spec import LayerPlan, Plan
from latticequant.pipeline.state import (
    ResumeMismatchError,
    RunState,
    fingerprint,
    finish_output,
    prepare_output,
)
from latticequant.pipeline.target import layer_format

log = logging.getLogger(__name__)

__all__ = ["Calibration", "QuantizeSummary", "quantize_model"]


@dataclass
class Calibration:
    """The calibration windows a run quantizes on.

    ids: ``(n_windows, seqlen)`` token ids; attention_mask: real tokens (padding never enters a
    Hessian); tokenizer: the one that made them, saved with the checkpoint.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    tokenizer: object = None

    def __post_init__(self) -> None:
        ids = self.ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
            raise ValueError("calibration ids must be a non-empty (n_windows, seqlen) tensor")
        if self.attention_mask is not None and self.attention_mask.shape != ids.shape:
            raise ValueError("attention_mask must have the shape of the calibration ids")


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
    plan: Plan, index: int, batches: list[BlockInputs]
) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor], dict[str, float]]:
    """Quantize block ``index`` in place on the plan's device; its outputs become ``batches``'
    inputs.

    Returns the block's layers (experts the ``float`` fallback keeps in float among them, with
    format ``"float"`` and no tensors), their weights and this rank's seconds of solves and of
    Hessian accumulation."""
    layout, method, device = plan.layout, plan.method, plan.device
    configs = plan.layers.configs[index]
    target = plan.spec.target
    block = layout.blocks[index]
    prefix = layout.block_name(index)
    block.to(device)
    on_device = [b.to(device) for b in batches]
    bq = BlockQuantizer(
        method, configs, plan.hessian_dtype, device, plan.world, plan.spec.experts, target,
        plan.format,
    )  # fmt: skip
    bq.prefix = prefix
    bank = HessianBank(plan.hessian_dtype, device)
    subsets = layout.subsets_of(index)
    float_block = copy.deepcopy(block) if target.float_outputs else None
    if len(on_device) == 1 and not has_experts(block):
        outputs = quantize_block_lazy(block, on_device[0], subsets, bq, bank, float_block)
    else:
        outputs = quantize_block_batched(block, on_device, subsets, bq, bank, float_block)
    if float_block is not None:  # the next block's reference (docs/targets.md)
        for b, b_dev, out in zip(batches, on_device, outputs):
            b.float_hidden = _next_reference(target.reference, float_block, b_dev, out).to("cpu")
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
            layer_format(plan.format, target, name).name,
            {k: v.cpu() for k, v in lq.tensors.items()},
            {**entry, **lq.stats},
            config_to_dict(configs[local]),
        )
        Qs[name] = W.detach().contiguous()  # Q as written into the layer
    for b, h in zip(batches, outputs):
        b.hidden = h.to("cpu")
    return layers, Qs, {"solve_s": bq.solve_s, "hessian_s": bank.gram_s}


def _next_reference(
    reference: str, float_block: nn.Module, batch: BlockInputs, output: torch.Tensor
) -> torch.Tensor:
    """The next block's float reference hidden states: this float block on the quantized
    stream (``previous-block``), on this block's reference (``model``), or the quantized
    block's ``output`` itself, the next block's quantized input (``block``)."""
    if reference == "model":
        return batch.run(float_block, batch.float_hidden)
    if reference == "block":
        return output
    return batch.run(float_block)


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
        if batches[0].float_hidden is not None:  # the float-outputs reference's
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
    calibration: Calibration | torch.Tensor,
    plan: Plan,
    *,
    on_block_done: Callable[[int], None] | None = None,
    run_info: dict | None = None,
) -> QuantizeSummary:
    """Quantize ``model``'s decoder blocks in place as ``plan`` says (made by
    :func:`~latticequant.pipeline.spec.prepare` from a
    :class:`~latticequant.pipeline.spec.RunSpec`); write the checkpoint to the spec's ``out``
    if it names one.

    ``calibration``: the windows (a :class:`Calibration`, or a ``(n_windows, seqlen)`` tensor
    of token ids), of the shape the plan was prepared for. Under torch.distributed every rank
    passes the same arguments, runs its share of the windows and ends with the same quantized
    model, identical to one process's; rank 0 writes the checkpoint. Every layer not skipped
    is quantized, or the run fails naming it. Returns a :class:`QuantizeSummary`.
    """
    if not isinstance(calibration, Calibration):
        calibration = Calibration(calibration)
    want = (plan.spec.calibration.nsamples, plan.spec.calibration.seqlen)
    if tuple(calibration.ids.shape) != want:
        raise ValueError(
            f"the calibration has {calibration.ids.shape[0]} windows of "
            f"{calibration.ids.shape[1]} tokens, the plan was prepared for {want[0]} of "
            f"{want[1]}: prepare it with CalibrationSpec(nsamples={calibration.ids.shape[0]}, "
            f"seqlen={calibration.ids.shape[1]})"
        )
    with plan.world.failing_together():  # the other ranks stop with this rank's line
        return _quantize_model(model, calibration, plan, on_block_done, run_info or {})


def _quantize_model(
    model: nn.Module,
    calibration: Calibration,
    plan: Plan,
    on_block_done: Callable[[int], None] | None,
    run_info: dict,
) -> QuantizeSummary:
    spec, world, layout = plan.spec, plan.world, plan.layout
    calib_ids, attention_mask = calibration.ids, calibration.attention_mask
    out_dir = spec.output.out
    last = max(i for i, c in plan.layers.configs.items() if c)  # no block after it needs running
    store = store_of(model)  # blocks kept on disk: one in memory at a time

    output = None
    folder = plan.stored_format.container == "folder"  # else one file, written at the end
    if out_dir is not None and world.rank == 0 and folder:
        run_fingerprint = fingerprint(
            model,
            plan.method,
            plan.config,
            spec.overrides,
            calib_ids,
            attention_mask,
            spec.fingerprint_extra(layout, plan.format),
        )
        output = prepare_output(out_dir, spec.output.overwrite, spec.output.resume, run_fingerprint)
    state = None if output is None else output[2]

    share = world.shard(calib_ids.shape[0])
    ids = calib_ids[share.start : share.stop]
    mask = None if attention_mask is None else attention_mask[share.start : share.stop]
    batch_size = ids.shape[0] if spec.execution.batch_size is None else spec.execution.batch_size
    batches = capture_first_block_inputs(model, layout, ids, mask, batch_size, share.start)
    if spec.target.float_outputs:  # the reference's hidden states, equal up to the first block
        for b in batches:
            b.float_hidden = b.hidden
    work = None if output is None else output[1]
    layers, start = _resume(model, state, store, batches, work, world)

    time_s, timings = _quantize_blocks(
        model, plan, batches, layers, range(start, last + 1), state, store, on_block_done
    )
    summary = _summarize(layout, plan.layers, layers, time_s, start, timings)
    if out_dir is not None and folder:
        _save(model, plan, calibration, layers, output, summary, run_info, last, store)
    elif out_dir is not None:
        _save_container(model, plan, layers, store)
    return summary


def _quantize_blocks(
    model: nn.Module,
    plan: Plan,
    batches: list[BlockInputs],
    layers: dict[str, QuantizedLayer],
    indices: range,
    state: RunState | None,
    store: BlockStore | None,
    on_block_done: Callable[[int], None] | None,
) -> tuple[float, dict[str, float]]:
    """Quantize the blocks ``indices`` in turn, recording each (``layers`` receives them);
    returns the seconds they took and how those split into forwards, Hessian accumulation,
    solves, the run state's writes and exchanges."""
    world = plan.world
    t_start = time.perf_counter()
    comm_before = dict(world.timings)
    parts = {"solve_s": 0.0, "hessian_s": 0.0, "state_io_s": 0.0}
    parked = contextlib.nullcontext() if store is None else store.parked_outside()
    bar = tqdm(
        indices,
        desc=f"quantize ({plan.method.name})",
        unit="block",
        disable=not plan.spec.execution.progress or world.rank != 0,
    )
    saving = plan.spec.output.out is not None
    n_windows = plan.spec.calibration.nsamples
    with parked:  # embeddings and head go back to disk while the blocks are quantized
        for index in bar:
            if store is not None:
                store.load(index)
            block_layers, Qs, block_parts = _quantize_block(plan, index, batches)
            for key, seconds in block_parts.items():
                parts[key] += seconds
            t_keep, kept_comm = time.perf_counter(), sum(world.timings.values())
            layers.update(
                _keep_block(
                    index, block_layers, Qs, batches, state, store, world, saving, n_windows
                )
            )
            parts["state_io_s"] += time.perf_counter() - t_keep
            parts["state_io_s"] -= sum(world.timings.values()) - kept_comm  # gathers: exchanges
            del block_layers, Qs  # the block's quantized weights are on disk or in the model now
            release_freed_memory()  # a block's freed temporaries must not set the next one's peak
            if on_block_done is not None:
                on_block_done(index)
    time_s = time.perf_counter() - t_start
    comm = {k: t - comm_before.get(k, 0.0) for k, t in world.timings.items()}
    timings = {
        "forward_s": time_s - sum(parts.values()) - sum(comm.values()),
        **parts,
        **{f"{kind}_s": t for kind, t in comm.items()},
        "ranks": world.size,
    }
    return time_s, timings


def _write_gguf(model, plan, layers) -> None:
    spec = plan.spec
    write_gguf(
        model,
        layers,
        plan.stored_format,
        spec.output.out,
        spec.output.gguf_source,
        plan.stored_format.name,
    )


#: The single-file containers a format may write (:attr:`Format.container`), by container.
CONTAINER_WRITERS = {"gguf": _write_gguf}


def _save_container(model, plan, layers, store) -> None:
    """Rank 0 writes the single file of a format whose container is not a folder."""
    container = plan.stored_format.container
    if store is not None:
        raise ValueError(f"a {container} file is not written from a model kept on disk yet")
    if container not in CONTAINER_WRITERS:
        raise ValueError(f"no writer for the {container} container")
    if plan.world.rank == 0:
        CONTAINER_WRITERS[container](model, plan, layers)
    plan.world.barrier(None)


def _save(model, plan, calibration, layers, output, summary, run_info, last, store) -> None:
    """Rank 0 writes the checkpoint into the work folder and renames it into place; every
    rank learns whether that worked."""
    spec, world = plan.spec, plan.world
    error = None
    if output is not None:
        final, work, state = output
        try:
            save_quantized(
                model,
                work,
                layers,
                method=plan.method,
                config=plan.config,
                fmt=plan.stored_format,
                tokenizer=calibration.tokenizer,
                overrides=spec.overrides,
                skipped=plan.layers.skipped,
                block_tensors=None
                if store is None
                else (lambda i: state.load_block(i)[0] if i <= last else {}),
                run={
                    **run_info,
                    "quantize_time_s": summary.time_s,
                    "n_windows": calibration.ids.shape[0],
                    "seqlen": calibration.ids.shape[1],
                    "blocks_resumed": summary.blocks_resumed,
                    "ranks": world.size,
                    **(
                        {}
                        if spec.target.is_default
                        else {"target": dataclasses.asdict(spec.target)}
                    ),
                    **({} if plan.fold is None else {"rotation": plan.fold.as_dict()}),
                },
                rotation=None if plan.fold is None else plan.fold.as_dict(),
            )
            finish_output(final, work)
        except (OSError, ValueError) as exc:
            if not world.distributed:
                raise
            error = str(exc).splitlines()[0]
    world.barrier(error)  # every rank learns whether rank 0's checkpoint is written
