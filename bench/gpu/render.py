"""The README's "GPU results" section, rendered from bench/results/gpu/*.json.

    python -m bench.gpu.render [RESULTS_DIR]      (prints Markdown; the README pastes it)

Says "not measured yet" while the folder holds no GPU run (a dry run's files are not GPU results), and
records the machine, versions and date of the run it shows. Parts that failed are listed with their error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "results" / "gpu"
HEAD = "## GPU results"


def _load(folder: Path) -> dict[str, Any]:
    out = {}
    for p in sorted(folder.glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            out[p.stem] = {"status": "error", "error": f"unreadable: {e}"}
    return out


def _f(x: Any, nd: int = 2) -> str:
    return (
        "–"
        if x is None
        else (f"{x:,.{nd}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x))
    )


def _gib(b: int | None) -> str:
    return "–" if b is None else f"{b / 2**30:.2f}"


def not_measured(why: str) -> str:
    return (f"{HEAD}\n\nNot measured yet: {why}. The kit is ready: `make gpu-wheels` here, then one device call "
            "`bash bench/gpu/run.sh $OUT` with `.gpu-wheels` carried; copy its JSON files into "
            "`bench/results/gpu/` and run `python -m bench.gpu.render`.\n")  # fmt: skip


def moe_table(d: dict) -> list[str]:
    lines = []
    for key in [k for k in d if k.startswith("T=")]:
        block = d[key]
        if "rows" not in block.get("forward", {}):
            lines.append(f"- {key}: {block.get('error') or block.get('skipped')}")
            continue
        lines += [f"\n{key} tokens (median ms of interleaved runs; ratio = this / fused; peak = max_memory_allocated above the inputs)\n",
                  "| implementation | fwd ms | fwd tokens/s | fwd ratio | fwd+bwd ms | fwd+bwd ratio | fwd+bwd peak MiB |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        f, fb = block["forward"], block["forward+backward"]
        for n, r in f["rows"].items():
            b = fb["rows"][n]
            lines.append(f"| {n} | {_f(r['median_ms'], 3)} | {_f(r['tokens_per_s'])} | {_f(r['this_over_fused_ms'])} | "
                         f"{_f(b['median_ms'], 3)} | {_f(b['this_over_fused_ms'])} | {_f(b['peak_mib_above_inputs'], 1)} |")  # fmt: skip
        for mode, m in (("fwd", f), ("fwd+bwd", fb)):
            tgt = ""
            if "target_5x_eager_met" in m:
                tgt = (f"; targets: >= 5x eager {'met' if m['target_5x_eager_met'] else 'NOT met'}, >= 1.2x grouped_mm "
                       f"{'met' if m['target_1.2x_grouped_mm_met'] else 'NOT met'}")  # fmt: skip
            lines.append(f"\nfused {mode}: {_f(m['fused_tflops'])} TFLOP/s ({m['fused_share_of_peak_flops']:.1%} of 790), "
                         f"{_f(m['fused_gbps'], 0)} GB/s ({m['fused_share_of_peak_bandwidth']:.1%} of 4.3 TB/s), roofline "
                         f"{_f(m['roofline_ms'], 3)} ms; eager/fused {_f(m['eager_over_fused'])}, grouped_mm/fused "
                         f"{_f(m['grouped_mm_over_fused'])}{tgt}")  # fmt: skip
    return lines


def render(folder: Path = RESULTS) -> str:
    data = _load(folder)
    run = data.pop("run", None)
    if not data or run is None:
        return not_measured("no GPU has run bench/gpu yet")
    if run.get("tiny") or not (run.get("machine") or {}).get("gpu"):
        return not_measured("the files there are from a CPU dry run, not a GPU")
    m = run["machine"]
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items() if x)
    out = [HEAD, "", f"Measured {m['date_utc']} UTC on {m['gpu']['name']} ({m['gpu']['memory_gib']} GiB, CUDA {m['cuda']}), "
           f"commit {(m.get('commit') or '?')[:10]}; {v}. `bash bench/gpu/run.sh`, {run.get('seconds_total')} s.", ""]  # fmt: skip
    failed = [f"- {n}: {d.get('error', d.get('status'))}" for n, d in data.items() if d.get("status") != "ok"]
    if failed:
        out += ["Parts that did not finish:", *failed, ""]
    t = data.get("tests", {})
    if "counts" in t:
        c = t["counts"]
        out.append(f"### Correctness on CUDA (`pytest -m gpu`)\n\n{c['passed']} passed, {c['failed']} failed, "
                   f"{c['error']} errors, {c['skipped']} skipped.")  # fmt: skip
        out += [
            f"- FAILED {r['test']}: {r.get('message', '')[:200]}"
            for r in t["tests"]
            if r["outcome"] in ("failed", "error")
        ]
        out.append("")
    if "moe_layer" in data:
        d = data["moe_layer"]
        s, mem = d.get("shape", {}), d.get("memory", {})
        out.append(f"### MoE layer (E {s.get('num_experts')}, H {s.get('hidden')}, I {s.get('intermediate')}, top-{s.get('top_k')}, "
                   f"{s.get('dtype')}); experts {_f(mem.get('bf16_over_nf4'))}x smaller in NF4")  # fmt: skip
        out += [*moe_table(d), ""]
    if "moe_load" in data:
        d = data["moe_load"]
        out += ["### Loading the MoE decoder (30B-A3B shapes, layers cut)", "",
                f"Plan's load term (less the CUDA context): {_f((d.get('plan') or {}).get('load_gib_without_cuda_context'), 3)} GiB.", "",
                "| from | seconds | peak GiB | measured / planned |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for k in ("from_bf16_shards", "from_nf4_checkpoint"):
            r = d.get(k, {})
            out.append(f"| {k} | {_f(r.get('seconds'))} | {_gib(r.get('max_memory_allocated'))} | "
                       f"{_f(r.get('measured_over_planned'), 3) if 'error' not in r else r['error'][:80]} |")  # fmt: skip
        out.append("")
    if "planner" in data:
        out += ["### Planner vs max_memory_allocated (tier's decoder at 4 layers + its tower)", "",
                "| tier | stage | measured GiB | planned GiB | measured / planned | within 15 % | train tokens/s |",
                "| --- | --- | ---: | ---: | ---: | --- | ---: |"]  # fmt: skip
        for tier, stages in data["planner"].items():
            if not isinstance(stages, dict) or tier in ("part", "status", "tiny", "limit_s", "seconds"):
                continue
            for st, r in stages.items():
                if not isinstance(r, dict):
                    continue
                if "measured_allocated_gib" not in r:
                    out.append(
                        f"| {tier} | {st} | {(r.get('error') or r.get('skipped') or '–')[:80]} | | | | |"
                    )
                    continue
                out.append(f"| {tier} | {st} | {_f(r['measured_allocated_gib'], 3)} | {_f(r['planned_allocated_gib'], 3)} | "
                           f"{_f(r['measured_over_planned'], 3)} | {'yes' if r['within_15_percent'] else 'NO'} | {_f(r['train_tokens_per_s'], 0)} |")  # fmt: skip
        out.append("")
    if "throughput" in data:
        d = data["throughput"]
        out += [f"### Throughput ({(d.get('setup') or {}).get('model')})", "", "| decoder | batch | videos/s | new tokens/s |",
                "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for k in ("caption_nf4", "caption_bf16"):
            for b, r in (d.get(k) or {}).items():
                if isinstance(r, dict) and "videos_per_s" in r:
                    out.append(
                        f"| {k.removeprefix('caption_')} | {b.removeprefix('batch=')} | {_f(r['videos_per_s'], 3)} | {_f(r['new_tokens_per_s'], 1)} |"
                    )
        e = d.get("encode") or {}
        if "videos_per_s" in e:
            out.append(
                f"\nFeature-cache encoding (ViT-L-14, {e['frames']} frames, batch {e['batch']}): {_f(e['videos_per_s'])} videos/s."
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    print(render(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS))


if __name__ == "__main__":
    main()
