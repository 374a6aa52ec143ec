"""Byte layouts of llama.cpp's blocks: codes and grid parameters to GGUF tensor data and back.

Each row of a ``(rows, cols)`` matrix becomes ``cols / block_size`` blocks of ``type_size`` bytes,
laid out exactly as the C structs of ggml-common.h (little-endian float16 ``d``/``dmin``/``m``):

- ``block_q8_0``: ``d``, ``qs[32]`` (int8 ``z - 128``);
- ``block_q4_0``, ``block_iq4_nl``: ``d``, ``qs[16]``, weight ``j`` in the low nibble of byte
  ``j`` and weight ``j + 16`` in its high nibble; ``block_q4_1``: ``d``, ``m``, the same ``qs``;
- ``block_q5_0``: ``d``, ``qh[4]`` (bit ``j`` of the little-endian word: bit 4 of weight ``j``),
  ``qs[16]`` as Q4_0 with the low four bits; ``block_q5_1``: ``d``, ``m``, ``qh``, ``qs``;
- ``block_q2_0``: ``d``, ``qs[16]``, weight ``j`` in bits ``2 (j % 4)`` of byte ``j / 4``;
- ``block_q2_K``: ``scales[16]`` (``sc | m << 4``), ``qs[64]``, ``d``, ``dmin``;
- ``block_q3_K``: ``hmask[32]``, ``qs[64]``, ``scales[12]`` (16 6-bit ``sc + 32``), ``d``;
- ``block_q4_K``: ``d``, ``dmin``, ``scales[12]`` (8 6-bit ``sc`` and 8 6-bit ``m``), ``qs[128]``;
- ``block_q5_K``: ``d``, ``dmin``, ``scales[12]``, ``qh[32]``, ``qs[128]``;
- ``block_q6_K``: ``ql[128]``, ``qh[64]``, ``scales[16]`` (int8 ``sc``), ``d``.

In the K types a 2-bit plane (``qs`` of Q2_K/Q3_K) holds, in byte ``32 h + l``, the weights
``128 h + l + 32 k`` at bits ``2 k``; a 4-bit plane (``qs`` of Q4_K/Q5_K) holds in byte
``32 c + l`` the weights ``64 c + l`` (low nibble) and ``64 c + l + 32`` (high nibble); a 1-bit
plane (``hmask`` of Q3_K, ``qh`` of Q5_K) holds in bit ``k`` of byte ``l`` weight ``32 k + l``.
"""

from __future__ import annotations

import numpy as np

from latticequant.formats.gguf.types import (
    ZERO_CODE,
    GGMLType,
    GgufGrid,
    as_type,
    check_codes,
    type_info,
)
from latticequant.formats.packing import FormatError


def _half_bytes(x: np.ndarray) -> np.ndarray:
    """float16 ``(N,)`` as its little-endian bytes ``(N, 2)``."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(-1, 2)


def _half(b: np.ndarray) -> np.ndarray:
    """Little-endian bytes ``(N, 2)`` as float16 ``(N,)``."""
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(np.float16)


def _planes(L: np.ndarray, bits: int, layout: tuple[int, ...]) -> np.ndarray:
    """OR together the fields ``L[..., k, :] << (bits k)`` along the axis before the last, after
    reshaping the ``(N, n)`` values to ``(N, *layout)``: one byte per field of the last axes."""
    L = L.reshape(L.shape[0], *layout).astype(np.uint8)
    out = np.zeros(L.shape[:-2] + L.shape[-1:], dtype=np.uint8)
    for k in range(L.shape[-2]):
        out |= L[..., k, :] << np.uint8(bits * k)
    return out.reshape(L.shape[0], -1)


def _unplanes(b: np.ndarray, bits: int, layout: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_planes`: the ``(N, n)`` fields, ``n`` the product of ``layout``."""
    n_fields = layout[-2]
    b = b.reshape(b.shape[0], *layout[:-2], 1, layout[-1])
    shifts = (np.arange(n_fields, dtype=np.uint8) * bits).reshape(n_fields, 1)
    return ((b >> shifts) & np.uint8((1 << bits) - 1)).reshape(b.shape[0], -1)


def _nibbles32(L: np.ndarray) -> np.ndarray:
    """``qs[16]`` of a 32-weight block: weight ``j`` low, weight ``j + 16`` high."""
    return _planes(L & 0xF, 4, (2, 16))


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12 ``scales`` bytes of block_q4_K/block_q5_K from 8 6-bit ``sc`` and ``m``."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def get_scale_min_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sc`` and ``m`` ``(N, 8)`` from the 12 ``scales`` bytes (ggml's ``get_scale_min_k4``)."""
    sc = np.empty((q.shape[0], 8), dtype=np.int16)
    m = np.empty((q.shape[0], 8), dtype=np.int16)
    sc[:, :4] = q[:, 0:4] & 63
    m[:, :4] = q[:, 4:8] & 63
    sc[:, 4:] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    m[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, m


def _scales_q3(sc: np.ndarray) -> np.ndarray:
    """The 12 ``scales`` bytes of block_q3_K from 16 ``sc`` in -32..31 (stored as ``sc + 32``)."""
    ls = (sc + 32).astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
    out[:, 8:12] = _planes(ls >> 4, 2, (4, 4))
    return out


def _unscales_q3(q: np.ndarray) -> np.ndarray:
    low = np.concatenate([q[:, 0:8] & 0xF, q[:, 0:8] >> 4], axis=1)
    high = _unplanes(q[:, 8:12], 2, (4, 4))
    return (low | (high << 4)).astype(np.int16) - 32


def _pack_blocks(t: GGMLType, L: np.ndarray, p: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The byte fields of ``N`` blocks, in struct order, from codes ``L`` ``(N, block_size)``."""
    if t == GGMLType.Q8_0:
        return [_half_bytes(p["d"]), (L - 128).astype(np.int8).view(np.uint8)]
    if t in (GGMLType.Q4_0, GGMLType.IQ4_NL):
        return [_half_bytes(p["d"]), _nibbles32(L)]
    if t == GGMLType.Q4_1:
        return [_half_bytes(p["d"]), _half_bytes(p["m"]), _nibbles32(L)]
    if t in (GGMLType.Q5_0, GGMLType.Q5_1):
        # bit j of the little-endian word qh: bit 4 of weight j
        qh = np.packbits((L >> 4).astype(np.uint8), axis=1, bitorder="little")
        head = [_half_bytes(p["d"])] + ([_half_bytes(p["m"])] if t == GGMLType.Q5_1 else [])
        return head + [qh, _nibbles32(L)]
    if t == GGMLType.Q2_0:
        return [_half_bytes(p["d"]), _planes(L.reshape(-1, 16, 4).swapaxes(1, 2), 2, (4, 16))]
    if t == GGMLType.Q2_K:
        scales = p["sc"].astype(np.uint8) | (p["m"].astype(np.uint8) << 4)
        return [scales, _planes(L, 2, (2, 4, 32)), _half_bytes(p["d"]), _half_bytes(p["dmin"])]
    if t == GGMLType.Q3_K:
        hmask = _planes(L >> 2, 1, (8, 32))
        return [hmask, _planes(L & 3, 2, (2, 4, 32)), _scales_q3(p["sc"]), _half_bytes(p["d"])]
    if t in (GGMLType.Q4_K, GGMLType.Q5_K):
        head = [_half_bytes(p["d"]), _half_bytes(p["dmin"]), _scales_k4(p["sc"], p["m"])]
        qs = _planes(L & 0xF, 4, (4, 2, 32))
        return head + ([_planes(L >> 4, 1, (8, 32))] if t == GGMLType.Q5_K else []) + [qs]
    if t == GGMLType.Q6_K:
        ql = _planes(L.reshape(-1, 2, 2, 2, 32).swapaxes(2, 3) & 0xF, 4, (2, 2, 2, 32))
        qh = _planes(L >> 4, 2, (2, 4, 32))
        return [ql, qh, p["sc"].astype(np.int8).view(np.uint8), _half_bytes(p["d"])]
    raise FormatError(f"no block layout for {t.name}")


def _unpack_blocks(t: GGMLType, b: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Codes ``(N, block_size)`` and parameters of ``N`` blocks of bytes ``(N, type_size)``."""
    if t == GGMLType.Q8_0:
        return b[:, 2:].view(np.int8).astype(np.int64) + 128, {"d": _half(b[:, 0:2])}
    if t in (GGMLType.Q4_0, GGMLType.IQ4_NL):
        return _unplanes(b[:, 2:], 4, (2, 16)), {"d": _half(b[:, 0:2])}
    if t == GGMLType.Q4_1:
        return _unplanes(b[:, 4:], 4, (2, 16)), {"d": _half(b[:, 0:2]), "m": _half(b[:, 2:4])}
    if t in (GGMLType.Q5_0, GGMLType.Q5_1):
        p = {"d": _half(b[:, 0:2])}
        a = 2
        if t == GGMLType.Q5_1:
            p["m"] = _half(b[:, 2:4])
            a = 4
        high = np.unpackbits(b[:, a : a + 4], axis=1, bitorder="little")
        return _unplanes(b[:, a + 4 :], 4, (2, 16)) | (high << 4), p
    if t == GGMLType.Q2_0:
        L = _unplanes(b[:, 2:], 2, (4, 16)).reshape(-1, 4, 16).swapaxes(1, 2)
        return L.reshape(-1, 64), {"d": _half(b[:, 0:2])}
    if t == GGMLType.Q2_K:
        p = {"sc": (b[:, 0:16] & 0xF).astype(np.int16), "m": (b[:, 0:16] >> 4).astype(np.int16)}
        p |= {"d": _half(b[:, 80:82]), "dmin": _half(b[:, 82:84])}
        return _unplanes(b[:, 16:80], 2, (2, 4, 32)), p
    if t == GGMLType.Q3_K:
        L = _unplanes(b[:, 32:96], 2, (2, 4, 32)) | (_unplanes(b[:, 0:32], 1, (8, 32)) << 2)
        return L, {"sc": _unscales_q3(b[:, 96:108]), "d": _half(b[:, 108:110])}
    if t in (GGMLType.Q4_K, GGMLType.Q5_K):
        sc, m = get_scale_min_k4(b[:, 4:16])
        p = {"d": _half(b[:, 0:2]), "dmin": _half(b[:, 2:4]), "sc": sc, "m": m}
        if t == GGMLType.Q4_K:
            return _unplanes(b[:, 16:144], 4, (4, 2, 32)), p
        high = _unplanes(b[:, 16:48], 1, (8, 32))
        return _unplanes(b[:, 48:176], 4, (4, 2, 32)) | (high << 4), p
    if t == GGMLType.Q6_K:
        low = _unplanes(b[:, 0:128], 4, (2, 2, 2, 32)).reshape(-1, 2, 2, 2, 32).swapaxes(2, 3)
        L = low.reshape(-1, 256) | (_unplanes(b[:, 128:192], 2, (2, 4, 32)) << 4)
        return L, {"sc": b[:, 192:208].view(np.int8).astype(np.int16), "d": _half(b[:, 208:210])}
    raise FormatError(f"no block layout for {t.name}")


def pack(codes: np.ndarray, grid: GgufGrid) -> np.ndarray:
    """GGUF tensor data of codes on a grid: uint8 ``(rows, n_blocks * type_size)``, the blocks of
    each row in order, byte for byte as ggml lays out the type's struct."""
    codes = check_codes(codes, grid)
    info = grid.info
    rows = grid.shape[0]
    n = rows * grid.n_blocks
    L = codes.reshape(n, info.block_size)
    p = {}
    for name in info.params:
        value = getattr(grid, name)
        p[name] = value.reshape(n, -1) if value.ndim == 3 else value.reshape(n)
    fields = _pack_blocks(grid.qtype, L, p)
    data = np.concatenate([f.reshape(n, -1) for f in fields], axis=1)
    assert data.shape[1] == info.type_size
    return data.reshape(rows, grid.n_blocks * info.type_size)


def unpack(qtype: GGMLType | str | int, data: np.ndarray) -> tuple[np.ndarray, GgufGrid]:
    """Codes (int64 ``(rows, cols)``) and grid of GGUF tensor data ``(rows, bytes_per_row)``."""
    t = as_type(qtype)
    info = type_info(t)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % info.type_size:
        raise FormatError(
            f"{t.name} data must be uint8 (rows, k * {info.type_size}), "
            f"got {data.dtype} {data.shape}"
        )
    rows, nb = data.shape[0], data.shape[1] // info.type_size
    b = np.ascontiguousarray(data).reshape(rows * nb, info.type_size)
    L, p = _unpack_blocks(t, b)
    grid_fields = {
        name: value.reshape(rows, nb, -1) if value.ndim == 2 else value.reshape(rows, nb)
        for name, value in p.items()
    }
    grid = GgufGrid(t, (rows, nb * info.block_size), **grid_fields)
    return L.astype(np.int64).reshape(grid.shape), grid


def zero_code(qtype: GGMLType | str | int) -> int | None:
    """The code of value 0 in the types ``d (z - zero)``; None for the others."""
    return ZERO_CODE.get(as_type(qtype))
