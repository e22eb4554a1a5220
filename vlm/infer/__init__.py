"""Folder captioning (`python -m vlm.caption`): video discovery, the output file and its owner, the
Lightning prediction parts, SRT subtitles, and the run's bookkeeping (resume plan, summary, exit code)."""
