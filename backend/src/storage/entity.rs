//! sea-orm entities, one module per table. The schema and its reasons live in the `migrations` crate;
//! these structs mirror it column for column (times are milliseconds since the epoch).
#![allow(missing_docs, unreachable_pub)]

pub mod projects;
pub mod applications;
pub mod users;
pub mod sessions;
pub mod api_credentials;
pub mod products;
pub mod devices;
pub mod device_groups;
pub mod device_group_members;
pub mod packages;
pub mod tasks;
pub mod subtasks;
pub mod subtask_steps;
pub mod download_tokens;
pub mod notification_subscriptions;
pub mod outbox;
pub mod notification_deliveries;
