"""Training: the one LightningModule, the DataModule and collator, checkpoint IO, the feature cache,
the checks a run passes before loading weights, and `train(cfg)` (what `python train.py` runs)."""
