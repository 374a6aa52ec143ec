"""Checkpoint folders in the GPTQ layout, and a loader that runs them on the CPU.

A folder holds ``model.safetensors`` (each quantized layer as ``<module>.qweight/.qzeros/
.scales/.g_idx`` or its format's keys, every other tensor as is, a tied ``lm_head`` stored once),
``config.json`` with ``quantization_config``, ``quantize_config.json``, the tokenizer files and
``quant_log.json`` (per-layer statistics). Our own ``latticequant`` section of the quantization
config lists each quantized module with its format, bits and tensor shapes, so the loader can
check a checkpoint completely before using it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from latticequant.formats import (
    CHECKPOINT_FORMATS,
    ROTATION_KEYS,
    SUPPORTED_BITS,
    FormatError,
    build_module,
    format_names,
    get_format,
    is_permuted,
    quantize_config_dict,
    unpack_rotation,
    unpack_zeros,
)
from latticequant.formats.rotation import RotatedLinear
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
    "ModuleKind",
    "is_quantized_checkpoint",
    "read_quant_log",
    "WEIGHTS_FILE",
    "LOG_FILE",
]

LOG_FILE = "quant_log.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
OWN_QUANT_METHOD = "latticequant"  # quant_method of checkpoints with non-GPTQ layers
QUANT_METHODS = ("gptq", OWN_QUANT_METHOD)
ROTATED_FORMAT = "latticequant-hadamard"
"""``format`` of a checkpoint with rotated layers: their stored weights are ``W R`` and mean
nothing to a reader that does not apply ``R`` first, so no GPTQ reader may take them."""


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


def _dynamic_overrides(modules: dict, skipped: list[str], base: dict) -> dict:
    """GPTQModel's ``dynamic`` rules: ``-:`` skips a module, ``+:`` gives it other settings.

    ``desc_act`` needs no rule: the base value is true whenever any module's ``g_idx`` is
    permuted, and a reader that honours ``g_idx`` reads every module right.
    """
    dynamic: dict[str, dict] = {}
    for name in skipped:
        dynamic[f"-:^{name.replace('.', '[.]')}$"] = {}
    for name, m in modules.items():
        diff = {
            k: m[k]
            for k in ("bits", "group_size", "sym")
            if m.get(k) is not None and m[k] != base[k]  # None: the format has no such field
        }
        if diff:
            dynamic[f"+:^{name.replace('.', '[.]')}$"] = diff
    return dynamic


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
    tokenizer=None,
    checkpoint_format: str = "gptq",
    overrides=(),
    skipped: Mapping[str, str] | None = None,
    run: dict | None = None,
    block_tensors: Callable[[int], Mapping] | None = None,
) -> None:
    """Write the checkpoint of ``model`` whose quantized layers are ``layers`` into ``folder``.

    ``layers`` maps module names to :class:`QuantizedLayer`; every other linear layer of the
    blocks must be in ``skipped`` (name -> why), so that no layer is written in float by
    accident. The folder must exist; each file is written under a temporary name, fsynced and
    renamed.

    A model whose blocks are kept on disk (:mod:`latticequant.pipeline.offload`) is written one
    block per shard, with ``model.safetensors.index.json``: each block is read back from the store,
    and its quantized layers' tensors from ``block_tensors(index)`` (the same mapping as
    ``layers``, for that block), so only one block is ever in memory.
    """
    folder = Path(folder)
    layout = describe_model(model)
    store = store_of(model)
    kept = {
        n: float_reason(layer.stats) for n, layer in layers.items() if layer.format == FLOAT_FORMAT
    }
    layers = {n: layer for n, layer in layers.items() if n not in kept}
    skipped = {**(skipped or {}), **kept}
    if store is not None and block_tensors is None:
        raise ValueError("a model kept on disk needs block_tensors to write its quantized layers")
    state = model.state_dict()
    for name in layers:
        if f"{name}.weight" not in state:
            raise CheckpointError(f"quantized layer {name} has no weight in the model")
    in_blocks = f"{layout.block_path}."
    if store is not None:  # the blocks are on ``meta``; they are written shard by shard below
        state = {k: v for k, v in state.items() if not k.startswith(in_blocks)}
    aliases = _tied_aliases(state)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name in aliases:
            continue
        tensors[name] = t
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
        if "rot_signs" in layer.shapes:
            modules[name]["rotation"] = "hadamard"
    not_quantized = [n for n in layout.linear_names() if n not in layers]
    reasons = dict(skipped or {})
    unexplained = [n for n in not_quantized if n not in reasons]
    if unexplained:
        raise CheckpointError(
            f"layer {unexplained[0]} is neither quantized nor skipped on request "
            f"({len(unexplained)} such layers): refusing to write it in float"
        )

    cfg = config_to_dict(config)
    base = {
        "bits": cfg.get("bits"),
        "group_size": cfg.get("group_size", -1),
        "sym": bool(cfg.get("sym", True)),
        "desc_act": any(m["desc_act"] for m in modules.values()),
    }
    section = {
        "method": method.name,
        "format": method.format,
        "config": cfg,
        "overrides": [
            {"pattern": o.pattern, "skip": o.skip, "changes": dict(o.changes)} for o in overrides
        ],
        "tied": aliases,
        "modules": modules,
    }
    if base["bits"] in SUPPORTED_BITS:
        qconfig = quantize_config_dict(
            bits=base["bits"],
            group_size=base["group_size"],
            desc_act=base["desc_act"],
            sym=base["sym"],
            static_groups=bool(cfg.get("static_groups", False)),
            damp_percent=float(cfg.get("damp", 0.01)),
            true_sequential=True,
            checkpoint_format=checkpoint_format,
            meta={"method": method.name},
        )
    else:  # a method without a fixed code width (Huffman-coded codes)
        qconfig = {
            "bits": None,
            "group_size": base["group_size"],
            "desc_act": base["desc_act"],
            "true_sequential": True,
            "checkpoint_format": checkpoint_format,
        }
    # Other tools read GPTQ layers only; a checkpoint with other formats must not pass for one.
    formats_used = {m["format"] for m in modules.values()}
    rotated = any("rotation" in m for m in modules.values())
    plain = formats_used <= {"gptq"} and not rotated
    qconfig["quant_method"] = "gptq" if plain else OWN_QUANT_METHOD
    if rotated:
        qconfig["format"] = ROTATED_FORMAT
    dynamic = _dynamic_overrides(modules, not_quantized, base)
    if dynamic:
        qconfig["dynamic"] = dynamic
    qconfig["latticequant"] = section

    if store is None:
        _write_weights(folder, [tensors])
    else:

        def shards():
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

        _write_weights(folder, shards(), n_shards=1 + len(store))

    model_config = model.config.to_dict() if hasattr(model, "config") else {}
    model_config["quantization_config"] = qconfig
    write_json(model_config, folder / "config.json")
    write_json(qconfig, folder / QUANTIZE_CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    stats = [layers[n].stats for n in layout.linear_names() if n in layers]
    write_json(
        {
            "method": method.name,
            "config": cfg,
            "checkpoint_format": checkpoint_format,
            "run": run or {},
            "skipped": {n: reasons[n] for n in not_quantized},
            "layers": stats,
        },
        folder / LOG_FILE,
    )


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
    """True for a folder whose config.json carries a GPTQ or latticequant quantization config."""
    folder = Path(folder)
    try:
        config = _read_config(folder)
    except CheckpointError:
        return False
    qc = config.get("quantization_config") or {}
    return isinstance(qc, dict) and qc.get("quant_method") in QUANT_METHODS


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


@dataclass(frozen=True)
class ModuleKind:
    """What one quantized module's stored tensors say it is, whatever the config claims."""

    format: str  # a registered module format: gptq, ssqr, hptq
    rotated: bool  # it stores a Hadamard transform (its weights are ``W R``)
    keys: tuple[str, ...]  # the format's tensors it stores (suffixes, rotation excluded)

    @property
    def plain_gptq(self) -> bool:
        """Readable by any GPTQ reader: the GPTQ tensors alone, unrotated."""
        return self.format == "gptq" and not self.rotated

    def describe(self) -> str:
        return f"{'rotated ' if self.rotated else ''}{self.format}"


def _quantized_suffixes() -> dict[str, tuple[str, ...]]:
    """Each stored key a quantized module may hold -> the formats that store it."""
    owners: dict[str, tuple[str, ...]] = {}
    for name in format_names():
        fmt = get_format(name)
        for key in fmt.keys + fmt.optional_keys:
            owners[key] = owners.get(key, ()) + (name,)
    for key in ROTATION_KEYS:
        owners[key] = ()
    return owners


def _stored_modules(keys: Iterable[str]) -> dict[str, set[str]]:
    """Module name -> the quantized keys the file holds for it (``<module>.<key>``)."""
    suffixes = _quantized_suffixes()
    modules: dict[str, set[str]] = {}
    for key in keys:
        name, _, suffix = key.rpartition(".")
        if name and suffix in suffixes:
            modules.setdefault(name, set()).add(suffix)
    return modules


def _module_kind(name: str, stored: set[str]) -> ModuleKind:
    """The format of a module read off its tensors: the registered format that holds every one
    of them and lacks the fewest; a missing tensor, or tensors no one format holds, refused."""
    rotation = stored & set(ROTATION_KEYS)
    rest = stored - rotation
    if not rest:
        raise CheckpointError(
            f"module {name} stores a rotation ({', '.join(sorted(rotation))}) but no quantized "
            f"weight: checkpoint is missing tensor {name}.qweight (or its format's keys)"
        )
    fits = []
    for fname in format_names():
        fmt = get_format(fname)
        if rest <= set(fmt.keys + fmt.optional_keys):
            fits.append((len(set(fmt.keys) - rest), fname))
    if not fits:
        raise CheckpointError(
            f"module {name} stores tensors {sorted(rest)} that no one module format holds "
            f"(formats: {', '.join(format_names())})"
        )
    fits.sort()
    if len(fits) > 1 and fits[0][0] == fits[1][0]:
        raise CheckpointError(
            f"module {name}'s tensors {sorted(rest)} fit formats {fits[0][1]} and {fits[1][1]} "
            "alike: the checkpoint is incomplete"
        )
    fmt = get_format(fits[0][1])
    wanted = list(fmt.keys) + (list(ROTATION_KEYS) if rotation else [])
    missing = [k for k in wanted if k not in stored]
    if missing:
        raise CheckpointError(
            f"module {name} stores {', '.join(sorted(stored))} ({fmt.name}"
            f"{', rotated' if rotation else ''}) but not {missing[0]}: checkpoint is missing "
            f"tensor {name}.{missing[0]}"
        )
    return ModuleKind(
        fmt.name, bool(rotation), tuple(k for k in fmt.keys + fmt.optional_keys if k in rest)
    )


def _stored_bits(name: str, tensors: Mapping[str, torch.Tensor]) -> int:
    """The code width of a GPTQ-layout module: ``qweight`` rows x 32 over its inputs."""
    rows = tensors[f"{name}.qweight"].shape[0]
    d_in = tensors[f"{name}.g_idx"].numel()
    if d_in == 0 or (rows * 32) % d_in:
        raise CheckpointError(
            f"module {name}: qweight has {rows} rows for {d_in} inputs (g_idx), no whole code width"
        )
    return rows * 32 // d_in


def _check_module_entry(
    name: str, entry: Mapping, kind: ModuleKind, tensors: Mapping[str, torch.Tensor]
) -> None:
    """A config entry that contradicts the module's tensors is refused, in one line."""
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"module {name}: config.json's entry is not an object")
    claimed = entry.get("format", "gptq")
    try:
        get_format(claimed)
    except FormatError as exc:
        raise CheckpointError(f"module {name}: {exc}") from None
    if claimed != kind.format:
        raise CheckpointError(
            f"module {name}: config.json says format {claimed!r}, its tensors "
            f"({', '.join(kind.keys)}) are {kind.format!r}"
        )
    rotation = entry.get("rotation")
    if rotation not in (None, "hadamard"):
        raise CheckpointError(f"module {name}: unknown rotation {rotation!r}")
    if kind.rotated and not rotation:
        raise CheckpointError(
            f"module {name} stores a rotation ({', '.join(ROTATION_KEYS)}) but config.json's "
            'entry has no "rotation": "hadamard"; its weights are W R and cannot run unrotated'
        )
    if rotation and not kind.rotated:
        raise CheckpointError(
            f"module {name}: config.json says rotation {rotation!r}, "
            f"checkpoint is missing tensor {name}.rot_signs"
        )
    if "qweight" in kind.keys and entry.get("bits") is not None:
        bits = _stored_bits(name, tensors)
        if entry["bits"] != bits:
            raise CheckpointError(
                f"module {name}: config.json's entry says bits {entry['bits']!r}, its tensors "
                f"hold {bits}-bit codes"
            )
    for key in kind.keys + (ROTATION_KEYS if kind.rotated else ()):
        want = (entry.get("keys") or {}).get(key)
        full = f"{name}.{key}"
        if want is not None and list(tensors[full].shape) != list(want):
            raise CheckpointError(
                f"tensor {full} has shape {list(tensors[full].shape)}, expected {want}"
            )


def _module_table(
    qc: dict, kinds: Mapping[str, ModuleKind], tensors: Mapping[str, torch.Tensor]
) -> dict:
    """Each quantized module's entry: our section's, checked against its tensors, or (a
    checkpoint of another tool) the kinds read off the tensors."""
    section = qc.get("latticequant")
    if not (isinstance(section, dict) and "modules" in section):
        table = {}
        for name, kind in kinds.items():
            entry: dict = {"format": kind.format}
            if "qweight" in kind.keys:
                entry["bits"] = _stored_bits(name, tensors)
            if kind.rotated:
                entry["rotation"] = "hadamard"
            table[name] = entry
        return table
    table = section["modules"]
    if not isinstance(table, dict):
        raise CheckpointError("config.json's latticequant modules is not an object")
    for name, entry in table.items():
        if name not in kinds:
            fmt = entry.get("format", "gptq") if isinstance(entry, Mapping) else "gptq"
            first = get_format(fmt).keys[0] if fmt in format_names() else "qweight"
            raise CheckpointError(f"checkpoint is missing tensor {name}.{first}")
        _check_module_entry(name, entry, kinds[name], tensors)
    for name, kind in kinds.items():
        if name not in table:
            raise CheckpointError(
                f"checkpoint tensor {name}.{kind.keys[0]} is not used: config.json lists no "
                f"quantized module {name}"
            )
    return table


def _dynamic_rule(dynamic: Mapping, name: str) -> tuple[str, dict] | None:
    """GPTQModel's ``dynamic`` rule for module ``name``, first match wins: ``("-", {})`` for a
    skipped module, ``("+", overrides)`` for other settings, None when no rule matches."""
    for pattern, overrides in dynamic.items():
        sign, regex = ("-", pattern[2:]) if pattern.startswith("-:") else ("+", pattern)
        regex = regex.removeprefix("+:")
        try:
            if re.match(regex, name):
                return sign, dict(overrides or {}) if sign == "+" else {}
        except re.error as exc:
            raise CheckpointError(f"dynamic rule {pattern!r} is not a valid regex: {exc}") from None
    return None


def _group_counts_fit(g_idx: torch.Tensor, n_groups: int, group_size) -> bool:
    """Whether ``g_idx`` puts ``group_size`` inputs in each of ``n_groups`` groups (the last one
    the remainder); -1, or a size of at least the inputs, means one group."""
    d_in = g_idx.numel()
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        return False
    if group_size == -1 or group_size >= d_in:
        want = [d_in]
    elif group_size > 0:
        want = [group_size] * (d_in // group_size) + (
            [d_in % group_size] if d_in % group_size else []
        )
    else:
        return False
    if len(want) != n_groups:
        return False
    have = torch.bincount(g_idx.to(torch.int64), minlength=n_groups)
    return have.tolist() == want


def _check_file_config(
    qc: Mapping,
    kinds: Mapping[str, ModuleKind],
    tensors: Mapping[str, torch.Tensor],
    file_qc: Mapping | None = None,
    float_linears: Iterable[str] = (),
) -> None:
    """The file-level quantization config, what other tools read, checked against the tensors.

    ``qc`` is config.json's ``quantization_config``, ``file_qc`` quantize_config.json (None when
    absent), ``kinds`` each quantized module's kind (:func:`_module_kind`), ``float_linears``
    the targeted linear layers stored in float. GPTQModel ``dynamic`` rules are honoured:
    ``+:regex`` gives a module other bits/group size/sym, ``-:regex`` skips it.
    """
    method = qc.get("quant_method")
    if method not in QUANT_METHODS:
        raise CheckpointError(f"quant_method {method!r} is not one of {list(QUANT_METHODS)}")
    if method == "gptq":
        for name, kind in kinds.items():
            if not kind.plain_gptq:
                raise CheckpointError(
                    f"quant_method is 'gptq' but module {name} is {kind.describe()}: GPTQ readers "
                    f"would run it wrong (the checkpoint says {OWN_QUANT_METHOD!r})"
                )
    rotated = [n for n, k in kinds.items() if k.rotated]
    if rotated and qc.get("format") != ROTATED_FORMAT:
        raise CheckpointError(
            f"module {rotated[0]} is rotated but quantize config's format is "
            f"{qc.get('format')!r}, not {ROTATED_FORMAT!r}: the checkpoint is inconsistent"
        )
    if qc.get("format") == ROTATED_FORMAT and not rotated:
        raise CheckpointError(
            f"quantize config's format is {ROTATED_FORMAT!r} but no module is rotated"
        )
    checkpoint_format = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise CheckpointError(
            f"checkpoint_format {checkpoint_format!r} is not one of {list(CHECKPOINT_FORMATS)}"
        )
    if qc.get("format") not in (None, ROTATED_FORMAT, checkpoint_format):
        raise CheckpointError(
            f"quantize config's format {qc.get('format')!r} differs from its checkpoint_format "
            f"{checkpoint_format!r}"
        )
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, Mapping):
        raise CheckpointError("quantize config's dynamic is not an object")
    for name, kind in kinds.items():
        rule = _dynamic_rule(dynamic, name)
        if rule is not None and rule[0] == "-":
            raise CheckpointError(
                f"module {name} is stored quantized but a dynamic '-:' rule says it is skipped"
            )
        claim = {k: qc.get(k) for k in ("bits", "group_size", "sym")}
        claim.update(rule[1] if rule else {})
        if "qweight" not in kind.keys:  # a format without a fixed code width (Huffman codes)
            if claim["bits"] is not None:
                raise CheckpointError(
                    f"module {name} is {kind.format} (no fixed code width) but the quantize "
                    f"config says bits {claim['bits']!r}"
                )
            continue
        bits = _stored_bits(name, tensors)
        if claim["bits"] != bits:
            raise CheckpointError(
                f"module {name} stores {bits}-bit codes but the quantize config says "
                f"bits {claim['bits']!r}"
            )
        g_idx = tensors[f"{name}.g_idx"]
        n_groups = tensors[f"{name}.scales"].shape[0]
        if not _group_counts_fit(g_idx, n_groups, claim["group_size"]):
            raise CheckpointError(
                f"module {name} stores {n_groups} groups over {g_idx.numel()} inputs, not "
                f"group_size {claim['group_size']!r} as the quantize config says"
            )
        if is_permuted(g_idx, claim["group_size"]) and not qc.get("desc_act"):
            raise CheckpointError(
                f"module {name}'s g_idx is permuted (act-order) but desc_act is false: readers "
                "that skip g_idx would read it wrong"
            )
        if claim["sym"]:
            d_out = tensors[f"{name}.qweight"].shape[1]
            zeros = unpack_zeros(tensors[f"{name}.qzeros"], bits, d_out, checkpoint_format)
            if not bool((zeros == 2 ** (bits - 1)).all()):
                raise CheckpointError(
                    f"the quantize config says sym true but module {name} has zero points other "
                    f"than {2 ** (bits - 1)}"
                )
    for name in float_linears:
        rule = _dynamic_rule(dynamic, name)
        if rule is None or rule[0] != "-":
            raise CheckpointError(
                f"layer {name} is stored in float but no dynamic '-:' rule skips it: GPTQ "
                f"readers would look for {name}.qweight"
            )
    # last: a contradiction that config.json itself holds is named by its own message above
    if file_qc is not None and dict(file_qc) != dict(qc):
        keys = sorted(set(file_qc) | set(qc), key=str)
        diff = next(k for k in keys if file_qc.get(k) != qc.get(k))
        raise CheckpointError(
            f"{QUANTIZE_CONFIG_FILE} differs from config.json's quantization_config "
            f"(first at {diff!r}: {file_qc.get(diff)!r} against {qc.get(diff)!r})"
        )


def _read_file_qc(folder: Path) -> dict | None:
    """quantize_config.json, or None when the folder has none."""
    path = folder / QUANTIZE_CONFIG_FILE
    if not path.is_file():
        return None
    qc = _read_json(path)
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path} is not a JSON object (got a {type(qc).__name__})")
    return qc


def _quantization_config(folder: Path, config: dict) -> dict:
    qc = config.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") not in QUANT_METHODS:
        raise CheckpointError(f"{folder}/config.json has no GPTQ quantization_config")
    return qc


def _build_skeleton(folder: Path, config: dict) -> nn.Module:
    """The model of config.json with every parameter on ``meta`` (buffers such as rotary
    frequencies real): nothing is allocated for the weights the checkpoint provides."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise CheckpointError(f"{folder}/config.json names no model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **config)
        with empty_parameters():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot build a model from {folder}/config.json: {exc}") from None
    unfuse_experts(model, skeleton=True)  # experts are stored one linear layer per expert matrix
    return model


def _tie_map(model: nn.Module) -> dict[str, str]:
    """Parameter names that are the same parameter as an earlier name (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _float_linears(model: nn.Module, kinds: Mapping[str, ModuleKind]) -> list[str]:
    """The blocks' linear layers stored in float (none known for an unknown architecture)."""
    try:
        names = describe_model(model).linear_names()
    except UnsupportedModelError:
        return []
    return [n for n in names if n not in kinds]


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


def _retie(model: nn.Module, tied: Mapping[str, str]) -> None:
    for alias, kept in tied.items():
        path, _, leaf = alias.rpartition(".")
        module = model.get_submodule(path) if path else model
        module._parameters[leaf] = model.get_parameter(kept)


def _check_nothing_on_meta(model: nn.Module) -> None:
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta:
                raise CheckpointError(
                    f"{kind} {name} was not set from the checkpoint: it holds no such tensor"
                )


def _read_checkpoint(folder: Path):
    config = _read_config(folder)
    qc = _quantization_config(folder, config)
    file_qc = _read_file_qc(folder)
    tensors = _load_weights(folder)
    model = _build_skeleton(folder, config)
    stored = _stored_modules(tensors)
    kinds = {name: _module_kind(name, keys) for name, keys in stored.items()}
    return qc, file_qc, tensors, model, kinds


def check_file_config(folder: str | os.PathLike) -> None:
    """Refuse, in one :class:`CheckpointError` line, a checkpoint whose file-level quantization
    config (what GPTQModel, transformers and vLLM read: ``bits``, ``group_size``, ``sym``,
    ``desc_act``, ``quant_method``, ``format``, ``dynamic``) or whose quantize_config.json
    contradicts its stored tensors. :func:`load_quantized` runs it too."""
    folder = Path(folder)
    qc, file_qc, tensors, model, kinds = _read_checkpoint(folder)
    _module_table(qc, kinds, tensors)
    _check_file_config(qc, kinds, tensors, file_qc, _float_linears(model, kinds))


def load_quantized(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    cache_weight: bool | None = None,
) -> nn.Module:
    """A model ready for inference from a checkpoint folder, its quantized layers as modules.

    ``cache_weight``: False keeps only the packed codes resident on the CPU path (each call
    dequantizes a tile at a time), True keeps a dense copy for speed, None (default) caches on
    the CPU path (see :class:`~latticequant.formats.qlinear.QuantLinear`).

    The model is built with its parameters on ``meta``; only what the file holds is
    materialised (float tensors assigned as read, quantized modules built from their tensors).
    Before anything is used every module's kind is read off its tensors and checked against
    config.json, the file-level config against the tensors (:func:`check_file_config`), and
    every expected tensor for presence and shape; a tensor the loader would not use, a missing
    or mismatched one, or a contradicting config raises :class:`CheckpointError` naming it.
    """
    folder = Path(folder)
    qc, file_qc, tensors, model, kinds = _read_checkpoint(folder)
    modules = _module_table(qc, kinds, tensors)
    _check_file_config(qc, kinds, tensors, file_qc, _float_linears(model, kinds))
    checkpoint_format = qc.get("checkpoint_format", qc.get("format", "gptq"))
    expected = model.state_dict(keep_vars=True)
    tied = _tie_map(model)

    consumed = set()
    for name, entry in modules.items():
        kind = kinds[name]
        consumed.update(f"{name}.{k}" for k in kind.keys + (ROTATION_KEYS if kind.rotated else ()))
        if f"{name}.weight" not in expected:
            raise CheckpointError(f"model built from config.json has no linear layer {name}")
        want_shape = tuple(linear_weight(model.get_submodule(name)).shape)
        have_shape = (entry.get("out_features"), entry.get("in_features"))
        if None not in have_shape and tuple(have_shape) != want_shape:
            raise CheckpointError(
                f"layer {name} is stored with shape {list(have_shape)} (out, in), config.json "
                f"gives {list(want_shape)}: checkpoint does not match config.json"
            )
        has_bias = getattr(model.get_submodule(name), "bias", None) is not None
        if has_bias and f"{name}.bias" not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {name}.bias")
        if f"{name}.bias" in tensors:
            consumed.add(f"{name}.bias")

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
    consumed.update(float_keys)
    for alias, kept in tied.items():  # a file that stores a tied tensor twice
        if alias in tensors and alias not in quantized_params:
            if not torch.equal(tensors[alias], tensors.get(kept, tensors[alias][:0])):
                raise CheckpointError(
                    f"checkpoint tensor {alias} differs from {kept}, to which config.json ties it"
                )
            consumed.add(alias)
    unused = sorted(k for k in tensors if k not in consumed)
    if unused:
        raise CheckpointError(
            f"checkpoint tensor {unused[0]} is not used by the model config.json describes "
            f"({len(unused)} such tensors): the checkpoint does not match its config"
        )

    for key in float_keys:
        _assign(model, key, tensors[key])
    _retie(model, tied)

    for name, entry in modules.items():
        kind = kinds[name]
        layer_tensors = {k: tensors[f"{name}.{k}"] for k in kind.keys}
        meta = {
            "bits": entry.get("bits", qc.get("bits")),
            "checkpoint_format": checkpoint_format,
            "cache_weight": cache_weight,
        }
        for k in ("in_features", "out_features"):
            if k in entry:
                meta[k] = entry[k]
        try:
            module = build_module(kind.format, layer_tensors, meta, tensors.get(f"{name}.bias"))
            if kind.rotated:
                stored = {k: tensors[f"{name}.{k}"] for k in ROTATION_KEYS}
                n_in = int(
                    entry.get("in_features", linear_weight(model.get_submodule(name)).shape[1])
                )
                module = RotatedLinear(unpack_rotation(stored, n_in), module)
        except FormatError as exc:
            raise CheckpointError(f"module {name}: {exc}") from None
        _set_module(model, name, module)
        for k in layer_tensors:
            del tensors[f"{name}.{k}"]  # the module holds what it needs
        # unpacking and decoding temporaries grow glibc's mmap threshold; without this their
        # freed pages stay resident, module after module, and the load ends several times
        # larger than what the model holds
        release_freed_memory()
    _check_nothing_on_meta(model)
    return model.to(device).eval()
