#!/usr/bin/env bash
# Extra Docker Engines on this host, each in its own network namespace with its own data root,
# for a multi-node swarm (make test-swarm-nodes).
#
#   nodes.sh start N   bridge rsw0 (10.231.0.1/24 on the host), then N engines: network namespace
#                      rsw-nI (10.231.0.1I on a veth into the bridge), their own mount namespace
#                      with /var/run/docker and /etc/docker private, their own
#                      host name (a UTS namespace: Swarm names nodes by it), data root
#                      under $NODES_ROOT/nI (/var/lib/resnet-serve-nodes), socket and log there
#   nodes.sh socket I  the Docker socket of engine I
#   nodes.sh stop      stops the engines it started (by PID), removes namespaces, veths, bridge,
#                      the FORWARD rule and the engines' state
# Only what `start` made is touched. Root only.
set -euo pipefail

nodes=${NODES_ROOT:-/var/lib/resnet-serve-nodes}
bridge=rsw0
net=10.231.0

die() { echo "nodes.sh: $*" >&2; exit 1; }

start() {
    local count=$1
    [ "$(id -u)" = 0 ] || die "root only"
    mkdir -p "$nodes"
    ip link add "$bridge" type bridge
    ip addr add "$net.1/24" dev "$bridge"
    ip link set "$bridge" up
    # Docker sets the FORWARD policy to DROP; frames between the engines cross the bridge.
    iptables -I FORWARD -i "$bridge" -o "$bridge" -j ACCEPT
    for i in $(seq 1 "$count"); do
        local ns=rsw-n$i dir=$nodes/n$i
        mkdir -p "$dir/data" "$dir/exec"
        ip netns add "$ns"
        ip link add "rsw-v$i" type veth peer name eth0 netns "$ns"
        ip link set "rsw-v$i" master "$bridge" up
        ip -n "$ns" addr add "$net.1$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        ip -n "$ns" route add default via "$net.1"
        # nsenter, not `ip netns exec`, which remounts /sys and so loses the cgroup mounts.
        # shellcheck disable=SC2016  # $1, $2 expand in the inner shell, in the namespaces
        nsenter --net="/run/netns/$ns" unshare --mount --uts --propagation private sh -c '
            hostname "$2"
            mkdir -p /var/run/docker && mount -t tmpfs tmpfs /var/run/docker
            mkdir -p /etc/docker && mount -t tmpfs tmpfs /etc/docker
            exec setsid dockerd --data-root "$1/data" --exec-root "$1/exec" \
                --pidfile "$1/dockerd.pid" --host "unix://$1/docker.sock" \
                --userland-proxy=false' sh "$dir" "$ns" >"$dir/dockerd.log" 2>&1 </dev/null &
    done
    for i in $(seq 1 "$count"); do
        local deadline=$((SECONDS + 60))
        until docker -H "unix://$nodes/n$i/docker.sock" info >/dev/null 2>&1; do
            [ $SECONDS -lt $deadline ] || { tail -n 20 "$nodes/n$i/dockerd.log" >&2; die "engine $i did not answer"; }
            sleep 0.3
        done
    done
}

stop() {
    for dir in "$nodes"/n*; do
        [ -d "$dir" ] || continue
        if [ -f "$dir/dockerd.pid" ]; then
            local pid; pid=$(cat "$dir/dockerd.pid")
            if kill -0 "$pid" 2>/dev/null; then
                kill -TERM "$pid"
                for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
                if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
            fi
        fi
        local i=${dir##*/n}
        ip netns del "rsw-n$i" 2>/dev/null || true
        ip link del "rsw-v$i" 2>/dev/null || true
    done
    iptables -D FORWARD -i "$bridge" -o "$bridge" -j ACCEPT 2>/dev/null || true
    ip link del "$bridge" 2>/dev/null || true
    rm -rf "$nodes"
}

case "${1:-}" in
    start) start "${2:-2}" ;;
    socket) echo "unix://$nodes/n$2/docker.sock" ;;
    stop) stop ;;
    *) sed -n '2,14p' "$0"; exit 2 ;;
esac
