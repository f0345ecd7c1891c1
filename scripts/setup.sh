#!/usr/bin/env bash
# scripts/setup.sh: installs what a fresh Debian 12 machine of this project's kind lacks, idempotently.
# A no-op re-run takes about a second. Only apt, cargo and npm clients are used; nothing else is downloaded.
#
#   * Debian's rustc-web/cargo-web 1.96 (the only Rust here that builds wasm32, with -Zbuild-std from
#     rust-web-src), rust-web-llvm + lld-22 (rust-lld), rust-web-clippy
#   * a rustup toolchain `debian-web` linked to /usr, selected by rust-toolchain.toml
#   * wasm-bindgen-cli at exactly the version of the wasm-bindgen crate in Cargo.lock
#   * Debian's chromium and the end2end npm packages (Playwright without a browser download)
#   * cargo-nextest if missing
#   * moto_server (an S3-compatible server the tests start), in a private venv if not on PATH
#   * huaweicloudsdkiotda (Huawei's application SDK, for the API compatibility test) and paho-mqtt (an
#     independent MQTT 3.1/5.0 client, for the device-login tests), in a private venv
#
# Never Debian's binaryen: its wasm-opt 108 silently breaks the hydrate bundle.
# Env: SKIP_BROWSER=1 skips chromium and npm (build-only machines).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLCHAIN=debian-web
MIN_RUSTC_MINOR=94
export DEBIAN_FRONTEND=noninteractive
log() { printf '[setup] %s\n' "$*" >&2; }
SECONDS=0
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

# --- apt ------------------------------------------------------------------------------------------
# libssl-dev and pkg-config: rust-openssl, for CoAPS (DTLS with PSK); libcoap3-bin: the tests' independent
# CoAPS client (coap-client-openssl); python3-prometheus-client: the /metrics tests' independent parser;
# tzdata: the time zones of rollouts' maintenance windows.
pkgs=(rustc-web cargo-web rust-web-src rust-web-llvm lld-22 rust-web-clippy libssl-dev pkg-config libcoap3-bin python3-prometheus-client tzdata)
[ "${SKIP_BROWSER:-0}" = 1 ] || pkgs+=(chromium)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
minor=$(/usr/bin/rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
if [ "$minor" -lt "$MIN_RUSTC_MINOR" ]; then
  log "ERROR: /usr/bin/rustc is $(/usr/bin/rustc --version); need >= 1.$MIN_RUSTC_MINOR (bookworm-security must be in apt sources)"
  exit 1
fi
[ -x /usr/bin/rust-lld ] || { log "ERROR: /usr/bin/rust-lld missing (rust-web-llvm + lld-22)"; exit 1; }
[ -f /usr/lib/rustlib/src/rust/library/Cargo.lock ] || { log "ERROR: rust-web-src missing"; exit 1; }
if [ -x /usr/bin/wasm-opt ] && /usr/bin/wasm-opt --version 2>/dev/null | grep -qE 'version 1(0[0-9]|1[0-5])\b'; then
  log "WARNING: Debian's wasm-opt ($(/usr/bin/wasm-opt --version)) is installed; Updraft never runs it, but other tools might."
fi

# --- rustup linked toolchain ----------------------------------------------------------------------
if command -v rustup >/dev/null 2>&1; then
  if ! rustup toolchain list | awk '{print $1}' | grep -qx "$TOOLCHAIN"; then
    log "rustup toolchain link $TOOLCHAIN /usr"
    rustup toolchain link "$TOOLCHAIN" /usr
  fi
  CARGO=(cargo "+$TOOLCHAIN")
else
  export PATH="/usr/bin:$PATH"
  CARGO=(/usr/bin/cargo)
fi

# --- cargo tools ----------------------------------------------------------------------------------
wbg=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/version = |"/,""); print; exit}' "$ROOT/Cargo.lock")
have=$( (wasm-bindgen --version 2>/dev/null || true) | awk '{print $2}')
if [ "$have" != "$wbg" ]; then
  log "cargo install wasm-bindgen-cli $wbg (about 4 minutes on 2 cores)"
  # --locked first; this registry mirror sometimes lacks a locked transitive version, so fall back.
  "${CARGO[@]}" install wasm-bindgen-cli --version "=$wbg" --locked --force \
    || "${CARGO[@]}" install wasm-bindgen-cli --version "=$wbg" --force
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "cargo install cargo-nextest"
  "${CARGO[@]}" install cargo-nextest --locked
fi
if ! cargo +stable fmt --version >/dev/null 2>&1; then
  log "WARNING: rustup's stable rustfmt is missing; 'make fmt' and the format check need it"
fi

# --- S3-compatible server for the tests (moto) ---------------------------------------------------
# The S3 tests start a real `moto_server`. Use one on PATH, else install it into a private venv.
MOTO_VENV="${HOME}/.cache/updraft/moto-venv"
if ! command -v moto_server >/dev/null 2>&1 && [ ! -x "$MOTO_VENV/bin/moto_server" ]; then
  log "installing moto[server] into $MOTO_VENV (S3-compatible server for the tests)"
  python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.2.1'
fi

# --- Huawei's IoTDA application SDK (the API compatibility test drives Updraft with it) -------------
IOTDA_VENV="${HOME}/.cache/updraft/iotda-venv"
# Eclipse Paho (paho-mqtt) beside it: the independent MQTT 3.1 / 5.0 client of the device-login tests.
if [ ! -x "$IOTDA_VENV/bin/python" ] || ! "$IOTDA_VENV/bin/python" -c 'import huaweicloudsdkiotda, paho.mqtt' 2>/dev/null; then
  log "installing huaweicloudsdkiotda and paho-mqtt into $IOTDA_VENV (the official SDK and an independent MQTT client, for the tests)"
  python3 -m venv "$IOTDA_VENV"
  "$IOTDA_VENV/bin/pip" install --quiet --disable-pip-version-check 'huaweicloudsdkiotda==3.1.219' 'paho-mqtt==2.1.0'
fi

# --- end2end --------------------------------------------------------------------------------------
if [ "${SKIP_BROWSER:-0}" != 1 ]; then
  cd "$ROOT/end2end"
  if [ ! -d node_modules/@playwright/test ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    log "npm ci in end2end/"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
  fi
fi
log "ready in ${SECONDS}s: $(/usr/bin/rustc --version), wasm-bindgen $(wasm-bindgen --version | awk '{print $2}')"
