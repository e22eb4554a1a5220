"""`python -m vlm.export checkpoint=CKPT output=DIR [merge=true] [overwrite=true] [metrics=REPORT.json]`, or
`python -m vlm.export quantize=true checkpoint=QWEN3_BASE output=DIR` (an NF4 checkpoint of the base)."""

from __future__ import annotations

import json
from pathlib import Path

from vlm.util.cli import hydra_cli
from vlm.util.errors import UsageError


def read_metrics(path: str | None) -> dict[str, float]:
    """Top-level numbers of a JSON report (e.g. outputs/demo/report.json), for vlm.json and the card."""
    if path is None:
        return {}
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"metrics={path}: cannot read a JSON report ({' '.join(str(e).split())})") from None
    if not isinstance(report, dict):
        raise UsageError(f"metrics={path}: expected a JSON object")
    return {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run(cfg) -> int:
    from vlm.config import to_typed
    from vlm.export.write import export

    cfg = to_typed(cfg)
    if cfg.quantize and (cfg.merge or cfg.metrics is not None):
        raise UsageError("quantize=true writes an NF4 base decoder: merge= and metrics= do not apply to it")
    metrics = read_metrics(cfg.metrics)
    out = export(cfg.checkpoint, cfg.output, merge=cfg.merge, overwrite=cfg.overwrite,
                 merge_dtype=cfg.merge_dtype, metrics=metrics, quantize=cfg.quantize)  # fmt: skip
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    hydra_cli("export", run)
