#!/usr/bin/env bash
# Deploy the Swarm stack (docker-compose.swarm.yml) from the compose files, or remove it.
#
#   docker/stack.sh deploy [STACK]   render docker-compose.yml + docker-compose.cpu.yml +
#                                    docker-compose.swarm.yml with Compose v2, then
#                                    `docker stack deploy` the result (default STACK: resnet)
#   docker/stack.sh render [STACK]   print the rendered file only
#   docker/stack.sh rm [STACK]       `docker stack rm`, then wait until its containers and
#                                    networks are gone
#
# Variables (shell or .env): API_REPLICAS (2), MODELS_TAG (1: resnet-serve-models:1, made by
# docker/models-image.sh), BALANCER_PORT / BALANCER_GRPC_PORT / BALANCER_STATS_PORT (8000, 8001,
# 8404), every RESNET_SERVE_* variable of docker-compose.yml. GPU hosts: COMPOSE_FILES names the
# files to render (default: docker-compose.yml docker-compose.cpu.yml docker-compose.swarm.yml).
#
# Why render: `docker stack deploy` reads an older compose schema than Compose v2. It refuses
# depends_on conditions, GPU device reservations and a top-level `name`, which compose needs or
# writes; the swarm file removes the first two and this script drops the third, writes published
# ports as numbers, and adds the `version` key that Debian's docker 20.10 client requires.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker); fi
fi
action=${1:-}
stack=${2:-resnet}
read -r -a files <<<"${COMPOSE_FILES:-docker-compose.yml docker-compose.cpu.yml docker-compose.swarm.yml}"

render() {
    local args=()
    for file in "${files[@]}"; do args+=(-f "$file"); done
    echo 'version: "3.9"'
    # Compose writes published ports as strings (ranges are allowed there); Swarm wants numbers.
    COMPOSE_PROJECT_NAME=$stack "$DOCKER" compose "${args[@]}" config \
        | sed -E -e '/^name: /d' -e 's/^( +published: )"([0-9]+)"$/\1\2/'
}

case "$action" in
    render) render ;;
    deploy)
        rendered=$(mktemp /tmp/resnet-serve-stack.XXXXXX.yml)
        trap 'rm -f "$rendered"' EXIT
        render >"$rendered"
        "$DOCKER" stack deploy --prune -c "$rendered" "$stack"
        ;;
    rm)
        "$DOCKER" stack rm "$stack"
        label="label=com.docker.stack.namespace=$stack"
        for _ in $(seq 1 120); do
            if [ -z "$("$DOCKER" ps -aq --filter "$label")" ] \
                && [ -z "$("$DOCKER" network ls -q --filter "$label")" ]; then
                exit 0
            fi
            sleep 0.5
        done
        echo "stack.sh: $stack still has containers or networks after 60 s" >&2
        exit 1
        ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
