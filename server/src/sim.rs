//! Simulated MQTT devices (`updraft sim mqtt`): each one logs in as an IoTDA device, answers
//! `version_query`, downloads the package over HTTPS with its token, checks the SHA-256 and reports
//! progress and result, exactly as Huawei's device SDKs do. Knobs make devices misbehave in the ways real
//! fleets do. Used by the integration tests, the benchmark, and operators for dry runs.
//!
//! Like Huawei's Python and Go SDKs, a simulated device does **not** subscribe to its system topic unless
//! told to (`subscribe`): the platform must deliver `version_query` anyway.

mod link;
pub mod lwm2m;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// How a simulated device behaves when asked to upgrade.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Behaviour {
    /// Download, verify, report progress and success on the new version.
    #[default]
    Normal,
    /// Refuse the upgrade at once with `fail_code` (default 1, "device in use"), downloading nothing.
    Refuse,
    /// Download and verify, then report `fail_code` (default 10, "installation failure").
    Fail,
    /// Never answer anything (not even `version_query`).
    Silent,
    /// Cut the download halfway, drop the MQTT connection, reconnect, and resume with a Range request.
    Resume,
}

/// One device's credentials.
#[derive(Clone, Debug)]
pub struct SimDevice {
    /// The device id.
    pub device_id: String,
    /// Its secret.
    pub secret: String,
}

/// How every device of a run behaves and where it connects.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// MQTT host.
    pub host: String,
    /// MQTT port.
    pub port: u16,
    /// Use TLS (port 8883), trusting `ca_pem`.
    pub tls: bool,
    /// The CA to trust for MQTT over TLS and for HTTPS downloads (PEM).
    pub ca_pem: Vec<u8>,
    /// The software version devices run before upgrading.
    pub sw_version: String,
    /// The firmware version devices run before upgrading.
    pub fw_version: String,
    /// The behaviour.
    pub behaviour: Behaviour,
    /// The result code for `refuse` and `fail`.
    pub fail_code: Option<i64>,
    /// Subscribe to `$oc/devices/{id}/sys/events/down` (as Huawei's C SDK does); off by default.
    pub subscribe: bool,
    /// Signature type in the client id (0 or 1).
    pub sig_type: u8,
    /// At most this many devices are between TCP connect and CONNACK at once: a fleet's logins arrive
    /// spread out, not as one burst of SYNs.
    pub max_connecting: usize,
    /// At most this many downloads at once in this process: a fleet simulated in one process shares one
    /// descriptor limit, which real devices do not (a device past it waits, as for a busy server).
    pub max_downloading: usize,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 1883,
            tls: false,
            ca_pem: Vec::new(),
            sw_version: "1.0".to_owned(),
            fw_version: "1.0".to_owned(),
            behaviour: Behaviour::Normal,
            fail_code: None,
            subscribe: false,
            sig_type: 1,
            max_connecting: 256,
            max_downloading: 512,
        }
    }
}

/// Counters shared by a run's devices.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Devices logged in at least once.
    pub connected: AtomicU64,
    /// Version reports sent.
    pub version_reports: AtomicU64,
    /// Upgrade events received.
    pub upgrades: AtomicU64,
    /// Downloads completed with the right SHA-256.
    pub downloads: AtomicU64,
    /// Package bytes downloaded.
    pub bytes: AtomicU64,
    /// Successes reported.
    pub succeeded: AtomicU64,
    /// Failures reported (refuse, fail, bad download).
    pub failed: AtomicU64,
    /// Logins refused (the device tries again later).
    pub errors: AtomicU64,
    /// Connections that failed or dropped and were tried again.
    pub reconnects: AtomicU64,
    /// Download attempts that the server could not serve (busy, an error, a broken connection) and that
    /// were tried again.
    pub download_retries: AtomicU64,
    /// Upgrade commands, other than the one it installed with, for the version a device already runs (it
    /// reports success again and installs nothing): how often the platform asked a device to run an
    /// upgrade it had finished, which a naive device would have run twice.
    pub repeated: AtomicU64,
    /// The command a device installed with, received again after installing (a re-send that crossed
    /// the final report); answered with success.
    pub duplicates: AtomicU64,
}

/// The client id and password a device sends for the hour of `now_unix_ms` (`protocols.md` §1.1).
#[must_use]
pub fn login(device_id: &str, secret: &str, sig_type: u8, now_unix_ms: i64) -> (String, String) {
    let ts = chrono::DateTime::from_timestamp_millis(now_unix_ms)
        .unwrap_or_default()
        .format("%Y%m%d%H")
        .to_string();
    (
        format!("{device_id}_0_{sig_type}_{ts}"),
        protocol::mqtt_auth::password(secret, &ts),
    )
}

/// How long a device waits before its `failures`-th retry (a reconnect, or another download attempt):
/// 1 s doubling up to 32 s, with ±50 % jitter so a fleet that lost its server does not come back in
/// lockstep. Huawei's Python SDK retries its connection the same way (1 s to 30 s).
fn backoff(failures: u32) -> Duration {
    let base = 1000u64 << failures.saturating_sub(1).min(5);
    let jitter = rand::random_range(0.5..1.5);
    Duration::from_millis((base as f64 * jitter) as u64)
}

/// A report waiting for a connection to be published on.
struct Report {
    event_type: &'static str,
    paras: Value,
}

/// What a background download tells its device.
enum Fetch {
    /// `Behaviour::Resume` cut the transfer halfway: drop the connection, and notify `resume` after the
    /// next CONNACK.
    Cut,
    /// The whole package arrived and its SHA-256 and size match.
    Verified,
    /// The whole package arrived but does not match `sign` or `file_size`.
    Corrupt,
    /// The server refused the download for good (its token is unknown, expired or revoked).
    Refused(String),
}

/// An upgrade being downloaded in the background while the MQTT connection comes and goes, as a device
/// downloads over its own HTTPS connection.
struct Upgrade {
    /// The version being installed.
    version: String,
    /// The latest `*_upgrade` parameters: an event re-sent after a server restart may carry a new URL or
    /// token, which the next download attempt uses.
    paras: tokio::sync::watch::Sender<Value>,
    /// What the download reports.
    events: tokio::sync::mpsc::UnboundedReceiver<Fetch>,
    /// Wakes a download cut by `Behaviour::Resume` once the device is back.
    resume: Arc<tokio::sync::Notify>,
    task: tokio::task::AbortHandle,
}

impl Drop for Upgrade {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the device is doing between MQTT events.
struct Device {
    opts: Arc<SimOptions>,
    creds: SimDevice,
    http: reqwest::Client,
    stats: Arc<SimStats>,
    /// Limits devices connecting at once (see [`SimOptions::max_connecting`]).
    connecting: Arc<tokio::sync::Semaphore>,
    /// Limits downloads at once (see [`SimOptions::max_downloading`]).
    downloading: Arc<tokio::sync::Semaphore>,
    sw: String,
    fw: String,
    /// The upgrade in progress, if any.
    upgrade: Option<Upgrade>,
    /// Reports not yet handed to a connection (made while disconnected, or whose publish failed).
    pending: std::collections::VecDeque<Report>,
    /// `Behaviour::Resume` cuts the first download only.
    cut_done: bool,
    /// The download token of the last installed upgrade.
    installed_with: Option<String>,
}

/// Runs `devices` until `stop`; each connects, answers and upgrades as `opts` says. `now` gives the login
/// timestamp (a test's manual clock, or the wall clock). Devices never give up: a refused login, a lost
/// connection or a download the server could not serve is tried again with backoff, as real devices do.
pub async fn run_fleet(
    opts: SimOptions,
    devices: Vec<SimDevice>,
    now: Arc<dyn Fn() -> i64 + Send + Sync>,
    stats: Arc<SimStats>,
    stop: CancellationToken,
) -> Result<()> {
    let opts = Arc::new(opts);
    let mut http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120));
    if !opts.ca_pem.is_empty() {
        http = http.tls_certs_only([
            reqwest::Certificate::from_pem(&opts.ca_pem).context("the CA certificate (PEM)")?
        ]);
    }
    let http = http.build().context("building the HTTPS client")?;
    let connecting = Arc::new(tokio::sync::Semaphore::new(opts.max_connecting.max(1)));
    let downloading = Arc::new(tokio::sync::Semaphore::new(opts.max_downloading.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for creds in devices {
        let device = Device {
            connecting: connecting.clone(),
            downloading: downloading.clone(),
            sw: opts.sw_version.clone(),
            fw: opts.fw_version.clone(),
            opts: opts.clone(),
            creds,
            http: http.clone(),
            stats: stats.clone(),
            upgrade: None,
            pending: std::collections::VecDeque::new(),
            cut_done: false,
            installed_with: None,
        };
        let (now, stop) = (now.clone(), stop.clone());
        tasks.spawn(async move {
            let id = device.creds.device_id.clone();
            if let Err(e) = device.run(now, stop).await {
                tracing::warn!(device_id = %id, error = %format!("{e:#}"), "sim: device stopped");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// What woke the device's loop.
enum Wake {
    Stop,
    Mqtt(std::result::Result<Event, rumqttc::ConnectionError>),
    Fetch(Fetch),
}

/// The next message of the upgrade in progress; never, without one.
async fn next_fetch(upgrade: &mut Option<Upgrade>) -> Fetch {
    match upgrade {
        Some(u) => match u.events.recv().await {
            Some(f) => f,
            // The download task ended without a word (it panicked): try the download again later.
            None => Fetch::Refused("the download task ended".to_owned()),
        },
        None => std::future::pending().await,
    }
}

impl Device {
    fn options(&self, now_ms: i64) -> MqttOptions {
        let (client_id, password) = login(
            &self.creds.device_id,
            &self.creds.secret,
            self.opts.sig_type,
            now_ms,
        );
        let mut o = MqttOptions::new(client_id, self.opts.host.clone(), self.opts.port);
        o.set_credentials(self.creds.device_id.clone(), password)
            .set_keep_alive(Duration::from_secs(120))
            .set_clean_session(true)
            .set_max_packet_size(1 << 20, 1 << 20);
        if self.opts.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
                ca: self.opts.ca_pem.clone(),
                alpn: None,
                client_auth: None,
            }));
        }
        o
    }

    async fn run(
        mut self,
        now: Arc<dyn Fn() -> i64 + Send + Sync>,
        stop: CancellationToken,
    ) -> Result<()> {
        let up = format!("$oc/devices/{}/sys/events/up", self.creds.device_id);
        let down = format!("$oc/devices/{}/sys/events/down", self.creds.device_id);
        // Failed attempts since the last CONNACK: the reconnect delay grows with them.
        let mut failures: u32 = 0;
        let mut counted = false;
        'connection: loop {
            let mut permit = Some(
                self.connecting
                    .clone()
                    .acquire_owned()
                    .await
                    .context("the connect gate closed")?,
            );
            let (client, mut events) = AsyncClient::new(self.options(now()), 64);
            // Device SDKs wait longer than rumqttc's 5 s for a CONNACK (Paho: 30 s).
            let mut network = events.network_options();
            network.set_connection_timeout(30);
            events.set_network_options(network);
            let mut connected = false;
            loop {
                let wake = tokio::select! {
                    () = stop.cancelled() => Wake::Stop,
                    e = events.poll() => Wake::Mqtt(e),
                    f = next_fetch(&mut self.upgrade) => Wake::Fetch(f),
                };
                let p = match wake {
                    Wake::Stop => {
                        let _ = client.disconnect().await;
                        return Ok(());
                    }
                    Wake::Fetch(Fetch::Cut) => {
                        // Drop the connection without DISCONNECT, like a device losing signal.
                        drop(events);
                        drop(client);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue 'connection;
                    }
                    Wake::Fetch(fetched) => {
                        self.installed(fetched);
                        if connected && self.flush(&client, &up).await.is_err() {
                            continue 'connection;
                        }
                        continue;
                    }
                    Wake::Mqtt(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        permit = None;
                        failures = 0;
                        connected = true;
                        if !counted {
                            counted = true;
                            self.stats.connected.fetch_add(1, Ordering::Relaxed);
                        }
                        if self.opts.subscribe {
                            client.subscribe(&down, QoS::AtMostOnce).await?;
                        }
                        if let Some(u) = &self.upgrade {
                            u.resume.notify_one();
                        }
                        if self.flush(&client, &up).await.is_err() {
                            continue 'connection;
                        }
                        continue;
                    }
                    Wake::Mqtt(Ok(Event::Incoming(Packet::Publish(p)))) => p,
                    Wake::Mqtt(Ok(_)) => continue,
                    Wake::Mqtt(Err(e)) => {
                        if let rumqttc::ConnectionError::ConnectionRefused(code) = e {
                            // A busy server (3) and even bad credentials (4, 5) are tried again, slowly:
                            // Huawei's SDKs keep retrying after a refusal too (protocols.md §1.1).
                            self.stats.errors.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(device_id = %self.creds.device_id, ?code, "sim: login refused");
                        } else {
                            tracing::debug!(device_id = %self.creds.device_id, error = %e, "sim: reconnecting");
                        }
                        drop(permit.take());
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        failures = failures.saturating_add(1);
                        tokio::select! {
                            () = stop.cancelled() => return Ok(()),
                            () = tokio::time::sleep(backoff(failures)) => {}
                        }
                        continue 'connection;
                    }
                };
                if self.opts.behaviour == Behaviour::Silent
                    || !p.topic.ends_with("/sys/events/down")
                {
                    continue;
                }
                let Ok(message) = serde_json::from_slice::<Value>(&p.payload) else {
                    continue;
                };
                for service in message["services"].as_array().into_iter().flatten() {
                    if service["service_id"] != "$ota" {
                        continue;
                    }
                    let paras = service["paras"].clone();
                    match service["event_type"].as_str().unwrap_or_default() {
                        "version_query" => {
                            self.queue(
                                "version_report",
                                json!({ "sw_version": self.sw, "fw_version": self.fw }),
                            );
                            self.stats.version_reports.fetch_add(1, Ordering::Relaxed);
                        }
                        "software_upgrade"
                        | "firmware_upgrade"
                        | "software_upgrade_v2"
                        | "firmware_upgrade_v2" => self.asked_to_upgrade(paras),
                        _ => {}
                    }
                }
                if self.flush(&client, &up).await.is_err() {
                    continue 'connection;
                }
            }
        }
    }

    /// An upgrade event arrived (perhaps again, after a reconnect or a server restart).
    fn asked_to_upgrade(&mut self, paras: Value) {
        let version = paras["version"].as_str().unwrap_or_default().to_owned();
        if self.opts.behaviour == Behaviour::Refuse {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            let code = self.opts.fail_code.unwrap_or(1);
            self.queue(
                "upgrade_progress_report",
                json!({
                    "result_code": code, "version": self.sw, "progress": 0,
                    "description": "refused by the simulator",
                }),
            );
            return;
        }
        if version == self.sw {
            // Installed already: say so again, install nothing. The same command again (its token is
            // the one the device installed with: a re-send that crossed the device's final report) is
            // a duplicate; a new command for a version the device runs would have made a naive device
            // install twice.
            let token = paras["access_token"].as_str().map(str::to_owned);
            if token.is_some() && token == self.installed_with {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.repeated.fetch_add(1, Ordering::Relaxed);
            }
            self.queue(
                "upgrade_progress_report",
                json!({
                    "result_code": 0, "version": version, "progress": 100,
                    "description": "upgrade success",
                }),
            );
            return;
        }
        if let Some(u) = &self.upgrade
            && u.version == version
        {
            // Downloading it already: the next attempt (if any) uses the newest URL and token.
            u.paras.send_replace(paras);
            return;
        }
        self.stats.upgrades.fetch_add(1, Ordering::Relaxed);
        let (paras_tx, paras_rx) = tokio::sync::watch::channel(paras);
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let resume = Arc::new(tokio::sync::Notify::new());
        let cut =
            (self.opts.behaviour == Behaviour::Resume && !self.cut_done).then(|| resume.clone());
        self.cut_done |= cut.is_some();
        let task = tokio::spawn(fetch(
            self.downloading.clone(),
            self.http.clone(),
            paras_rx,
            self.stats.clone(),
            cut,
            events_tx,
            self.creds.device_id.clone(),
        ))
        .abort_handle();
        self.upgrade = Some(Upgrade {
            version,
            paras: paras_tx,
            events,
            resume,
            task,
        });
    }

    /// The download ended: install, or report why not.
    fn installed(&mut self, fetched: Fetch) {
        let Some(upgrade) = self.upgrade.take() else {
            return;
        };
        let current = self.sw.clone();
        let (code, description) = match fetched {
            Fetch::Cut => {
                self.upgrade = Some(upgrade);
                return;
            }
            Fetch::Verified => {
                self.queue(
                    "upgrade_progress_report",
                    json!({
                        "result_code": 0, "version": current, "progress": 50,
                        "description": "installing",
                    }),
                );
                if self.opts.behaviour == Behaviour::Fail {
                    (
                        self.opts.fail_code.unwrap_or(10),
                        "installation failed (simulated)".to_owned(),
                    )
                } else {
                    self.sw.clone_from(&upgrade.version);
                    self.fw.clone_from(&upgrade.version);
                    self.installed_with = upgrade.paras.borrow()["access_token"]
                        .as_str()
                        .map(str::to_owned);
                    self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
                    self.queue(
                        "upgrade_progress_report",
                        json!({
                            "result_code": 0, "version": upgrade.version, "progress": 100,
                            "description": "upgrade success",
                        }),
                    );
                    return;
                }
            }
            Fetch::Corrupt => (7, "package verification failed".to_owned()),
            Fetch::Refused(why) => (6, format!("download failed: {why}")),
        };
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.queue(
            "upgrade_progress_report",
            json!({
                "result_code": code, "version": current, "progress": 0, "description": description,
            }),
        );
    }

    fn queue(&mut self, event_type: &'static str, paras: Value) {
        self.pending.push_back(Report { event_type, paras });
    }

    /// Publishes the pending reports, in order. A report whose hand-over fails stays pending for the next
    /// connection.
    async fn flush(&mut self, client: &AsyncClient, up: &str) -> Result<()> {
        while let Some(report) = self.pending.pop_front() {
            // Shaped like the Python SDK's output: `event_id: null`, ISO-like event time.
            let message = json!({
                "object_device_id": self.creds.device_id,
                "services": [{
                    "service_id": "$ota", "event_type": report.event_type, "event_id": null,
                    "event_time": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    "paras": report.paras,
                }],
            });
            let sent = client
                .publish(up, QoS::AtLeastOnce, false, serde_json::to_vec(&message)?)
                .await;
            if let Err(e) = sent {
                self.pending.push_front(report);
                return Err(e).context("publishing a report");
            }
        }
        Ok(())
    }
}

/// How one download attempt ended.
enum Attempt {
    /// Every byte is here.
    Complete,
    /// Stopped at the cut point (`Behaviour::Resume`).
    Cut,
    /// A server-side problem (busy, an error, a broken connection): try again after this long.
    Retry(Option<Duration>, String),
    /// Refused for good (4xx).
    Refused(String),
}

/// Downloads the package of `paras` in the background, resuming with `Range` after every interruption,
/// until it is whole: a 503 waits its `Retry-After`, other server errors and broken connections back
/// off; only a 4xx answer that a newer upgrade event does not replace within 30 s ends it.
async fn fetch(
    downloading: Arc<tokio::sync::Semaphore>,
    http: reqwest::Client,
    mut paras: tokio::sync::watch::Receiver<Value>,
    stats: Arc<SimStats>,
    mut cut: Option<Arc<tokio::sync::Notify>>,
    events: tokio::sync::mpsc::UnboundedSender<Fetch>,
    device_id: String,
) {
    let mut body = Vec::new();
    let mut failures = 0u32;
    loop {
        let p = paras.borrow_and_update().clone();
        let stop_at = cut
            .as_ref()
            .map(|_| p["file_size"].as_u64().unwrap_or(0) / 2);
        let Ok(permit) = downloading.acquire().await else {
            return;
        };
        let outcome = attempt(&http, &p, &mut body, stop_at, &stats).await;
        drop(permit);
        let outcome = match outcome {
            Ok(a) => a,
            Err(e) => Attempt::Retry(None, format!("{e:#}")),
        };
        match outcome {
            Attempt::Complete => {
                let ok = p["sign"]
                    .as_str()
                    .is_none_or(|s| s.eq_ignore_ascii_case(&hex::encode(Sha256::digest(&body))))
                    && p["file_size"]
                        .as_u64()
                        .is_none_or(|n| n == body.len() as u64);
                if ok {
                    stats.downloads.fetch_add(1, Ordering::Relaxed);
                }
                let _ = events.send(if ok { Fetch::Verified } else { Fetch::Corrupt });
                return;
            }
            Attempt::Cut => {
                let resume = cut.take().unwrap_or_default();
                let _ = events.send(Fetch::Cut);
                resume.notified().await;
            }
            Attempt::Retry(after, why) => {
                failures = failures.saturating_add(1);
                stats.download_retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%device_id, %why, "sim: download interrupted, trying again");
                let wait = after.unwrap_or_else(|| backoff(failures));
                // A re-sent upgrade event (new URL or token) is tried at once.
                let _ = tokio::time::timeout(wait, paras.changed()).await;
            }
            Attempt::Refused(why) => {
                if tokio::time::timeout(Duration::from_secs(30), paras.changed())
                    .await
                    .is_ok_and(|changed| changed.is_ok())
                {
                    continue;
                }
                let _ = events.send(Fetch::Refused(why));
                return;
            }
        }
    }
}

/// One GET of `paras.url` from `body.len()` (to `stop_at`, exclusive, when given), appending to `body`.
async fn attempt(
    http: &reqwest::Client,
    paras: &Value,
    body: &mut Vec<u8>,
    stop_at: Option<u64>,
    stats: &SimStats,
) -> Result<Attempt> {
    let url = paras["url"].as_str().context("no url")?;
    let token = paras["access_token"].as_str().unwrap_or_default();
    let mut req = http.get(url);
    if !token.is_empty() {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let offset = body.len() as u64;
    if offset > 0 {
        req = req.header("range", format!("bytes={offset}-"));
    }
    let resp = req.send().await.context("download request")?;
    let status = resp.status();
    match status.as_u16() {
        200 => body.clear(),
        206 if offset > 0 => {}
        416 => {
            // What we hold does not fit the object any more: start over.
            body.clear();
            return Ok(Attempt::Retry(Some(Duration::ZERO), "416".into()));
        }
        503 | 429 => {
            let after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| {
                    // Spread a crowd that was told the same number.
                    Duration::from_millis(s * 1000).mul_f64(rand::random_range(1.0..1.5))
                });
            return Ok(Attempt::Retry(after, format!("answered {status}")));
        }
        s if s >= 500 => return Ok(Attempt::Retry(None, format!("answered {status}"))),
        _ => return Ok(Attempt::Refused(format!("answered {status}"))),
    }
    let mut stream = resp.bytes_stream();
    let mut got = body.len() as u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("download body")?;
        let take = match stop_at {
            Some(end) => usize::try_from(end.saturating_sub(got))
                .unwrap_or(usize::MAX)
                .min(chunk.len()),
            None => chunk.len(),
        };
        body.extend_from_slice(&chunk[..take]);
        got += take as u64;
        stats.bytes.fetch_add(take as u64, Ordering::Relaxed);
        if stop_at.is_some_and(|end| got >= end) {
            return Ok(Attempt::Cut);
        }
    }
    Ok(Attempt::Complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_match_the_python_sdk() {
        // 2018-07-24T17:56:20Z, secret 12345678 (protocols.md §1.1 example hour).
        let (id, pw) = login("D39564861q3gDa", "12345678", 0, 1_532_454_980_000);
        assert_eq!(id, "D39564861q3gDa_0_0_2018072417");
        assert_eq!(
            pw,
            "cda20ea47ca2e8f01d9dd8aa9eb7e7937562f5be6982ea82d46c582c4a476b3f"
        );
    }
}
