#!/bin/sh
# Export step of the stack: write a preset (default: the paper set) into the model repository.
# The compose `export` job runs exactly this; without Docker, run it from a checkout:
#   RESNET_SERVE_MODEL_REPOSITORY=model_repository docker/export-entrypoint.sh
#
# RESNET_SERVE_MODEL_REPOSITORY  repository to write (required; the service reads the same variable)
# EXPORT_PRESET                  preset to export (default: paper)
# EXPORT_WEIGHTS_DIR             checkpoints picked up by file name (default: weights)
# EXPORT_ARCHS                   optional subset instead of the preset, e.g. "cifar_resnet20,resnet18"
# EXPORT_SEED                    seed of random weights and parity inputs (default: 0)
# PYTHON                         interpreter (default: python)
# Arguments are passed on to `python -m export` (for example -v for tracebacks).
#
# Versions already present with the same weights are skipped, so rerunning is cheap.
set -eu

root=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python}
repo=${RESNET_SERVE_MODEL_REPOSITORY:?set RESNET_SERVE_MODEL_REPOSITORY to the model repository directory}
weights_dir=${EXPORT_WEIGHTS_DIR:-weights}
seed=${EXPORT_SEED:-0}

mkdir -p "$repo"

if [ -z "${EXPORT_ARCHS:-}" ]; then
    exec "$python" -m export --preset "${EXPORT_PRESET:-paper}" --weights-dir "$weights_dir" \
        --seed "$seed" --out "$repo" "$@"
fi

# A subset: the preset's rules per architecture (a checkpoint from the weights directory when
# one matches, random:SEED otherwise; skip a version already present with the same weights).
for arch in $(printf '%s' "$EXPORT_ARCHS" | tr ',' ' '); do
    weights=$("$python" -c '
import sys
from pathlib import Path
from export.weights import find_checkpoint
from models.registry import get_spec
checkpoint = find_checkpoint(get_spec(sys.argv[1]), Path(sys.argv[2]))
print(checkpoint if checkpoint else "random:" + sys.argv[3])
' "$arch" "$weights_dir" "$seed")
    echo "$arch: $weights"
    "$python" -m export "$arch" --weights "$weights" --seed "$seed" --out "$repo" \
        --skip-existing "$@"
done
