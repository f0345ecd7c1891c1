//! Integration tests of the `updraft` server over real HTTPS on 127.0.0.1 port 0, with real SQLite
//! files. All suites build into one test binary.

mod api;
mod binary;
mod cluster;
mod coaps;
mod compat;
mod console;
mod console_tasks;
mod device_compat;
mod firmware;
mod hardening;
mod helpers;
mod lwm2m;
mod metrics;
mod notifications;
mod packages;
mod robustness;
mod rollouts;
mod sdk;
mod tasks;
