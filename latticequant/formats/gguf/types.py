"""The grids of llama.cpp's quantization types, exactly as ggml stores and reads them.

Each type stores a row in blocks of ``block_size`` weights (``type_size`` bytes each). Inside a
block every weight is an integer code ``z`` in ``{0 .. maxq}`` and its value is a function of
``z`` and the block's stored parameters; the parameters are constant over a *group* of
``group_size`` weights (a 16- or 32-weight sub-block of the K types, the whole block otherwise).
Codes are always non-negative here; the signed quants of the format are ``z`` minus a constant.

=========  ==========  =====  =====  ==================================================
type       block/group  maxq  bytes  value of code ``z`` (float32, in ggml's order)
=========  ==========  =====  =====  ==================================================
Q8_0       32 / 32       255     34  ``d * (z - 128)``                   (block_q8_0)
Q5_0       32 / 32        31     22  ``d * (z - 16)``                    (block_q5_0)
Q5_1       32 / 32        31     24  ``d * z + m``                       (block_q5_1)
Q4_0       32 / 32        15     18  ``d * (z - 8)``                     (block_q4_0)
Q4_1       32 / 32        15     20  ``d * z + m``                       (block_q4_1)
IQ4_NL     32 / 32        15     18  ``d * kvalues[z]``                  (block_iq4_nl)
Q2_0       64 / 64         3     18  ``(z - 1) * d``                     (block_q2_0)
Q6_K      256 / 16        63    210  ``(d * sc) * (z - 32)``             (block_q6_K)
Q5_K      256 / 32        31    176  ``(d * sc) * z - (dmin * m)``       (block_q5_K)
Q4_K      256 / 32        15    144  ``(d * sc) * z - (dmin * m)``       (block_q4_K)
Q3_K      256 / 16         7    110  ``(d * sc) * (z - 4)``              (block_q3_K)
Q2_K      256 / 16         3     84  ``(d * sc) * z - (dmin * m)``       (block_q2_K)
=========  ==========  =====  =====  ==================================================

``d``, ``dmin`` and Q4_1/Q5_1's ``m`` are float16 per block; ``sc`` and the K types' ``m`` are
the integer sub-block scales and mins as the dequantizer reads them: Q6_K's ``sc`` is int8
(-128..127), Q3_K's 6-bit ``sc`` is stored biased by 32 (-32..31), Q4_K/Q5_K's ``sc``/``m`` are
6-bit (0..63) and Q2_K's 4-bit (0..15). Q2_0 is the ternary-plus-two type of group 64
(codes ``{-1, 0, 1, 2} x d``, 2.25 bits per weight; ggml type 42).

For a decoder every uniform type is the grid ``value = s * (z - o)`` of
:mod:`latticequant.core.grid` with a real scale and offset per group (:func:`scales_offsets`):
for Q4_K ``s = d * sc`` and ``o = dmin * m / s``; IQ4_NL is a codebook of 16 levels
``d * kvalues`` per group (:func:`levels`). :func:`nearest_codes` rounds to the nearest level of
each group, :func:`dequantize` gives the float32 weights bit for bit as ggml does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from latticequant.formats.packing import FormatError


class GGMLType(IntEnum):
    """ggml's type ids (``enum ggml_type`` in ggml.h): the quantized types implemented here, and
    the float types a tensor may be left in."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    IQ4_NL = 20
    Q2_0 = 42


#: Weights per super-block of the K types (``QK_K``).
QK_K = 256

#: ``kvalues_iq4nl``: the 16 levels of IQ4_NL, in units of the block's ``d``.
KVALUES_IQ4NL = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)


@dataclass(frozen=True)
class TypeInfo:
    """What a type stores: weights and bytes per block, weights per group, the largest code,
    and which parameters (``d``, ``dmin``, ``m``, ``sc``) it has."""

    block_size: int
    type_size: int
    group_size: int
    maxq: int
    params: tuple[str, ...]
    sc_range: tuple[int, int] | None = None
    m_range: tuple[int, int] | None = None


TYPES: dict[GGMLType, TypeInfo] = {
    GGMLType.Q8_0: TypeInfo(32, 34, 32, 255, ("d",)),
    GGMLType.Q5_0: TypeInfo(32, 22, 32, 31, ("d",)),
    GGMLType.Q5_1: TypeInfo(32, 24, 32, 31, ("d", "m")),
    GGMLType.Q4_0: TypeInfo(32, 18, 32, 15, ("d",)),
    GGMLType.Q4_1: TypeInfo(32, 20, 32, 15, ("d", "m")),
    GGMLType.IQ4_NL: TypeInfo(32, 18, 32, 15, ("d",)),
    GGMLType.Q2_0: TypeInfo(64, 18, 64, 3, ("d",)),
    GGMLType.Q6_K: TypeInfo(256, 210, 16, 63, ("d", "sc"), sc_range=(-128, 127)),
    GGMLType.Q5_K: TypeInfo(256, 176, 32, 31, ("d", "dmin", "sc", "m"), (0, 63), (0, 63)),
    GGMLType.Q4_K: TypeInfo(256, 144, 32, 15, ("d", "dmin", "sc", "m"), (0, 63), (0, 63)),
    GGMLType.Q3_K: TypeInfo(256, 110, 16, 7, ("d", "sc"), sc_range=(-32, 31)),
    GGMLType.Q2_K: TypeInfo(256, 84, 16, 3, ("d", "dmin", "sc", "m"), (0, 15), (0, 15)),
}

#: The code whose value is 0 in the types of the form ``d * (z - zero)`` (``sc`` included).
ZERO_CODE = {
    GGMLType.Q8_0: 128,
    GGMLType.Q5_0: 16,
    GGMLType.Q4_0: 8,
    GGMLType.Q2_0: 1,
    GGMLType.Q6_K: 32,
    GGMLType.Q3_K: 4,
}


def as_type(qtype: GGMLType | str | int) -> GGMLType:
    """The type named by an enum member, its name (``"Q4_K"``) or its ggml id."""
    if isinstance(qtype, GGMLType):
        return qtype
    if isinstance(qtype, str):
        try:
            return GGMLType[qtype.upper()]
        except KeyError:
            raise ValueError(
                f"unknown GGML type {qtype!r}; known: {[t.name for t in GGMLType]}"
            ) from None
    try:
        return GGMLType(int(qtype))
    except ValueError:
        raise ValueError(f"unknown GGML type id {qtype!r}") from None


def type_info(qtype: GGMLType | str | int) -> TypeInfo:
    """:class:`TypeInfo` of a quantized type (:class:`FormatError` for F32 and F16)."""
    t = as_type(qtype)
    if t not in TYPES:
        raise FormatError(f"{t.name} is not a quantized type")
    return TYPES[t]


@dataclass(frozen=True, eq=False)
class GgufGrid:
    """The stored parameters of every block of a matrix of shape ``(rows, cols)``.

    ``d`` (and ``dmin``) are float16 of shape ``(rows, n_blocks)``; for Q4_1/Q5_1 ``m`` is the
    float16 block minimum of that shape, for the K types ``sc`` and ``m`` are int16 of shape
    ``(rows, n_blocks, n_sub)`` with ``n_sub = block_size / group_size``. Fields a type does not
    have are None.
    """

    qtype: GGMLType
    shape: tuple[int, int]
    d: np.ndarray
    dmin: np.ndarray | None = None
    sc: np.ndarray | None = None
    m: np.ndarray | None = None
    info: TypeInfo = field(init=False, repr=False)

    def __post_init__(self) -> None:
        qtype = as_type(self.qtype)
        object.__setattr__(self, "qtype", qtype)
        info = type_info(qtype)
        object.__setattr__(self, "info", info)
        rows, cols = self.shape
        if cols % info.block_size:
            raise FormatError(
                f"{qtype.name} needs rows a multiple of {info.block_size} long, got {cols}"
            )
        nb = cols // info.block_size
        n_sub = info.block_size // info.group_size
        for name in ("d", "dmin", "sc", "m"):
            value = getattr(self, name)
            wanted = name in info.params
            if (value is None) == wanted:
                raise FormatError(f"{qtype.name} {'needs' if wanted else 'has no'} {name}")
            if value is None:
                continue
            per_group = name == "sc" or (name == "m" and info.m_range is not None)
            shape = (rows, nb, n_sub) if per_group else (rows, nb)
            dtype = np.int16 if per_group else np.float16
            value = np.asarray(value)
            if value.shape != shape:
                raise FormatError(f"{qtype.name} {name} must have shape {shape}, got {value.shape}")
            if per_group:
                if not np.issubdtype(value.dtype, np.integer):
                    raise FormatError(f"{qtype.name} {name} must be integers")
                lo, hi = info.sc_range if name == "sc" else info.m_range
                if value.size and (value.min() < lo or value.max() > hi):
                    raise FormatError(f"{qtype.name} {name} must lie in {lo}..{hi}")
            object.__setattr__(self, name, value.astype(dtype, copy=False))

    @property
    def n_blocks(self) -> int:
        return self.shape[1] // self.info.block_size

    @property
    def n_groups(self) -> int:
        return self.shape[1] // self.info.group_size


def check_codes(codes: np.ndarray, grid: GgufGrid) -> np.ndarray:
    """Codes as int64 of the grid's shape, each in ``{0 .. maxq}``; :class:`FormatError` if not."""
    codes = np.asarray(codes)
    if codes.shape != grid.shape:
        raise FormatError(f"codes must have shape {grid.shape}, got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        if not np.array_equal(codes, np.round(codes)):
            raise FormatError("codes must be integers")
    codes = codes.astype(np.int64)
    if codes.size and (codes.min() < 0 or codes.max() > grid.info.maxq):
        raise FormatError(f"{grid.qtype.name} codes must lie in 0..{grid.info.maxq}")
    return codes


def _group_params(grid: GgufGrid) -> dict[str, np.ndarray]:
    """Each parameter as float32 of shape ``(rows, n_groups, 1)``: one value per group."""
    n_sub = grid.info.block_size // grid.info.group_size
    rows = grid.shape[0]
    out = {}
    for name in grid.info.params:
        value = getattr(grid, name).astype(np.float32)
        if value.ndim == 2:
            value = np.repeat(value, n_sub, axis=1)
        out[name] = value.reshape(rows, grid.n_groups, 1)
    return out


def _values(qtype: GGMLType, p: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
    """The float32 value of codes ``z`` (broadcast against ``p``), in ggml's order of operations."""
    t = qtype
    if t in (GGMLType.Q4_1, GGMLType.Q5_1):
        return p["d"] * z.astype(np.float32) + p["m"]
    if t == GGMLType.IQ4_NL:
        return p["d"] * KVALUES_IQ4NL[z].astype(np.float32)
    if t == GGMLType.Q2_0:
        return (z - 1).astype(np.float32) * p["d"]
    if t in (GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_0):
        return p["d"] * (z - ZERO_CODE[t]).astype(np.float32)
    dl = p["d"] * p["sc"]
    if t in (GGMLType.Q6_K, GGMLType.Q3_K):
        return dl * (z - ZERO_CODE[t]).astype(np.float32)
    return dl * z.astype(np.float32) - p["dmin"] * p["m"]


def dequantize(codes: np.ndarray, grid: GgufGrid) -> np.ndarray:
    """float32 weights ``(rows, cols)`` of codes on a grid, bit for bit as ggml's
    ``dequantize_row_*`` computes them."""
    codes = check_codes(codes, grid)
    rows, cols = grid.shape
    z = codes.reshape(rows, grid.n_groups, grid.info.group_size)
    return _values(grid.qtype, _group_params(grid), z).reshape(rows, cols)


def levels(grid: GgufGrid) -> np.ndarray:
    """Every level of every group: float32 ``(rows, n_groups, maxq + 1)``, level ``z`` being the
    value of code ``z`` (exactly :func:`dequantize`'s)."""
    z = np.arange(grid.info.maxq + 1).reshape(1, 1, -1)
    return _values(grid.qtype, _group_params(grid), z)


def codebook(qtype: GGMLType | str | int) -> np.ndarray | None:
    """The levels a code indexes, in units of the scale (float64, sorted), for a codebook type
    (IQ4_NL: ``kvalues_iq4nl``); None for a uniform type, whose code ``z`` is its own level."""
    return KVALUES_IQ4NL.astype(np.float64) if as_type(qtype) == GGMLType.IQ4_NL else None


def scales_offsets(grid: GgufGrid) -> tuple[np.ndarray, np.ndarray]:
    """Real scale ``s`` and offset ``o`` per group (float64, ``(rows, n_groups)``) with
    ``value = s * (z - o)`` for a uniform type and ``value = s * (codebook[z] - o)`` for a
    codebook type (IQ4_NL: ``s = d``, ``o = 0``; :func:`codebook`).

    A group whose scale is 0 (``d = 0`` or ``sc = 0``) has a single value whatever its code; its
    offset is reported as 0 and its value is in :func:`levels`.
    """
    t = grid.qtype
    p = {k: v[..., 0].astype(np.float64) for k, v in _group_params(grid).items()}
    if t == GGMLType.IQ4_NL:
        return p["d"], np.zeros_like(p["d"])
    if t in ZERO_CODE:
        s = p["d"] * p["sc"] if "sc" in p else p["d"]
        return s, np.full_like(s, float(ZERO_CODE[t]))
    if t in (GGMLType.Q4_1, GGMLType.Q5_1):
        s, bias = p["d"], p["m"]  # value = d z + m
    else:
        s, bias = p["d"] * p["sc"], -p["dmin"] * p["m"]  # value = d sc z - dmin m
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.where(s != 0, -bias / s, 0.0)
    return s, o


#: Rows per step of IQ4_NL's nearest-level search.
NEAREST_ROWS = 1024


def nearest_codes(x: np.ndarray, grid: GgufGrid) -> np.ndarray:
    """Round weights ``x`` (rows, cols) to the nearest level of their group: int64 codes.

    Uniform types round ``x / s + o`` and clip to ``{0 .. maxq}`` (a group of scale 0 gets code
    ``o`` clipped, any code having the same value); IQ4_NL takes the nearest of its 16 levels.
    """
    x = np.asarray(x, dtype=np.float64)
    rows, cols = grid.shape
    if x.shape != grid.shape:
        raise FormatError(f"weights must have shape {grid.shape}, got {x.shape}")
    g = grid.info.group_size
    xg = x.reshape(rows, grid.n_groups, g)
    if grid.qtype == GGMLType.IQ4_NL:
        lv = levels(grid).astype(np.float64)
        z = np.empty(xg.shape, dtype=np.int64)
        for a in range(0, rows, NEAREST_ROWS):  # bounds the (rows, cols, 16) distances
            b = min(a + NEAREST_ROWS, rows)
            z[a:b] = np.abs(xg[a:b, ..., None] - lv[a:b, :, None, :]).argmin(axis=-1)
        return z.reshape(rows, cols)
    s, o = scales_offsets(grid)
    s, o = s[..., None], o[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(s != 0, np.rint(xg / s + o), np.rint(o))
    return np.clip(z, 0, grid.info.maxq).astype(np.int64).reshape(rows, cols)


class ColumnRounder:
    """The nearest level of column ``j`` in each row's group, one column at a time: the rounding
    step of a decoder with error feedback (GPTQ, Babai's nearest plane) on a fixed grid.

    ``rounder(x, j)`` takes the ``rows`` values of column ``j`` (after the feedback of the
    columns decoded before it) and returns their codes (int64) and the exact float32 values of
    those codes (as float64), the ``q`` whose error the decoder feeds forward.
    """

    def __init__(self, grid: GgufGrid):
        self.grid = grid
        self.params = _group_params(grid)
        self.uniform = grid.qtype != GGMLType.IQ4_NL
        if self.uniform:
            self.s, self.o = scales_offsets(grid)
        else:
            self.levels = levels(grid).astype(np.float64)

    def __call__(self, x: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = self.grid.shape
        if not 0 <= j < cols:
            raise IndexError(f"column {j} out of range for {cols} columns")
        x = np.asarray(x, dtype=np.float64).reshape(rows)
        g = j // self.grid.info.group_size
        if self.uniform:
            s, o = self.s[:, g], self.o[:, g]
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(s != 0, np.rint(x / s + o), np.rint(o))
            z = np.clip(z, 0, self.grid.info.maxq).astype(np.int64)
        else:
            z = np.abs(x[:, None] - self.levels[:, g, :]).argmin(axis=1)
        p = {k: v[:, g : g + 1, :] for k, v in self.params.items()}
        q = _values(self.grid.qtype, p, z.reshape(rows, 1, 1)).reshape(rows)
        return z, q.astype(np.float64)
