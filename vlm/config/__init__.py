"""Typed configs: the dataclass schemas Hydra composes conf/ into, and the way from a config to objects.

Importing this package registers every schema in Hydra's ConfigStore (entry configs as `<name>_schema`,
each projector type's schema as `projector/<type>_schema`), so `hydra.compose` and `@hydra.main` check
keys and types at composition. `to_typed(cfg)` turns a composed DictConfig into the dataclass objects
the product code reads; `train_config(mapping)` re-types a config stored in a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vlm.config import entries
from vlm.config.entries import TrainEntry

_ENTRIES = {
    "train": entries.TrainEntry,
    "plan": entries.PlanEntry,
    "kmmlu": entries.KmmluEntry,
    "caption": entries.CaptionEntry,
    "export": entries.ExportEntry,
    "caption_eval": entries.CaptionEvalEntry,
    "check": entries.CheckEntry,
    "synth": entries.SynthEntry,
    "demo": entries.DemoEntry,
}


def _register() -> None:
    from projector import PROJECTORS

    cs = ConfigStore.instance()
    for name, node in _ENTRIES.items():
        cs.store(name=f"{name}_schema", node=node)
    for name, (_, config_cls) in PROJECTORS.items():
        cs.store(group="projector", name=f"{name}_schema", node=config_cls)


_register()


def to_typed(cfg: DictConfig | Any) -> Any:
    """The dataclass objects of a composed config (already typed objects pass through)."""
    if not isinstance(cfg, DictConfig):
        return cfg
    return OmegaConf.to_object(cfg)


def train_config(stored: Mapping[str, Any]) -> TrainEntry:
    """A training config stored as plain data (checkpoints, exports) as typed objects, checked again."""
    from projector import projector_config_type

    schema = OmegaConf.structured(TrainEntry)
    schema.projector = OmegaConf.structured(projector_config_type(stored["projector"]["type"]))
    return OmegaConf.to_object(OmegaConf.merge(schema, dict(stored)))


def compose(name: str, overrides: list[str] | None = None) -> DictConfig:
    """conf/<name>.yaml composed with `overrides`, as its CLI would (usable inside or outside a Hydra app)."""
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=name, overrides=list(overrides or []))
    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"
    ):
        return hydra_compose(config_name=name, overrides=list(overrides or []))
