#!/usr/bin/env bash
# scripts/api-fuzz.sh: schemathesis (PyPI) against Updraft's /v5/openapi.json for API_FUZZ_SECONDS (default
# 300). Starts Updraft (the dev build `make run` uses) on free loopback ports in a scratch data directory,
# creates an AK/SK with `updraft credentials create`, and sends every generated request through
# scripts/api-fuzz/sign_proxy.py, which signs it with Huawei's own SDK signer (huaweicloudsdkcore) so it
# reaches the handlers. Fails when any response is a server error (5xx) or the server log shows a panic.
# Usage: make api-fuzz [API_FUZZ_SECONDS=300]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUN_SECONDS="${API_FUZZ_SECONDS:-300}"
VENV="${HOME}/.cache/updraft/schemathesis-venv"
log() { printf '[api-fuzz] %s\n' "$*" >&2; }

if ! "$VENV/bin/python" -c 'import schemathesis, huaweicloudsdkcore' 2>/dev/null; then
  log "installing schemathesis and huaweicloudsdkcore into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'schemathesis==4.32.5' 'huaweicloudsdkcore==3.1.219'
fi

cd "$ROOT"
cargo build --quiet -p server --bin updraft
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/updraft"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP_PORT="$(free_port)"
PROXY_PORT="$(free_port)"

export UPDRAFT_DATA_DIR="$WORK/data"
export UPDRAFT_HTTP__LISTEN="127.0.0.1:$HTTP_PORT"
export UPDRAFT_MQTT__ENABLED=false
export UPDRAFT_LWM2M__ENABLED=false
export UPDRAFT_ADMIN__PASSWORD="api-fuzz-password"
export UPDRAFT_LOG__FILTER=warn
"$BIN" serve >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  curl -sfk "https://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sfk "https://127.0.0.1:$HTTP_PORT/healthz" >/dev/null || { cat "$WORK/server.log" >&2; exit 1; }

CREDS="$("$BIN" --json credentials create --description api-fuzz)"
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])" <<<"$CREDS"; }
PROJECT="$(field project_id)"
"$VENV/bin/python" "$ROOT/scripts/api-fuzz/sign_proxy.py" "$PROXY_PORT" "https://127.0.0.1:$HTTP_PORT" \
  "$WORK/data/tls/ca.pem" "$(field access_key)" "$(field secret_key)" "$PROJECT" &
PIDS+=($!)
sleep 1

log "schemathesis for ${RUN_SECONDS}s against https://127.0.0.1:$HTTP_PORT (signed through :$PROXY_PORT)"
status=0
"$VENV/bin/schemathesis" run "http://127.0.0.1:$PROXY_PORT/v5/openapi.json" \
  --checks not_a_server_error --max-time "$RUN_SECONDS" --workers 2 --no-color || status=$?
if grep -q "panicked" "$WORK/server.log"; then
  log "the server panicked:"
  grep -A5 "panicked" "$WORK/server.log" >&2
  status=1
fi
exit "$status"
