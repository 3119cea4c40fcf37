#!/usr/bin/env bash
# `make test-docker`: the real stack, end to end, on a real Docker engine.
#   1. engine.sh start    Docker Engine (Debian's docker.io) installed and started if needed
#   2. build-airgapped.sh the images from the project's Dockerfile, with no registry: a Debian
#                         base image, torch from a local wheelhouse, this host's CA bundle
#                         (the CPU images, and the GPU image unless SKIP_GPU_IMAGE=1)
#   3. pytest -m container: the compose stack (up, accuracy, OIP, /docs in headless Chromium,
#      crash, stop, down -v; the stack with calibration images), then the Swarm stack
#      (test_swarm.py: balancer, replicas, kill, rolling update, scaling, stack rm, swarm leave)
#   4. engine.sh stop     only the daemon step 1 started, by its PID
# `run.sh swarm` (make test-swarm) runs only the Swarm tests of step 3; `run.sh nodes` (make
# test-swarm-nodes, not in CI) a swarm of three engines instead (test_swarm_nodes.py). Debian's chromium is
# installed (when missing) while the images build. Each phase's time is printed. Fails (never
# skips) when a step cannot run.
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

only=${1:-all}
case "$only" in all|swarm|nodes) ;; *) echo "usage: $0 [swarm|nodes]" >&2; exit 2 ;; esac

trap 'tests/container/engine.sh stop' EXIT
timed "engine (install, start, compose v2)" tests/container/engine.sh start

# Debian's Chromium for the /docs test, installed in the background while the images build.
browser=""
if [ "$only" = all ] && ! command -v chromium >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "run.sh: chromium is needed (apt-get install chromium)" >&2; exit 1; }
    (
        start=$SECONDS
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
        printf '[test-docker] %-40s %5ds (beside the image build)\n' "chromium (apt-get install)" \
            "$((SECONDS - start))"
    ) >"$STATE_DIR/chromium-install.log" 2>&1 &
    browser=$!
fi

gpu=(--gpu)
[ "${SKIP_GPU_IMAGE:-0}" = 1 ] && gpu=()
# The host's CA bundle: the build then works behind this host's TLS-intercepting proxy too.
extra_ca=()
[ -f /etc/ssl/certs/ca-certificates.crt ] && extra_ca=(--extra-ca /etc/ssl/certs/ca-certificates.crt)
timed "images (air-gapped build)" docker/build-airgapped.sh "${gpu[@]}" "${extra_ca[@]}"

if [ -n "$browser" ]; then
    wait "$browser" || { cat "$STATE_DIR/chromium-install.log" >&2; exit 1; }
    tail -n 1 "$STATE_DIR/chromium-install.log"
fi

pytest=("$python" -m pytest -m container -s -p no:cacheprovider)
if [ "$only" = all ]; then
    deselect=()
    [ "${SKIP_GPU_IMAGE:-0}" = 1 ] && deselect=(--deselect "tests/container/test_stack.py::test_the_gpu_image_without_a_gpu_refuses_to_start_in_one_line")
    timed "container tests (compose)" "${pytest[@]}" tests/container \
        --ignore tests/container/test_swarm.py --ignore tests/container/test_swarm_nodes.py \
        "${deselect[@]}"
fi
if [ "$only" = nodes ]; then
    timed "swarm tests, 3 nodes" "${pytest[@]}" tests/container/test_swarm_nodes.py
else
    timed "swarm tests" "${pytest[@]}" tests/container/test_swarm.py
fi
