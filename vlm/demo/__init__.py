"""`make demo`: the whole job on CPU (corpus, warm-ups that stand in for pretraining, stage 1, stage 2,
export, captioning through the CLI, scores, report). Demo-only code lives here, never in the product."""
