#!/bin/sh
# Serve step of the stack: `python -m service`, configured by RESNET_SERVE_* variables
# (model repository, host, port, providers, batching; see service/core/settings.py).
# The compose `api` service runs exactly this; without Docker, from a checkout:
#   RESNET_SERVE_MODEL_REPOSITORY=model_repository docker/serve-entrypoint.sh
# Arguments are passed on as flags (flags win over variables). `exec` makes the service the
# process that receives SIGTERM, so `docker stop` drains and exits cleanly.
set -eu

root=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

exec "${PYTHON:-python}" -m service "$@"
