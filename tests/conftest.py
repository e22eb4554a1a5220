"""Test-wide setup: offline hub, Triton's CPU interpreter, one thread per xdist worker, the longest files
first, the typed-config composer."""

from __future__ import annotations

import os

# `make test` runs two pytest-xdist workers on the 2 cores: one OpenMP thread each, inherited by the
# processes they start (two 2-thread pools on 2 cores made small ops 5-20x slower, measured in the demo).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
# Set before anything imports transformers or triton.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

import vlm.config  # registers the structured-config schemas with Hydra

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
REPO = Path(__file__).resolve().parents[1]


TIER_FILE = "tests/vlm/test_real_tiers.py"
MOE_FILE = "tests/vlm/moe/test_real_shape.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest first, so that the two xdist workers (whole files each) end together: the real-shape tier
    file, the real-shape MoE file, then the files with a slow test. xdist hands the first file to one
    worker and the second to the other, so the tiers run one after another (two at once do not fit in
    24 GB) while the MoE chain runs beside the smaller two (its stock-peft comparison holds ~12 GB; it
    ends before the tier file reaches a100). The sort is stable and by file, so a file's own order is
    kept."""
    heavy = {i.nodeid.split("::")[0] for i in items if i.get_closest_marker("slow")}
    first = {TIER_FILE: 0, MOE_FILE: 1}

    def rank(item: pytest.Item) -> int:
        file = item.nodeid.split("::")[0]
        return first.get(file, 2 if file in heavy else 3)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def compose():
    """hydra.compose over the real conf/ tree: compose("train", ["gpu=l4", ...]) → DictConfig."""
    return vlm.config.compose


@pytest.fixture(scope="session")
def typed(compose):
    """compose(...) turned into the dataclass objects the product reads: typed("train", [...])."""

    def _typed(name: str, overrides: list[str] | None = None):
        return vlm.config.to_typed(compose(name, overrides or []))

    return _typed


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run a CLI in this process as `python -m MODULE ARGS` (or `python train.py ARGS`) would:
    returns (exit code, stdout, stderr). Much faster than a subprocess for cases that stop early."""
    import logging
    import runpy
    import sys

    from hydra.core.global_hydra import GlobalHydra

    def _run(module: str, *args: str) -> tuple[int, str, str]:
        handlers, level = logging.root.handlers[:], logging.root.level  # Hydra reconfigures logging
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", [module, *args])
        capsys.readouterr()
        try:
            if module == "train.py":
                runpy.run_path(str(REPO / "train.py"), run_name="__main__")
            else:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            GlobalHydra.instance().clear()
            logging.root.handlers[:] = handlers
            logging.root.setLevel(level)
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run
