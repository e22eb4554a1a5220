"""The one wrapper every Hydra CLI runs through: compose, check, run, and report failures in one line.

    def main() -> None:
        hydra_cli("caption", run)       # run(cfg: DictConfig) -> int (the exit code)

- The overrides on the command line are composed once before Hydra's own `main`, so a wrong type, an
  unknown key or an unknown group option is one line and exit code 2 (Hydra alone exits 1 with a
  multi-line message). `--help`, `--cfg`, `--info` and multirun go to Hydra untouched.
- `UsageError` (and config errors met while resolving) → `error: ...`, exit 2; `RunFailure` or an
  `OSError` (disk full, permission denied) → exit 1; `Interrupted` → its message, exit 130 / 143.
- `debug=true` (or HYDRA_FULL_ERROR=1) shows the traceback instead; `verbose=true` keeps library
  banners, progress bars and repeated warnings, which are silenced by default so an error stays visible.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from vlm.util.errors import Interrupted, RunFailure, UsageError, one_line

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
_HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--multirun", "-m", "--shell-completion")
_NOISY_LOGGERS = (
    "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers",
    "huggingface_hub", "datasets", "lm_eval", "torch.distributed", "timm", "open_clip", "root",
    # Importing Lightning sets its package loggers back to INFO, and the CLIs import it after this runs;
    # its banners come from these children, whose own level the import leaves alone.
    "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)  # fmt: skip


def quiet_libraries(verbose: bool) -> None:
    """Silence library banners and repeated warnings (unless `verbose`)."""
    if verbose:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE_HF", "1")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _user_overrides(argv: list[str]) -> list[str] | None:
    """The key=value overrides, or None when Hydra itself should see the command line first."""
    if any(a in _HYDRA_FLAGS or (a.startswith("--") and a not in ("--cfg", "--resolve")) for a in argv):
        return None
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--cfg", "-c"):
            skip = True  # its value (job | hydra | all) is not an override
            continue
        if a == "--resolve":
            continue
        out.append(a)
    return out


def _flag(overrides: list[str], key: str) -> bool:
    return any(o.strip() in (f"{key}=true", f"{key}=True", f"+{key}=true") for o in overrides)


def precompose(config_name: str, overrides: list[str]) -> None:
    """Compose like Hydra will; a composition error becomes one line and exit 2."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import vlm.config  # noqa: F401  (registers the structured configs)

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        cause = f" ({one_line(e.__cause__)})" if e.__cause__ is not None else ""
        print(f"error: {one_line(e)}{cause}", file=sys.stderr)
        sys.exit(2)


def report(err: BaseException, debug: bool) -> int:
    """The exit code for an exception escaping a run (after printing its one line)."""
    from omegaconf.errors import OmegaConfBaseException

    if debug:
        raise err
    if isinstance(err, Interrupted):
        print(str(err), file=sys.stderr)
        return err.exit_code
    if isinstance(err, (UsageError, OmegaConfBaseException)):
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    if isinstance(err, (RunFailure, OSError)):
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    if isinstance(err, KeyboardInterrupt):
        print("interrupted (SIGINT)", file=sys.stderr)
        return 130
    raise err  # a bug: the traceback is the useful report


def require(cfg, usage: str) -> None:
    """Required keys (`???` in the YAML) left unset: one line naming them and the usage, exit 2."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UsageError(f"{', '.join(k + '=' for k in missing)} required (usage: {usage})")


def hydra_cli(config_name: str, run: Callable[..., int | None], usage: str | None = None) -> None:
    """Run `run(cfg)` as the Hydra app `config_name` of conf/; exits with its return value (0 if None).
    `usage` is shown when required keys are missing."""
    import hydra

    import vlm.config  # noqa: F401  (registers the structured configs before Hydra composes)

    argv = sys.argv[1:]
    overrides = _user_overrides(argv)
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1"
    if overrides is not None:
        debug = debug or _flag(overrides, "debug")
        if not debug:
            precompose(config_name, overrides)

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def task(cfg) -> None:
        quiet_libraries(bool(cfg.verbose))
        try:
            if usage is not None:
                require(cfg, usage)
            code = run(cfg)
        except BaseException as e:
            if isinstance(e, SystemExit):
                raise
            code = report(e, bool(cfg.debug) or debug)
        sys.exit(code or 0)

    task()
