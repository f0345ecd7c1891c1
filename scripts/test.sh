#!/usr/bin/env bash
# scripts/test.sh: every check, in the order that fails fastest. Called by `make test` and CI.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SECONDS=0
WASM_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/wasm-build"
step() { printf '\n== %s (%ds)\n' "$*" "$SECONDS" >&2; }

step "format"
cargo +stable fmt --all --check

step "pure crates stay pure"
# (coap-lite is allowed: it is a sans-I/O CoAP message codec, no_std-capable, with no sockets.)
for crate in domain protocol; do
  if cargo tree -p "$crate" -e normal --prefix none | grep -E '^(tokio|sea-orm|sqlx|axum|hyper|rumqttd|object_store|mio|socket2) '; then
    echo "$crate must not depend on I/O crates (above)" >&2
    exit 1
  fi
done

step "no import circles between modules"
scripts/circles.py --self-test
scripts/circles.py backend/src server/src app/src domain/src protocol/src

step "clippy: host crates (app with ssr)"
cargo clippy --workspace --exclude frontend --all-targets -- -D warnings

step "clippy: wasm32 (frontend, app with hydrate, domain)"
CARGO_TARGET_DIR="$WASM_TARGET_DIR" RUSTC_BOOTSTRAP=1 cargo clippy -p frontend --target wasm32-unknown-unknown -Z build-std=std,panic_abort -- -D warnings

step "unit and integration tests${UPDRAFT_TEST_POSTGRES_URL:+ (with PostgreSQL)}"
cargo nextest run --workspace --exclude frontend --no-fail-fast

step "console bundle"
scripts/build-site.sh

step "end2end (headless Chromium)"
scripts/e2e.sh

step "all checks passed"
