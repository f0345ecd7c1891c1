//! Updraft's services and adapters: the imperative shell around the pure `domain` and `protocol` crates.
//!
//! - [`clock`]: the injected [`Clock`](clock::Clock): the real one, and a manual one for tests.
//! - [`secrets`]: authenticated encryption of device secrets and AK/SK with a key kept outside the database.
//! - [`ids`]: generation of ids, tokens and passwords from the operating system's random source.
//! - [`objects`]: the package store (a local directory or an S3 bucket), streaming in both directions.
//! - [`db`]: connecting to SQLite (WAL) or PostgreSQL.
//! - [`storage`]: sea-orm entities for every table.
//! - [`service`]: the operations the console, the API and the command line share (auth, projects, products,
//!   devices, groups, overview).
//! - [`cluster`]: several instances on one PostgreSQL: heartbeats, leases, taking over from dead ones.
//! - [`driver`]: the task driver, which runs every subtask's state machine against the database.
//! - [`coap`]: the device CoAP endpoint (LwM2M registration, PCP over `/19/0/0` and `/19/1/0`, coverage reads).
//! - [`mqtt`]: the device MQTT endpoint (IoTDA login, `$oc` system topics, ACLs) on an embedded rumqttd.
//! - [`notify`]: push notifications to subscribed applications (signed, retried, in order per task).
//! - [`state`]: [`AppState`](state::AppState), what every handler and server function receives.
//! - [`error`]: the service [`Error`](error::Error).
#![warn(missing_docs)]

pub mod clock;
pub mod cluster;
pub mod coap;
pub mod context;
pub mod db;
pub mod driver;
pub mod error;
pub mod hashing;
pub mod ids;
pub mod metrics;
pub mod mqtt;
pub mod notify;
pub mod objects;
pub mod secrets;
pub mod service;
pub mod settings;
pub mod state;
pub mod storage;
pub mod tokens;

pub use context::Context;
pub use error::{Error, Result};
pub use state::AppState;
