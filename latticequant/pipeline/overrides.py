"""Per-module settings by name pattern: ``--skip PATTERN``, ``--override PATTERN:field=value``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from latticequant.methods.registry import settable_fields

__all__ = ["Override", "parse_override", "resolve_config", "skip_reason"]


@dataclass(frozen=True)
class Override:
    """Settings for the modules whose full name matches ``pattern`` (``re.search``).

    skip: leave the module in float. changes: config fields to replace (``{"bits": 3}``).
    Later overrides win over earlier ones.
    """

    pattern: str
    skip: bool = False
    changes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"override pattern {self.pattern!r} is not a regex: {exc}") from None

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def parse_override(text: str, config_cls: type | None = None) -> Override:
    """``PATTERN:field=value[,field=value]`` or ``PATTERN:skip`` into an :class:`Override`.

    Values are converted to the type of the field's default in ``config_cls``; a field the
    config does not have, or one a user may not set (:func:`settable_fields`), is refused.
    """
    pattern, sep, spec = text.rpartition(":")
    if not sep or not pattern or not spec:
        raise ValueError(f"override {text!r} must look like PATTERN:bits=3 or PATTERN:skip")
    if spec.strip() == "skip":
        return Override(pattern, skip=True)
    defaults = {}
    if config_cls is not None:
        defaults = {f.name: f for f in settable_fields(config_cls)}
    changes = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"override {text!r}: {item!r} is not field=value")
        if config_cls is not None and key not in defaults:
            raise ValueError(
                f"override {text!r}: unknown field {key!r}; fields: {', '.join(sorted(defaults))}"
            )
        changes[key] = _convert(value.strip(), defaults.get(key), config_cls)
    return Override(pattern, changes=changes)


def _literal(value: str):
    """A flag value without a known field type: int, float, true/false, or the string."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _convert(value: str, fld, config_cls):
    if fld is None:
        return _literal(value)
    default = None
    if fld.default is not dataclasses.MISSING:
        default = fld.default
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{fld.name} expects true/false, got {value!r}")
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{fld.name} expects an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{fld.name} expects a number, got {value!r}") from None
    return value


def resolve_config(name: str, config, overrides: Sequence[Override]):
    """The config of module ``name`` after the overrides, or None when it is skipped.

    A change that the config refuses raises ``ValueError`` naming the module and the override.
    """
    for ov in overrides:
        if ov.matches(name):
            if ov.skip:
                config = None
            elif config is not None:
                try:
                    config = dataclasses.replace(config, **ov.changes)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"override {ov.pattern!r} on {name}: {exc}") from None
    return config


def skip_reason(name: str, overrides: Sequence[Override]) -> str | None:
    """The pattern of the last override that skips module ``name`` (None when none does)."""
    reason = None
    for ov in overrides:
        if ov.matches(name):
            reason = f"skipped by pattern {ov.pattern!r}" if ov.skip else None
    return reason
