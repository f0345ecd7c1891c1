#!/usr/bin/env bash
# scripts/e2e.sh: starts the built `updraft` on a free port with a throw-away data directory, runs the
# Playwright suite in Debian's headless Chromium, then stops the server with SIGTERM and checks that it
# exits cleanly within 5 seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET_DIR/debug/updraft"
[ -x "$BIN" ] || { echo "missing $BIN: run 'cargo build -p server' (or the tests) first" >&2; exit 1; }
DATA="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
# The upgrade test runs `updraft sim` devices, which need the MQTT port and the data directory (CA, DB).
MQTT_PORT="$(free_port)"
export E2E_PASSWORD="e2e-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
LOG="$DATA/server.log"

UPDRAFT_DATA_DIR="$DATA" UPDRAFT_SITE_ROOT="$ROOT/target/site" UPDRAFT_HTTP__LISTEN="127.0.0.1:$PORT" \
  UPDRAFT_MQTT__LISTEN="127.0.0.1:$MQTT_PORT" UPDRAFT_MQTT__TLS_LISTEN="127.0.0.1:0" UPDRAFT_LWM2M__LISTEN="127.0.0.1:0" UPDRAFT_LWM2M__DTLS_LISTEN="127.0.0.1:0" \
  UPDRAFT_ADMIN__PASSWORD="$E2E_PASSWORD" "$BIN" serve >"$LOG" 2>&1 &
PID=$!
cleanup() { kill "$PID" 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -skf "https://127.0.0.1:$PORT/healthz" >/dev/null && break
  kill -0 "$PID" 2>/dev/null || { cat "$LOG"; echo "server exited" >&2; exit 1; }
  sleep 0.1
done

cd "$ROOT/end2end"
status=0
BASE_URL="https://127.0.0.1:$PORT" UPDRAFT_BIN="$BIN" E2E_DATA_DIR="$DATA" E2E_MQTT_PORT="$MQTT_PORT" \
  npx playwright test || status=$?

kill -TERM "$PID"
for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$PID" 2>/dev/null; then
  echo "server did not stop within 5 s of SIGTERM" >&2; cat "$LOG"; exit 1
fi
wait "$PID" || { echo "server exited with an error after SIGTERM" >&2; cat "$LOG"; exit 1; }
[ "$status" = 0 ] || { echo "--- server log ---" >&2; tail -50 "$LOG" >&2; }
exit "$status"
