#!/usr/bin/env bash
# The one command for a GPU window (H200, no network): install the carried wheels, run every part.
#   on this machine:  make gpu-wheels        (downloads .gpu-wheels/, checks the 64 MiB per-call limit)
#   on the GPU:       bash bench/gpu/run.sh "$OUT"     (device call with carry=[".gpu-wheels"])
#   afterwards:       cp <files_at>/*.json bench/results/gpu/ && python -m bench.gpu.render
# Extra arguments go to `python -m bench.gpu` (--tiny: the CPU dry run; --parts a,b; --budget S).
# The wheels are installed for a GPU run only: the dry run (--tiny) uses the dev machine's venv.
set -uo pipefail
out=${1:?usage: bash bench/gpu/run.sh RESULTS_DIR [--tiny] [--parts ...]}
shift
cd "$(dirname "$0")/../.."
py=${PYTHON:-python3}
mkdir -p "$out"
tiny=0; [[ " $* " == *" --tiny "* ]] && tiny=1
if [[ $tiny == 0 ]] && compgen -G ".gpu-wheels/*.whl" >/dev/null; then
  site=$(mktemp -d /tmp/kovicap-site.XXXXXX)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .gpu-wheels/*.whl || { echo "run.sh: installing .gpu-wheels failed" >&2; exit 1; }
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
# Compiled Triton on a GPU; the dry run (--tiny, no CUDA) keeps the interpreter the tests use.
if [[ $tiny == 1 ]]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
"$py" -m bench.gpu "$out" "$@" 2>&1 | tee "$out/log.txt"
