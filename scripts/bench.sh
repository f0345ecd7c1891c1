#!/usr/bin/env bash
# scripts/bench.sh: download benchmarks (`make bench`). Installs Debian's nginx if missing, builds the
# release `updraft` and the bench client (a cold release build takes ~25 min on 2 cores), then runs
# server/examples/bench_downloads.rs: throughput against nginx (same file, same certificate) and peak
# RSS with 1 000 downloads held open. Extra arguments go to the bench (`make bench ARGS="--rounds 9"`).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if [ ! -x /usr/sbin/nginx ]; then
  echo "[bench] apt-get install nginx-light" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx-light >/dev/null
fi
# 1 000 client connections plus 1 000 server connections in one run.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --bin updraft --example bench_downloads
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
"$TARGET/release/examples/bench_downloads" --updraft "$TARGET/release/updraft" "$@"
