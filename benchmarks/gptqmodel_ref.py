"""GPTQModel driven as the reference tool, on the CPU, for the benchmarks.

Three entry points, each going through GPTQModel's own classes (nothing of it is re-implemented):

- :func:`gptq_layer`: its per-layer GPTQ solver (``gptqmodel.quantization.gptq.GPTQ``) on a
  given ``W`` and an already accumulated ``H``;
- :func:`quantize_model`: its end-to-end quantization (``GPTQModel.load`` + ``quantize`` +
  ``save``) of a model folder on given calibration windows;
- :func:`load_checkpoint`: a GPTQ-format checkpoint folder (GPTQModel's or latticequant's)
  loaded by GPTQModel on the CPU with its pure-torch kernel, for perplexity.

GPTQModel lives only in the benchmark environment (``scripts/bench_env.sh``) and is imported
lazily. Version 7.7.0 refuses to start on a 2-core machine unless ``GPTQMODEL_CPU_WORKERS`` is
set; :func:`import_gptqmodel` sets it to 2 when it is unset.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = [
    "GPTQModelMissing",
    "RefLayerResult",
    "RefModelRun",
    "gptqmodel_version",
    "import_gptqmodel",
    "gptq_layer",
    "protocol_model_folder",
    "quantize_model",
    "load_checkpoint",
    "allow_float32_torch_kernel",
]

CACHE_ENV = "LATTICEQUANT_BENCH_CACHE"
PROTOCOL_FOLDER_NAME = "smollm2-135m-instruct-f32"


class GPTQModelMissing(RuntimeError):
    """GPTQModel is not importable: the benchmark environment is not the active one."""


def import_gptqmodel():
    """Import ``gptqmodel`` with the CPU settings it needs on this machine."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    try:
        import gptqmodel
    except ImportError as exc:
        raise GPTQModelMissing(
            "gptqmodel is not installed here; create the benchmark environment with "
            "`bash scripts/bench_env.sh` and run with .venv-bench/bin/python "
            f"(import error: {exc})"
        ) from exc
    return gptqmodel


def gptqmodel_version() -> str | None:
    """The installed GPTQModel version, or None when it is absent (without importing it)."""
    try:
        return importlib.metadata.version("gptqmodel")
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# (a) one layer
# --------------------------------------------------------------------------------------------


@dataclass
class RefLayerResult:
    """GPTQModel's output for one layer, in the original column order.

    ``Q`` is its dequantized weight; ``scales``/``zeros`` are ``(d_out, n_groups)``; ``g_idx``
    gives the group of each input column; ``time_s`` is the wall time of its ``quantize`` call
    (Hessian inverse, ordering and the blocked loop: the same work our solvers time).
    """

    Q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    time_s: float
    damp: float
    avg_loss: float


def _layer_config(
    *, bits: int, group_size: int, sym: bool, desc_act: bool, static_groups: bool, damp: float
):
    gptqmodel = import_gptqmodel()
    return gptqmodel.QuantizeConfig(
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        act_group_aware=False,
        static_groups=static_groups,
        damp_percent=damp,
        fallback=None,
        offload_to_disk=False,
    )


def gptq_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = True,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    nsamples: int = 1,
) -> RefLayerResult:
    """GPTQModel's GPTQ on ``W`` (d_out, d_in) with the accumulated Hessian ``H`` (d_in, d_in).

    The layer is an ``nn.Linear`` holding a copy of ``W``; ``H`` is handed to GPTQModel's
    ``GPTQ`` object as its finished Hessian (the scale of ``H`` does not matter: damping is
    relative to its mean diagonal). Only the ``quantize`` call is timed.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"W must be (d_out, d_in) and H (d_in, d_in); got {tuple(W.shape)} and {tuple(H.shape)}"
        )
    import_gptqmodel()
    from gptqmodel.quantization.gptq import GPTQ

    qcfg = _layer_config(
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        static_groups=static_groups,
        damp=damp,
    )
    d_out, d_in = W.shape
    layer = torch.nn.Linear(d_in, d_out, bias=False, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(W.to(torch.float32))
    solver = GPTQ(layer, qcfg)
    solver.quantizer.configure(perchannel=True)  # what its GPTQ processor does per module
    solver.H = H.to(torch.float32).clone()
    solver.nsamples = int(nsamples)
    t0 = time.perf_counter()
    Q, scale, zero, g_idx, _, avg_loss, damp_used, _ = solver.quantize(blocksize=block_size)
    elapsed = time.perf_counter() - t0
    solver.free()
    return RefLayerResult(
        Q=Q.to(W.dtype),
        scales=scale,
        zeros=zero,
        g_idx=g_idx.long(),
        time_s=elapsed,
        damp=float(damp_used),
        avg_loss=float(avg_loss) if isinstance(avg_loss, (int, float)) else float("nan"),
    )


# --------------------------------------------------------------------------------------------
# the protocol's model as a plain float32 folder
# --------------------------------------------------------------------------------------------


def _cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "latticequant-bench"


def protocol_model_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A float32 Hugging Face folder of the protocol model, written once and reused.

    The GGUF is read by latticequant's own loader (dequantized to float32, copied into a
    ``from_config`` model), so both tools quantize exactly the same weights. The folder is
    written under a temporary name and renamed, so a half-written one is never reused.
    """
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    folder = root / PROTOCOL_FOLDER_NAME
    if (folder / "config.json").is_file():
        return folder
    from latticequant.pipeline.models import load_model

    root.mkdir(parents=True, exist_ok=True)
    log.info("writing the protocol model as a float32 folder to %s", folder)
    model, tokenizer = load_model(None)
    tmp = Path(tempfile.mkdtemp(prefix=f".{PROTOCOL_FOLDER_NAME}-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if folder.exists():  # a concurrent writer finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# --------------------------------------------------------------------------------------------
# (b) end to end
# --------------------------------------------------------------------------------------------


@dataclass
class RefModelRun:
    """One end-to-end GPTQModel quantization.

    wall_s: loading the float model plus ``quantize`` (calibration passes, solves, packing):
    the figure compared with our pipeline's whole run. save_s: writing the checkpoint.
    """

    out_dir: Path
    wall_s: float
    load_s: float
    quantize_s: float
    save_s: float
    settings: dict[str, Any] = field(default_factory=dict)
    version: str | None = None


def quantize_model(
    model_dir: str | os.PathLike,
    windows: list[list[int]],
    out_dir: str | os.PathLike,
    *,
    bits: int = 4,
    group_size: int = 128,
    desc_act: bool = True,
    sym: bool = True,
    damp: float | None = None,
    overwrite: bool = False,
) -> RefModelRun:
    """Quantize ``model_dir`` with GPTQModel on ``windows`` (token-id lists) and save it.

    Settings follow docs/protocol.md: GPTQModel's defaults (symmetric, its default damping 0.05,
    true-sequential, ``lm_head`` kept) with float32, batch size 1, on the CPU. ``desc_act=False``
    leaves its group-aware reordering on, as its default does.
    """
    if not windows or any(len(w) == 0 for w in windows):
        raise ValueError("windows must be a non-empty list of non-empty token-id lists")
    out = Path(out_dir)
    if out.exists():
        if not overwrite:
            raise ValueError(f"output folder {out} exists (pass overwrite=True to replace it)")
        shutil.rmtree(out)
    gptqmodel = import_gptqmodel()
    kwargs: dict[str, Any] = {"bits": bits, "group_size": group_size, "sym": sym}
    kwargs["desc_act"] = desc_act
    if desc_act:
        kwargs["act_group_aware"] = False
    if damp is not None:
        kwargs["damp_percent"] = damp
    qcfg = gptqmodel.QuantizeConfig(**kwargs)
    calibration = [
        {"input_ids": [int(t) for t in w], "attention_mask": [1] * len(w)} for w in windows
    ]
    t0 = time.perf_counter()
    model = gptqmodel.GPTQModel.load(
        str(model_dir), qcfg, dtype=torch.float32, device="cpu", trust_remote_code=False
    )
    t1 = time.perf_counter()
    model.quantize(calibration, batch_size=1)
    t2 = time.perf_counter()
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save(str(tmp))
    os.replace(tmp, out)
    t3 = time.perf_counter()
    settings = {
        "bits": bits,
        "group_size": group_size,
        "desc_act": bool(qcfg.desc_act),
        "act_group_aware": bool(getattr(qcfg, "act_group_aware", False)),
        "sym": bool(qcfg.sym),
        "damp": float(qcfg.damp_percent),
        "static_groups": bool(getattr(qcfg, "static_groups", False)),
        "true_sequential": bool(qcfg.true_sequential),
        "nsamples": len(windows),
        "seqlen": max(len(w) for w in windows),
    }
    del model
    return RefModelRun(
        out_dir=out,
        wall_s=t2 - t0,
        load_s=t1 - t0,
        quantize_s=t2 - t1,
        save_s=t3 - t2,
        settings=settings,
        version=gptqmodel_version(),
    )


# --------------------------------------------------------------------------------------------
# (c) load a GPTQ-format checkpoint
# --------------------------------------------------------------------------------------------


def allow_float32_torch_kernel() -> None:
    """Let GPTQModel's pure-torch GPTQ kernel run in float32.

    ``TorchLinear`` dequantizes ``scales * (codes - zeros)`` with plain torch ops and multiplies
    in the input's dtype, so float32 works, but 7.7.0 declares only float16/bfloat16 and refuses
    float32 at load time. Loading in float16 instead would round every float weight of the
    model (embeddings, norms), so the declaration is widened for this process.
    """
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    if torch.float32 not in TorchLinear.SUPPORTS_DTYPES:
        TorchLinear.SUPPORTS_DTYPES = [*TorchLinear.SUPPORTS_DTYPES, torch.float32]


def load_checkpoint(folder: str | os.PathLike, *, backend: str = "gptq_torch") -> torch.nn.Module:
    """A GPTQ-format checkpoint loaded by GPTQModel on the CPU in float32; returns the HF model.

    ``gptq_torch`` (default) is GPTQModel's pure-torch dequantizing kernel: every bit width,
    exact float32 arithmetic (see :func:`allow_float32_torch_kernel`). ``auto`` lets GPTQModel
    pick its CPU kernel (4-bit only in float32). The returned module is the underlying
    ``transformers`` model, so the same perplexity function applies to it as to any other.
    GPTQModel refuses asymmetric checkpoints in the v1 ``gptq`` format unless GPTQModel itself
    wrote them; ``gptq_v2`` checkpoints load.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a checkpoint folder: it has no config.json")
    quant = json.loads(config_path.read_text()).get("quantization_config")
    if not quant and not (folder / "quantize_config.json").is_file():
        raise ValueError(f"{folder} holds no quantization_config: not a GPTQ checkpoint")
    gptqmodel = import_gptqmodel()
    if backend == "gptq_torch":
        allow_float32_torch_kernel()
    qmodel = gptqmodel.GPTQModel.load(
        str(folder), device="cpu", backend=backend, dtype=torch.float32
    )
    model = qmodel.model
    model.eval()
    return model
