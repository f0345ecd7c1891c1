#!/usr/bin/env bash
# scripts/fuzz.sh: runs each libFuzzer target for FUZZ_SECONDS (default 300) with cargo-fuzz on the nightly
# toolchain (installed by rustup here; cargo-fuzz is installed on first use, ~3 min). A crash stops the run
# with a non-zero exit and leaves the input under fuzz/artifacts/<target>/.
# Usage: make fuzz [FUZZ_SECONDS=300] [TARGETS="pcp_decode coap_request"]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SECONDS_EACH="${FUZZ_SECONDS:-300}"
TARGETS="${TARGETS:-pcp_decode coap_request}"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "[fuzz] cargo install cargo-fuzz (nightly)" >&2
  cargo +nightly install cargo-fuzz --locked
fi
cd "$ROOT/fuzz"
for target in $TARGETS; do
  echo "[fuzz] $target for ${SECONDS_EACH}s" >&2
  mkdir -p "corpus/$target"
  cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$SECONDS_EACH" -print_final_stats=1
done
