"""Projectors from vision patch tokens to decoder embeddings, behind one interface (`projector.base`).

Each file here defines one projector type and its config schema and registers them under
`projector.type`; adding a type is one file plus one conf/projector/<type>.yaml. Modules are found
by listing this package, so nothing else has to import a new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from projector.base import Projector, ProjectorConfig
from projector.registry import PROJECTORS, as_config, lookup

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["PROJECTORS", "Projector", "ProjectorConfig", "build_projector", "projector_config_type"]


def projector_config_type(name: str) -> type:
    return lookup(name)[1]


def build_projector(
    cfg: Any, in_dim: int, out_dim: int, grid: tuple[int, int], embed_scale: float = 1.0
) -> Projector:
    """The projector `cfg.type` names, mapping `in_dim`-wide patch tokens of a `grid` to `out_dim`."""
    typed = as_config(cfg)
    cls, _ = lookup(typed.type)
    return cls(typed, in_dim, out_dim, tuple(grid), embed_scale)
