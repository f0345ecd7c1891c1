#!/usr/bin/env bash
# scripts/chaos.sh: the crash benchmark (`make chaos`; release build, not part of CI). A release
# `updraft serve` on a fresh data directory, N simulated MQTT devices (default 5 000) in another process,
# one task; the server is killed with SIGKILL at K random moments (default 3) and started again on the
# same data directory each time. Prints, for each kill, what was done then and how long the restarted
# server took to finish (or to be killed again), the outcome counts, the devices asked to run the upgrade
# twice (must be 0), and whether the task's counters equal its rows.
#
#   scripts/chaos.sh [DEVICES] [KILLS]
#   CHAOS_DATABASE_URL=postgres://user:pass@127.0.0.1/db scripts/chaos.sh   # on PostgreSQL (emptied first)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DEVICES="${1:-5000}"
KILLS="${2:-3}"
ulimit -n "$(ulimit -Hn)"
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
export UPDRAFT_LWM2M__LISTEN="127.0.0.1:$(free_port)"
export UPDRAFT_LWM2M__DTLS_LISTEN="127.0.0.1:$(free_port)"
export UPDRAFT_ADMIN__PASSWORD="chaos-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
export UPDRAFT_LOG__FILTER="${UPDRAFT_LOG__FILTER:-warn}"
DB_KIND=SQLite
if [ -n "${CHAOS_DATABASE_URL:-}" ]; then
  DB_KIND=PostgreSQL
  export UPDRAFT_DATABASE__URL="$CHAOS_DATABASE_URL"
  psql -q "$CHAOS_DATABASE_URL" -c 'DROP SCHEMA public CASCADE; CREATE SCHEMA public;' >/dev/null
fi
SERVER_PID=""; SIM_PID=""
cleanup() {
  [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null || true
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "[chaos] kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

start_server() {
  "$BIN" serve >>"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    [ "$(grep -c 'Updraft is running' "$WORK/server.log")" -ge "$1" ] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  tail -30 "$WORK/server.log"; exit 1
}

# Subtask counts by status, and whether the task row's counters equal them: "status=count ... | counters ok".
tally() {
  python3 - "$1" <<'PY'
import json, os, sys, subprocess, collections
task = sys.argv[1]
url = os.environ.get("CHAOS_DATABASE_URL")
q_rows = f"select status, count(*) from subtasks where task_id = '{task}' group by status"
q_task = f"select total, success, fail, processing, waitting, fail_wait_retry, stopped from tasks where id = '{task}'"
if url:
    run = lambda q: [l.split("|") for l in subprocess.run(["psql", "-At", url, "-c", q], capture_output=True, text=True, check=True).stdout.split()]
else:
    import sqlite3
    db = sqlite3.connect(os.path.join(os.environ["UPDRAFT_DATA_DIR"], "updraft.db"))
    run = lambda q: [[str(c) for c in r] for r in db.execute(q).fetchall()]
rows = collections.Counter({s: int(n) for s, n in run(q_rows)})
t = [int(x) for x in run(q_task)[0]]
expect = [sum(rows.values()), rows["Success"], rows["Fail"], rows["Processing"], rows["Waitting"], rows["FailWaitRetry"], rows["Stopped"]]
terminal = rows["Success"] + rows["Fail"] + rows["Stopped"]
print(" ".join(f"{k}={v}" for k, v in sorted(rows.items())), "| terminal", terminal, "of", sum(rows.values()),
      "| counters", "ok" if t == expect else f"DIFFER: task {t} rows {expect}")
PY
}

start_server 1
"$BIN" product add --id chaos --name Chaos --json >/dev/null
head -c 262144 /dev/urandom >"$WORK/app-2.0.bin"
PACKAGE=$("$BIN" package upload "$WORK/app-2.0.bin" --product chaos --version 2.0 | awk '/uploaded package/ {print $3}')
GROUP=$("$BIN" group add --name chaos --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["group_id"])')
echo "[chaos] $DB_KIND: registering and connecting $DEVICES simulated devices" >&2
"$BIN" sim mqtt --devices "$DEVICES" --prefix chaos- --product chaos --register >"$WORK/sim.log" 2>&1 &
SIM_PID=$!
for _ in $(seq 1 3000); do
  connected=$( (grep -o 'connected [0-9]*' "$WORK/sim.log" || true) | tail -1 | awk '{print $2}')
  [ "${connected:-0}" -ge "$DEVICES" ] && break
  kill -0 "$SIM_PID" 2>/dev/null || { cat "$WORK/sim.log"; exit 1; }
  sleep 0.2
done
"$BIN" group add-devices "$GROUP" $(seq -f "chaos-%05g" 0 $((DEVICES - 1))) >/dev/null
TASK=$("$BIN" task create --name chaos --package "$PACKAGE" --group "$GROUP" --json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["task_id"])')
began=$(date +%s.%N)
echo "[chaos] task $TASK created; $KILLS kills at random moments" >&2

all_terminal() { tally "$TASK" | grep -q "terminal $DEVICES of $DEVICES"; }
for k in $(seq 1 "$KILLS"); do
  # A random moment within the next 2-8 s (the campaign takes tens of seconds).
  delay=$(python3 -c 'import random; print(round(random.uniform(2, 8), 1))')
  sleep "$delay"
  kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  echo "[chaos] kill $k (SIGKILL, ${delay} s after the previous start): $(tally "$TASK")" >&2
  restarted=$(date +%s.%N)
  start_server $((k + 1))
  if [ "$k" -lt "$KILLS" ]; then continue; fi
  while ! all_terminal; do sleep 0.5; done
  printf '[chaos] after kill %s: every subtask terminal %.1f s after the restart (%.1f s after the task began)\n' \
    "$k" "$(echo "$(date +%s.%N) - $restarted" | bc)" "$(echo "$(date +%s.%N) - $began" | bc)" >&2
done
sleep 3 # the simulator prints every 2 s
echo "[chaos] final: $(tally "$TASK")" >&2
echo "[chaos] simulator: $(tail -1 "$WORK/sim.log")" >&2
twice=$(tail -1 "$WORK/sim.log" | awk '{for (i=1;i<NF;i++) if ($i=="repeated") print $(i+1)}')
upgrades=$(tail -1 "$WORK/sim.log" | awk '{for (i=1;i<NF;i++) if ($i=="upgrades") print $(i+1)}')
dups=$(tail -1 "$WORK/sim.log" | awk '{for (i=1;i<NF;i++) if ($i=="duplicates") print $(i+1)}')
echo "[chaos] upgrades run twice (a new command for the version a device had installed; must be 0): $twice" >&2
echo "[chaos] downloads started: $upgrades for $DEVICES devices; re-sent commands crossing a final report (answered with success): $dups" >&2
echo "[chaos] server errors logged: $(grep -c -E ' ERROR ' "$WORK/server.log" || true)" >&2
