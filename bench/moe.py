"""Benchmark: one Qwen3-MoE experts layer, our NF4 path vs transformers' `eager` and `grouped_mm`.

    python -m bench.moe                 (make bench)

CPU part, scaled layer E=128, top-8, H=512, I=192, T=2048 tokens, random softmax-top-8 routing:
- ours:        `FusedMoeExperts` PyTorch path (NF4 de-quantized per call in tiles of experts, grouped
               products over the sorted rows with `torch._grouped_mm`), and the same with
               capacity-padded `bmm` inside each tile instead;
- eager:       transformers' `Qwen3MoeExperts` with `experts_implementation="eager"` (loop over experts);
- grouped_mm:  the same module with `experts_implementation="grouped_mm"`.
The transformers modules hold our de-quantized weights in the compute dtype and are frozen (QLoRA:
only the input gradient is needed), so every row does the same math; ours additionally de-quantizes
its NF4 experts on every call (twice with backward: it keeps no 16-bit copy). Forward runs under
no_grad; forward+backward back-propagates into the hidden states and the routing weights. Rows are
interleaved, repeated, and the median is reported, because this machine is shared and noisy. The CPU
part runs at 1 thread and at all cores (`--threads 1,all`).

Memory: bytes of one Qwen3-30B-A3B layer's NF4 experts (`expert_bytes`) and x48 layers.
GPU: at the real layer shape (E=128, H=2048, I=768), tokens/s of the Triton path vs eager vs grouped_mm
with bf16 weights, only when CUDA is present; otherwise the results say it was not measured.
Writes bench/results/moe.json.

    python -m bench.moe --load [--workdir DIR]

Loading: Qwen3-30B-A3B's real shapes with 2 and 4 layers (random weights, bf16, the hub's layout), each
loaded by `load_decoder` in a fresh process, quantizing its experts as they stream in, then saved and
loaded again as an NF4 checkpoint; peak RSS (VmHWM over the process's baseline) and seconds of each.
Writes bench/results/moe_load.json. The tests use the same helpers (`measure_load`, `save_real_moe`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from vlm.moe import FusedMoeExperts, expert_bytes
from vlm.moe import grouped as grouped_ops
from vlm.moe.grouped import grouped_mm
from vlm.moe.nf4 import dequantize_fast
from vlm.moe.routing import build_plan
from vlm.moe.torch_backend import TorchBackend

RESULTS = Path(__file__).resolve().parent / "results" / "moe.json"
LOAD_RESULTS = RESULTS.with_name("moe_load.json")
REPO = Path(__file__).resolve().parents[1]
REAL = {"num_experts": 128, "hidden": 2048, "intermediate": 768, "layers": 48, "top_k": 8}


def build(e: int, h: int, i: int, dtype: torch.dtype, device: str, seed: int = 0):
    """(fused, eager-config, eager module) with the eager weights = our de-quantized NF4 weights."""
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e)
    ref = Qwen3MoeExperts(cfg).to(device)
    with torch.no_grad():
        ref.gate_up_proj.normal_(0, h**-0.5)
        ref.down_proj.normal_(0, i**-0.5)
    fused = FusedMoeExperts.from_experts(ref, backend="auto")
    gu, dn = fused.dequantized(dtype)
    ref.gate_up_proj.data, ref.down_proj.data = gu, dn
    ref.requires_grad_(False)
    return fused, cfg, ref


def routing(t: int, e: int, k: int, dtype: torch.dtype, device: str):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(1)).to(device)
    w, idx = logits.softmax(-1).topk(k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).to(dtype)


def make_runs(fused, cfg, ref, x, idx, w):
    """name -> (forward fn, forward+backward fn)."""

    def eager_like(impl: str):
        def run(backward: bool):
            cfg._experts_implementation = impl
            return run_step(ref, x, idx, w, backward)

        return run

    def ours(prefer: str):
        def run(backward: bool):
            grouped_ops.PREFER = prefer
            try:
                return run_step(fused, x, idx, w, backward)
            finally:
                grouped_ops.PREFER = "native"

        return run

    return {
        "ours (NF4, grouped_mm)": ours("native"),
        "ours (NF4, padded bmm)": ours("bmm"),
        "transformers eager": eager_like("eager"),
        "transformers grouped_mm": eager_like("grouped_mm"),
    }


def run_step(module, x, idx, w, backward: bool):
    """Forward (no grad) → output, or forward + backward of ones → the input gradient."""
    if not backward:
        with torch.no_grad():
            return module(x, idx, w)
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = module(xg, idx, wg)
    out.backward(torch.ones_like(out))
    return xg.grad


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(runs: dict, backward: bool, repeats: int, warmup: int = 1) -> dict[str, float]:
    for fn in runs.values():
        for _ in range(warmup):
            fn(backward)
    samples: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            _sync()
            t0 = time.perf_counter()
            fn(backward)
            _sync()
            samples[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) * 1e3 for n, v in samples.items()}


def cpu_part(dtypes: list[torch.dtype], repeats: int, t: int) -> dict:
    e, k, h, i = 128, 8, 512, 192
    out: dict = {"shape": {"num_experts": e, "top_k": k, "hidden": h, "intermediate": i, "tokens": t}}
    for dtype in dtypes:
        fused, cfg, ref = build(e, h, i, dtype, "cpu")
        idx, w = routing(t, e, k, dtype, "cpu")
        x = torch.randn(t, h, dtype=dtype)
        runs = make_runs(fused, cfg, ref, x, idx, w)
        ours = runs["ours (NF4, grouped_mm)"](False)
        cfg._experts_implementation = "eager"
        with torch.no_grad():
            err = (ours.float() - ref(x, idx, w).float()).abs().max().item()
        rows = {}
        for mode, bwd in (("forward", False), ("forward+backward", True)):
            ms = time_interleaved(runs, bwd, repeats)
            rows[mode] = {
                n: {"ms": round(v, 2), "eager_over_this": round(ms["transformers eager"] / v, 2)}
                for n, v in ms.items()
            }
        ours_ratio = [rows[m]["ours (NF4, grouped_mm)"]["eager_over_this"] for m in rows]
        bound = floor(fused, x, idx, repeats)
        eager = {m: rows[m]["transformers eager"]["ms"] for m in rows}
        out[str(dtype).removeprefix("torch.")] = {
            "max_abs_diff_vs_eager": err,
            "timings": rows,
            "target_3x_eager_met": min(ours_ratio) >= 3.0,
            "floor_ms": bound,
            "eager_over_floor": {
                "forward": round(eager["forward"] / (bound["gemms_forward"] + bound["dequantize"]), 2),
                "forward+backward": round(
                    eager["forward+backward"]
                    / (bound["gemms_forward"] + bound["gemms_backward"] + 2 * bound["dequantize"]),
                    2,
                ),
            },
        }
    return out


def floor(fused, x: torch.Tensor, idx: torch.Tensor, repeats: int) -> dict[str, float]:
    """What no NF4 path built on torch's GEMMs can go under: its per-expert GEMMs plus one de-quantization.

    gemms_forward: the two grouped products of the forward on pre-sorted rows and pre-de-quantized
    weights (the same per-expert GEMMs every path here runs: eager calls them one by one); gemms_backward:
    the two input-gradient products; dequantize: both NF4 weights of the layer once, tile by tile
    (forward+backward de-quantizes twice). Medians of `repeats` runs.
    """
    plan = build_plan(idx, fused.num_experts, 1)
    gu, dn = fused.dequantized(x.dtype)
    xs, offs = plan.gather_tokens(x), plan.offsets
    hs = torch.randn(plan.num_rows, gu.shape[1] // 2, dtype=x.dtype)
    dpre, dys = torch.randn(plan.num_rows, gu.shape[1], dtype=x.dtype), plan.gather_tokens(x)
    # De-quantized in the PyTorch path's tiles, each dropped at once: a whole layer at once costs more
    # (page faults on the large buffer), so that would overstate the floor.
    e, backend = fused.num_experts, TorchBackend()
    nf4 = (fused.nf4("gate_up_proj"), fused.nf4("down_proj"))
    tiles = [(t, backend.experts_per_tile(t, x.dtype)) for t in nf4]
    parts = {
        "gemms_forward": lambda: (
            grouped_mm(xs, gu.transpose(1, 2), offs),
            grouped_mm(hs, dn.transpose(1, 2), offs),
        ),
        "gemms_backward": lambda: (grouped_mm(dpre, gu, offs), grouped_mm(dys, dn, offs)),
        "dequantize": lambda: [
            dequantize_fast(t.select(e0, e0 + per), x.dtype) for t, per in tiles for e0 in range(0, e, per)
        ],
    }
    res = {}
    for name, fn in parts.items():
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        res[name] = round(statistics.median(samples) * 1e3, 2)
    return res


def gpu_part(repeats: int) -> dict:
    if not torch.cuda.is_available():
        return {"status": "not measured: no GPU lent in this session"}
    e, h, i, k = REAL["num_experts"], REAL["hidden"], REAL["intermediate"], REAL["top_k"]
    fused, cfg, ref = build(e, h, i, torch.bfloat16, "cuda")
    res: dict = {"device": torch.cuda.get_device_name(), "shape": dict(REAL, tokens=[])}
    for t in (2048, 8192):
        idx, w = routing(t, e, k, torch.bfloat16, "cuda")
        x = torch.randn(t, h, dtype=torch.bfloat16, device="cuda")
        runs = make_runs(fused, cfg, ref, x, idx, w)
        runs.pop("ours (NF4, padded bmm)")
        runs["ours (NF4, Triton)"] = runs.pop("ours (NF4, grouped_mm)")
        for mode, bwd in (("forward", False), ("forward+backward", True)):
            ms = time_interleaved(runs, bwd, repeats)
            res[f"T={t} {mode}"] = {
                n: {"ms": round(v, 3), "tokens_per_s": round(t / v * 1e3)} for n, v in ms.items()
            }
    return res


def machine() -> dict:
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def memory() -> dict:
    per_layer = expert_bytes(REAL["num_experts"], REAL["hidden"], REAL["intermediate"])
    params = REAL["num_experts"] * 3 * REAL["hidden"] * REAL["intermediate"]
    return {
        "nf4_bytes_per_layer": per_layer,
        "nf4_bytes_48_layers": per_layer * REAL["layers"],
        "bytes_per_param": round(per_layer / params, 4),
        "bf16_bytes_48_layers": 2 * params * REAL["layers"],
        "budget_bytes": 17_000_000_000,
        "within_budget": per_layer * REAL["layers"] <= 17e9,
    }


def print_table(cpu: dict, threads: str) -> None:
    for dt, block in cpu.items():
        if dt == "shape":
            continue
        print(f"\nCPU {threads}, {dt}, max |ours - eager| = {block['max_abs_diff_vs_eager']:.2e}")
        print(f"{'implementation':28s} {'fwd ms':>9s} {'eager/x':>8s} {'fwd+bwd ms':>11s} {'eager/x':>8s}")
        f, fb = block["timings"]["forward"], block["timings"]["forward+backward"]
        for n in f:
            print(
                f"{n:28s} {f[n]['ms']:9.1f} {f[n]['eager_over_this']:8.2f} {fb[n]['ms']:11.1f} {fb[n]['eager_over_this']:8.2f}"
            )
        fl, ef = block["floor_ms"], block["eager_over_floor"]
        print(
            f"floor (GEMMs + de-quantization only): gemms fwd {fl['gemms_forward']:.1f} ms, bwd "
            f"{fl['gemms_backward']:.1f} ms, de-quantize {fl['dequantize']:.1f} ms; eager/floor "
            f"{ef['forward']:.2f} fwd, {ef['forward+backward']:.2f} fwd+bwd"
        )


# Runs in a fresh interpreter: the load's peak resident set is measured against the process's own baseline.
_LOAD_SCRIPT = r"""
import json, sys, time
from pathlib import Path
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
from vlm.config.schema import ArchConfig, ModelConfig
from vlm.model.decoder import load_decoder, save_nf4
import torch, transformers, bitsandbytes, safetensors  # imported before the baseline is taken
src, dtype, out = sys.argv[1], sys.argv[2], sys.argv[3]
model = ModelConfig(name_or_path=src, revision=None, tokenizer=None, quantize="nf4", moe_kernel="fused",
                    init_seed=0, arch=ArchConfig())
base = status("VmRSS"); t0 = time.perf_counter()
decoder = load_decoder(model, dtype)
seconds = time.perf_counter() - t0
peak, after = status("VmHWM"), status("VmRSS")
res = {"seconds": seconds, "baseline": base, "peak": peak, "after": after}
if out != "-":  # save the NF4 checkpoint, then time loading it back (its peak is not measured here)
    save_nf4(decoder, Path(out), src, None)
    del decoder
    t0 = time.perf_counter()
    load_decoder(ModelConfig(**{**model.__dict__, "name_or_path": out}), dtype)
    res["nf4_reload_seconds"] = time.perf_counter() - t0
print(json.dumps(res))
"""


def measure_load(source: str | Path, dtype: str = "bfloat16", save_to: Path | None = None) -> dict:
    """Load `source` with `load_decoder` (NF4, fused experts) in a fresh process: {"seconds", "baseline",
    "peak", "after"} (bytes of VmRSS before, VmHWM, VmRSS after); optionally save the NF4 checkpoint and
    time loading it back in the same process ("nf4_reload_seconds")."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-c", _LOAD_SCRIPT, str(source), dtype, str(save_to) if save_to else "-"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"loading {source} failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def real_arch(layers: int):
    """conf/model/qwen3_30b_a3b.yaml's architecture with `layers` decoder layers."""
    from dataclasses import replace

    from vlm.config import compose, to_typed

    return replace(to_typed(compose("train", ["model=qwen3_30b_a3b"])).model.arch, num_hidden_layers=layers)


def save_real_moe(arch, out: Path, seed: int = 0) -> Path:
    """A seeded random Qwen3MoeForCausalLM of `arch` (`bench.random_model`), saved in bf16 in 1 GB shards
    (the hub's layout)."""
    from bench.random_model import random_causal_lm
    from vlm.model.decoder import arch_config

    model = random_causal_lm(arch_config(arch), torch.bfloat16, seed)
    model.save_pretrained(out, max_shard_size="1GB")
    return out


def load_part(workdir: Path, layers: tuple[int, ...] = (2, 4)) -> dict:
    from vlm.plan import terms as pt

    out: dict = {}
    for n in layers:
        src, nf4 = workdir / f"real{n}" / "bf16", workdir / f"real{n}" / "nf4"
        if not (src / "config.json").is_file():
            save_real_moe(real_arch(n), src)
        hf = AutoConfig.from_pretrained(src)
        w, sh = pt.decoder_weights(hf, True), pt.decoder_shapes(hf)
        quantizing = measure_load(src, "bfloat16", save_to=None if (nf4 / "config.json").is_file() else nf4)
        loaded = measure_load(nf4, "bfloat16")
        out[f"layers={n}"] = {
            "from_bf16": quantizing,
            "from_nf4_checkpoint": loaded,
            "peak_over_baseline_gib": round((quantizing["peak"] - quantizing["baseline"]) / 2**30, 3),
            "transient_gib": round((quantizing["peak"] - quantizing["after"]) / 2**30, 3),
            "nf4_model_gib": round((w.nf4_bytes + w.dense_params * 2 + w.expert_nf4_bytes) / 2**30, 3),
            "planned_stream_transient_gib": round(pt.stream_transient_bytes(sh) / 2**30, 3),
            "one_layer_bf16_experts_gib": round(3 * sh.experts * sh.hidden * sh.expert_inter * 2 / 2**30, 3),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--threads", default="1,all", help="torch CPU thread counts to run, comma-separated")
    ap.add_argument("--load", action="store_true", help="measure loading the real shape instead (see above)")
    ap.add_argument("--workdir", default="/tmp/kovicap_moe_load", help="--load: where the models are written")
    args = ap.parse_args()
    if args.load:
        result = {"machine": machine(), "load": load_part(Path(args.workdir))}
        result["machine"]["load_avg_at_end"] = os.getloadavg()
        for k, v in result["load"].items():
            print(f"{k}: from bf16 {v['from_bf16']['seconds']:.1f} s, peak +{v['peak_over_baseline_gib']:.2f} GiB "
                  f"(transient {v['transient_gib']:.2f}); NF4 checkpoint {v['from_nf4_checkpoint']['seconds']:.2f} s")  # fmt: skip
        LOAD_RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {LOAD_RESULTS}")
        return
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    result: dict = {"machine": machine(), "cpu": {}}
    for n in args.threads.split(","):
        threads = (os.cpu_count() or 1) if n == "all" else int(n)
        torch.set_num_threads(threads)
        result["cpu"][f"threads={threads}"] = cpu_part(dtypes, args.repeats, args.tokens)
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    result["note"] = (
        "A shared 2-core VM: absolute times drift by 10-20 % between runs (see the load averages); only "
        "the side-by-side ratios of one run are meaningful. floor_ms / eager_over_floor: the per-expert "
        "GEMMs plus the NF4 de-quantization alone, i.e. the best ratio any NF4 path on torch's GEMMs "
        "could reach against eager here."
    )
    result["memory"] = memory()
    result["gpu"] = gpu_part(args.repeats)
    for threads, block in result["cpu"].items():
        print_table(block, threads)
    mem = result["memory"]
    print(
        f"\nmemory: one real layer's NF4 experts {mem['nf4_bytes_per_layer'] / 1e6:.1f} MB, x48 = "
        f"{mem['nf4_bytes_48_layers'] / 1e9:.2f} GB ({mem['bytes_per_param']} B/param; bf16: "
        f"{mem['bf16_bytes_48_layers'] / 1e9:.1f} GB)"
    )
    print(f"gpu: {result['gpu'].get('status', 'measured')}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
