"""The GPU kit's CPU dry run: `bash bench/gpu/run.sh OUT --tiny` end to end, every part's JSON checked.

Not a GPU test: it runs in `make test` so the kit cannot rot between GPU windows. Tiny shapes, Triton
interpreted, no timing targets and no memory figures (there is no CUDA allocator on the CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu import render
from bench.gpu.__main__ import LIMITS

REPO = Path(__file__).resolve().parents[2]


# ~160 s on the 2-core VM at load 6 (most of it imports and the tiny steps of five parts): over the 60 s aim.
@pytest.mark.slow
def test_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "KOVICAP_GPU_WORK": str(tmp_path)}
    t0 = time.monotonic()
    r = subprocess.run(["bash", "bench/gpu/run.sh", str(out), "--tiny"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["tiny"] is True and run["machine"]["versions"]["torch"]
    assert list(run["parts"]) == list(LIMITS) and all(p["status"] == "ok" for p in run["parts"].values())
    parts = {n: json.loads((out / f"{n}.json").read_text()) for n in LIMITS}
    assert all(p["status"] == "ok" and p["tiny"] is True for p in parts.values())
    # tests: every GPU test collected, and skipped for want of CUDA
    t = parts["tests"]
    assert t["counts"]["skipped"] == len(t["tests"]) >= 10 and not t["counts"]["failed"]
    # moe_layer: every implementation timed and equal to eager (fp32, tiny)
    layer = parts["moe_layer"]["T=19"]
    assert max(layer["max_abs_diff_vs_eager"].values()) < 1e-4
    for mode in ("forward", "forward+backward"):
        rows = layer[mode]["rows"]
        assert len(rows) == 5 and all(
            v["median_ms"] > 0 and v["peak_mib_above_inputs"] is None for v in rows.values()
        )
        assert (
            layer[mode]["fused_tflops"] > 0
            and layer[mode]["roofline_ms"] > 0
            and "target_5x_eager_met" not in layer[mode]
        )
    load = parts["moe_load"]
    assert load["plan"]["load_gib"] > 0
    assert all(load[k]["seconds"] > 0 and load[k]["max_memory_allocated"] is None
               for k in ("from_bf16_shards", "from_nf4_checkpoint"))  # fmt: skip
    for stage in ("stage1_projector", "stage2_lora"):
        row = parts["planner"]["cpu"][stage]
        assert (
            row["train_tokens_per_s"] > 0
            and row["plan_total_gib"] > 0
            and "measured_allocated_gib" not in row
        )
    assert (
        parts["planner"]["cpu"]["stage2_lora"]["trainable_params"]
        > parts["planner"]["cpu"]["stage1_projector"]["trainable_params"]
    )
    th = parts["throughput"]
    assert all(
        th[k][f"batch={b}"]["videos_per_s"] > 0 for k in ("caption_nf4", "caption_bf16") for b in (1, 2)
    )
    assert th["encode"]["videos_per_s"] > 0
    # the renderer reads them; a dry run is never shown as GPU results
    text = render.render(out)
    assert "Not measured yet" in text and "dry run" in text
    print(f"dry run: {seconds:.1f} s")
