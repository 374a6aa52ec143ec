"""Quantize runs for the tests in one call: a RunSpec from keyword arguments, prepared and run."""

from __future__ import annotations

import torch

from latticequant.pipeline.experts import ExpertPolicy
from latticequant.pipeline.run import Calibration, quantize_model
from latticequant.pipeline.spec import (
    CalibrationSpec,
    ExecutionSpec,
    OutputSpec,
    RunSpec,
    prepare,
)
from latticequant.pipeline.target import TargetConfig


def run_quantize(
    model,
    tokenizer,
    calib_ids: torch.Tensor,
    method: str = "gptq",
    config=None,
    out_dir=None,
    *,
    overrides=(),
    resume: bool = True,
    overwrite: bool = False,
    device="cpu",
    attention_mask=None,
    batch_size=None,
    checkpoint_format=None,
    hessian_dtype=torch.float32,
    progress: bool = False,
    on_block_done=None,
    world=None,
    run_info=None,
    blocks=None,
    experts=None,
    target=None,
):
    """``prepare`` and ``quantize_model`` on a spec made of these arguments."""
    spec = RunSpec(
        method=method,
        config=config,
        overrides=tuple(overrides),
        target=TargetConfig() if target is None else target,
        experts=ExpertPolicy() if experts is None else experts,
        calibration=CalibrationSpec(nsamples=calib_ids.shape[0], seqlen=calib_ids.shape[1]),
        output=OutputSpec(
            None if out_dir is None else str(out_dir), checkpoint_format, overwrite, resume
        ),
        execution=ExecutionSpec(
            str(device), batch_size, blocks, str(hessian_dtype).removeprefix("torch."), progress
        ),
    )
    plan = prepare(model, spec, world)
    return quantize_model(
        model,
        Calibration(calib_ids, attention_mask, tokenizer),
        plan,
        on_block_done=on_block_done,
        run_info=run_info,
    )
