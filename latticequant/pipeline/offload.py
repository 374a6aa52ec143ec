"""Decoder blocks kept on disk, for models larger than memory: one block in memory at a time.

A model loaded with :func:`load_offloaded` holds its embeddings, final norm and head in memory
and its decoder blocks' parameters on the ``meta`` device, which costs nothing. The
safetensors files of the model folder are where those parameters live: a :class:`BlockStore`
reads one block's tensors in (memory-mapped reads of only those tensors), and sends them back to
``meta`` when the block is done. Weights that a quantizer changed are written to the store's
own folder, so later passes (the perplexity after quantization) read the quantized weights.

The pipeline, the checkpoint writer and :func:`latticequant.pipeline.data.perplexity` look for a
store with :func:`store_of` and then work one block at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from latticequant.pipeline.experts import unfuse_experts
from latticequant.pipeline.files import (
    INDEX_FILE,
    WEIGHTS_FILE,
    read_weight_map,
    save_tensors,
    tensor_sums,
)
from latticequant.pipeline.forward import block_output, capture_first_block_inputs, to_device
from latticequant.pipeline.layout import describe_model

log = logging.getLogger(__name__)

__all__ = [
    "OffloadError",
    "BlockStore",
    "empty_parameters",
    "load_offloaded",
    "store_of",
    "blockwise_logits",
]

STORE_ATTRIBUTE = "latticequant_store"


class OffloadError(ValueError):
    """A model that cannot be kept on disk block by block (no safetensors weights, ...)."""


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on ``meta``; buffers stay real.

    Buffers such as rotary frequencies are computed in ``__init__`` and not always saved, so
    they must be real; parameters all come from the weight files.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(module._parameters[name])
            module._parameters[name] = kind(
                module._parameters[name].to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a HF model folder (single file or sharded index)."""
    weight_map = read_weight_map(folder, OffloadError)
    if weight_map is not None:
        files = {name: folder / shard for name, shard in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise OffloadError(f"{INDEX_FILE} of {folder} names {path.name}, which is missing")
        return files
    single = folder / WEIGHTS_FILE
    if single.is_file():
        try:
            with safe_open(str(single), "pt") as f:
                return {name: single for name in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise OffloadError(f"{single} is truncated or corrupt: {exc}") from None
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.gguf")
    )
    raise OffloadError(
        f"disk offload reads safetensors weights; {folder} has none"
        + (f" (it has {', '.join(others)}; load it without offloading)" if others else "")
    )


class BlockStore:
    """Where the parameters of a model's decoder blocks live while they are not in use.

    sources: full parameter name -> (safetensors file, tensor name in it). ``folder`` receives
    the weights written by :meth:`save_block`; a temporary folder (removed by :meth:`close`)
    when None.
    """

    def __init__(
        self,
        model: nn.Module,
        sources: dict[str, tuple[Path, str]],
        folder: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.layout = describe_model(model)
        self.sources = dict(sources)
        self.dtype = dtype
        if folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="latticequant-offload-"))
            # Removed when the store is closed, collected, or at exit.
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
        else:
            self.folder = Path(folder)
            self.folder.mkdir(parents=True, exist_ok=True)
            self._cleanup = None
        self.loaded: set[int] = set()
        self.checksums: dict[int, float] = {}  # of each block's tensors when last read
        for index in range(len(self.layout.blocks)):
            missing = [n for n in self.param_names(index) if n not in self.sources]
            if missing:
                raise OffloadError(
                    f"the weight files hold no tensor for {missing[0]}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )

    def __len__(self) -> int:
        return len(self.layout.blocks)

    def param_names(self, index: int) -> list[str]:
        """Full names of block ``index``'s parameters."""
        prefix = self.layout.block_name(index)
        return [f"{prefix}.{n}" for n, _ in self.layout.blocks[index].named_parameters()]

    def _slot(self, name: str) -> tuple[nn.Module, str]:
        module_name, _, leaf = name.rpartition(".")
        return self.model.get_submodule(module_name), leaf

    def _read(self, name: str) -> torch.Tensor:
        path, key, *part = self.sources[name]
        with safe_open(str(path), "pt") as f:
            if part:  # one expert's rows of a fused tensor: (expert, first row, end row)
                e, a, b = part[0]
                t = f.get_slice(key)[e : e + 1, a:b][0].contiguous()
            else:
                t = f.get_tensor(key)
        return t.to(self.dtype) if t.is_floating_point() else t

    def load(self, index: int) -> nn.Module:
        """Bring block ``index``'s parameters into memory (on the CPU); returns the block.

        ``checksums[index]`` gets a checksum of what was read, so a resumed run can tell
        whether a finished block's weights changed on disk.
        """
        checksum = 0.0
        for name in self.param_names(index):
            t = self.fill(name)
            checksum += sum(tensor_sums(t))
        self.checksums[index] = checksum
        self.loaded.add(index)
        return self.layout.blocks[index]

    def fill(self, name: str) -> torch.Tensor:
        """Read parameter ``name`` from its file into the model; returns the tensor read."""
        module, leaf = self._slot(name)
        old = module._parameters[leaf]
        t = self._read(name)
        if tuple(t.shape) != tuple(old.shape):
            raise OffloadError(
                f"tensor {name} has shape {list(t.shape)} on disk, the model expects "
                f"{list(old.shape)}"
            )
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        return t

    def release(self, index: int) -> None:
        """Send block ``index``'s parameters back to ``meta`` (its memory is freed)."""
        for name in self.param_names(index):
            module, leaf = self._slot(name)
            module._parameters[leaf] = _on_meta(module._parameters[leaf])
        self.loaded.discard(index)

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` in memory for the duration of the ``with``."""
        block = self.load(index)
        try:
            yield block
        finally:
            self.release(index)

    def outside_names(self) -> list[str]:
        """Full names of the parameters outside the blocks (embeddings, final norm, head),
        tied ones included under each of their names."""
        in_blocks = f"{self.layout.block_path}."
        return [
            n
            for n, _ in self.model.named_parameters(remove_duplicate=False)
            if not n.startswith(in_blocks)
        ]

    @contextlib.contextmanager
    def parked_outside(self) -> Iterator[None]:
        """The parameters outside the blocks on ``meta`` for the duration of the ``with``,
        read back from their files at its end.

        Once the first block's inputs are captured nothing reads them until the checkpoint is
        written, and at Llama-3-8B's size the embeddings and head are 2.1 GB of the peak.
        """
        names = self.outside_names()
        for name in names:
            module, leaf = self._slot(name)
            module._parameters[leaf] = _on_meta(module._parameters[leaf])
        # no local may keep a parameter here: this frame stays alive across the yield, and a
        # reference to the last one (the head, 1 GB at Llama-3-8B) kept it in memory
        try:
            yield
        finally:
            for name in names:
                if name in self.sources:
                    self.fill(name)
            if getattr(self.model.config, "tie_word_embeddings", False):
                self.model.tie_weights()

    def save_block(self, index: int, names: list[str]) -> None:
        """Write the current values of ``names`` (parameters of loaded block ``index``) to the
        store's folder; from now on they are read from there."""
        if index not in self.loaded:
            raise RuntimeError(f"block {index} is not in memory; load it before saving it")
        tensors = {}
        for name in names:
            module, leaf = self._slot(name)
            tensors[name] = module._parameters[leaf].detach().cpu().contiguous()
        path = self.folder / f"block_{index:04d}.safetensors"
        save_tensors(tensors, path)
        for name in names:
            self.sources[name] = (path, name)

    def fingerprint(self) -> str:
        """A digest of where each block tensor comes from: file headers, sizes and names.

        It names the tensors and their shapes without reading them; their values are checked
        block by block through :attr:`checksums` as the blocks are read.
        """
        h = hashlib.sha256()
        headers: dict[Path, bytes] = {}
        for name in sorted(self.sources):
            path, key, *part = self.sources[name]
            if path not in headers:
                with open(path, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    headers[path] = fh.read(min(n, 100_000_000)) + str(path.stat().st_size).encode()
            h.update(f"{name}={key}{part[0] if part else ''}".encode())
        for path in sorted(headers):
            h.update(headers[path])
        return h.hexdigest()

    def close(self) -> None:
        """Remove the store's folder if the store made it."""
        if self._cleanup is not None:
            self._cleanup()


def store_of(model: nn.Module) -> BlockStore | None:
    """The block store of a model loaded with offloading, else None."""
    return getattr(model, STORE_ATTRIBUTE, None)


def _on_meta(p: torch.Tensor) -> nn.Parameter:
    """A parameter of ``p``'s shape and dtype on ``meta``: no memory behind it."""
    return nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)


def load_offloaded(
    folder: str | os.PathLike,
    store_folder: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
):
    """The model of a HF folder with its decoder blocks left on disk (its tokenizer is
    :func:`latticequant.pipeline.models.load_tokenizer`'s).

    Everything but the blocks (embeddings, final norm, head) is read into memory in ``dtype``;
    the blocks are read one at a time by the model's :class:`BlockStore` (see :func:`store_of`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise OffloadError(
            f"disk offload needs a Hugging Face model folder; {folder} has no config.json"
        )
    files = _weight_files(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder))
        with empty_parameters():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # transformers raises many types for a bad config
        raise OffloadError(f"cannot build a model from {folder}/config.json: {exc}") from exc
    unfuse_experts(model)  # per-expert layers on meta, read from the files block by block
    layout = describe_model(model)

    prefix = getattr(model, "base_model_prefix", "")
    sources: dict[str, tuple] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        for key in (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}"):
            if key in files:
                sources[name] = (files[key], key)
                break
        else:
            for key, part in _expert_keys(name, tuple(p.shape)):
                found = next(
                    (
                        k
                        for k in (key, key.removeprefix(f"{prefix}."), f"{prefix}.{key}")
                        if k in files
                    ),
                    None,
                )
                if found is not None:
                    sources[name] = (files[found], found) + ((part,) if part else ())
                    break
    store = BlockStore(model, sources, store_folder, dtype)

    in_blocks = f"{layout.block_path}."
    tied = getattr(config, "tie_word_embeddings", False)
    for name, _ in list(model.named_parameters(remove_duplicate=False)):
        if name.startswith(in_blocks):
            continue
        if name not in sources:
            if tied and name.endswith("lm_head.weight"):
                continue
            raise OffloadError(f"the weight files in {folder} hold no tensor for {name}")
        store.fill(name)
    if tied:
        model.tie_weights()
    left = [
        n
        for n, p in model.named_parameters()
        if p.device.type == "meta" and not n.startswith(in_blocks)
    ]
    if left:
        raise OffloadError(f"the weight files in {folder} hold no tensor for {left[0]}")
    setattr(model, STORE_ATTRIBUTE, store)
    return model.eval()


_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
#: Mixtral's files name an expert's matrices w1 (gate), w3 (up) and w2 (down), under
#: ``block_sparse_moe``.
_MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _expert_keys(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple | None]]:
    """Where the files may hold parameter ``name`` (of ``shape``) of a mixture-of-experts
    model whose fused experts were split (:func:`~latticequant.pipeline.experts.unfuse_experts`)
    when not under its own name: Mixtral's names (``block_sparse_moe``, an expert's
    ``w1``/``w3``/``w2``), or an expert's rows of the fused tensors
    (``gate_up_proj``: gate rows first, then up; ``down_proj``), as ``(key, part)`` with
    ``part = (expert, first row, end row)``."""
    m = _EXPERT.match(name)
    if m is None:  # the router and other parts of a Mixtral block's MLP
        return [(name.replace(".mlp.", ".block_sparse_moe.", 1), None)] if ".mlp." in name else []
    mlp, e, proj = m.group(1), int(m.group(2)), m.group(3)
    keys: list[tuple[str, tuple | None]] = []
    moe = mlp.removesuffix(".mlp") + ".block_sparse_moe"
    keys.append((f"{moe}.experts.{e}.{_MIXTRAL[proj]}.weight", None))
    rows = shape[0]
    if proj == "down_proj":
        keys.append((f"{mlp}.experts.down_proj", (e, 0, rows)))
    else:
        a = 0 if proj == "gate_proj" else rows
        keys.append((f"{mlp}.experts.gate_up_proj", (e, a, a + rows)))
    return keys


class _Replay(nn.Module):
    """Stands in for a decoder block and returns hidden states computed earlier.

    Attributes the model reads from its blocks (``attention_type``, ...) come from the block
    it replaces.
    """

    def __init__(self, block: nn.Module, hidden: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@torch.no_grad()
def blockwise_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int,
    device: str | torch.device = "cpu",
    progress: bool = False,
    forward=None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(ids, logits)`` per batch of ``input_ids``, running the blocks one at a time.

    The hidden states of every batch go through block 0, then block 1, ... each block read
    from the store once and run on ``device``; the model's own forward then runs once per batch
    (on the CPU, where the embeddings and head are) with the blocks replaced by their final
    outputs, so the head sees exactly what a whole forward gives it. ``forward(ids)``: what to
    yield instead of the logits (it calls the model itself, for example up to its head).
    """
    store = store_of(model)
    if store is None:
        raise OffloadError("this model keeps all its blocks in memory; call it directly")
    layout = store.layout
    device = torch.device(device)
    batches = capture_first_block_inputs(model, layout, input_ids, None, batch_size)
    as_tuple = True
    for index in tqdm(range(len(store)), desc="blocks", unit="block", disable=not progress):
        with store.block(index) as block:
            block.to(device)
            for b in batches:
                out = block(
                    to_device(b.hidden, device),
                    *to_device(b.args, device),
                    **to_device(b.kwargs, device),
                )
                as_tuple = isinstance(out, (tuple, list))
                b.hidden = block_output(out).to("cpu")
    originals = list(layout.blocks)
    try:
        for start, b in zip(range(0, input_ids.shape[0], batch_size), batches):
            for i, block in enumerate(originals):
                layout.blocks[i] = _Replay(block, b.hidden, as_tuple)
            ids = input_ids[start : start + batch_size]
            if forward is not None:
                yield ids, forward(ids)
            else:
                yield ids, model(input_ids=ids, use_cache=False).logits
    finally:
        for i, block in enumerate(originals):
            layout.blocks[i] = block
