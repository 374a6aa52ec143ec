"""Quantize a causal LM block by block, feeding each block the outputs of the quantized ones.

The inputs of the first decoder block are captured once (its forward is interrupted), with the
keyword arguments the model passes (attention mask, positions, rotary embeddings). Each block
then runs on the compute device with every calibration window at once, and each of its linear
layers is quantized *just before it runs*: a forward pre-hook sees the layer's whole input,
accumulates the Hessian, quantizes the layer and writes ``Q`` into its weight, and the forward
continues with the quantized layer. So every layer's Hessian comes from inputs that already went
through the quantized layers before it, which is true-sequential quantization (GPTQ's
``--true-sequential``, in its finest form), and the same single pass yields the block's output,
the next block's input. One forward pass per block in all.

When the windows are processed in smaller batches (``batch_size``), a layer cannot be quantized
before every batch has reached it, so each group of layers of the architecture's description is
captured by a pass that stops as soon as the group has run, then quantized, and one last pass
gives the block's output.

After each block its quantized tensors, statistics and the next block's inputs are written to
``OUT.partial/state``; a rerun with the same settings resumes after the last finished block. The
checkpoint is written into ``OUT.partial`` and renamed to ``OUT`` only when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from latticequant.hessian import HessianAccumulator
from latticequant.methods import LayerQuant, Method, get_method
from latticequant.models import ModelLayout, describe_model, linear_weight, set_linear_weight

log = logging.getLogger(__name__)

__all__ = [
    "Override",
    "parse_override",
    "QuantizedLayer",
    "OutputExistsError",
    "ResumeMismatchError",
    "quantize_model",
    "resolve_config",
    "config_to_dict",
]

STATE_DIR = "state"
PARTIAL_SUFFIX = ".partial"
HIDDEN_FILE = "hidden.safetensors"


class OutputExistsError(ValueError):
    """The output folder exists and overwriting was not asked for."""


class ResumeMismatchError(ValueError):
    """Saved per-block state was made with other settings than the current run."""


@dataclass(frozen=True)
class Override:
    """Settings for the modules whose full name matches ``pattern`` (``re.search``).

    skip: leave the module in float. changes: config fields to replace (``{"bits": 3}``).
    Later overrides win over earlier ones.
    """

    pattern: str
    skip: bool = False
    changes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"override pattern {self.pattern!r} is not a regex: {exc}") from None

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def parse_override(text: str, config_cls: type | None = None) -> Override:
    """``PATTERN:field=value[,field=value]`` or ``PATTERN:skip`` into an :class:`Override`.

    Values are converted to the type of the field's default in ``config_cls``.
    """
    pattern, sep, spec = text.rpartition(":")
    if not sep or not pattern or not spec:
        raise ValueError(f"override {text!r} must look like PATTERN:bits=3 or PATTERN:skip")
    if spec.strip() == "skip":
        return Override(pattern, skip=True)
    defaults = {}
    if config_cls is not None:
        defaults = {f.name: f for f in dataclasses.fields(config_cls)}
    changes = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"override {text!r}: {item!r} is not field=value")
        if defaults and key not in defaults:
            raise ValueError(
                f"override {text!r}: unknown field {key!r}; fields: {', '.join(sorted(defaults))}"
            )
        changes[key] = _convert(value.strip(), defaults.get(key), config_cls)
    return Override(pattern, changes=changes)


def _literal(value: str):
    """A flag value without a known field type: int, float, true/false, or the string."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _convert(value: str, fld, config_cls):
    if fld is None:
        return _literal(value)
    default = None
    if fld.default is not dataclasses.MISSING:
        default = fld.default
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{fld.name} expects true/false, got {value!r}")
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{fld.name} expects an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{fld.name} expects a number, got {value!r}") from None
    return value


def resolve_config(name: str, config, overrides: Sequence[Override]):
    """The config of module ``name`` after the overrides, or None when it is skipped."""
    for ov in overrides:
        if ov.matches(name):
            if ov.skip:
                config = None
            elif config is not None:
                config = dataclasses.replace(config, **ov.changes)
    return config


def config_to_dict(config) -> dict:
    """A config dataclass as JSON-ready values (tensors become lists; ``extra`` is dropped)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.name == "extra":
            continue
        value = getattr(config, f.name)
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        out[f.name] = value
    return out


@dataclass
class QuantizedLayer:
    """What the checkpoint needs of one quantized layer.

    ``tensors`` may be emptied once they are on disk (models kept on disk block by block);
    ``shapes`` still describes them.
    """

    name: str
    format: str
    tensors: dict[str, torch.Tensor]
    stats: dict
    config: dict
    shapes: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shapes:
            self.shapes = {k: list(t.shape) for k, t in self.tensors.items()}

    def without_tensors(self) -> QuantizedLayer:
        return dataclasses.replace(self, tensors={}, shapes=dict(self.shapes))


class _Stop(Exception):
    """Raised inside a forward to stop it once what was needed has been seen."""


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@dataclass
class _Batch:
    """Inputs of the current block for one batch of windows."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    mask: torch.Tensor | None  # (batch, seqlen) bool: tokens that enter the Hessians


@torch.no_grad()
def capture_first_block_inputs(
    model: nn.Module,
    layout: ModelLayout,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch_size: int,
) -> list[_Batch]:
    """Run the model up to its first block for each batch and keep what that block receives."""
    batches = []
    first = layout.blocks[0]
    seen: dict = {}

    def hook(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size]
            mask = None if attention_mask is None else attention_mask[start : start + batch_size]
            seen.clear()
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
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
            batches.append(_Batch(hidden.detach(), args, kwargs, token_mask))
    finally:
        handle.remove()
    return batches


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _HessianBank:
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


class _BlockQuantizer:
    """Quantizes the linear layers of one block with the configured method."""

    def __init__(self, method: Method, configs: dict[str, object], hessian_dtype, device):
        self.method = method
        self.configs = configs  # local name -> config; only the layers to quantize
        self.hessian_dtype, self.device = hessian_dtype, device
        self.results: dict[str, LayerQuant | None] = {}

    def quantize(self, name: str, module: nn.Module, acc: HessianAccumulator) -> None:
        from latticequant.formats import FormatError

        W = linear_weight(module).detach()
        if W.dtype not in (torch.float32, torch.float64):
            W = W.float()
        t0 = time.perf_counter()
        try:
            lq = self.method.quantize(W, acc.H, self.configs[name])
        except FormatError as exc:
            # The layer's shape does not fit the storage format (e.g. 3-bit packing): keep it.
            log.warning("%s stays in float: %s", name, exc)
            self.results[name] = None
            return
        except ValueError as exc:
            raise ValueError(f"cannot quantize {name}: {exc}") from exc
        lq.stats.setdefault("time_s", time.perf_counter() - t0)
        lq.stats["layer_time_s"] = time.perf_counter() - t0
        lq.stats["n_tokens"] = acc.n_tokens
        set_linear_weight(module, lq.Q)
        self.results[name] = lq


def _quantize_block_lazy(block, batch: _Batch, bq: _BlockQuantizer, bank: _HessianBank):
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
        out = _block_output(block(batch.hidden, *batch.args, **batch.kwargs))
    finally:
        for h in handles:
            h.remove()
    not_run = sorted(set(bq.configs) - set(bq.results))
    if not_run:
        raise RuntimeError(f"layers {not_run} were never called by their block's forward")
    return [out]


def _quantize_block_batched(
    block, batches: list[_Batch], subsets, bq: _BlockQuantizer, bank: _HessianBank
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
                    raise _Stop
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
                except _Stop:
                    pass
                if pending:
                    raise RuntimeError(f"layers {sorted(pending)} were never called")
        finally:
            for h in handles:
                h.remove()
        for name in names:
            bq.quantize(name, block.get_submodule(name), bank.get(name))
    return [_block_output(block(b.hidden, *b.args, **b.kwargs)) for b in batches]


# ---------------------------------------------------------------------------------------------
# On-disk state for resuming.


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata=None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_write_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fingerprint(model, method: Method, config, overrides, calib_ids, attention_mask, extra):
    from latticequant.offload import store_of

    store = store_of(model)
    if store is not None:  # blocks on disk: their files' headers stand for their values
        extra = {**extra, "block_files": store.fingerprint()}
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "method": method.name,
                "config": config_to_dict(config),
                "overrides": [dataclasses.asdict(o) for o in overrides],
                # Shapes and a cheap checksum of every tensor: another model or other weights.
                "model": {
                    k: [list(v.shape), float(v.detach().double().sum())]
                    for k, v in model.state_dict().items()
                    if v.device.type != "meta"
                },
                "model_config": getattr(getattr(model, "config", None), "to_json_string", str)(),
                "extra": extra,
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    h.update(calib_ids.cpu().numpy().tobytes())
    if attention_mask is not None:
        h.update(attention_mask.cpu().numpy().tobytes())
    return h.hexdigest()


class _State:
    """Per-block state in ``OUT.partial/state``: finished blocks and the next block's inputs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def block_paths(self, index: int) -> tuple[Path, Path]:
        return (
            self.folder / f"block_{index:04d}.safetensors",
            self.folder / f"block_{index:04d}.json",
        )

    def save_block(
        self, index, layers: dict[str, QuantizedLayer], Qs, hidden, source: float | None = None
    ) -> None:
        """``source``: checksum of the block's weights as read from disk (blocks kept there)."""
        tensors, entries = {}, {}
        for name, layer in layers.items():
            for key, t in layer.tensors.items():
                tensors[f"{name}.{key}"] = t.cpu()
            tensors[f"{name}.__Q__"] = Qs[name].cpu()
            entries[name] = {
                "format": layer.format,
                "stats": layer.stats,
                "config": layer.config,
                "keys": sorted(layer.tensors),
            }
        tpath, jpath = self.block_paths(index)
        _atomic_save_tensors(tensors, tpath)
        _atomic_write_json({"layers": entries, "source": source}, jpath)
        # Written last: it names the block it feeds, so it marks everything before as done.
        _atomic_save_tensors(
            {f"hidden.{i}": h.cpu() for i, h in enumerate(hidden)},
            self.folder / HIDDEN_FILE,
            metadata={"next_block": str(index + 1)},
        )

    def next_block(self) -> int:
        from safetensors import safe_open

        path = self.folder / HIDDEN_FILE
        if not path.exists():
            return 0
        with safe_open(str(path), "pt") as f:
            nxt = int(f.metadata()["next_block"])
        if not all(p.exists() for i in range(nxt) for p in self.block_paths(i)):
            return 0
        return nxt

    def source_checksum(self, index: int) -> float | None:
        with open(self.block_paths(index)[1]) as fh:
            return json.load(fh)["source"]

    def load_hidden(self) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        data = load_file(str(self.folder / HIDDEN_FILE))
        return [data[f"hidden.{i}"] for i in range(len(data))]

    def load_block(self, index) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        tpath, jpath = self.block_paths(index)
        tensors = load_file(str(tpath))
        with open(jpath) as fh:
            entries = json.load(fh)["layers"]
        layers, Qs = {}, {}
        for name, e in entries.items():
            layers[name] = QuantizedLayer(
                name,
                e["format"],
                {k: tensors[f"{name}.{k}"] for k in e["keys"]},
                e["stats"],
                e["config"],
            )
            Qs[name] = tensors[f"{name}.__Q__"]
        return layers, Qs


# ---------------------------------------------------------------------------------------------


def _prepare_output(out_dir, overwrite: bool, resume: bool, fingerprint: str):
    final = Path(out_dir)
    if final.exists() and not overwrite:
        raise OutputExistsError(
            f"output folder {final} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    work = final.with_name(final.name + PARTIAL_SUFFIX)
    state = work / STATE_DIR
    run_file = state / "run.json"
    if work.exists():
        saved = None
        if run_file.exists():
            with open(run_file) as fh:
                saved = json.load(fh).get("fingerprint")
        if resume and saved == fingerprint:
            log.info("resuming from %s", state)
            return final, work, _State(state)
        if resume and saved is not None:
            raise ResumeMismatchError(
                f"{work} holds an unfinished run with other settings; delete it or pass "
                "resume=False (--no-resume) to start over"
            )
        shutil.rmtree(work)
    state.mkdir(parents=True)
    _atomic_write_json({"fingerprint": fingerprint}, run_file)
    return final, work, _State(state)


def _finish_output(final: Path, work: Path) -> None:
    shutil.rmtree(work / STATE_DIR)
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(work, final)
    if old is not None:
        shutil.rmtree(old)


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
) -> list[dict]:
    """Quantize ``model``'s decoder blocks in place; write a checkpoint to ``out_dir`` if given.

    calib_ids: ``(n_windows, seqlen)`` token ids; ``attention_mask`` marks real tokens (padding
    never enters a Hessian). ``config`` is an instance of the method's config class (its
    defaults when None). ``overrides`` skip modules or change their config by name pattern.
    ``batch_size`` windows per forward (all at once by default: one pass per block).
    Returns one stats dict per quantized layer, in order.
    """
    if isinstance(method, str):
        method = get_method(method)
    if config is None:
        config = method.config_cls()
    if not isinstance(config, method.config_cls):
        raise ValueError(
            f"method {method.name!r} needs a {method.config_cls.__name__}, got "
            f"{type(config).__name__}"
        )
    if hasattr(config, "extra") and isinstance(config.extra, dict):
        config = dataclasses.replace(
            config, extra={**config.extra, "checkpoint_format": checkpoint_format}
        )
    overrides = list(overrides)
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise ValueError("calib_ids must be a non-empty (n_windows, seqlen) tensor of token ids")
    if attention_mask is not None and attention_mask.shape != calib_ids.shape:
        raise ValueError("attention_mask must have the shape of calib_ids")
    n = calib_ids.shape[0]
    batch_size = n if batch_size is None else int(batch_size)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available here")
    layout = describe_model(model)
    model.eval()
    from latticequant.offload import store_of

    store = store_of(model)  # blocks kept on disk: one in memory at a time

    state = final = work = None
    if out_dir is not None:
        fp = _fingerprint(
            model,
            method,
            config,
            overrides,
            calib_ids,
            attention_mask,
            {"checkpoint_format": checkpoint_format, "batch_size": batch_size},
        )
        final, work, state = _prepare_output(out_dir, overwrite, resume, fp)

    start = state.next_block() if state is not None else 0
    batches = capture_first_block_inputs(model, layout, calib_ids, attention_mask, batch_size)
    layers: dict[str, QuantizedLayer] = {}
    for i in range(start):
        done, Qs = state.load_block(i)
        if store is not None:
            store.load(i)
            if store.checksums[i] != state.source_checksum(i):
                store.release(i)
                raise ResumeMismatchError(
                    f"the weights of block {i} on disk changed since it was quantized; delete "
                    f"{work} or pass resume=False (--no-resume) to start over"
                )
        for name, q in Qs.items():
            set_linear_weight(model.get_submodule(name), q)
        if store is not None:
            store.save_block(i, [f"{name}.weight" for name in Qs])
            store.release(i)
            done = {name: layer.without_tensors() for name, layer in done.items()}
        layers.update(done)
    if start:
        for b, h in zip(batches, state.load_hidden()):
            b.hidden = h
        log.info("resumed after %d finished blocks", start)

    t_start = time.perf_counter()
    blocks = range(start, len(layout.blocks))
    bar = tqdm(blocks, desc=f"quantize ({method.name})", unit="block", disable=not progress)
    for index in bar:
        block = layout.blocks[index]
        prefix = layout.block_name(index)
        configs = {}
        for subset in layout.subsets:
            for local in subset:
                cfg = resolve_config(f"{prefix}.{local}", config, overrides)
                if cfg is not None:
                    configs[local] = cfg
        if store is not None:
            store.load(index)
        block.to(device)
        batches_dev = [
            _Batch(
                _to(b.hidden, device),
                _to(b.args, device),
                _to(b.kwargs, device),
                None if b.mask is None else b.mask.to(device),
            )
            for b in batches
        ]
        bq = _BlockQuantizer(method, configs, hessian_dtype, device)
        bank = _HessianBank(hessian_dtype, device)
        if len(batches_dev) == 1:
            outputs = _quantize_block_lazy(block, batches_dev[0], bq, bank)
        else:
            outputs = _quantize_block_batched(block, batches_dev, layout.subsets, bq, bank)
        block.to("cpu")
        block_layers, Qs = {}, {}
        for local, lq in bq.results.items():
            if lq is None:
                continue
            name = f"{prefix}.{local}"
            W = linear_weight(block.get_submodule(local))
            entry = {
                "name": name,
                "block": index,
                "method": method.name,
                "shape": list(W.shape),
                **lq.stats,
            }
            block_layers[name] = QuantizedLayer(
                name,
                method.format,
                {k: v.cpu() for k, v in lq.tensors.items()},
                entry,
                config_to_dict(configs[local]),
            )
            Qs[name] = lq.Q
        for b, h in zip(batches, outputs):
            b.hidden = h.to("cpu")
        if state is not None:
            source = None if store is None else store.checksums[index]
            state.save_block(index, block_layers, Qs, [b.hidden for b in batches], source)
        if store is not None:
            # The block's quantized weights go to disk; its codes are read back at save time.
            store.save_block(index, [f"{name}.weight" for name in Qs])
            store.release(index)
            block_layers = {name: layer.without_tensors() for name, layer in block_layers.items()}
            del Qs
        layers.update(block_layers)
        if on_block_done is not None:
            on_block_done(index)
    bar.close()
    elapsed = time.perf_counter() - t_start

    stats = [layers[name].stats for name in layout.linear_names() if name in layers]
    if out_dir is not None:
        from latticequant.checkpoint import save_quantized

        save_quantized(
            model,
            work,
            layers,
            method=method,
            config=config,
            tokenizer=tokenizer,
            checkpoint_format=checkpoint_format,
            overrides=overrides,
            block_tensors=None if store is None else (lambda i: state.load_block(i)[0]),
            run={
                "quantize_time_s": elapsed,
                "n_windows": n,
                "seqlen": calib_ids.shape[1],
                "blocks_resumed": start,
            },
        )
        _finish_output(final, work)
    return stats
