"""The memory planner: `plan_memory(cfg)` counts a training run's peak GPU memory term by term from
meta-device builds of the very parts training builds; `check_fits(cfg)` is train.py's preflight;
`python -m vlm.plan gpu=l4 [train=stage2_lora] [format=json] [output=FILE]` shows it."""

from vlm.plan.planner import GIB, Plan, PlanError, check_fits, format_table, plan_memory

__all__ = ["GIB", "Plan", "PlanError", "check_fits", "format_table", "plan_memory"]
