"""Every dense GPU tier at its real shapes, on CPU: the tier's own config through stage 1 → stage 2 → export
(+ merge) → `python -m vlm.caption`'s run → KMMLU, with the decoder's real widths, heads, kv heads, head_dim,
FFN, tied embeddings and vocab, and the tier's real vision tower at its real image size, random weights.

Only what the hardware and the time here force is overridden: the decoder's depth (a local model
directory of the real architecture cut to 1–2 layers, saved in the tier's dtype with its tokenizer, then
quantized once into an NF4 checkpoint with `vlm.export`'s `quantize=true`, which every step loads), the
tower's depth in use (`vision.feature_layer=0`: its first block; the blocks after it never run) and its
weights (random: `vision.pretrained=null`, no download), the device (`trainer.accelerator=cpu` with fp32 compute: on a CPU
without AVX-512 BF16 a bf16 matmul is emulated, 257 s against 3.3 s in fp32 for the tiny head's backward,
measured here) and the work per run (one step, no gradient accumulation). Everything else (batch, frames,
checkpointing, NF4, LoRA r=64, vision tower, image size) is the tier's. The memory each stage's model holds
stays within the planner's weight terms for that run + 25 % (anonymous memory: see `anon_rss`).
"""

from __future__ import annotations

import gc
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from vlm.config import compose, to_typed
from vlm.model.decoder import DTYPES, arch_config
from vlm.plan import plan_memory
from vlm.util.memory import anon_rss, release_freed

GIB = 1024**3
TOWERS = {
    "vit_l_14": (1024, (16, 16), 224),
    "siglip2_so400m": (1152, (24, 24), 384),
}  # width, grid, image size
# tier -> (extra config choice, decoder layers kept, vision yaml), in the order they run: the smaller two
# first, beside the real-shape MoE chain on the other `make test` worker (see tests/conftest.py)
TIERS = {
    "l4": ([], 1, "vit_l_14"),
    "t4": ([], 2, "vit_l_14"),
    "a100": (["vision=siglip2_so400m"], 1, "siglip2_so400m"),
    "h100-32b": (["model=qwen3_32b"], 1, "vit_l_14"),
}


class PeakAnon:
    """Peak of `anon_rss` while the block runs, sampled every 10 ms on a thread."""

    def __enter__(self) -> PeakAnon:
        release_freed()
        self.base = self.peak = anon_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, anon_rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss())


def weight_terms(plan) -> int:
    names = (
        "decoder_weights_nf4",
        "decoder_weights_dense",
        "moe_experts",
        "vision_tower",
        "projector",
        "lora",
    )
    return sum(b for n, b, _ in plan.terms if n in names)


@pytest.fixture(scope="module")
def kmmlu_dir(tmp_path_factory) -> Path:
    from tests.eval.kmmlu_fixture import write_kmmlu_fixture

    return write_kmmlu_fixture(tmp_path_factory.mktemp("kmmlu"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """A few clips: at the real towers' depth and size each clip costs seconds to encode on CPU."""
    from data.synth import generate

    root = tmp_path_factory.mktemp("tier_clips")
    generate(str(root), n_train=4, n_val=2, seed=0)
    return root


@pytest.fixture
def work(tmp_path) -> Iterator[Path]:
    """The test's directory, removed when it ends: a tier writes 5-13 GB (model, NF4 copy, checkpoints,
    export and merge), 40 GB for the four, which pytest would otherwise keep for three runs."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def real_shape_model(tier: str, extra: list[str], layers: int, where: Path) -> Path:
    """The tier decoder's real architecture with `layers` layers, random seeded weights in the tier's
    compute dtype (`bench.random_model`), saved like a downloaded checkpoint (config, safetensors,
    tokenizer)."""
    from bench.random_model import random_causal_lm
    from vlm.model.tokenizer import load_tokenizer

    cfg = to_typed(compose("train", [f"gpu={tier.split('-')[0]}", *extra]))
    hf = arch_config(replace(cfg.model.arch, num_hidden_layers=layers))
    random_causal_lm(hf, DTYPES[cfg.gpu.compute_dtype]).save_pretrained(where)
    load_tokenizer().save_pretrained(where)
    return where


@pytest.mark.slow
@pytest.mark.parametrize("tier", list(TIERS))
def test_tier_at_real_shapes(tier, clips, kmmlu_dir, work):
    from vlm.export import export, load_exported
    from vlm.infer.run import caption_folder
    from vlm.train.run import train

    extra, layers, vision = TIERS[tier]
    gpu = tier.split("-")[0]
    model_dir = real_shape_model(tier, extra, layers, work / "model")
    # Quantized once, as the README advises (`python -m vlm.export quantize=true`): bitsandbytes
    # quantizes ~17 M weights/s per CPU thread, and the chain below loads the decoder five times.
    nf4_dir = export(model_dir, work / "model-nf4", quantize=True)
    over = [f"gpu={gpu}", *extra, f"model.name_or_path={nf4_dir}", "vision.pretrained=null", "vision.feature_layer=0",
            "trainer.accelerator=cpu", "trainer.precision=32-true", "gpu.compute_dtype=float32", f"data.root={clips}",
            "train.max_steps=1", "train.accumulate_grad_batches=1", "progress=false"]  # fmt: skip
    report = {}
    for stage, more in (
        ("stage1_projector", []),
        ("stage2_lora", [f"train.init_from={work / 'stage1_projector' / 'checkpoints' / 'last'}"]),
    ):
        cfg = compose("train", [*over, f"train={stage}", f"output_dir={work / stage}", *more])
        typed = to_typed(cfg)
        plan = plan_memory(typed)
        assert plan.layers == layers  # the planner read the model directory, not the YAML's depth
        with PeakAnon() as mem:
            res = train(cfg)
        release_freed()  # what the run freed (activations, de-quantized tiles) is not held
        peak, held = mem.peak - mem.base, anon_rss() - mem.base  # the module is still alive in `res`
        report[stage] = {"seconds": round(res["train_seconds"], 1), "peak_rss_gib": round(peak / GIB, 2),
                         "held_rss_gib": round(held / GIB, 2),
                         "plan_weights_gib": round(weight_terms(plan) / GIB, 2), "trainable": res["trainable_params"]}  # fmt: skip
        # What the trained model holds is what the plan's weight terms count. The peak adds loading
        # transients a GPU run does not have (the 16-bit shards converted to fp32 here): reported only.
        assert held <= 1.25 * weight_terms(plan), report[stage]
        vlm = res["module"].vlm
        hf = vlm.decoder.config
        assert hf.hidden_size == typed.model.arch.hidden_size and hf.num_hidden_layers == layers
        assert hf.num_attention_heads == typed.model.arch.num_attention_heads
        assert hf.num_key_value_heads == typed.model.arch.num_key_value_heads
        assert hf.head_dim == 128 and hf.vocab_size == 151936
        assert (vlm.vision.width, vlm.vision.grid, vlm.vision.image_size[0]) == TOWERS[vision]
        lin4 = [m for m in vlm.decoder.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(lin4) == 7 * layers and all(m.weight.quant_state.quant_type == "nf4" for m in lin4)
        assert res["trainable_params"] == expected_trainable(typed, vlm.projector.in_dim, layers)
        del res, vlm, lin4  # one trained model at a time: at 14B shape two held 20 GiB (OOM-killed here)
        gc.collect()
    print(json.dumps({tier: report}))

    exp = export(work / "stage2_lora" / "checkpoints" / "last", work / "export", merge=True)
    meta = json.loads((exp / "vlm.json").read_text())
    assert meta["decoder"]["hidden_size"] == to_typed(compose("train", over)).model.arch.hidden_size
    assert (
        meta["vision"]["weights"] == "vision.safetensors"
    )  # random tower: its weights travel with the export
    s = caption_folder(clips / "videos" / "val", work / "captions.jsonl", exp, batch_size=4,
                       num_workers=0, progress=False, **{"generation.max_new_tokens": 4, "trainer.accelerator": "cpu"})  # fmt: skip
    assert (s["ok"], s["failed"]) == (2, 0)
    captioner = load_exported(exp)
    frames = torch.zeros(1, meta["frames"]["num_frames"], meta["frames"]["image_size"], meta["frames"]["image_size"], 3,
                         dtype=torch.uint8)  # fmt: skip
    assert captioner.vlm.visual_tokens(captioner.vlm.encode(frames)).shape == (
        1, captioner.vlm.projector.num_tokens(meta["frames"]["num_frames"]), meta["decoder"]["hidden_size"])  # fmt: skip
    del captioner  # one loaded model at a time: at 14B's shapes each holds 6 GiB of fp32 embedding + head
    gc.collect()

    from eval.kmmlu import run as kmmlu

    k = kmmlu(compose("kmmlu", [*over, f"data_dir={kmmlu_dir}", "subjects=[Fashion]", "limit=2", "num_fewshot=0",
                                f"adapter={exp / 'adapter'}", f"output={work / 'kmmlu.json'}"]))  # fmt: skip
    assert k["per_subject"]["Fashion"]["n"] == 2


def expected_trainable(cfg, in_dim: int, layers: int) -> int:
    """Projector (mlp2x_gelu) + LoRA on q/k/v/o/gate/up/down, from the config's numbers alone."""
    a, p = cfg.model.arch, cfg.projector
    d, hid = a.hidden_size, a.hidden_size * p.hidden_mult
    proj = in_dim * hid + hid + hid * d + d + d + p.max_frames * d  # fc1, fc2, gain, frame positions
    if cfg.train.lora is None:
        return proj
    r, q, kv = cfg.train.lora.r, a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    per_layer = r * (
        (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + a.intermediate_size) + (a.intermediate_size + d)
    )
    return proj + layers * per_layer
