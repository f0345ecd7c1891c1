#!/usr/bin/env bash
# scripts/cluster.sh: `make cluster`. Starts, on this machine, PostgreSQL, the S3-compatible test server,
# INSTANCES (3) `updraft serve` instances and the load balancers in front (see scripts/cluster-lib.sh),
# prints the addresses, and stops everything on Ctrl-C. Not part of CI.
#
#   scripts/cluster.sh                     # debug build of updraft
#   BIN=target/release/updraft INSTANCES=2 scripts/cluster.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/cluster-lib.sh
. scripts/cluster-lib.sh
if [ -z "${BIN:-}" ]; then
  cargo build -p server --bin updraft
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/updraft"
fi
WORK="$(mktemp -d /tmp/updraft-cluster.XXXXXX)"
trap 'cluster_stop; echo "[cluster] stopped; logs kept in $WORK" >&2' EXIT
trap 'exit 0' INT TERM
cluster_start
cat <<INFO

Updraft cluster: $INSTANCES instances on one PostgreSQL and one S3 bucket, behind HAProxy and nginx.

  Console and /v5 API   https://localhost:$LB_HTTPS   (admin / $ADMIN_PASSWORD)
  MQTT / MQTTS          localhost:$LB_MQTT / localhost:$LB_MQTTS   (round-robin)
  CoAP (LwM2M, UDP)     localhost:$LB_COAP   (by source address)
  CoAPS (LwM2M, DTLS)   localhost:$LB_COAPS   (by source address)
  CA certificate        $WORK/i1/tls/ca.pem
  Database              $DATABASE_URL
  Package bucket        http://127.0.0.1:$S3_PORT/updraft
  Logs                  $WORK/updraft-*.log, haproxy.log, nginx/error.log

Instances:
INFO
for n in $(seq 1 "$INSTANCES"); do
  echo "  updraft-$n  pid ${INSTANCE_PIDS[$n]}  https 127.0.0.1:${HTTPS_PORTS[$n]}  mqtt ${MQTT_PORTS[$n]}  coap ${COAP_PORTS[$n]}  coaps ${COAPS_PORTS[$n]}"
done
cat <<INFO

Try: kill -9 one instance mid-campaign; its devices reconnect through the balancer and the others
take its subtasks over once its lease (15 s) runs out. Command-line calls need the same environment:
  . $WORK/env && $BIN device list
Ctrl-C stops everything.
INFO
while sleep 3600; do :; done
