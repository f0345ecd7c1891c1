#!/usr/bin/env bash
# scripts/build-site.sh: builds the console's hydrate bundle into target/site/pkg (wasm + JS glue + CSS).
# The server binary is built separately (cargo); both read target/site at run time.
# RUSTC_BOOTSTRAP=1 is needed for -Zbuild-std. It also changes how proc-macro2 builds (its build script
# watches that variable), so the wasm build gets a target directory of its own: sharing one with the host
# build made every switch between the two rebuild proc-macro2, syn and nearly everything after them.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
WASM_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/wasm-build"
NAME=updraft
SITE="$ROOT/target/site"
PKG="$SITE/pkg"
if [ "${1:-}" = "--release" ]; then PROFILE_ARGS=(--profile wasm-release); DIR=wasm-release; else PROFILE_ARGS=(--profile wasm-dev); DIR=wasm-dev; fi

CARGO_TARGET_DIR="$WASM_TARGET_DIR" RUSTC_BOOTSTRAP=1 cargo build -p frontend --lib --target wasm32-unknown-unknown \
  -Z build-std=std,panic_abort "${PROFILE_ARGS[@]}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
wasm-bindgen --target web --no-typescript --out-dir "$tmp" --out-name "$NAME" \
  "$WASM_TARGET_DIR/wasm32-unknown-unknown/$DIR/frontend.wasm"
# Leptos asks for NAME.wasm when LEPTOS_OUTPUT_NAME was set at compile time (.cargo/config.toml), else
# NAME_bg.wasm; serve both names (a hard link, no copy).
mkdir -p "$PKG"
cp "$tmp/${NAME}_bg.wasm" "$PKG/$NAME.wasm.new" && mv "$PKG/$NAME.wasm.new" "$PKG/$NAME.wasm"
ln -f "$PKG/$NAME.wasm" "$PKG/${NAME}_bg.wasm"
rm "$tmp/${NAME}_bg.wasm" 2>/dev/null || true
cp -r "$tmp"/. "$PKG"/   # the JS glue, and snippets/ if any crate has inline JS
cp style/main.css "$PKG/$NAME.css"
cp style/favicon.svg "$PKG/favicon.svg"
echo "site: $(du -h "$PKG/$NAME.wasm" | cut -f1) wasm in $PKG" >&2
