"""``quantize_config.json``: what GPTQModel writes and transformers' ``GPTQConfig`` reads, and
what it says of each layer once GPTQModel's ``dynamic`` rules are applied (``layer_claim``)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from latticequant.formats.packing import FormatError, check_bits, check_checkpoint_format
from latticequant.version import __version__


def quantize_config_dict(
    *,
    bits: int,
    group_size: int,
    desc_act: bool = False,
    sym: bool = True,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    checkpoint_format: str = "gptq",
    lm_head: bool = False,
    meta: Mapping | None = None,
) -> dict:
    """The ``quantize_config.json`` dict (also ``config.json``'s ``quantization_config``).

    Key names follow what GPTQModel writes and transformers' ``GPTQConfig`` reads:
    ``checkpoint_format`` and its newer alias ``format``; the quantizer's own settings
    (damping, static groups, method details) are repeated under ``meta``.
    """
    check_bits(bits)
    check_checkpoint_format(checkpoint_format)
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise FormatError(f"group_size must be -1 or a positive integer, got {group_size!r}")
    meta_out = {
        "quantizer": [f"latticequant:{__version__}"],
        "damp_percent": damp_percent,
        "static_groups": bool(static_groups),
        "true_sequential": bool(true_sequential),
    }
    meta_out.update(dict(meta or {}))
    out = {
        "bits": bits,
        "group_size": group_size,
        "desc_act": bool(desc_act),
        "sym": bool(sym),
        "lm_head": bool(lm_head),
        "static_groups": bool(static_groups),
        "true_sequential": bool(true_sequential),
        "act_group_aware": False,
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": meta_out,
    }
    # transformers refuses damp_percent outside (0, 1); the exact value stays in meta.
    if 0 < damp_percent < 1:
        out["damp_percent"] = damp_percent
    return out


def dynamic_overrides(modules: Mapping, skipped, base: Mapping) -> dict:
    """GPTQModel's ``dynamic`` rules: ``-:`` skips a module, ``+:`` gives it other settings.

    ``desc_act`` needs no rule: the base value is true whenever any module's ``g_idx`` is
    permuted, and a reader that honours ``g_idx`` reads every module right.
    """
    dynamic: dict[str, dict] = {}
    for name in skipped:
        dynamic[f"-:^{name.replace('.', '[.]')}$"] = {}
    for name, m in modules.items():
        diff = {
            k: m[k]
            for k in ("bits", "group_size", "sym")
            if m.get(k) is not None and m[k] != base.get(k)  # None: the format has no such field
        }
        if diff:
            dynamic[f"+:^{name.replace('.', '[.]')}$"] = diff
    return dynamic


CLAIMED = ("bits", "group_size", "sym")
"""What a file-level config says of each layer (its base values, a ``dynamic`` rule's changes)."""


def dynamic_rule(dynamic: Mapping, name: str) -> tuple[str, dict] | None:
    """GPTQModel's ``dynamic`` rule for module ``name``, the first that matches: ``("-", {})``
    skips it, ``("+", changes)`` gives it other settings; None when no rule matches."""
    for pattern, changes in dynamic.items():
        sign, regex = ("-", pattern[2:]) if pattern.startswith("-:") else ("+", pattern)
        regex = regex.removeprefix("+:")
        try:
            matched = re.match(regex, name) is not None
        except re.error as exc:
            raise FormatError(f"dynamic rule {pattern!r} is not a valid regex: {exc}") from None
        if matched:
            if sign == "+" and not isinstance(changes, Mapping):
                raise FormatError(f"dynamic rule {pattern!r} does not map to an object")
            return sign, dict(changes) if sign == "+" else {}
    return None


def layer_claim(file_config: Mapping, name: str) -> dict | None:
    """What ``quantize_config.json`` says of layer ``name``: ``bits``, ``group_size`` and
    ``sym``, the base values with its ``dynamic`` rule applied; None when a ``-:`` rule skips
    it (the layer is stored in float)."""
    dynamic = file_config.get("dynamic") or {}
    if not isinstance(dynamic, Mapping):
        raise FormatError("the quantization config's dynamic is not an object")
    claim = {k: file_config.get(k) for k in CLAIMED}
    rule = dynamic_rule(dynamic, name)
    if rule is not None and rule[0] == "-":
        return None
    claim.update(rule[1] if rule else {})
    return claim
