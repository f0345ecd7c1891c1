//! Updraft's pure core, shared by the server and the browser (it compiles to wasm32).
//!
//! - [`time`]: [`Timestamp`](time::Timestamp), milliseconds since the Unix epoch, and IoTDA's time formats.
//!   There is no clock here: callers pass `now` in.
//! - [`id`]: identifier newtypes with IoTDA's syntax rules ([`DeviceId`](id::DeviceId), [`TaskId`](id::TaskId)...).
//! - [`device`], [`package`], [`task`]: the vocabulary of `design.md` as enums spelled as IoTDA spells them
//!   on the wire (`Waitting` included).
//! - [`flow`]: the per-device upgrade flows as pure state machines (`handle(now, input) -> effects`).
//! - [`text`]: validated free-text values (names, versions, descriptions).
//! - [`rollout`]: safe rollouts: waves, automatic pause, pacing, maintenance windows.
//! - [`throttle`]: the failed-login throttle, a pure sliding window.
//!
//! Every constructor that accepts outside input is a `parse` returning [`ValidationError`], whose message
//! names the field, so the API, the console and the command line report the same thing.

pub mod device;
pub mod flow;
pub mod id;
pub mod net;
pub mod package;
pub mod rollout;
pub mod task;
pub mod text;
pub mod throttle;
pub mod time;

pub use id::{AppId, DeviceId, GroupId, PackageId, ProductId, ProjectId, TaskId, UserId};
pub use time::Timestamp;

/// A value from outside (API body, form field, configuration) that breaks a rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The field as the caller named it (`device_id`, `node_id`, `version`...).
    pub field: String,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl ValidationError {
    /// Builds an error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}
