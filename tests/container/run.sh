#!/usr/bin/env bash
# `make test-docker`: the real stack, end to end, on a real Docker engine.
#   1. engine.sh start    Docker Engine (Debian's docker.io) installed and started if needed
#   2. build-airgapped.sh the images from the project's Dockerfile, with no registry: a Debian
#                         base image, torch from a local wheelhouse, this host's CA bundle
#                         (the CPU images, and the GPU image unless SKIP_GPU_IMAGE=1)
#   3. pytest -m container tests/container (compose up, accuracy, OIP, crash, stop, down -v)
#   4. engine.sh stop     only the daemon step 1 started, by its PID
# Each phase's time is printed. Fails (never skips) when a step cannot run.
set -euo pipefail
cd "$(dirname "$0")/../.."

python=${PYTHON:-.venv/bin/python}
export STATE_DIR=${STATE_DIR:-$PWD/.docker-ci}
export DOCKER_CONFIG=${DOCKER_CONFIG:-$STATE_DIR/config}
export PYTHON=$python COMPOSE_BAKE=false DOCKER_BUILDKIT=1

timed() {
    local name=$1; shift
    local start=$SECONDS
    "$@"
    printf '[test-docker] %-40s %5ds\n' "$name" "$((SECONDS - start))"
}

trap 'tests/container/engine.sh stop' EXIT
timed "engine (install, start, compose v2)" tests/container/engine.sh start

gpu=(--gpu)
[ "${SKIP_GPU_IMAGE:-0}" = 1 ] && gpu=()
# The host's CA bundle: the build then works behind this host's TLS-intercepting proxy too.
extra_ca=()
[ -f /etc/ssl/certs/ca-certificates.crt ] && extra_ca=(--extra-ca /etc/ssl/certs/ca-certificates.crt)
timed "images (air-gapped build)" docker/build-airgapped.sh "${gpu[@]}" "${extra_ca[@]}"

deselect=()
[ "${SKIP_GPU_IMAGE:-0}" = 1 ] && deselect=(--deselect "tests/container/test_stack.py::test_the_gpu_image_without_a_gpu_refuses_to_start_in_one_line")
timed "container tests" "$python" -m pytest -m container tests/container -s -p no:cacheprovider \
    "${deselect[@]}"
