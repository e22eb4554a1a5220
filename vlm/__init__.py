"""kovicap's VLM package. `vlm.load_exported(DIR)` rebuilds a model from an export directory.

Imports are lazy so that `import vlm` stays cheap (no torch or transformers until used).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_exported"]


def __getattr__(name: str) -> Any:
    if name == "load_exported":
        from vlm.export.load import load_exported

        return load_exported
    raise AttributeError(f"module 'vlm' has no attribute {name!r}")
