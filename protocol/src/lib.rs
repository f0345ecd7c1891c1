//! Updraft's pure wire codecs. No sockets, no clock, no knowledge of the database.
//!
//! - [`apisign`]: IoTDA application request signing (`SDK-HMAC-SHA256`, `V11-HMAC-SHA256`).
//! - [`lwm2m`]: LwM2M registration parameters and resource values (OMA-TLV, text, SenML JSON).
//! - [`mqtt_auth`]: IoTDA's MQTT device login (client id layout and the HMAC-SHA256 password).
//! - [`ota`]: IoTDA's MQTT `$ota` events: topics, tolerant uplink parsing, downlink events.
//! - [`pcp`]: Huawei's PCP frames (software upgrades of LwM2M/CoAP devices) with its check code.

pub mod apisign;
pub mod lwm2m;
pub mod mqtt_auth;
pub mod ota;
pub mod pcp;
