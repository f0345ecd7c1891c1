//! Several instances on one PostgreSQL, coordinated by the database alone (no broker, no consensus of
//! our own). Each instance:
//!
//! - **joins** (`instances` row) and writes a **heartbeat** every `cluster.heartbeat`, renewing the
//!   leases of the subtasks it drives (`subtasks.lease_owner` / `lease_until`, taken by every transition
//!   it makes; see `driver::transition::Lease`);
//! - **reaps** instances whose heartbeat is older than `cluster.lease`: their device connections are
//!   forgotten (the devices are offline until they reconnect, to any instance) and their subtasks are
//!   taken over, in batches that several survivors share (`FOR UPDATE SKIP LOCKED`);
//! - **listens** (`LISTEN`) for messages other instances queued for devices it holds
//!   (`driver::route`), and sends them at once;
//! - **leaves** on a clean shutdown, giving its leases up so that nobody waits for them to expire.
//!
//! With SQLite the same runs with a single instance (start-up refuses a second): joining names it, and
//! reaping clears what an earlier run left.

use std::time::Duration;

use domain::Timestamp;
use domain::task::{SubtaskStatus, TaskStatus};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QuerySelect, Set, Statement,
};
use tokio_util::sync::CancellationToken;

use crate::driver::{DeviceEvent, Driver};
use crate::storage::entity::{device_messages, devices, instances, subtasks, tasks};
use crate::{Context, Result};

/// Subtasks taken over per statement.
const TAKEOVER_BATCH: i64 = 1000;

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// Records this instance as running, with what it serves (`addresses`, for operators).
///
/// # Errors
/// [`crate::Error::Db`].
pub async fn join(state: &Context, addresses: &str) -> Result<()> {
    let now = state.clock.now().as_millis();
    instances::Entity::insert(instances::ActiveModel {
        id: Set(state.instance_id().to_owned()),
        started_at: Set(now),
        heartbeat_at: Set(now),
        addresses: Set(addresses.to_owned()),
    })
    .on_conflict(
        OnConflict::column(instances::Column::Id)
            .update_columns([
                instances::Column::StartedAt,
                instances::Column::HeartbeatAt,
                instances::Column::Addresses,
            ])
            .to_owned(),
    )
    .exec(&state.db)
    .await?;
    tracing::info!(instance_id = state.instance_id(), "joined");
    Ok(())
}

/// Gives this instance's leases up and removes it (a clean shutdown): the others take its subtasks at once
/// instead of after the lease.
///
/// # Errors
/// [`crate::Error::Db`].
pub async fn leave(state: &Context) -> Result<()> {
    let released = subtasks::Entity::update_many()
        .col_expr(
            subtasks::Column::LeaseOwner,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            subtasks::Column::LeaseUntil,
            Expr::value(Option::<i64>::None),
        )
        .filter(subtasks::Column::LeaseOwner.eq(state.instance_id()))
        .exec(&state.db)
        .await?
        .rows_affected;
    instances::Entity::delete_by_id(state.instance_id().to_owned())
        .exec(&state.db)
        .await?;
    tracing::info!(
        instance_id = state.instance_id(),
        released,
        "left; leases given up"
    );
    Ok(())
}

/// The instances alive now (heartbeat within the lease), this one included once it joined.
///
/// # Errors
/// [`crate::Error::Db`].
pub async fn live(state: &Context) -> Result<Vec<instances::Model>> {
    let since = state.clock.now().as_millis() - millis(state.settings.cluster.lease);
    Ok(instances::Entity::find()
        .filter(instances::Column::HeartbeatAt.gte(since))
        .all(&state.db)
        .await?)
}

/// What one heartbeat did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Beat {
    /// Leases renewed.
    pub renewed: u64,
    /// Dead instances reaped.
    pub reaped: Vec<String>,
    /// Their subtasks this instance took over.
    pub taken_over: u64,
    /// Their devices marked offline.
    pub devices_offline: usize,
    /// Tasks whose start was cut short (one of them may have been starting it), started again.
    pub starts_resumed: usize,
    /// This instance had been taken for dead: connections it holds, recorded as its own again.
    pub held_again: usize,
}

/// What renewing did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Renewal {
    /// Leases renewed.
    pub leases: u64,
    /// This instance had been taken for dead (reaped while stalled) and joined again.
    pub rejoined: bool,
}

/// One heartbeat: this instance's row and leases are renewed, and dead instances are reaped.
///
/// # Errors
/// [`crate::Error::Db`].
pub async fn beat(state: &Context, driver: &Driver) -> Result<Beat> {
    let renewal = renew(state).await?;
    let held_again = if renewal.rejoined {
        hold_again(state, driver).await?
    } else {
        0
    };
    let mut beat = reap_dead(state, driver).await?;
    beat.renewed = renewal.leases;
    beat.held_again = held_again;
    Ok(beat)
}

/// The heartbeat proper: this instance's row and its leases are renewed.
///
/// # Errors
/// [`crate::Error::Db`].
pub async fn renew(state: &Context) -> Result<Renewal> {
    let now = state.clock.now();
    let lease = millis(state.settings.cluster.lease);
    let me = state.instance_id();
    let alive = instances::Entity::update_many()
        .col_expr(instances::Column::HeartbeatAt, Expr::value(now.as_millis()))
        .filter(instances::Column::Id.eq(me))
        .exec(&state.db)
        .await?
        .rows_affected;
    if alive == 0 {
        // Reaped while stalled (a long pause): join again; what was taken over is the others' now, and
        // the connections still held here are recorded again ([`hold_again`]).
        tracing::warn!(
            instance_id = me,
            "this instance was taken for dead by another; joining again"
        );
        join(state, "").await?;
    }
    let rejoined = alive == 0;
    // Renewed once half the lease has passed, so each lease is written about twice per lease period.
    // Rows a transition is writing right now are skipped (it renews them itself): a bulk update that
    // waited for them would deadlock with transitions locking rows in another order.
    let renewed = if state.clustered() {
        let open: Vec<sea_orm::Value> = SubtaskStatus::OPEN
            .iter()
            .map(|s| s.as_str().into())
            .collect();
        state
            .db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE subtasks SET lease_until = $1 WHERE id IN (\
                   SELECT id FROM subtasks WHERE lease_owner = $2 AND lease_until < $3 \
                     AND status IN ($4, $5, $6) \
                   ORDER BY id FOR UPDATE SKIP LOCKED)",
                [
                    (now.as_millis() + lease).into(),
                    me.into(),
                    (now.as_millis() + lease / 2).into(),
                ]
                .into_iter()
                .chain(open),
            ))
            .await?
            .rows_affected()
    } else {
        0
    };
    Ok(Renewal {
        leases: renewed,
        rejoined,
    })
}

/// After this instance was taken for dead and joined again: the devices whose connections it still holds
/// were marked offline by whoever reaped it; those still recorded nowhere else are recorded here again
/// (their subtasks come back with them). Returns how many.
///
/// # Errors
/// [`crate::Error::Db`].
pub async fn hold_again(state: &Context, driver: &Driver) -> Result<usize> {
    let held = driver.held_devices();
    let mut again = 0;
    for chunk in held.chunks(500) {
        // A device that reconnected to another instance meanwhile is that one's; a connection here
        // that says otherwise is stale and ends by its keep-alive.
        let offline: Vec<String> = devices::Entity::find()
            .select_only()
            .column(devices::Column::Id)
            .filter(devices::Column::Id.is_in(chunk.iter().cloned()))
            .filter(devices::Column::InstanceId.is_null())
            .into_tuple()
            .all(&state.db)
            .await?;
        again += offline.len();
        let events = offline
            .into_iter()
            .map(|d| (d, DeviceEvent::Online))
            .collect();
        driver.device_events(state, events).await?;
    }
    if again > 0 {
        tracing::warn!(
            devices = again,
            "connections held here were recorded again after this instance was taken for dead"
        );
    }
    Ok(again)
}

/// Reaps the instances that stopped beating (and connections recorded under vanished ones), and starts
/// the tasks they were starting. Slow when a large instance died: [`run`] keeps it off the heartbeat.
///
/// # Errors
/// [`crate::Error::Db`].
pub async fn reap_dead(state: &Context, driver: &Driver) -> Result<Beat> {
    let now = state.clock.now();
    let lease = millis(state.settings.cluster.lease);
    let me = state.instance_id();
    let mut beat = Beat::default();
    let mut dead = instances::Entity::find().filter(instances::Column::Id.ne(me));
    if state.clustered() {
        dead = dead.filter(instances::Column::HeartbeatAt.lt(now.as_millis() - lease));
    }
    // On SQLite, whoever else is recorded is an earlier run: start-up holds the file's lock.
    let dead = dead.all(&state.db).await?;
    for instance in dead {
        let (devices, taken) = reap(state, driver, &instance.id, now).await?;
        tracing::warn!(
            dead_instance = %instance.id,
            silent_ms = now.as_millis() - instance.heartbeat_at,
            subtasks_taken_over = taken,
            devices_offline = devices,
            "an instance stopped beating: its subtasks are taken over"
        );
        beat.devices_offline += devices;
        beat.taken_over += taken;
        beat.reaped.push(instance.id);
    }
    if state.clustered() && !beat.reaped.is_empty() {
        // On SQLite, start-up's recovery does this after its first beat.
        beat.starts_resumed = driver.resume_starts(state).await?;
        if beat.starts_resumed > 0 {
            tracing::warn!(
                tasks = beat.starts_resumed,
                "tasks a dead instance was starting are started here"
            );
        }
    }
    // Connections recorded under an instance that is gone without a trace (it left while a connection
    // was still being recorded, or an earlier run on SQLite): the same as a dead instance's.
    let vanished: Vec<String> = devices::Entity::find()
        .select_only()
        .column(devices::Column::InstanceId)
        .distinct()
        .filter(devices::Column::InstanceId.is_not_null())
        .filter(
            devices::Column::InstanceId.not_in_subquery(
                sea_orm::sea_query::Query::select()
                    .column(instances::Column::Id)
                    .from(instances::Entity)
                    .to_owned(),
            ),
        )
        .into_tuple()
        .all(&state.db)
        .await?;
    for instance in vanished {
        let (devices, taken) = reap(state, driver, &instance, now).await?;
        beat.devices_offline += devices;
        beat.taken_over += taken;
    }
    Ok(beat)
}

/// Forgets `dead`'s device connections (telling their subtasks the devices went offline) and takes over
/// its subtasks. Returns (devices, subtasks).
async fn reap(
    state: &Context,
    driver: &Driver,
    dead: &str,
    now: Timestamp,
) -> Result<(usize, u64)> {
    // Leases first: the devices' going offline is then recorded by their subtasks' new owner.
    let taken = take_over(state, dead, now).await?;
    let mut offline = 0;
    loop {
        let ids: Vec<String> = devices::Entity::find()
            .select_only()
            .column(devices::Column::Id)
            .filter(devices::Column::InstanceId.eq(dead))
            .limit(500)
            .into_tuple()
            .all(&state.db)
            .await?;
        if ids.is_empty() {
            break;
        }
        // Offline where still recorded there (each checked under its row's lock as it is applied): a
        // device that reconnected elsewhere meanwhile stays online.
        offline += ids.len();
        driver
            .device_events(
                state,
                ids.into_iter()
                    .map(|d| {
                        let lost = DeviceEvent::Lost {
                            instance: dead.to_owned(),
                        };
                        (d, lost)
                    })
                    .collect(),
            )
            .await?;
    }
    // Tasks it was starting go back to waiting; the driver's loop (here or elsewhere) starts them.
    let requeued = tasks::Entity::update_many()
        .col_expr(
            tasks::Column::Status,
            Expr::value(TaskStatus::Waiting.as_str()),
        )
        .filter(tasks::Column::Status.eq(TaskStatus::Initializing.as_str()))
        .filter(tasks::Column::ClaimedBy.eq(dead))
        .exec(&state.db)
        .await?
        .rows_affected;
    if requeued > 0 {
        tracing::warn!(
            dead_instance = dead,
            tasks = requeued,
            "tasks a dead instance was starting wait to be started again"
        );
        driver.kick();
    }
    // Nobody sends what was queued for it; its devices are asked again when they connect.
    device_messages::Entity::delete_many()
        .filter(device_messages::Column::InstanceId.eq(dead))
        .exec(&state.db)
        .await?;
    instances::Entity::delete_by_id(dead.to_owned())
        .exec(&state.db)
        .await?;
    Ok((offline, taken))
}

/// Takes the leases of `dead`'s open subtasks, a batch at a time; rows another survivor is taking are
/// skipped (it takes them).
async fn take_over(state: &Context, dead: &str, now: Timestamp) -> Result<u64> {
    let until = now.as_millis() + millis(state.settings.cluster.lease);
    let open: Vec<sea_orm::Value> = SubtaskStatus::OPEN
        .iter()
        .map(|s| s.as_str().into())
        .collect();
    let mut taken = 0;
    loop {
        let n = if state.clustered() {
            state
                .db
                .execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "UPDATE subtasks SET lease_owner = $1, lease_until = $2 WHERE id IN (\
                       SELECT id FROM subtasks WHERE lease_owner = $3 \
                         AND status IN ($5, $6, $7) \
                       LIMIT $4 FOR UPDATE SKIP LOCKED)",
                    [
                        state.instance_id().into(),
                        until.into(),
                        dead.into(),
                        TAKEOVER_BATCH.into(),
                    ]
                    .into_iter()
                    .chain(open.iter().cloned()),
                ))
                .await?
                .rows_affected()
        } else {
            subtasks::Entity::update_many()
                .col_expr(
                    subtasks::Column::LeaseOwner,
                    Expr::value(state.instance_id()),
                )
                .col_expr(subtasks::Column::LeaseUntil, Expr::value(until))
                .filter(subtasks::Column::LeaseOwner.eq(dead))
                .exec(&state.db)
                .await?
                .rows_affected
        };
        taken += n;
        if n < u64::try_from(TAKEOVER_BATCH).unwrap_or(u64::MAX) {
            return Ok(taken);
        }
    }
}

/// Beats every `cluster.heartbeat` until `stop`, and (on PostgreSQL) wakes the driver's queue when another
/// instance queued messages for devices held here.
pub async fn run(state: Context, driver: Driver, stop: CancellationToken) {
    if state.clustered() {
        let (s, d, st) = (state.clone(), driver.clone(), stop.clone());
        tokio::spawn(async move { listen(s, d, st).await });
        let (s, d, st) = (state.clone(), driver.clone(), stop.clone());
        tokio::spawn(async move { d.deliver_queued(s, st).await });
    }
    let mut tick = tokio::time::interval(state.settings.cluster.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Reaping a large dead instance takes long: it runs beside the heartbeat, one at a time, so that
    // this instance never looks dead to the others while it takes a dead one's work over.
    let mut reaping: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                if let Some(r) = reaping {
                    r.abort();
                }
                return;
            }
            _ = tick.tick() => {
                match renew(&state).await {
                    Ok(r) if r.rejoined => {
                        let (s, d) = (state.clone(), driver.clone());
                        tokio::spawn(async move {
                            if let Err(e) = hold_again(&s, &d).await {
                                tracing::warn!(error.message = %e, "cluster: recording held connections again failed");
                            }
                        });
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error.message = %e, "cluster: heartbeat failed"),
                }
                if reaping.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                    let (s, d) = (state.clone(), driver.clone());
                    reaping = Some(tokio::spawn(async move {
                        if let Err(e) = reap_dead(&s, &d).await {
                            tracing::warn!(error.message = %e, "cluster: reaping dead instances failed");
                        }
                    }));
                }
            }
        }
    }
}

/// `LISTEN`s for queued device messages; reconnects after a lost connection.
async fn listen(state: Context, driver: Driver, stop: CancellationToken) {
    use sea_orm::sqlx::postgres::PgListener;
    let channel = crate::driver::MESSAGES_CHANNEL;
    loop {
        let pool = state.db.get_postgres_connection_pool();
        let result = async {
            let mut listener = PgListener::connect_with(pool).await?;
            listener.listen(channel).await?;
            // Anything queued while nobody listened.
            driver.wake_queue();
            loop {
                let n = listener.recv().await?;
                if n.payload() == state.instance_id() {
                    driver.wake_queue();
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sea_orm::sqlx::Error>(())
        };
        tokio::select! {
            () = stop.cancelled() => return,
            r = result => {
                if let Err(e) = r {
                    tracing::warn!(error.message = %e, "cluster: listening for queued messages failed");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
