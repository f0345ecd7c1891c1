//! The `updraft` binary's library: everything between the command line and the services.
//!
//! - [`cli`]: the command line (`updraft serve` is the default).
//! - [`config`]: [`Settings`](config::Settings) from defaults, `updraft.toml` and `UPDRAFT_*`.
//! - [`telemetry`]: the `tracing` subscriber.
//! - [`tls`]: the local CA and server certificate, or operator-provided PEM files.
//! - [`startup`]: [`Application`](startup::Application), built as a value and run until a signal.
//! - [`http`]: the router, sign-in and the request guards.
//! - [`sim`]: simulated MQTT devices (`updraft sim mqtt`), also used by the tests and benchmarks.
// Rendering the console nests Leptos view types deeper than the default limit of 128.
#![recursion_limit = "256"]

pub mod accept;
pub mod budget;
pub mod cli;
pub mod config;
pub mod http;
pub mod sim;
pub mod startup;
pub mod telemetry;
pub mod tls;
