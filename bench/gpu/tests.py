"""Part `tests`: `pytest -m gpu tests/gpu` (correctness on CUDA), outcomes per test into tests.json.

On CUDA it runs in a child process with TRITON_INTERPRET=0, so the kernels are compiled for the GPU
(the test suite's conftest otherwise defaults to the interpreter). Without CUDA every test skips; the
dry run checks that they are collected and skip for that reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.gpu.common import REPO, Deadline, Record


def outcomes(junit: Path) -> list[dict]:
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        row = {"test": f"{case.get('classname')}::{case.get('name')}", "seconds": float(case.get("time", 0))}
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                row["outcome"] = "failed" if tag == "failure" else tag
                row["message"] = (el.get("message") or "")[:1500]
                break
        else:
            row["outcome"] = "passed"
        rows.append(row)
    return rows


def run(rec: Record, tiny: bool, deadline: Deadline) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        if torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "0"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "-o", "junit_family=xunit1"]  # fmt: skip
        if torch.cuda.is_available():  # its own process: Triton compiles (TRITON_INTERPRET=0 at import)
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=max(5.0, deadline.left() - 5))  # fmt: skip
            code, tail = r.returncode, r.stdout[-3000:] + r.stderr[-1000:]
        else:  # the dry run: in this process (the imports are paid once); every test skips here
            import contextlib
            import io

            import pytest

            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.chdir(REPO):
                code = int(pytest.main(cmd[3:]))
            tail = buf.getvalue()[-3000:]
        rows = outcomes(junit) if junit.is_file() else []
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "error", "skipped")}
    rec.set("cuda", torch.cuda.is_available())
    rec.set("counts", counts)
    rec.set("tests", rows)
    rec.set("pytest_exit", code)
    rec.set("pytest_tail", tail)
    if not rows:
        raise RuntimeError(f"pytest collected nothing (exit {code}): {tail[-1000:]}")
    if counts["failed"] or counts["error"]:
        raise RuntimeError(f"{counts['failed']} failed, {counts['error']} errors of {len(rows)} GPU tests")
