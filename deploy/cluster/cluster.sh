#!/usr/bin/env bash
# A three-node tern cluster on one machine: three ternd processes on the local PostgreSQL,
# Redis and NATS, with media in an S3 bucket, behind nginx on 127.0.0.1:7070 (the address the
# `tern` CLI uses by default).
#
#   deploy/cluster/cluster.sh start     build ternd, migrate, start the nodes and nginx
#   deploy/cluster/cluster.sh status    each node's readiness and connections
#   deploy/cluster/cluster.sh kill N    SIGKILL node N (0, 1 or 2), to watch its clients move
#   deploy/cluster/cluster.sh stop      stop nginx, the nodes and the local S3 server
#
# Settings (environment): TERN_CLUSTER_POSTGRES (default postgres://root@127.0.0.1:5432/test),
# TERN_CLUSTER_SCHEMA (tern_cluster), TERN_CLUSTER_REDIS (redis://127.0.0.1:6379),
# TERN_CLUSTER_NATS (nats://127.0.0.1:4222), TERN_CLUSTER_PORT (7070), and TERN_CLUSTER_SET:
# more `key=value` settings for every node, separated by spaces (e.g. raised rate limits for
# tern-bench). Media: TERN_CLUSTER_S3_ENDPOINT and TERN_CLUSTER_S3_BUCKET name an existing
# S3-compatible bucket (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); without
# them the script starts a local S3-compatible server (moto, in memory, installed in target/py
# from .ci/requirements-test.txt) on port 7074 with bucket tern-cluster: media is gone when it
# stops. Logs, pids and data directories live in target/cluster/.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
state="$root/target/cluster"
postgres=${TERN_CLUSTER_POSTGRES:-postgres://root@127.0.0.1:5432/test}
schema=${TERN_CLUSTER_SCHEMA:-tern_cluster}
redis=${TERN_CLUSTER_REDIS:-redis://127.0.0.1:6379}
nats=${TERN_CLUSTER_NATS:-nats://127.0.0.1:4222}
port=${TERN_CLUSTER_PORT:-7070}
s3_endpoint=${TERN_CLUSTER_S3_ENDPOINT:-}
s3_bucket=${TERN_CLUSTER_S3_BUCKET:-tern-cluster}
s3_port=$((port + 4))
nodes=3
ternd="$root/target/release/ternd"

settings() {
    local i=$1
    printf '%s\n' \
        --set storage.backend=postgres \
        --set "storage.postgres.url=\"$postgres\"" \
        --set "storage.postgres.schema=$schema" \
        --set "storage.postgres.application_name=\"ternd-n$i\"" \
        --set cluster.enabled=true \
        --set "cluster.node_id=\"n$i\"" \
        --set "cluster.redis_url=\"$redis\"" \
        --set "cluster.nats_url=\"$nats\"" \
        --set "cluster.prefix=\"$schema\"" \
        --set connections.max_per_address=0 \
        --set 'connections.trusted_proxies=["127.0.0.1"]' \
        --set media.backend=s3 \
        --set "media.s3.bucket=\"$s3_bucket\"" \
        --set "media.s3.endpoint=\"${s3_endpoint:-http://127.0.0.1:$s3_port}\"" \
        --set "media.s3.allow_http=true"
    if [ -z "$s3_endpoint" ]; then
        # moto takes any credentials; a real bucket gets them from the AWS_* environment.
        printf '%s\n' --set 'media.s3.access_key_id="cluster"' --set 'media.s3.secret_access_key="cluster"'
    fi
    local extra
    for extra in ${TERN_CLUSTER_SET:-}; do
        printf '%s\n' --set "$extra"
    done
}

node_port() { echo $((port + 1 + $1)); }

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

nginx_bin() {
    command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true
}

wait_ready() {
    local url=$1
    for _ in $(seq 100); do
        curl -fsS "$url/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "not ready: $url (see $state/*.log)" >&2
    return 1
}

start() {
    mkdir -p "$state"
    if [ -z "$(nginx_bin)" ]; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update && apt-get install -y nginx-light
        else
            echo "nginx is needed: sudo apt-get install nginx-light" >&2
            exit 1
        fi
    fi
    (cd "$root" && cargo build --release -p tern-server --features s3 --bin ternd)
    if [ -z "$s3_endpoint" ]; then start_moto; fi
    mapfile -t common < <(settings 0)
    "$ternd" migrate --data-dir "$state/n0" "${common[@]}"
    local servers=""
    for i in $(seq 0 $((nodes - 1))); do
        local p
        p=$(node_port "$i")
        if running "$state/n$i.pid"; then
            echo "node n$i is already running"
        else
            mapfile -t args < <(settings "$i")
            "$ternd" serve --listen "127.0.0.1:$p" --data-dir "$state/n$i" "${args[@]}" \
                >"$state/n$i.log" 2>&1 &
            echo $! >"$state/n$i.pid"
        fi
        servers+="        server 127.0.0.1:$p max_fails=1 fail_timeout=10s;"$'\n'
    done
    for i in $(seq 0 $((nodes - 1))); do
        wait_ready "http://127.0.0.1:$(node_port "$i")"
    done
    if ! running "$state/nginx.pid"; then
        python3 - "$root/deploy/cluster/nginx.conf.in" "$state/nginx.conf" "$state" "$port" "$servers" <<'EOF'
import sys
src, dst, folder, port, servers = sys.argv[1:]
text = open(src).read()
text = text.replace("@DIR@", folder).replace("@PORT@", port).replace("@SERVERS@", servers)
open(dst, "w").write(text)
EOF
        "$(nginx_bin)" -p "$state" -c "$state/nginx.conf" >"$state/nginx.stderr" 2>&1 &
        echo $! >"$state/nginx.pid"
    fi
    wait_ready "http://127.0.0.1:$port"
    echo "cluster up: http://127.0.0.1:$port (nginx) → n0 :$(node_port 0), n1 :$(node_port 1), n2 :$(node_port 2)"
}

# The local S3-compatible server, when no bucket is named.
start_moto() {
    if running "$state/moto.pid"; then return 0; fi
    if [ ! -x "$root/target/py/bin/moto_server" ]; then
        python3 -m venv "$root/target/py"
        "$root/target/py/bin/pip" install --quiet --disable-pip-version-check \
            -r "$root/.ci/requirements-test.txt"
    fi
    "$root/target/py/bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"$state/moto.log" 2>&1 &
    echo $! >"$state/moto.pid"
    for _ in $(seq 100); do
        curl -fsS "http://127.0.0.1:$s3_port/" >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -fsS -X PUT "http://127.0.0.1:$s3_port/$s3_bucket" >/dev/null
}

status() {
    for i in $(seq 0 $((nodes - 1))); do
        local p ready conns
        p=$(node_port "$i")
        if running "$state/n$i.pid"; then
            ready=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$p/readyz" || true)
            conns=$(curl -s "http://127.0.0.1:$p/metrics" | awk '$1 == "tern_connections" {print $2}' || true)
            echo "n$i :$p running, readyz $ready, connections ${conns:-0}"
        else
            echo "n$i :$p stopped"
        fi
    done
    if running "$state/nginx.pid"; then echo "nginx :$port running"; else echo "nginx :$port stopped"; fi
    if [ -z "$s3_endpoint" ]; then
        if running "$state/moto.pid"; then echo "s3 (moto) :$s3_port running"; else echo "s3 (moto) :$s3_port stopped"; fi
    fi
}

stop() {
    if running "$state/nginx.pid"; then kill -QUIT "$(cat "$state/nginx.pid")"; fi
    for i in $(seq 0 $((nodes - 1))); do
        if running "$state/n$i.pid"; then kill -TERM "$(cat "$state/n$i.pid")"; fi
    done
    for _ in $(seq 50); do
        local up=0
        for i in $(seq 0 $((nodes - 1))); do running "$state/n$i.pid" && up=1; done
        [ "$up" = 0 ] && break
        sleep 0.1
    done
    if running "$state/moto.pid"; then kill -TERM "$(cat "$state/moto.pid")"; fi
    for f in "$state"/*.pid; do
        [ -e "$f" ] || continue
        for _ in $(seq 50); do running "$f" || break; sleep 0.1; done
        rm -f "$f"
    done
    echo "cluster stopped"
}

case "${1:-}" in
    start) start ;;
    status) status ;;
    stop) stop ;;
    kill)
        i=${2:?which node: 0, 1 or 2}
        kill -KILL "$(cat "$state/n$i.pid")"
        echo "node n$i killed"
        ;;
    *)
        sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
