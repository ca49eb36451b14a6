"""Spread a per-output setting (weights, targets, thresholds) given as one value, a list in
order, or a dict by name over a list of names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def per_name(
    value: Any, names: Sequence[str], what: str, kind: str = "outputs", default: Any = None
) -> dict[str, Any]:
    """`{name: value}` for every name, from None (`default`), a scalar, a list or tuple in
    `names` order, or a dict that covers `names` exactly.

    Raises:
        ValueError: a list of the wrong length or a dict with unknown or missing names; the
            message calls the values `what` and the names `kind`.
    """
    if value is None:
        return dict.fromkeys(names, default)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        missing = [name for name in names if name not in value]
        if unknown or missing:
            raise ValueError(
                f"{what} by name must cover exactly the {kind} {list(names)}; "
                f"unknown: {unknown}, missing: {missing}"
            )
        return {name: value[name] for name in names}
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ValueError(
                f"got {len(value)} {what} for {len(names)} {kind} {list(names)}; give one per "
                f"{kind[:-1]} in order, a single value, or a dict by name"
            )
        return dict(zip(names, value, strict=True))
    return dict.fromkeys(names, value)
