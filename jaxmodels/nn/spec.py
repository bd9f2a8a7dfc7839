"""Frozen dataclasses of layer options (AttentionSpec, MoESpec, ...) built from config sections."""

import dataclasses
from collections.abc import Mapping
from typing import TypeVar

Spec = TypeVar("Spec")


def spec_from_section(cls: type[Spec], section: Mapping | None, name: str) -> Spec:
    """`cls(**section)` for a config section (a dict / ConfigDict of cls's fields; None gives the
    defaults). An unknown field raises ValueError naming `name`, the field and the valid fields;
    invalid values are cls's own checks (its __post_init__)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    section = dict(section or {})
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ValueError(f"{name} has unknown fields {unknown}; valid: {sorted(fields)}")
    return cls(**section)
