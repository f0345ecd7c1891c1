#!/usr/bin/env bash
# scripts/bench-tasks.sh: the upgrade-task benchmark (`make bench-tasks`). A release `updraft serve` on a
# fresh data directory; `updraft sim mqtt` registers and connects N simulated devices (default 10 000) in
# one other process; one task upgrades them all to a 64 KiB package. Prints the time from task creation
# to every subtask terminal, the task's outcome, and the server's peak RSS (VmHWM).
#
#   scripts/bench-tasks.sh [DEVICES]        e.g. DEVICES=2000 for a quick look
#   ROLLOUT='{"waves": [{"percent": 1}, {"percent": 10}, {"percent": 50}]}' scripts/bench-tasks.sh
#                                           the same task with a rollout (README, "Safe rollouts")
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DEVICES="${1:-10000}"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# BIN=path/to/updraft skips the release build (a quick look with a debug binary, say).
if [ -z "${BIN:-}" ]; then
  cargo build --release --bin updraft
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/updraft"
fi
WORK="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export UPDRAFT_DATA_DIR="$WORK/data"
export UPDRAFT_HTTP__LISTEN="127.0.0.1:$(free_port)"
export UPDRAFT_MQTT__LISTEN="127.0.0.1:$(free_port)"
export UPDRAFT_MQTT__TLS_LISTEN="127.0.0.1:$(free_port)"
export UPDRAFT_ADMIN__PASSWORD="bench-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
export UPDRAFT_LOG__FILTER="${UPDRAFT_LOG__FILTER:-warn}"
SERVER_PID=""; SIM_PID=""
cleanup() {
  [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null || true
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "[bench] kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

"$BIN" serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do grep -q "Updraft is running" "$WORK/server.log" && break; sleep 0.2; done
grep -q "Updraft is running" "$WORK/server.log" || { cat "$WORK/server.log"; exit 1; }

"$BIN" product add --id bench --name Bench --json >/dev/null
head -c 65536 /dev/urandom >"$WORK/app-2.0.bin"
PACKAGE=$("$BIN" package upload "$WORK/app-2.0.bin" --product bench --version 2.0 | awk '/uploaded package/ {print $3}')
GROUP=$("$BIN" group add --name bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["group_id"])')

echo "[bench] registering and connecting $DEVICES simulated devices" >&2
"$BIN" sim mqtt --devices "$DEVICES" --prefix bench- --product bench --register --exit-when-done \
  >"$WORK/sim.log" 2>&1 &
SIM_PID=$!
for _ in $(seq 1 3000); do
  connected=$( (grep -o 'connected [0-9]*' "$WORK/sim.log" || true) | tail -1 | awk '{print $2}')
  [ "${connected:-0}" -ge "$DEVICES" ] && break
  kill -0 "$SIM_PID" 2>/dev/null || { cat "$WORK/sim.log"; exit 1; }
  sleep 0.2
done
echo "[bench] $(tail -1 "$WORK/sim.log")" >&2
"$BIN" group add-devices "$GROUP" $(seq -f "bench-%05g" 0 $((DEVICES - 1))) >/dev/null

start=$(date +%s.%N)
TASK=$("$BIN" task create --name bench --package "$PACKAGE" --group "$GROUP" ${ROLLOUT:+--rollout "$ROLLOUT"} --json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["task_id"])')
while :; do
  line=$("$BIN" task list --json | python3 -c "
import json,sys
t=[t for t in json.load(sys.stdin)['batchtasks'] if t['task_id']=='$TASK'][0]
p=t['task_progress']
print(t['status'], p['total'], p['success'], p['fail'], p['processing'], p['waitting'])")
  set -- $line
  case "$1" in Success|Fail|PartialSuccess|Stopped) break ;; esac
  sleep 0.5
done
end=$(date +%s.%N)
peak=$(awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$SERVER_PID/status")
"$BIN" task show "$TASK" --json | python3 -c "
import json,sys,collections
d=json.load(sys.stdin)['task_details']
c=collections.Counter((t['status'], t['error']['error_code']) for t in d if t['status']!='Success')
print('[bench] unsuccessful (first 500 shown):', dict(c))" >&2
printf '[bench] %s devices: task %s in %.1f s (total %s, success %s, fail %s); server peak RSS %s MiB\n' \
  "$DEVICES" "$1" "$(echo "$end - $start" | bc)" "$2" "$3" "$4" "$peak"
