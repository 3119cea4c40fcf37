#!/usr/bin/env bash
# Build the images with no container registry and no PyTorch index: what air-gapped hosts and
# hosts behind a TLS-intercepting proxy need (README, "Air-gapped builds"). PyPI (or a PyPI
# mirror that pip is configured for inside the build) must be reachable.
#
#   docker/build-airgapped.sh [--gpu] [--extra-ca FILE] [--torch-wheel FILE]
#
# 1. Base image: unless PYTHON_IMAGE names one already, builds resnet-serve-base:bookworm from
#    Debian's packages (debootstrap: python3, python3-venv, ca-certificates; a venv at /opt/venv
#    first on PATH) and imports it into Docker; kept for later runs.
# 2. torch: serves the torch 2.13.0+cpu wheel (--torch-wheel, default: found in pip's find-links
#    directories) as a one-project index on 127.0.0.1, passed as TORCH_INDEX_URL.
# 3. Builds through compose (the same build arguments a user sets): resnet-serve:export and
#    resnet-serve:cpu (docker-compose.cpu.yml), plus resnet-serve:gpu with --gpu.
# --extra-ca FILE copies a PEM bundle into docker/ca-certificates/ so that every stage trusts it.
# Prints each phase's time.
set -euo pipefail
cd "$(dirname "$0")/.."

gpu=0 extra_ca="" wheel=""
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) gpu=1 ;;
        --extra-ca) extra_ca=$2; shift ;;
        --torch-wheel) wheel=$2; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

# Debian's client talks to the daemon's own BuildKit; a newer client without buildx would not.
if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker); fi
fi
docker=$DOCKER
python=$(python3 -c 'import sys; print(sys.executable)')  # the real interpreter, not a shim
phase() { printf 'build-airgapped: %-34s %5ds\n' "$1" "$((SECONDS - $2))"; }

if [ -n "$extra_ca" ]; then
    cp "$extra_ca" docker/ca-certificates/extra-ca.crt
    echo "build-airgapped: trusting $extra_ca in every stage (docker/ca-certificates/extra-ca.crt)"
fi

# 1. A Python base image from Debian's packages.
base=${PYTHON_IMAGE:-resnet-serve-base:bookworm}
start=$SECONDS
if ! "$docker" image inspect "$base" >/dev/null 2>&1; then
    [ -z "${PYTHON_IMAGE:-}" ] || { echo "PYTHON_IMAGE=$base is not in the Docker daemon" >&2; exit 1; }
    command -v debootstrap >/dev/null || { echo "debootstrap is needed (apt-get install debootstrap)" >&2; exit 1; }
    rootfs=$(mktemp -d /tmp/resnet-serve-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
    chroot "$rootfs" python3 -m venv /opt/venv
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$docker" import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' - "$base" >/dev/null
    rm -rf "$rootfs"; trap - EXIT
    phase "base image $base (debootstrap)" "$start"
else
    phase "base image $base (present)" "$start"
fi

# 2. The torch CPU wheel as a one-project index on 127.0.0.1.
if [ -z "$wheel" ]; then
    for dir in $("$python" -m pip config get global.find-links 2>/dev/null) /opt/wheels; do
        found=$(find "$dir" -maxdepth 1 -name 'torch-2.13.0+cpu-*.whl' 2>/dev/null | head -n 1)
        [ -n "$found" ] && { wheel=$found; break; }
    done
fi
[ -n "$wheel" ] && [ -f "$wheel" ] || { echo "no torch 2.13.0+cpu wheel found: pass --torch-wheel FILE" >&2; exit 1; }
index=$(mktemp -d /tmp/resnet-serve-wheelhouse.XXXXXX)
mkdir "$index/torch"
ln -s "$(readlink -f "$wheel")" "$index/torch/$(basename "$wheel")"
port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$python" -m http.server --bind 127.0.0.1 --directory "$index" "$port" >/dev/null 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; rm -rf "$index"' EXIT

# 3. Build through compose, as a user would, with the air-gapped arguments.
export PYTHON_IMAGE=$base TORCH_INDEX_URL=http://127.0.0.1:$port/ BUILD_NETWORK=host
export DOCKER_BUILDKIT=1 COMPOSE_BAKE=false
start=$SECONDS
"$docker" compose -f docker-compose.yml -f docker-compose.cpu.yml build export api
phase "images resnet-serve:export, :cpu" "$start"
if [ "$gpu" = 1 ]; then
    start=$SECONDS
    "$docker" compose -f docker-compose.yml build api
    phase "image resnet-serve:gpu" "$start"
fi
"$docker" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^resnet-serve' || true
