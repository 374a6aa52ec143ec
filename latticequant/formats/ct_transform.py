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
size. Other transform types (``random-hadamard``, ``random-matrix``), permuted (``randomize``)
schemes and online locations other than ``input`` are refused by :func:`online_transform` in one
line: we do not run them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from latticequant.core.rotation import Rotation, block_hadamard_rotation
from latticequant.formats.packing import FormatError

__all__ = [
    "MAX_BLOCK",
    "TRANSFORM_TYPE",
    "OnlineTransform",
    "hadamard_block",
    "ct_hadamard_rotation",
    "transform_config_dict",
    "online_transform",
    "rotates_input",
    "matches_target",
]

TRANSFORM_TYPE = "hadamard"
#: The largest Sylvester block vLLM's hadacore kernel applies (``hadamard_transform.cpp``).
MAX_BLOCK = 1 << 15
#: Locations a reader fuses into the stored weights once (nothing to run).
OFFLINE_LOCATIONS = ("weight_input", "weight_output")
#: compressed-tensors' default ``precision`` of an online transform, as it serialises it.
PRECISION = "torch.float32"


@dataclass(frozen=True)
class OnlineTransform:
    """The online input rotation a ``transform_config`` gives one layer: its scheme's name and
    the order ``block`` of the Sylvester matrix applied to each run of ``block`` inputs."""

    scheme: str
    block: int


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
            found.append((scheme_name, scheme))
    if not found:
        return None
    if len(found) > 1:
        raise FormatError(
            f"transform_config rotates its input twice ({', '.join(n for n, _ in found)})"
        )
    scheme_name, scheme = found[0]
    return OnlineTransform(scheme_name, _runnable_block(scheme_name, scheme, name, d_in))


def _runnable_block(scheme_name: str, scheme: Mapping, name: str, d_in: int) -> int:
    """The Sylvester block of a scheme we run on ``name``; refuses every other kind."""
    what = f"transform_config scheme {scheme_name!r}"
    if scheme.get("type") != TRANSFORM_TYPE:
        raise FormatError(
            f"{what} is of type {scheme.get('type')!r}; latticequant runs only 'hadamard' "
            "(Sylvester) transforms"
        )
    if scheme.get("randomize"):
        raise FormatError(
            f"{what} permutes its matrix (randomize), which latticequant does not run"
        )
    block = scheme.get("head_dim") or d_in
    if (
        isinstance(block, bool)
        or not isinstance(block, int)
        or block <= 0
        or block & (block - 1)
        or d_in % block
    ):
        raise FormatError(
            f"{what} needs a Sylvester Hadamard of order {block} on {d_in} inputs: "
            "compressed-tensors builds power-of-two orders that divide the inputs only"
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
