"""Checkpoint folders in the GPTQ layout, and a loader that runs them on the CPU.

A folder holds ``model.safetensors`` (each quantized layer as ``<module>.qweight/.qzeros/
.scales/.g_idx`` or its format's keys, every other tensor as is, a tied ``lm_head`` stored once),
``config.json`` with ``quantization_config``, ``quantize_config.json``, the tokenizer files and
``quant_log.json`` (per-layer statistics). Our own ``latticequant`` section of the quantization
config lists each quantized module with its format, bits and tensor shapes, so the loader can
check a checkpoint completely before using it.

The loader builds the model ``config.json`` describes with its parameters on ``meta`` and
materialises only what the file holds: the float tensors as read, each quantized layer as the
module its format builds from its tensors (the heap trimmed after each). Before anything is
used, each module's kind is read off its tensors, a tensor nothing reads is refused, and the
file-level config, what other tools read, is checked against the tensors by each module's
format (:func:`check_file_config`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from latticequant.formats import (
    GPTQ_KEYS,
    Format,
    FormatError,
    formats_storing,
    get_format,
    is_permuted,
)
from latticequant.formats.protocol import formats_reading, quant_methods
from latticequant.methods.registry import config_to_dict
from latticequant.pipeline.experts import unfuse_experts
from latticequant.pipeline.files import (
    INDEX_FILE,
    WEIGHTS_FILE,
    read_weight_map,
    save_tensors,
    write_json,
)
from latticequant.pipeline.layout import UnsupportedModelError, describe_model, linear_weight
from latticequant.pipeline.memory import release_freed_memory
from latticequant.pipeline.offload import empty_parameters, store_of

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "QuantizedLayer",
    "save_quantized",
    "load_quantized",
    "check_file_config",
    "is_quantized_checkpoint",
    "read_quant_log",
    "WEIGHTS_FILE",
    "LOG_FILE",
]

LOG_FILE = "quant_log.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
QUANT_METHODS = quant_methods()  # file-level quant_method values the loader reads


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, truncated, or does not match its config."""


FLOAT_FORMAT = "float"
"""The format of a planned layer kept in float on purpose (an expert's ``float`` fallback):
written as a float weight, named in the log's ``skipped`` with its reason."""


def float_reason(stats: Mapping) -> str:
    """Why an expert stayed in float: the ``float`` fallback, with its routed token count."""
    return f"expert fallback float ({stats.get('expert_tokens', 0)} routed tokens)"


@dataclass
class QuantizedLayer:
    """What the checkpoint needs of one quantized layer.

    ``tensors`` may be emptied once they are on disk (models kept on disk block by block);
    ``shapes`` still describes them. ``desc_act`` says whether the stored ``g_idx`` is permuted
    (read off the tensors themselves, never guessed from the order's name).
    """

    name: str
    format: str
    tensors: dict[str, torch.Tensor]
    stats: dict
    config: dict
    shapes: dict[str, list[int]] = field(default_factory=dict)
    desc_act: bool | None = None

    def __post_init__(self) -> None:
        if not self.shapes:
            self.shapes = {k: list(t.shape) for k, t in self.tensors.items()}
        if self.desc_act is None:
            g_idx = self.tensors.get("g_idx")
            group_size = self.config.get("group_size", -1)
            self.desc_act = g_idx is not None and is_permuted(g_idx, int(group_size))

    def without_tensors(self) -> QuantizedLayer:
        return dataclasses.replace(self, tensors={}, shapes=dict(self.shapes))


def _tied_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor shares storage with an earlier name (tied embeddings): alias -> kept."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _split_layers(layers: Mapping, skipped: Mapping[str, str] | None, layout):
    """``(quantized layers, why each other linear layer stays in float, those layers)``: the
    experts the float fallback kept join the skipped ones; a linear layer neither quantized
    nor skipped on request is an error, never a float layer written by accident."""
    kept = {n: float_reason(q.stats) for n, q in layers.items() if q.format == FLOAT_FORMAT}
    layers = {n: layer for n, layer in layers.items() if n not in kept}
    reasons = {**(skipped or {}), **kept}
    not_quantized = [n for n in layout.linear_names() if n not in layers]
    unexplained = [n for n in not_quantized if n not in reasons]
    if unexplained:
        raise CheckpointError(
            f"layer {unexplained[0]} is neither quantized nor skipped on request "
            f"({len(unexplained)} such layers): refusing to write it in float"
        )
    return layers, reasons, not_quantized


def _model_tensors(model, layers, layout, store) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's tensors to write (a tied one once; the blocks of a model kept on disk are
    written shard by shard instead) and the tied aliases."""
    state = model.state_dict()
    for name in layers:
        if f"{name}.weight" not in state:
            raise CheckpointError(f"quantized layer {name} has no weight in the model")
    in_blocks = f"{layout.block_path}."
    if store is not None:  # the blocks are on ``meta``
        state = {k: v for k, v in state.items() if not k.startswith(in_blocks)}
    aliases = _tied_aliases(state)
    return {name: t for name, t in state.items() if name not in aliases}, aliases


def _module_entries(
    model: nn.Module, layers: Mapping[str, QuantizedLayer], tensors: dict[str, torch.Tensor]
) -> dict[str, dict]:
    """The checkpoint's module table; each quantized layer's tensors replace its weight in
    ``tensors``."""
    modules = {}
    for name, layer in layers.items():
        tensors.pop(f"{name}.weight", None)
        d_out, d_in = linear_weight(model.get_submodule(name)).shape
        for key, t in layer.tensors.items():
            tensors[f"{name}.{key}"] = t
        modules[name] = {
            "format": layer.format,
            "bits": layer.config.get("bits"),
            "group_size": layer.config.get("group_size"),
            "sym": layer.config.get("sym"),
            "desc_act": bool(layer.desc_act),
            "in_features": int(d_in),
            "out_features": int(d_out),
            "keys": {k: list(v) for k, v in layer.shapes.items()},
        }
    return modules


def _file_config(
    fmt: Format,
    method,
    cfg: dict,
    overrides,
    aliases: dict,
    modules: dict,
    skipped: list[str],
    float_linears: list[str],
) -> dict:
    """The checkpoint's ``quantization_config``: the format's own file-level config for these
    layers (with, for GPTQ, GPTQModel's ``dynamic`` rules for skipped and overridden modules;
    for compressed-tensors, its ``ignore`` list), and our section with the module table (what
    our loader checks a checkpoint against)."""
    base = {
        "bits": cfg.get("bits"),
        "group_size": cfg.get("group_size", -1),
        "sym": bool(cfg.get("sym", True)),
        "desc_act": any(m["desc_act"] for m in modules.values()),
    }
    meta = {**cfg, "method": method.name}
    qconfig = fmt.layers_config(base, meta, modules, skipped, float_linears)
    qconfig["latticequant"] = {
        "method": method.name,
        "format": fmt.name,
        "config": cfg,
        "overrides": [
            {"pattern": o.pattern, "skip": o.skip, "changes": dict(o.changes)} for o in overrides
        ],
        "tied": aliases,
        "modules": modules,
    }
    return qconfig


def _block_shards(tensors: dict, store, layout, block_tensors: Callable[[int], Mapping]):
    """The shards of a model kept on disk: what is outside the blocks, then one block at a
    time, read from the store, its quantized layers' tensors from ``block_tensors``."""
    yield tensors
    for index in range(len(store)):
        prefix = layout.block_name(index)
        quantized = block_tensors(index)
        with store.block(index) as block:
            shard = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
        for name, layer in quantized.items():
            if layer.format == FLOAT_FORMAT:
                continue
            del shard[f"{name}.weight"]
            for key, t in layer.tensors.items():
                shard[f"{name}.{key}"] = t
        yield shard


def _write_weights(folder: Path, shards: Iterable[dict], n_shards: int = 1) -> None:
    """``model.safetensors``, or one file per shard and their index, each written durably.

    The index is written last: a folder with an index has all its shards.
    """
    if n_shards == 1:
        (tensors,) = list(shards)
        save_tensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        total += save_tensors(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    write_json(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        folder / INDEX_FILE,
    )


def save_quantized(
    model: nn.Module,
    folder: str | os.PathLike,
    layers: Mapping,
    *,
    method,
    config,
    fmt: Format | None = None,
    tokenizer=None,
    overrides=(),
    skipped: Mapping[str, str] | None = None,
    run: dict | None = None,
    block_tensors: Callable[[int], Mapping] | None = None,
    rotation: dict | None = None,
) -> None:
    """Write the checkpoint of ``model`` whose quantized layers are ``layers`` into ``folder``.

    ``layers`` maps module names to :class:`QuantizedLayer`; every other linear layer of the
    blocks must be in ``skipped`` (name -> why), so that no layer is written in float by
    accident. The folder must exist; each file is written under a temporary name, fsynced and
    renamed.

    A model whose blocks are kept on disk (:mod:`latticequant.pipeline.offload`) is written one
    block per shard, with ``model.safetensors.index.json``: each block is read back from the store,
    and its quantized layers' tensors from ``block_tensors(index)`` (the same mapping as
    ``layers``, for that block), so only one block is ever in memory. ``rotation``: the
    rotations folded into the model's weights, recorded in the config (and by the caller in
    ``run``, the log's).
    """
    folder = Path(folder)
    fmt = method.format() if fmt is None else fmt
    layout = describe_model(model)
    store = store_of(model)
    layers, reasons, not_quantized = _split_layers(layers, skipped, layout)
    if store is not None and block_tensors is None:
        raise ValueError("a model kept on disk needs block_tensors to write its quantized layers")
    tensors, aliases = _model_tensors(model, layers, layout, store)
    modules = _module_entries(model, layers, tensors)

    cfg = config_to_dict(config)
    float_linears = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers
    ]
    qconfig = _file_config(
        fmt, method, cfg, overrides, aliases, modules, not_quantized, float_linears
    )
    if rotation is not None:
        qconfig["latticequant"]["rotation"] = rotation

    if store is None:
        _write_weights(folder, [tensors])
    else:
        shards = _block_shards(tensors, store, layout, block_tensors)
        _write_weights(folder, shards, n_shards=1 + len(store))
    model_config = model.config.to_dict() if hasattr(model, "config") else {}
    model_config["quantization_config"] = qconfig
    write_json(model_config, folder / "config.json")
    if fmt.writes_quantize_config:
        write_json(qconfig, folder / QUANTIZE_CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    stats = [layers[n].stats for n in layout.linear_names() if n in layers]
    log = {"method": method.name, "config": cfg, "checkpoint_format": fmt.name, "run": run or {}}
    log.update(skipped={n: reasons[n] for n in not_quantized}, layers=stats)
    write_json(log, folder / LOG_FILE)


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object (got a {type(config).__name__})")
    return config


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def is_quantized_checkpoint(folder: str | os.PathLike) -> bool:
    """True for a folder whose config.json carries a quantization config the loader reads (GPTQ,
    compressed-tensors or ours)."""
    folder = Path(folder)
    try:
        config = _read_config(folder)
    except CheckpointError:
        return False
    qc = config.get("quantization_config") or {}
    return bool(formats_reading(qc))


def read_quant_log(folder: str | os.PathLike) -> dict:
    """The per-layer statistics a quantization run wrote next to its checkpoint."""
    path = Path(folder) / LOG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {LOG_FILE}: not a latticequant checkpoint")
    qlog = _read_json(path)
    if not isinstance(qlog, dict):
        raise CheckpointError(f"{path} is not a JSON object (got a {type(qlog).__name__})")
    layers = qlog.get("layers", [])
    if not isinstance(layers, list):
        raise CheckpointError(f"{path}: 'layers' must be a list of layer entries")
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise CheckpointError(f"{path}: layer entry {i} is not an object with a 'name'")
    return qlog


def _module_table(qc: dict, tensors: Mapping[str, torch.Tensor]) -> dict:
    """Quantized modules from our section, or inferred (other tools' checkpoints) by the
    formats of the file's ``quant_method``, else from ``.qweight`` keys (GPTQ)."""
    section = qc.get("latticequant")
    if section and "modules" in section:
        return section["modules"]
    for fmt in formats_reading(qc):
        try:
            modules = fmt.infer_modules(qc, tensors)
        except FormatError as exc:
            raise CheckpointError(f"{fmt.name} checkpoint: {exc}") from None
        if modules:
            return modules
    modules = {}
    for key in tensors:
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            modules[name] = {
                "format": "gptq",
                "bits": qc.get("bits"),
                "keys": {
                    k: list(tensors[f"{name}.{k}"].shape)
                    for k in GPTQ_KEYS
                    if f"{name}.{k}" in tensors
                },
            }
    return modules


def _entry_format(name: str, entry: Mapping, qc: Mapping) -> Format:
    """The registered format a module table entry names. Entries written before every format
    was registered under its own name say ``gptq`` with the file's ``checkpoint_format`` for the
    zero points, and ``"rotation": "hadamard"`` beside a rotated layer's format."""
    named = str(entry.get("format", "gptq"))
    if named == "gptq" and qc.get("checkpoint_format") == "gptq_v2":
        named = "gptq_v2"
    rotation = entry.get("rotation")
    if rotation not in (None, "hadamard"):
        raise CheckpointError(f"module {name}: unknown rotation {rotation!r}")
    if rotation:
        named = f"{named}+hadamard"
    try:
        return get_format(named)
    except FormatError as exc:
        raise CheckpointError(f"module {name}: {exc}") from None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards its index names."""
    index = folder / INDEX_FILE
    weight_map = read_weight_map(folder, CheckpointError)
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS_FILE).is_file():
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE} (nor {INDEX_FILE})")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{index} names {name}, which is missing")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path} is truncated or corrupt: {exc}") from None
    if weight_map is not None:
        absent = sorted(k for k, f in weight_map.items() if k not in tensors)
        if absent:
            raise CheckpointError(
                f"{index} lists tensor {absent[0]} in {weight_map[absent[0]]}, which lacks it"
            )
    return tensors


def _read_file_qc(folder: Path) -> dict | None:
    """quantize_config.json, or None when the folder has none."""
    path = folder / QUANTIZE_CONFIG_FILE
    if not path.is_file():
        return None
    qc = _read_json(path)
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path} is not a JSON object (got a {type(qc).__name__})")
    return qc


@dataclass
class _Checkpoint:
    """A checkpoint read and checked module by module, its model a skeleton on ``meta``."""

    qc: dict  # config.json's quantization_config
    file_qc: dict | None  # quantize_config.json
    tensors: dict[str, torch.Tensor]
    model: nn.Module
    modules: dict  # the module table
    formats: dict[str, Format]  # each quantized module's format, read off its tensors
    expected: dict[str, torch.Tensor]  # the skeleton's state (on meta)


def _read_checkpoint(folder: Path) -> _Checkpoint:
    """The checkpoint in ``folder``, each quantized module's tensors checked against its entry
    and its shape against the model ``config.json`` builds."""
    config = _read_config(folder)
    qc = config.pop("quantization_config", None)
    if not formats_reading(qc or {}):
        raise CheckpointError(
            f"{folder}/config.json has no quantization_config latticequant reads (GPTQ, "
            "compressed-tensors pack-quantized or its own)"
        )
    file_qc = _read_file_qc(folder)
    tensors = _load_weights(folder)
    model = _build_model(folder, config)
    modules = _module_table(qc, tensors)
    expected = model.state_dict(keep_vars=True)
    formats = {
        name: _checked_module(model, name, entry, qc, tensors, expected)
        for name, entry in modules.items()
    }
    return _Checkpoint(qc, file_qc, tensors, model, modules, formats, expected)


def check_file_config(folder: str | os.PathLike) -> None:
    """Refuse, in one :class:`CheckpointError` line, a checkpoint whose file-level quantization
    config (what GPTQModel, transformers and vLLM read: ``quant_method``, ``format``, ``bits``,
    ``group_size``, ``sym``, ``desc_act``, ``dynamic`` rules, a compressed-tensors config
    group) or whose ``quantize_config.json`` contradicts its stored tensors.
    :func:`load_quantized` runs it too."""
    _check_file_config(_read_checkpoint(Path(folder)))


def _check_file_config(ck: _Checkpoint) -> None:
    """Each module's format checks what the file-level config says of its layer; every linear
    layer of the blocks stored in float must be one the config skips; quantize_config.json, when
    present, must equal config.json's quantization_config (compared last, so that a
    contradiction config.json holds itself is named by its own message)."""
    qc = ck.qc
    for name, fmt in ck.formats.items():
        try:
            meta = fmt.module_meta(ck.modules[name], qc, name)
            layer = _layer_tensors(name, fmt, ck.tensors, ck.modules[name])
            fmt.check_file_config(name, layer, meta, qc)
        except FormatError as exc:
            raise CheckpointError(f"module {name}: {exc}") from None
    kinds = {fmt.name: fmt for fmt in ck.formats.values()}.values()
    for name in _float_linears(ck.model, ck.modules):
        for fmt in kinds:
            try:
                claim = fmt.layer_claim(name, qc)
            except FormatError as exc:
                raise CheckpointError(f"layer {name}: {exc}") from None
            if claim is not None:
                raise CheckpointError(
                    f"layer {name} is stored in float but the file-level config does not skip "
                    f"it: {fmt.name} readers would look for its quantized tensors"
                )
    if ck.file_qc is not None and ck.file_qc != qc:
        keys = sorted(set(ck.file_qc) | set(qc), key=str)
        diff = next(k for k in keys if ck.file_qc.get(k) != qc.get(k))
        raise CheckpointError(
            f"{QUANTIZE_CONFIG_FILE} differs from config.json's quantization_config (first at "
            f"{diff!r}: {ck.file_qc.get(diff)!r} against {qc.get(diff)!r})"
        )


def _float_linears(model: nn.Module, modules: Mapping) -> list[str]:
    """The blocks' linear layers stored in float (none known for an unknown architecture)."""
    try:
        names = describe_model(model).linear_names()
    except UnsupportedModelError:
        return []
    return [n for n in names if n not in modules]


def load_quantized(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    cache_weight: bool | None = None,
) -> nn.Module:
    """A model ready for inference from a checkpoint folder, its quantized layers as modules.

    ``cache_weight``: False keeps only the packed codes resident on the CPU path (each call
    dequantizes a tile at a time), True keeps a dense copy for speed, None (default) caches on
    the CPU path (see :class:`~latticequant.formats.gptq.QuantLinear`).

    The model is built with its parameters on ``meta``; only what the file holds is
    materialised (float tensors assigned as read, quantized modules built from their tensors,
    the heap trimmed after each). Before anything is used every module's kind is read off its
    tensors and checked against config.json, every expected tensor for presence and shape, every
    tensor of the file for a reader, and the file-level config against the tensors
    (:func:`check_file_config`); a failure raises :class:`CheckpointError` naming the tensor.
    """
    ck = _read_checkpoint(Path(folder))
    model, tensors, modules = ck.model, ck.tensors, ck.modules
    tied = _tie_map(model)
    _refuse_unused(tensors, ck.expected, modules, ck.formats, tied)
    _check_file_config(ck)
    _load_float_state(model, tensors, ck.expected, modules, tied)
    shared: dict[str, nn.Parameter] = {}  # one parameter per shared tensor, whoever reads it
    for name, entry in modules.items():
        fmt = ck.formats[name]
        module = _module(model, name, entry, ck.qc, fmt, tensors, cache_weight, shared)
        _set_module(model, name, module)
        for key in _own_keys(name, fmt, tensors):
            del tensors[f"{name}.{key}"]  # the module holds what it needs
        # unpacking and decoding temporaries grow glibc's mmap threshold; without this their
        # freed pages stay resident, module after module
        release_freed_memory()
    _check_nothing_on_meta(model)
    return model.to(device).eval()


def _build_model(folder: Path, config: dict) -> nn.Module:
    """The model ``config.json`` describes with every parameter on ``meta`` (buffers such as
    rotary frequencies real), experts split into one layer per matrix, as they are stored:
    nothing is allocated for the weights the checkpoint provides."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config.pop("model_type", None)
    if model_type is None:
        raise CheckpointError(f"{folder}/config.json names no model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **config)
        with empty_parameters():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot build a model from {folder}/config.json: {exc}") from None
    unfuse_experts(model)  # on meta, the per-expert layers are made on meta too
    return model


def _tie_map(model: nn.Module) -> dict[str, str]:
    """Parameter names that are the same parameter as an earlier name (tied embeddings, as the
    model config.json describes ties them): alias -> kept."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _checked_module(model, name: str, entry: Mapping, qc: Mapping, tensors, expected) -> Format:
    """The format of module ``name``, its tensors checked for presence and shape against its
    entry and its shape against the model config.json builds."""
    fmt = _entry_format(name, entry, qc)
    shared = set(fmt.shared_tensors(entry).values())  # its own key among them: not its kind's
    stored = {k[len(name) + 1 :] for k in tensors if k.startswith(f"{name}.") and k not in shared}
    stored -= {"bias"}
    kinds = [f.name for f in formats_storing(stored)]
    if kinds and fmt.name not in kinds:  # its tensors, not its entry, say what a module is
        raise CheckpointError(
            f"module {name} stores {', '.join(sorted(stored))}, the tensors of format "
            f"{' or '.join(kinds)}, but config.json says {fmt.name!r}: the checkpoint "
            "contradicts itself"
        )
    for key in fmt.keys:
        full = f"{name}.{key}"
        if full not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {full}")
        want = entry.get("keys", {}).get(key)
        if want is not None and list(tensors[full].shape) != list(want):
            raise CheckpointError(
                f"tensor {full} has shape {list(tensors[full].shape)}, expected {want}"
            )
    if f"{name}.weight" not in expected:
        raise CheckpointError(f"model built from config.json has no linear layer {name}")
    want_shape = tuple(linear_weight(model.get_submodule(name)).shape)
    have_shape = (entry.get("out_features"), entry.get("in_features"))
    if None not in have_shape and tuple(have_shape) != want_shape:
        raise CheckpointError(
            f"layer {name} is stored with shape {list(have_shape)} (out, in), config.json "
            f"gives {list(want_shape)}: checkpoint does not match config.json"
        )
    return fmt


def _refuse_unused(tensors, expected, modules, formats, tied) -> None:
    """Every tensor of the file is read by the model or by a quantized module's format: one
    that nothing reads (a transform whose module does not say it is rotated, a float weight
    beside a quantized layer's tensors, a head the config ties) would otherwise be dropped in
    silence, and the model run without it."""
    quantized = {f"{name}.weight" for name in modules}  # replaced by the format's tensors
    used = {k for k in expected if k not in tied and k not in quantized}
    for name, fmt in formats.items():
        used |= {f"{name}.{k}" for k in fmt.keys + fmt.optional_keys} | {f"{name}.bias"}
        used |= set(fmt.shared_tensors(modules[name]).values())
    unused = sorted(k for k in tensors if k not in used)
    if unused:
        raise CheckpointError(
            f"checkpoint tensor {unused[0]} is read by nothing config.json describes "
            f"({len(unused)} such tensors): the checkpoint contradicts its config"
        )


def _load_float_state(model, tensors, expected, modules, tied) -> None:
    """Every tensor the model has outside its quantized layers, read from the checkpoint and put
    in place of the skeleton's, then the tied parameters tied again."""
    quantized_params = {f"{n}.weight" for n in modules} | {f"{n}.bias" for n in modules}
    float_keys = []
    for key, t in expected.items():
        if key in quantized_params or key in tied:
            continue
        if key not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {key}")
        if tuple(tensors[key].shape) != tuple(t.shape):
            raise CheckpointError(
                f"tensor {key} has shape {list(tensors[key].shape)}, the model expects "
                f"{list(t.shape)} (checkpoint does not match config.json)"
            )
        float_keys.append(key)
    for key in float_keys:
        _assign(model, key, tensors[key])
    for alias, kept in tied.items():
        if alias not in quantized_params:
            path, _, leaf = alias.rpartition(".")
            module = model.get_submodule(path) if path else model
            module._parameters[leaf] = model.get_parameter(kept)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of parameter or buffer ``key``, in its dtype (as
    ``load_state_dict`` copies), without a second copy when the dtype already matches."""
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(
            tensor.to(old.dtype), requires_grad=old.requires_grad
        )
    else:
        module._buffers[leaf] = tensor.to(module._buffers[leaf].dtype)


def _check_nothing_on_meta(model: nn.Module) -> None:
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta:
                raise CheckpointError(
                    f"{kind} {name} was not set from the checkpoint: it holds no such tensor"
                )


def _own_keys(name: str, fmt: Format, tensors) -> tuple[str, ...]:
    """The keys of module ``name``'s own tensors that its format reads."""
    return fmt.keys + tuple(k for k in fmt.optional_keys if f"{name}.{k}" in tensors)


def _layer_tensors(
    name: str, fmt: Format, tensors, entry: Mapping, shared: dict | None = None
) -> dict[str, torch.Tensor]:
    """Module ``name``'s tensors that its format reads, by key: its own, and those it shares
    with other layers (:meth:`Format.shared_tensors`), each of these wrapped once in a
    parameter every reader holds when ``shared`` collects them (so a model moved to a device
    keeps one copy)."""
    out = {k: tensors[f"{name}.{k}"] for k in _own_keys(name, fmt, tensors)}
    for key, full in fmt.shared_tensors(entry).items():
        if full not in tensors:
            raise CheckpointError(f"module {name} reads tensor {full}, which the checkpoint lacks")
        if shared is None:
            out[key] = tensors[full]
            continue
        if full not in shared:
            shared[full] = nn.Parameter(tensors[full], requires_grad=False)
        out[key] = shared[full]
    return out


def _module(model, name, entry, qc, fmt: Format, tensors, cache_weight, shared) -> nn.Module:
    """The inference module of one quantized layer, built by its format."""
    original = model.get_submodule(name)
    bias = tensors.get(f"{name}.bias")
    if bias is None and getattr(original, "bias", None) is not None:
        raise CheckpointError(f"checkpoint is missing tensor {name}.bias")
    try:
        meta = {**fmt.module_meta(entry, qc, name), "cache_weight": cache_weight}
        return fmt.module(_layer_tensors(name, fmt, tensors, entry, shared), meta, bias)
    except FormatError as exc:
        raise CheckpointError(f"module {name}: {exc}") from None
