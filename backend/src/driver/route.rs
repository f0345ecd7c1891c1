//! Messages for devices held by other instances (PostgreSQL, several instances): a transition may be
//! made on any instance (an operator's stop lands on one, a deadline fires on the lease holder), but only
//! the instance holding the device's MQTT connection or LwM2M registration can send to it. [`route`]
//! moves such messages into `device_messages` for that instance, inside the transition's transaction, and
//! wakes it with `NOTIFY` at the commit; [`Driver::drain_queued`] sends what is queued for this one.
//!
//! A message for a device no instance holds is sent (to nobody) here, as on a single instance: devices
//! that are not connected miss messages, and the machines re-send on reconnect.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Set, Statement,
};
use serde::{Deserialize, Serialize};

use super::effects::Outgoing;
use super::{BATCH, BlockGrant, Driver, SegmentSource};
use crate::storage::entity::{device_messages, devices};
use crate::{Context, Error, Result};

/// The channel instances are woken on (the payload names the instance).
pub const CHANNEL: &str = "updraft_device_messages";

/// Queued device messages older than this are dropped instead of sent.
const QUEUED_MAX_AGE_MS: i64 = 3 * 60 * 1000;

/// An LwM2M message as stored for another instance (`device_messages.kind = 'lwm2m'`).
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Command {
    Pcp {
        frame: Vec<u8>,
    },
    ReadCoverage,
    ReadCellId,
    Serve {
        download: Option<SegmentSource>,
    },
    ReadFirmwareVersion,
    StartFirmware {
        uri: String,
        blocks: Option<BlockGrant>,
    },
    ExecuteUpdate,
}

/// A message stored for another instance: its kind and payload.
fn stored(m: &Outgoing) -> Option<(&str, &'static str, Vec<u8>)> {
    let (device_id, command) = match m {
        Outgoing::Mqtt { device_id, payload } => return Some((device_id, "mqtt", payload.clone())),
        Outgoing::Pcp { device_id, frame } => (
            device_id,
            Command::Pcp {
                frame: frame.clone(),
            },
        ),
        Outgoing::ReadCoverage { device_id } => (device_id, Command::ReadCoverage),
        Outgoing::ReadCellId { device_id } => (device_id, Command::ReadCellId),
        Outgoing::Serve {
            device_id,
            download,
        } => (
            device_id,
            Command::Serve {
                download: download.as_deref().cloned(),
            },
        ),
        Outgoing::ReadFirmwareVersion { device_id } => (device_id, Command::ReadFirmwareVersion),
        Outgoing::StartFirmware {
            device_id,
            uri,
            blocks,
        } => (
            device_id,
            Command::StartFirmware {
                uri: uri.clone(),
                blocks: blocks.clone(),
            },
        ),
        Outgoing::ExecuteUpdate { device_id } => (device_id, Command::ExecuteUpdate),
        Outgoing::AskSlot { .. } | Outgoing::ReleaseSlot { .. } => return None,
    };
    let json = serde_json::to_vec(&command).ok()?;
    Some((device_id, "lwm2m", json))
}

/// The message a stored row holds.
fn outgoing(row: device_messages::Model) -> Result<Outgoing> {
    let device_id = row.device_id;
    if row.kind == "mqtt" {
        return Ok(Outgoing::Mqtt {
            device_id,
            payload: row.payload,
        });
    }
    let command: Command = serde_json::from_slice(&row.payload)
        .map_err(|e| Error::Internal(format!("queued message {}: {e}", row.id)))?;
    Ok(match command {
        Command::Pcp { frame } => Outgoing::Pcp { device_id, frame },
        Command::ReadCoverage => Outgoing::ReadCoverage { device_id },
        Command::ReadCellId => Outgoing::ReadCellId { device_id },
        Command::Serve { download } => Outgoing::Serve {
            device_id,
            download: download.map(Arc::new),
        },
        Command::ReadFirmwareVersion => Outgoing::ReadFirmwareVersion { device_id },
        Command::StartFirmware { uri, blocks } => Outgoing::StartFirmware {
            device_id,
            uri,
            blocks,
        },
        Command::ExecuteUpdate => Outgoing::ExecuteUpdate { device_id },
    })
}

/// Moves the messages in `outgoing` for devices another instance holds into its queue (inside `txn`,
/// which wakes it when it commits); the rest stay to be sent here.
pub(super) async fn route(
    txn: &DatabaseTransaction,
    state: &Context,
    outgoing: &mut Vec<Outgoing>,
    now: i64,
) -> Result<()> {
    let me = state.instance_id();
    let mut ids: Vec<&str> = outgoing.iter().filter_map(Outgoing::device_id).collect();
    if ids.is_empty() {
        return Ok(());
    }
    ids.sort_unstable();
    ids.dedup();
    let mut held: HashMap<String, String> = HashMap::new();
    for chunk in ids.chunks(BATCH as usize) {
        let rows: Vec<(String, String)> = devices::Entity::find()
            .select_only()
            .column(devices::Column::Id)
            .column(devices::Column::InstanceId)
            .filter(devices::Column::Id.is_in(chunk.iter().copied()))
            .filter(devices::Column::InstanceId.is_not_null())
            .filter(devices::Column::InstanceId.ne(me))
            .into_tuple()
            .all(txn)
            .await?;
        held.extend(rows);
    }
    if held.is_empty() {
        return Ok(());
    }
    let mut rows = Vec::new();
    let mut targets = BTreeSet::new();
    outgoing.retain(|m| {
        let Some(instance) = m.device_id().and_then(|d| held.get(d)) else {
            return true;
        };
        let Some((device_id, kind, payload)) = stored(m) else {
            return true;
        };
        rows.push(device_messages::ActiveModel {
            device_id: Set(device_id.to_owned()),
            payload: Set(payload),
            created_at: Set(now),
            instance_id: Set(Some(instance.clone())),
            kind: Set(kind.to_owned()),
            ..Default::default()
        });
        targets.insert(instance.clone());
        false
    });
    for chunk in rows.chunks(200) {
        device_messages::Entity::insert_many(chunk.to_vec())
            .exec(txn)
            .await?;
    }
    for target in targets {
        // Delivered when (and only if) the transaction commits.
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_notify($1, $2)",
            [CHANNEL.into(), target.into()],
        ))
        .await?;
    }
    Ok(())
}

/// Takes the messages queued on other instances for devices that have just connected here (`devices`,
/// recorded in `txn`): a transition that read a device's old place (a connection dropping as the task
/// began, an instance that died) queued them there, where nobody will send them now. Returned oldest
/// first, to be sent before anything decided in `txn`; stale ones are dropped.
pub(super) async fn take_over_queued(
    txn: &DatabaseTransaction,
    state: &Context,
    devices: &[(String, crate::driver::DeviceEvent)],
    now: i64,
) -> Result<Vec<Outgoing>> {
    let mut ids: Vec<&str> = devices
        .iter()
        .filter(|(_, e)| *e == crate::driver::DeviceEvent::Online)
        .map(|(d, _)| d.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut taken = Vec::new();
    for chunk in ids.chunks(BATCH as usize) {
        let rows = device_messages::Entity::find()
            .filter(device_messages::Column::DeviceId.is_in(chunk.iter().copied()))
            .filter(device_messages::Column::InstanceId.is_not_null())
            .filter(device_messages::Column::InstanceId.ne(state.instance_id()))
            .order_by_asc(device_messages::Column::Id)
            .lock_exclusive()
            .all(txn)
            .await?;
        if rows.is_empty() {
            continue;
        }
        device_messages::Entity::delete_many()
            .filter(device_messages::Column::Id.is_in(rows.iter().map(|r| r.id)))
            .exec(txn)
            .await?;
        for row in rows {
            if row.created_at < now - QUEUED_MAX_AGE_MS {
                continue;
            }
            match outgoing(row) {
                Ok(m) => taken.push(m),
                Err(e) => {
                    tracing::warn!(error.message = %e, "a queued device message is unreadable");
                }
            }
        }
    }
    Ok(taken)
}

impl Driver {
    /// Sends the messages queued for this instance as they come (woken by [`Driver::wake_queue`], and
    /// looking at least every second) until `stop`.
    pub async fn deliver_queued(&self, state: Context, stop: tokio_util::sync::CancellationToken) {
        loop {
            loop {
                match self.drain_queued(&state).await {
                    Ok(n) if n == BATCH as usize => {}
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error.message = %e, "sending queued device messages failed");
                        break;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.inner.queued.notified() => {}
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }

    /// Sends the messages queued for this instance (oldest first): by other instances for devices held
    /// here, and by processes holding no device connections (the command line) for any MQTT device.
    /// Returns how many were taken.
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub async fn drain_queued(&self, state: &Context) -> Result<usize> {
        let downlink = self.downlink();
        let link = self.lwm2m_link();
        if downlink.is_none() && link.is_none() {
            return Ok(0);
        }
        let me = state.instance_id();
        let rows = if state.clustered() {
            // Taken atomically: no two instances send one message.
            device_messages::Entity::find()
                .from_raw_sql(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "DELETE FROM device_messages WHERE id IN (\
                       SELECT id FROM device_messages \
                       WHERE instance_id = $1 OR (instance_id IS NULL AND kind = 'mqtt' AND $2) \
                       ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
                     RETURNING *",
                    [me.into(), downlink.is_some().into(), (BATCH as i64).into()],
                ))
                .all(&state.db)
                .await?
        } else {
            let rows = device_messages::Entity::find()
                .filter(
                    sea_orm::Condition::any()
                        .add(device_messages::Column::InstanceId.eq(me))
                        .add(device_messages::Column::InstanceId.is_null()),
                )
                .order_by_asc(device_messages::Column::Id)
                .limit(BATCH)
                .all(&state.db)
                .await?;
            if !rows.is_empty() {
                device_messages::Entity::delete_many()
                    .filter(device_messages::Column::Id.is_in(rows.iter().map(|r| r.id)))
                    .exec(&state.db)
                    .await?;
            }
            rows
        };
        let mut rows = rows;
        rows.sort_by_key(|r| r.id);
        let n = rows.len();
        // A message that waited longer than a version query may (no instance holding the device was
        // running) is stale: its subtask has moved on, and the device will be asked again.
        let oldest = state.clock.now().as_millis() - QUEUED_MAX_AGE_MS;
        for row in rows {
            if row.created_at < oldest {
                tracing::debug!(device_id = %row.device_id, "dropping a stale queued message");
                continue;
            }
            match outgoing(row) {
                Ok(Outgoing::Mqtt { device_id, payload }) => {
                    if let Some(d) = &downlink {
                        d.publish(&device_id, payload);
                    }
                }
                Ok(m) => {
                    if let Some(l) = &link {
                        m.send_to(l.as_ref());
                    }
                }
                Err(e) => {
                    tracing::warn!(error.message = %e, "a queued device message is unreadable")
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lwm2m_messages_survive_the_queue() {
        let source = SegmentSource {
            package_id: "p".to_owned(),
            object_key: domain::package::ObjectKey::parse("fw/p.bin").unwrap(),
            version: "2.0".to_owned(),
            size: 1000,
            segment_size: 500,
        };
        for m in [
            Outgoing::Pcp {
                device_id: "d".to_owned(),
                frame: vec![0xff, 0xfe, 1],
            },
            Outgoing::Serve {
                device_id: "d".to_owned(),
                download: Some(Arc::new(source.clone())),
            },
            Outgoing::StartFirmware {
                device_id: "d".to_owned(),
                uri: "coap://x/fw/t".to_owned(),
                blocks: Some(BlockGrant {
                    token_hash: "h".to_owned(),
                    expires_at: 9,
                    source: Arc::new(source),
                }),
            },
            Outgoing::Mqtt {
                device_id: "d".to_owned(),
                payload: b"{}".to_vec(),
            },
        ] {
            let (device_id, kind, payload) = stored(&m).unwrap();
            let row = device_messages::Model {
                id: 1,
                device_id: device_id.to_owned(),
                payload,
                created_at: 0,
                instance_id: None,
                kind: kind.to_owned(),
            };
            assert_eq!(outgoing(row).unwrap(), m);
        }
        assert!(
            stored(&Outgoing::ReleaseSlot { subtask: 1 }).is_none(),
            "slots are not device messages"
        );
    }
}
