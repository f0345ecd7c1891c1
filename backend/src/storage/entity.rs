//! sea-orm entities, one module per table. The schema and its reasons live in the `migrations` crate;
//! these structs mirror it column for column (times are milliseconds since the epoch).
#![allow(missing_docs, unreachable_pub)]

pub mod api_credentials;
pub mod applications;
pub mod audit_logs;
pub mod device_group_members;
pub mod device_groups;
pub mod device_messages;
pub mod devices;
pub mod download_slots;
pub mod download_tokens;
pub mod instances;
pub mod notification_deliveries;
pub mod notification_subscriptions;
pub mod outbox;
pub mod packages;
pub mod products;
pub mod projects;
pub mod routing_rules;
pub mod sessions;
pub mod subtask_steps;
pub mod subtasks;
pub mod tasks;
pub mod users;
