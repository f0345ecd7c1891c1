//! The CoAP adapter for LwM2M devices (`protocols.md` §2.1): registration (`/rd`), the observation of
//! `/19/0/0` that carries every PCP message from a device, PCP messages to devices written to `/19/1/0`,
//! the radio coverage reads (`/4/0`, `/4/0/8`) and PCP segment serving.
//!
//! CoAP reliability (RFC 7252 §4): requests to devices are confirmable and retransmitted with exponential
//! back-off (2 s, ×1-1.5 random, 4 retransmissions by default); confirmable messages from devices are
//! acknowledged, and a duplicate (same peer and message id within the exchange lifetime) gets the same
//! answer again without being processed twice. One retransmission task watches every request in flight: a
//! request joins a queue in the order sent (constant time, and nearly all are answered before their first
//! deadline), and moves to a deadline heap only when that passes unanswered; no task or timer per request.
//!
//! Devices are known by their node id (the endpoint name, usually the IMEI); an unknown or frozen endpoint
//! is refused with 4.03. A registration lives for its lifetime (`lt`, default 24 h) measured on the
//! injected clock; when it passes without an update the device goes offline.
//!
//! Segments (PCP 0x15) are answered here, without the driver or the database: from a per-package cache of
//! the package bytes, for the download the driver told this adapter to serve ([`Lwm2mLink::serve`]). The
//! driver hears about them now and then, for progress.
//!
//! Firmware upgrades use the Firmware Update object (`/5/0`): the driver has the Package URI written
//! ([`Lwm2mLink::start_firmware`]) and this adapter observes the State and Update Result. A URI of this
//! endpoint, `coap://host:port/fw/<token>`, is served block-wise (RFC 7959 Block2, 16-1024 bytes as the
//! device asks, `lwm2m.block_size` when it does not) from the same package cache. The token is a download
//! token like the HTTPS ones: bound to one subtask, expiring, revoked when its download ends.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use coap_lite::{
    CoapOption, ContentFormat, MessageClass, MessageType, Packet, RequestType, ResponseType,
};
use futures::TryStreamExt;
use protocol::lwm2m::{self, RegisterParams, Registration, RequestError, connectivity};
use protocol::pcp::{self, Downlink as Pcp, ResultCode, Uplink};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::driver::{BlockGrant, DeviceEvent, Lwm2mLink, SegmentSource};

/// The maps of this module are looked up several times per datagram: foldhash, seeded per process, is
/// much cheaper than SipHash there.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// CoAP transport settings.
#[derive(Clone, Debug)]
pub struct CoapSettings {
    /// RFC 7252 `ACK_TIMEOUT`: the first wait for an acknowledgement.
    pub ack_timeout: Duration,
    /// RFC 7252 `MAX_RETRANSMIT`.
    pub max_retransmit: u32,
    /// The registration lifetime when a device sends none (LwM2M's default: 86 400 s).
    pub default_lifetime: Duration,
    /// Bytes of package data cached for segment serving.
    pub cache_bytes: usize,
    /// The Block2 size used when a device does not ask for one (16-1024, a power of two).
    pub block_size: usize,
    /// Requests being worked on at once (those that wait for the database or the package store); past
    /// this a request is answered 5.03 with Max-Age and the device asks again later.
    pub max_in_flight: usize,
    /// Requests per second per source address that may cost a lookup (registrations, a download token
    /// not yet open), with twice as many at once; more are dropped unanswered.
    pub requests_per_second: u32,
}

impl Default for CoapSettings {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(2),
            max_retransmit: 4,
            default_lifetime: Duration::from_secs(86_400),
            cache_bytes: 256 * 1024 * 1024,
            block_size: 512,
            max_in_flight: 1024,
            requests_per_second: 10,
        }
    }
}

impl CoapSettings {
    /// RFC 7252 `EXCHANGE_LIFETIME` for these settings: how long a message id stays a duplicate.
    fn exchange_lifetime(&self) -> Duration {
        // MAX_TRANSMIT_SPAN + 2 * MAX_LATENCY (100 s) + PROCESSING_DELAY (ACK_TIMEOUT).
        let span = self
            .ack_timeout
            .mul_f64(f64::from((1u32 << self.max_retransmit) - 1) * 1.5);
        span + Duration::from_secs(200) + self.ack_timeout
    }
}

/// Events handed to the driver at once, at most.
const MAX_BATCH: usize = 500;
/// Progress is reported to the driver every this many percent of a download.
const PROGRESS_STEP: u32 = 10;

/// A registered device.
#[derive(Clone, Debug)]
struct Session {
    device_id: String,
    addr: SocketAddr,
    reg_id: String,
    /// When the registration ends without an update (ms on the injected clock).
    expires_at: i64,
    lifetime: Duration,
    /// The token of the `/19/0/0` observation.
    observe_token: Option<Vec<u8>>,
    /// The tokens of the `/5/0/3` (State) and `/5/0/5` (Update Result) observations.
    firmware_tokens: [Option<Vec<u8>>; 2],
}

#[derive(Default)]
struct Sessions {
    by_device: HashMap<String, Session>,
    by_reg: HashMap<String, String>,
    by_addr: HashMap<SocketAddr, String>,
}

impl Sessions {
    fn remove(&mut self, device_id: &str) -> Option<Session> {
        let s = self.by_device.remove(device_id)?;
        self.by_reg.remove(&s.reg_id);
        if self.by_addr.get(&s.addr).is_some_and(|d| d == device_id) {
            self.by_addr.remove(&s.addr);
        }
        Some(s)
    }

    fn insert(&mut self, s: Session) {
        self.remove(&s.device_id);
        self.by_reg.insert(s.reg_id.clone(), s.device_id.clone());
        self.by_addr.insert(s.addr, s.device_id.clone());
        self.by_device.insert(s.device_id.clone(), s);
    }
}

/// The token of a request to a device (always 8 bytes here).
type Token = [u8; 8];

/// A request to a device waiting for its answer.
struct Pending {
    addr: SocketAddr,
    mid: u16,
    /// The message, for retransmissions.
    bytes: Bytes,
    /// Retransmissions left; at 0 the next deadline gives up.
    retransmits_left: u32,
    /// The current wait (doubled at each deadline).
    wait: Duration,
    /// When the current wait ends.
    due: std::time::Instant,
    /// An empty ACK came: stop retransmitting, keep waiting for the separate response.
    acked: bool,
    /// Who waits for the answer (`None` when nobody does: fire-and-forget writes).
    answer: Option<oneshot::Sender<Option<Packet>>>,
}

/// A confirmable message already handled: its reply (none while in progress), and until when it counts.
type Seen = (Option<Vec<u8>>, std::time::Instant);

#[derive(Default)]
struct Exchanges {
    /// By token.
    pending: HashMap<Token, Pending>,
    /// Message id → token, for empty ACKs and resets.
    by_mid: HashMap<(SocketAddr, u16), Token>,
    /// Requests in the order sent, each with the earliest its first deadline can be (sent + ACK_TIMEOUT):
    /// answered ones are dropped from the front, late ones move to `due`.
    fresh: VecDeque<(std::time::Instant, Token)>,
    /// The next deadline of requests that passed their first unanswered (answered ones are skipped).
    due: BinaryHeap<Reverse<(std::time::Instant, Token)>>,
    /// Confirmable messages from devices already handled: the reply to repeat (none while in progress),
    /// and when the entry may go.
    seen: HashMap<(SocketAddr, u16), Seen>,
}

/// What a device is being served.
struct Serving {
    source: Arc<SegmentSource>,
    /// The last progress step reported to the driver (percent), if any.
    reported: Option<u32>,
}

/// A block-wise firmware download open at `/fw/<token>`.
struct BlockServing {
    device_id: String,
    source: Arc<SegmentSource>,
    /// When the token expires (ms on the injected clock).
    expires_at: i64,
    /// The last progress step reported to the driver (percent), if any.
    reported: Option<u32>,
    /// Bytes served and not yet added to the token's count.
    unrecorded: u64,
}

/// Package bytes for segment serving, per package, least recently used dropped first.
#[derive(Default)]
struct Cache {
    entries: HashMap<String, (Bytes, u64)>,
    bytes: usize,
    tick: u64,
}

/// The CoAP endpoint. Cheap to clone.
#[derive(Clone)]
pub struct CoapEndpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CoapEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoapEndpoint")
            .field("local_addr", &self.inner.socket.local_addr().ok())
            .finish_non_exhaustive()
    }
}

struct Inner {
    state: AppState,
    socket: UdpSocket,
    settings: CoapSettings,
    sessions: Mutex<Sessions>,
    exchanges: Mutex<Exchanges>,
    /// Wakes the retransmission task when a deadline earlier than all others was added.
    earlier_due: Notify,
    serving: Mutex<HashMap<String, Serving>>,
    /// Block-wise firmware downloads, by token hash.
    blocks: Mutex<HashMap<String, BlockServing>>,
    cache: Mutex<Cache>,
    /// Loads of package bytes in progress, so a crowd asking for one package loads it once.
    loading: tokio::sync::Mutex<()>,
    /// The next message id per peer: RFC 7252 forbids reusing one towards the same endpoint within
    /// `EXCHANGE_LIFETIME`, which a single counter shared by a fleet would do within seconds.
    next_mid: Mutex<HashMap<SocketAddr, u16>>,
    events: mpsc::UnboundedSender<(String, DeviceEvent)>,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, DeviceEvent)>>>,
    /// Places for requests being worked on ([`CoapSettings::max_in_flight`]).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// The `/19/0/0` observe tokens last issued to each device, newest last.
    observe_tokens: Mutex<HashMap<String, VecDeque<Token>>>,
    /// Requests that may cost a lookup, per source ([`CoapSettings::requests_per_second`]).
    per_source: governor::DefaultKeyedRateLimiter<SocketAddr>,
    /// Confirmable requests remembered for duplicate detection at most (a flood from ever new source
    /// ports would otherwise fill the map for `EXCHANGE_LIFETIME`); past this, new ones are dropped.
    max_seen: usize,
}

/// Observe tokens remembered per device ([`Inner::observe_tokens`]).
const ISSUED_OBSERVE_TOKENS: usize = 4;

/// What a device told "busy" (5.03) is asked to wait, in seconds (the Max-Age option).
const BUSY_MAX_AGE: u8 = 2;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl CoapEndpoint {
    /// An endpoint on `socket`, connected to the driver (it becomes the driver's [`Lwm2mLink`]).
    #[must_use]
    pub fn new(state: AppState, socket: UdpSocket, settings: CoapSettings) -> Self {
        let (events, events_rx) = mpsc::unbounded_channel();
        let in_flight = Arc::new(tokio::sync::Semaphore::new(settings.max_in_flight));
        let rate = std::num::NonZeroU32::new(settings.requests_per_second.max(1))
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst = rate.saturating_mul(std::num::NonZeroU32::new(2).unwrap_or(rate));
        let per_source =
            governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst));
        let endpoint = Self {
            inner: Arc::new(Inner {
                state,
                socket,
                settings,
                sessions: Mutex::default(),
                exchanges: Mutex::default(),
                earlier_due: Notify::new(),
                serving: Mutex::default(),
                blocks: Mutex::default(),
                cache: Mutex::default(),
                loading: tokio::sync::Mutex::new(()),
                next_mid: Mutex::default(),
                events,
                events_rx: Mutex::new(Some(events_rx)),
                in_flight,
                observe_tokens: Mutex::default(),
                per_source,
                max_seen: 200_000,
            }),
        };
        endpoint
            .inner
            .state
            .driver
            .set_lwm2m_link(Arc::new(endpoint.clone()));
        endpoint
    }

    /// The address it listens on.
    ///
    /// # Errors
    /// When the socket has none.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.socket.local_addr()
    }

    /// Serves until `stop` is cancelled: receives datagrams, expires registrations, feeds the driver.
    pub async fn run(self, stop: CancellationToken) {
        let events = lock(&self.inner.events_rx).take();
        let feeder = events.map(|rx| tokio::spawn(feed_driver(self.inner.state.clone(), rx)));
        let janitor = tokio::spawn(self.clone().janitor(stop.clone()));
        let retransmitter = tokio::spawn(self.clone().retransmitter(stop.clone()));
        let mut buf = vec![0u8; 2048];
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => break,
                r = self.inner.socket.recv_from(&mut buf) => r,
            };
            match received {
                Ok((n, addr)) => self.datagram(&buf[..n], addr),
                Err(e) => {
                    // ICMP port unreachable from a device that went away shows up here on Linux.
                    tracing::debug!(error.message = %e, "CoAP receive");
                }
            }
        }
        janitor.abort();
        retransmitter.abort();
        if let Some(f) = feeder {
            f.abort();
        }
    }

    /// Expires registrations whose lifetime passed, and forgets old duplicates.
    async fn janitor(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let now = self.inner.state.clock.now().as_millis();
            let expired: Vec<String> = {
                let mut sessions = lock(&self.inner.sessions);
                let ids: Vec<String> = sessions
                    .by_device
                    .values()
                    .filter(|s| s.expires_at <= now)
                    .map(|s| s.device_id.clone())
                    .collect();
                for id in &ids {
                    sessions.remove(id);
                }
                ids
            };
            for id in expired {
                tracing::info!(device_id = %id, "LwM2M registration expired");
                self.event(&id, DeviceEvent::Offline);
            }
            self.inner.per_source.retain_recent();
            self.inner.per_source.shrink_to_fit();
            let instant = std::time::Instant::now();
            let mut ex = lock(&self.inner.exchanges);
            ex.seen.retain(|_, (_, until)| *until > instant);
            // Message-id counters of peers that are gone (none registered there, nothing pending).
            let busy: std::collections::HashSet<SocketAddr> =
                ex.pending.values().map(|p| p.addr).collect();
            drop(ex);
            let registered: std::collections::HashSet<SocketAddr> =
                lock(&self.inner.sessions).by_addr.keys().copied().collect();
            lock(&self.inner.next_mid)
                .retain(|addr, _| registered.contains(addr) || busy.contains(addr));
        }
    }

    /// Retransmits requests whose acknowledgement is late, and gives up on those out of retransmissions.
    async fn retransmitter(self, stop: CancellationToken) {
        loop {
            let next = {
                let ex = lock(&self.inner.exchanges);
                let fresh = ex.fresh.front().map(|(at, _)| *at);
                let due = ex.due.peek().map(|Reverse((at, _))| *at);
                fresh.into_iter().chain(due).min()
            };
            let until = next.unwrap_or_else(|| std::time::Instant::now() + Duration::from_secs(60));
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.inner.earlier_due.notified() => continue,
                () = tokio::time::sleep_until(until.into()) => {}
            }
            self.retransmit_due(std::time::Instant::now());
        }
    }

    fn retransmit_due(&self, now: std::time::Instant) {
        let mut resend = Vec::new();
        let mut gave_up = Vec::new();
        {
            let mut ex = lock(&self.inner.exchanges);
            while let Some(&(at, token)) = ex.fresh.front() {
                if at > now {
                    break;
                }
                ex.fresh.pop_front();
                if let Some(due) = ex.pending.get(&token).map(|p| p.due) {
                    ex.due.push(Reverse((due, token)));
                }
            }
            while let Some(&Reverse((at, token))) = ex.due.peek() {
                if at > now {
                    break;
                }
                ex.due.pop();
                let Some(p) = ex.pending.get_mut(&token) else {
                    continue;
                };
                if p.retransmits_left == 0 {
                    let (addr, mid) = (p.addr, p.mid);
                    ex.by_mid.remove(&(addr, mid));
                    if let Some(p) = ex.pending.remove(&token) {
                        gave_up.push(p);
                    }
                    continue;
                }
                p.retransmits_left -= 1;
                p.wait *= 2;
                if !p.acked {
                    tracing::trace!(addr = %p.addr, mid = p.mid, "CoAP request sent again");
                    resend.push((p.bytes.clone(), p.addr));
                }
                p.due = now + p.wait;
                let next = p.due;
                ex.due.push(Reverse((next, token)));
            }
        }
        for (bytes, addr) in resend {
            self.send(&bytes, addr);
        }
        for mut p in gave_up {
            match p.answer.take() {
                Some(tx) => {
                    let _ = tx.send(None);
                }
                None => {
                    tracing::debug!(addr = %p.addr, mid = p.mid, "CoAP request not acknowledged")
                }
            }
        }
    }

    /// A fresh message id for `addr` (starting from a random one).
    fn next_mid(&self, addr: SocketAddr) -> u16 {
        let mut mids = lock(&self.inner.next_mid);
        let mid = mids.entry(addr).or_insert_with(rand::random);
        *mid = mid.wrapping_add(1);
        *mid
    }

    /// Devices registered now.
    #[must_use]
    pub fn registrations(&self) -> usize {
        lock(&self.inner.sessions).by_device.len()
    }

    fn event(&self, device_id: &str, event: DeviceEvent) {
        let _ = self.inner.events.send((device_id.to_owned(), event));
    }

    fn send(&self, bytes: &[u8], addr: SocketAddr) {
        if let Err(e) = self.inner.socket.try_send_to(bytes, addr) {
            tracing::debug!(%addr, error.message = %e, "CoAP send");
        }
    }

    fn datagram(&self, bytes: &[u8], addr: SocketAddr) {
        let Ok(packet) = Packet::from_bytes(bytes) else {
            tracing::debug!(%addr, len = bytes.len(), "CoAP: not a CoAP message, dropped");
            return;
        };
        let ty = packet.header.get_type();
        let mid = packet.header.message_id;
        match packet.header.code {
            MessageClass::Request(_) => {
                // Block GETs are safe to answer twice; remembering every answered block for the exchange
                // lifetime would hold hundreds of megabytes during a campaign.
                if is_block_request(&packet) {
                    self.block_request(&packet, addr);
                    return;
                }
                // Registration requests may cost a database lookup: limited per source, before they
                // take any memory. Dropped unanswered (an answer is what a flood wants).
                if self.inner.per_source.check_key(&addr).is_err() {
                    tracing::trace!(%addr, "CoAP: request over the per-source rate, dropped");
                    return;
                }
                if ty == MessageType::Confirmable && self.duplicate(addr, mid) {
                    return;
                }
                let Some(place) = self.place(&packet, addr) else {
                    return;
                };
                let this = self.clone();
                tokio::spawn(async move {
                    this.request(packet, addr).await;
                    drop(place);
                });
            }
            MessageClass::Empty => match ty {
                MessageType::Acknowledgement => self.acknowledged(addr, mid, None),
                MessageType::Reset => self.reset(addr, mid),
                // A CoAP ping: answer with a reset.
                MessageType::Confirmable => self.send(&reset(mid), addr),
                MessageType::NonConfirmable => {}
            },
            MessageClass::Response(_) => match ty {
                MessageType::Acknowledgement => self.acknowledged(addr, mid, Some(packet)),
                MessageType::Reset => self.reset(addr, mid),
                MessageType::Confirmable | MessageType::NonConfirmable => {
                    if ty == MessageType::Confirmable {
                        let ack = empty_ack(mid);
                        let first = !self.duplicate(addr, mid);
                        self.remember(addr, mid, ack.clone());
                        self.send(&ack, addr);
                        if !first {
                            return;
                        }
                    }
                    self.response(packet, addr);
                }
            },
            MessageClass::Reserved(_) => {
                if ty == MessageType::Confirmable {
                    self.send(&reset(mid), addr);
                }
            }
        }
    }

    /// Whether a confirmable message was seen before; if so, its reply (when ready) is sent again.
    fn duplicate(&self, addr: SocketAddr, mid: u16) -> bool {
        let mut ex = lock(&self.inner.exchanges);
        if let Some((reply, _)) = ex.seen.get(&(addr, mid)) {
            if let Some(reply) = reply.clone() {
                drop(ex);
                self.send(&reply, addr);
            }
            return true;
        }
        if ex.seen.len() >= self.inner.max_seen {
            // Treated as already seen (dropped): memory for duplicate detection is bounded.
            return true;
        }
        let until = std::time::Instant::now() + self.inner.settings.exchange_lifetime();
        ex.seen.insert((addr, mid), (None, until));
        false
    }

    fn remember(&self, addr: SocketAddr, mid: u16, reply: Vec<u8>) {
        let until = std::time::Instant::now() + self.inner.settings.exchange_lifetime();
        lock(&self.inner.exchanges)
            .seen
            .insert((addr, mid), (Some(reply), until));
    }

    fn reply(&self, addr: SocketAddr, request: &Packet, response: &Packet) {
        let Ok(bytes) = response.to_bytes() else {
            return;
        };
        if request.header.get_type() == MessageType::Confirmable {
            self.remember(addr, request.header.message_id, bytes.clone());
        }
        self.send(&bytes, addr);
    }

    fn acknowledged(&self, addr: SocketAddr, mid: u16, response: Option<Packet>) {
        let mut ex = lock(&self.inner.exchanges);
        let Some(token) = ex.by_mid.get(&(addr, mid)).copied() else {
            return;
        };
        match response {
            Some(p) if p.get_token() == token.as_slice() => {
                ex.by_mid.remove(&(addr, mid));
                if let Some(mut pending) = ex.pending.remove(&token)
                    && let Some(tx) = pending.answer.take()
                {
                    let _ = tx.send(Some(p));
                }
            }
            // An answer to something else under this id (a confused peer): the exchange goes on.
            Some(_) => {}
            None => {
                if let Some(p) = ex.pending.get_mut(&token) {
                    p.acked = true;
                }
            }
        }
    }

    fn reset(&self, addr: SocketAddr, mid: u16) {
        let mut ex = lock(&self.inner.exchanges);
        if let Some(token) = ex.by_mid.remove(&(addr, mid))
            && let Some(mut p) = ex.pending.remove(&token)
            && let Some(tx) = p.answer.take()
        {
            let _ = tx.send(None);
        }
    }

    /// A response that is not piggybacked: a separate response to a request of ours, or a notification of
    /// the `/19/0/0` observation.
    fn response(&self, packet: Packet, addr: SocketAddr) {
        {
            let mut ex = lock(&self.inner.exchanges);
            if let Ok(token) = Token::try_from(packet.get_token())
                && let Some(mut p) = ex.pending.remove(&token)
            {
                ex.by_mid.remove(&(p.addr, p.mid));
                if let Some(tx) = p.answer.take() {
                    let _ = tx.send(Some(packet));
                }
                return;
            }
        }
        let device_id = {
            let mut sessions = lock(&self.inner.sessions);
            let Some(device_id) = sessions.by_addr.get(&addr).cloned() else {
                drop(sessions);
                // Nobody registered there (Updraft restarted, or the device moved): the device cancels
                // its observation on a reset and registers again.
                if packet.header.get_type() == MessageType::NonConfirmable {
                    self.send(&reset(packet.header.message_id), addr);
                }
                return;
            };
            let firmware = sessions.by_device.get(&device_id).and_then(|s| {
                s.firmware_tokens
                    .iter()
                    .position(|t| t.as_deref() == Some(packet.get_token()))
            });
            if let Some(which) = firmware {
                drop(sessions);
                self.firmware_notification(&device_id, which, &packet);
                return;
            }
            let token = packet.get_token();
            let current = sessions
                .by_device
                .get(&device_id)
                .is_some_and(|s| s.observe_token.as_deref() == Some(token));
            let issued = !current
                && Token::try_from(token).is_ok_and(|t| {
                    lock(&self.inner.observe_tokens)
                        .get(&device_id)
                        .is_some_and(|tokens| tokens.contains(&t))
                });
            if issued && let Some(s) = sessions.by_device.get_mut(&device_id) {
                // An observation of ours whose answer was lost: take it up.
                s.observe_token = Some(token.to_vec());
            }
            if !current && !issued {
                drop(sessions);
                // Not an observation of ours (one from before a restart, or a forgery from the device's
                // address): a reset makes a real device cancel it; nothing it says is taken.
                tracing::debug!(device_id, %addr, "LwM2M: notification with an unknown token, reset");
                self.send(&reset(packet.header.message_id), addr);
                return;
            }
            device_id
        };
        if matches!(
            packet.header.code,
            MessageClass::Response(ResponseType::Content | ResponseType::Changed)
        ) && !packet.payload.is_empty()
        {
            self.uplink(&device_id, addr, &packet.payload);
        }
    }

    /// A PCP message from a device.
    fn uplink(&self, device_id: &str, addr: SocketAddr, payload: &[u8]) {
        let message = match pcp::decode_exact(payload).and_then(|f| Uplink::parse(&f)) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(device_id, error.message = %e, "PCP message dropped");
                return;
            }
        };
        let event = match message {
            Uplink::Version { result, version } => DeviceEvent::PcpVersion {
                result: result.0,
                version: version.as_string(),
            },
            Uplink::NewVersionAnswer { result } => {
                DeviceEvent::PcpNewVersionAnswer { result: result.0 }
            }
            Uplink::SegmentRequest { version, segment } => {
                self.segment_request(device_id, addr, version, segment);
                return;
            }
            Uplink::DownloadResult { result } => {
                DeviceEvent::PcpDownloadResult { result: result.0 }
            }
            Uplink::ExecuteAnswer { result } => DeviceEvent::PcpExecuteAnswer { result: result.0 },
            Uplink::UpgradeResult { result, version } => DeviceEvent::PcpUpgradeResult {
                result: result.0,
                version: version.as_string(),
            },
        };
        self.event(device_id, event);
    }

    /// Answers a 0x15 segment request: at once when the download and its package bytes are at hand
    /// (the usual case), else once they are looked up and loaded.
    fn segment_request(&self, device_id: &str, addr: SocketAddr, version: pcp::Version, n: u16) {
        let source = lock(&self.inner.serving)
            .get(device_id)
            .map(|s| s.source.clone());
        if let Some(source) = &source
            && let Some(bytes) = self.cached(&source.package_id)
        {
            self.answer_segment(device_id, addr, &version, n, Some(source), &bytes);
            return;
        }
        let this = self.clone();
        let device_id = device_id.to_owned();
        tokio::spawn(async move {
            // Updraft restarted mid-download: the driver's stored state says what is served.
            let source = match source {
                Some(s) => Some(s),
                None => this.restore_serving(&device_id).await,
            };
            let bytes = match &source {
                Some(source) if source.version == version.as_string() => {
                    match this.package_bytes(source).await {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::warn!(package_id = %source.package_id, error.message = %e, "PCP: package bytes unavailable");
                            return;
                        }
                    }
                }
                _ => Bytes::new(),
            };
            this.answer_segment(&device_id, addr, &version, n, source.as_ref(), &bytes);
        });
    }

    /// Writes segment `n` of `source` (whose package is `bytes`), or the reason there is none.
    fn answer_segment(
        &self,
        device_id: &str,
        addr: SocketAddr,
        version: &pcp::Version,
        n: u16,
        source: Option<&Arc<SegmentSource>>,
        bytes: &Bytes,
    ) {
        let answer = |result: ResultCode, data: &[u8]| {
            Pcp::Segment {
                result,
                segment: n,
                data,
            }
            .encode()
        };
        let Some(source) = source.filter(|s| s.version == version.as_string()) else {
            self.write_pcp(device_id, addr, answer(ResultCode::NO_TASK, &[]));
            return;
        };
        let data = pcp::segment_range(source.size, source.segment_size, n).and_then(|range| {
            let start = usize::try_from(range.start).ok()?;
            let end = usize::try_from(range.end).ok()?;
            bytes.get(start..end)
        });
        let Some(data) = data else {
            self.write_pcp(device_id, addr, answer(ResultCode::NO_SEGMENT, &[]));
            return;
        };
        self.write_pcp(device_id, addr, answer(ResultCode::OK, data));
        self.progress(device_id, source, n);
    }

    /// Tells the driver about a download's progress every [`PROGRESS_STEP`] percent (and at its first
    /// request, which is the device's acceptance).
    fn progress(&self, device_id: &str, source: &SegmentSource, n: u16) {
        let count = source.count();
        if count == 0 {
            return;
        }
        let pct = u32::from(n) * 100 / u32::from(count);
        let step = pct / PROGRESS_STEP * PROGRESS_STEP;
        let report = {
            let mut serving = lock(&self.inner.serving);
            match serving.get_mut(device_id) {
                Some(s) if s.reported.is_none_or(|r| step > r) => {
                    s.reported = Some(step);
                    true
                }
                _ => false,
            }
        };
        if report {
            self.event(device_id, DeviceEvent::PcpSegment { segment: n, count });
        }
    }

    async fn restore_serving(&self, device_id: &str) -> Option<Arc<SegmentSource>> {
        match self
            .inner
            .state
            .driver
            .serving(&self.inner.state, device_id)
            .await
        {
            Ok(Some(source)) => {
                let source = Arc::new(source);
                lock(&self.inner.serving).insert(
                    device_id.to_owned(),
                    Serving {
                        source: source.clone(),
                        reported: None,
                    },
                );
                Some(source)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(device_id, error.message = %e, "PCP: looking up the download failed");
                None
            }
        }
    }

    /// The whole package, from the cache or loaded into it once.
    /// Bytes `range` of a package: from the cache, from the whole package loaded into it when it fits
    /// (`lwm2m.cache_bytes`), else read from the store on their own, so a package larger than the cache is
    /// never held whole to serve one block.
    async fn block_bytes(
        &self,
        source: &SegmentSource,
        range: std::ops::Range<usize>,
    ) -> crate::Result<Bytes> {
        if let Some(b) = self.cached(&source.package_id) {
            return Ok(b.slice(range));
        }
        if usize::try_from(source.size).is_ok_and(|size| size <= self.inner.settings.cache_bytes) {
            return Ok(self.package_bytes(source).await?.slice(range));
        }
        self.read_package(source, range.start as u64..range.end as u64)
            .await
    }

    /// Bytes `range` of a package, read from the store.
    async fn read_package(
        &self,
        source: &SegmentSource,
        range: std::ops::Range<u64>,
    ) -> crate::Result<Bytes> {
        let capacity = usize::try_from(range.end - range.start).unwrap_or(0);
        let reader = self
            .inner
            .state
            .store
            .open_range(&source.object_key, range, 64 * 1024)
            .await?;
        let all = reader
            .try_fold(Vec::with_capacity(capacity), |mut all, chunk| async move {
                all.extend_from_slice(&chunk);
                Ok(all)
            })
            .await
            .map_err(|e| {
                crate::Error::Internal(format!("reading package {}: {e}", source.package_id))
            })?;
        Ok(Bytes::from(all))
    }

    async fn package_bytes(&self, source: &SegmentSource) -> crate::Result<Bytes> {
        if let Some(b) = self.cached(&source.package_id) {
            return Ok(b);
        }
        let _loading = self.inner.loading.lock().await;
        if let Some(b) = self.cached(&source.package_id) {
            return Ok(b);
        }
        let bytes = self.read_package(source, 0..source.size).await?;
        let mut cache = lock(&self.inner.cache);
        cache.tick += 1;
        let tick = cache.tick;
        cache.bytes += bytes.len();
        cache
            .entries
            .insert(source.package_id.clone(), (bytes.clone(), tick));
        let limit = self.inner.settings.cache_bytes;
        while cache.bytes > limit && cache.entries.len() > 1 {
            let Some(oldest) = cache
                .entries
                .iter()
                .filter(|(id, _)| **id != source.package_id)
                .min_by_key(|(_, (_, t))| *t)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            if let Some((b, _)) = cache.entries.remove(&oldest) {
                cache.bytes -= b.len();
            }
        }
        Ok(bytes)
    }

    fn cached(&self, package_id: &str) -> Option<Bytes> {
        let mut cache = lock(&self.inner.cache);
        cache.tick += 1;
        let tick = cache.tick;
        cache.entries.get_mut(package_id).map(|(b, t)| {
            *t = tick;
            b.clone()
        })
    }

    fn session(&self, device_id: &str) -> Option<Session> {
        lock(&self.inner.sessions).by_device.get(device_id).cloned()
    }

    /// Writes a PCP frame to the device's `/19/1/0` (confirmable, retransmitted; fire-and-forget).
    fn write_pcp(&self, device_id: &str, addr: SocketAddr, frame: Vec<u8>) {
        let mut packet = Packet::new();
        packet.header.code = MessageClass::Request(RequestType::Put);
        for seg in ["19", "1", "0"] {
            packet.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        packet.set_content_format(ContentFormat::ApplicationOctetStream);
        packet.payload = frame;
        if !self.start_exchange(addr, packet, None) {
            tracing::debug!(device_id, "PCP write could not be encoded");
        }
    }

    /// Sends a confirmable request and waits for its answer; `None` after the last retransmission, or
    /// on a reset.
    async fn exchange(&self, addr: SocketAddr, packet: Packet) -> Option<Packet> {
        self.exchange_with(addr, packet, rand::random()).await
    }

    /// [`Self::exchange`] under the given token.
    async fn exchange_with(
        &self,
        addr: SocketAddr,
        packet: Packet,
        token: Token,
    ) -> Option<Packet> {
        let (tx, rx) = oneshot::channel();
        if !self.start_exchange_with(addr, packet, Some(tx), token) {
            return None;
        }
        rx.await.ok().flatten()
    }

    /// Sends `packet` as a confirmable request; the retransmission task takes it from there. False when
    /// it cannot be encoded.
    fn start_exchange(
        &self,
        addr: SocketAddr,
        packet: Packet,
        answer: Option<oneshot::Sender<Option<Packet>>>,
    ) -> bool {
        self.start_exchange_with(addr, packet, answer, rand::random())
    }

    fn start_exchange_with(
        &self,
        addr: SocketAddr,
        mut packet: Packet,
        answer: Option<oneshot::Sender<Option<Packet>>>,
        token: Token,
    ) -> bool {
        let mid = self.next_mid(addr);
        packet.header.set_type(MessageType::Confirmable);
        packet.header.message_id = mid;
        packet.set_token(token.to_vec());
        let Ok(bytes) = packet.to_bytes() else {
            return false;
        };
        let bytes = Bytes::from(bytes);
        let settings = &self.inner.settings;
        let wait = settings
            .ack_timeout
            .mul_f64(1.0 + rand::random::<f64>() * 0.5);
        let sent = std::time::Instant::now();
        let earliest = sent + settings.ack_timeout;
        let wake = {
            let mut ex = lock(&self.inner.exchanges);
            // The queue's deadlines only grow, so only a first entry can be earlier than all others.
            let wake = ex.fresh.is_empty()
                && ex
                    .due
                    .peek()
                    .is_none_or(|Reverse((first, _))| earliest < *first);
            ex.fresh.push_back((earliest, token));
            ex.by_mid.insert((addr, mid), token);
            ex.pending.insert(
                token,
                Pending {
                    addr,
                    mid,
                    bytes: bytes.clone(),
                    retransmits_left: settings.max_retransmit,
                    wait,
                    due: sent + wait,
                    acked: false,
                    answer,
                },
            );
            wake
        };
        if wake {
            self.inner.earlier_due.notify_one();
        }
        tracing::trace!(%addr, mid, "CoAP request sent");
        self.send(&bytes, addr);
        true
    }

    /// A request from a device: the registration interface.
    async fn request(&self, packet: Packet, addr: SocketAddr) {
        let (code, location) = match lwm2m::registration(&packet) {
            Ok(Registration::Register { endpoint, params }) => {
                self.register(&endpoint, &params, addr).await
            }
            Ok(Registration::Update { id, params }) => (self.update(&id, &params, addr), None),
            Ok(Registration::Deregister { id }) => (self.deregister(&id, addr), None),
            Err(RequestError::NotFound) => (ResponseType::NotFound, None),
            Err(e) => {
                tracing::debug!(%addr, error.message = %e, "LwM2M registration request refused");
                (ResponseType::BadRequest, None)
            }
        };
        let mut response = self.response_for(&packet, code, addr);
        if let Some(id) = &location {
            response.add_option(CoapOption::LocationPath, b"rd".to_vec());
            response.add_option(CoapOption::LocationPath, id.as_bytes().to_vec());
        }
        self.reply(addr, &packet, &response);
        if let Some(reg_id) = location {
            let this = self.clone();
            tokio::spawn(async move { this.observe_and_announce(reg_id).await });
        }
    }

    /// `POST /rd?ep=...`: 2.01 with a location, or 4.03 for an unknown or frozen endpoint.
    async fn register(
        &self,
        endpoint: &str,
        params: &RegisterParams,
        addr: SocketAddr,
    ) -> (ResponseType, Option<String>) {
        let device = match crate::service::devices::find_lwm2m(&self.inner.state, endpoint).await {
            Ok(Some(d)) if d.secure_access => {
                // The device must come over DTLS (`secure_access`); a plain registration of it is
                // refused, so no one can take its place on plain CoAP.
                tracing::debug!(%addr, endpoint, "LwM2M registration refused: the device needs a secure (DTLS) connection");
                return (ResponseType::Forbidden, None);
            }
            Ok(Some(d)) => d,
            Ok(None) => {
                tracing::debug!(%addr, endpoint, "LwM2M registration refused: unknown or frozen endpoint");
                return (ResponseType::Forbidden, None);
            }
            Err(e) => {
                tracing::warn!(endpoint, error.message = %e, "LwM2M registration: device lookup failed");
                return (ResponseType::InternalServerError, None);
            }
        };
        let lifetime = params
            .lifetime
            .map_or(self.inner.settings.default_lifetime, |s| {
                Duration::from_secs(u64::from(s))
            });
        let reg_id = hex::encode(rand::random::<[u8; 6]>());
        let now = self.inner.state.clock.now();
        lock(&self.inner.sessions).insert(Session {
            device_id: device.id.clone(),
            addr,
            reg_id: reg_id.clone(),
            expires_at: now.plus(lifetime).as_millis(),
            lifetime,
            observe_token: None,
            firmware_tokens: [None, None],
        });
        tracing::debug!(device_id = %device.id, endpoint, %addr, "LwM2M registered");
        (ResponseType::Created, Some(reg_id))
    }

    /// After a registration was answered: observe `/19/0/0`, then tell the driver the device is here (so
    /// its answers to what the driver sends can arrive).
    async fn observe_and_announce(&self, reg_id: String) {
        let Some(session) = ({
            let sessions = lock(&self.inner.sessions);
            sessions
                .by_reg
                .get(&reg_id)
                .and_then(|d| sessions.by_device.get(d))
                .cloned()
        }) else {
            return;
        };
        let mut observe = Packet::new();
        observe.header.code = MessageClass::Request(RequestType::Get);
        observe.add_option(CoapOption::Observe, Vec::new());
        for seg in ["19", "0", "0"] {
            observe.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        observe.add_option(CoapOption::Accept, format_bytes(lwm2m::FORMAT_OPAQUE));
        // Remembered before it is sent: on a lossy link the device may take up this observation even if
        // its answer never arrives (or a later registration's observation crosses it), and its
        // notifications under it are then still the platform's own.
        let token: Token = rand::random();
        {
            let mut issued = lock(&self.inner.observe_tokens);
            let tokens = issued.entry(session.device_id.clone()).or_default();
            if tokens.len() >= ISSUED_OBSERVE_TOKENS {
                tokens.pop_front();
            }
            tokens.push_back(token);
        }
        match self.exchange_observe(session.addr, observe, token).await {
            Some(token) => {
                if let Some(s) = lock(&self.inner.sessions)
                    .by_device
                    .get_mut(&session.device_id)
                    .filter(|s| s.reg_id == reg_id)
                {
                    s.observe_token = Some(token);
                }
            }
            None => {
                tracing::info!(device_id = %session.device_id, "LwM2M: observing /19/0/0 failed")
            }
        }
        self.event(&session.device_id, DeviceEvent::Online);
    }

    /// Sends an observe request; returns its token when the device accepted it.
    async fn exchange_observe(
        &self,
        addr: SocketAddr,
        packet: Packet,
        token: Token,
    ) -> Option<Vec<u8>> {
        let answer = self.exchange_with(addr, packet, token).await?;
        let ok = matches!(
            answer.header.code,
            MessageClass::Response(ResponseType::Content | ResponseType::Changed)
        );
        ok.then(|| answer.get_token().to_vec())
    }

    /// `POST /rd/{id}`: a registration update (lifetime refreshed). A registration is bound to the
    /// address it was made from: an update from elsewhere is 4.04, and a device whose address changed
    /// registers again (as LwM2M clients do on 4.04), so a registration id seen on the wire cannot move
    /// the device's traffic to another address.
    fn update(&self, reg_id: &str, params: &RegisterParams, addr: SocketAddr) -> ResponseType {
        let now = self.inner.state.clock.now();
        let mut sessions = lock(&self.inner.sessions);
        let Some(device_id) = sessions.by_reg.get(reg_id).cloned() else {
            return ResponseType::NotFound;
        };
        let Some(s) = sessions
            .by_device
            .get_mut(&device_id)
            .filter(|s| s.addr == addr)
        else {
            tracing::debug!(%addr, reg_id, "LwM2M update from another address than the registration's");
            return ResponseType::NotFound;
        };
        if let Some(lt) = params.lifetime {
            s.lifetime = Duration::from_secs(u64::from(lt));
        }
        s.expires_at = now.plus(s.lifetime).as_millis();
        ResponseType::Changed
    }

    /// `DELETE /rd/{id}` (from the registration's address only, like an update).
    fn deregister(&self, reg_id: &str, addr: SocketAddr) -> ResponseType {
        let removed = {
            let mut sessions = lock(&self.inner.sessions);
            let Some(device_id) = sessions.by_reg.get(reg_id).cloned() else {
                return ResponseType::NotFound;
            };
            if sessions
                .by_device
                .get(&device_id)
                .is_none_or(|s| s.addr != addr)
            {
                return ResponseType::NotFound;
            }
            sessions.remove(&device_id)
        };
        if let Some(s) = removed {
            self.event(&s.device_id, DeviceEvent::Offline);
        }
        ResponseType::Deleted
    }

    /// Reads `path` (`/4/0`, or `/4/0/8` named by `single`); the integer resources of the answer, in
    /// whatever format the device chose (OMA-TLV, either number, plain text or SenML JSON). No Accept
    /// option is sent: clients that do not know a content format number drop the whole request.
    async fn read(
        &self,
        device_id: &str,
        path: &[&str],
        single: Option<u16>,
    ) -> Option<Vec<(u16, i64)>> {
        let session = self.session(device_id)?;
        let mut packet = Packet::new();
        packet.header.code = MessageClass::Request(RequestType::Get);
        for seg in path {
            packet.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        let answer = self.exchange(session.addr, packet).await?;
        if answer.header.code != MessageClass::Response(ResponseType::Content) {
            return None;
        }
        let format = content_format(&answer);
        match lwm2m::integer_resources(format, &answer.payload, single) {
            Ok(values) => Some(values.into_iter().collect()),
            Err(e) => {
                tracing::info!(device_id, error.message = %e, "LwM2M read answer not understood");
                None
            }
        }
    }

    /// The answer to `request` from `addr`: piggybacked on the ACK of a confirmable request, else a
    /// non-confirmable message with a fresh id.
    fn response_for(&self, request: &Packet, code: ResponseType, addr: SocketAddr) -> Packet {
        let mut response = Packet::new();
        response.header.code = MessageClass::Response(code);
        response.set_token(request.get_token().to_vec());
        if request.header.get_type() == MessageType::Confirmable {
            response.header.set_type(MessageType::Acknowledgement);
            response.header.message_id = request.header.message_id;
        } else {
            response.header.set_type(MessageType::NonConfirmable);
            response.header.message_id = self.next_mid(addr);
        }
        response
    }

    /// `GET /fw/<token>` with Block2: one block of the firmware package the token opens.
    fn block_request(&self, packet: &Packet, addr: SocketAddr) {
        let token = packet
            .get_option(CoapOption::UriPath)
            .and_then(|p| p.iter().nth(1))
            .map(|t| String::from_utf8_lossy(t).to_ascii_lowercase())
            .unwrap_or_default();
        let block = match packet.get_first_option(CoapOption::Block2) {
            None => Ok(None),
            Some(v) => lwm2m::Block::decode(v).map(Some),
        };
        let Ok(block) = block else {
            self.block_error(
                packet,
                addr,
                ResponseType::BadOption,
                "malformed Block2 option",
            );
            return;
        };
        let (num, szx) = block.map_or(
            (0, lwm2m::Block::szx_for(self.inner.settings.block_size)),
            |b| (b.num, b.szx.min(6)),
        );
        let hash = crate::ids::sha256_hex(&token);
        let now = self.inner.state.clock.now().as_millis();
        let source = {
            let blocks = lock(&self.inner.blocks);
            blocks.get(&hash).map(|b| (b.source.clone(), b.expires_at))
        };
        if let Some((source, expires_at)) = &source {
            if now >= *expires_at {
                self.block_error(
                    packet,
                    addr,
                    ResponseType::Unauthorized,
                    "the download token has expired",
                );
                return;
            }
            if let Some(bytes) = self.cached(&source.package_id) {
                self.answer_block(packet, addr, &hash, &bytes, num, szx);
                return;
            }
        }
        // A token not open yet costs a database lookup: limited per source like registrations.
        if source.is_none() && self.inner.per_source.check_key(&addr).is_err() {
            return;
        }
        let Some(place) = self.place(packet, addr) else {
            return;
        };
        let this = self.clone();
        let packet = packet.clone();
        tokio::spawn(async move {
            let _place = place;
            let source = match source {
                Some((s, _)) => s,
                None => match crate::service::downloads::authorize_token(&this.inner.state, &token)
                    .await
                {
                    Ok(Ok(grant)) => {
                        let source = match crate::driver::segment_source(&grant.package) {
                            Ok(s) => Arc::new(s),
                            Err(e) => {
                                tracing::warn!(error.message = %e, "block download: package unusable");
                                this.block_error(
                                    &packet,
                                    addr,
                                    ResponseType::InternalServerError,
                                    "package unavailable",
                                );
                                return;
                            }
                        };
                        lock(&this.inner.blocks)
                            .entry(hash.clone())
                            .or_insert(BlockServing {
                                device_id: grant.device_id,
                                source: source.clone(),
                                expires_at: grant.expires_at,
                                reported: None,
                                unrecorded: 0,
                            });
                        source
                    }
                    Ok(Err(denied)) => {
                        this.block_error(
                            &packet,
                            addr,
                            ResponseType::Unauthorized,
                            &denied.to_string(),
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error.message = %e, "block download: token lookup failed");
                        this.block_error(
                            &packet,
                            addr,
                            ResponseType::ServiceUnavailable,
                            "try again",
                        );
                        return;
                    }
                },
            };
            let size = usize::try_from(source.size).unwrap_or(usize::MAX);
            let Some((range, _)) = lwm2m::Block::slice(num, szx, size) else {
                this.block_error(&packet, addr, ResponseType::BadOption, "no such block");
                return;
            };
            match this.block_bytes(&source, range.clone()).await {
                Ok(block) => {
                    this.answer_block_range(&packet, addr, &hash, size, num, szx, range, &block)
                }
                Err(e) => {
                    tracing::warn!(package_id = %source.package_id, error.message = %e, "block download: package bytes unavailable");
                    this.block_error(
                        &packet,
                        addr,
                        ResponseType::ServiceUnavailable,
                        "package unavailable",
                    );
                }
            }
        });
    }

    /// Block `num` of a package whose bytes are all at hand.
    fn answer_block(
        &self,
        request: &Packet,
        addr: SocketAddr,
        hash: &str,
        bytes: &Bytes,
        num: u32,
        szx: u8,
    ) {
        let Some((range, _)) = lwm2m::Block::slice(num, szx, bytes.len()) else {
            self.block_error(request, addr, ResponseType::BadOption, "no such block");
            return;
        };
        let block = bytes.slice(range.clone());
        self.answer_block_range(request, addr, hash, bytes.len(), num, szx, range, &block);
    }

    /// Block `num` (bytes `range` of a `total`-byte package, `block` being those bytes).
    #[allow(clippy::too_many_arguments)]
    fn answer_block_range(
        &self,
        request: &Packet,
        addr: SocketAddr,
        hash: &str,
        total: usize,
        num: u32,
        szx: u8,
        range: std::ops::Range<usize>,
        block: &[u8],
    ) {
        let more = range.end < total;
        let mut response = self.response_for(request, ResponseType::Content, addr);
        response.set_content_format(ContentFormat::ApplicationOctetStream);
        response.add_option(CoapOption::Block2, lwm2m::Block { num, more, szx }.encode());
        if num == 0 || request.get_first_option(CoapOption::Size2).is_some() {
            response.add_option(CoapOption::Size2, uint_bytes(total as u64));
        }
        let served = range.len() as u64;
        response.payload = block.to_vec();
        if let Ok(out) = response.to_bytes() {
            self.send(&out, addr);
        }
        // Progress every PROGRESS_STEP percent, and the bytes served with it.
        let report = {
            let mut blocks = lock(&self.inner.blocks);
            blocks.get_mut(hash).and_then(|b| {
                b.unrecorded += served;
                let pct =
                    u32::try_from(range.end as u64 * 100 / (total.max(1) as u64)).unwrap_or(100);
                let step = pct / PROGRESS_STEP * PROGRESS_STEP;
                if b.reported.is_none_or(|r| step > r) {
                    b.reported = Some(step);
                    let unrecorded = std::mem::take(&mut b.unrecorded);
                    Some((b.device_id.clone(), step, unrecorded))
                } else {
                    None
                }
            })
        };
        if let Some((device_id, step, unrecorded)) = report {
            self.event(
                &device_id,
                DeviceEvent::FirmwareProgress(u8::try_from(step.min(99)).unwrap_or(99)),
            );
            self.record_served(hash.to_owned(), unrecorded);
        }
        if !more {
            self.confirm_downloaded(hash.to_owned());
        }
    }

    /// After the last block: the State notification saying "downloaded" may be lost (notifications are
    /// often non-confirmable), so while the download stays open the State is read, a few times, backing
    /// off.
    fn confirm_downloaded(&self, hash: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut wait = this.inner.settings.ack_timeout * 2;
            for _ in 0..=this.inner.settings.max_retransmit {
                tokio::time::sleep(wait).await;
                wait *= 2;
                let Some(device_id) = lock(&this.inner.blocks)
                    .get(&hash)
                    .map(|b| b.device_id.clone())
                else {
                    return; // the driver closed the download: the State came through
                };
                let state = this
                    .read(&device_id, &["5", "0", "3"], Some(lwm2m::firmware::STATE))
                    .await
                    .and_then(|v| {
                        v.iter()
                            .find(|(r, _)| *r == lwm2m::firmware::STATE)
                            .map(|(_, v)| *v)
                    })
                    .and_then(|v| u8::try_from(v).ok());
                if let Some(state) = state {
                    this.event(&device_id, DeviceEvent::FirmwareState(state));
                }
            }
        });
    }

    /// A place for a request that waits for the database or the store; without one (too many at once)
    /// the request is answered 5.03 with Max-Age, and `None` is returned.
    fn place(
        &self,
        request: &Packet,
        addr: SocketAddr,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let place = self.inner.in_flight.clone().try_acquire_owned().ok();
        if place.is_none() {
            tracing::debug!(%addr, "CoAP: busy, answered 5.03");
            self.block_error(
                request,
                addr,
                ResponseType::ServiceUnavailable,
                "busy; try again",
            );
        }
        place
    }

    fn block_error(&self, request: &Packet, addr: SocketAddr, code: ResponseType, why: &str) {
        let mut response = self.response_for(request, code, addr);
        if code == ResponseType::ServiceUnavailable {
            // RFC 7252 §5.9.3.4: Max-Age says when to try again.
            response.add_option(CoapOption::MaxAge, vec![BUSY_MAX_AGE]);
        }
        // RFC 7252 §5.5.2: a diagnostic payload, when the answer stays no larger than the request (an
        // error is the answer anyone can get: it must not amplify a spoofed flood).
        let limit = request.to_bytes().map_or(0, |b| b.len());
        let Ok(bare) = response.to_bytes() else {
            return;
        };
        if bare.len() + 1 + why.len() <= limit {
            response.payload = why.as_bytes().to_vec();
            if let Ok(out) = response.to_bytes() {
                self.send(&out, addr);
            }
        } else if bare.len() <= limit {
            self.send(&bare, addr);
        }
    }

    /// Adds served bytes to a token's count (in the background; a lost count is not worth a retry).
    fn record_served(&self, hash: String, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let state = self.inner.state.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::service::downloads::record_served(&state, &hash, bytes).await {
                tracing::debug!(error.message = %e, "block download: counting bytes failed");
            }
        });
    }

    /// Writes the Package URI, then observes the State and the Update Result.
    async fn write_uri_and_observe(&self, device_id: &str, uri: String) {
        let Some(session) = self.session(device_id) else {
            return;
        };
        let mut write = Packet::new();
        write.header.code = MessageClass::Request(RequestType::Put);
        for seg in ["5", "0", "1"] {
            write.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        write.set_content_format(ContentFormat::TextPlain);
        write.payload = uri.into_bytes();
        match self.exchange(session.addr, write).await {
            Some(a) if a.header.code == MessageClass::Response(ResponseType::Changed) => {}
            answer => {
                tracing::info!(device_id, code = ?answer.map(|a| a.header.code), "LwM2M: Package URI write refused");
                self.event(device_id, DeviceEvent::UriRefused);
                return;
            }
        }
        for (which, resource) in [
            (0, lwm2m::firmware::STATE),
            (1, lwm2m::firmware::UPDATE_RESULT),
        ] {
            let mut observe = Packet::new();
            observe.header.code = MessageClass::Request(RequestType::Get);
            observe.add_option(CoapOption::Observe, Vec::new());
            for seg in ["5", "0", &resource.to_string()] {
                observe.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
            }
            let Some(answer) = self.exchange(session.addr, observe).await else {
                tracing::info!(device_id, resource, "LwM2M: observing /5/0 failed");
                continue;
            };
            if answer.header.code != MessageClass::Response(ResponseType::Content) {
                tracing::info!(device_id, resource, code = %answer.header.code, "LwM2M: observe of /5/0 refused");
                continue;
            }
            if let Some(s) = lock(&self.inner.sessions)
                .by_device
                .get_mut(device_id)
                .filter(|s| s.reg_id == session.reg_id)
            {
                s.firmware_tokens[which] = Some(answer.get_token().to_vec());
            }
            self.firmware_notification(device_id, which, &answer);
        }
    }

    /// A value of the State (`which` 0) or the Update Result (1).
    fn firmware_notification(&self, device_id: &str, which: usize, packet: &Packet) {
        if !matches!(
            packet.header.code,
            MessageClass::Response(ResponseType::Content | ResponseType::Changed)
        ) {
            return;
        }
        let resource = if which == 0 {
            lwm2m::firmware::STATE
        } else {
            lwm2m::firmware::UPDATE_RESULT
        };
        let value =
            lwm2m::integer_resources(content_format(packet), &packet.payload, Some(resource))
                .ok()
                .and_then(|v| v.get(&resource).copied())
                .and_then(|v| u8::try_from(v).ok());
        let Some(value) = value else {
            tracing::info!(device_id, resource, "LwM2M: /5/0 value not understood");
            return;
        };
        let event = if which == 0 {
            DeviceEvent::FirmwareState(value)
        } else {
            DeviceEvent::UpdateResult(value)
        };
        self.event(device_id, event);
    }

    /// Reads `/3/0/3` (the firmware version).
    async fn read_string(&self, device_id: &str) -> Option<String> {
        let session = self.session(device_id)?;
        let mut packet = Packet::new();
        packet.header.code = MessageClass::Request(RequestType::Get);
        for seg in ["3", "0", "3"] {
            packet.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        let answer = self.exchange(session.addr, packet).await?;
        if answer.header.code != MessageClass::Response(ResponseType::Content) {
            tracing::info!(device_id, code = %answer.header.code, "LwM2M: /3/0/3 read refused");
            return None;
        }
        match lwm2m::string_resource(
            content_format(&answer),
            &answer.payload,
            lwm2m::firmware::DEVICE_FIRMWARE_VERSION,
        ) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::info!(device_id, error.message = %e, "LwM2M: /3/0/3 answer not understood");
                None
            }
        }
    }
}

impl Lwm2mLink for CoapEndpoint {
    fn send_pcp(&self, device_id: &str, frame: Vec<u8>) {
        match self.session(device_id) {
            Some(s) => self.write_pcp(device_id, s.addr, frame),
            None => tracing::debug!(
                device_id,
                "PCP message not sent: the device is not registered"
            ),
        }
    }

    fn read_coverage(&self, device_id: &str) {
        let this = self.clone();
        let device_id = device_id.to_owned();
        tokio::spawn(async move {
            let event = match this.read(&device_id, &["4", "0"], None).await {
                Some(values) => {
                    let get = |id: u16| values.iter().find(|(r, _)| *r == id).map(|(_, v)| *v);
                    DeviceEvent::Coverage {
                        rsrp: get(connectivity::RSRP).and_then(|v| i32::try_from(v).ok()),
                        sinr: get(connectivity::SINR).and_then(|v| i32::try_from(v).ok()),
                        cell: get(connectivity::CELL_ID).and_then(|v| u32::try_from(v).ok()),
                    }
                }
                None => DeviceEvent::CoverageFailed,
            };
            this.event(&device_id, event);
        });
    }

    fn read_cell_id(&self, device_id: &str) {
        let this = self.clone();
        let device_id = device_id.to_owned();
        tokio::spawn(async move {
            let cell = this
                .read(&device_id, &["4", "0", "8"], Some(connectivity::CELL_ID))
                .await
                .and_then(|values| {
                    values
                        .iter()
                        .find(|(r, _)| *r == connectivity::CELL_ID)
                        .and_then(|(_, v)| u32::try_from(*v).ok())
                });
            let event = cell.map_or(DeviceEvent::CellIdFailed, DeviceEvent::CellId);
            this.event(&device_id, event);
        });
    }

    fn serve(&self, device_id: &str, download: Option<Arc<SegmentSource>>) {
        let mut serving = lock(&self.inner.serving);
        match download {
            Some(source) => {
                serving.insert(
                    device_id.to_owned(),
                    Serving {
                        source,
                        reported: None,
                    },
                );
            }
            None => {
                serving.remove(device_id);
                drop(serving);
                let ended: Vec<(String, u64)> = {
                    let mut blocks = lock(&self.inner.blocks);
                    let ids: Vec<String> = blocks
                        .iter()
                        .filter(|(_, b)| b.device_id == device_id)
                        .map(|(h, _)| h.clone())
                        .collect();
                    ids.into_iter()
                        .filter_map(|h| blocks.remove(&h).map(|b| (h, b.unrecorded)))
                        .collect()
                };
                for (hash, bytes) in ended {
                    self.record_served(hash, bytes);
                }
            }
        }
    }

    fn read_firmware_version(&self, device_id: &str) {
        let this = self.clone();
        let device_id = device_id.to_owned();
        tokio::spawn(async move {
            if let Some(version) = this.read_string(&device_id).await {
                this.event(&device_id, DeviceEvent::FirmwareVersion(version));
            }
        });
    }

    fn start_firmware(&self, device_id: &str, uri: String, blocks: Option<BlockGrant>) {
        if let Some(b) = blocks {
            lock(&self.inner.blocks).insert(
                b.token_hash,
                BlockServing {
                    device_id: device_id.to_owned(),
                    source: b.source,
                    expires_at: b.expires_at,
                    reported: None,
                    unrecorded: 0,
                },
            );
        }
        let this = self.clone();
        let device_id = device_id.to_owned();
        tokio::spawn(async move { this.write_uri_and_observe(&device_id, uri).await });
    }

    fn execute_update(&self, device_id: &str) {
        let this = self.clone();
        let device_id = device_id.to_owned();
        tokio::spawn(async move {
            let Some(session) = this.session(&device_id) else {
                return;
            };
            let mut packet = Packet::new();
            packet.header.code = MessageClass::Request(RequestType::Post);
            for seg in ["5", "0", "2"] {
                packet.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
            }
            match this.exchange(session.addr, packet).await {
                Some(a) if a.header.code == MessageClass::Response(ResponseType::Changed) => {}
                Some(a) => {
                    tracing::info!(device_id, code = %a.header.code, "LwM2M: execute /5/0/2 refused")
                }
                None => tracing::info!(device_id, "LwM2M: execute /5/0/2 not answered"),
            }
        });
    }
}

/// Hands device events to the driver in order, in batches.
async fn feed_driver(state: AppState, mut rx: mpsc::UnboundedReceiver<(String, DeviceEvent)>) {
    let mut batch = Vec::new();
    while let Some(e) = rx.recv().await {
        batch.push(e);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if let Err(e) = state
            .driver
            .device_events(&state, std::mem::take(&mut batch))
            .await
        {
            tracing::warn!(error.message = %e, "LwM2M device events not recorded");
        }
    }
}

fn format_bytes(format: u16) -> Vec<u8> {
    match format {
        0 => Vec::new(),
        f if f <= 0xFF => vec![u8::try_from(f).unwrap_or(0)],
        f => f.to_be_bytes().to_vec(),
    }
}

fn empty_ack(mid: u16) -> Vec<u8> {
    let [hi, lo] = mid.to_be_bytes();
    vec![0x60, 0x00, hi, lo]
}

fn reset(mid: u16) -> Vec<u8> {
    let [hi, lo] = mid.to_be_bytes();
    vec![0x70, 0x00, hi, lo]
}

/// Whether a request is a block download (`GET /fw/<token>`).
fn is_block_request(packet: &Packet) -> bool {
    packet.header.code == MessageClass::Request(RequestType::Get)
        && packet
            .get_option(CoapOption::UriPath)
            .is_some_and(|p| p.len() == 2 && p.front().is_some_and(|s| s == b"fw"))
}

/// A message's Content-Format (plain text when absent).
fn content_format(packet: &Packet) -> u16 {
    packet
        .get_first_option(CoapOption::ContentFormat)
        .map_or(lwm2m::FORMAT_TEXT, |v| {
            v.iter().fold(0u16, |acc, b| (acc << 8) | u16::from(*b))
        })
}

/// An unsigned integer option value in the fewest bytes.
fn uint_bytes(v: u64) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}
