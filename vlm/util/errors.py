"""The two kinds of expected failure every CLI reports in one line (see `vlm.util.cli`).

`UsageError`: the user asked for something that cannot work (a missing folder, a bad value, a file that
is not ours, a damaged checkpoint given as input); exit code 2, raised before any model is loaded.
`RunFailure`: the run started and the world got in the way (a full disk, an accelerator that vanished,
too many broken videos); exit code 1. Both carry a message that names the thing and the reason.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input or setting: one line naming the thing and the reason, exit code 2."""


class RunFailure(RuntimeError):
    """An expected runtime failure (resources, data gone bad mid-run): one line, exit code 1."""


class Interrupted(Exception):
    """A run stopped by SIGTERM/SIGINT after saving its work; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message)


def one_line(err: BaseException | str) -> str:
    """An exception (or text) folded onto one line; the type name when it has no message."""
    text = err if isinstance(err, str) else str(err)
    return " ".join(text.split()) or (type(err).__name__ if not isinstance(err, str) else "")
