"""`python -m vlm.demo [seed=N] [control=true]` (what `make demo` / `make demo-control` run)."""

from __future__ import annotations

from vlm.util.cli import hydra_cli


def main(cfg) -> int:
    from vlm.demo.run import run_demo

    run_demo(cfg)
    return 0


if __name__ == "__main__":
    hydra_cli("demo", main)
