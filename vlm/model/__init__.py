"""The VLM on tensors and everything that builds it: tokenizer + chat template, the processor (all text),
decoder loading, vision towers, the one LoRA policy, and the builders that assemble the parts.

Model code here is plain PyTorch: no Lightning, no Hydra. `VLM` sees token ids, masks and features
only; `Processor` owns every string (prompt, labels, padding, decoding). `build_vlm(cfg)` takes a typed
training config (and optionally ready-made parts) and returns `(VLM, Processor)`.
"""
