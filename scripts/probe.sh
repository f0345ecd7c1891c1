#!/usr/bin/env bash
# scripts/probe.sh: the hostile-client probe (`make probe`; release build, not part of CI). A release
# `updraft serve` on a fresh data directory runs an upgrade campaign for N simulated MQTT devices (default
# 1 000, in another process, as scripts/chaos.sh does) while scripts/probe.py attacks it: slowloris on the
# HTTPS port, sign-in floods, an MQTT subscription flood, a device named `updraft`, oversize requests before
# authentication, a CoAP flood and spoofed LwM2M updates. Each check prints one
# `[probe] PASS|FAIL <name>: <numbers>` line; the last ones are that the campaign still finished (every
# subtask terminal, all succeeded) and the server's peak RSS and open descriptors. Exits 1 when a check
# failed or the peak RSS reached 1 GiB.
#
#   scripts/probe.sh [DEVICES]
#   BIN=target/release/updraft scripts/probe.sh     # an existing binary, no build
#   KEEP=1 scripts/probe.sh                         # keep the data directory and the logs
#   PROBE_OLD=1 BIN=... scripts/probe.sh            # a binary older than http.header_timeout/handshake_timeout
#   PROBE_CAMPAIGN_WAIT=120 scripts/probe.sh        # wait at most 120 s (default 600) for the campaign
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DEVICES="${1:-1000}"
ulimit -n "$(ulimit -Hn)"
if [ -z "${BIN:-}" ]; then
  cargo build --release --bin updraft
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/updraft"
fi
if [ ! -x "$BIN" ]; then
  echo "[probe] no updraft binary at $BIN: run \`make probe\` (it builds one) or set BIN=/path/to/updraft" >&2
  exit 2
fi
WORK="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
secret() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }
export UPDRAFT_DATA_DIR="$WORK/data"
export UPDRAFT_HTTP__LISTEN="127.0.0.1:$(free_port)"
export UPDRAFT_MQTT__LISTEN="127.0.0.1:$(free_port)"
export UPDRAFT_MQTT__TLS_LISTEN="127.0.0.1:$(free_port)"
export UPDRAFT_LWM2M__LISTEN="127.0.0.1:$(free_port)"
export UPDRAFT_LWM2M__DTLS_LISTEN="127.0.0.1:$(free_port)"
export UPDRAFT_ADMIN__PASSWORD="probe-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
export UPDRAFT_LOG__FILTER="${UPDRAFT_LOG__FILTER:-warn}"
if [ -z "${PROBE_OLD:-}" ]; then
  # Slow clients are cut after 5 s (the defaults are 30 s and 10 s).
  export UPDRAFT_HTTP__HEADER_TIMEOUT=5s
  export UPDRAFT_HTTP__HANDSHAKE_TIMEOUT=5s
fi
SERVER_PID=""; SIM_PID=""
cleanup() {
  [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null || true
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "[probe] kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

start_server() {
  "$BIN" serve >>"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    grep -q 'Updraft is running' "$WORK/server.log" && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  tail -30 "$WORK/server.log"; exit 1
}

start_server
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }

# The campaign, as in chaos.sh: product, package, group, N simulated devices, one task.
"$BIN" product add --id campaign --name Campaign --json >/dev/null
head -c 262144 /dev/urandom >"$WORK/app-2.0.bin"
PACKAGE=$("$BIN" package upload "$WORK/app-2.0.bin" --product campaign --version 2.0 | awk '/uploaded package/ {print $3}')
GROUP=$("$BIN" group add --name campaign --json | json_field group_id)

# The probe's own devices: two MQTT devices (one named `updraft`), an LwM2M product (its devices are
# registered by probe.py over the REST API, which sets `secure_access`), and an AK/SK for that API.
PROBE_SUB_SECRET=$(secret); PROBE_UPDRAFT_SECRET=$(secret)
"$BIN" product add --id probe --name Probe --json >/dev/null
"$BIN" device add --product probe --node-id probe-sub --id probe-sub --secret "$PROBE_SUB_SECRET" --json >/dev/null
"$BIN" device add --product probe --node-id updraft --id updraft --secret "$PROBE_UPDRAFT_SECRET" --json >/dev/null
"$BIN" product add --id probecoap --name ProbeCoap --protocol CoAP --json >/dev/null
CREDS=$("$BIN" credentials create --description probe --json)

echo "[probe] registering and connecting $DEVICES simulated devices" >&2
"$BIN" sim mqtt --devices "$DEVICES" --prefix camp- --product campaign --register >"$WORK/sim.log" 2>&1 &
SIM_PID=$!
for _ in $(seq 1 3000); do
  connected=$( (grep -o 'connected [0-9]*' "$WORK/sim.log" || true) | tail -1 | awk '{print $2}')
  [ "${connected:-0}" -ge "$DEVICES" ] && break
  kill -0 "$SIM_PID" 2>/dev/null || { cat "$WORK/sim.log"; exit 1; }
  sleep 0.2
done
"$BIN" group add-devices "$GROUP" $(seq -f "camp-%05g" 0 $((DEVICES - 1))) >/dev/null
TASK=$("$BIN" task create --name probe --package "$PACKAGE" --group "$GROUP" --json | json_field task_id)
echo "[probe] task $TASK created for $DEVICES devices; the hostile checks run meanwhile" >&2

status=0
PROBE_SERVER_PID="$SERVER_PID" PROBE_TASK="$TASK" PROBE_DEVICES="$DEVICES" PROBE_TASK_STARTED="$(date +%s)" \
  PROBE_PROJECT="$(echo "$CREDS" | json_field project_id)" \
  PROBE_AK="$(echo "$CREDS" | json_field access_key)" PROBE_SK="$(echo "$CREDS" | json_field secret_key)" \
  PROBE_SUB_SECRET="$PROBE_SUB_SECRET" PROBE_UPDRAFT_SECRET="$PROBE_UPDRAFT_SECRET" \
  python3 "$ROOT/scripts/probe.py" || status=$?

echo "[probe] simulator: $(tail -1 "$WORK/sim.log")" >&2
echo "[probe] server errors logged: $(grep -c -E ' ERROR ' "$WORK/server.log" || true)" >&2
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  echo "[probe] the server is gone; the end of its log:" >&2
  tail -30 "$WORK/server.log" >&2
  status=1
fi
exit "$status"
