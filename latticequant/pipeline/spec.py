"""A quantize run as one typed object, and the preflight that turns it into a plan.

A :class:`RunSpec` holds every decision of a run: the method and its config, the overrides, the
problem each layer solves (:class:`~latticequant.pipeline.target.TargetConfig`), the policy for
experts, the calibration, the output and how the run executes. The command line builds one from
its flags, a library user in a few lines. :meth:`RunSpec.check` refuses what is wrong with the
spec alone (before a model is loaded); :func:`prepare` checks it against the model, every layer
and the machine's memory, exactly once, and returns the :class:`Plan` that
:func:`~latticequant.pipeline.run.quantize_model` executes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from latticequant.formats.gguf.format import GGUF_TYPES, check_gguf_type
from latticequant.formats.protocol import Format
from latticequant.methods import Method, UnsupportedConfigError, get_method
from latticequant.methods.registry import min_chunk_rows
from latticequant.pipeline.distributed import World
from latticequant.pipeline.experts import ExpertPolicy, has_experts, unfuse_experts
from latticequant.pipeline.fold import FoldReport, check_foldable, fold_rotations
from latticequant.pipeline.gguf_file import check_gguf_output
from latticequant.pipeline.layout import ModelLayout, describe_model, linear_weight
from latticequant.pipeline.memory import BlockMemory, check_run_memory
from latticequant.pipeline.offload import store_of
from latticequant.pipeline.overrides import Override, resolve_config, skip_reason
from latticequant.pipeline.target import TargetConfig, check_target, layer_format

__all__ = [
    "CalibrationSpec",
    "OutputSpec",
    "ExecutionSpec",
    "RunSpec",
    "LayerPlan",
    "Plan",
    "prepare",
    "plan_layers",
    "check_target_model",
    "check_device",
]

HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class CalibrationSpec:
    """Where the calibration windows come from (the protocol's by default).

    text: a file, folder, ``wikitext2`` or ``c4`` (None: the protocol's text, first 80%).
    nsamples windows of seqlen tokens, drawn with seed; bos: ``auto``, ``always`` or ``never``.
    """

    text: str | None = None
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    bos: str = "auto"


@dataclass(frozen=True)
class OutputSpec:
    """Where the checkpoint goes: ``out`` (None writes nothing), its format (None: the
    method's default), whether an existing ``out`` is replaced and an unfinished run resumed.

    gguf_type: llama.cpp's file type (``Q4_K_M``, ...) of a ``gguf`` output, which is one file;
    gguf_source: the GGUF file the model was read from, whose tokenizer metadata the file
    copies, or its Hugging Face folder, whose tokenizer the file carries as llama.cpp's converter
    writes it.
    """

    out: str | None = None
    checkpoint_format: str | None = None
    overwrite: bool = False
    resume: bool = True
    gguf_type: str | None = None
    gguf_source: str | None = None

    def format_options(self) -> dict:
        """What a format bound to the run reads (:meth:`Format.for_model`)."""
        return {"gguf_type": self.gguf_type}


@dataclass(frozen=True)
class ExecutionSpec:
    """How the run executes: the device the blocks run on, windows per forward (None: all at
    once), the blocks ``START <= i < END`` to quantize (None: all), the Hessians' dtype and
    whether a progress bar is shown."""

    device: str = "cpu"
    batch_size: int | None = None
    blocks: tuple[int, int] | None = None
    hessian_dtype: str = "float32"
    progress: bool = True


@dataclass(frozen=True)
class RunSpec:
    """Every decision of one quantize run (see the module docstring)."""

    method: str | Method = "gptq"
    config: object | None = None
    overrides: tuple[Override, ...] = ()
    target: TargetConfig = field(default_factory=TargetConfig)
    experts: ExpertPolicy = field(default_factory=ExpertPolicy)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)

    def resolved(self) -> tuple[Method, object, Format]:
        """The registered method, its config (its defaults when None) and the checkpoint's
        format; refuses a config the method or the format cannot take, and every override
        that would produce one. Needs no model: the command line calls it before loading."""
        method = self.method if isinstance(self.method, Method) else get_method(self.method)
        config = method.default_config() if self.config is None else self.config
        if not isinstance(config, method.config_cls):
            raise ValueError(
                f"method {method.name!r} needs a {method.config_cls.__name__}, got "
                f"{type(config).__name__}"
            )
        fmt = method.format(self.output.checkpoint_format)
        check_container(fmt, self.output, self.target)
        method.refuse(config, fmt)
        layer_format(fmt, self.target)  # a format without a rotated variant refuses --rotate
        for ov in self.overrides:
            try:
                changed = resolve_config(ov.pattern, config, [ov])
                if changed is not None:
                    method.refuse(changed, fmt)
            except ValueError as exc:
                raise UnsupportedConfigError(f"--override {ov.pattern!r}: {exc}") from None
        check_refine(config, self.overrides)
        return method, config, fmt

    def check(self) -> None:
        """Everything that can be refused without a model (the command line's preflight)."""
        self.resolved()
        check_device(self.execution.device)
        if self.execution.hessian_dtype not in HESSIAN_DTYPES:
            raise ValueError(
                f"hessian_dtype must be one of {', '.join(HESSIAN_DTYPES)}, got "
                f"{self.execution.hessian_dtype!r}"
            )
        batch = self.execution.batch_size
        if batch is not None and (isinstance(batch, bool) or int(batch) <= 0):
            raise ValueError(f"batch_size must be positive, got {batch}")

    def fingerprint_extra(self, layout: ModelLayout, fmt: Format) -> dict:
        """What of the spec, beyond method, config and overrides, decides the result."""
        blocks = self.execution.blocks
        return {
            "checkpoint_format": fmt.name,
            "batch_size": self.execution.batch_size,
            **({"blocks": list(blocks)} if blocks else {}),
            **({} if self.target.is_default else {"target": dataclasses.asdict(self.target)}),
            **(
                {"experts": dataclasses.asdict(self.experts)}
                if any(has_experts(b) for b in layout.blocks)
                else {}
            ),
        }


def check_container(fmt: Format, output: OutputSpec, target: TargetConfig) -> None:
    """A single-file container (GGUF) takes ``--gguf-type`` and no online rotation; a folder
    takes no ``--gguf-type``."""
    gguf = fmt.container == "gguf"
    if gguf and output.gguf_type is None:
        raise UnsupportedConfigError(
            f"--checkpoint-format {fmt.name} needs --gguf-type TYPE (valid: "
            f"{', '.join(GGUF_TYPES)})"
        )
    if output.gguf_type is not None:
        if not gguf:
            raise UnsupportedConfigError(
                "--gguf-type needs --checkpoint-format gguf (the other formats write a folder)"
            )
        check_gguf_type(output.gguf_type)
    if fmt.container != "folder" and target.rotated:
        raise UnsupportedConfigError(
            f"--rotate {target.rotate}: online rotations cannot go into a {fmt.container} file; "
            "drop --rotate"
        )


def check_refine(config, overrides: tuple[Override, ...] = ()) -> None:
    """Refinement settings without refinement would be recorded and never run: refuse them,
    on the config and in every override."""
    if getattr(config, "refine", None) == "":
        for name in ("refine_sweeps", "refine_rounds"):
            value = getattr(config, name, 1)
            if value != 1:
                flag = "--" + name.replace("_", "-")
                raise UnsupportedConfigError(
                    f"{flag} {value} needs --refine cd and/or scales (without it no refinement "
                    "runs)"
                )
    for ov in overrides:
        for name in ("refine_sweeps", "refine_rounds"):
            if name in ov.changes:
                resolved = resolve_config(ov.pattern, config, [ov])
                if resolved is not None and not resolved.refine:
                    raise UnsupportedConfigError(
                        f"--override {ov.pattern!r}: {name} needs refine (cd and/or scales), in "
                        "the override or as --refine"
                    )


def check_device(name: str | torch.device) -> torch.device:
    """The device ``name`` when this machine has it; a one-line refusal otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    if device.type == "cpu" and device.index is not None:
        raise ValueError(f"--device {name}: the CPU takes no index; use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device {name}: this machine has {count} CUDA device{'s' * (count != 1)} "
                f"(cuda:0 to cuda:{count - 1}); use one of those"
            )
    return device


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
class Plan:
    """A spec checked against one model: what :func:`quantize_model` executes.

    format: the format each layer's method packs (``layer_format`` wraps it when the target
    rotates); layers: each linear layer's config or why it is skipped; memory: one block's
    estimated peak; world: the ranks sharing the run; fold: what folding the rotations into
    the float model did (``--rotate folded``), recorded in the checkpoint.
    """

    spec: RunSpec
    method: Method
    config: object
    format: Format
    layout: ModelLayout
    layers: LayerPlan
    device: torch.device
    hessian_dtype: torch.dtype
    world: World
    memory: BlockMemory
    fold: FoldReport | None = None

    @property
    def stored_format(self) -> Format:
        """The format the checkpoint's layers are written in."""
        return layer_format(self.format, self.spec.target)


def prepare(model: nn.Module, spec: RunSpec, world: World | None = None) -> Plan:
    """Check ``spec`` against ``model`` once, before any slow work, and plan the run.

    Splits fused experts into per-expert layers, finds the blocks, refuses a target the
    architecture cannot take, plans every layer (each checked by the method and its format,
    and by the rotation's size), and refuses a run whose block would not fit in memory.
    """
    world = World() if world is None else world
    spec.check()
    min_chunk_rows()  # a bad row-block setting in the environment is refused here, not mid-run
    method, config, fmt = spec.resolved()
    unfuse_experts(model)
    layout = describe_model(model)
    model.eval()
    check_target_model(model, spec.target)
    # a format whose layers depend on the whole model (GGUF's type mix) binds to it here
    fmt = fmt.for_model(getattr(model, "config", None), spec.output.format_options())
    if fmt.container == "gguf" and spec.output.out is not None:
        check_gguf_output(spec.output.out, spec.output.overwrite, spec.output.gguf_source)
    if fmt.container != "folder" and store_of(model) is not None:
        raise UnsupportedConfigError(
            f"a {fmt.container} file is not written from a model kept on disk yet; drop --offload"
        )
    layers = plan_layers(layout, method, config, fmt, spec)
    device = torch.device(spec.execution.device)
    hessian_dtype = HESSIAN_DTYPES[spec.execution.hessian_dtype]
    memory = check_run_memory(
        model,
        layout,
        spec.calibration.nsamples,
        spec.calibration.seqlen,
        spec.execution.batch_size,
        device,
        hessian_dtype,
        world.size,
        spec.target.float_outputs,
        spec.target.rotated,
    )
    fold = None
    if spec.target.folded:  # every check passed: the float model's weights are rotated now
        fold = fold_rotations(model, spec.target.seed, spec.target.rotate == "folded+online")
        if fold.untied:  # a head of its own now: the GGUF mix types it and the embeddings anew
            fmt = fmt.for_model(model.config, spec.output.format_options())
    return Plan(
        spec, method, config, fmt, layout, layers, device, hessian_dtype, world, memory, fold
    )


def check_target_model(model: nn.Module, target: TargetConfig) -> None:
    """Refuse a target the model's architecture cannot take, before any slow work."""
    if target.folded:
        if store_of(model) is not None:
            raise ValueError(
                f"--rotate {target.rotate} rewrites every weight of the model in memory, which "
                "--offload cannot do yet; drop --offload or use --rotate hadamard"
            )
        check_foldable(model, target.rotate == "folded+online")


def plan_layers(
    layout: ModelLayout, method: Method, config, fmt: Format, spec: RunSpec
) -> LayerPlan:
    """Every linear layer's config after the overrides, each checked by the method and its
    format (and by the rotation of the target, which needs a size it can factor).

    Only the blocks of ``spec.execution.blocks`` (``START <= i < END``) are quantized; the
    layers of the others are skipped, saying so. Raises
    :class:`~latticequant.methods.UnsupportedConfigError` naming the first layer that cannot be
    stored (so nothing slow has run yet), and ``ValueError`` when the skip patterns leave
    nothing to quantize.
    """
    n = len(layout.blocks)
    blocks = spec.execution.blocks
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
                cfg = resolve_config(name, config, spec.overrides)
                if cfg is None:
                    skipped[name] = skip_reason(name, spec.overrides) or "skipped"
                    continue
                d_out, d_in = linear_weight(block.get_submodule(local)).shape
                try:
                    method.refuse(cfg, fmt, int(d_out), int(d_in))
                except UnsupportedConfigError as exc:
                    raise UnsupportedConfigError(
                        f"{name} ({method.name}, {d_out}x{d_in}): {exc}"
                    ) from None
                check_target(spec.target, name, int(d_in))
                configs[index][local] = cfg
    plan = LayerPlan(configs, skipped)
    if plan.n_quantized == 0:
        raise ValueError(
            f"no layer left to quantize: the skip patterns match all {len(skipped)} linear layers"
        )
    return plan
