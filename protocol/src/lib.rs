//! Updraft's pure wire codecs. No sockets, no clock, no knowledge of the database.
//!
//! - [`mqtt_auth`]: IoTDA's MQTT device login (client id layout and the HMAC-SHA256 password).
//!
//! The `$ota` JSON events, PCP frames and LwM2M helpers join this crate with the pipelines that use them.

pub mod mqtt_auth;
