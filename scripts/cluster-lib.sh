# scripts/cluster-lib.sh: a local deployment of several `updraft serve` instances, sourced by
# scripts/cluster.sh (`make cluster`) and scripts/bench-cluster.sh (`make bench-cluster`). Not in CI.
#
# What `cluster_start` brings up, all on 127.0.0.1, all under $WORK:
#   - a fresh database on the local PostgreSQL (or $CLUSTER_DATABASE_URL, emptied first);
#   - moto, the S3-compatible server the tests use, with bucket `updraft` (the package store);
#   - $INSTANCES instances, each with its own data directory and ports, sharing the secret key and the
#     TLS certificate (made by the first one), advertising the load balancer's addresses to devices;
#   - HAProxy (TCP, round-robin, health-checked) for HTTPS, MQTT and MQTTS: $HAPROXY_PROCS processes on
#     the same ports (SO_REUSEPORT): each process holds two descriptors per connection, and one process
#     may have 20 000 here, so a fleet of 15 000 devices needs two;
#   - nginx's stream module for CoAP over UDP, by source address (HAProxy 2.6 balances no UDP), so that
#     a device's datagrams keep reaching the instance holding its registration.
#
# Needs: a release or debug `updraft` ($BIN), Debian's haproxy, nginx-light and libnginx-mod-stream
# (installed when missing), PostgreSQL (started when stopped), moto (scripts/setup.sh installs it).

INSTANCES="${INSTANCES:-3}"
HAPROXY_PROCS="${HAPROXY_PROCS:-1}"
LB_HTTPS="${LB_HTTPS:-8443}"
LB_MQTT="${LB_MQTT:-1883}"
LB_MQTTS="${LB_MQTTS:-8883}"
LB_COAP="${LB_COAP:-5683}"
LB_COAPS="${LB_COAPS:-5684}"
CLUSTER_PIDS=()
INSTANCE_PIDS=()

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
free_udp_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cluster_need() {
  local missing=()
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v nginx >/dev/null || missing+=(nginx-light)
  [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
  command -v psql >/dev/null || missing+=(postgresql postgresql-client)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "[cluster] installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null
  fi
  # Debian starts the packaged services; ours run from $WORK.
  service nginx stop >/dev/null 2>&1 || true
  service haproxy stop >/dev/null 2>&1 || true
}

cluster_database() {
  if [ -n "${CLUSTER_DATABASE_URL:-}" ]; then
    psql -q "$CLUSTER_DATABASE_URL" -c 'DROP SCHEMA public CASCADE; CREATE SCHEMA public;' >/dev/null
    DATABASE_URL="$CLUSTER_DATABASE_URL"
    return
  fi
  service postgresql start >/dev/null 2>&1 || true
  # Each instance pools up to 32 connections (and one for LISTEN), each command-line call and simulator
  # process a few more: Debian's default of 100 is too few for three instances under load.
  if [ "$(su postgres -c "psql -At -c 'show max_connections'")" -lt 400 ]; then
    su postgres -c "psql -q -c 'ALTER SYSTEM SET max_connections = 400'" >/dev/null
    service postgresql restart >/dev/null
  fi
  local name="updraft_cluster"
  su postgres -c "psql -q -c \"DROP DATABASE IF EXISTS $name WITH (FORCE)\"" >/dev/null
  su postgres -c "psql -q -c \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'updraft') THEN CREATE ROLE updraft LOGIN PASSWORD 'updraft'; END IF; END \\\$\\\$\"" >/dev/null
  su postgres -c "psql -q -c \"CREATE DATABASE $name OWNER updraft\"" >/dev/null
  DATABASE_URL="postgres://updraft:updraft@127.0.0.1:5432/$name"
}

cluster_moto() {
  local moto="$HOME/.cache/updraft/moto-venv/bin/moto_server"
  command -v moto_server >/dev/null && moto="$(command -v moto_server)"
  [ -x "$moto" ] || { echo "[cluster] moto_server is missing: run scripts/setup.sh" >&2; exit 1; }
  S3_PORT="$(free_port)"
  "$moto" -H 127.0.0.1 -p "$S3_PORT" >"$WORK/moto.log" 2>&1 &
  CLUSTER_PIDS+=($!)
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$S3_PORT/moto-api/" >/dev/null && break
    sleep 0.1
  done
  curl -fs -X PUT "http://127.0.0.1:$S3_PORT/updraft" >/dev/null
}

# The environment every instance and command-line call shares.
cluster_env() {
  export UPDRAFT_DATABASE__URL="$DATABASE_URL"
  export UPDRAFT_SECRET_KEY="$SECRET_KEY"
  export UPDRAFT_PACKAGES__STORE=s3
  export UPDRAFT_PACKAGES__BUCKET=updraft
  export UPDRAFT_PACKAGES__S3__ENDPOINT="http://127.0.0.1:$S3_PORT"
  export UPDRAFT_PACKAGES__S3__REGION=us-east-1
  export UPDRAFT_PACKAGES__S3__ACCESS_KEY_ID=cluster
  export UPDRAFT_PACKAGES__S3__SECRET_ACCESS_KEY=cluster
  export UPDRAFT_PACKAGES__S3__PATH_STYLE=true
  export UPDRAFT_PACKAGES__S3__ALLOW_HTTP=true
  export UPDRAFT_DOWNLOADS__PUBLIC_URL="https://localhost:$LB_HTTPS"
  export UPDRAFT_LWM2M__PUBLIC_URL="coap://localhost:$LB_COAP"
  export UPDRAFT_LWM2M__DTLS_PUBLIC_URL="coaps://localhost:$LB_COAPS"
  export UPDRAFT_ADMIN__PASSWORD="$ADMIN_PASSWORD"
  export UPDRAFT_LOG__FILTER="${UPDRAFT_LOG__FILTER:-warn,backend::cluster=info,updraft=info}"
  # For command-line calls (`. $WORK/env`); the file holds the secret key, so it is the user's alone.
  ( umask 077; env | grep '^UPDRAFT_' | sed 's/^/export /; s/=\(.*\)$/="\1"/' >"$WORK/env" )
}

# Starts instance $1 (1-based) and waits until it serves.
cluster_instance() {
  local n="$1" dir="$WORK/i$1"
  mkdir -p "$dir"
  local https mqtt mqtts coap coaps
  https="$(free_port)"; mqtt="$(free_port)"; mqtts="$(free_port)"; coap="$(free_udp_port)"; coaps="$(free_udp_port)"
  HTTPS_PORTS[$n]="$https"; MQTT_PORTS[$n]="$mqtt"; MQTTS_PORTS[$n]="$mqtts"; COAP_PORTS[$n]="$coap"
  COAPS_PORTS[$n]="$coaps"
  local tls=()
  if [ "$n" -gt 1 ]; then
    tls=(UPDRAFT_TLS__CERT="$WORK/i1/tls/server.pem" UPDRAFT_TLS__KEY="$WORK/i1/tls/server.key")
  fi
  env "${tls[@]}" UPDRAFT_DATA_DIR="$dir" UPDRAFT_CLUSTER__INSTANCE_ID="updraft-$n" \
    UPDRAFT_HTTP__LISTEN="127.0.0.1:$https" UPDRAFT_MQTT__LISTEN="127.0.0.1:$mqtt" \
    UPDRAFT_MQTT__TLS_LISTEN="127.0.0.1:$mqtts" UPDRAFT_LWM2M__LISTEN="127.0.0.1:$coap" \
    UPDRAFT_LWM2M__DTLS_LISTEN="127.0.0.1:$coaps" \
    "$BIN" serve >>"$WORK/updraft-$n.log" 2>&1 &
  INSTANCE_PIDS[$n]=$!
  for _ in $(seq 1 600); do
    grep -q 'Updraft is running' "$WORK/updraft-$n.log" && return 0
    kill -0 "${INSTANCE_PIDS[$n]}" 2>/dev/null || break
    sleep 0.1
  done
  tail -30 "$WORK/updraft-$n.log" >&2
  exit 1
}

cluster_balancers() {
  local maxconn=9000
  {
    echo "global"
    echo "  maxconn $maxconn"
    echo "  log stderr format short local0 warning"
    echo "defaults"
    echo "  mode tcp"
    echo "  timeout connect 5s"
    echo "  timeout client 1h"
    echo "  timeout server 1h"
    echo "  balance roundrobin"
    echo "  default-server check inter 1s fall 2 rise 2"
    for proto in https mqtt mqtts; do
      local port
      case "$proto" in https) port=$LB_HTTPS ;; mqtt) port=$LB_MQTT ;; mqtts) port=$LB_MQTTS ;; esac
      echo "frontend $proto"
      echo "  bind 127.0.0.1:$port"
      echo "  default_backend $proto"
      echo "backend $proto"
      for n in $(seq 1 "$INSTANCES"); do
        local p
        case "$proto" in https) p=${HTTPS_PORTS[$n]} ;; mqtt) p=${MQTT_PORTS[$n]} ;; mqtts) p=${MQTTS_PORTS[$n]} ;; esac
        echo "  server updraft-$n 127.0.0.1:$p"
      done
    done
  } >"$WORK/haproxy.cfg"
  haproxy -c -q -f "$WORK/haproxy.cfg"
  for _ in $(seq 1 "$HAPROXY_PROCS"); do
    ( ulimit -n "$(ulimit -Hn)"; exec haproxy -db -f "$WORK/haproxy.cfg" ) >>"$WORK/haproxy.log" 2>&1 &
    CLUSTER_PIDS+=($!)
  done
  mkdir -p "$WORK/nginx"
  {
    echo "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
    echo "daemon off;"
    echo "user root;"
    echo "worker_processes 1;"
    echo "pid $WORK/nginx/nginx.pid;"
    echo "error_log $WORK/nginx/error.log warn;"
    echo "events { worker_connections 16384; }"
    echo "stream {"
    echo "  upstream coap {"
    echo "    hash \$remote_addr consistent;"
    for n in $(seq 1 "$INSTANCES"); do
      echo "    server 127.0.0.1:${COAP_PORTS[$n]} max_fails=2 fail_timeout=10s;"
    done
    echo "  }"
    # CoAPS by source address too: a DTLS session lives on the instance that did its handshake.
    echo "  upstream coaps {"
    echo "    hash \$remote_addr consistent;"
    for n in $(seq 1 "$INSTANCES"); do
      echo "    server 127.0.0.1:${COAPS_PORTS[$n]} max_fails=2 fail_timeout=10s;"
    done
    echo "  }"
    for pair in "$LB_COAP coap" "$LB_COAPS coaps"; do
      set -- $pair
      echo "  server {"
      echo "    listen 127.0.0.1:$1 udp;"
      echo "    proxy_pass $2;"
      # NB-IoT devices sleep for long: their session (and source port towards Updraft) should outlive it.
      echo "    proxy_timeout 1h;"
      echo "  }"
    done
    echo "}"
  } >"$WORK/nginx/nginx.conf"
  nginx -q -t -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" 2>>"$WORK/nginx/error.log"
  nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" 2>>"$WORK/nginx/error.log" &
  CLUSTER_PIDS+=($!)
  sleep 0.5
}

cluster_start() {
  cluster_need
  declare -g -a HTTPS_PORTS MQTT_PORTS MQTTS_PORTS COAP_PORTS COAPS_PORTS
  SECRET_KEY="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
  ADMIN_PASSWORD="${ADMIN_PASSWORD:-cluster-$(python3 -c 'import secrets; print(secrets.token_hex(6))')}"
  cluster_database
  cluster_moto
  cluster_env
  for n in $(seq 1 "$INSTANCES"); do
    cluster_instance "$n"
  done
  cluster_balancers
}

cluster_stop() {
  for pid in "${INSTANCE_PIDS[@]}" "${CLUSTER_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
