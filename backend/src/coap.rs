//! The CoAP adapter for LwM2M devices (`protocols.md` §2.1): registration (`/rd`), the observation of
//! `/19/0/0` that carries every PCP message from a device, PCP messages to devices written to `/19/1/0`,
//! the radio coverage reads (`/4/0`, `/4/0/8`) and PCP segment serving.
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
//!
//! The layers, one file each:
//! - `transport`: datagrams, message ids, confirmable exchanges and their retransmission, duplicate
//!   detection (RFC 7252 §4). The place a DTLS session plugs in; everything above speaks in packets.
//! - `registry` (who is registered, where, under which observe tokens) and `lwm2m` (the registration
//!   interface, the observations, the reads, writes and executes the driver asks for).
//! - `pcp` (PCP messages both ways and segment serving), `blocks` (Block2 firmware downloads), and
//!   `cache` (the package bytes both serve from).
//!
//! This file holds the endpoint itself: its state, the receive loop that hands datagrams to the layers,
//! admission (per-source rate, requests in flight), and [`Lwm2mLink`], the driver's view of it all.

mod blocks;
mod cache;
mod dtls;
mod lwm2m;
mod pcp;
mod registry;
mod transport;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coap_lite::{CoapOption, Packet, ResponseType};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::blocks::BlockServing;
use self::cache::PackageCache;
pub use self::dtls::{Datagrams, DtlsSettings, application_records, buffer_of, recycle};
use self::dtls::{Dtls, KeyLookup, Psk};
use self::pcp::Serving;
use self::registry::Registry;
use self::transport::{Incoming, Transport};
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
    /// CoAPS sessions: timeouts and bounds.
    pub dtls: DtlsSettings,
    /// Every device must register over DTLS (plain registrations get 4.03).
    pub require_dtls: bool,
    /// The devices of these products must register over DTLS (plain registrations get 4.03).
    pub require_dtls_products: Vec<String>,
    /// The base of the firmware URIs written to devices registered over DTLS (`coaps://host:port`;
    /// their block-wise downloads come over their session).
    pub secure_base_url: Option<String>,
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
            dtls: DtlsSettings::default(),
            require_dtls: false,
            require_dtls_products: Vec::new(),
            secure_base_url: None,
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

/// What a device told "busy" (5.03) is asked to wait, in seconds (the Max-Age option).
const BUSY_MAX_AGE: u8 = 2;

/// The CoAP endpoint. Cheap to clone.
#[derive(Clone)]
pub struct CoapEndpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CoapEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoapEndpoint")
            .field("local_addr", &self.inner.transport.local_addr().ok())
            .finish_non_exhaustive()
    }
}

struct Inner {
    state: AppState,
    settings: CoapSettings,
    transport: Transport,
    registry: Registry,
    /// PCP downloads, by device.
    serving: Mutex<HashMap<String, Serving>>,
    /// Block-wise firmware downloads, by token hash.
    blocks: Mutex<HashMap<String, BlockServing>>,
    cache: PackageCache,
    events: mpsc::UnboundedSender<(String, DeviceEvent)>,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, DeviceEvent)>>>,
    /// Places for requests being worked on ([`CoapSettings::max_in_flight`]).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Requests that may cost a lookup, per source ([`CoapSettings::requests_per_second`]).
    per_source: governor::DefaultKeyedRateLimiter<SocketAddr>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl CoapEndpoint {
    /// An endpoint on `socket` (CoAP) and `secure` (CoAPS, when given), connected to the driver (it
    /// becomes the driver's [`Lwm2mLink`]).
    ///
    /// # Errors
    /// When OpenSSL cannot serve DTLS with pre-shared keys.
    pub fn new(
        state: AppState,
        socket: UdpSocket,
        secure: Option<UdpSocket>,
        settings: CoapSettings,
    ) -> Result<Self, String> {
        let dtls = secure
            .map(|s| Dtls::new(s, settings.dtls.clone(), key_lookup(&state)).map(Arc::new))
            .transpose()
            .map_err(|e| format!("OpenSSL cannot serve DTLS 1.2 with pre-shared keys: {e}"))?;
        let (events, events_rx) = mpsc::unbounded_channel();
        let in_flight = Arc::new(tokio::sync::Semaphore::new(settings.max_in_flight));
        let rate = std::num::NonZeroU32::new(settings.requests_per_second.max(1))
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst = rate.saturating_mul(std::num::NonZeroU32::new(2).unwrap_or(rate));
        let per_source =
            governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst));
        let mut transport = Transport::new(socket, dtls, &settings);
        transport.retransmitted = state.metrics.coap_retransmissions.clone();
        let endpoint = Self {
            inner: Arc::new(Inner {
                transport,
                registry: Registry::default(),
                serving: Mutex::default(),
                blocks: Mutex::default(),
                cache: PackageCache::new(state.store.clone(), settings.cache_bytes),
                events,
                events_rx: Mutex::new(Some(events_rx)),
                in_flight,
                per_source,
                state,
                settings,
            }),
        };
        endpoint
            .inner
            .state
            .driver
            .set_lwm2m_link(Arc::new(endpoint.clone()));
        Ok(endpoint)
    }

    /// The address it listens on.
    ///
    /// # Errors
    /// When the socket has none.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.transport.local_addr()
    }

    /// The address it listens on for CoAPS, when it does.
    #[must_use]
    pub fn secure_addr(&self) -> Option<SocketAddr> {
        self.inner.transport.dtls()?.local_addr().ok()
    }

    /// CoAPS sessions established, and handshakes in progress.
    #[must_use]
    pub fn dtls_sessions(&self) -> (usize, usize) {
        self.inner.transport.dtls().map_or((0, 0), |d| d.counts())
    }

    /// Serves until `stop` is cancelled: receives datagrams, expires registrations, feeds the driver.
    pub async fn run(self, stop: CancellationToken) {
        let events = lock(&self.inner.events_rx).take();
        let feeder = events.map(|rx| tokio::spawn(feed_driver(self.inner.state.clone(), rx)));
        let janitor = tokio::spawn(self.clone().janitor(stop.clone()));
        let this = self.clone();
        let retransmitter_stop = stop.clone();
        let retransmitter =
            tokio::spawn(async move { this.inner.transport.retransmit(retransmitter_stop).await });
        let secure = self
            .inner
            .transport
            .dtls()
            .cloned()
            .map(|dtls| tokio::spawn(self.clone().serve_dtls(dtls, stop.clone())));
        let mut buf = vec![0u8; 2048];
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => break,
                r = self.inner.transport.recv(&mut buf) => r,
            };
            match received {
                Ok((n, addr)) => self.message(&buf[..n], addr),
                Err(e) => {
                    // ICMP port unreachable from a device that went away shows up here on Linux.
                    tracing::debug!(error.message = %e, "CoAP receive");
                }
            }
        }
        janitor.abort();
        retransmitter.abort();
        if let Some(s) = secure {
            s.abort();
        }
        if let Some(f) = feeder {
            f.abort();
        }
    }

    /// The CoAPS socket: datagrams through their sessions, whose CoAP messages go up like plain ones;
    /// every tick the handshake timers, idle sessions, and registrations whose session ended.
    async fn serve_dtls(self, dtls: Arc<Dtls>, stop: CancellationToken) {
        // The timers on a task of their own: the receive loop below polls nothing but the socket.
        let ticker = tokio::spawn({
            let (this, dtls, stop) = (self.clone(), dtls.clone(), stop.clone());
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => {
                            dtls.tick();
                            this.sessions_ended(&dtls);
                        }
                    }
                }
            }
        });
        let mut buf = vec![0u8; 2048];
        let mut messages = Vec::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                r = dtls.recv(&mut buf) => match r {
                    Ok((n, addr)) => {
                        dtls.receive(&buf[..n], addr, &mut messages);
                        for message in messages.drain(..) {
                            self.message(&message, dtls::secure(addr));
                            dtls::recycle(message);
                        }
                    }
                    Err(e) => tracing::debug!(error.message = %e, "CoAPS receive"),
                },
            }
        }
        ticker.abort();
    }

    /// A registration made over a DTLS session that ended is over too: nothing reaches the device until
    /// it handshakes and registers again.
    fn sessions_ended(&self, dtls: &Dtls) {
        for (addr, device_id) in dtls.take_ended() {
            let Some(session) = self.inner.registry.session(&device_id) else {
                continue;
            };
            let addr = dtls::secure(addr);
            if session.addr == addr {
                self.inner.registry.deregister(&session.reg_id, addr);
                tracing::info!(device_id, %addr, "LwM2M: the DTLS session ended; registration dropped");
                self.event(&device_id, DeviceEvent::Offline);
            }
        }
    }

    /// The device authenticated by the DTLS session of `addr` (a [`dtls::secure`] address), if any.
    fn secure_device(&self, addr: SocketAddr) -> Option<String> {
        self.inner
            .transport
            .dtls()?
            .device_at(dtls::unsecure(addr)?)
    }

    /// Expires registrations whose lifetime passed, and forgets old duplicates.
    async fn janitor(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let now = self.inner.state.clock.now().as_millis();
            for id in self.inner.registry.expire(now) {
                tracing::info!(device_id = %id, "LwM2M registration expired");
                self.event(&id, DeviceEvent::Offline);
            }
            // Every second whatever happened (ended sessions, replaced registrations included).
            self.count_registrations();
            self.inner.per_source.retain_recent();
            self.inner.per_source.shrink_to_fit();
            self.inner
                .transport
                .forget_old(&self.inner.registry.addrs());
        }
    }

    /// Devices registered now.
    #[must_use]
    pub fn registrations(&self) -> usize {
        self.inner.registry.len()
    }

    fn event(&self, device_id: &str, event: DeviceEvent) {
        let _ = self.inner.events.send((device_id.to_owned(), event));
    }

    fn send(&self, bytes: &[u8], addr: SocketAddr) {
        self.inner.transport.send(bytes, addr);
    }

    /// A CoAP message (a plaintext datagram, or what a DTLS record carried: then `addr` is the peer's
    /// [`dtls::secure`] address): what the transport hands up goes to its layer.
    fn message(&self, bytes: &[u8], addr: SocketAddr) {
        match self.inner.transport.receive(bytes, addr) {
            Some(Incoming::Request(packet, fingerprint)) => self.request(packet, fingerprint, addr),
            Some(Incoming::Notification(packet)) => self.notification(packet, addr),
            None => {}
        }
    }

    /// A request from a device (`fingerprint`: of its bytes, for duplicate detection): a block download,
    /// or the registration interface.
    fn request(&self, packet: Packet, fingerprint: u64, addr: SocketAddr) {
        // Block GETs are safe to answer twice; remembering every answered block for the exchange
        // lifetime would hold hundreds of megabytes during a campaign.
        if blocks::is_block_request(&packet) {
            self.block_request(&packet, addr);
            return;
        }
        // Registration requests may cost a database lookup: limited per source, before they take any
        // memory. Dropped unanswered (an answer is what a flood wants).
        if self.inner.per_source.check_key(&addr).is_err() {
            tracing::trace!(%addr, "CoAP: request over the per-source rate, dropped");
            return;
        }
        if packet.header.get_type() == coap_lite::MessageType::Confirmable
            && self
                .inner
                .transport
                .duplicate(addr, packet.header.message_id, fingerprint)
        {
            return;
        }
        let Some(place) = self.place(&packet, addr) else {
            return;
        };
        let secure = self.secure_device(addr);
        let this = self.clone();
        tokio::spawn(async move {
            this.registration(packet, addr, secure).await;
            drop(place);
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
            self.error_reply(
                request,
                addr,
                ResponseType::ServiceUnavailable,
                "busy; try again",
            );
        }
        place
    }

    /// An error answer to `request`, with a diagnostic payload when that keeps it no larger than the
    /// request.
    fn error_reply(&self, request: &Packet, addr: SocketAddr, code: ResponseType, why: &str) {
        let mut response = self.inner.transport.response_for(request, code, addr);
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
}

/// The driver's view of the endpoint: each call goes to its layer.
impl Lwm2mLink for CoapEndpoint {
    fn send_pcp(&self, device_id: &str, frame: Vec<u8>) {
        match self.inner.registry.session(device_id) {
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
            let event = this.coverage(&device_id).await;
            this.event(&device_id, event);
        });
    }

    fn read_cell_id(&self, device_id: &str) {
        let this = self.clone();
        let device_id = device_id.to_owned();
        tokio::spawn(async move {
            let event = this.cell_id(&device_id).await;
            this.event(&device_id, event);
        });
    }

    fn serve(&self, device_id: &str, download: Option<Arc<SegmentSource>>) {
        match download {
            Some(source) => self.serve_segments(device_id, source),
            None => {
                lock(&self.inner.serving).remove(device_id);
                self.close_blocks(device_id);
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
        // Updraft's own URI: a device registered over DTLS downloads over its session (`coaps://`).
        let uri = match (&blocks, &self.inner.settings.secure_base_url) {
            (Some(_), Some(base))
                if self
                    .inner
                    .registry
                    .session(device_id)
                    .is_some_and(|s| dtls::unsecure(s.addr).is_some()) =>
            {
                uri.rsplit_once("/fw/").map_or(uri.clone(), |(_, token)| {
                    format!("{}/fw/{token}", base.trim_end_matches('/'))
                })
            }
            _ => uri,
        };
        if let Some(b) = blocks {
            self.open_blocks(device_id, b);
        }
        let this = self.clone();
        let device_id = device_id.to_owned();
        tokio::spawn(async move { this.write_uri_and_observe(&device_id, uri).await });
    }

    fn execute_update(&self, device_id: &str) {
        let this = self.clone();
        let device_id = device_id.to_owned();
        tokio::spawn(async move { this.execute(&device_id).await });
    }

    fn held(&self) -> Vec<String> {
        self.inner.registry.devices()
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

/// A device's pre-shared key for CoAPS, from its secret: the bytes its hex spells (IoTDA's NB-IoT secrets
/// are hex), or the text itself when it is not hex.
#[must_use]
pub fn psk_key(secret: &str) -> Vec<u8> {
    hex::decode(secret).unwrap_or_else(|_| secret.as_bytes().to_vec())
}

/// Looks a PSK identity (the device's node id) up: the LwM2M device of that endpoint name, with its
/// secret as the key: the bytes its hex spells (IoTDA's NB-IoT secrets are hex), or the text itself when
/// it is not hex.
fn key_lookup(state: &AppState) -> KeyLookup {
    let state = state.clone();
    Arc::new(move |identity: String| {
        let state = state.clone();
        Box::pin(async move {
            let device = match crate::service::devices::find_lwm2m(&state, &identity).await {
                Ok(Some(d)) => d,
                Ok(None) => {
                    tracing::debug!(identity, "DTLS: unknown PSK identity");
                    return None;
                }
                Err(e) => {
                    tracing::warn!(identity, error.message = %e, "DTLS: key lookup failed");
                    return None;
                }
            };
            let sealed = device.secret_enc.as_ref()?;
            let secret = match state.sealer.open(&device.id, sealed) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(device_id = %device.id, error.message = %e, "DTLS: the device's secret cannot be opened");
                    return None;
                }
            };
            Some(Psk {
                device_id: device.id,
                key: psk_key(secrecy::ExposeSecret::expose_secret(&secret)),
            })
        }) as futures::future::BoxFuture<'static, Option<Psk>>
    })
}
