//! The device MQTT endpoint (`protocols.md` §1.1-§1.2): IoTDA logins on an embedded rumqttd router.
//!
//! rumqttd routes messages but cannot serve IoTDA devices on its own listeners: it refuses `$`-prefixed
//! topics, has no per-client ACL, closes the socket instead of answering CONNACK 4 to a bad login, and has
//! no server-side subscriptions, which Huawei's Python and Go SDKs rely on (they never SUBSCRIBE to
//! `$oc/devices/{id}/sys/events/down`). So Updraft terminates device connections itself:
//!
//! ```text
//! device ──TCP/TLS──▶ session (this module: MQTT 3.1.1 codec, login, ACL, keep-alive)
//!                        │ one rumqttd local link per device, link id `device:{device id}`
//!                        ▼
//!                     rumqttd router ◀── `platform:uplinks` link: subscribed to every device's up
//!                                         topic, linked again whenever the router drops it
//! ```
//!
//! Link ids live in two namespaces (`device:...` and `platform:...`; device ids are letters, digits, `_` and `-`), so no device id, whatever it is
//! (`updraft` is a valid one), can name the platform's link and make the router drop it.
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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use protocol::mqtt_auth::{ClientId, SigType, verify_password};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{self, QoS};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Notification, RouterConfig};
use sea_orm::EntityTrait;
use secrecy::ExposeSecret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use domain::throttle::Throttle;

use crate::AppState;
use crate::driver::{DeviceEvent, Downlink};
use crate::storage::entity::devices;

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
                    None => session(&ctx, stream, peer, stop).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(
                            ctx.settings.connect_timeout,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(s)) => session(&ctx, s, peer, stop).await,
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

/// The platform's router link, subscribed to every device's uplinks. Blocks on the router's reply: call
/// it at start-up or on the blocking pool.
fn platform_link(broker: &rumqttd::Broker) -> Result<(LinkTx, LinkRx), String> {
    let (mut tx, rx) = broker
        .link(PLATFORM_LINK)
        .map_err(|e| format!("linking to the MQTT router: {e}"))?;
    tx.subscribe(UP_FILTER)
        .map_err(|e| format!("subscribing device uplinks: {e}"))?;
    Ok((tx, rx))
}

/// Hands connects, disconnects and `$ota` events to the task driver, in arrival order, the ones that
/// arrived together in one call (one transaction for the lot): with thousands of devices, per-event
/// transactions would queue behind SQLite's single writer. When the router drops the platform's link,
/// it is linked again (backing off up to 5 s) and the events go on.
async fn uplinks(
    state: AppState,
    broker: Arc<rumqttd::Broker>,
    link: (LinkTx, LinkRx),
    mut sessions: tokio::sync::mpsc::UnboundedReceiver<(String, DeviceEvent)>,
) {
    let (mut _tx, mut rx) = link;
    loop {
        if !forward_uplinks(&state, &mut rx, &mut sessions).await {
            return;
        }
        tracing::error!("mqtt: the router dropped the platform link; linking again");
        let mut wait = Duration::from_millis(50);
        loop {
            let broker = broker.clone();
            match tokio::task::spawn_blocking(move || platform_link(&broker)).await {
                Ok(Ok((tx, new_rx))) => {
                    (_tx, rx) = (tx, new_rx);
                    tracing::info!("mqtt: platform link restored");
                    break;
                }
                Ok(Err(e)) => tracing::warn!(error.message = %e, "mqtt: linking again failed"),
                Err(e) => tracing::warn!(error.message = %e, "mqtt: linking again failed"),
            }
            if sessions.is_closed() {
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}

/// Forwards events until the router link is lost (true) or the endpoint is gone (false).
async fn forward_uplinks(
    state: &AppState,
    rx: &mut LinkRx,
    sessions: &mut tokio::sync::mpsc::UnboundedReceiver<(String, DeviceEvent)>,
) -> bool {
    use futures::FutureExt;
    const MAX_BATCH: usize = 512;
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            // A session's connect is queued before it reads the device's first message: taking the
            // session queue first keeps a device's connect ahead of what it then says.
            biased;
            e = sessions.recv() => match e {
                Some(e) => batch.push(e),
                None => return false,
            },
            n = rx.next() => match n {
                Ok(n) => {
                    if !router_notification(n, rx, &mut batch).await {
                        apply_with_retries(state, batch).await;
                        return true;
                    }
                }
                Err(e) => {
                    tracing::info!(error.message = %e, "mqtt: router link closed");
                    apply_with_retries(state, batch).await;
                    return true;
                }
            },
        }
        // Whatever else is already here, without waiting.
        while batch.len() < MAX_BATCH {
            let mut more = false;
            while let Ok(e) = sessions.try_recv() {
                batch.push(e);
                more = true;
            }
            if let Some(Ok(n)) = rx.next().now_or_never() {
                if !router_notification(n, rx, &mut batch).await {
                    apply_with_retries(state, batch).await;
                    return true;
                }
                more = true;
            }
            if !more {
                break;
            }
        }
        apply_with_retries(state, batch).await;
    }
}

/// Hands `batch` to the driver; a failure (the database busy or briefly unreachable) is tried again with
/// backoff rather than dropped, because a dropped batch loses connects and final reports, and with them
/// the devices' subtasks. Events wait meanwhile (the router link and the session queue hold them).
async fn apply_with_retries(state: &AppState, batch: Vec<(String, DeviceEvent)>) {
    const ATTEMPTS: u32 = 10;
    for attempt in 1..=ATTEMPTS {
        let Err(e) = state.driver.device_events(state, batch.clone()).await else {
            return;
        };
        if attempt == ATTEMPTS || !e.is_internal() {
            tracing::error!(
                error.message = %e, error.cause_chain = ?e, events = batch.len(),
                "mqtt: handling device events failed; the devices' next connect or report catches up"
            );
            return;
        }
        let wait = Duration::from_millis(100u64 << attempt.min(7));
        tracing::warn!(error.message = %e, attempt, retry_in = ?wait, "mqtt: handling device events failed; retrying");
        tokio::time::sleep(wait).await;
    }
}

/// Adds the events of one router notification to `batch`; false when the router link is gone.
async fn router_notification(
    n: Option<Notification>,
    rx: &mut LinkRx,
    batch: &mut Vec<(String, DeviceEvent)>,
) -> bool {
    match n {
        Some(Notification::Forward(forward)) => {
            let topic = String::from_utf8_lossy(&forward.publish.topic);
            let external = format!("${topic}");
            if let Some(device_id) = protocol::ota::up_topic_device(&external) {
                uplink_events(device_id, &forward.publish.payload, batch);
            }
            true
        }
        Some(Notification::Unschedule) => match rx.wake().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error.message = %e, "mqtt: waking the router link failed");
                false
            }
        },
        // The router ended the link (another link took its id, or the router restarted it).
        Some(Notification::Disconnect(..)) => false,
        _ => true,
    }
}

/// The driver events in one uplink message (`$ota` events; others are logged and ignored).
fn uplink_events(device_id: &str, payload: &[u8], out: &mut Vec<(String, DeviceEvent)>) {
    let events = match protocol::ota::parse_uplink(payload) {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(device_id, error.message = %e, "mqtt: unreadable uplink ignored");
            return;
        }
    };
    for event in events {
        let event = match event {
            protocol::ota::Uplink::VersionReport {
                sw_version,
                fw_version,
            } => DeviceEvent::VersionReport {
                sw_version,
                fw_version,
            },
            protocol::ota::Uplink::Progress {
                result_code,
                progress,
                version,
                description,
            } => DeviceEvent::Progress {
                result_code,
                progress,
                version,
                description,
            },
            protocol::ota::Uplink::Other {
                service_id,
                event_type,
            } => {
                tracing::debug!(device_id, service_id, event_type, "mqtt: event ignored");
                continue;
            }
        };
        out.push((device_id.to_owned(), event));
    }
}

/// Why a session ended (for the log).
enum End {
    Closed,
    Disconnect,
    KeepAlive,
    Kicked,
    Shutdown,
    RouterDropped,
    Acl(String),
    Protocol(String),
    Io(std::io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("connection closed"),
            Self::Disconnect => f.write_str("DISCONNECT"),
            Self::KeepAlive => f.write_str("keep-alive expired"),
            Self::Kicked => f.write_str("replaced by a new login of the same device"),
            Self::Shutdown => f.write_str("server shutting down"),
            Self::RouterDropped => f.write_str("dropped by the router"),
            Self::Acl(what) => write!(f, "not allowed: {what}"),
            Self::Protocol(e) => write!(f, "protocol error: {e}"),
            Self::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

/// One connection, from CONNECT to close.
async fn session<S>(ctx: &Arc<Ctx>, stream: S, peer: SocketAddr, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(512);
    let max = ctx.settings.max_packet_size;
    // Nothing larger than a CONNECT is read before the login is checked.
    let first = tokio::time::timeout(
        ctx.settings.connect_timeout,
        read_packet(&mut rd, &mut buf, max.min(MAX_CONNECT)),
    )
    .await;
    let connect = match first {
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Err(ReadError::Codec(mqttbytes::Error::InvalidProtocolLevel(level)))) => {
            tracing::info!(%peer, level, "mqtt: refused protocol level");
            let _ = write(
                &mut wr,
                refuse(ConnectReturnCode::RefusedProtocolVersion),
                max,
            )
            .await;
            return;
        }
        Ok(Ok(Some(_))) => {
            tracing::debug!(%peer, "mqtt: first packet is not CONNECT");
            return;
        }
        Ok(Err(ReadError::Codec(e))) => {
            tracing::debug!(%peer, error.message = %e, "mqtt: unreadable CONNECT");
            return;
        }
        Ok(Ok(None) | Err(ReadError::Io(_))) | Err(_) => return,
    };
    // Over the cap: "server unavailable" before any work (the login is not even checked); devices retry.
    if ctx.connections.load(Ordering::Relaxed) > ctx.settings.max_connections {
        let _ = write(&mut wr, refuse(ConnectReturnCode::ServiceUnavailable), max).await;
        let _ = wr.shutdown().await;
        return;
    }
    let device_id = match authenticate(ctx, &connect, peer).await {
        Ok(id) => id,
        Err(code) => {
            // Debug-formatted: a client id is the client's text, and may hold line breaks.
            tracing::info!(%peer, client_id = ?connect.client_id, ?code, "mqtt: login refused");
            let _ = write(&mut wr, refuse(code), max).await;
            let _ = wr.shutdown().await;
            return;
        }
    };

    // One session per device: end an earlier one (and wait for it to leave the router) first.
    let id = ctx.next_session.fetch_add(1, Ordering::Relaxed);
    let kick = CancellationToken::new();
    let done = Arc::new(tokio::sync::Notify::new());
    let (down_tx, mut down_rx) = tokio::sync::mpsc::channel(DOWN_QUEUE);
    let previous = {
        let mut sessions = lock(&ctx.sessions);
        sessions.insert(
            device_id.clone(),
            SessionHandle {
                id,
                kick: kick.clone(),
                done: done.clone(),
                down: down_tx,
            },
        )
    };
    if let Some(prev) = previous {
        let finished = prev.done.notified();
        prev.kick.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), finished).await;
    }

    let end = run_session(
        ctx,
        &device_id,
        &connect,
        Io {
            rd: &mut rd,
            wr: &mut wr,
            buf: &mut buf,
        },
        &mut down_rx,
        &kick,
        &stop,
    )
    .await;

    {
        let mut sessions = lock(&ctx.sessions);
        if sessions.get(&device_id).is_some_and(|s| s.id == id) {
            sessions.remove(&device_id);
        }
    }
    let still_connected = lock(&ctx.sessions).contains_key(&device_id);
    if !still_connected {
        let _ = ctx.events.send((device_id.clone(), DeviceEvent::Offline));
    }
    done.notify_waiters();
    match &end {
        End::Acl(_) | End::Protocol(_) => {
            tracing::warn!(device_id, %peer, reason = %end, "mqtt: session ended");
        }
        _ => tracing::debug!(device_id, %peer, reason = %end, "mqtt: device disconnected"),
    }
    let _ = wr.shutdown().await;
}

/// A session's socket halves and read buffer.
struct Io<'a, R, W> {
    rd: &'a mut R,
    wr: &'a mut W,
    buf: &'a mut BytesMut,
}

async fn run_session<R, W>(
    ctx: &Arc<Ctx>,
    device_id: &str,
    connect: &rumqttc::mqttbytes::v4::Connect,
    io: Io<'_, R, W>,
    down_rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
    kick: &CancellationToken,
    stop: &CancellationToken,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Io { rd, wr, buf } = io;
    let max = ctx.settings.max_packet_size;
    let down = protocol::ota::down_topic(device_id);
    // rumqttd's link set-up blocks (it waits on the router thread's reply): keep it off the async workers,
    // or a burst of logins stalls every connection.
    // The system down topic is not subscribed in the router: the driver hands those messages to the
    // session directly (see `RouterDownlink::publish`).
    let linked = {
        let (ctx, id) = (ctx.clone(), device_id.to_owned());
        tokio::task::spawn_blocking(move || {
            let (tx, rx) = ctx
                .broker
                .link(&device_link(&id))
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((tx, rx))
        })
        .await
    };
    let (tx, mut rx) = match linked {
        Ok(Ok(link)) => link,
        Ok(Err(e)) => {
            tracing::warn!(device_id, error.message = %e, "mqtt: router refused the session");
            let _ = write(wr, refuse(ConnectReturnCode::ServiceUnavailable), max).await;
            return End::RouterDropped;
        }
        Err(e) => {
            tracing::warn!(device_id, error.message = %e, "mqtt: linking the session failed");
            return End::RouterDropped;
        }
    };
    let mut tx = Some(tx);
    if let Err(e) = write(
        wr,
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
        max,
    )
    .await
    {
        route(&mut tx, Route::Disconnect).await;
        return End::Io(e);
    }
    tracing::debug!(device_id, "mqtt: device connected");
    let _ = ctx.events.send((device_id.to_owned(), DeviceEvent::Online));

    let prefix = own_prefix(device_id);
    let up = format!("{prefix}sys/events/up");
    // MQTT 3.1.1 §3.1.2.10: the server closes a connection silent for 1.5 keep-alive periods.
    let idle = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let mut deadline = idle.map(|d| tokio::time::Instant::now() + d);
    let end = loop {
        let keepalive = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => break End::Shutdown,
            () = kick.cancelled() => break End::Kicked,
            () = keepalive => break End::KeepAlive,
            packet = read_packet(rd, buf, max) => {
                let packet = match packet {
                    Ok(Some(p)) => p,
                    Ok(None) => break End::Closed,
                    Err(ReadError::Io(e)) => break End::Io(e),
                    Err(ReadError::Codec(e)) => break End::Protocol(e.to_string()),
                };
                if let Some(d) = idle {
                    deadline = Some(tokio::time::Instant::now() + d);
                }
                let topics = Topics { prefix: &prefix, up: &up, down: &down };
                let (routes, reply) = match on_packet(ctx, device_id, &topics, packet) {
                    Ok(r) => r,
                    Err(end) => break end,
                };
                let mut routed = true;
                for r in routes {
                    routed &= route(&mut tx, r).await;
                }
                if !routed {
                    break End::RouterDropped;
                }
                match reply {
                    Reply::None => {}
                    Reply::Send(p) => {
                        if let Err(e) = write(wr, p, max).await {
                            break End::Io(e);
                        }
                    }
                    Reply::Disconnect => break End::Disconnect,
                }
            }
            Some(payload) = down_rx.recv() => {
                let out = Publish::from_bytes(down.clone(), QoS::AtMostOnce, payload);
                if let Err(e) = write(wr, Packet::Publish(out), max).await {
                    break End::Io(e);
                }
            }
            n = rx.next() => match n {
                Ok(Some(Notification::Forward(f))) => {
                    let topic = format!("${}", String::from_utf8_lossy(&f.publish.topic));
                    let out = Publish::from_bytes(topic, QoS::AtMostOnce, f.publish.payload);
                    if let Err(e) = write(wr, Packet::Publish(out), max).await {
                        break End::Io(e);
                    }
                }
                Ok(Some(Notification::Unschedule)) => {
                    if rx.wake().await.is_err() {
                        break End::RouterDropped;
                    }
                }
                Ok(Some(Notification::Disconnect(..))) | Err(_) => {
                    // The router dropped this connection; it must not be told to disconnect it again
                    // (its id may already belong to another connection).
                    return End::RouterDropped;
                }
                Ok(_) => {}
            },
        }
    };
    route(&mut tx, Route::Disconnect).await;
    end
}

enum Reply {
    None,
    Send(Packet),
    Disconnect,
}

/// A call into the router on a session's link.
enum Route {
    Publish(String, Bytes),
    Subscribe(String),
    Unsubscribe(String),
    Disconnect,
}

/// Runs `route` on the blocking pool (the router's channel is bounded and its sends block when it is
/// full; on an async worker that would stall every connection). False when the router dropped the link.
async fn route(tx: &mut Option<LinkTx>, route: Route) -> bool {
    let Some(mut link) = tx.take() else {
        return false;
    };
    let done = tokio::task::spawn_blocking(move || {
        let ok = match route {
            Route::Publish(topic, payload) => link.publish(topic, payload).is_ok(),
            Route::Subscribe(filter) => link.subscribe(filter).is_ok(),
            Route::Unsubscribe(filter) => link.unsubscribe(filter).is_ok(),
            Route::Disconnect => {
                let disconnect = rumqttd::protocol::Packet::Disconnect(
                    rumqttd::protocol::Disconnect {
                        reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
                    },
                    None,
                );
                futures::executor::block_on(link.send(disconnect)).is_ok()
            }
        };
        (link, ok)
    })
    .await;
    match done {
        Ok((link, ok)) => {
            *tx = Some(link);
            ok
        }
        Err(_) => false,
    }
}

/// A session's own topics.
struct Topics<'a> {
    /// `$oc/devices/{id}/`
    prefix: &'a str,
    /// Its system uplink topic.
    up: &'a str,
    /// Its system downlink topic.
    down: &'a str,
}

/// One packet from a logged-in device: ACL, acknowledgements; what to route, and what to answer.
fn on_packet(
    ctx: &Ctx,
    device_id: &str,
    topics: &Topics<'_>,
    packet: Packet,
) -> Result<(Vec<Route>, Reply), End> {
    let mut routes = Vec::new();
    let reply = match packet {
        Packet::Publish(p) => {
            if !p.topic.starts_with(topics.prefix) {
                return Err(End::Acl(format!("publish to {:?}", p.topic)));
            }
            if p.topic == topics.up {
                routes.push(Route::Publish(internal(topics.up).to_owned(), p.payload));
            } else {
                tracing::debug!(device_id, topic = ?p.topic, "mqtt: publish outside sys/events/up dropped");
            }
            match p.qos {
                QoS::AtMostOnce => Reply::None,
                QoS::AtLeastOnce => Reply::Send(Packet::PubAck(PubAck::new(p.pkid))),
                QoS::ExactlyOnce => Reply::Send(Packet::PubRec(PubRec::new(p.pkid))),
            }
        }
        Packet::PubRel(r) => Reply::Send(Packet::PubComp(PubComp::new(r.pkid))),
        Packet::Subscribe(s) => {
            let mut codes = Vec::with_capacity(s.filters.len());
            for f in &s.filters {
                match subscription(ctx, device_id, topics, &f.path) {
                    Ok(new) => {
                        routes.extend(new.then(|| Route::Subscribe(internal(&f.path).to_owned())));
                        let qos = if f.qos == QoS::AtMostOnce {
                            QoS::AtMostOnce
                        } else {
                            QoS::AtLeastOnce
                        };
                        codes.push(SubscribeReasonCode::Success(qos));
                    }
                    Err(why) => {
                        tracing::info!(device_id, filter = ?f.path, why, "mqtt: subscription refused");
                        codes.push(SubscribeReasonCode::Failure);
                    }
                }
            }
            Reply::Send(Packet::SubAck(SubAck::new(s.pkid, codes)))
        }
        Packet::Unsubscribe(u) => {
            for f in &u.topics {
                if f.starts_with(topics.prefix) && f != topics.down && f != topics.up {
                    routes.push(Route::Unsubscribe(internal(f).to_owned()));
                }
            }
            Reply::Send(Packet::UnsubAck(UnsubAck::new(u.pkid)))
        }
        Packet::PingReq => Reply::Send(Packet::PingResp),
        Packet::Disconnect => Reply::Disconnect,
        // Acknowledgements of our QoS 0 downlinks cannot arrive; ignore strays.
        Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) | Packet::PingResp => {
            Reply::None
        }
        Packet::Connect(_) => return Err(End::Protocol("second CONNECT".to_owned())),
        Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) => {
            return Err(End::Protocol(
                "server-to-client packet from a client".to_owned(),
            ));
        }
    };
    Ok((routes, reply))
}

/// Whether `device_id` may subscribe to `filter`: `Ok(true)` when the router must be told (a filter the
/// session does not have from login), or why not.
fn subscription(
    ctx: &Ctx,
    device_id: &str,
    topics: &Topics<'_>,
    filter: &str,
) -> Result<bool, &'static str> {
    let Some(rest) = filter.strip_prefix(topics.prefix) else {
        return Err("outside the device's own topics");
    };
    if rest.is_empty() || !rumqttc::mqttbytes::valid_filter(filter) {
        return Err("not a valid filter");
    }
    // Matched under the router's names: `matches` never matches a `$` topic.
    if rumqttc::mqttbytes::matches(internal(topics.up), internal(filter)) {
        return Err("the device's own uplink topic");
    }
    // The down topic is subscribed at login.
    if filter == topics.down {
        return Ok(false);
    }
    let mut filters = lock(&ctx.filters);
    let created = filters.entry(device_id.to_owned()).or_default();
    if !created.contains(filter) {
        if created.len() >= ctx.settings.max_subscriptions {
            return Err("too many subscription filters (mqtt.max_subscriptions)");
        }
        created.insert(filter.to_owned());
    }
    Ok(true)
}

/// Checks an IoTDA login; the device id, or the CONNACK code to refuse with.
///
/// Failed logins are throttled per device id, where an attempt takes its place before any lookup (check
/// and record are one step: simultaneous guesses cannot all pass the check) and a successful one gives it
/// back; and per source address, where only failures count (a carrier NAT logs in thousands of devices
/// at once, none of which may be refused for the others being checked).
async fn authenticate(
    ctx: &Ctx,
    connect: &rumqttc::mqttbytes::v4::Connect,
    peer: SocketAddr,
) -> Result<String, ConnectReturnCode> {
    let client = ClientId::parse(&connect.client_id).map_err(|_| ConnectReturnCode::BadClientId)?;
    let now = ctx.state.clock.now();
    let (device_key, address_key) = (client.device_id.to_owned(), peer.ip().to_string());
    {
        let mut failures = lock(&ctx.failures);
        let (by_device, by_address) = &mut *failures;
        if by_device.begin(&device_key, now).is_err() {
            return Err(ConnectReturnCode::ServiceUnavailable);
        }
        if by_address.check(&address_key, now).is_err() {
            by_device.forgive(&device_key, now);
            return Err(ConnectReturnCode::ServiceUnavailable);
        }
    }
    let checked = check_login(ctx, connect, &client, now).await;
    let mut failures = lock(&ctx.failures);
    let (by_device, by_address) = &mut *failures;
    match checked {
        Ok(_) | Err(ConnectReturnCode::ServiceUnavailable) => by_device.forgive(&device_key, now),
        Err(_) => by_address.record_failure(&address_key, now),
    }
    checked
}

/// The login check proper (see [`authenticate`]).
async fn check_login(
    ctx: &Ctx,
    connect: &rumqttc::mqttbytes::v4::Connect,
    client: &ClientId<'_>,
    now: domain::Timestamp,
) -> Result<String, ConnectReturnCode> {
    let login = connect
        .login
        .as_ref()
        .ok_or(ConnectReturnCode::BadUserNamePassword)?;
    if login.username != client.device_id {
        return Err(ConnectReturnCode::BadUserNamePassword);
    }
    if client.sig_type == SigType::TimestampCheck
        && !timestamp_fresh(client.timestamp, now, ctx.settings.timestamp_skew)
    {
        return Err(ConnectReturnCode::BadUserNamePassword);
    }
    let device = devices::Entity::find_by_id(client.device_id.to_owned())
        .one(&ctx.state.db)
        .await
        .map_err(|e| {
            tracing::warn!(error.message = %e, "mqtt: login lookup failed");
            ConnectReturnCode::ServiceUnavailable
        })?
        .ok_or(ConnectReturnCode::BadUserNamePassword)?;
    let Some(sealed) = device.secret_enc.as_deref() else {
        return Err(ConnectReturnCode::BadUserNamePassword);
    };
    let secret = ctx.state.sealer.open(&device.id, sealed).map_err(|e| {
        tracing::warn!(device_id = %device.id, error.message = %e, "mqtt: device secret cannot be opened");
        ConnectReturnCode::ServiceUnavailable
    })?;
    if !verify_password(secret.expose_secret(), client.timestamp, &login.password) {
        return Err(ConnectReturnCode::BadUserNamePassword);
    }
    if device.status == "FROZEN" {
        return Err(ConnectReturnCode::NotAuthorized);
    }
    Ok(device.id)
}

/// Whether the UTC hour `YYYYMMDDHH` overlaps `now ± skew`.
fn timestamp_fresh(ts: &str, now: domain::Timestamp, skew: Duration) -> bool {
    let Ok(hour) = chrono::NaiveDateTime::parse_from_str(&format!("{ts}0000"), "%Y%m%d%H%M%S")
    else {
        return false;
    };
    let start = hour.and_utc().timestamp_millis();
    let end = start + 3_600_000;
    let skew = i64::try_from(skew.as_millis()).unwrap_or(i64::MAX);
    let now = now.as_millis();
    now >= start.saturating_sub(skew) && now < end.saturating_add(skew)
}

fn refuse(code: ConnectReturnCode) -> Packet {
    Packet::ConnAck(ConnAck::new(code, false))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug)]
enum ReadError {
    Io(std::io::Error),
    Codec(mqttbytes::Error),
}

/// Reads one packet; `None` at a clean end of stream.
async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Packet>, ReadError> {
    loop {
        match Packet::read(buf, max) {
            Ok(p) => return Ok(Some(p)),
            Err(mqttbytes::Error::InsufficientBytes(n)) => {
                buf.reserve(n.max(64));
                let read = rd.read_buf(buf).await.map_err(ReadError::Io)?;
                if read == 0 {
                    return if buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()))
                    };
                }
            }
            Err(e) => return Err(ReadError::Codec(e)),
        }
    }
}

async fn write<W: AsyncWrite + Unpin>(
    wr: &mut W,
    packet: Packet,
    max: usize,
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(64);
    packet
        .write(&mut out, max)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    wr.write_all(&out).await?;
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_type_1_timestamps_must_be_near_the_clock() {
        // 2026-12-01T10:30:00Z
        let now = domain::Timestamp::from_millis(1_796_121_000_000);
        let hour = Duration::from_secs(3600);
        assert!(timestamp_fresh("2026120110", now, Duration::ZERO));
        assert!(!timestamp_fresh("2026120109", now, Duration::ZERO));
        assert!(timestamp_fresh("2026120109", now, hour));
        assert!(timestamp_fresh("2026120111", now, hour));
        assert!(!timestamp_fresh("2026120112", now, hour));
        assert!(!timestamp_fresh("2026130110", now, hour), "no 13th month");
    }

    #[test]
    fn router_topics_drop_the_dollar() {
        assert_eq!(
            internal("$oc/devices/d1/sys/events/up"),
            "oc/devices/d1/sys/events/up"
        );
        assert_eq!(own_prefix("d1"), "$oc/devices/d1/");
    }
}
