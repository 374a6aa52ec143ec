"""Text for calibration and evaluation, and perplexity, exactly as the measurement protocol says.

Default text: CPython's ``pydoc_data.topics`` joined in sorted key order, tokenized once, the
first 80% of tokens for calibration and the last 20% held out. Calibration windows are drawn with
``random.Random(seed)``; perplexity uses non-overlapping windows with the tail dropped.
"""

from __future__ import annotations

import logging
import math
import os
import random

import torch
from torch import nn
from tqdm.auto import tqdm

from latticequant.pipeline.distributed import World
from latticequant.pipeline.forward import StopForward
from latticequant.pipeline.layout import ARCHITECTURES
from latticequant.pipeline.offload import blockwise_logits, store_of

log = logging.getLogger(__name__)

__all__ = [
    "TextError",
    "protocol_text",
    "load_text",
    "tokenize",
    "split_ids",
    "calibration_windows",
    "perplexity",
    "window_bos",
    "BOS_POLICIES",
    "HF_DATASETS",
]

BOS_POLICIES = ("auto", "always", "never")

CALIBRATION_FRACTION = 0.8
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
HF_DATASETS = ("wikitext2", "c4")


class TextError(ValueError):
    """Text that is missing, empty, or too short for what was asked of it."""


def protocol_text() -> str:
    """The protocol's default text: every ``pydoc_data.topics`` entry, sorted, blank-line joined."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _hf_dataset_text(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise TextError(
            f"text {name!r} needs the Hugging Face 'datasets' package (pip install datasets) "
            "and a reachable hub; use a local text file instead"
        ) from exc
    try:
        if name == "wikitext2":
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(data["text"])
        shard = (
            "en/c4-train.00000-of-01024.json.gz"
            if split == "train"
            else ("en/c4-validation.00000-of-00008.json.gz")
        )
        data = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
        return "\n\n".join(data["text"][:5000])
    except Exception as exc:  # offline, hub refused, dataset renamed: all mean "not reachable"
        raise TextError(
            f"cannot fetch {name!r} from the Hugging Face hub ({type(exc).__name__}); it is "
            "probably not reachable from here: use the default text or a local text file"
        ) from exc


def _read_text_file(path: str) -> str:
    """A UTF-8 text file (undecodable bytes replaced); a binary file is refused."""
    with open(path, "rb") as fh:
        data = fh.read()
    if b"\0" in data[: 1 << 20]:
        raise TextError(f"{path} is not a text file (it holds binary data); give a UTF-8 text file")
    return data.decode("utf-8", errors="replace")


def load_text(source: str | None = None, split: str = "train") -> str:
    """The default protocol text, a local file, a folder of text files, or wikitext2/c4."""
    if source is None:
        text = protocol_text()
    elif source in HF_DATASETS:
        text = _hf_dataset_text(source, split)
    elif os.path.isdir(source):
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(source)
            for f in names
            if f.endswith(TEXT_SUFFIXES)
        )
        if not files:
            raise TextError(f"folder {source} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        text = "\n\n".join(_read_text_file(path) for path in files)
    elif os.path.isfile(source):
        text = _read_text_file(source)
    else:
        raise TextError(
            f"text source {source!r} is neither a file, a folder, nor one of {HF_DATASETS}"
        )
    if not text.strip():
        raise TextError(f"text from {source or 'pydoc_data'} is empty")
    return text


def tokenize(tokenizer, text: str, special_tokens: bool = True) -> torch.Tensor:
    """Token ids of the whole text, tokenized once, as a 1-D LongTensor.

    ``special_tokens=False`` leaves out what the tokenizer adds around a text (a BOS), for a
    stream whose windows get their own BOS (:func:`window_bos`)."""
    if tokenizer is None:
        raise TextError("this model has no tokenizer; it cannot read text")
    if not text.strip():
        raise TextError("cannot tokenize empty text")
    ids = tokenizer(text, return_attention_mask=False, add_special_tokens=special_tokens)
    return torch.tensor(ids["input_ids"], dtype=torch.long)


def window_bos(tokenizer, policy: str = "auto") -> int | None:
    """The token every window starts with, or None: ``auto`` is the tokenizer's BOS when the
    tokenizer adds one to a text (families trained always to see it), ``always`` its BOS
    whatever it does, ``never`` none (windows are plain slices of the stream)."""
    if policy not in BOS_POLICIES:
        raise ValueError(f"--bos must be one of {', '.join(BOS_POLICIES)}, got {policy!r}")
    if policy == "never" or tokenizer is None:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if policy == "always":
        if bos is None:
            raise ValueError("--bos always: this tokenizer has no BOS token; use --bos never")
        return int(bos)
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if probe and probe[0] == bos else None


def split_ids(ids: torch.Tensor, fraction: float = CALIBRATION_FRACTION):
    """``(calibration, held_out)``: the first ``fraction`` of the tokens, then the rest."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    cut = int(len(ids) * fraction)
    return ids[:cut], ids[cut:]


def calibration_windows(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0, bos: int | None = None
):
    """``nsamples`` windows of ``seqlen`` tokens drawn uniformly, as ``(nsamples, seqlen)``.

    ``i = rng.randint(0, len(ids) - seqlen - 1)`` with ``rng = random.Random(seed)``. With a
    ``bos`` token, each window is that token followed by ``seqlen - 1`` tokens from ``i``.
    """
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D token ids, got shape {tuple(ids.shape)}")
    if len(ids) < seqlen + 1:
        raise TextError(
            f"calibration text is too short: {len(ids)} tokens, need at least {seqlen + 1} "
            f"for windows of {seqlen}"
        )
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        i = rng.randint(0, len(ids) - seqlen - 1)
        if bos is None:
            windows.append(ids[i : i + seqlen])
        else:
            windows.append(torch.cat([torch.tensor([bos]), ids[i : i + seqlen - 1]]))
    return torch.stack(windows)


LOSS_TOKENS = 256
"""Positions whose logits exist at once when the loss is taken chunk by chunk: a batch's full
logits (``batch x seqlen x vocab`` in float32, 200 MB for two windows of 512 over 49k tokens,
and as much again for the log-softmax) would set the peak memory of a small model's run."""


def _plain_head(model: nn.Module) -> nn.Module | None:
    """The output layer, when the logits are exactly ``head(final hidden states)``: the
    families of the declared layouts, whose forwards apply nothing after the head."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


def _head_inputs(model: nn.Module, head: nn.Module, call) -> torch.Tensor:
    """The head's input during ``call()`` (the forward is stopped there)."""
    seen = {}

    def hook(module, args):
        seen["h"] = args[0]
        raise StopForward

    handle = head.register_forward_pre_hook(hook)
    try:
        call()
    except StopForward:
        pass
    finally:
        handle.remove()
    if "h" not in seen:
        raise RuntimeError("the model's forward never reached its output layer")
    return seen["h"]


def _summed_nll(head: nn.Module, hidden: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed next-token cross-entropy of ``batch`` from the head's inputs, ``LOSS_TOKENS``
    positions at a time."""
    total = 0.0
    T = batch.shape[1]
    for b in range(batch.shape[0]):
        for s in range(0, T - 1, LOSS_TOKENS):
            e = min(s + LOSS_TOKENS, T - 1)
            logits = head(hidden[b, s:e]).float()
            ce = nn.functional.cross_entropy(logits, batch[b, s + 1 : e + 1], reduction="sum")
            total += float(ce.double())
    return total


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int = 512,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    progress: bool = True,
    world: World | None = None,
    bos: int | None = None,
) -> float:
    """``exp`` of the mean next-token cross-entropy over non-overlapping ``seqlen`` windows.

    The tail that does not fill a window is dropped; each window predicts ``seqlen - 1`` tokens.
    A model whose blocks are kept on disk (:mod:`latticequant.pipeline.offload`) is run block
    by block, each block read once, with the same result. Across ranks (``world``) each rank
    runs its share of the windows and every rank returns the same figure. With a ``bos`` token
    each window is that token and the next ``seqlen - 1`` tokens of the text (the same
    ``seqlen - 1`` predictions per window).
    """
    world = World() if world is None else world
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    span = seqlen if bos is None else seqlen - 1  # text tokens per window
    n_windows = len(ids) // span
    if n_windows == 0:
        raise TextError(
            f"evaluation text is too short: {len(ids)} tokens, need at least {span} for one window"
        )
    windows = ids[: n_windows * span].view(n_windows, span)
    if bos is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos, dtype=windows.dtype), windows], 1)
    r, size = world.rank, world.size
    windows = windows[r * n_windows // size : (r + 1) * n_windows // size]
    n_windows = windows.shape[0]
    progress = progress and r == 0
    total = 0.0
    count = 0
    model.eval()
    head = _plain_head(model)

    def forward(batch):
        if head is None:
            return model(input_ids=batch, use_cache=False).logits
        return _head_inputs(model, head, lambda: model(input_ids=batch, use_cache=False))

    if n_windows == 0:
        outputs = iter(())
    elif store_of(model) is not None:
        outputs = blockwise_logits(model, windows, batch_size, device, progress, forward)
    else:

        def whole_forward():
            starts = range(0, n_windows, batch_size)
            bar = tqdm(starts, desc="perplexity", unit="batch", disable=not progress, leave=False)
            for start in bar:
                batch = windows[start : start + batch_size].to(device)
                yield batch, forward(batch)

        outputs = whole_forward()
    for batch, out in outputs:
        batch = batch.to(out.device)
        if head is not None:  # out: the head's inputs; the logits exist a chunk at a time
            total += _summed_nll(head, out, batch)
        else:
            ce = nn.functional.cross_entropy(
                out[:, :-1].reshape(-1, out.shape[-1]).float(),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total += float(ce.double())
        count += batch[:, 1:].numel()
    parts = world.all_gather((total, count), "perplexity")
    return math.exp(sum(t for t, _ in parts) / sum(c for _, c in parts))
