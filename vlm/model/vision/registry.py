"""The vision-tower registry: `vision.type` → tower class."""

from __future__ import annotations

from collections.abc import Callable

TOWERS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        if name in TOWERS:
            raise ValueError(f"vision type {name!r} is registered twice")
        TOWERS[name] = cls
        return cls

    return add


def lookup(name: str) -> type:
    try:
        return TOWERS[name]
    except KeyError:
        raise ValueError(f"vision.type={name!r}: not one of {sorted(TOWERS)}") from None
