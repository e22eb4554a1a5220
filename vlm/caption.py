"""`python -m vlm.caption input=DIR output=FILE.jsonl export=EXPORT_DIR [batch_size=16] [prompt=short] ...`

Captions every video under `input` (recursively) with the exported model, one JSON line per video:
video (relative to input), caption, error (null or one line), warning (when only part of a file
decoded), frames, timestamps, duration_s, decoder, model (export id), prompt_sha, size and mtime_ns
(the resume key) and, with segment_seconds, `segments` and an .srt per video in `<output stem>_srt/`.

Exit codes: 0 every video has a caption; 3 some videos failed (their lines carry the error; rerun with
retry_failed=true to try them again) or a folder could not be read; 2 usage error (missing input, bad
export, an output that is not ours or is locked by another run, a bad setting); 1 runtime failure;
143 / 130 stopped by SIGTERM / SIGINT after writing the current batch (rerun to resume).
"""

from __future__ import annotations

from vlm.util.cli import hydra_cli

USAGE = "python -m vlm.caption input=DIR output=FILE.jsonl export=EXPORT_DIR"


def main(cfg) -> int:
    from vlm.infer.run import run

    return run(cfg)["exit_code"]


if __name__ == "__main__":
    hydra_cli("caption", main, USAGE)
