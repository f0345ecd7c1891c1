#!/usr/bin/env bash
# scripts/bench-cluster.sh: `make bench-cluster` (release build; not in CI). The local cluster of
# scripts/cluster-lib.sh (3 instances, PostgreSQL, S3, HAProxy), DEVICES (15 000) simulated MQTT devices
# connecting through HAProxy, one task; when a third of the devices have succeeded, one instance is
# killed with SIGKILL. Reports: the campaign's time, each instance's peak RSS, the time from the kill to
# the survivors owning the dead instance's subtasks, and the subtasks driven twice (must be 0).
#
#   scripts/bench-cluster.sh [DEVICES]
#   BIN=target/release/updraft scripts/bench-cluster.sh 2000
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DEVICES="${1:-15000}"
ulimit -n "$(ulimit -Hn)"
# Two HAProxy processes share the ports: each holds two descriptors per connection.
HAPROXY_PROCS="${HAPROXY_PROCS:-2}"
# shellcheck source=scripts/cluster-lib.sh
. scripts/cluster-lib.sh
if [ -z "${BIN:-}" ]; then
  cargo build --release -p server --bin updraft
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/updraft"
fi
WORK="$(mktemp -d /tmp/updraft-bench-cluster.XXXXXX)"
SIM_PIDS=()
cleanup() {
  for pid in "${SIM_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  cluster_stop
  if [ -n "${KEEP:-}" ]; then echo "[bench-cluster] kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
LB_HTTPS="$(free_port)" LB_MQTT="$(free_port)" LB_MQTTS="$(free_port)" LB_COAP="$(free_udp_port)"
LB_COAPS="$(free_udp_port)"
cluster_start
echo "[bench-cluster] $INSTANCES instances up behind HAProxy ($HAPROXY_PROCS processes); $DEVICES devices" >&2

peak_rss_mib() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }

"$BIN" product add --id bench --name Bench --json >/dev/null
head -c 262144 /dev/urandom >"$WORK/app-2.0.bin"
PACKAGE=$("$BIN" package upload "$WORK/app-2.0.bin" --product bench --version 2.0 | awk '/uploaded package/ {print $3}')
GROUP=$("$BIN" group add --name bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["group_id"])')
# Two simulator processes (one process, one descriptor limit), each half the fleet, through HAProxy.
HALF=$((DEVICES / 2))
for part in 0 1; do
  count=$HALF
  [ "$part" -eq 1 ] && count=$((DEVICES - HALF))
  "$BIN" sim mqtt --devices "$count" --prefix "bench$part-" --product bench --register \
    --host 127.0.0.1 --port "$LB_MQTT" --ca "$WORK/i1/tls/ca.pem" --max-downloading 256 \
    >"$WORK/sim-$part.log" 2>&1 &
  SIM_PIDS+=($!)
done
sim_field() { # the last report's value of $1, summed over both simulators
  local total=0
  for part in 0 1; do
    v=$(tail -1 "$WORK/sim-$part.log" | awk -v k="$1" '{for (i=1;i<NF;i++) if ($i==k) print $(i+1)}')
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
for _ in $(seq 1 6000); do
  connected=0
  for part in 0 1; do
    c=$( (grep -o 'connected [0-9]*' "$WORK/sim-$part.log" || true) | tail -1 | awk '{print $2}')
    connected=$((connected + ${c:-0}))
  done
  [ "$connected" -ge "$DEVICES" ] && break
  for pid in "${SIM_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || { cat "$WORK"/sim-*.log; exit 1; }; done
  sleep 0.2
done
echo "[bench-cluster] $connected devices connected; per instance: $(for n in $(seq 1 "$INSTANCES"); do
  printf '%s=%s ' "updraft-$n" "$(psql -At "$DATABASE_URL" -c "select count(*) from devices where instance_id = 'updraft-$n'")"; done)" >&2
members() { for part in 0 1; do
  count=$HALF; [ "$part" -eq 1 ] && count=$((DEVICES - HALF))
  seq -f "bench$part-%05g" 0 $((count - 1)); done; }
members | xargs -n 2000 "$BIN" group add-devices "$GROUP" >/dev/null
TASK=$("$BIN" task create --name bench --package "$PACKAGE" --group "$GROUP" --json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["task_id"])')
began=$(date +%s.%N)
q() { psql -At "$DATABASE_URL" -c "$1"; }
while [ "$(q "select count(*) from subtasks where task_id = '$TASK' and status = 'Success'")" -lt $((DEVICES / 3)) ]; do
  sleep 0.2
done
VICTIM=2
VICTIM_RSS=$(peak_rss_mib "${INSTANCE_PIDS[$VICTIM]}")
orphans=$(q "select count(*) from subtasks where task_id = '$TASK' and lease_owner = 'updraft-$VICTIM' and status in ('Waitting','Processing','FailWaitRetry')")
kill -9 "${INSTANCE_PIDS[$VICTIM]}"; wait "${INSTANCE_PIDS[$VICTIM]}" 2>/dev/null || true
killed=$(date +%s.%N)
echo "[bench-cluster] SIGKILL updraft-$VICTIM at $(q "select count(*) from subtasks where task_id = '$TASK' and status = 'Success'") successes; it drove $orphans open subtasks" >&2
# Owned again: no open subtask is leased to the dead instance any more.
while [ "$(q "select count(*) from subtasks where task_id = '$TASK' and lease_owner = 'updraft-$VICTIM' and status in ('Waitting','Processing','FailWaitRetry')")" -gt 0 ]; do
  sleep 0.1
done
owned=$(date +%s.%N)
while [ "$(q "select count(*) from subtasks where task_id = '$TASK' and status in ('Waitting','Processing','FailWaitRetry')")" -gt 0 ]; do
  sleep 0.5
done
finished=$(date +%s.%N)
sleep 3 # the simulators report every 2 s
echo "[bench-cluster] outcomes: $(q "select string_agg(status || '=' || n, ' ') from (select status, count(*) n from subtasks where task_id = '$TASK' group by status) s")" >&2
printf '[bench-cluster] campaign: %.1f s from the task to the last subtask\n' "$(echo "$finished - $began" | bc)" >&2
printf '[bench-cluster] kill to survivors owning every orphaned subtask: %.1f s (lease 15 s)\n' "$(echo "$owned - $killed" | bc)" >&2
for n in $(seq 1 "$INSTANCES"); do
  if [ "$n" -eq "$VICTIM" ]; then
    echo "[bench-cluster] peak RSS updraft-$n: ${VICTIM_RSS} MiB (until killed)" >&2
  else
    echo "[bench-cluster] peak RSS updraft-$n: $(peak_rss_mib "${INSTANCE_PIDS[$n]}") MiB" >&2
  fi
done
grep -h 'stopped beating' "$WORK"/updraft-*.log | sed 's/^/[bench-cluster] /' >&2 || true
twice_steps=$(q "select count(*) from (select subtask_id from subtask_steps where status = 'Success' and subtask_id in (select id from subtasks where task_id = '$TASK') group by subtask_id having count(*) > 1) d")
echo "[bench-cluster] subtasks driven twice (a second success in a subtask's history): $twice_steps" >&2
echo "[bench-cluster] upgrades installed twice by a device (a new command for the version it had installed): $(sim_field repeated)" >&2
echo "[bench-cluster] upgrade commands received: $(sim_field upgrades) for $DEVICES devices; re-sent after a reconnect and answered with success: $(sim_field duplicates)" >&2
echo "[bench-cluster] server errors logged: $(cat "$WORK"/updraft-*.log | grep -c ' ERROR ' || true)" >&2
