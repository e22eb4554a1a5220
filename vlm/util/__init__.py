"""Helpers every verb shares, each written once: atomic files and directories, JSON lines, the CLI wrapper.

`files`: write-to-temp-then-rename for files and whole directories (`publish_dir` never leaves a moment
without the old or the new one). `jsonl`: read a JSON-lines file that may end in a torn line, append
flushed lines. `cli`: the one Hydra entry wrapper (usage error → one line and exit 2, runtime failure →
one line and exit 1, SIGTERM/SIGINT → 143/130, tracebacks only with `debug=true`). `errors`: the two
exception types those exit codes come from.
"""
