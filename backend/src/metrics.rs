//! Prometheus metrics (`GET /metrics`, README "Metrics"): the families an operator watches a fleet by.
//!
//! One registry per instance ([`prometheus_client`]: no global recorder, so several instances in one
//! process, as the tests run them, keep theirs apart). Counters move where things happen; what is stored
//! (subtasks and tasks by status, the notification backlog) is counted in the database when scraped
//! ([`Metrics::refresh`]), so those gauges are the whole fleet's, the same on every instance of a
//! cluster (aggregate them with `max`, not `sum`). Labels are few and bounded: never a device or task id.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sea_orm::{DatabaseConnection, FromQueryResult, Statement};

use crate::Result;

/// A subtask's place: its status (IoTDA's names), step and the device's protocol.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubtaskLabels {
    /// `Waitting`, `Processing`, `Success`, `Fail`, `Stopped`...
    pub status: String,
    /// The flow's step (`version`, `download`, `execute`...).
    pub step: String,
    /// `MQTT` or `CoAP`.
    pub protocol: String,
}

/// A subtask status change.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// The status before.
    pub from: String,
    /// The status after.
    pub to: String,
}

/// A status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// The status.
    pub status: String,
}

/// A step of an upgrade.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// The step.
    pub step: String,
}

/// Which way an MQTT message went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `in` (from devices) or `out` (to devices).
    pub direction: &'static str,
}

/// Why something was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A short fixed reason.
    pub reason: &'static str,
}

/// A cell concurrency cap (50, 10 or 1 by default).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapLabels {
    /// The cap.
    pub cap: u32,
}

/// An HTTP status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// The code.
    pub code: u16,
}

/// How a push notification delivery ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `delivered`, `failed` (will be retried) or `abandoned`.
    pub outcome: &'static str,
}

/// An HTTP request: its route template (never the path itself) and answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route template (`/v5/iot/{project_id}/batchtasks`), or `other`.
    pub route: String,
    /// The status code.
    pub code: u16,
}

/// An HTTP route template.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route template, or `other`.
    pub route: String,
}

/// The build.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// A subtask's change, as the metrics see it.
#[derive(Debug)]
pub struct SubtaskChange {
    /// The subtask.
    pub id: i64,
    /// Its status before.
    pub from: &'static str,
    /// Its status now.
    pub to: String,
    /// Its step before.
    pub step_before: String,
    /// Its step now.
    pub step: String,
    /// Whether it is over.
    pub finished: bool,
}

/// A histogram family whose members share buckets.
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn step_histogram() -> Histogram {
    // From a second to a day: a version query answers in seconds, an NB-IoT download takes hours.
    Histogram::new([
        1.0,
        5.0,
        15.0,
        60.0,
        300.0,
        900.0,
        3600.0,
        4.0 * 3600.0,
        86_400.0,
    ])
}

fn http_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

/// The instance's metrics.
pub struct Metrics {
    registry: Registry,
    /// The families registered (a family shows in a scrape once it has a sample).
    names: Vec<&'static str>,
    /// Subtasks by status, step and protocol (counted in the database when scraped).
    pub subtasks: Family<SubtaskLabels, Gauge>,
    /// Subtask status changes made by this instance.
    pub subtask_transitions: Family<TransitionLabels, Counter>,
    /// Tasks by status (counted in the database when scraped).
    pub tasks: Family<StatusLabels, Gauge>,
    /// How long subtasks spent in a step, observed when they leave it (on the instance that saw them
    /// enter it).
    pub task_step_seconds: Histograms<StepLabels>,
    /// MQTT devices connected to this instance.
    pub mqtt_connections: Gauge,
    /// MQTT messages from and to devices.
    pub mqtt_messages: Family<DirectionLabels, Counter>,
    /// MQTT connections and messages refused.
    pub mqtt_refused: Family<ReasonLabels, Counter>,
    /// LwM2M devices registered with this instance.
    pub lwm2m_registrations: Gauge,
    /// Confirmable CoAP messages sent again for want of an ACK.
    pub coap_retransmissions: Counter,
    /// PCP segments sent to devices.
    pub pcp_segments: Counter,
    /// LwM2M download slots held in the cells, by the cells' cap (counted in the database when scraped:
    /// the whole fleet's).
    pub cell_slots_in_use: Family<CapLabels, Gauge>,
    /// Package bytes sent to devices over HTTPS.
    pub download_bytes: Counter,
    /// Package downloads being sent.
    pub downloads_in_flight: Gauge,
    /// Package download answers by status code.
    pub download_responses: Family<CodeLabels, Counter>,
    /// Push notification deliveries by outcome.
    pub webhook_deliveries: Family<OutcomeLabels, Counter>,
    /// Notifications not yet delivered: events not yet fanned out to subscriptions, and deliveries
    /// pending (counted in the database when scraped).
    pub outbox_backlog: Gauge,
    /// HTTP requests by route and status code.
    pub http_requests: Family<HttpLabels, Counter>,
    /// HTTP request durations by route.
    pub http_request_seconds: Histograms<RouteLabels>,
    resident_memory: Gauge,
    open_fds: Gauge,
    /// When each subtask entered its step, for [`Metrics::task_step_seconds`].
    step_started: Mutex<StepsStarted>,
}

/// A step entered longer ago than this is forgotten (its subtask was deleted, or finished on another
/// instance after a takeover); a step that really lasts longer is not observed. Longer than any step's
/// timeout (24 h) with room for retries.
const STEP_HORIZON_MS: i64 = 7 * 24 * 3_600_000;

/// When each subtask entered its step (ms), bounded by [`STEP_HORIZON_MS`]: entries past it are swept
/// when the map has doubled since the last sweep.
#[derive(Debug)]
struct StepsStarted {
    entered: HashMap<i64, (String, i64)>,
    sweep_at: usize,
}

impl Default for StepsStarted {
    fn default() -> Self {
        Self {
            entered: HashMap::new(),
            sweep_at: Self::MIN_SWEEP,
        }
    }
}

impl StepsStarted {
    const MIN_SWEEP: usize = 1 << 16;

    /// Remembers that `id` entered `step` at `at`, first forgetting entries past the horizon when the
    /// map has grown enough (amortised: each sweep at least halves what the next one may find stale).
    fn insert(&mut self, id: i64, step: String, at: i64) {
        if self.entered.len() >= self.sweep_at {
            self.entered
                .retain(|_, (_, since)| at - *since < STEP_HORIZON_MS);
            self.sweep_at = (self.entered.len() * 2).max(Self::MIN_SWEEP);
        }
        self.entered.insert(id, (step, at));
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The families, registered.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let subtasks = Family::<SubtaskLabels, Gauge>::default();
        let subtask_transitions = Family::<TransitionLabels, Counter>::default();
        let tasks = Family::<StatusLabels, Gauge>::default();
        let task_step_seconds = Histograms::<StepLabels>::new_with_constructor(step_histogram);
        let mqtt_connections = Gauge::default();
        let mqtt_messages = Family::<DirectionLabels, Counter>::default();
        let mqtt_refused = Family::<ReasonLabels, Counter>::default();
        let lwm2m_registrations = Gauge::default();
        let coap_retransmissions = Counter::default();
        let pcp_segments = Counter::default();
        let cell_slots_in_use = Family::<CapLabels, Gauge>::default();
        let download_bytes = Counter::default();
        let downloads_in_flight = Gauge::default();
        let download_responses = Family::<CodeLabels, Counter>::default();
        let webhook_deliveries = Family::<OutcomeLabels, Counter>::default();
        let outbox_backlog = Gauge::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_request_seconds = Histograms::<RouteLabels>::new_with_constructor(http_histogram);
        let resident_memory = Gauge::default();
        let open_fds = Gauge::default();
        let start_time: Gauge = Gauge::default();
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        start_time.set(started);
        let mut names = Vec::new();
        macro_rules! reg {
            ($name:literal, $help:literal, $metric:expr $(,)?) => {{
                names.push($name);
                registry.register($name, $help, $metric);
            }};
        }
        reg!(
            "updraft_subtasks",
            "Subtasks by status, step and device protocol",
            subtasks.clone(),
        );
        reg!(
            "updraft_subtask_transitions",
            "Subtask status changes made by this instance",
            subtask_transitions.clone(),
        );
        reg!("updraft_tasks", "Upgrade tasks by status", tasks.clone());
        reg!(
            "updraft_task_step_seconds",
            "Time subtasks spent in a step, observed when they leave it",
            task_step_seconds.clone(),
        );
        reg!(
            "updraft_mqtt_connections",
            "MQTT devices connected to this instance",
            mqtt_connections.clone(),
        );
        reg!(
            "updraft_mqtt_messages",
            "MQTT messages from (in) and to (out) devices",
            mqtt_messages.clone(),
        );
        reg!(
            "updraft_mqtt_refused",
            "MQTT connections and messages refused, by reason",
            mqtt_refused.clone(),
        );
        reg!(
            "updraft_lwm2m_registrations",
            "LwM2M devices registered with this instance",
            lwm2m_registrations.clone(),
        );
        reg!(
            "updraft_coap_retransmissions",
            "Confirmable CoAP messages sent again for want of an ACK",
            coap_retransmissions.clone(),
        );
        reg!(
            "updraft_pcp_segments",
            "PCP segments sent to devices",
            pcp_segments.clone(),
        );
        reg!(
            "updraft_cell_slots_in_use",
            "LwM2M download slots held in cells, by the cells' cap",
            cell_slots_in_use.clone(),
        );
        reg!(
            "updraft_download_bytes",
            "Package bytes sent to devices over HTTPS",
            download_bytes.clone(),
        );
        reg!(
            "updraft_downloads_in_flight",
            "Package downloads being sent",
            downloads_in_flight.clone(),
        );
        reg!(
            "updraft_download_responses",
            "Package download answers by status code",
            download_responses.clone(),
        );
        reg!(
            "updraft_webhook_deliveries",
            "Push notification deliveries by outcome",
            webhook_deliveries.clone(),
        );
        reg!(
            "updraft_outbox_backlog",
            "Notifications not yet delivered",
            outbox_backlog.clone(),
        );
        reg!(
            "updraft_http_requests",
            "HTTP requests by route template and status code",
            http_requests.clone(),
        );
        reg!(
            "updraft_http_request_seconds",
            "HTTP request durations by route template",
            http_request_seconds.clone(),
        );
        reg!(
            "updraft_process_resident_memory_bytes",
            "Resident memory of the process",
            resident_memory.clone(),
        );
        reg!(
            "updraft_process_open_fds",
            "File descriptors the process has open",
            open_fds.clone(),
        );
        reg!(
            "updraft_process_start_time_seconds",
            "When the process started, seconds since the Unix epoch",
            start_time.clone(),
        );
        reg!("updraft_build_info", "The build: its version", build);
        Self {
            registry,
            names,
            subtasks,
            subtask_transitions,
            tasks,
            task_step_seconds,
            mqtt_connections,
            mqtt_messages,
            mqtt_refused,
            lwm2m_registrations,
            coap_retransmissions,
            pcp_segments,
            cell_slots_in_use,
            download_bytes,
            downloads_in_flight,
            download_responses,
            webhook_deliveries,
            outbox_backlog,
            http_requests,
            http_request_seconds,
            resident_memory,
            open_fds,
            step_started: Mutex::default(),
        }
    }

    /// A subtask changed (at `at`, ms): counts a status change, and observes the time spent in the step
    /// it left (when this instance saw it enter that step).
    pub fn subtask_changed(&self, change: &SubtaskChange, at: i64) {
        let SubtaskChange {
            id,
            from,
            to,
            step_before,
            step,
            finished,
        } = change;
        let (id, finished) = (*id, *finished);
        if from != to {
            self.subtask_transitions
                .get_or_create(&TransitionLabels {
                    from: (*from).to_owned(),
                    to: to.clone(),
                })
                .inc();
        }
        if step_before == step && !finished {
            return;
        }
        let mut started = self
            .step_started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((left, since)) = started.entered.remove(&id)
            && left == *step_before
        {
            #[allow(clippy::cast_precision_loss)]
            let seconds = (at - since).max(0) as f64 / 1000.0;
            self.task_step_seconds
                .get_or_create(&StepLabels { step: left })
                .observe(seconds);
        }
        if !finished {
            started.insert(id, step.clone(), at);
        }
    }

    /// Counts what is stored (subtasks, tasks, held cell slots, the notification backlog) and reads the process's
    /// memory and descriptors.
    ///
    /// # Errors
    /// When the database does not answer.
    pub async fn refresh(&self, db: &DatabaseConnection) -> Result<()> {
        #[derive(FromQueryResult)]
        struct SubtaskCount {
            status: String,
            step: String,
            protocol: Option<String>,
            n: i64,
        }
        #[derive(FromQueryResult)]
        struct StatusCount {
            status: String,
            n: i64,
        }
        #[derive(FromQueryResult)]
        struct Count {
            n: i64,
        }
        let backend = db.get_database_backend();
        // Grouped by task first (an index), then each task's protocol through its package's product.
        let subtasks = SubtaskCount::find_by_statement(Statement::from_string(
            backend,
            "SELECT s.status AS status, s.step AS step, p.protocol_type AS protocol, \
             CAST(SUM(s.n) AS BIGINT) AS n FROM (SELECT task_id, status, step, COUNT(*) AS n FROM subtasks \
             GROUP BY task_id, status, step) s JOIN tasks t ON t.id = s.task_id \
             LEFT JOIN packages k ON k.id = t.package_id LEFT JOIN products p ON p.id = k.product_id \
             GROUP BY s.status, s.step, p.protocol_type",
        ))
        .all(db)
        .await?;
        let tasks = StatusCount::find_by_statement(Statement::from_string(
            backend,
            "SELECT status, COUNT(*) AS n FROM tasks GROUP BY status",
        ))
        .all(db)
        .await?;
        let backlog = Count::find_by_statement(Statement::from_string(
            backend,
            "SELECT (SELECT COUNT(*) FROM outbox WHERE fanned_at IS NULL) + \
             (SELECT COUNT(*) FROM notification_deliveries WHERE status = 'pending') AS n",
        ))
        .one(db)
        .await?;
        #[derive(FromQueryResult)]
        struct CapCount {
            cap: i32,
            n: i64,
        }
        let slots = CapCount::find_by_statement(Statement::from_string(
            backend,
            "SELECT cap, COUNT(*) AS n FROM download_slots WHERE held GROUP BY cap",
        ))
        .all(db)
        .await?;
        self.cell_slots_in_use.clear();
        for c in slots {
            self.cell_slots_in_use
                .get_or_create(&CapLabels {
                    cap: u32::try_from(c.cap).unwrap_or(0),
                })
                .set(c.n);
        }
        self.subtasks.clear();
        for c in subtasks {
            self.subtasks
                .get_or_create(&SubtaskLabels {
                    status: c.status,
                    step: c.step,
                    protocol: c.protocol.unwrap_or_else(|| "unknown".to_owned()),
                })
                .set(c.n);
        }
        self.tasks.clear();
        for c in tasks {
            self.tasks
                .get_or_create(&StatusLabels { status: c.status })
                .set(c.n);
        }
        self.outbox_backlog.set(backlog.map_or(0, |c| c.n));
        if let Some(rss) = resident_bytes() {
            self.resident_memory.set(rss);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds
                .set(i64::try_from(fds.count()).unwrap_or(i64::MAX));
        }
        Ok(())
    }

    /// The names of the families (a family shows in a scrape once it has a sample).
    #[must_use]
    pub fn families(&self) -> &[&'static str] {
        &self.names
    }

    /// The metrics in the text format (OpenMetrics, which Prometheus reads).
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The process's resident memory (Linux: `/proc/self/statm`, in pages of 4 KiB).
fn resident_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_entered_long_ago_are_swept_once_the_map_has_grown() {
        let mut steps = StepsStarted::default();
        let n = i64::try_from(StepsStarted::MIN_SWEEP).unwrap();
        // Subtasks that entered a step and were never seen again (deleted, or taken over).
        for id in 0..n {
            steps.insert(id, "download".to_owned(), 0);
        }
        assert_eq!(steps.entered.len(), StepsStarted::MIN_SWEEP);
        // Within the horizon nothing is forgotten, only the sweep point moves on.
        steps.insert(n, "download".to_owned(), STEP_HORIZON_MS - 1);
        assert_eq!(steps.entered.len(), StepsStarted::MIN_SWEEP + 1);
        assert_eq!(steps.sweep_at, 2 * StepsStarted::MIN_SWEEP);
        for id in n + 1..2 * n {
            steps.insert(id, "download".to_owned(), STEP_HORIZON_MS + 10);
        }
        // Past it, the next sweep drops the stale entries and keeps the recent ones.
        steps.insert(2 * n, "execute".to_owned(), STEP_HORIZON_MS + 20);
        assert_eq!(steps.entered.len(), StepsStarted::MIN_SWEEP + 1);
        assert!(!steps.entered.contains_key(&0));
        assert_eq!(steps.entered[&n].1, STEP_HORIZON_MS - 1);
        assert_eq!(steps.entered[&(2 * n)].0, "execute");
    }
}
