"""Qwen3-30B-A3B's real shapes (2 of its 48 layers, random weights) through the whole MoE tier, on CPU.

    python -m bench.moe_real [--workdir DIR]

1. the bf16 model (the hub's per-expert layout) and its NF4 checkpoint, as `python -m bench.moe --load`
   makes them (reused when already in DIR);
2. one stage-2 step of `gpu=h100 train=stage2_lora` on the NF4 checkpoint (CPU settings, r=8): the
   trainable parameters must be the planner's count (attention LoRA + ExpertLoRA on every routed expert);
3. `python -m vlm.export`'s export with merge=true merge_dtype=float32 in a fresh process, its anonymous
   memory measured (after the imports and at its peak);
4. float32 logits of the first decoder layer (plus final norm and head; a float32 stock model of both
   layers needs 7.3 GB): ours as trained, stock transformers + stock peft on `adapter/`, on the vLLM-
   layout `adapter_vllm/`, and the streamed `merged/` model through stock `AutoModelForCausalLM`.
Each comparison must hold to atol 1e-4 (the script fails otherwise). Writes bench/results/moe_real.json.

`make test` runs the same chain (`run_chain`, `check`) on the same 2-layer model in
tests/vlm/moe/test_real_shape.py, and the same code on the tiny Qwen3-MoE in tests/vlm/export/.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.moe import REPO, machine, measure_load, real_arch, save_real_moe

RESULTS = Path(__file__).resolve().parent / "results" / "moe_real.json"
IDS = torch.tensor([[151644, 872, 198, 14990, 11, 1879, 0, 151645]])  # 8 tokens: 64 routed rows
R = 8  # LoRA rank of the CPU run (the shipped r=64's fp32 AdamW state is 1.7 GB at 2 layers)
ATOL = 1e-4


def expected_lora_params(arch, r: int, experts: bool) -> int:
    """r·(in + out) per attention projection, plus per layer E·r·(H + 2I) (gate_up) + E·r·(I + H) (down)."""
    h, q, kv = (
        arch.hidden_size,
        arch.num_attention_heads * arch.head_dim,
        arch.num_key_value_heads * arch.head_dim,
    )
    attention = r * ((h + q) + 2 * (h + kv) + (q + h))
    e, i = arch.num_experts, arch.moe_intermediate_size
    return arch.num_hidden_layers * (attention + (e * r * (h + 2 * i) + e * r * (i + h) if experts else 0))


def train_step(nf4: Path, work: Path) -> tuple[Path, int]:
    from data.synth import generate
    from vlm.config import compose
    from vlm.train.run import train

    synth = work / "synth"
    if not (synth / "train").is_dir():
        generate(str(synth), n_train=8, n_val=2, seed=0)
    over = [
        "gpu=h100", "train=stage2_lora", f"model.name_or_path={nf4}", f"output_dir={work / 'run'}", "progress=false",
        # CPU: float32 (no bf16 matmul units here), a tiny tower, one short video, no checkpointing
        "trainer.accelerator=cpu", "trainer.precision=32-true", "gpu.compute_dtype=float32", "vision=tiny",
        "train.gradient_checkpointing=false", f"data.root={synth}", "data.num_frames=2", "data.num_workers=0",
        "data.max_caption_tokens=16", "train.batch_size=1", "train.accumulate_grad_batches=1", "train.max_steps=1",
        f"train.lora.r={R}", "train.lr_lora=1e-2", "train.val_every_n_steps=1000", "train.val_caption_subset=0",
    ]  # fmt: skip
    res = train(compose("train", over))
    return Path(res["last_checkpoint"]), int(res["trainable_params"])


# `python -m vlm.export`'s `export(...)` in a fresh process, with its anonymous memory (resident minus
# shared: not the safetensors pages it maps while reading, which the kernel drops at will) sampled every
# 10 ms: once the libraries are imported (the baseline) and at its peak.
_EXPORT = """
import json, sys, threading
from vlm.export.write import export
from vlm.util.memory import anon_rss as anon, release_freed
release_freed()  # the imports' freed heap is not counted as the baseline
base = peak = anon()
done = threading.Event()
def watch():
    global peak
    while not done.wait(0.01):
        peak = max(peak, anon())
t = threading.Thread(target=watch, daemon=True)
t.start()
export(sys.argv[1], sys.argv[2], merge=True, merge_dtype="float32", overwrite=True)
done.set()
t.join()
print(json.dumps({"baseline": base, "peak": max(peak, anon())}))
"""


def export_with_merge(ckpt: Path, out: Path) -> dict:
    """`export(ckpt, out, merge=True, merge_dtype="float32")` in a fresh process: {"baseline", "peak"}
    anonymous bytes (after the imports, and the most while exporting)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", _EXPORT, str(ckpt), str(out)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"export failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


def our_first_layer(ckpt: Path):
    """The trained decoder as training built it (NF4 through bitsandbytes' float32 path), cut to layer 0."""
    import bitsandbytes as bnb
    from omegaconf import OmegaConf

    from vlm.config import train_config
    from vlm.model.build import build_vlm
    from vlm.train.checkpoint import load_dir

    ck = load_dir(ckpt)
    vlm, _ = build_vlm(OmegaConf.to_object(OmegaConf.structured(train_config(ck["kovicap"]["config"]))))
    vlm.load_state_dict({k[len("vlm.") :]: v for k, v in ck["state_dict"].items()}, strict=False)
    decoder = vlm.decoder.eval()
    base = decoder.get_base_model()
    base.model.layers = base.model.layers[:1]
    base.config.num_hidden_layers = 1
    for m in decoder.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.train()  # the exact fp32 de-quantize + matmul training ran (eval on CPU computes in bf16)
    return decoder


def compare(ckpt: Path, out: Path, bf16: Path) -> dict:
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from vlm.moe import FusedMoeExperts

    ours = our_first_layer(ckpt)
    want = logits(ours)
    layer0 = {n.split("base_model.model.", 1)[1].replace(".base_layer", ""): m for n, m in ours.named_modules()
              if ".layers.0." in n and isinstance(m, (bnb.nn.Linear4bit, FusedMoeExperts))}  # fmt: skip
    del ours
    gc.collect()
    # Stock transformers holding our de-quantized weights in its dense experts and Linear layers
    stock = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32, num_hidden_layers=1).eval()
    with torch.no_grad():
        for name, m in layer0.items():
            target = stock.get_submodule(name)
            if isinstance(m, FusedMoeExperts):
                gate_up, down = m.dequantized()
                target.gate_up_proj.copy_(gate_up)
                target.down_proj.copy_(down)
                del gate_up, down
            else:
                target.weight.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))
    del layer0
    diff = {"adapter_effect": (want - logits(stock)).abs().max().item()}
    peft = PeftModel.from_pretrained(stock, str(out / "adapter")).eval()
    diff["stock_peft"] = (logits(peft) - want).abs().max().item()
    vllm = PeftModel.from_pretrained(peft.unload(), str(out / "adapter_vllm")).eval()  # peft fuses per-expert
    diff["vllm_layout_via_peft"] = (logits(vllm) - want).abs().max().item()
    del stock, peft, vllm
    gc.collect()
    merged = AutoModelForCausalLM.from_pretrained(
        out / "merged", dtype=torch.float32, num_hidden_layers=1
    ).eval()
    diff["merged"] = (logits(merged) - want).abs().max().item()
    diff["logit_scale"] = want.abs().max().item()
    return diff


def run_chain(bf16: Path, nf4: Path, work: Path) -> dict:
    """Steps 2-4 on a saved model and its NF4 checkpoint: trainable counts, the merge's peak and shard,
    the logit differences (`check` says what of it fails)."""
    from transformers import AutoConfig

    from vlm.plan import GIB
    from vlm.plan import terms as pt
    from vlm.train.checkpoint import load_dir

    hf = AutoConfig.from_pretrained(bf16)
    result: dict = {"layers": hf.num_hidden_layers, "lora_r": R}
    ckpt, trainable = train_step(nf4, work)
    arch = real_arch(hf.num_hidden_layers)
    with_experts, attention = expected_lora_params(arch, R, True), expected_lora_params(arch, R, False)
    state = load_dir(ckpt)["state_dict"]
    in_ckpt = sum(v.numel() for k, v in state.items() if ".lora" in k)
    trained_b = [
        k for k, v in state.items() if ".experts.lora." in k and k.endswith("_B") and v.abs().max() > 0
    ]
    result["trainable"] = {"total": trainable, "lora_in_checkpoint": in_ckpt, "expected_lora": with_experts,
                           "expected_attention_only": attention, "expert_B_factors_moved": len(trained_b)}  # fmt: skip
    del state
    gc.collect()

    out = work / "export"
    mem = export_with_merge(ckpt, out)
    result["export_merge_anon_gib"] = {k: round(v / GIB, 3) for k, v in mem.items()}
    sh = pt.decoder_shapes(hf)
    result["one_layer_experts_fp32_gib"] = round(3 * sh.experts * sh.hidden * sh.expert_inter * 4 / GIB, 3)
    shards = [p.stat().st_size for p in (out / "merged").glob("*.safetensors")]
    result["largest_merged_shard_gib"] = round(max(shards) / GIB, 3)
    result["logit_max_abs_diff"] = compare(ckpt, out, bf16)
    result["export_dir"] = str(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/kovicap_moe_load", help="where models and outputs are written")
    work = Path(ap.parse_args().workdir) / "real2"
    bf16, nf4 = work / "bf16", work / "nf4"
    result: dict = {"machine": machine()}
    t0 = time.perf_counter()
    if not (bf16 / "config.json").is_file():
        save_real_moe(real_arch(2), bf16)
    if not (nf4 / "config.json").is_file():
        result["load_from_bf16"] = measure_load(bf16, "bfloat16", save_to=nf4)
    result["load_from_nf4"] = measure_load(nf4, "bfloat16")
    result.update(run_chain(bf16, nf4, work))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    if problems := check(result):
        raise SystemExit("; ".join(problems))


def check(result: dict) -> list[str]:
    """What of `run_chain`'s result does not hold: LoRA on every expert at the planner's count, every
    expert B factor moved by the step, every stock load within ATOL of our logits, an adapter with effect."""
    t, diff, out = result["trainable"], result["logit_max_abs_diff"], []
    if t["lora_in_checkpoint"] != t["expected_lora"]:
        out.append(f"trainable LoRA {t['lora_in_checkpoint']} != expected {t['expected_lora']}")
    if t["expert_B_factors_moved"] != 2 * result["layers"]:
        out.append(f"{t['expert_B_factors_moved']} expert B factors moved, want {2 * result['layers']}")
    bad = {k: v for k, v in diff.items() if k not in ("adapter_effect", "logit_scale") and v > ATOL}
    if bad or diff["adapter_effect"] <= 1e-2:
        out.append(f"logits differ beyond {ATOL} (or the adapter has no effect): {diff}")
    return out


if __name__ == "__main__":
    main()
