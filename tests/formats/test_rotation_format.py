"""Rotated layers' stored transform and the module that applies it."""

from __future__ import annotations

import pytest
import torch
from cases import make_result

from latticequant.core.rotation import Rotation, block_hadamard_rotation, hadamard_rotation
from latticequant.formats import FormatError, QuantLinear, dequantize_gptq, pack_gptq
from latticequant.formats.bits import effective_bits
from latticequant.formats.rotation import (
    ROTATION_KEYS,
    RotatedLinear,
    pack_rotation,
    unpack_rotation,
)


def _dense(signs: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``diag(s) (H_a kron F) / sqrt(a)`` by doubling and torch.kron."""
    a = signs.numel() // factor.shape[0]
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < a:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return signs.double()[:, None] * torch.kron(H, factor.double()) / a**0.5


@pytest.mark.parametrize("n", [1, 7, 8, 12, 100, 576])
def test_pack_and_unpack_round_trip(n):
    rot = hadamard_rotation(n, 11)
    t = pack_rotation(rot, 11)
    assert set(t) == set(ROTATION_KEYS)
    assert t["rot_signs"].dtype == torch.uint8 and t["rot_signs"].numel() == -(-n // 8)
    assert int(t["rot_seed"]) == 11
    back = unpack_rotation(t, n)
    assert torch.equal(back.signs, rot.signs) and torch.equal(back.factor, rot.factor)
    # bit i%8 of byte i//8 set for a negative sign, read back independently
    for i in range(n):
        bit = (int(t["rot_signs"][i // 8]) >> (i % 8)) & 1
        assert bit == int(rot.signs[i] < 0)


def _corrupt(n=96):
    return pack_rotation(hadamard_rotation(n, 3), 3), n


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: t.pop("rot_signs"), "missing"),
        (lambda t: t.pop("rot_factor"), "missing"),
        (lambda t: t.update(rot_signs=t["rot_signs"].to(torch.int32)), "uint8"),
        (lambda t: t.update(rot_signs=t["rot_signs"][:-1]), "uint8 bytes"),
        (lambda t: t.update(rot_factor=t["rot_factor"].float()), "float64"),
        (lambda t: t.update(rot_factor=t["rot_factor"] * 1.001), "not orthogonal"),
        (lambda t: t.update(rot_factor=torch.eye(4, dtype=torch.float64)), "does not split"),
        (lambda t: t["rot_factor"].fill_(float("nan")), "orthogonal"),
    ],
)  # fmt: skip
def test_corrupt_transforms_are_refused_in_one_line(change, match):
    t, n = _corrupt()
    change(t)
    with pytest.raises(FormatError, match=match) as exc:
        unpack_rotation(t, n)
    assert "\n" not in str(exc.value)


def test_set_padding_bits_are_refused():
    t, n = _corrupt(12)  # 12 signs in 2 bytes: 4 padding bits
    t["rot_signs"] = t["rot_signs"].clone()
    t["rot_signs"][-1] |= 0x80
    with pytest.raises(FormatError, match="padding"):
        unpack_rotation(t, n)


def test_rotated_quant_linear_is_the_dequantized_rotated_weight_on_rotated_inputs():
    torch.manual_seed(0)
    d_out, d_in = 24, 96
    rot = hadamard_rotation(d_in, 2)
    r = make_result(d_out, d_in, bits=4, group_size=32, seed=1)
    t = pack_gptq(r)
    stored = pack_rotation(rot, 2)
    bias = torch.randn(d_out)
    module = RotatedLinear(unpack_rotation(stored, d_in), QuantLinear.from_tensors(t, 4, bias=bias))
    Q_rot = dequantize_gptq(t, 4, dtype=torch.float64)
    R = _dense(unpack_rotation(stored, d_in).signs, stored["rot_factor"])
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        x = torch.randn(5, 3, d_in).to(dtype)
        ref = (x.double() @ R) @ Q_rot.T + bias.double()
        y = module(x)
        assert y.dtype == dtype and y.shape == (5, 3, d_out)
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < tol
    # the transform's few bytes count in the layer's effective bits
    plain = effective_bits(t, d_out * d_in)
    rotated = effective_bits({**t, **stored}, d_out * d_in)
    extra = (12 * 8 + 9 * 64 + 64) / (d_out * d_in)  # 12 sign bytes, 3x3 float64, seed
    assert rotated == pytest.approx(plain + extra)
    with pytest.raises(ValueError, match="features"):
        module(torch.randn(2, d_in + 1))


@pytest.mark.parametrize(
    "rot",
    [
        block_hadamard_rotation(96, 32),
        Rotation(
            1 - 2 * torch.randint(0, 2, (96,), generator=torch.Generator().manual_seed(3)).double(),
            torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0].contiguous(),
            factor_major=True,
        ),
    ],
    ids=["block-hadamard", "factor-major-random"],
)
def test_rotated_linear_runs_factor_major_rotations(rot):
    """compressed-tensors' layout (``F kron H_a``) at run time, against the dense matrix."""
    torch.manual_seed(0)
    inner = torch.nn.Linear(96, 10).double()
    module = RotatedLinear(rot, inner)
    R = torch.kron(rot.factor, _dense(torch.ones(rot.a), torch.ones(1, 1))) * rot.signs[:, None]
    x = torch.randn(4, 96, dtype=torch.float64)
    assert torch.allclose(module(x), inner(x @ R), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="factor-major"):
        pack_rotation(rot, 0)


def test_rotated_linear_follows_its_buffers_when_moved():
    """``.to()`` replaces the sign and factor buffers: the rotation applied afterwards is the one
    on the new buffers (here a float64 copy), still ``x R`` of the dense matrix."""
    rot = hadamard_rotation(48, 5)  # 16 x 3: a random odd factor
    inner = torch.nn.Linear(48, 6).double()
    module = RotatedLinear(rot, inner)
    x = torch.randn(3, 48, dtype=torch.float64)
    before = module.rotate(x)
    module.to(torch.float64)
    assert module.signs.dtype == torch.float64
    after = module.rotate(x)
    reference = x @ _dense(rot.signs, rot.factor)
    assert torch.allclose(before.double(), reference, atol=1e-5, rtol=0)
    assert torch.allclose(after.double(), reference, atol=1e-5, rtol=0)
    assert module._rotation().signs is module.signs
