//! The task driver: runs every subtask's pure state machine (`domain::flow::mqtt` for MQTT products,
//! `domain::flow::lwm2m` for LwM2M/CoAP ones) against the database.
//!
//! Inputs come from three places: devices (connect, disconnect, `version_report`, `upgrade_progress_report`;
//! registration and PCP messages, through [`Driver::device_event`]), deadlines ([`Driver::run_due`], called
//! by [`Driver::run`] whenever the earliest `deadline_at` or `schedule_time` passes), and operators (start,
//! stop, retry, through `service::tasks`).
//!
//! Every transition follows the same order: the machine is loaded from its row and handed the input; the
//! new state (subtask row, task counters and status, step history, outbox) **commits in one transaction**
//! with what the effects write (download tokens issued or revoked, messages queued when this process has
//! no MQTT endpoint); only then are messages published. A crash between commit and publish loses at most a
//! message; the machine re-sends it when the device reconnects, and deadlines catch the rest. On start-up
//! nothing special is needed: the stored rows are the state. Many subtasks moving together (a task
//! starting, deadlines passing, a burst of device reports) share one transaction.
//!
//! Transitions are serialised by one in-process lock (`write`): SQLite has one writer anyway, and a
//! read-modify-write of a subtask must not interleave with another. The lock is never held across an
//! effect that leaves the process.
//!
//! The parts, one file each:
//! - `run`: the loop, deadlines and schedules; `start`: starting a task (targets resolved, subtasks
//!   begun); `commands`: stop, retry and device events; `recovery`: what start-up carries through.
//! - `apply`: the transition transaction, the one entry point that changes subtasks ([`Driver::apply_in`]);
//!   `transition`: one subtask's compare-and-set write, counters, step and outbox record; `plan`: a task's
//!   cached plan; `rollout`: waves, pauses, pacing and windows (what `domain::rollout` allows begins).
//! - The effects of each flow, mapped to I/O: `mqtt` (MQTT messages and download tokens), `pcp` (PCP
//!   frames and segment serving), `firmware` (the Firmware Update object); `effects`: what they work
//!   with, and the messages they collect, sent after the commit.
//! - `flow`: the two machines behind one face; `slots`: per-cell LwM2M download slots; `events`: what
//!   comes in from the adapters and goes out to the outbox; `tail`: the outbox records other processes
//!   wrote, broadcast here too.
//!
//! The driver works on a [`Context`] (the database, clock, store and settings), never on the
//! [`crate::AppState`] that holds it: services call the driver, the driver calls no service.

mod apply;
mod commands;
mod effects;
mod events;
mod firmware;
mod flow;
mod gateways;
mod mqtt;
mod pcp;
mod plan;
mod recovery;
mod rollout;
mod route;
mod run;
mod slots;
mod start;
mod tail;
mod transition;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{Notify, broadcast};

pub use self::events::{DeviceEvent, Event};
pub(crate) use self::flow::Step;
pub use self::mqtt::download_url;
use self::plan::TaskPlan;
pub use self::rollout::RolloutView;
pub use self::route::CHANNEL as MESSAGES_CHANNEL;
pub use self::start::TargetsFilter;
pub use self::start::UNCONFIRMED;
pub(crate) use self::start::{check_protocol, write_subtasks};
use crate::Result;
use crate::settings::DriverSettings;
use crate::storage::entity::packages;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Subtasks handled per transaction when many move at once (a task starts, deadlines pass together).
const BATCH: u64 = 500;

/// Where the driver publishes device messages (the MQTT adapter). Publishing is fire-and-forget: a device
/// that is not connected simply misses the message, and the machine's deadlines and re-sends handle it.
pub trait Downlink: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes `payload` on `device_id`'s `$oc/devices/{device_id}/sys/events/down` topic.
    fn publish(&self, device_id: &str, payload: Vec<u8>);

    /// Ends `device_id`'s connection, if it has one (it was frozen or deleted).
    fn disconnect(&self, _device_id: &str) {}

    /// The devices connected here now.
    fn held(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Where the driver sends LwM2M devices their PCP messages and reads (the CoAP adapter). Like
/// [`Downlink`], fire-and-forget: answers come back as [`DeviceEvent`]s, and deadlines handle silence.
pub trait Lwm2mLink: Send + Sync + std::fmt::Debug + 'static {
    /// Writes a PCP frame to the device's `/19/1/0`.
    fn send_pcp(&self, device_id: &str, frame: Vec<u8>);

    /// Reads the device's radio coverage (`/4/0`); the answer comes back as [`DeviceEvent::Coverage`]
    /// or [`DeviceEvent::CoverageFailed`].
    fn read_coverage(&self, device_id: &str);

    /// Reads the device's cell id (`/4/0/8`); the answer comes back as [`DeviceEvent::CellId`] or
    /// [`DeviceEvent::CellIdFailed`].
    fn read_cell_id(&self, device_id: &str);

    /// Starts serving `package`'s segments to the device (PCP 0x15), or stops (`None`; this also ends
    /// its block-wise firmware download).
    fn serve(&self, device_id: &str, download: Option<Arc<SegmentSource>>);

    /// Reads the device's firmware version (`/3/0/3`); the answer comes back as
    /// [`DeviceEvent::FirmwareVersion`] (a failed read sends nothing: re-asks and the deadline handle it).
    fn read_firmware_version(&self, device_id: &str);

    /// Writes the Package URI (`/5/0/1`), then observes the State (`/5/0/3`) and the Update Result
    /// (`/5/0/5`), whose values come back as [`DeviceEvent::FirmwareState`] and
    /// [`DeviceEvent::UpdateResult`]; a refused write as [`DeviceEvent::UriRefused`]. `blocks` is the
    /// download the URI opens when it is Updraft's CoAP one.
    fn start_firmware(&self, device_id: &str, uri: String, blocks: Option<BlockGrant>);

    /// Executes Update (`/5/0/2`).
    fn execute_update(&self, device_id: &str);

    /// The devices registered here now.
    fn held(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A block-wise firmware download (`coap://.../fw/<token>`) the driver opened.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockGrant {
    /// The token's stored id (its SHA-256).
    pub token_hash: String,
    /// When the token expires (ms on the injected clock).
    pub expires_at: i64,
    /// The package, as for segments.
    #[serde(with = "shared")]
    pub source: Arc<SegmentSource>,
}

/// Serialises an `Arc<T>` as the `T` it shares (serde's own needs its `rc` feature, and with it a
/// rebuild of every crate using serde).
mod shared {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer, T: Serialize>(
        v: &Arc<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        T::serialize(v, s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Arc<T>, D::Error> {
        T::deserialize(d).map(Arc::new)
    }
}

/// What a device downloads over PCP: the package and how it is cut.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentSource {
    /// The package.
    pub package_id: String,
    /// Its object key in the store.
    pub object_key: domain::package::ObjectKey,
    /// Its version (what 0x15 requests name).
    pub version: String,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes per segment.
    pub segment_size: u16,
}

impl SegmentSource {
    /// Segments in the package.
    #[must_use]
    pub fn count(&self) -> u16 {
        u16::try_from(protocol::pcp::segment_count(self.size, self.segment_size))
            .unwrap_or(u16::MAX)
    }
}

/// How a package is served over PCP.
pub(crate) fn segment_source(package: &packages::Model) -> Result<SegmentSource> {
    Ok(SegmentSource {
        package_id: package.id.clone(),
        object_key: packages::object_key(package)?,
        version: package.version.clone(),
        size: u64::try_from(package.size).unwrap_or(0),
        segment_size: u16::try_from(package.segment_size)
            .ok()
            .filter(|s| protocol::pcp::SEGMENT_SIZES.contains(s))
            .unwrap_or(protocol::pcp::DEFAULT_SEGMENT_SIZE),
    })
}

/// The task driver. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Driver {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: DriverSettings,
    downlink: RwLock<Option<Arc<dyn Downlink>>>,
    lwm2m: RwLock<Option<Arc<dyn Lwm2mLink>>>,
    write: tokio::sync::Mutex<()>,
    plans: Mutex<HashMap<String, Arc<TaskPlan>>>,
    wake: Notify,
    /// Another instance queued messages for devices held here.
    queued: Notify,
    events: broadcast::Sender<Event>,
    /// Outbox records this process wrote (and broadcasts itself), which its outbox tail skips; pruned as
    /// the tail passes them. Kept only once a tail started ([`Driver::outbox_head`]): a process without
    /// one (the command line) would only pile them up.
    own_records: Mutex<BTreeSet<i64>>,
    tailing: std::sync::atomic::AtomicBool,
    /// Outbox ids the tail passed without finding them, and since when (see `tail`).
    gaps: Mutex<std::collections::BTreeMap<i64, std::time::Instant>>,
    /// When the download slots were last repaired ([`Driver::reconcile_slots`]).
    reconciled: Mutex<Option<std::time::Instant>>,
    /// Whether this process runs the driver loop ([`Driver::run`]): only then does it start tasks.
    running: std::sync::atomic::AtomicBool,
    /// One rollout decision at a time in this process.
    rollout_lock: tokio::sync::Mutex<()>,
}

impl Driver {
    /// A driver with no downlink yet (see [`Driver::set_downlink`]).
    #[must_use]
    pub fn new(settings: DriverSettings) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            inner: Arc::new(Inner {
                settings,
                downlink: RwLock::new(None),
                lwm2m: RwLock::new(None),
                write: tokio::sync::Mutex::new(()),
                plans: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                queued: Notify::new(),
                events,
                own_records: Mutex::default(),
                tailing: std::sync::atomic::AtomicBool::new(false),
                gaps: Mutex::default(),
                reconciled: Mutex::default(),
                running: std::sync::atomic::AtomicBool::new(false),
                rollout_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Whether this process runs the driver loop. A process that does not (the command line) leaves
    /// starting tasks to the one that does, so that a task's first thousands of transitions are not
    /// fought over by two processes writing one SQLite file.
    #[must_use]
    pub fn is_running(&self) -> bool {
        self.inner
            .running
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The settings.
    #[must_use]
    pub fn settings(&self) -> &DriverSettings {
        &self.inner.settings
    }

    /// Ends a device's connection in this process, if it has one (a frozen or deleted device).
    pub fn disconnect(&self, device_id: &str) {
        if let Some(d) = self.downlink() {
            d.disconnect(device_id);
        }
    }

    /// The devices whose MQTT connection or LwM2M registration this process holds now.
    #[must_use]
    pub fn held_devices(&self) -> Vec<String> {
        let mut held = self.downlink().map(|d| d.held()).unwrap_or_default();
        held.extend(self.lwm2m_link().map(|l| l.held()).unwrap_or_default());
        held
    }

    /// Connects the driver to the CoAP adapter.
    pub fn set_lwm2m_link(&self, link: Arc<dyn Lwm2mLink>) {
        *self
            .inner
            .lwm2m
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(link);
    }

    fn lwm2m_link(&self) -> Option<Arc<dyn Lwm2mLink>> {
        self.inner
            .lwm2m
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Connects the driver to the device messaging adapter.
    pub fn set_downlink(&self, downlink: Arc<dyn Downlink>) {
        *self
            .inner
            .downlink
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(downlink);
    }

    /// Committed task and subtask changes, as they happen (a lagging receiver misses some; the outbox
    /// table has them all).
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Makes [`Driver::run`] look at deadlines now (after a manual clock moved, or new work).
    pub fn kick(&self) {
        self.inner.wake.notify_one();
    }

    /// Makes [`Driver::deliver_queued`] look for queued device messages now.
    pub fn wake_queue(&self) {
        self.inner.queued.notify_one();
    }

    /// Forgets a deleted task's cached plan.
    pub(crate) fn forget(&self, task_id: &str) {
        self.plans().remove(task_id);
    }

    fn plans(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<TaskPlan>>> {
        self.inner
            .plans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn downlink(&self) -> Option<Arc<dyn Downlink>> {
        self.inner
            .downlink
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the download slots are due for repair: once a second at most, however often the loop runs.
    fn reconcile_due(&self) -> bool {
        let mut last = lock(&self.inner.reconciled);
        let due = last.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(1));
        if due {
            *last = Some(std::time::Instant::now());
        }
        due
    }

    /// Records outbox ids as written by this process (before their transaction commits).
    fn own_records(&self, events: &[(i64, Event)]) {
        if !self
            .inner
            .tailing
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        lock(&self.inner.own_records).extend(events.iter().map(|(id, _)| *id));
    }

    fn publish_events(&self, events: Vec<(i64, Event)>) {
        for (_, e) in events {
            // No receiver is fine: nobody is watching.
            let _ = self.inner.events.send(e);
        }
    }
}
