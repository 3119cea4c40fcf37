#!/usr/bin/env bash
# Export once, then bake the model repository into an image: resnet-serve-models:TAG, the
# serving image with the repository at /models (docker/models.Dockerfile). The Swarm stack
# (docker-compose.swarm.yml) runs it on every node; a new TAG is a rolling update.
#
#   docker/models-image.sh [--tag TAG] [--serve-image IMAGE] [--from IMAGE] [-- EXPORT_ARGS...]
#
# The export is the compose `export` job's (docker/export-entrypoint.sh in resnet-serve:export),
# with the same inputs: checkpoints from ./weights, representative images from ./calibration
# (CALIBRATION_DIR), and EXPORT_PRESET / EXPORT_ARCHS / EXPORT_PRETRAINED /
# EXPORT_PRETRAINED_MIRROR from the environment. --from IMAGE starts from the repository of an
# earlier models image, so that new weights become new versions beside the old ones (versions
# with the same weights are skipped). EXPORT_ARGS go to `python -m export` (e.g. -v).
# Defaults: --tag 1, --serve-image resnet-serve:cpu (resnet-serve:gpu for GPU nodes).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=1 serve=resnet-serve:cpu from=""
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag=$2; shift ;;
        --serve-image) serve=$2; shift ;;
        --from) from=$2; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker); fi
fi
docker=$DOCKER
calibration=${CALIBRATION_DIR:-$PWD/calibration}

repo=$(mktemp -d /tmp/resnet-serve-models.XXXXXX)
trap 'rm -rf "$repo"' EXIT
if [ -n "$from" ]; then
    "$docker" run --rm --entrypoint tar "$from" -C /models -c . | tar -C "$repo" -x
fi
# The export runs as the calling user, so that what it writes can be removed afterwards.
"$docker" run --rm --user "$(id -u):$(id -g)" -e HOME=/tmp \
    -e EXPORT_PRESET -e EXPORT_ARCHS -e EXPORT_PRETRAINED -e EXPORT_PRETRAINED_MIRROR \
    -e EXPORT_CALIBRATION_DIR=calibration \
    -v "$PWD/weights:/weights:ro" -v "$calibration:/app/calibration:ro" -v "$repo:/models" \
    resnet-serve:export "$@"
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-1} "$docker" build -q -f docker/models.Dockerfile \
    --build-arg SERVE_IMAGE="$serve" --label "org.opencontainers.image.version=$tag" \
    -t "resnet-serve-models:$tag" "$repo" >/dev/null
echo "models-image.sh: resnet-serve-models:$tag from $serve with $(cd "$repo" && find . -name metadata.json | sort | tr '\n' ' ')"
