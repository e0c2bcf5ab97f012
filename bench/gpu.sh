#!/usr/bin/env bash
# The GPU checks as one prepared script for a lent device (about 5 minutes on an H100): encoders at both presets
# (fp32 and bf16, tiles/s and % of the card's measured matmul peak), decoder forward+backward at both presets,
# a paper-preset decoder training step in the fastai Learner vs a plain loop, and caching one 3000² tissue with the
# paper-size VirTues and ViT, and whole-tissue prediction of a 3000² tissue at the paper preset. Needs the project's requirements importable (fastai only for train_speed). Usage: bench/gpu.sh [python]   (PYTHONPATH is set to the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
step() { echo; echo "== $*"; local t=$(date +%s); "$@"; echo "-- $(( $(date +%s) - t )) s"; }
step $PY bench/encoders.py
step $PY bench/decoder_speed.py --bs 16 --reps 5     # bs 64 runs out of 80 GB in the masked-attention variant on H&E
if $PY -c 'import fastai.learner' 2>/dev/null; then step $PY bench/train_speed.py --bs 128 --steps 10 --widths paper:1.0
else echo '(fastai not importable here: skipping bench/train_speed.py)'; fi
step $PY bench/cache_build.py --preset paper --encoder virtues --bs 64
step $PY bench/cache_build.py --preset paper --encoder cellvit --bs 64
step $PY bench/inference.py --preset paper --sizes 3000 --device cuda
