//! The transition transaction, the driver's one way of changing a subtask: [`Driver::apply_in`] loads the
//! rows and plans, runs each machine on its input ([`super::transition`]), carries out the effects that
//! write (download tokens) in the same transaction, records what device events say about their devices,
//! refreshes the tasks whose counters moved, commits, and only then sends what the effects decided
//! ([`Outgoing`]) and hands out the download slots they freed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use domain::flow::lwm2m;
use domain::task::SubtaskStatus;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use super::effects::{Effects, Outgoing};
use super::flow::{AnyEffect, FlowPlan};
use super::plan::TaskPlan;
use super::route::{route, take_over_queued};
use super::transition::{Lease, Outcome, refresh_task, transition};
use super::{BATCH, DeviceEvent, Driver, Step, firmware, mqtt, pcp};
use crate::metrics::SubtaskChange;
use crate::storage::entity::{device_messages, devices, subtasks};
use crate::{Context, Error, Result};

/// How often one input is re-decided on a subtask another writer keeps changing.
const MAX_CONFLICTS: usize = 3;

/// What one [`Driver::apply_once`] did beyond its transaction.
#[derive(Default)]
pub(super) struct Applied {
    /// Subtasks whose machine changed.
    changed: HashSet<i64>,
    /// Subtasks granted a download slot by the slot changes it made.
    pub(super) granted: Vec<i64>,
}

impl Driver {
    /// The core: load plans, run the machines, commit everything in one transaction, then perform effects.
    ///
    /// Rows are read under the write lock but before the transaction, so the transaction's first statement
    /// is a write: on SQLite a transaction that reads first and writes later fails when another connection
    /// wrote in between.
    pub(super) async fn apply(
        &self,
        state: &Context,
        ids: Vec<i64>,
        input: Step<'_>,
    ) -> Result<()> {
        let steps = ids.into_iter().map(|id| (id, input.clone())).collect();
        self.apply_in(state, steps, &[]).await
    }

    /// Applies each `(subtask id, input)` in order, all in one transaction that also records what
    /// `devices` say about their devices (online state, versions), so a device's state and its subtasks'
    /// view of it commit together. A subtask named twice sees the state its first input left.
    ///
    /// LwM2M download slots freed or granted by these transitions are then handed out, each grant in a
    /// transition of its own; a grant to a subtask that no longer waits goes to the next in line.
    pub(super) async fn apply_in(
        &self,
        state: &Context,
        steps: Vec<(i64, Step<'_>)>,
        devices: &[(String, DeviceEvent)],
    ) -> Result<()> {
        let mut granted = self.apply_once(state, steps, devices).await?.granted;
        while !granted.is_empty() {
            let steps = granted
                .iter()
                .map(|id| (*id, Step::Lwm2m(lwm2m::Input::SlotGranted)))
                .collect();
            let applied = self.apply_once(state, steps, &[]).await?;
            let mut next = applied.granted;
            let unchanged: Vec<i64> = granted
                .into_iter()
                .filter(|id| !applied.changed.contains(id))
                .collect();
            for id in no_longer_waiting(state, unchanged).await? {
                next.extend(self.release_slot(state, id).await?);
            }
            granted = next;
        }
        Ok(())
    }

    async fn apply_once(
        &self,
        state: &Context,
        steps: Vec<(i64, Step<'_>)>,
        devices: &[(String, DeviceEvent)],
    ) -> Result<Applied> {
        let mut applied = Applied::default();
        if steps.is_empty() && devices.is_empty() {
            return Ok(applied);
        }
        let mut outgoing = Vec::new();
        let mut events = Vec::new();
        let mut slot_changes = Vec::new();
        {
            let _w = self.inner.write.lock().await;
            let now = state.clock.now();
            let mut steps = steps;
            // With several instances the device events' subtasks are looked up in the transaction,
            // under the devices' locks (below).
            if !state.clustered() {
                steps.extend(open_steps(&state.db, state, devices).await?);
            }
            let lease_until = now.as_millis()
                + i64::try_from(state.settings.cluster.lease.as_millis()).unwrap_or(i64::MAX / 4);
            let lease = state.clustered().then(|| Lease {
                owner: state.instance_id(),
                until: lease_until,
            });
            let mut ids: Vec<i64> = steps.iter().map(|(id, _)| *id).collect();
            ids.sort_unstable();
            ids.dedup();
            let mut rows = read_rows(&state.db, &ids).await?;
            let mut plans: HashMap<i64, Arc<TaskPlan>> = HashMap::with_capacity(rows.len());
            for row in rows.values() {
                if let Some(plan) = self.plan(state, &row.task_id).await? {
                    plans.insert(row.id, plan);
                }
            }
            let downlink = self.downlink();
            let txn = crate::db::begin_write(&state.db).await?;
            if state.clustered() {
                // Every device this transaction touches is locked first, in id order: transitions that
                // write a device (its version on success) and device events that write it first then
                // cannot deadlock, and what is read of the devices below holds until the commit.
                lock_devices(
                    &txn,
                    devices
                        .iter()
                        .map(|(d, _)| d.as_str())
                        .chain(rows.values().map(|r| r.device_id.as_str()))
                        // The gateways that children are reached through, read below for their state.
                        .chain(rows.values().filter_map(|r| r.gateway_id.as_deref())),
                )
                .await?;
                // The device events' subtasks, looked up under the devices' locks: a task another
                // instance began before these locks (reading the device as it was) is seen here, so its
                // devices do not wait for a connection already made; one beginning after them reads
                // what this transaction records.
                let found = open_steps(&txn, state, devices).await?;
                let new_ids: Vec<i64> = found
                    .iter()
                    .map(|(id, _)| *id)
                    .filter(|id| !rows.contains_key(id))
                    .collect();
                for (id, row) in read_rows(&txn, &new_ids).await? {
                    if let Some(plan) = self.plan(state, &row.task_id).await? {
                        plans.insert(id, plan);
                    }
                    rows.insert(id, row);
                }
                ids.extend(new_ids);
                ids.sort_unstable();
                ids.dedup();
                steps.extend(found);
                // Disconnects checked under the locks: the device may have connected to another
                // instance meanwhile.
                let elsewhere = connected_elsewhere(&txn, state.instance_id(), devices).await?;
                if !elsewhere.is_empty() {
                    steps.retain(|(id, step)| {
                        !(*step == Step::Offline
                            && rows
                                .get(id)
                                .is_some_and(|r| elsewhere.contains(&r.device_id)))
                    });
                }
            }
            // In device order (each device's events in theirs): two instances' transactions then lock
            // device rows alike and cannot deadlock.
            let mut recorded: Vec<&(String, DeviceEvent)> = devices.iter().collect();
            recorded.sort_by(|x, y| x.0.cmp(&y.0));
            for (device_id, event) in recorded {
                record_device(&txn, state.instance_id(), device_id, event, now.as_millis()).await?;
            }
            if steps.iter().any(|(_, s)| s.reads_online()) {
                // Whether the device of a beginning or retried subtask is connected, read here under a
                // share lock of the device rows: a connection being recorded right now (by another
                // instance, or before this transaction on this one) either committed first and is seen,
                // or waits for this transaction and then finds the started subtask (see `open_steps`).
                // A child device is as connected as the gateway it is reached through.
                let reach = |r: &subtasks::Model| {
                    r.gateway_id.clone().unwrap_or_else(|| r.device_id.clone())
                };
                let online = locked_online(&txn, rows.values().map(reach)).await?;
                for (id, step) in &mut steps {
                    if let Step::Begin { online: o } | Step::Start { online: o } = step {
                        *o = rows.get(id).is_some_and(|r| online.contains(&reach(r)));
                    }
                }
            }
            if state.clustered() {
                // Read again, now that this transaction holds its devices' rows: another instance may
                // have changed a subtask since it was read above (a begin this one's connection waited
                // for, above). A changed row's compare-and-set would fail and be retried, but an input
                // that changes nothing (a connect to a not yet begun subtask) would be decided on the
                // old row and lost.
                rows = read_rows(&txn, &ids).await?;
                // Sent first: they were decided before anything decided here.
                let mut queued = take_over_queued(&txn, state, devices, now.as_millis()).await?;
                if !queued.is_empty() {
                    queued.append(&mut outgoing);
                    outgoing = queued;
                }
            }
            let mut touched_tasks: Vec<String> = Vec::new();
            // What changed, for the metrics once committed: each subtask's status and step before.
            let mut observed: Vec<SubtaskChange> = Vec::new();
            for (id, input) in steps {
                let (Some(mut row), Some(plan)) = (rows.remove(&id), plans.get(&id)) else {
                    continue;
                };
                let mut conflicts = 0;
                let changed = loop {
                    match transition(
                        &txn,
                        now,
                        plan,
                        &row,
                        input.clone(),
                        lease.as_ref(),
                        &mut events,
                    )
                    .await?
                    {
                        Outcome::Changed(changed) => break Some(*changed),
                        Outcome::Unchanged => break None,
                        Outcome::Stale if conflicts < MAX_CONFLICTS => {
                            // Another writer (a second instance, or one shutting down) moved this
                            // subtask since it was read: decide again on what is stored now.
                            conflicts += 1;
                            match subtasks::Entity::find_by_id(id).one(&txn).await? {
                                Some(current) => row = current,
                                None => break None,
                            }
                        }
                        Outcome::Stale => {
                            return Err(Error::Internal(format!(
                                "subtask {id}: changed by another writer {MAX_CONFLICTS} times in a row"
                            )));
                        }
                    }
                };
                let Some(changed) = changed else {
                    rows.insert(id, row);
                    continue;
                };
                applied.changed.insert(id);
                let row = &changed.row;
                observed.push(SubtaskChange {
                    id,
                    from: changed.before.0.as_str(),
                    to: row.status.clone(),
                    step_before: changed.before.1.clone(),
                    step: row.step.clone(),
                    finished: row.finished_at.is_some(),
                });
                if changed.status_changed && !touched_tasks.contains(&changed.row.task_id) {
                    touched_tasks.push(changed.row.task_id.clone());
                }
                let mut fx = Effects {
                    state,
                    settings: &self.inner.settings,
                    txn: &txn,
                    now,
                    plan,
                    row: &changed.row,
                    outgoing: &mut outgoing,
                };
                for effect in &changed.effects {
                    match (*effect, &plan.plan) {
                        (AnyEffect::Mqtt(e), _) => mqtt::carry_out(&mut fx, e).await?,
                        (AnyEffect::Lwm2m(e), FlowPlan::Lwm2m(p))
                            if p.method == lwm2m::Method::Object5 =>
                        {
                            firmware::carry_out(&mut fx, e).await?;
                        }
                        (AnyEffect::Lwm2m(e), _) => pcp::carry_out(&mut fx, e)?,
                    }
                }
                rows.insert(id, changed.row);
            }
            // In a fixed order: two instances refreshing the same tasks lock their rows alike.
            touched_tasks.sort_unstable();
            for task_id in &touched_tasks {
                refresh_task(&txn, task_id, now, &mut events).await?;
            }
            if state.clustered() {
                route(&txn, state, &mut outgoing, now.as_millis()).await?;
            }
            if downlink.is_none() {
                // No MQTT endpoint in this process (the command line): the messages are queued, with
                // the state that decided them, for the process that has one.
                for m in &outgoing {
                    if let Outgoing::Mqtt { device_id, payload } = m {
                        device_messages::ActiveModel {
                            device_id: Set(device_id.clone()),
                            payload: Set(payload.clone()),
                            created_at: Set(now.as_millis()),
                            instance_id: Set(None),
                            kind: Set("mqtt".to_owned()),
                            ..Default::default()
                        }
                        .insert(&txn)
                        .await?;
                    }
                }
            }
            // Known as this process's before the commit makes them visible to its outbox tail.
            self.own_records(&events);
            txn.commit().await?;
            // A rollout task's devices moved: the loop decides again at once.
            if touched_tasks
                .iter()
                .any(|t| self.plans().get(t).is_some_and(|p| p.rollout))
            {
                self.kick();
            }
            for change in &observed {
                state.metrics.subtask_changed(change, now.as_millis());
            }
            let link = self.lwm2m_link();
            for m in outgoing {
                match m {
                    Outgoing::Mqtt { device_id, payload } => {
                        if let Some(d) = &downlink {
                            d.publish(&device_id, payload);
                        }
                    }
                    Outgoing::AskSlot { .. } | Outgoing::ReleaseSlot { .. } => slot_changes.push(m),
                    lwm2m => {
                        if let Some(l) = &link {
                            lwm2m.send_to(l.as_ref());
                        }
                    }
                }
            }
        }
        self.publish_events(events);
        // Each in a transaction of its own, after the lock: a cell's slots are counted across instances.
        for change in slot_changes {
            let granted = match change {
                Outgoing::AskSlot { subtask, slot } => self.ask_slot(state, subtask, slot).await?,
                Outgoing::ReleaseSlot { subtask } => self.release_slot(state, subtask).await?,
                _ => Vec::new(),
            };
            applied.granted.extend(granted);
        }
        Ok(applied)
    }
}

/// The open subtasks each event applies to, in event order.
async fn open_steps<'a>(
    db: &impl sea_orm::ConnectionTrait,
    state: &Context,
    events: &'a [(String, DeviceEvent)],
) -> Result<Vec<(i64, Step<'a>)>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut device_ids: Vec<&str> = events.iter().map(|(d, _)| d.as_str()).collect();
    device_ids.sort_unstable();
    device_ids.dedup();
    let mut open: HashMap<String, Vec<i64>> = HashMap::new();
    for chunk in device_ids.chunks(BATCH as usize) {
        let rows: Vec<(i64, String)> = subtasks::Entity::find()
            .select_only()
            .column(subtasks::Column::Id)
            .column(subtasks::Column::DeviceId)
            .filter(subtasks::Column::DeviceId.is_in(chunk.iter().copied()))
            .filter(subtasks::Column::Status.is_in(SubtaskStatus::OPEN.map(SubtaskStatus::as_str)))
            // A subtask waiting for confirmation does not follow its device: what the device does is
            // read when it is confirmed and begins (a connect would otherwise rewrite its step).
            .filter(subtasks::Column::Step.ne(super::UNCONFIRMED))
            .order_by_asc(subtasks::Column::Id)
            .into_tuple()
            .all(db)
            .await?;
        for (id, device) in rows {
            open.entry(device).or_default().push(id);
        }
    }
    // With several instances this is decided in the transaction, under the devices' locks (`apply_once`).
    let elsewhere = if state.clustered() {
        HashSet::new()
    } else {
        connected_elsewhere(&state.db, state.instance_id(), events).await?
    };
    Ok(events
        .iter()
        .filter(move |(device, event)| !(is_disconnect(event) && elsewhere.contains(device)))
        .flat_map(|(device, event)| {
            open.get(device)
                .into_iter()
                .flatten()
                .map(move |id| (*id, event.input()))
        })
        .collect())
}

const fn is_disconnect(event: &DeviceEvent) -> bool {
    matches!(event, DeviceEvent::Offline | DeviceEvent::Lost { .. })
}

/// Locks the device rows `ids` (`FOR NO KEY UPDATE`, in id order) until the transaction ends.
async fn lock_devices<'a>(
    txn: &DatabaseTransaction,
    ids: impl Iterator<Item = &'a str>,
) -> Result<()> {
    let mut ids: Vec<&str> = ids.collect();
    ids.sort_unstable();
    ids.dedup();
    for chunk in ids.chunks(BATCH as usize) {
        let _: Vec<String> = devices::Entity::find()
            .select_only()
            .column(devices::Column::Id)
            .filter(devices::Column::Id.is_in(chunk.iter().copied()))
            .order_by_asc(devices::Column::Id)
            .lock(sea_orm::sea_query::LockType::NoKeyUpdate)
            .into_tuple()
            .all(txn)
            .await?;
    }
    Ok(())
}

/// The devices of `events` whose disconnect is none: a connection that ended on this instance, or on a
/// dead one (`Lost`), says nothing of one the device opened on another instance meanwhile.
async fn connected_elsewhere(
    db: &impl sea_orm::ConnectionTrait,
    me: &str,
    events: &[(String, DeviceEvent)],
) -> Result<HashSet<String>> {
    // The instance each disconnect came from, and whether it died.
    let mut from: HashMap<&str, (&str, bool)> = HashMap::new();
    for (device, event) in events {
        match event {
            DeviceEvent::Offline => from.insert(device, (me, false)),
            DeviceEvent::Lost { instance } => from.insert(device, (instance, true)),
            _ => None,
        };
    }
    let mut ids: Vec<&str> = from.keys().copied().collect();
    ids.sort_unstable();
    let mut elsewhere = HashSet::new();
    for chunk in ids.chunks(BATCH as usize) {
        let rows: Vec<(String, Option<String>)> = devices::Entity::find()
            .select_only()
            .column(devices::Column::Id)
            .column(devices::Column::InstanceId)
            .filter(devices::Column::Id.is_in(chunk.iter().copied()))
            .into_tuple()
            .all(db)
            .await?;
        for (id, held) in rows {
            let Some((instance, died)) = from.get(id.as_str()) else {
                continue;
            };
            let no_disconnect = match held.as_deref() {
                Some(h) => h != *instance,
                // Held by none: a session's end still counts (the device may have been taken off a dead
                // instance before its session noticed); a dead instance's was counted by whoever
                // cleared it.
                None => *died,
            };
            if no_disconnect {
                elsewhere.insert(id);
            }
        }
    }
    Ok(elsewhere)
}

/// Which of `granted` (subtasks a grant did not change) neither wait for their slot nor download: their
/// grant goes to the next in line. One already downloading took a grant made twice (by this instance and
/// another, or by repair) and keeps its place.
async fn no_longer_waiting(state: &Context, granted: Vec<i64>) -> Result<Vec<i64>> {
    if granted.is_empty() {
        return Ok(granted);
    }
    let holding: HashSet<i64> = subtasks::Entity::find()
        .select_only()
        .column(subtasks::Column::Id)
        .filter(subtasks::Column::Id.is_in(granted.clone()))
        .filter(subtasks::Column::Status.eq(SubtaskStatus::Processing.as_str()))
        .filter(subtasks::Column::Step.eq("downloading"))
        .into_tuple::<i64>()
        .all(&state.db)
        .await?
        .into_iter()
        .collect();
    Ok(granted
        .into_iter()
        .filter(|id| !holding.contains(id))
        .collect())
}

/// Which of `devices` are connected now, read under a share lock of their rows (PostgreSQL), in id order.
async fn locked_online(
    txn: &DatabaseTransaction,
    devices: impl Iterator<Item = String>,
) -> Result<HashSet<String>> {
    let mut devices: Vec<String> = devices.collect();
    devices.sort_unstable();
    devices.dedup();
    let mut online = HashSet::new();
    for chunk in devices.chunks(BATCH as usize) {
        let rows: Vec<(String, String)> = devices::Entity::find()
            .select_only()
            .column(devices::Column::Id)
            .column(devices::Column::Status)
            .filter(devices::Column::Id.is_in(chunk.to_vec()))
            .order_by_asc(devices::Column::Id)
            .lock_shared()
            .into_tuple()
            .all(txn)
            .await?;
        online.extend(
            rows.into_iter()
                .filter(|(_, status)| status == "ONLINE")
                .map(|(id, _)| id),
        );
    }
    Ok(online)
}

/// The subtask rows `ids` (those that still exist).
async fn read_rows(
    db: &impl sea_orm::ConnectionTrait,
    ids: &[i64],
) -> Result<HashMap<i64, subtasks::Model>> {
    let mut rows = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(BATCH as usize) {
        for row in subtasks::Entity::find()
            .filter(subtasks::Column::Id.is_in(chunk.to_vec()))
            .all(db)
            .await?
        {
            rows.insert(row.id, row);
        }
    }
    Ok(rows)
}

/// Records what a device event says about the device itself: online state, reported versions.
async fn record_device(
    txn: &DatabaseTransaction,
    instance: &str,
    device_id: &str,
    event: &DeviceEvent,
    now: i64,
) -> Result<()> {
    match event {
        DeviceEvent::Online | DeviceEvent::Offline => {
            let online = *event == DeviceEvent::Online;
            let mut update = devices::Entity::update_many()
                .col_expr(
                    devices::Column::Status,
                    Expr::value(if online { "ONLINE" } else { "OFFLINE" }),
                )
                .col_expr(
                    devices::Column::ConnectionStatusUpdateTime,
                    Expr::value(now),
                )
                .filter(devices::Column::Id.eq(device_id))
                // A frozen device stays frozen whatever its connection did.
                .filter(devices::Column::Status.ne("FROZEN"));
            if online {
                update = update
                    .col_expr(
                        devices::Column::ActiveTime,
                        Expr::col(devices::Column::ActiveTime).if_null(now),
                    )
                    .col_expr(devices::Column::InstanceId, Expr::value(instance));
            } else {
                // A connection that ended here says nothing of one the device opened on another
                // instance meanwhile.
                update = update
                    .col_expr(
                        devices::Column::InstanceId,
                        Expr::value(Option::<String>::None),
                    )
                    .filter(
                        sea_orm::Condition::any()
                            .add(devices::Column::InstanceId.is_null())
                            .add(devices::Column::InstanceId.eq(instance)),
                    );
            }
            update.exec(txn).await?;
        }
        DeviceEvent::Lost { instance: dead } => {
            // Only where the dead instance still holds it (a frozen device stays frozen, but is held
            // by none either).
            devices::Entity::update_many()
                .col_expr(devices::Column::Status, Expr::value("OFFLINE"))
                .col_expr(
                    devices::Column::ConnectionStatusUpdateTime,
                    Expr::value(now),
                )
                .filter(devices::Column::Id.eq(device_id))
                .filter(devices::Column::InstanceId.eq(dead.as_str()))
                .filter(devices::Column::Status.ne("FROZEN"))
                .exec(txn)
                .await?;
            devices::Entity::update_many()
                .col_expr(
                    devices::Column::InstanceId,
                    Expr::value(Option::<String>::None),
                )
                .filter(devices::Column::Id.eq(device_id))
                .filter(devices::Column::InstanceId.eq(dead.as_str()))
                .exec(txn)
                .await?;
        }
        DeviceEvent::VersionReport {
            sw_version,
            fw_version,
        }
        | DeviceEvent::SdkInfo {
            sw_version,
            fw_version,
            ..
        } => {
            let sdk = match event {
                DeviceEvent::SdkInfo {
                    device_sdk_version, ..
                } => device_sdk_version,
                _ => &None,
            };
            let mut update =
                devices::Entity::update_many().filter(devices::Column::Id.eq(device_id));
            let mut any = false;
            for (col, v) in [
                (devices::Column::SwVersion, sw_version),
                (devices::Column::FwVersion, fw_version),
                (devices::Column::DeviceSdkVersion, sdk),
            ] {
                if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                    update = update.col_expr(col, Expr::value(v.to_owned()));
                    any = true;
                }
            }
            if any {
                update.exec(txn).await?;
            }
        }
        // PCP upgrades software: what the device says it runs is its software version.
        DeviceEvent::PcpVersion { result: 0, version }
        | DeviceEvent::PcpUpgradeResult { result: 0, version }
            if !version.is_empty() =>
        {
            devices::Entity::update_many()
                .col_expr(devices::Column::SwVersion, Expr::value(version.clone()))
                .filter(devices::Column::Id.eq(device_id))
                .exec(txn)
                .await?;
        }
        // Object 5 upgrades firmware: `/3/0/3` is the firmware version.
        DeviceEvent::FirmwareVersion(version) if !version.is_empty() => {
            devices::Entity::update_many()
                .col_expr(devices::Column::FwVersion, Expr::value(version.clone()))
                .filter(devices::Column::Id.eq(device_id))
                .exec(txn)
                .await?;
        }
        DeviceEvent::Coverage { .. } | DeviceEvent::CellId(_) => {
            let (rsrp, sinr, cell) = match event {
                DeviceEvent::Coverage { rsrp, sinr, cell } => (*rsrp, *sinr, *cell),
                DeviceEvent::CellId(cell) => (None, None, Some(*cell)),
                _ => (None, None, None),
            };
            let radio =
                serde_json::json!({ "rsrp": rsrp, "sinr": sinr, "cell_id": cell, "at": now });
            devices::Entity::update_many()
                .col_expr(devices::Column::LastRadio, Expr::value(radio.to_string()))
                .filter(devices::Column::Id.eq(device_id))
                .exec(txn)
                .await?;
        }
        _ => {}
    }
    Ok(())
}
