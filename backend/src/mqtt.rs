//! The device MQTT endpoint (`protocols.md` §1.1-§1.2): IoTDA logins on an embedded rumqttd router.
//!
//! rumqttd routes messages but cannot serve IoTDA devices on its own listeners: it refuses `$`-prefixed
//! topics, has no per-client ACL, closes the socket instead of answering CONNACK 4 to a bad login, and has
//! no server-side subscriptions, which Huawei's Python and Go SDKs rely on (they never SUBSCRIBE to
//! `$oc/devices/{id}/sys/events/down`). So Updraft terminates device connections itself:
//!
//! ```text
//! device ──TCP/TLS──▶ session (`session`: MQTT 3.1.1 codec, ACL, keep-alive; `login`: IoTDA logins)
//!                        │ one rumqttd local link per device, link id `device:{device id}`
//!                        ▼
//!                     rumqttd router ◀── `platform:uplinks` link: subscribed to every device's up
//!                                         topic, linked again whenever the router drops it
//! ```
//!
//! Link ids live in two namespaces (`device:...` and `platform:...`; device ids are letters, digits, `_`
//! and `-`), so no device id, whatever it is (`updraft` is a valid one), can name the platform's link and
//! make the router drop it. The platform's link and the hand-over to the driver are `uplinks`; this file
//! holds the endpoint: settings, the accept loop, and the driver's [`Downlink`].
//!
//! - **Login**: client id `{device_id}_0_{0|1}_{YYYYMMDDHH}`, user name = device id, password =
//!   `HMAC-SHA256(key = YYYYMMDDHH, secret)`; signature type 1 also requires the hour to be within
//!   `timestamp_skew` of the clock. A wrong login gets CONNACK 4 ("bad user name or password"), a client id
//!   of the wrong shape CONNACK 2, a frozen device CONNACK 5, MQTT 5 CONNACK 1; then the socket closes.
//! - **System topics without SUBSCRIBE**: every session is subscribed to its own
//!   `$oc/devices/{id}/sys/events/down` when it logs in.
//! - **ACL**: a device publishes only to its own `$oc/devices/{id}/sys/events/up` (other topics below its
//!   own `$oc/devices/{id}/` are acknowledged and dropped, as Updraft has no use for them; anything else
//!   ends the session) and subscribes only below `$oc/devices/{id}/` (other filters get SUBACK 0x80).
//!   The router keeps every filter it has seen for good (~230 KiB each), so a device may create at most
//!   `max_subscriptions` filters in the life of the process, and never one matching its own uplink
//!   topic (which would share the platform's 128 MiB uplink buffer).
//! - **Before login** a connection costs little: CONNECT may be at most [`MAX_CONNECT`] bytes, and failed
//!   logins are throttled per device id and per source address ([`LOGIN_FAILURES_PER_DEVICE`],
//!   [`LOGIN_FAILURES_PER_ADDRESS`] per [`LOGIN_WINDOW`]), answered CONNACK 3 without a database lookup.
//! - **The router's channel is bounded** and its sends block when it is full: every call into the
//!   router runs on the blocking pool, never on an async worker.
//! - **Topics inside the router** are the device topics without the leading `$` (rumqttd refuses `$`
//!   topics); devices never see those names, and no one else can reach the router.
//! - **Connect/disconnect** feed the task driver (`DeviceEvent::Online/Offline`), which records the online
//!   state and wakes subtasks waiting for the device. A second login of the same device ends the first
//!   session, as MQTT requires for a reused client id.

mod codec;
mod login;
mod session;
mod uplinks;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::RouterConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use domain::throttle::Throttle;

use self::session::session;
use self::uplinks::{platform_link, uplinks};
use crate::AppState;
use crate::driver::{DeviceEvent, Downlink};

/// MQTT endpoint settings.
#[derive(Clone, Debug)]
pub struct MqttSettings {
    /// How far a signature-type-1 timestamp (`YYYYMMDDHH`) may be from the clock.
    pub timestamp_skew: Duration,
    /// How long a new connection has to send CONNECT.
    pub connect_timeout: Duration,
    /// The largest packet accepted or sent.
    pub max_packet_size: usize,
    /// Connections beyond this are refused with CONNACK 3 (server unavailable).
    pub max_connections: usize,
    /// Subscription filters a device may create in the router, in the life of the process.
    pub max_subscriptions: usize,
    /// Refuse a device with `secure_access` on plain MQTT (IoTDA's rule); off only to keep a fleet
    /// registered before Updraft enforced it connecting while its devices are updated.
    pub enforce_secure_access: bool,
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            timestamp_skew: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 256 * 1024,
            // The router reserves (virtual) slots for this many up front.
            max_connections: 200_000,
            max_subscriptions: 16,
            enforce_secure_access: true,
        }
    }
}

/// The router filter of every device's uplinks (the router's name for `$oc/devices/+/sys/events/up`).
const UP_FILTER: &str = "oc/devices/+/sys/events/up";

/// The router link id of Updraft's own link (device links are `device:{id}`: another namespace).
const PLATFORM_LINK: &str = "platform:uplinks";

/// The router link id of a device's session.
fn device_link(device_id: &str) -> String {
    format!("device:{device_id}")
}

/// The largest CONNECT read before the login is checked (IoTDA's are ~200 bytes).
pub const MAX_CONNECT: usize = 4096;
/// Failed logins per device id per [`LOGIN_WINDOW`]; past that, logins of the id are refused unchecked.
pub const LOGIN_FAILURES_PER_DEVICE: usize = 10;
/// Failed logins per source address per [`LOGIN_WINDOW`] (a carrier NAT hides many devices).
pub const LOGIN_FAILURES_PER_ADDRESS: usize = 200;
/// The failed-login window.
pub const LOGIN_WINDOW: Duration = Duration::from_secs(60);

/// The router's name for a device topic (rumqttd refuses `$` topics).
fn internal(topic: &str) -> &str {
    topic.strip_prefix('$').unwrap_or(topic)
}

/// A device's own topic prefix, `$oc/devices/{id}/`.
fn own_prefix(device_id: &str) -> String {
    format!("$oc/devices/{device_id}/")
}

/// The running endpoint: the router, the platform's link and the live sessions.
#[derive(Clone)]
pub struct MqttEndpoint {
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for MqttEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttEndpoint")
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

struct Ctx {
    state: AppState,
    /// Connects and disconnects, handed to the same worker as device messages (in order, in batches).
    events: tokio::sync::mpsc::UnboundedSender<(String, DeviceEvent)>,
    settings: MqttSettings,
    broker: Arc<rumqttd::Broker>,
    sessions: Mutex<HashMap<String, SessionHandle>>,
    /// The filters each device has created in the router (which never frees them).
    filters: Mutex<HashMap<String, std::collections::HashSet<String>>>,
    /// Failed logins: by device id, and by source address.
    failures: Mutex<(Throttle, Throttle)>,
    next_session: AtomicU64,
    connections: AtomicUsize,
}

struct SessionHandle {
    id: u64,
    kick: CancellationToken,
    done: Arc<tokio::sync::Notify>,
    /// The device's system-topic downlinks, written to it by its session.
    down: tokio::sync::mpsc::Sender<Bytes>,
}

/// Downlinks queued per session before it drops them (a device this far behind will be asked again).
const DOWN_QUEUE: usize = 64;

/// Connections past `max_connections` that may be in the middle of being refused (CONNACK 3) at once;
/// past that, new connections are closed as soon as they are accepted.
pub const REFUSING: usize = 64;

/// Hands the driver's messages to the sessions.
struct RouterDownlink {
    /// The sessions (weak: the context owns the state that owns this downlink).
    ctx: std::sync::Weak<Ctx>,
}

impl std::fmt::Debug for RouterDownlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouterDownlink")
    }
}

impl Downlink for RouterDownlink {
    fn held(&self) -> Vec<String> {
        self.ctx
            .upgrade()
            .map(|ctx| lock(&ctx.sessions).keys().cloned().collect())
            .unwrap_or_default()
    }

    fn disconnect(&self, device_id: &str) {
        if let Some(ctx) = self.ctx.upgrade()
            && let Some(session) = lock(&ctx.sessions).get(device_id)
        {
            session.kick.cancel();
        }
    }

    /// Hands the message straight to the device's session. System-topic downlinks do not go through
    /// the router: rumqttd matches a new topic against every subscription filter, so one filter per
    /// device made each device's first message cost O(devices), and a fleet's O(devices²).
    fn publish(&self, device_id: &str, payload: Vec<u8>) {
        let Some(ctx) = self.ctx.upgrade() else {
            return;
        };
        let sender = lock(&ctx.sessions).get(device_id).map(|s| s.down.clone());
        match sender.map(|s| s.try_send(Bytes::from(payload))) {
            // Not connected: like MQTT QoS 0, the message is not kept; the machine re-sends.
            None => tracing::debug!(device_id, "mqtt: downlink for a device not connected"),
            Some(Ok(())) => {}
            Some(Err(e)) => {
                tracing::warn!(device_id, error.message = %e, "mqtt: downlink dropped (session backlog)");
            }
        }
    }
}

impl MqttEndpoint {
    /// Starts the router and the platform link, and connects the task driver to it.
    ///
    /// # Errors
    /// When the router refuses the platform link (a message naming why).
    pub fn start(state: AppState, settings: MqttSettings) -> Result<Self, String> {
        let config = rumqttd::Config {
            id: 0,
            router: RouterConfig {
                max_connections: settings.max_connections.saturating_add(16),
                max_outgoing_packet_count: 200,
                // Each filter keeps a ring of segments; device down topics carry a few small events.
                max_segment_size: settings.max_packet_size.max(64 * 1024),
                max_segment_count: 4,
                // Every device's uplinks share the platform's one filter: give it room for a long
                // backlog (memory is only used while the driver lags), so a burst is never overwritten
                // before the driver reads it.
                custom_segment: Some(
                    [(
                        UP_FILTER.to_owned(),
                        rumqttd::SegmentConfig {
                            max_segment_size: 16 * 1024 * 1024,
                            max_segment_count: 8,
                        },
                    )]
                    .into_iter()
                    .collect(),
                ),
                initialized_filters: None,
                shared_subscriptions_strategy: rumqttd::Strategy::default(),
            },
            ..Default::default()
        };
        let broker = Arc::new(rumqttd::Broker::new(config));
        let link = platform_link(&broker)?;
        let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let window = LOGIN_WINDOW;
        let ctx = Arc::new(Ctx {
            state: state.clone(),
            events,
            settings,
            broker: broker.clone(),
            sessions: Mutex::new(HashMap::new()),
            filters: Mutex::new(HashMap::new()),
            failures: Mutex::new((
                Throttle::new(LOGIN_FAILURES_PER_DEVICE, window, 100_000),
                Throttle::new(LOGIN_FAILURES_PER_ADDRESS, window, 100_000),
            )),
            next_session: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
        });
        state.driver.set_downlink(Arc::new(RouterDownlink {
            ctx: Arc::downgrade(&ctx),
        }));
        tokio::spawn(uplinks(state, broker, link, events_rx));
        Ok(Self { ctx })
    }

    /// Connections open now (in a handshake, logging in, or connected).
    #[must_use]
    pub fn connections(&self) -> usize {
        self.ctx.connections.load(Ordering::Relaxed)
    }

    /// Accepts plain MQTT connections on `listener` until `stop`.
    pub async fn serve_plain(self, listener: TcpListener, stop: CancellationToken) {
        self.accept_loop(listener, None, stop).await;
    }

    /// Accepts MQTT-over-TLS connections on `listener` until `stop`.
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        stop: CancellationToken,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        self.accept_loop(listener, Some(acceptor), stop).await;
    }

    async fn accept_loop(
        self,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        stop: CancellationToken,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error.message = %e, "mqtt: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // Past the cap and past the refusals in progress: close at once, so a crowd cannot take the
            // descriptors that connected devices, downloads and the database need.
            if self.ctx.connections.load(Ordering::Relaxed)
                >= self.ctx.settings.max_connections + REFUSING
            {
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            // Counted before the spawn, so a burst of accepts cannot slip past the check above.
            self.ctx.connections.fetch_add(1, Ordering::Relaxed);
            let ctx = self.ctx.clone();
            let stop = stop.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => session(&ctx, stream, peer, false, stop).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(
                            ctx.settings.connect_timeout,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(s)) => session(&ctx, s, peer, true, stop).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error.message = %e, "mqtt: TLS handshake failed");
                            }
                            Err(_) => tracing::debug!(%peer, "mqtt: TLS handshake timed out"),
                        }
                    }
                }
                ctx.connections.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_topics_drop_the_dollar() {
        assert_eq!(
            internal("$oc/devices/d1/sys/events/up"),
            "oc/devices/d1/sys/events/up"
        );
        assert_eq!(own_prefix("d1"), "$oc/devices/d1/");
    }
}
