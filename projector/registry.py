"""The projector registry: `projector.type` → (module class, config schema)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PROJECTORS: dict[str, tuple[type, type]] = {}


def register(name: str, config_cls: type) -> Callable[[type], type]:
    def add(cls: type) -> type:
        if name in PROJECTORS:
            raise ValueError(f"projector type {name!r} is registered twice")
        PROJECTORS[name] = (cls, config_cls)
        cls.type_name = name
        return cls

    return add


def lookup(name: str) -> tuple[type, type]:
    try:
        return PROJECTORS[name]
    except KeyError:
        raise ValueError(f"projector.type={name!r}: not one of {sorted(PROJECTORS)}") from None


def as_config(cfg: Any) -> Any:
    """The typed config of a projector from its dataclass or a plain mapping (e.g. an export's vlm.json)."""
    _, config_cls = lookup(cfg["type"] if isinstance(cfg, dict) else cfg.type)
    if isinstance(cfg, config_cls):
        return cfg
    fields = config_cls.__dataclass_fields__
    data = dict(cfg) if isinstance(cfg, dict) else {k: getattr(cfg, k) for k in fields}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"projector.type={data['type']}: unknown setting(s) {unknown}")
    return config_cls(**data)
