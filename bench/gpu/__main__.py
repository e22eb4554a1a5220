"""The prepared GPU run: correctness on CUDA, then the measurements, each part into its own JSON.

    bash bench/gpu/run.sh RESULTS_DIR          (on the GPU machine; installs .gpu-wheels first)
    python -m bench.gpu RESULTS_DIR [--tiny] [--parts tests,moe_layer,...]

Parts, in order (results: RESULTS_DIR/<part>.json, plus run.json with the machine, versions and date):
  tests       pytest -m gpu tests/gpu (Triton compiled vs eager, NF4 vs bitsandbytes CUDA, VLM step/generate)
  moe_layer   one Qwen3-30B-A3B MoE layer: fused NF4 Triton vs de-quantize + torch._grouped_mm vs
              transformers grouped_mm (bf16) vs eager; T 2,048 / 8,192; fwd and fwd+bwd
  moe_load    peak max_memory_allocated loading the 30B-A3B-shaped decoder (4 layers) from bf16 shards
              and from its NF4 checkpoint, against the planner's load term
  planner     each tier's real-shape decoder (4 layers) + its tower: stage-1 and stage-2 steps, measured
              peak vs plan_memory for the same reduced model; training tokens/s
  throughput  captioning videos/s (batch 1 vs 16, NF4 vs bf16 decoder) and the feature-cache encode rate

On a GPU each part runs in its own process under its own time limit (a crash or a hang costs that part
only; what it measured before stays in its JSON, and an error record is written either way); the whole
run stays under `--budget` seconds (default 450: the 8-minute target less the wheel install).
`--tiny`: the CPU dry run `make test` does: tiny shapes, every part in this process, Triton under
TRITON_INTERPRET=1, no memory figures (there is no CUDA allocator) and no targets.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu.common import Deadline, Record, error_record, machine

# part -> seconds on the H200 (sum 450); the order puts the correctness check first.
LIMITS = {"tests": 100, "moe_layer": 80, "moe_load": 75, "planner": 135, "throughput": 60}


def run_part(name: str, out: Path, tiny: bool, seconds: float) -> None:
    """In this process: the part's `run(record, tiny, deadline)` with an error record on failure."""
    rec = Record(out / f"{name}.json", part=name, tiny=tiny, status="running", limit_s=round(seconds))
    t0 = time.monotonic()
    try:
        importlib.import_module(f"bench.gpu.{name}").run(rec, tiny, Deadline(seconds))
        rec.data["status"] = "ok"
    except Exception as e:
        rec.data.update(status="error", **error_record(e))
    rec.set("seconds", round(time.monotonic() - t0, 1))


def run_isolated(name: str, out: Path, seconds: float) -> None:
    """In a child process with a hard time limit; whatever it wrote stays, and the status says why it ended."""
    path = out / f"{name}.json"
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "bench.gpu", str(out), "--only", name, "--limit", str(seconds)]
    try:
        r = subprocess.run(cmd, timeout=seconds + 20, capture_output=True, text=True)
        status, tail = ("ok" if r.returncode == 0 else f"exit {r.returncode}"), r.stderr[-3000:]
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr[-20000:])
    except subprocess.TimeoutExpired as e:
        status = f"killed at its {seconds:.0f} s limit"
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        tail = err[-3000:]
    data = json.loads(path.read_text()) if path.is_file() else {"part": name}
    if status != "ok" or data.get("status") != "ok":
        data["status"] = data.get("status") if data.get("status") == "error" else "error"
        data.setdefault("error", f"{name}: {status}")
        data["process"] = {"status": status, "stderr_tail": tail}
    data["seconds"] = round(time.monotonic() - t0, 1)
    Record(path, **data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="folder for the JSON files (the repo keeps bench/results/gpu/)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny shapes, one process")
    ap.add_argument("--parts", default=",".join(LIMITS))
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # a child process runs this one part
    ap.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    if args.only:
        run_part(args.only, out, args.tiny, args.limit or LIMITS[args.only])
        return 0
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(LIMITS))
    if unknown:
        print(f"bench.gpu: unknown part {unknown[0]}; parts are {', '.join(LIMITS)}", file=sys.stderr)
        return 2
    import torch

    isolate = torch.cuda.is_available() and not args.tiny
    summary = Record(out / "run.json", machine=machine(), tiny=args.tiny, isolated=isolate, parts={})
    total = Deadline(args.budget)
    for name in parts:
        seconds = max(5.0, min(LIMITS[name] * args.budget / 450.0, total.left()))
        print(f"== {name} (limit {seconds:.0f} s)", flush=True)
        (run_isolated if isolate else lambda n, o, s: run_part(n, o, args.tiny, s))(name, out, seconds)
        data = json.loads((out / f"{name}.json").read_text())
        summary.data["parts"][name] = {"status": data.get("status"), "seconds": data.get("seconds")}
        summary.flush()
        print(f"   {name}: {data.get('status')} in {data.get('seconds')} s" +
              (f" ({data.get('error')})" if data.get("status") != "ok" else ""), flush=True)  # fmt: skip
    summary.set("seconds_total", round(args.budget - total.left(), 1))
    failed = [n for n, p in summary.data["parts"].items() if p["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
