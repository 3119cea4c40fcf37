#!/bin/sh
# Export step of the stack: write a preset (default: the paper set) into the model repository.
# The compose `export` job runs exactly this; without Docker, run it from a checkout:
#   RESNET_SERVE_MODEL_REPOSITORY=model_repository docker/export-entrypoint.sh
#
# RESNET_SERVE_MODEL_REPOSITORY  repository to write (required; the service reads the same variable)
# EXPORT_PRESET                  preset to export (default: paper)
# EXPORT_WEIGHTS_DIR             checkpoints picked up by file name (default: weights)
# EXPORT_ARCHS                   optional subset instead of the preset, e.g. "cifar_resnet20,resnet18"
# EXPORT_PRETRAINED              auto (default) | require | never: official weights where no
#                                checkpoint is found (see python -m export --help)
# EXPORT_PRETRAINED_MIRROR       optional URL of a directory holding the official weight files
# EXPORT_SEED                    seed of random weights and parity inputs (default: 0)
# EXPORT_CALIBRATION_DIR         representative images, a few hundred like your traffic (compose:
#                                ./calibration): models they suit are exported with
#                                --precision auto, gated and calibrated on them (default: none)
# PYTHON                         interpreter (default: python)
# Arguments are passed on to `python -m export` (for example -v for tracebacks).
#
# Versions already present with the same weights are skipped, so rerunning is cheap.
set -eu

root=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python}
repo=${RESNET_SERVE_MODEL_REPOSITORY:?set RESNET_SERVE_MODEL_REPOSITORY to the model repository directory}

mkdir -p "$repo"

if [ -n "${EXPORT_ARCHS:-}" ]; then
    set -- --archs "$EXPORT_ARCHS" "$@"
else
    set -- --preset "${EXPORT_PRESET:-paper}" "$@"
fi
if [ -n "${EXPORT_CALIBRATION_DIR:-}" ]; then
    set -- --calibration-dir "$EXPORT_CALIBRATION_DIR" "$@"
fi
if [ -n "${EXPORT_PRETRAINED_MIRROR:-}" ]; then
    set -- --pretrained-mirror "$EXPORT_PRETRAINED_MIRROR" "$@"
fi
exec "$python" -m export --weights-dir "${EXPORT_WEIGHTS_DIR:-weights}" \
    --pretrained "${EXPORT_PRETRAINED:-auto}" --seed "${EXPORT_SEED:-0}" --out "$repo" "$@"
