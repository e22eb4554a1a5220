"""Export: stock-PEFT adapter equal to our decoder, merged decoder, full-VLM reload, refusals, CLI."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlm.export import ExportError, export, load_exported
from vlm.train.checkpoint import load_dir

REPO = Path(__file__).resolve().parents[3]
TEXT = "고양이가 빨간 공을 굴린다. 다음 장면을 한국어로 설명해 주세요."


@pytest.fixture(scope="module")
def ckpt(stage2_checkpoint) -> Path:
    """A tiny stage-2 checkpoint (NF4 base + LoRA) trained hard enough that the adapter matters."""
    return stage2_checkpoint


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory) -> Path:
    return export(ckpt, tmp_path_factory.mktemp("exp") / "export", merge=True, merge_dtype="float32")


def vlm_from_checkpoint(checkpoint: Path, *overrides: str):
    """The VLM exactly as training built it (config from the checkpoint) with its trained weights;
    `overrides` are `key=value` strings (e.g. model.quantize=none)."""
    from omegaconf import OmegaConf

    from vlm.config import train_config
    from vlm.model.build import build_vlm

    ck = load_dir(checkpoint)
    cfg = OmegaConf.structured(train_config(ck["kovicap"]["config"]))
    cfg.merge_with_dotlist(list(overrides))
    vlm, processor = build_vlm(OmegaConf.to_object(cfg))
    state = {k[len("vlm.") :]: v for k, v in ck["state_dict"].items()}
    assert sorted(state) == sorted(n for n, p in vlm.named_parameters() if p.requires_grad)
    vlm.load_state_dict(state, strict=False)
    return vlm.eval(), processor


def text_ids() -> torch.Tensor:
    from vlm.model.tokenizer import load_tokenizer

    tok = load_tokenizer()
    text = tok.apply_chat_template(
        [{"role": "user", "content": TEXT}], tokenize=False, add_generation_prompt=True
    )
    return torch.tensor([tok(text, add_special_tokens=False).input_ids])  # (1, L)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()  # (1, L, V)


def stock_base(exported: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    base = json.loads((exported / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def test_files_are_safetensors_json_markdown_with_stock_adapter_config(exported, ckpt):
    from vlm.config.schema import ArchConfig
    from vlm.model.decoder import tiny_base_dir

    files = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    assert all(Path(f).suffix in (".safetensors", ".json", ".jinja", ".md") for f in files), files
    for need in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "projector.safetensors",
                 "vlm.json", "README.md", "merged/config.json", "merged/model.safetensors", "tokenizer/tokenizer.json",
                 "merged/tokenizer.json", "merged/chat_template.jinja", "vision.safetensors"):  # fmt: skip
        assert need in files
    cfg = load_dir(ckpt)["kovicap"]["config"]
    ac = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    assert ac["peft_type"] == "LORA" and ac["task_type"] == "CAUSAL_LM"
    base = tiny_base_dir(ArchConfig(**cfg["model"]["arch"]), cfg["model"]["init_seed"])
    assert ac["base_model_name_or_path"] == str(base)  # the real (fp32) base
    assert (ac["r"], ac["lora_alpha"]) == (4, 16)
    # full module names (as training wrapped them): 2 layers x the 7 configured projections
    assert len(ac["target_modules"]) == 14
    assert {m.rsplit(".", 1)[1] for m in ac["target_modules"]} == set(cfg["train"]["lora"]["target_modules"])
    with safe_open(str(exported / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    # peft's saved names: no adapter name; 2 layers x 7 modules x (A, B)
    assert len(keys) == 28 and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    meta = json.loads((exported / "vlm.json").read_text())
    assert meta["format_version"] == 2 and meta["id"].startswith("kovicap-")
    assert meta["decoder"]["hidden_size"] == 128 and meta["decoder"]["quantize"] == "nf4"
    assert meta["frames"]["num_frames"] == cfg["data"]["num_frames"]
    assert meta["prompt"]["user"] == cfg["prompt"]["user"] and meta["training"]["global_step"] == 3
    assert meta["vision"]["weights"] == "vision.safetensors"  # random tiny encoder: its weights travel along
    card = (exported / "README.md").read_text()
    assert (
        meta["id"] in card and "PeftModel.from_pretrained" in card and ac["base_model_name_or_path"] in card
    )


def test_stock_peft_logits_equal_ours(exported, ckpt):
    from peft import PeftModel

    ids = text_ids()
    ours, _ = vlm_from_checkpoint(ckpt, "model.quantize=none")  # our model, fp32 base instead of NF4
    want = logits(ours.decoder, ids)
    base = stock_base(exported)
    plain = logits(base, ids)
    stock = PeftModel.from_pretrained(base, str(exported / "adapter")).eval()
    got = logits(stock, ids)
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the logits: the comparison means something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # and the export loaded by our own loader (fp32 base) gives them too
    torch.testing.assert_close(
        logits(load_exported(exported, quantize="none").vlm.decoder, ids), want, atol=1e-4, rtol=0
    )


def test_merged_decoder_is_lora_on_the_dequantized_base(exported, ckpt):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = text_ids()
    cfg = json.loads((exported / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg
    merged = AutoModelForCausalLM.from_pretrained(str(exported / "merged")).eval()  # plain transformers
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    got = logits(merged, ids)
    # Reference: the NF4 model as trained, through bitsandbytes' exact fp32 path (de-quantize + matmul),
    # which is what training ran (bnb's CPU inference kernel computes in bf16 instead).
    ref = vlm_from_checkpoint(ckpt)[0].decoder
    for m in ref.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.train()
    want = logits(ref, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the merge went into the de-quantized weights, not into the original fp32 base
    fp32_base = logits(PeftModel.from_pretrained(stock_base(exported), str(exported / "adapter")).eval(), ids)
    assert (got - fp32_base).abs().max() > 1e-3


def _frames(meta: dict, videos: list[Path]) -> torch.Tensor:
    from data.video import sample_frames

    f = meta["frames"]
    return torch.stack(
        [
            sample_frames(v, num_frames=f["num_frames"], mode=f["sample_mode"], size=f["image_size"]).frames
            for v in videos
        ]
    )  # (B, T, H, W, 3)


def test_load_exported_captions_equal_checkpoint_without_pickle(exported, ckpt, synth_root, monkeypatch):
    def no_pickle(*a, **k):
        raise AssertionError("pickle used while loading an export")

    from vlm.model.captioner import VideoCaptioner

    ref = VideoCaptioner(*vlm_from_checkpoint(ckpt))
    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    model = load_exported(exported)
    videos = sorted((synth_root / "videos" / "val").glob("*.mp4"))
    frames = _frames(model.meta, videos)
    want = ref.caption(frames, max_new_tokens=12)
    got = model.caption(frames, max_new_tokens=12)
    assert got == want
    # The videos reach the decoder: its next-token logits after the prompt differ from video to video and
    # equal the checkpoint model's. (Greedy captions of a 3-step model can coincide across videos, so
    # comparing caption strings across videos would be a flaky proxy for this.)
    first = [first_step_logits(c, frames) for c in (model, ref)]
    torch.testing.assert_close(first[0], first[1], atol=1e-4, rtol=0)
    assert (first[0][0] - first[0][1]).abs().max() > 1e-3
    assert model.processor.prompt.user == ref.processor.prompt.user


@torch.no_grad()
def first_step_logits(captioner, frames: torch.Tensor) -> torch.Tensor:
    """(B, V) logits of the first caption token, through the whole pipeline."""
    vlm, proc = captioner.vlm, captioner.processor
    visual = vlm.visual_tokens(vlm.encode(frames))
    text = proc.generation_batch(visual.shape[1], visual.shape[0])
    out = vlm.causal_lm(inputs_embeds=vlm.embed(text.input_ids, visual), attention_mask=text.attention_mask)
    return out.logits[:, -1].float()


def test_non_empty_out_is_refused_unless_overwrite(ckpt, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"output=.*exp: directory is not empty; pass overwrite=true"):
        export(ckpt, out)
    assert (out / "keep.txt").read_text() == "mine" and not (out / "vlm.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # no temporary left behind
    export(ckpt, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "vlm.json").is_file()
    assert not (out / "merged").exists()


def _save_base(path: Path, model_type: str, hidden: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.for_model(
        model_type, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, vocab_size=512,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(c).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("model_type", "hidden", "got"),
    [
        ("qwen3", 64, r"Qwen3ForCausalLM \(model_type=qwen3, hidden_size=64"),
        ("llama", 128, r"LlamaForCausalLM"),
    ],
)
def test_mismatched_base_names_both(exported, tmp_path, model_type, hidden, got):
    other = _save_base(tmp_path / "other", model_type, hidden)
    want = r"adapter was trained on Qwen3ForCausalLM \(model_type=qwen3, hidden_size=128, layers=2\)"
    with pytest.raises(ExportError, match=f"{want} but base {other} is {got}"):
        load_exported(exported, base=str(other))


def test_cli_exports_bf16_merge_and_refuses_with_exit_2(ckpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "vlm.export", f"checkpoint={ckpt}", f"output={tmp_path / 'e'}", "merge=true"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with safe_open(str(tmp_path / "e" / "merged" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert dtypes == {"BF16"}
    assert not (tmp_path / ".hydra").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert (
        r.stderr.strip().splitlines()[-1]
        == f"error: output={tmp_path / 'e'}: directory is not empty; pass overwrite=true to replace it"
    )
