"""compressed-tensors' ``transform_config``: the online Hadamard rotations its readers apply.

A compressed-tensors checkpoint may name, beside its quantization ``config_groups``, transforms
its readers apply (``transform_config``, compressed-tensors 0.20.1 ``transform/``). A scheme of
type ``hadamard`` whose ``apply`` list holds ``location: input`` for a linear layer makes the
reader compute ``x -> x R`` before the layer; its ``location: weight_input`` entry (offline)
says the stored weight already holds ``W R`` (``R`` orthogonal and symmetric, so its inverse
side is ``R`` again). The reader builds ``R`` itself: compressed-tensors' ``HadamardFactory``
caches one ``deterministic_hadamard_matrix(b) / sqrt(b)`` (Sylvester, power-of-two orders
only) per size ``b`` and applies it block-diagonally when the scheme's ``head_dim`` is ``b`` below
the layer's ``d_in``; vLLM runs the same with its hadacore kernel (power-of-two sizes up to
``2^15``, reading no matrix from the file).

So the rotation a layer of ours is quantized in, for this format, is that matrix:
``R = I_{d_in / b} (x) H_b / sqrt(b)`` with ``b`` the largest power of two dividing ``d_in``
(at most :data:`MAX_BLOCK`), one per size for every layer, no signs and no seed. Nothing is
stored for it; :func:`transform_config_dict` says which layers it rotates, one scheme per block
size.

llm-compressor's checkpoints (QuIP, SpinQuant's ``R4``) also store each online transform's
matrix: compressed-tensors registers the transform as a submodule ``<scheme>_input`` of the
layer, its factories share one matrix per size among the layers of a scheme, and saving keeps
one copy of each shared tensor, so the file holds ``<layer>.<scheme>_input.weight`` for the
first layer of each size only (:func:`stored_matrix_key` finds it for every other layer). The
matrix ``B`` is unnormalised for the Hadamard types and applied as ``x -> x B / sqrt(b)``
(``B^T`` for an ``inverse`` entry), as is for ``random-matrix`` (``HadamardTransform`` and
``RandomMatrixTransform`` in compressed-tensors 0.20.1, ``transform/factory/``). ``hadamard``
is run as the Sylvester matrix its readers build (a stored one must be that matrix);
``random-hadamard`` and ``random-matrix`` need the stored one. Permuted (``randomize``) schemes
and online locations other than ``input`` are refused by :func:`online_transform` in one line:
we do not run them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from latticequant.core.rotation import Rotation, block_hadamard_rotation, sylvester_hadamard
from latticequant.formats.packing import FormatError

__all__ = [
    "MAX_BLOCK",
    "TRANSFORM_TYPE",
    "TRANSFORM_TYPES",
    "STORED_TYPES",
    "OnlineTransform",
    "hadamard_block",
    "ct_hadamard_rotation",
    "transform_config_dict",
    "online_transform",
    "rotates_input",
    "matches_target",
    "stored_matrix_key",
    "check_stored_matrix",
    "online_block",
]

TRANSFORM_TYPE = "hadamard"
#: Transform types whose matrix the reader takes from the checkpoint (it cannot build them:
#: their signs or entries come from a generator).
STORED_TYPES = ("random-hadamard", "random-matrix")
#: Every type we run online.
TRANSFORM_TYPES = (TRANSFORM_TYPE, *STORED_TYPES)
#: The largest Sylvester block vLLM's hadacore kernel applies (``hadamard_transform.cpp``).
MAX_BLOCK = 1 << 15
#: Locations a reader fuses into the stored weights once (nothing to run).
OFFLINE_LOCATIONS = ("weight_input", "weight_output")
#: compressed-tensors' default ``precision`` of an online transform, as it serialises it.
PRECISION = "torch.float32"


@dataclass(frozen=True)
class OnlineTransform:
    """The online input transform a ``transform_config`` gives one layer: its scheme's name, the
    order ``block`` of the matrix applied to each run of ``block`` inputs, the scheme's ``type``
    and whether its ``input`` entry is ``inverse``."""

    scheme: str
    block: int
    type: str = TRANSFORM_TYPE
    inverse: bool = False

    def matrix_key(self, name: str) -> str:
        """Where compressed-tensors stores the matrix of layer ``name``'s transform."""
        return f"{name}.{self.scheme}_input.weight"

    @property
    def scale(self) -> float:
        """What the stored matrix is divided by: ``sqrt(block)`` for the Hadamard types (the
        stored entries are +-1), 1 for ``random-matrix``."""
        return 1.0 if self.type == "random-matrix" else math.sqrt(self.block)

    @property
    def transposed(self) -> bool:
        """Whether the stored matrix is applied transposed: an ``inverse`` Hadamard entry
        (``random-matrix`` stores its inverse itself)."""
        return self.inverse and self.type != "random-matrix"


def hadamard_block(n: int) -> int:
    """The Sylvester block our compressed-tensors layers of ``n`` inputs are rotated in: the
    largest power of two dividing n, at most :data:`MAX_BLOCK`."""
    return min(n & -n, MAX_BLOCK)


def ct_hadamard_rotation(n: int, block: int | None = None) -> Rotation:
    """``I_{n / block} (x) H_block / sqrt(block)`` (``block``: :func:`hadamard_block` when None),
    the matrix compressed-tensors' ``hadamard`` scheme and vLLM apply to ``n`` inputs."""
    return block_hadamard_rotation(n, hadamard_block(n) if block is None else block)


def _args(targets: list[str], location: str, inverse: bool) -> dict:
    return {"targets": targets, "location": location, "inverse": inverse, "ignore": []}


def transform_config_dict(rotated: Mapping[str, int]) -> dict:
    """``transform_config`` for layers (name -> ``d_in``) whose stored weight is ``W R``.

    One ``hadamard`` scheme per block size ``b`` (named ``hadamard_<b>``, ``head_dim: b`` unless
    every layer it names has ``d_in = b``): ``input`` on each layer (the reader rotates its
    inputs) and ``weight_input`` inverse (already in the stored weight), the two entries
    llm-compressor's SpinQuant ``R4`` writes. ``{}`` when nothing is rotated.
    """
    by_block: dict[int, list[str]] = {}
    for name, n in rotated.items():
        by_block.setdefault(hadamard_block(int(n)), []).append(name)
    groups = {}
    for b, names in sorted(by_block.items()):
        names = sorted(names)
        groups[f"hadamard_{b}"] = {
            "type": TRANSFORM_TYPE,
            "apply": [_args(names, "input", False), _args(names, "weight_input", True)],
            "randomize": False,
            "requires_grad": False,
            "head_dim": None if all(int(rotated[n]) == b for n in names) else b,
            "precision": PRECISION,
        }
    return {"config_groups": groups} if groups else {}


def _schemes(file_config: Mapping) -> dict[str, Mapping]:
    """The ``config_groups`` of the file's ``transform_config`` (none when it is empty)."""
    config = file_config.get("transform_config")
    if not config:
        return {}
    groups = config.get("config_groups") if isinstance(config, Mapping) else None
    if not isinstance(groups, Mapping):
        raise FormatError("transform_config has no config_groups mapping")
    for name, scheme in groups.items():
        if not isinstance(scheme, Mapping) or not isinstance(scheme.get("apply", []), list):
            raise FormatError(
                f"transform_config scheme {name!r} is not a scheme with an apply list"
            )
    return dict(groups)


def _names(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _applies(args: Mapping, name: str) -> bool:
    """compressed-tensors' match (``is_match``): an exact name, a ``re:`` regex (``re.match``)
    or the class ``Linear``, and not in ``ignore``; only linear layers are asked about."""

    def hit(targets: Iterable[str]) -> bool:
        return any(t == "Linear" or matches_target(name, t) for t in targets)

    return hit(_names(args.get("targets"))) and not hit(_names(args.get("ignore")))


def matches_target(name: str, target: str) -> bool:
    """compressed-tensors' name match (``match_name``): ``re:`` prefix for a regex
    (``re.match``), else equal."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def rotates_input(file_config: Mapping, name: str) -> bool:
    """Whether some ``location: input`` entry of ``transform_config`` applies to ``name``."""
    return any(
        isinstance(args, Mapping) and args.get("location") == "input" and _applies(args, name)
        for scheme in _schemes(file_config).values()
        for args in scheme.get("apply", [])
    )


def online_transform(file_config: Mapping, name: str, d_in: int) -> OnlineTransform | None:
    """The online input rotation ``transform_config`` gives linear layer ``name`` (``d_in``
    inputs), or None when it gives none; a one-line :class:`FormatError` for one we cannot run
    or that does not say the stored weight holds its inverse."""
    found = []
    for scheme_name, scheme in _schemes(file_config).items():
        for args in scheme.get("apply", []):
            if not isinstance(args, Mapping) or not _applies(args, name):
                continue
            location = args.get("location")
            if location in OFFLINE_LOCATIONS:
                continue  # fused into the stored weight by whoever wrote it
            if location != "input":
                raise FormatError(
                    f"transform_config scheme {scheme_name!r} applies a {location!r} transform "
                    "to it, which latticequant does not run (only 'input')"
                )
            found.append((scheme_name, scheme, bool(args.get("inverse", False))))
    if not found:
        return None
    if len(found) > 1:
        raise FormatError(
            f"transform_config rotates its input twice ({', '.join(f[0] for f in found)})"
        )
    scheme_name, scheme, inverse = found[0]
    block = _runnable_block(scheme_name, scheme, name, d_in)
    return OnlineTransform(scheme_name, block, scheme["type"], inverse)


def _runnable_block(scheme_name: str, scheme: Mapping, name: str, d_in: int) -> int:
    """The block of a scheme we run on ``name``; refuses every other kind."""
    what = f"transform_config scheme {scheme_name!r}"
    kind = scheme.get("type")
    if kind not in TRANSFORM_TYPES:
        raise FormatError(
            f"{what} is of type {kind!r}; latticequant runs {', '.join(map(repr, TRANSFORM_TYPES))}"
        )
    if scheme.get("randomize"):
        raise FormatError(
            f"{what} permutes its matrix (randomize), which latticequant does not run"
        )
    block = scheme.get("head_dim") or d_in
    fits = not isinstance(block, bool) and isinstance(block, int) and block > 0
    fits = fits and d_in % block == 0
    if kind == TRANSFORM_TYPE and not (fits and block & (block - 1) == 0):
        raise FormatError(
            f"{what} needs a Sylvester Hadamard of order {block} on {d_in} inputs: "
            "compressed-tensors builds power-of-two orders that divide the inputs only"
        )
    if not fits:
        raise FormatError(
            f"{what} applies blocks of {block!r} to {d_in} inputs: they must divide it"
        )
    if not any(
        isinstance(a, Mapping) and a.get("location") == "weight_input" and _applies(a, name)
        for a in scheme.get("apply", [])
    ):
        raise FormatError(
            f"{what} rotates its input online but has no 'weight_input' entry for it: nothing "
            "says the stored weight holds the inverse rotation"
        )
    return block


def stored_matrix_key(
    tensors: Mapping[str, torch.Tensor], name: str, transform: OnlineTransform
) -> str | None:
    """The checkpoint key holding the matrix of layer ``name``'s online transform, or None.

    Its own ``<name>.<scheme>_input.weight``, else the one matrix of that scheme and size stored
    under another layer: compressed-tensors' factories share one matrix per size
    (``ParameterizedDefaultDict`` keyed by size, ``transform/factory/hadamard.py``), and saving
    keeps one copy of each shared tensor. Several different ones of that size for a layer that
    stores none is a one-line :class:`FormatError` (which one it runs is not said).
    """
    own = transform.matrix_key(name)
    if own in tensors:
        return own
    suffix = f".{transform.scheme}_input.weight"
    size = (transform.block, transform.block)
    keys = sorted(k for k, t in tensors.items() if k.endswith(suffix) and tuple(t.shape) == size)
    if not keys:
        return None
    first = tensors[keys[0]]
    if any(not torch.equal(tensors[k], first) for k in keys[1:]):
        raise FormatError(
            f"transform_config scheme {transform.scheme!r} stores different matrices of size "
            f"{transform.block} ({keys[0]}, ...) and none for this layer: which one it runs is "
            "not said"
        )
    return keys[0]


def check_stored_matrix(matrix: torch.Tensor, transform: OnlineTransform) -> None:
    """A stored transform matrix must be a finite float ``(block, block)``; for type
    ``hadamard``, the unnormalised Sylvester matrix every reader builds (vLLM reads none)."""
    size = (transform.block, transform.block)
    if not matrix.is_floating_point() or tuple(matrix.shape) != size:
        raise FormatError(
            f"its {transform.scheme}_input.weight must be a float {list(size)} matrix, got "
            f"{matrix.dtype} {list(matrix.shape)}"
        )
    if not bool(torch.isfinite(matrix).all()):
        raise FormatError(f"its {transform.scheme}_input.weight holds non-finite entries")
    if transform.type == TRANSFORM_TYPE and not torch.equal(
        matrix.to(torch.float64), sylvester_hadamard(transform.block)
    ):
        raise FormatError(
            f"its {transform.scheme}_input.weight is not the Sylvester Hadamard matrix of "
            f"order {transform.block} that type 'hadamard' names (vLLM builds that one and "
            "ignores the stored one)"
        )


def online_block(matrix: torch.Tensor, transform: OnlineTransform) -> torch.Tensor:
    """The ``block x block`` matrix ``B`` applied to each run of ``block`` inputs,
    ``x -> x B``: the stored one scaled (and transposed) as compressed-tensors applies it."""
    out = matrix.T if transform.transposed else matrix
    return out / transform.scale
