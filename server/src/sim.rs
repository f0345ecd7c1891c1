//! Simulated MQTT devices (`updraft sim mqtt`): each one logs in as an IoTDA device, answers
//! `version_query`, downloads the package over HTTPS with its token, checks the SHA-256 and reports
//! progress and result, exactly as Huawei's device SDKs do. Knobs make devices misbehave in the ways real
//! fleets do. Used by the integration tests, the benchmark, and operators for dry runs.
//!
//! Like Huawei's Python and Go SDKs, a simulated device does **not** subscribe to its system topic unless
//! told to (`subscribe`): the platform must deliver `version_query` anyway.

pub mod lwm2m;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
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
    /// Logins refused or connections lost that ended a device.
    pub errors: AtomicU64,
    /// Connections that failed or dropped and were tried again.
    pub reconnects: AtomicU64,
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

/// How long a device waits before its `failures`-th reconnect: 1 s doubling up to 32 s, with ±50 %
/// jitter so a fleet that lost its server does not come back in lockstep.
fn reconnect_delay(failures: u32) -> Duration {
    let base = 1000u64 << failures.saturating_sub(1).min(5);
    let jitter = rand::random_range(0.5..1.5);
    Duration::from_millis((base as f64 * jitter) as u64)
}

/// What the device is doing between MQTT events.
struct Device {
    opts: Arc<SimOptions>,
    creds: SimDevice,
    http: reqwest::Client,
    stats: Arc<SimStats>,
    /// Limits devices connecting at once (see [`SimOptions::max_connecting`]).
    connecting: Arc<tokio::sync::Semaphore>,
    sw: String,
    fw: String,
    /// The bytes of a download in progress (kept across a reconnect, for `Behaviour::Resume`).
    partial: Vec<u8>,
}

/// Runs `devices` until `stop`; each connects, answers and upgrades as `opts` says. `now` gives the login
/// timestamp (a test's manual clock, or the wall clock).
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
        .timeout(Duration::from_secs(600));
    if !opts.ca_pem.is_empty() {
        http = http.tls_certs_only([
            reqwest::Certificate::from_pem(&opts.ca_pem).context("the CA certificate (PEM)")?
        ]);
    }
    let http = http.build().context("building the HTTPS client")?;
    let connecting = Arc::new(tokio::sync::Semaphore::new(opts.max_connecting.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for creds in devices {
        let device = Device {
            connecting: connecting.clone(),
            sw: opts.sw_version.clone(),
            fw: opts.fw_version.clone(),
            opts: opts.clone(),
            creds,
            http: http.clone(),
            stats: stats.clone(),
            partial: Vec::new(),
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

impl Device {
    fn options(&self, now_ms: i64) -> Result<MqttOptions> {
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
        Ok(o)
    }

    async fn run(
        mut self,
        now: Arc<dyn Fn() -> i64 + Send + Sync>,
        stop: CancellationToken,
    ) -> Result<()> {
        let up = format!("$oc/devices/{}/sys/events/up", self.creds.device_id);
        let down = format!("$oc/devices/{}/sys/events/down", self.creds.device_id);
        let mut resume_at: Option<(Value, u64)> = None;
        // `Resume` cuts the first download only.
        let mut cut = false;
        // Failed attempts since the last CONNACK: the reconnect delay grows with them.
        let mut failures: u32 = 0;
        'connection: loop {
            let mut permit = Some(
                self.connecting
                    .clone()
                    .acquire_owned()
                    .await
                    .context("the connect gate closed")?,
            );
            let (client, mut events) = AsyncClient::new(self.options(now())?, 64);
            // Device SDKs wait longer than rumqttc's 5 s for a CONNACK (Paho: 30 s).
            let mut network = events.network_options();
            network.set_connection_timeout(30);
            events.set_network_options(network);
            let mut counted = false;
            loop {
                let event = tokio::select! {
                    () = stop.cancelled() => {
                        let _ = client.disconnect().await;
                        return Ok(());
                    }
                    e = events.poll() => e,
                };
                let p = match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        permit = None;
                        failures = 0;
                        if !counted {
                            counted = true;
                            self.stats.connected.fetch_add(1, Ordering::Relaxed);
                        }
                        if self.opts.subscribe {
                            client.subscribe(&down, QoS::AtMostOnce).await?;
                        }
                        if let Some((paras, offset)) = resume_at.take() {
                            // Back after the deliberate drop: finish the download where it stopped.
                            self.upgrade(&client, &up, &paras, Some(offset)).await?;
                        }
                        continue;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => p,
                    Ok(_) => continue,
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        bail!("login refused: {code:?}");
                    }
                    Err(e) => {
                        tracing::debug!(device_id = %self.creds.device_id, error = %e, "sim: reconnecting");
                        drop(permit.take());
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        failures = failures.saturating_add(1);
                        tokio::select! {
                            () = stop.cancelled() => return Ok(()),
                            () = tokio::time::sleep(reconnect_delay(failures)) => {}
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
                            self.report(
                                &client,
                                &up,
                                "version_report",
                                json!({
                                    "sw_version": self.sw, "fw_version": self.fw,
                                }),
                            )
                            .await?;
                            self.stats.version_reports.fetch_add(1, Ordering::Relaxed);
                        }
                        "software_upgrade"
                        | "firmware_upgrade"
                        | "software_upgrade_v2"
                        | "firmware_upgrade_v2" => {
                            self.stats.upgrades.fetch_add(1, Ordering::Relaxed);
                            if self.opts.behaviour == Behaviour::Resume && !cut {
                                cut = true;
                                let size = paras["file_size"].as_u64().unwrap_or(0);
                                let half = size / 2;
                                self.download(&paras, 0, Some(half)).await?;
                                resume_at = Some((paras, half));
                                // Drop the connection without DISCONNECT, like a device losing signal.
                                drop(events);
                                drop(client);
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue 'connection;
                            }
                            self.upgrade(&client, &up, &paras, None).await?;
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Downloads (from `offset`), verifies and reports, as the behaviour says.
    async fn upgrade(
        &mut self,
        client: &AsyncClient,
        up: &str,
        paras: &Value,
        offset: Option<u64>,
    ) -> Result<()> {
        let version = paras["version"].as_str().unwrap_or_default().to_owned();
        let current = self.sw.clone();
        if self.opts.behaviour == Behaviour::Refuse {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            let code = self.opts.fail_code.unwrap_or(1);
            return self
                .report(
                    client,
                    up,
                    "upgrade_progress_report",
                    json!({
                        "result_code": code, "version": current, "progress": 0,
                        "description": "refused by the simulator",
                    }),
                )
                .await;
        }
        let ok = match self.download(paras, offset.unwrap_or(0), None).await {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(device_id = %self.creds.device_id, error = %format!("{e:#}"), "sim: download failed");
                false
            }
        };
        if !ok {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            return self
                .report(
                    client,
                    up,
                    "upgrade_progress_report",
                    json!({
                        "result_code": 7, "version": current, "progress": 0,
                        "description": "package verification failed",
                    }),
                )
                .await;
        }
        self.report(
            client,
            up,
            "upgrade_progress_report",
            json!({
                "result_code": 0, "version": current, "progress": 50, "description": "installing",
            }),
        )
        .await?;
        if self.opts.behaviour == Behaviour::Fail {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            let code = self.opts.fail_code.unwrap_or(10);
            return self
                .report(
                    client,
                    up,
                    "upgrade_progress_report",
                    json!({
                        "result_code": code, "version": current, "progress": 50,
                        "description": "installation failed (simulated)",
                    }),
                )
                .await;
        }
        self.sw.clone_from(&version);
        self.fw.clone_from(&version);
        self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
        self.report(client, up, "upgrade_progress_report", json!({
            "result_code": 0, "version": version, "progress": 100, "description": "upgrade success",
        }))
        .await
    }

    /// Downloads `paras.url` from `offset` (to `stop_at`, exclusive, when given); with the whole file,
    /// checks its SHA-256 against `sign`. Returns whether a whole, verified package arrived.
    async fn download(&mut self, paras: &Value, offset: u64, stop_at: Option<u64>) -> Result<bool> {
        let url = paras["url"].as_str().context("no url")?;
        let token = paras["access_token"].as_str().unwrap_or_default();
        let mut req = self.http.get(url);
        if !token.is_empty() {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if offset > 0 {
            req = req.header("range", format!("bytes={offset}-"));
        }
        let resp = req.send().await.context("download request")?;
        let expected = if offset > 0 { 206 } else { 200 };
        if resp.status().as_u16() != expected {
            bail!("download answered {}", resp.status());
        }
        let mut body = resp.bytes_stream();
        if offset == 0 {
            self.partial.clear();
        }
        let mut got = offset;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.context("download body")?;
            let take = match stop_at {
                Some(end) => usize::try_from(end.saturating_sub(got))
                    .unwrap_or(usize::MAX)
                    .min(chunk.len()),
                None => chunk.len(),
            };
            self.partial.extend_from_slice(&chunk[..take]);
            got += take as u64;
            self.stats.bytes.fetch_add(take as u64, Ordering::Relaxed);
            if stop_at.is_some_and(|end| got >= end) {
                return Ok(false);
            }
        }
        let digest = hex::encode(Sha256::digest(&self.partial));
        self.partial = Vec::new();
        let ok = paras["sign"]
            .as_str()
            .is_none_or(|s| s.eq_ignore_ascii_case(&digest))
            && paras["file_size"].as_u64().is_none_or(|n| n == got);
        if ok {
            self.stats.downloads.fetch_add(1, Ordering::Relaxed);
        }
        Ok(ok)
    }

    async fn report(
        &self,
        client: &AsyncClient,
        up: &str,
        event_type: &str,
        paras: Value,
    ) -> Result<()> {
        // Shaped like the Python SDK's output: `event_id: null`, ISO-like event time.
        let message = json!({
            "object_device_id": self.creds.device_id,
            "services": [{
                "service_id": "$ota", "event_type": event_type, "event_id": null,
                "event_time": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                "paras": paras,
            }],
        });
        client
            .publish(up, QoS::AtLeastOnce, false, serde_json::to_vec(&message)?)
            .await
            .context("publishing a report")
    }
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
