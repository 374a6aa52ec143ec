"""The compressed-tensors ``pack-quantized`` layout: what llm-compressor writes and transformers,
vLLM and the ``compressed-tensors`` package read.

``W`` is ``(d_out, d_in)``, ``b`` bits (2 to 8), ``G`` groups. Per linear layer:

- ``weight_packed``      int32 ``(d_out, ceil(d_in * b / 32))``: codes packed along the input
  dimension;
- ``weight_scale``       float ``(d_out, G)`` (``G = 1`` for ``strategy: channel``);
- ``weight_zero_point``  int32 ``(ceil(d_out * b / 32), G)``: asymmetric grids only, packed along
  the *output* dimension;
- ``weight_shape``       int64 ``(2,)``: ``[d_out, d_in]``;
- ``weight_g_idx``       int32 ``(d_in,)``: only for ``actorder: group`` (see below).

Codes are signed in compressed-tensors: ``W = scale * (q - zp)`` with ``q`` and ``zp`` in
``[-2^(b-1), 2^(b-1) - 1]``, and the packer stores ``q + 2^(b-1)`` (``zp + 2^(b-1)``). Our grid
``Q = scales * (codes - zeros)`` has codes and zeros in ``[0, 2^b - 1]``, so ``q = codes -
2^(b-1)`` and ``zp = zeros - 2^(b-1)``: the stored unsigned fields are exactly ``codes`` and
``zeros``. A symmetric grid has ``zeros == 2^(b-1)``, i.e. ``zp = 0``, and stores no zero point.

Packing (compressed-tensors 0.20, ``pack_to_int32``) is one dense little-endian bit stream per
packed line: value ``k`` occupies bits ``[k*b, (k+1)*b)`` and word ``w`` holds stream bits
``[32w, 32w + 32)``; for 3, 5, 6 and 7 bits some values straddle two words. For 2, 4 and 8 bits
this is also the layout of earlier releases, which packed ``32 // b`` values per word and padded
the rest; for 3, 5, 6 and 7 bits the two layouts differ (``docs/compressed_tensors.md``).

Groups are contiguous runs of ``group_size`` input columns (``g_idx = j // group_size``, and
``group_size`` must divide ``d_in``): compressed-tensors' dequantizer reshapes the columns into
groups and never reads a ``g_idx``. Act-order with static groups (``actorder: weight``) needs
nothing more. A permuted ``g_idx`` (act-order refitting each group where the loop reaches it) is
``actorder: group``, which compressed-tensors 0.20 refuses; :func:`pack_compressed_tensors`
writes it (as ``weight_g_idx``) only when asked, for readers that still take it.

Online rotations (``--rotate folded+online``, ``--rotate hadamard``) are the rotated variant
``compressed-tensors+hadamard`` at the bottom: the same tensors, of ``W R`` for the block
Hadamard compressed-tensors' readers build, named in ``transform_config``
(:mod:`latticequant.formats.ct_transform`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from latticequant.formats.ct_transform import (
    TRANSFORM_TYPE,
    OnlineTransform,
    check_stored_matrix,
    ct_hadamard_rotation,
    hadamard_block,
    matches_target,
    online_block,
    online_transform,
    rotates_input,
    stored_matrix_key,
    transform_config_dict,
)
from latticequant.formats.gptq import (
    SCALE_DTYPES,
    GPTQFormat,
    GPTQShape,
    QuantLinear,
    check_meta_dims,
    check_packable,
    grid_parts,
    module_options,
    pack_gptq_parts,
    unpack_gptq,
)
from latticequant.formats.packing import (
    SUPPORTED_BITS,
    FormatError,
    integer_tensor,
    require_tensor,
)
from latticequant.formats.protocol import Format, UnsupportedConfigError, register_format
from latticequant.formats.rotation import RotatedFormat, RotatedLinear, TransformedLinear

#: Code widths this layout stores (compressed-tensors packs 1 to 8; the quantizers give 2 to 8).
CT_BITS = (2, 3, 4, 5, 6, 7, 8)
CT_KEYS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
STRATEGIES = ("group", "channel")
ACTORDERS = (None, "weight", "group")
#: The compressed-tensors release whose layout and config keys this module follows.
CT_VERSION = "0.20.1"


_WORD = 32
_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 22  # values per packing chunk: bounds the int64 temporaries on large layers


def check_ct_bits(bits: int) -> None:
    """Refuse a code width the pack-quantized layout cannot hold for our grids."""
    if isinstance(bits, bool) or bits not in CT_BITS:
        raise FormatError(f"bits must be one of {CT_BITS} for compressed-tensors, got {bits!r}")


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` values of ``bits`` bits, densely packed."""
    return math.ceil(n * bits / _WORD)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _stream_layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word (within a block of 32 values, which fills ``bits`` words) and shift of each value."""
    start = torch.arange(_WORD, dtype=torch.int64, device=device) * bits
    return start // _WORD, start % _WORD


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned values in ``[0, 2^bits - 1]`` densely into int32 words along ``dim``.

    Returns int32 with ``packed_words(n, bits)`` along ``dim``; the last word is zero-padded.
    """
    if not 1 <= bits <= 8:
        raise FormatError(f"bits must lie in [1, 8] for int32 packing, got {bits}")
    if values.dim() != 2:
        raise FormatError(f"values to pack must be 2-D, got shape {tuple(values.shape)}")
    v = integer_tensor(values, "values").movedim(dim, -1)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > (1 << bits) - 1):
        raise FormatError(f"values must lie in [0, {(1 << bits) - 1}] to pack in {bits} bits")
    rows, n = v.shape
    n_blocks, n_words = -(-n // _WORD), packed_words(n, bits)
    word, shift = _stream_layout(bits, v.device)
    out = torch.empty(rows, n_words, dtype=torch.int32, device=v.device)
    step = max(1, _CHUNK // max(n, 1))
    for a in range(0, rows, step):
        block = torch.nn.functional.pad(v[a : a + step], (0, n_blocks * _WORD - n))
        block = block.reshape(-1, n_blocks, _WORD)
        words = torch.zeros(block.shape[0], n_blocks, bits + 1, dtype=torch.int64, device=v.device)
        # Fields never overlap, so adding the pieces is OR-ing them.
        words.index_add_(2, word, (block << shift) & _MASK32)
        words.index_add_(2, word + 1, block >> (_WORD - shift))  # high bits of straddlers
        out[a : a + step] = _to_int32(words[..., :bits].reshape(block.shape[0], -1)[:, :n_words])
    return out.movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: the first ``n`` unsigned values along ``dim``, as int64."""
    if not 1 <= bits <= 8:
        raise FormatError(f"bits must lie in [1, 8] for int32 packing, got {bits}")
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise FormatError(
            f"packed values must be 2-D int32, got {packed.dtype} {tuple(packed.shape)}"
        )
    p = packed.movedim(dim, -1)
    need = packed_words(n, bits)
    if p.shape[-1] != need:
        raise FormatError(f"{n} values of {bits} bits need {need} words, got {p.shape[-1]}")
    rows = p.shape[0]
    n_blocks = -(-n // _WORD)
    word, shift = _stream_layout(bits, p.device)
    out = torch.empty(rows, n, dtype=torch.int64, device=p.device)
    step = max(1, _CHUNK // max(n, 1))
    for a in range(0, rows, step):
        w = p[a : a + step].to(torch.int64) & _MASK32
        w = torch.nn.functional.pad(w, (0, n_blocks * bits + 1 - need))
        cur = w[:, : n_blocks * bits].reshape(-1, n_blocks, bits)
        nxt = w[:, 1 : n_blocks * bits + 1].reshape(-1, n_blocks, bits)
        low = cur[..., word] >> shift
        high = nxt[..., word] << (_WORD - shift)  # only straddling values keep bits here
        vals = (low | high) & ((1 << bits) - 1)
        out[a : a + step] = vals.reshape(w.shape[0], -1)[:, :n]
    return out.movedim(-1, dim).contiguous()


@dataclass(frozen=True)
class WeightArgs:
    """One config group's ``weights`` entry, the part that fixes a layer's tensors.

    ``group_size`` is ``None`` for ``strategy="channel"``; ``actorder`` is ``None``,
    ``"weight"`` (act-order with static groups: nothing stored) or ``"group"`` (``weight_g_idx``).
    """

    bits: int
    symmetric: bool
    strategy: str
    group_size: int | None = None
    actorder: str | None = None

    def __post_init__(self) -> None:
        check_ct_bits(self.bits)
        if self.strategy not in STRATEGIES:
            raise FormatError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "group" and (
            not isinstance(self.group_size, int) or self.group_size <= 0
        ):
            raise FormatError(
                f"strategy 'group' needs a positive group_size, got {self.group_size!r}"
            )
        if self.strategy == "channel" and self.group_size not in (None, -1):
            raise FormatError(f"strategy 'channel' takes no group_size, got {self.group_size!r}")
        if self.actorder not in ACTORDERS:
            raise FormatError(f"actorder must be one of {ACTORDERS}, got {self.actorder!r}")


def _group_layout(g: torch.Tensor, n_groups: int) -> tuple[str, int | None, bool]:
    """``(strategy, group_size, permuted)`` of a ``g_idx`` over ``n_groups`` groups."""
    d_in = g.numel()
    if n_groups == 1:
        return "channel", None, False
    if d_in % n_groups:
        raise FormatError(
            f"{n_groups} groups over d_in = {d_in} columns are not of one size, which "
            "compressed-tensors requires: choose a group size that divides d_in"
        )
    size = d_in // n_groups
    natural = torch.arange(d_in, dtype=torch.int64, device=g.device) // size
    if torch.equal(g, natural):
        return "group", size, False
    if not torch.equal(torch.bincount(g, minlength=n_groups).cpu(), torch.full((n_groups,), size)):
        raise FormatError("g_idx does not put group_size columns in every group")
    return "group", size, True


def pack_compressed_tensors(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype = torch.bfloat16,
    allow_g_idx: bool = False,
) -> dict[str, torch.Tensor]:
    """Pack codes ``(d_out, d_in)``, scales/zeros ``(d_out, G)`` and ``g_idx`` ``(d_in,)``.

    Keys carry no module prefix: ``weight_packed``, ``weight_scale``, ``weight_shape``, and
    ``weight_zero_point`` when ``sym`` is False. A permuted ``g_idx`` is refused unless
    ``allow_g_idx`` (then stored as ``weight_g_idx``, ``actorder: group``).
    """
    check_ct_bits(bits)
    if codes.dim() != 2:
        raise FormatError(f"codes must be 2-D (d_out, d_in), got shape {tuple(codes.shape)}")
    d_out, d_in = codes.shape
    c, z, g = grid_parts(codes, scales, zeros, g_idx, bits, scale_dtype)
    n_groups = scales.shape[1]
    _, _, permuted = _group_layout(g, n_groups)
    if permuted and not allow_g_idx:
        raise FormatError(
            "g_idx is permuted (act-order without static groups): compressed-tensors 0.20 "
            "removed actorder='group'; quantize with static groups or allow weight_g_idx"
        )
    mid = 1 << (bits - 1)
    if sym and bool((z != mid).any()):
        raise FormatError(f"a symmetric grid has every zero point at {mid}; these are not")
    out = {
        "weight_packed": pack_int32(c, bits, dim=1),
        "weight_scale": scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([d_out, d_in], dtype=torch.int64),
    }
    if not sym:
        out["weight_zero_point"] = pack_int32(z, bits, dim=0)
    if permuted:
        out["weight_g_idx"] = g.to(torch.int32).contiguous()
    return out


def pack_compressed_tensors_result(
    result, sym: bool, scale_dtype: torch.dtype = torch.bfloat16, allow_g_idx: bool = False
) -> dict[str, torch.Tensor]:
    """:func:`pack_compressed_tensors` on a ``QuantResult``."""
    return pack_compressed_tensors(
        result.codes,
        result.scales,
        result.zeros,
        result.g_idx,
        int(result.bits),
        sym,
        scale_dtype=scale_dtype,
        allow_g_idx=allow_g_idx,
    )


def validate_compressed_tensors(tensors: Mapping[str, torch.Tensor], args: WeightArgs) -> GPTQShape:
    """Check keys, dtypes and shapes of one layer's tensors against its ``weights`` args."""
    bits = args.bits
    shape = require_tensor(tensors, "weight_shape", (torch.int64, torch.int32), 1)
    if shape.numel() != 2 or int(shape.min()) <= 0:
        raise FormatError(f"'weight_shape' must hold [d_out, d_in] > 0, got {shape.tolist()}")
    d_out, d_in = (int(x) for x in shape.tolist())
    packed = require_tensor(tensors, "weight_packed", (torch.int32,), 2)
    if packed.shape != (d_out, packed_words(d_in, bits)):
        raise FormatError(
            f"'weight_packed' must be ({d_out}, {packed_words(d_in, bits)}) for weight_shape "
            f"{[d_out, d_in]} at {bits} bits, got {tuple(packed.shape)}"
        )
    scale = require_tensor(tensors, "weight_scale", SCALE_DTYPES, 2)
    n_groups = 1 if args.strategy == "channel" else -(-d_in // args.group_size)
    if args.strategy == "group" and d_in % args.group_size:
        raise FormatError(f"group_size {args.group_size} does not divide d_in = {d_in}")
    if scale.shape != (d_out, n_groups):
        raise FormatError(f"'weight_scale' must be ({d_out}, {n_groups}), got {tuple(scale.shape)}")
    if args.symmetric:
        if "weight_zero_point" in tensors:
            raise FormatError("'weight_zero_point' is stored but the scheme is symmetric")
    else:
        zp = require_tensor(tensors, "weight_zero_point", (torch.int32,), 2)
        if zp.shape != (packed_words(d_out, bits), n_groups):
            raise FormatError(
                f"'weight_zero_point' must be ({packed_words(d_out, bits)}, {n_groups}), "
                f"got {tuple(zp.shape)}"
            )
    if args.actorder == "group":
        gi = require_tensor(tensors, "weight_g_idx", (torch.int32, torch.int64), 1)
        if gi.shape != (d_in,):
            raise FormatError(f"'weight_g_idx' must have {d_in} entries, got {gi.shape[0]}")
        if d_in and (int(gi.min()) < 0 or int(gi.max()) >= n_groups):
            raise FormatError(f"'weight_g_idx' values must lie in [0, {n_groups})")
    elif "weight_g_idx" in tensors:
        raise FormatError(
            f"'weight_g_idx' is stored but the scheme's actorder is {args.actorder!r}"
        )
    return GPTQShape(d_in=d_in, d_out=d_out, n_groups=n_groups)


def unpack_compressed_tensors(
    tensors: Mapping[str, torch.Tensor], args: WeightArgs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_compressed_tensors`: ``(codes, scales, zeros, g_idx)``.

    codes int64 ``(d_out, d_in)`` in ``[0, 2^b - 1]``; scales ``(d_out, G)`` in the stored
    dtype; zeros int64 ``(d_out, G)`` (``2^(b-1)`` for symmetric schemes); g_idx int64 ``(d_in,)``.
    """
    shape = validate_compressed_tensors(tensors, args)
    bits = args.bits
    codes = unpack_int32(tensors["weight_packed"], bits, shape.d_in, dim=1)
    scales = tensors["weight_scale"]
    if args.symmetric:
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int64)
    else:
        zeros = unpack_int32(tensors["weight_zero_point"], bits, shape.d_out, dim=0)
    if args.actorder == "group":
        g_idx = tensors["weight_g_idx"].to(torch.int64)
    elif args.strategy == "channel":
        g_idx = torch.zeros(shape.d_in, dtype=torch.int64)
    else:
        g_idx = torch.arange(shape.d_in, dtype=torch.int64) // args.group_size
    return codes, scales, zeros, g_idx


def dequantize_compressed_tensors(
    tensors: Mapping[str, torch.Tensor], args: WeightArgs, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``W (d_out, d_in) = scale[:, g] * (q - zp[:, g])``, computed in ``dtype``.

    This is compressed-tensors' own arithmetic: ``q - zp`` and the product are formed in the
    dtype of the module's scale parameter, which a loader creates in the model's dtype; pass that
    dtype here to get its weights bit for bit.
    """
    codes, scales, zeros, g_idx = unpack_compressed_tensors(tensors, args)
    q = codes.to(dtype) - zeros.to(dtype)[:, g_idx]
    return q * scales.to(dtype)[:, g_idx]


# -- config.json: quantization_config --------------------------------------------------------


def weights_dict(args: WeightArgs, observer: str | None = None) -> dict:
    """One config group's ``weights`` entry as compressed-tensors serialises it."""
    out = {
        "num_bits": args.bits,
        "type": "int",
        "symmetric": bool(args.symmetric),
        "group_size": args.group_size if args.strategy == "group" else None,
        "strategy": args.strategy,
        "dynamic": False,
    }
    if args.actorder is not None:
        out["actorder"] = args.actorder
    if observer is not None:
        out["observer"] = observer
    return out


def quantization_config_dict(
    groups: Mapping[str, tuple[Iterable[str], WeightArgs]] | None = None,
    *,
    args: WeightArgs | None = None,
    targets: Iterable[str] = ("Linear",),
    ignore: Iterable[str] = ("lm_head",),
    observer: str | None = None,
) -> dict:
    """``config.json``'s ``quantization_config`` for a pack-quantized checkpoint.

    Either one scheme (``args`` on ``targets``, the usual ``group_0`` on ``["Linear"]``) or
    ``groups``: name -> (targets, args). Keys follow what llm-compressor writes through
    compressed-tensors' ``ModelCompressor.update_config``.
    """
    if (groups is None) == (args is None):
        raise FormatError("give either one scheme (args) or config groups (groups)")
    if groups is None:
        groups = {"group_0": (targets, args)}
    config_groups = {}
    for name, (group_targets, group_args) in groups.items():
        group_targets = list(group_targets)
        if not group_targets:
            raise FormatError(f"config group {name!r} has no targets")
        config_groups[name] = {
            "targets": group_targets,
            "weights": weights_dict(group_args, observer),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "config_groups": config_groups,
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def parse_weight_args(weights: Mapping) -> WeightArgs:
    """A config group's ``weights`` dict -> :class:`WeightArgs`; refuses what we cannot read."""
    if not isinstance(weights, Mapping):
        raise FormatError(f"config group 'weights' must be a mapping, got {type(weights).__name__}")
    if weights.get("type", "int") != "int":
        raise FormatError(f"weights type {weights.get('type')!r} is not int")
    if weights.get("dynamic", False):
        raise FormatError("dynamic weight quantization has no stored grid")
    strategy = weights.get("strategy")
    group_size = weights.get("group_size")
    if strategy is None:  # compressed-tensors infers it from group_size
        strategy = "channel" if group_size == -1 else "group" if group_size else "tensor"
    actorder = weights.get("actorder")
    if actorder is True:
        actorder = "group"
    elif actorder is False:
        actorder = None
    actorder = {"static": "weight", "dynamic": "group"}.get(actorder, actorder)
    return WeightArgs(
        bits=weights.get("num_bits", 8),
        symmetric=bool(weights.get("symmetric", True)),
        strategy=strategy,
        group_size=None if strategy == "channel" else group_size,
        actorder=actorder,
    )


def layer_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a flat state dict's pack-quantized tensors by module name (``a.b.weight_packed``)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf in CT_KEYS:
            out.setdefault(module, {})[leaf] = t
    return out


def check_quantization_config(
    config: Mapping, state: Mapping[str, torch.Tensor], class_targets: Iterable[str] = ("Linear",)
) -> dict[str, WeightArgs]:
    """Check a ``quantization_config`` against a checkpoint's tensors; each layer's args.

    Every module holding pack-quantized tensors must be claimed by one config group (a class
    target in ``class_targets`` claims any module, since the tensors carry no class) and not be
    ignored, and its tensors must match that group's ``weights``.
    """
    if config.get("quant_method") != "compressed-tensors":
        raise FormatError(
            f"quant_method must be 'compressed-tensors', got {config.get('quant_method')!r}"
        )
    if config.get("format") != "pack-quantized":
        raise FormatError(f"format must be 'pack-quantized', got {config.get('format')!r}")
    if config.get("quantization_status") != "compressed":
        raise FormatError(
            f"quantization_status must be 'compressed', got {config.get('quantization_status')!r}"
        )
    groups = config.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise FormatError("quantization_config has no config_groups")
    parsed = []
    for name, group in groups.items():
        if group.get("format") not in (None, "pack-quantized"):
            raise FormatError(f"config group {name!r} has format {group.get('format')!r}")
        for side in ("input_activations", "output_activations"):
            if group.get(side) is not None:
                raise FormatError(
                    f"config group {name!r} quantizes {side}: not a weight-only scheme"
                )
        try:
            args = parse_weight_args(group.get("weights"))
        except FormatError as e:
            raise FormatError(f"config group {name!r}: {e}") from None
        parsed.append((name, list(group.get("targets") or []), args))
    ignore = list(config.get("ignore") or [])
    classes = set(class_targets)
    out = {}
    for module, tensors in sorted(layer_tensors(state).items()):
        if any(matches_target(module, t) for t in ignore):
            raise FormatError(f"{module!r} is in the ignore list but stores quantized tensors")
        claim = next(
            (
                (n, a)
                for n, ts, a in parsed
                if any(t in classes or matches_target(module, t) for t in ts)
            ),
            None,
        )
        if claim is None:
            raise FormatError(f"{module!r} stores quantized tensors but no config group targets it")
        try:
            validate_compressed_tensors(tensors, claim[1])
        except FormatError as e:
            raise FormatError(f"{module}: {e} (config group {claim[0]!r})") from None
        out[module] = claim[1]
    return out


def said_actorder(strategy: str, act_order: bool) -> str | None:
    """The ``actorder`` a static grid decoded in act-order says: ``weight`` on group grids,
    nothing on a channel grid, whose one scale per row stores the same whatever the decode
    order (and compressed-tensors before 0.15 refuses an ``actorder`` on a channel strategy)."""
    return "weight" if act_order and strategy == "group" else None


def weight_args_for(
    bits: int, sym: bool, scales: torch.Tensor, g_idx: torch.Tensor, act_order: bool = False
) -> WeightArgs:
    """The :class:`WeightArgs` that describe a packed layer (``act_order``: say ``weight``
    where :func:`said_actorder` does)."""
    strategy, size, permuted = _group_layout(integer_tensor(g_idx, "g_idx"), scales.shape[1])
    actorder = "group" if permuted else said_actorder(strategy, act_order)
    return WeightArgs(
        bits=bits, symmetric=sym, strategy=strategy, group_size=size, actorder=actorder
    )


# -- from and to the GPTQ tensors the methods produce ----------------------------------------


def compressed_tensors_from_gptq(
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    sym: bool,
    checkpoint_format: str = "gptq",
    scale_dtype: torch.dtype | None = None,
    allow_g_idx: bool = False,
) -> dict[str, torch.Tensor]:
    """One layer's GPTQ tensors (``qweight/qzeros/scales/g_idx``) as pack-quantized tensors.

    Exact: the codes, zero points and ``g_idx`` carry over; the scales keep their stored dtype
    unless ``scale_dtype`` says otherwise.
    """
    codes, scales, zeros, g_idx = unpack_gptq(tensors, bits, checkpoint_format)
    return pack_compressed_tensors(
        codes,
        scales,
        zeros,
        g_idx,
        bits,
        sym,
        scale_dtype=scales.dtype if scale_dtype is None else scale_dtype,
        allow_g_idx=allow_g_idx,
    )


def gptq_from_compressed_tensors(
    tensors: Mapping[str, torch.Tensor], args: WeightArgs, checkpoint_format: str = "gptq_v2"
) -> dict[str, torch.Tensor]:
    """One layer's pack-quantized tensors as GPTQ tensors, for the modules that run GPTQ layers.

    ``gptq_v2`` by default: a zero point of 0, which pack-quantized allows, has no v1 encoding.
    GPTQ packing needs ``bits`` in (2, 3, 4, 8) and dimensions it can pack.
    """
    codes, scales, zeros, g_idx = unpack_compressed_tensors(tensors, args)
    return pack_gptq_parts(
        codes, scales, zeros, g_idx, args.bits, checkpoint_format, scale_dtype=scales.dtype
    )


def quantization_config_for_layers(
    layer_args: Mapping[str, WeightArgs],
    ignore: Iterable[str] = ("lm_head",),
    observer: str | None = None,
) -> dict:
    """The ``quantization_config`` of a checkpoint whose layers have the given args.

    One scheme for every layer: one group on ``["Linear"]`` (linear layers left in float must
    then be in ``ignore``). Several: one group per scheme, each naming its modules.
    """
    if not layer_args:
        raise FormatError("no quantized layers to describe")
    schemes: dict[WeightArgs, list[str]] = {}
    for name, args in layer_args.items():
        schemes.setdefault(args, []).append(name)
    if len(schemes) == 1:
        (args,) = schemes
        return quantization_config_dict(args=args, ignore=ignore, observer=observer)
    groups = {f"group_{i}": (sorted(names), a) for i, (a, names) in enumerate(schemes.items())}
    return quantization_config_dict(groups=groups, ignore=ignore, observer=observer)


# -- the registered format -------------------------------------------------------------------

FORMAT_NAME = "compressed-tensors"
CT_REQUIRED_KEYS = ("weight_packed", "weight_scale", "weight_shape")
CT_OPTIONAL_KEYS = ("weight_zero_point", "weight_g_idx")
#: Widths a checkpoint of ours stores: those our loader's module (GPTQ packing) runs.
CT_WRITE_BITS = tuple(b for b in CT_BITS if b in SUPPORTED_BITS)


def stored_args(tensors: Mapping[str, torch.Tensor], bits: int) -> WeightArgs:
    """A layer's :class:`WeightArgs` read off its tensors: symmetric when it stores no zero
    point, ``channel`` with one scale per row, groups of ``d_in / G`` columns otherwise,
    ``actorder: group`` when it stores a ``weight_g_idx``."""
    shape = require_tensor(tensors, "weight_shape", (torch.int64, torch.int32), 1)
    scale = require_tensor(tensors, "weight_scale", SCALE_DTYPES, 2)
    if shape.numel() != 2:
        raise FormatError(f"'weight_shape' must hold [d_out, d_in], got {shape.tolist()}")
    d_in, n_groups = int(shape[1]), int(scale.shape[1])
    if n_groups < 1 or d_in % n_groups:
        raise FormatError(f"{n_groups} scales per row do not split d_in = {d_in} evenly")
    channel = n_groups == 1
    return WeightArgs(
        bits=bits,
        symmetric="weight_zero_point" not in tensors,
        strategy="channel" if channel else "group",
        group_size=None if channel else d_in // n_groups,
        actorder="group" if "weight_g_idx" in tensors else None,
    )


def _bits(meta: Mapping) -> int:
    try:
        bits = int(meta["bits"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"module meta must give an integer 'bits', got {dict(meta)!r}") from None
    check_ct_bits(bits)
    return bits


def _is_natural(order) -> bool:
    return isinstance(order, str) and order == "natural"


def entry_args(entry: Mapping, act_order: bool = False) -> WeightArgs:
    """The :class:`WeightArgs` of one module table entry (what the file-level config says)."""
    group_size = entry.get("group_size")
    channel = group_size in (None, -1)
    keys = entry.get("keys") or {}
    return WeightArgs(
        bits=int(entry["bits"]),
        symmetric="weight_zero_point" not in keys if keys else bool(entry.get("sym", True)),
        strategy="channel" if channel else "group",
        group_size=None if channel else int(group_size),
        actorder="group"
        if "weight_g_idx" in keys
        else said_actorder("channel" if channel else "group", act_order),
    )


class CompressedTensorsFormat(Format):
    """The pack-quantized layout that llm-compressor writes and vLLM serves.

    A layer's scales are stored in float32: a loader casts them to the model's dtype (vLLM,
    transformers' default route) or computes in theirs (``CompressedTensorsConfig(
    dequantize=True)``), so float32 leaves the one rounding to the reader's dtype, which is
    also the dtype the pipeline feeds the quantized weight forward in. Loaded by us, a layer
    runs as a GPTQ ``QuantLinear`` (``gptq_v2`` zero points), so a checkpoint of ours stores
    the widths that module packs.
    """

    name = FORMAT_NAME
    keys = CT_REQUIRED_KEYS
    optional_keys = CT_OPTIONAL_KEYS
    key_kinds = {
        "weight_packed": "codes",
        "weight_scale": "scales",
        "weight_zero_point": "zeros",
        "weight_shape": "shape",
        "weight_g_idx": "g_idx",
    }
    kernels = GPTQFormat.kernels
    quant_method = "compressed-tensors"
    writes_quantize_config = False
    scale_dtype = torch.float32

    def check(self, config, d_out: int | None = None, d_in: int | None = None) -> None:
        bits = config.bits
        if bits not in CT_WRITE_BITS:
            usable = ", ".join(str(b) for b in CT_WRITE_BITS)
            raise UnsupportedConfigError(
                f"bits={bits} (--bits {bits}) cannot be stored in the compressed-tensors format "
                f"here, which writes {usable} bits (vLLM serves 4 and 8); use one of those"
            )
        if not config.clip:
            raise UnsupportedConfigError(
                "clip=False (--no-clip) leaves codes off the b-bit grid, which the "
                "compressed-tensors format cannot store; drop --no-clip"
            )
        grouped = config.group_size != -1
        if grouped and not config.static_groups and not _is_natural(config.order):
            raise UnsupportedConfigError(
                "act-order without static groups permutes g_idx (actorder: group), which "
                "compressed-tensors 0.20 refuses; use --static-groups (the default)"
            )
        if grouped and d_in is not None and d_in % config.group_size:
            raise UnsupportedConfigError(
                f"group_size={config.group_size} does not divide d_in={d_in}, which "
                "compressed-tensors needs (groups of one size); use a group size that divides "
                "it, or skip this layer (--skip)"
            )
        check_packable(bits, d_out, d_in)

    def pack(self, result) -> dict[str, torch.Tensor]:
        """Symmetric (no zero point) when every zero point is the grid's middle."""
        bits = int(result.bits)
        sym = bool((integer_tensor(result.zeros, "zeros") == 1 << (bits - 1)).all())
        return pack_compressed_tensors_result(result, sym, scale_dtype=self.scale_dtype)

    def unpack(self, tensors, meta):
        return unpack_compressed_tensors(tensors, stored_args(tensors, _bits(meta)))

    def dequantize(self, tensors, meta, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_compressed_tensors(tensors, stored_args(tensors, _bits(meta)), dtype)

    def module(self, tensors, meta, bias=None) -> nn.Module:
        bits = _bits(meta)
        if bits not in SUPPORTED_BITS:
            raise FormatError(
                f"{bits}-bit compressed-tensors layers have no module here (it runs "
                f"{', '.join(map(str, SUPPORTED_BITS))} bits)"
            )
        gptq = gptq_from_compressed_tensors(tensors, stored_args(tensors, bits), "gptq_v2")
        module = QuantLinear(gptq, bits, "gptq_v2", bias, **module_options(meta))
        check_meta_dims(meta, module.in_features, module.out_features)
        return module

    def file_config(self, base, meta) -> dict:
        """One scheme on every ``Linear`` (``lm_head`` ignored): the run's base config."""
        group_size = base.get("group_size", -1)
        strategy = "channel" if group_size == -1 else "group"
        args = WeightArgs(
            bits=int(base["bits"]),
            symmetric=bool(base.get("sym", True)),
            strategy=strategy,
            group_size=None if group_size == -1 else int(group_size),
            actorder=said_actorder(strategy, _act_order(meta)),
        )
        return quantization_config_dict(args=args)

    def layers_config(self, base, meta, modules, skipped, float_linears) -> dict:
        """One config group per scheme the layers use (one group on ``Linear`` when they all
        share one), every linear layer left in float in ``ignore``."""
        if not modules:
            return self.file_config(base, meta)
        ordered = _act_order(meta)
        layer_args = {name: entry_args(entry, ordered) for name, entry in modules.items()}
        ignore = sorted(set(float_linears) | set(skipped))
        return quantization_config_for_layers(layer_args, ignore=ignore)

    def reads(self, file_config) -> bool:
        """Only ``pack-quantized`` (other compressed-tensors formats, FP8 or W8A8, are not
        ours to load: transformers reads them)."""
        return super().reads(file_config) and file_config.get("format") == "pack-quantized"

    def layer_claim(self, name, file_config) -> dict | None:
        """A layer its config groups target and ``ignore`` does not name is quantized (what
        it stores is the groups' to say: :meth:`check_file_config`); any other is float, and
        must not be one whose input ``transform_config`` rotates online (we run transforms on
        quantized layers only)."""
        groups = file_config.get("config_groups")
        groups = groups.values() if isinstance(groups, Mapping) else ()
        targets = [t for g in groups if isinstance(g, Mapping) for t in g.get("targets") or []]
        ignored = any(matches_target(name, t) for t in file_config.get("ignore") or [])
        if not ignored and any(t == "Linear" or matches_target(name, t) for t in targets):
            return {}
        if rotates_input(file_config, name):
            raise FormatError(
                "it is stored in float but transform_config rotates its input online, which "
                "latticequant runs on quantized layers only"
            )
        return None

    def check_file_config(self, name, tensors, meta, file_config) -> None:
        """The config group that claims the layer must describe its tensors, and no online
        transform may rotate the input of a layer stored unrotated."""
        super().check_file_config(name, tensors, meta, file_config)
        check_quantization_config(file_config, {f"{name}.{k}": t for k, t in tensors.items()})
        d_in = int(tensors["weight_shape"][1])
        if online_transform(file_config, name, d_in) is not None:
            raise FormatError(
                "it is stored without a rotation but transform_config rotates its input online: "
                f"readers would run its weights on rotated inputs (module table says {self.name!r})"
            )

    def infer_modules(self, file_config, tensors) -> dict:
        """Each module holding ``weight_packed``, with the config group that claims it; those
        ``transform_config`` rotates online are of the rotated variant, with the key of the
        transform's stored matrix (``transform_matrix``) when the file holds one for it."""
        modules = {}
        for name, args in check_quantization_config(file_config, tensors).items():
            d_out, d_in = (int(x) for x in tensors[f"{name}.weight_shape"].tolist())
            transform = online_transform(file_config, name, d_in)
            rotated = transform is not None
            modules[name] = {
                "format": CT_ROTATED_NAME if rotated else self.name,
                "bits": args.bits,
                "group_size": -1 if args.strategy == "channel" else args.group_size,
                "sym": args.symmetric,
                "in_features": d_in,
                "out_features": d_out,
                "keys": {
                    k: list(tensors[f"{name}.{k}"].shape)
                    for k in CT_KEYS
                    if f"{name}.{k}" in tensors
                },
            }
            matrix = stored_matrix_key(tensors, name, transform) if rotated else None
            if matrix is not None:
                modules[name]["transform_matrix"] = matrix
        return modules


def _act_order(meta: Mapping) -> bool:
    """Whether the run decoded in act-order (with static groups: nothing stored for it)."""
    return not _is_natural(meta.get("order", "natural"))


COMPRESSED_TENSORS = register_format(CompressedTensorsFormat())


CT_ROTATED_NAME = f"{FORMAT_NAME}+hadamard"  # the rotated variant below (``rotated()``)
#: The local key under which a rotated layer receives its transform's stored matrix.
MATRIX_KEY = "transform_matrix"


class CompressedTensorsRotatedFormat(RotatedFormat):
    """A pack-quantized layer stored as ``W T``, ``T`` the online input transform
    ``transform_config`` names for it (``input`` online, ``weight_input`` inverse already in the
    weight): every reader that applies it, compressed-tensors, vLLM and ours, computes
    ``x -> x T`` before the layer.

    Ours write ``T`` the block Hadamard compressed-tensors' readers build for the layer's input
    size (:mod:`latticequant.formats.ct_transform`), and nothing rides beside the pack-quantized
    tensors: the file-level config says it all. llm-compressor's files also store the
    transform's matrix, one per scheme and size (:meth:`shared_tensors`): a ``hadamard`` one
    must be the Sylvester matrix and is run as such; ``random-hadamard`` and ``random-matrix``
    run the stored matrix (:class:`~latticequant.formats.rotation.TransformedLinear`).
    """

    def __init__(self, inner: CompressedTensorsFormat) -> None:
        self.inner = inner
        self.name = f"{inner.name}+hadamard"
        self.keys = inner.keys
        self.optional_keys = inner.optional_keys
        self.key_kinds = {**inner.key_kinds, MATRIX_KEY: "rotation"}
        self.kernels = inner.kernels
        self.quant_method = inner.quant_method
        self.writes_quantize_config = inner.writes_quantize_config

    def layer_rotation(self, n: int, seed: int) -> tuple:
        """The readers' matrix for ``n`` inputs, one per size (``seed`` plays no part); no
        tensors: every reader builds it."""
        return ct_hadamard_rotation(n), {}

    def pack(self, result) -> dict[str, torch.Tensor]:
        return self.inner.pack(result)

    def dequantize(self, tensors, meta, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with in its own input basis: ``x T (W')^T = x (W' T^T)^T``
        for the stored ``W'``."""
        stored = self.inner.dequantize(_inner_tensors(tensors), meta, torch.float64)
        transform = _transform(meta)
        if transform.type == TRANSFORM_TYPE:
            rotation = ct_hadamard_rotation(stored.shape[1], transform.block)
            return rotation.apply_transpose(stored).to(dtype)
        block = online_block(_matrix(tensors, transform).to(torch.float64), transform)
        d_out, d_in = stored.shape
        runs = stored.reshape(d_out, d_in // transform.block, transform.block)
        return (runs @ block.T).reshape(d_out, d_in).to(dtype)

    def module(self, tensors, meta, bias=None) -> nn.Module:
        inner = self.inner.module(_inner_tensors(tensors), meta, bias)
        transform = _transform(meta)
        if transform.type == TRANSFORM_TYPE:
            if MATRIX_KEY in tensors:
                check_stored_matrix(tensors[MATRIX_KEY], transform)
            rotation = ct_hadamard_rotation(inner.in_features, transform.block)
            return RotatedLinear(rotation, inner)
        return TransformedLinear(
            _matrix(tensors, transform), inner, transform.scale, transform.transposed
        )

    def shared_tensors(self, entry) -> dict[str, str]:
        """The transform's stored matrix (llm-compressor's files: ``<layer>.<scheme>_input.
        weight``, found by ``infer_modules``), under :data:`MATRIX_KEY`."""
        key = entry.get("transform_matrix")
        return {MATRIX_KEY: key} if isinstance(key, str) else {}

    def file_config(self, base, meta) -> dict:
        return self.inner.file_config(base, meta)

    def layers_config(self, base, meta, modules, skipped, float_linears) -> dict:
        """compressed-tensors' config of every layer, with the ``transform_config`` that
        rotates the inputs of this variant's layers."""
        config = self.inner.layers_config(base, meta, modules, skipped, float_linears)
        rotated = {n: e["in_features"] for n, e in modules.items() if e["format"] == self.name}
        config["transform_config"] = transform_config_dict(rotated)
        return config

    def reads(self, file_config) -> bool:
        return self.inner.reads(file_config)

    def layer_claim(self, name, file_config) -> dict | None:
        return self.inner.layer_claim(name, file_config)

    def module_meta(self, entry, file_config, name: str = "") -> dict:
        """The pack-quantized meta and the transform: ``block`` (its order), ``transform``
        (its type), ``scheme``, ``inverse``."""
        meta = self.inner.module_meta(entry, file_config, name)
        d_in = int(entry.get("in_features", 0))
        transform = online_transform(file_config, name, d_in)
        if transform is None:
            raise FormatError(
                "it is stored rotated but transform_config rotates no input of it: readers "
                "would run its rotated weights on unrotated inputs"
            )
        ours = "latticequant" in file_config  # written by us: we know the block it was solved in
        if ours and transform.block != hadamard_block(d_in):
            raise FormatError(
                f"transform_config applies Hadamard blocks of {transform.block} to it, but it "
                f"was quantized in blocks of {hadamard_block(d_in)}: readers would rotate its "
                "inputs by another matrix than its weights hold"
            )
        if transform.type != TRANSFORM_TYPE and not self.shared_tensors(entry):
            raise FormatError(
                f"transform_config scheme {transform.scheme!r} is of type {transform.type!r}, "
                "whose matrix readers take from the checkpoint, and it stores none for it "
                f"({transform.matrix_key(name)})"
            )
        return {
            **meta,
            "block": transform.block,
            "transform": transform.type,
            "scheme": transform.scheme,
            "inverse": transform.inverse,
        }

    def check_file_config(self, name, tensors, meta, file_config) -> None:
        """The config group that claims the layer must describe its tensors; its transform was
        checked by :meth:`module_meta`, its stored matrix is checked here."""
        Format.check_file_config(self, name, tensors, meta, file_config)
        inner = _inner_tensors(tensors)
        check_quantization_config(file_config, {f"{name}.{k}": t for k, t in inner.items()})
        if int(tensors["weight_shape"][1]) % _block(meta):
            raise FormatError(f"its inputs do not split into Hadamard blocks of {_block(meta)}")
        if MATRIX_KEY in tensors:
            check_stored_matrix(tensors[MATRIX_KEY], _transform(meta))


def _inner_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t for k, t in tensors.items() if k != MATRIX_KEY}


def _block(meta: Mapping) -> int:
    block = meta.get("block")
    if not isinstance(block, int) or block <= 0:
        raise FormatError("a rotated compressed-tensors layer needs its Hadamard block in meta")
    return block


def _transform(meta: Mapping) -> OnlineTransform:
    """The layer's transform as :meth:`CompressedTensorsRotatedFormat.module_meta` records it
    (meta without a type: ours, the Sylvester block)."""
    return OnlineTransform(
        str(meta.get("scheme", "")),
        _block(meta),
        str(meta.get("transform", TRANSFORM_TYPE)),
        bool(meta.get("inverse", False)),
    )


def _matrix(tensors: Mapping[str, torch.Tensor], transform: OnlineTransform) -> torch.Tensor:
    if MATRIX_KEY not in tensors:
        raise FormatError(
            f"its {transform.type} transform needs the matrix the checkpoint stores, and none "
            "was handed over"
        )
    matrix = tensors[MATRIX_KEY]
    check_stored_matrix(matrix, transform)
    return matrix


COMPRESSED_TENSORS_ROTATED = register_format(CompressedTensorsRotatedFormat(COMPRESSED_TENSORS))
