# Updraft. Quick start: `make run`, `make test`. Both set up the machine first (scripts/setup.sh).
SHELL := bash
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
UPDRAFT := $(TARGET_DIR)/debug/updraft
# The wasm build needs RUSTC_BOOTSTRAP=1, which must not touch host artifacts: its own target directory.
WASM_TARGET_DIR := $(TARGET_DIR)/wasm-build

.PHONY: setup server site run test bench bench-tasks chaos probe bench-lwm2m bench-dtls-eval bench-console cluster bench-cluster fuzz api-fuzz check fmt fmt-check clippy purity circles unit e2e clean-data

setup:
	@scripts/setup.sh

server: setup
	cargo build -p server --bin updraft

site: setup
	scripts/build-site.sh

## Build (first time: ~15 min on 2 cores), then start Updraft with embedded defaults under ./data.
run: server site
	$(UPDRAFT) serve

## Everything CI checks: format, crate purity, import circles, clippy per feature set, unit + integration tests
## (SQLite always, PostgreSQL when UPDRAFT_TEST_POSTGRES_URL is set), then end2end in headless Chromium.
test: setup
	scripts/test.sh

## Download benchmarks against nginx (release build; not part of `make test`).
bench: setup
	scripts/bench.sh $(ARGS)

## Upgrade-task benchmark: 10 000 simulated MQTT devices, one task (release build; `ARGS=2000` for fewer).
bench-tasks: setup
	scripts/bench-tasks.sh $(ARGS)

## Crash benchmark: 5 000 simulated MQTT devices, one task, the server SIGKILLed 3 times and restarted
## (release build): time to completion, outcomes, upgrades run twice, counters against rows. On SQLite, then
## on PostgreSQL when CHAOS_POSTGRES_URL is set. `ARGS="300 2"` for a quick look.
chaos: setup
	scripts/chaos.sh $(ARGS)
	@if [ -n "$${CHAOS_POSTGRES_URL:-}" ]; then CHAOS_DATABASE_URL="$$CHAOS_POSTGRES_URL" scripts/chaos.sh $(ARGS); fi

## Hostile-client probe: slowloris, sign-in floods, MQTT subscription flood, oversize pre-auth requests,
## CoAP flood, spoofed LwM2M updates, all during a 1 000-device campaign (release build; exits 1 on a
## regression or a peak RSS of 1 GiB). `BIN=path/to/updraft` skips the build.
probe: setup
	scripts/probe.sh $(ARGS)

## LwM2M/PCP benchmark: segments served per second, and a 5 000-device, 100-cell campaign (release build).
bench-lwm2m: setup
	cargo run --release -p server --example bench_lwm2m -- $(ARGS)

## DTLS library evaluation: OpenSSL and dimpl (pure Rust) as the CoAPS server against an OpenSSL client:
## interop, CPU per handshake and per record (release build; its own workspace, sharing target/).
bench-dtls-eval: setup
	CARGO_TARGET_DIR=$(CURDIR)/target cargo run --release --manifest-path scripts/dtls-eval/Cargo.toml

## Console: the task detail page of a 100 000-device task, timed over HTTPS (release build).
bench-console: setup
	cargo run --release -p server --example bench_console -- $(ARGS)

## A local deployment: PostgreSQL, an S3-compatible server, 3 instances, HAProxy (HTTPS, MQTT) and nginx
## (CoAP over UDP) in front; prints the addresses, Ctrl-C stops everything. `INSTANCES=2`, `BIN=...`.
cluster: setup
	scripts/cluster.sh

## Scale-out benchmark: `make cluster`'s deployment, 15 000 MQTT devices through HAProxy, one task, one instance
## SIGKILLed mid-campaign (release build): time, peak RSS per instance, takeover time, subtasks driven twice.
bench-cluster: setup
	scripts/bench-cluster.sh $(ARGS)

## Fuzz the PCP decoder and the CoAP request handling, 5 minutes each (nightly + cargo-fuzz).
fuzz: setup
	scripts/fuzz.sh

api-fuzz: setup
	scripts/api-fuzz.sh

fmt:
	cargo +stable fmt --all

fmt-check:
	cargo +stable fmt --all --check

clippy: setup
	cargo clippy --workspace --exclude frontend --all-targets -- -D warnings
	CARGO_TARGET_DIR="$(WASM_TARGET_DIR)" RUSTC_BOOTSTRAP=1 cargo clippy -p frontend --target wasm32-unknown-unknown -Z build-std=std,panic_abort -- -D warnings

## Import circles between modules (`scripts/circles.py`; also part of `make test`).
circles:
	scripts/circles.py --self-test
	scripts/circles.py backend/src server/src app/src domain/src protocol/src

unit: setup
	cargo nextest run --workspace --exclude frontend

e2e: setup site
	scripts/e2e.sh

clean-data:
	rm -rf data
