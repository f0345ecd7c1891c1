//! CoAP over DTLS 1.2 with pre-shared keys (CoAPS, RFC 7252 §9.1.3.1; IoTDA's LwM2M port 5684,
//! `protocols.md` §2.1): one UDP socket, one DTLS session per peer address, the device's node id as PSK
//! identity and its secret as the key. Under the CoAP transport: what comes out of a session is a CoAP
//! datagram like any other, and what the transport sends to a peer with a session goes through it.
//!
//! OpenSSL (Debian's libssl, through rust-openssl) does the protocol; this layer only moves datagrams
//! between the socket and per-peer OpenSSL objects, which read and write through an in-memory
//! [`Datagrams`] queue (one read is one datagram). Around it:
//! - **Cookies** (HelloVerifyRequest, RFC 6347 §4.2.1): a peer must echo an HMAC of its address before
//!   the server does any work for it, so a spoofed source gets one small HelloVerifyRequest and nothing
//!   larger. The half-open state OpenSSL keeps meanwhile is bounded: at most [`DtlsSettings::max_handshakes`]
//!   handshakes at once (the oldest is dropped for a new one) and ClientHellos are rate-limited per source.
//! - **Keys** are looked up when the client's key exchange names its identity: OpenSSL asks for the key
//!   synchronously, so the flight carrying the identity is held while the device is looked up (in the
//!   database, off the receive loop), and fed again with the key (or without: the handshake then fails
//!   with `unknown_psk_identity`).
//! - **Timers**: [`Dtls::tick`] drives handshake retransmission (OpenSSL resends its flight when asked to
//!   read after its timer expired), drops handshakes older than [`DtlsSettings::handshake_timeout`] and
//!   sessions idle for [`DtlsSettings::idle_timeout`], and keeps at most [`DtlsSettings::max_sessions`].

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions,
    SslSessionCacheMode, SslStream, SslVersion,
};
use sha2::Sha256;
use tokio::net::UdpSocket;

use super::{HashMap, lock};

/// The cipher suites IoTDA offers on 5684 (`TLS_PSK_WITH_AES_128_CCM_8`, `TLS_PSK_WITH_AES_128_CBC_SHA256`).
/// Security level 0: OpenSSL 3.2 and later refuse CCM_8's short tag at higher levels.
const CIPHERS: &str = "PSK-AES128-CCM8:PSK-AES128-CBC-SHA256:@SECLEVEL=0";
/// The largest datagram OpenSSL is asked to write (records and handshake fragments fit in it).
const MTU: u32 = 1152;
/// Bytes of a cookie (an HMAC-SHA256 of the peer's address, truncated).
const COOKIE_LEN: usize = 16;
/// Datagrams of a flight held while its key is looked up, at most.
const MAX_HELD: usize = 8;
/// The flow label marking a [`secure`] address: an IPv4 peer's, and an IPv6 peer's.
const SECURE_V4: u32 = 0xD_7150;
const SECURE_V6: u32 = 0xD_7151;

/// The name the layers above give a peer of the DTLS socket: its address, marked (an IPv6 address with a
/// flow label of [`SECURE_V4`] or [`SECURE_V6`], which no received address carries). A peer of the DTLS
/// socket and one of the plain socket are then never the same peer to the transport and the registry,
/// even from the same address and port (a NAT reusing a port): plaintext cannot reach a secure
/// registration, and what is sent to a secure peer can only go through its session.
pub(super) fn secure(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) => SocketAddr::V6(std::net::SocketAddrV6::new(
            a.ip().to_ipv6_mapped(),
            a.port(),
            SECURE_V4,
            0,
        )),
        SocketAddr::V6(a) => SocketAddr::V6(std::net::SocketAddrV6::new(
            *a.ip(),
            a.port(),
            SECURE_V6,
            a.scope_id(),
        )),
    }
}

/// The network address of a [`secure`] one; `None` for a plain peer's.
pub(super) fn unsecure(addr: SocketAddr) -> Option<SocketAddr> {
    match addr {
        SocketAddr::V6(a) if a.flowinfo() == SECURE_V4 => {
            let v4 = a.ip().to_ipv4_mapped()?;
            Some(SocketAddr::from((v4, a.port())))
        }
        SocketAddr::V6(a) if a.flowinfo() == SECURE_V6 => Some(SocketAddr::V6(
            std::net::SocketAddrV6::new(*a.ip(), a.port(), 0, a.scope_id()),
        )),
        _ => None,
    }
}

/// DTLS listener settings.
#[derive(Clone, Debug)]
pub struct DtlsSettings {
    /// A session unused this long is dropped (the device handshakes again when it next sends). The
    /// default outlives the default registration lifetime (24 h).
    pub idle_timeout: Duration,
    /// A handshake not finished in this time is dropped.
    pub handshake_timeout: Duration,
    /// Established sessions kept at most (the least recently used goes first).
    pub max_sessions: usize,
    /// Handshakes in progress at most (the oldest goes first).
    pub max_handshakes: usize,
    /// ClientHellos per second per source address (twice as many at once); more are dropped.
    pub hellos_per_second: u32,
}

impl Default for DtlsSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(25 * 3600),
            handshake_timeout: Duration::from_secs(30),
            max_sessions: 20_000,
            max_handshakes: 1024,
            hellos_per_second: 5,
        }
    }
}

/// A device's pre-shared key, found by its PSK identity.
#[derive(Clone)]
pub(super) struct Psk {
    /// The device it authenticates.
    pub(super) device_id: String,
    /// The key bytes.
    pub(super) key: Vec<u8>,
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Psk")
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

/// Finds the key of a PSK identity (`None`: no such device, or it may not use DTLS).
pub(super) type KeyLookup = Arc<dyn Fn(String) -> BoxFuture<'static, Option<Psk>> + Send + Sync>;

/// Spare datagram buffers kept per thread, at most.
const SPARE_BUFFERS: usize = 64;
/// Buffers larger than this are not kept (a datagram fits in far less).
const SPARE_CAPACITY: usize = 4096;

thread_local! {
    /// Datagram buffers done with (read by OpenSSL, sent, handed up and handled), for the next ones: a
    /// record in or out of a session costs no allocation. Per thread, so an idle session holds none.
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// The list of datagrams a session's write produced, between the session's lock and the socket.
    static OUTGOING: Cell<Vec<Vec<u8>>> = const { Cell::new(Vec::new()) };
}

/// A buffer holding a copy of `bytes` (a spare one when there is one).
pub fn buffer_of(bytes: &[u8]) -> Vec<u8> {
    let mut buffer = SPARE
        .try_with(|s| s.try_borrow_mut().ok()?.pop())
        .ok()
        .flatten()
        .unwrap_or_default();
    buffer.clear();
    buffer.extend_from_slice(bytes);
    buffer
}

/// Gives a datagram buffer back for reuse (see [`buffer_of`]).
pub fn recycle(buffer: Vec<u8>) {
    if buffer.capacity() > SPARE_CAPACITY {
        return;
    }
    let _ = SPARE.try_with(|s| {
        if let Ok(mut spare) = s.try_borrow_mut()
            && spare.len() < SPARE_BUFFERS
        {
            spare.push(buffer);
        }
    });
}

/// An OpenSSL object's view of the network: datagrams in, datagrams out (one read is one datagram, one
/// write one datagram). The socket stays with its owner, async; the simulator's DTLS client uses it too.
/// Its buffers come from and go back to this thread's spares ([`buffer_of`], [`recycle`]).
#[derive(Debug, Default)]
pub struct Datagrams {
    /// Received datagrams, for OpenSSL to read ([`Datagrams::push`]).
    pub inbox: VecDeque<Vec<u8>>,
    /// What OpenSSL wrote, to send (and then [`recycle`]).
    pub outbox: Vec<Vec<u8>>,
}

impl Datagrams {
    /// A received datagram, for OpenSSL to read.
    pub fn push(&mut self, datagram: &[u8]) {
        self.inbox.push_back(buffer_of(datagram));
    }
}

impl Read for Datagrams {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inbox.pop_front() {
            Some(d) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                recycle(d);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Datagrams {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbox.push(buffer_of(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the handshake knows of the key, kept on the OpenSSL object for its PSK callback.
#[derive(Debug, Default)]
struct KeySlot {
    /// The identity being looked up or found.
    identity: Option<String>,
    /// The lookup's answer (`None` inside: not found).
    found: Option<Option<Psk>>,
}

/// One peer's session.
struct Peer {
    stream: SslStream<Datagrams>,
    keys: Arc<Mutex<KeySlot>>,
    /// The device the handshake authenticated; `None` while it runs.
    device_id: Option<String>,
    /// The datagrams held while the key of the identity their flight names is looked up.
    held: Option<Vec<Vec<u8>>>,
    started: Instant,
    last_seen: Instant,
}

/// The DTLS side of the CoAP endpoint.
pub(super) struct Dtls {
    socket: UdpSocket,
    context: SslContext,
    settings: DtlsSettings,
    lookup: KeyLookup,
    secret: [u8; 32],
    peers: Mutex<HashMap<SocketAddr, Peer>>,
    /// Handshakes in the order they began (address, start), for the oldest at constant cost; an entry
    /// whose peer finished or went is skipped when met, and dropped at each [`Dtls::tick`]. Locked after
    /// `peers`.
    handshakes: Mutex<VecDeque<(SocketAddr, Instant)>>,
    /// Sessions that ended since [`Dtls::take_ended`] was last called: their addresses and devices.
    ended: Mutex<Vec<(SocketAddr, String)>>,
    per_source: governor::DefaultKeyedRateLimiter<SocketAddr>,
    key_index: openssl::ex_data::Index<Ssl, Arc<Mutex<KeySlot>>>,
    addr_index: openssl::ex_data::Index<Ssl, SocketAddr>,
}

/// The cookie of `addr` under `secret`.
fn cookie(secret: &[u8; 32], addr: Option<&SocketAddr>) -> [u8; COOKIE_LEN] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key");
    if let Some(addr) = addr {
        mac.update(addr.to_string().as_bytes());
    }
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; COOKIE_LEN];
    out.copy_from_slice(&full[..COOKIE_LEN]);
    out
}

/// The cookie of `addr` under `secret`.
fn cookie_of(secret: &[u8; 32], addr: SocketAddr) -> [u8; COOKIE_LEN] {
    cookie(secret, Some(&addr))
}

/// The PSK identity a client's flight names, if it carries its ClientKeyExchange (a plaintext
/// handshake record of epoch 0: record header 13 bytes, handshake header 12, then the identity with a
/// two-byte length; RFC 6347 §4.1, §4.2.2; RFC 4279 §2).
fn psk_identity(datagram: &[u8]) -> Option<String> {
    let mut rest = datagram;
    while rest.len() >= 13 {
        let content = rest[0];
        let epoch = u16::from_be_bytes([rest[3], rest[4]]);
        let len = usize::from(u16::from_be_bytes([rest[11], rest[12]]));
        let record = rest.get(13..13 + len)?;
        rest = &rest[13 + len..];
        // Handshake, unencrypted, a whole ClientKeyExchange (type 16) from its first byte.
        if content != 22 || epoch != 0 || record.len() < 14 || record[0] != 16 {
            continue;
        }
        let offset = u32::from_be_bytes([0, record[6], record[7], record[8]]);
        if offset != 0 {
            continue;
        }
        let body = &record[12..];
        let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let identity = body.get(2..2 + n)?;
        return String::from_utf8(identity.to_vec()).ok();
    }
    None
}

/// How many records `datagram` holds when all are whole records of application data (content type 23),
/// `None` when it holds anything else (handshake, alert, change of cipher spec, or a truncated record).
/// Reading a session's application data stops after that many records: one read more would find
/// nothing and cost OpenSSL about as much as one that decrypts; with anything else it reads until
/// OpenSSL has nothing left to say (RFC 6347 §4.1: a datagram may carry several records).
pub fn application_records(datagram: &[u8]) -> Option<usize> {
    let mut rest = datagram;
    let mut records = 0;
    while !rest.is_empty() {
        if rest.len() < 13 || rest[0] != 23 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([rest[11], rest[12]]));
        rest = rest.get(13 + len..)?;
        records += 1;
    }
    (records > 0).then_some(records)
}

/// Whether `datagram` starts with a ClientHello (handshake record of epoch 0, handshake type 1), and
/// the cookie it echoes (empty when none) if the hello is whole in its first record.
fn client_hello(datagram: &[u8]) -> Option<&[u8]> {
    if datagram.len() <= 25 || datagram[0] != 22 || datagram[3..5] != [0, 0] || datagram[13] != 1 {
        return None;
    }
    // Record header 13, handshake header 12; then version 2, random 32, session id, cookie.
    let body = &datagram[25..];
    let sid = usize::from(*body.get(34)?);
    let at = 35 + sid;
    let n = usize::from(*body.get(at).unwrap_or(&0));
    Some(body.get(at + 1..at + 1 + n).unwrap_or(&[]))
}

/// `hello` (a ClientHello echoing a cookie, whole in one record) as the ClientHello that came before
/// it: no cookie, message sequence 0, record sequence 0. Fed to a new OpenSSL object first, it brings the
/// object to where it would be had it sent the HelloVerifyRequest itself (expecting message 1), for a
/// client whose first ClientHello another object answered. `None` when `hello` is not such a record, or
/// its record sequence is 0 (the made-up record would then be taken for a replay of it).
fn before_cookie(hello: &[u8]) -> Option<Vec<u8>> {
    let u24 = |b: &[u8]| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
    if hello.get(5..11)? == [0; 6] {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([*hello.get(11)?, *hello.get(12)?]));
    let record = hello.get(13..13 + len)?;
    if record.len() < 12 || record[0] != 1 {
        return None;
    }
    let (whole, offset, fragment) = (u24(&record[1..4]), u24(&record[6..9]), u24(&record[9..12]));
    if offset != 0 || fragment != whole {
        return None;
    }
    let body = record.get(12..12 + whole)?;
    let at = 35 + usize::from(*body.get(34)?);
    let cookie = usize::from(*body.get(at)?);
    let mut plain = body[..at].to_vec();
    plain.push(0);
    plain.extend_from_slice(body.get(at + 1 + cookie..)?);
    let n = u32::try_from(plain.len()).ok()?.to_be_bytes();
    let mut message = vec![1, n[1], n[2], n[3], 0, 0, 0, 0, 0, n[1], n[2], n[3]];
    message.extend_from_slice(&plain);
    let mut out = hello[..5].to_vec();
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&u16::try_from(message.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&message);
    Some(out)
}

impl Dtls {
    /// The DTLS side on `socket`, looking keys up with `lookup`.
    ///
    /// # Errors
    /// When OpenSSL cannot be set up (no PSK or DTLS support in the library).
    pub(super) fn new(
        socket: UdpSocket,
        settings: DtlsSettings,
        lookup: KeyLookup,
    ) -> Result<Self, openssl::error::ErrorStack> {
        let key_index = Ssl::new_ex_index::<Arc<Mutex<KeySlot>>>()?;
        let addr_index = Ssl::new_ex_index::<SocketAddr>()?;
        let secret: [u8; 32] = rand::random();
        let mut builder = SslContextBuilder::new(SslMethod::dtls_server())?;
        builder.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
        builder.set_cipher_list(CIPHERS)?;
        builder.set_options(
            SslOptions::COOKIE_EXCHANGE
                | SslOptions::NO_QUERY_MTU
                | SslOptions::CIPHER_SERVER_PREFERENCE,
        );
        builder.set_mode(SslMode::RELEASE_BUFFERS);
        builder.set_session_cache_mode(SslSessionCacheMode::OFF);
        builder.set_cookie_generate_cb(move |ssl, out| {
            let c = cookie(&secret, ssl.ex_data(addr_index));
            out[..COOKIE_LEN].copy_from_slice(&c);
            Ok(COOKIE_LEN)
        });
        builder.set_cookie_verify_cb(move |ssl, echoed| {
            // Length first: `memcmp::eq` panics on slices of different lengths.
            echoed.len() == COOKIE_LEN
                && openssl::memcmp::eq(echoed, &cookie(&secret, ssl.ex_data(addr_index)))
        });
        builder.set_psk_server_callback(move |ssl, identity, out| {
            let Some(slot) = ssl.ex_data(key_index) else {
                return Ok(0);
            };
            let slot = lock(slot);
            let asked = identity.and_then(|i| std::str::from_utf8(i).ok());
            match (&slot.identity, &slot.found) {
                (Some(known), Some(Some(psk)))
                    if asked == Some(known.as_str()) && psk.key.len() <= out.len() =>
                {
                    out[..psk.key.len()].copy_from_slice(&psk.key);
                    Ok(psk.key.len())
                }
                // Unknown: OpenSSL ends the handshake with `unknown_psk_identity`.
                _ => Ok(0),
            }
        });
        let context = builder.build();
        let rate = std::num::NonZeroU32::new(settings.hellos_per_second.max(1))
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst = rate.saturating_mul(std::num::NonZeroU32::new(2).unwrap_or(rate));
        Ok(Self {
            socket,
            context,
            settings,
            lookup,
            secret,
            peers: Mutex::default(),
            handshakes: Mutex::default(),
            ended: Mutex::default(),
            per_source: governor::RateLimiter::keyed(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
            key_index,
            addr_index,
        })
    }

    /// The address it listens on.
    pub(super) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The next datagram from the network.
    pub(super) async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buf).await
    }

    /// Sessions established, and handshakes in progress.
    pub(super) fn counts(&self) -> (usize, usize) {
        let peers = lock(&self.peers);
        let established = peers.values().filter(|p| p.device_id.is_some()).count();
        (established, peers.len() - established)
    }

    /// The sessions that ended since the last call (closed by the device, failed, idle, evicted, or
    /// replaced by a new handshake): their addresses and devices.
    pub(super) fn take_ended(&self) -> Vec<(SocketAddr, String)> {
        std::mem::take(&mut *lock(&self.ended))
    }

    /// Records that `peer`'s session at `addr` ended.
    fn end(&self, addr: SocketAddr, peer: &Peer) {
        if let Some(device) = &peer.device_id {
            lock(&self.ended).push((addr, device.clone()));
        }
    }

    /// The device whose session `addr` is, once its handshake finished.
    pub(super) fn device_at(&self, addr: SocketAddr) -> Option<String> {
        lock(&self.peers)
            .get(&addr)
            .and_then(|p| p.device_id.clone())
    }

    /// A datagram from `addr`: fed to its session (a new one for a ClientHello); the CoAP messages it
    /// carried are added to `messages` (buffers to [`recycle`] once handled). A flight naming a PSK
    /// identity waits for the key's lookup, spawned here.
    pub(super) fn receive(
        self: &Arc<Self>,
        datagram: &[u8],
        addr: SocketAddr,
        messages: &mut Vec<Vec<u8>>,
    ) {
        let mut peers = lock(&self.peers);
        let now = Instant::now();
        let hello = client_hello(datagram);
        if let Some(cookie) = hello
            && peers.get(&addr).is_some_and(|p| p.device_id.is_some())
        {
            // A new handshake from an address with a session (the device restarted, or lost its
            // session): it replaces the session only once it echoes its cookie, which proves the address;
            // until then a throwaway object answers with a HelloVerifyRequest and the session stays.
            if self.per_source.check_key(&addr).is_err() {
                return;
            }
            if cookie.len() != COOKIE_LEN
                || !openssl::memcmp::eq(cookie, &cookie_of(&self.secret, addr))
            {
                drop(peers);
                if let Ok(mut throwaway) = self.open(addr) {
                    let mut out = Vec::new();
                    Self::feed(&mut throwaway, datagram, &mut out, &mut Vec::new());
                    self.transmit(&mut out, addr);
                }
                return;
            }
            if let Some(old) = peers.remove(&addr) {
                self.end(addr, &old);
            }
        }
        if !peers.contains_key(&addr) {
            // Only a ClientHello opens a session.
            if hello.is_none() || self.per_source.check_key(&addr).is_err() {
                return;
            }
            // At the cap the oldest handshake goes: found at the front of the queue, whatever the number
            // of sessions (a flood of ClientHellos from many sources costs each no scan).
            let mut handshakes = lock(&self.handshakes);
            let live = |peers: &HashMap<SocketAddr, Peer>, (a, t): &(SocketAddr, Instant)| {
                peers
                    .get(a)
                    .is_some_and(|p| p.device_id.is_none() && p.started == *t)
            };
            while handshakes.front().is_some_and(|h| !live(&peers, h)) {
                handshakes.pop_front();
            }
            if handshakes.len() >= self.settings.max_handshakes
                && let Some((oldest, _)) = handshakes.pop_front()
            {
                peers.remove(&oldest);
            }
            match self.open(addr) {
                Ok(mut peer) => {
                    // A ClientHello echoing a cookie another object issued (the HelloVerifyRequest
                    // answering a new handshake beside a session): this object picks up from there.
                    if hello.is_some_and(|c| !c.is_empty())
                        && let Some(first) = before_cookie(datagram)
                    {
                        Self::feed(&mut peer, &first, &mut Vec::new(), &mut Vec::new());
                    }
                    handshakes.push_back((addr, peer.started));
                    peers.insert(addr, peer);
                }
                Err(e) => {
                    tracing::warn!(%addr, error.message = %e, "DTLS: a session could not be opened");
                    return;
                }
            }
        }
        let Some(peer) = peers.get_mut(&addr) else {
            return;
        };
        peer.last_seen = now;
        if peer.device_id.is_none() {
            if let Some(held) = &mut peer.held {
                // Its key is being looked up: the rest of the flight waits with it.
                if held.len() < MAX_HELD {
                    held.push(datagram.to_vec());
                }
                return;
            }
            if let Some(identity) = psk_identity(datagram) {
                let mut slot = lock(&peer.keys);
                if slot.identity.as_deref() != Some(identity.as_str()) || slot.found.is_none() {
                    slot.identity = Some(identity.clone());
                    slot.found = None;
                    drop(slot);
                    peer.held = Some(vec![datagram.to_vec()]);
                    let this = self.clone();
                    tokio::spawn(async move {
                        let found = (this.lookup)(identity).await;
                        this.resume(addr, found);
                    });
                    return;
                }
            }
        }
        let mut out = OUTGOING.take();
        let end = Self::feed(peer, datagram, &mut out, messages);
        if end && let Some(old) = peers.remove(&addr) {
            self.end(addr, &old);
        }
        drop(peers);
        self.transmit(&mut out, addr);
        OUTGOING.set(out);
    }

    /// The key lookup for `addr`'s handshake answered: feed the flight it held.
    fn resume(&self, addr: SocketAddr, found: Option<Psk>) {
        let mut peers = lock(&self.peers);
        let Some(peer) = peers.get_mut(&addr) else {
            return;
        };
        let Some(flight) = peer.held.take() else {
            return;
        };
        lock(&peer.keys).found = Some(found);
        let mut out = Vec::new();
        let mut end = false;
        for datagram in &flight {
            end |= Self::feed(peer, datagram, &mut out, &mut Vec::new());
            if end {
                break;
            }
        }
        if end && let Some(old) = peers.remove(&addr) {
            self.end(addr, &old);
        }
        drop(peers);
        self.transmit(&mut out, addr);
    }

    /// Sends `plain` (a CoAP message) to `addr` through its session; false when it has none.
    pub(super) fn send(&self, plain: &[u8], addr: SocketAddr) -> bool {
        let mut peers = lock(&self.peers);
        let Some(peer) = peers.get_mut(&addr).filter(|p| p.device_id.is_some()) else {
            return false;
        };
        peer.last_seen = Instant::now();
        if let Err(e) = peer.stream.ssl_write(plain) {
            tracing::debug!(%addr, error.message = %e, "DTLS: write failed");
            return false;
        }
        let mut out = OUTGOING.take();
        out.append(&mut peer.stream.get_mut().outbox);
        drop(peers);
        self.transmit(&mut out, addr);
        OUTGOING.set(out);
        true
    }

    /// Timers: handshake retransmissions, and the ends of slow handshakes and idle sessions.
    pub(super) fn tick(&self) {
        let now = Instant::now();
        let mut sends = Vec::new();
        let mut peers = lock(&self.peers);
        let mut idle = Vec::new();
        peers.retain(|addr, peer| match &peer.device_id {
            None => {
                if now.duration_since(peer.started) > self.settings.handshake_timeout {
                    return false;
                }
                if peer.held.is_none() {
                    let mut out = Vec::new();
                    let end = Self::feed(peer, &[], &mut out, &mut Vec::new());
                    if !out.is_empty() {
                        sends.push((*addr, out));
                    }
                    return !end;
                }
                true
            }
            Some(device) => {
                let alive = now.duration_since(peer.last_seen) <= self.settings.idle_timeout;
                if !alive {
                    idle.push((*addr, device.clone()));
                }
                alive
            }
        });
        lock(&self.ended).extend(idle);
        lock(&self.handshakes).retain(|(a, t)| {
            peers
                .get(a)
                .is_some_and(|p| p.device_id.is_none() && p.started == *t)
        });
        let established = peers.values().filter(|p| p.device_id.is_some()).count();
        if established > self.settings.max_sessions {
            let mut by_age: Vec<(Instant, SocketAddr)> = peers
                .iter()
                .filter(|(_, p)| p.device_id.is_some())
                .map(|(a, p)| (p.last_seen, *a))
                .collect();
            by_age.sort_unstable();
            for (_, addr) in by_age
                .into_iter()
                .take(established - self.settings.max_sessions)
            {
                if let Some(old) = peers.remove(&addr) {
                    self.end(addr, &old);
                }
            }
        }
        drop(peers);
        for (addr, mut out) in sends {
            self.transmit(&mut out, addr);
        }
    }

    /// A new session for `addr`, before its ClientHello.
    fn open(&self, addr: SocketAddr) -> Result<Peer, openssl::error::ErrorStack> {
        let mut ssl = Ssl::new(&self.context)?;
        ssl.set_mtu(MTU)?;
        let keys = Arc::new(Mutex::new(KeySlot::default()));
        ssl.set_ex_data(self.key_index, keys.clone());
        ssl.set_ex_data(self.addr_index, addr);
        ssl.set_accept_state();
        let stream = SslStream::new(ssl, Datagrams::default())?;
        let now = Instant::now();
        Ok(Peer {
            stream,
            keys,
            device_id: None,
            held: None,
            started: now,
            last_seen: now,
        })
    }

    /// Feeds a datagram (none: just a look at the timers) to `peer`: adds the datagrams to send to
    /// `out` and the application data it carried to `plain`; returns whether the session ended.
    fn feed(
        peer: &mut Peer,
        datagram: &[u8],
        out: &mut Vec<Vec<u8>>,
        plain: &mut Vec<Vec<u8>>,
    ) -> bool {
        if !datagram.is_empty() {
            peer.stream.get_mut().push(datagram);
        }
        let mut end = false;
        if peer.device_id.is_none() {
            match peer.stream.do_handshake() {
                Ok(()) => {
                    let slot = lock(&peer.keys);
                    match &slot.found {
                        Some(Some(psk)) => peer.device_id = Some(psk.device_id.clone()),
                        _ => end = true,
                    }
                }
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(e) => {
                    tracing::debug!(error.message = %e, "DTLS: handshake failed");
                    end = true;
                }
            }
        }
        if peer.device_id.is_some() && !end {
            thread_local! {
                /// Where records are decrypted into (one per receiving thread, not per datagram).
                static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 2048]);
            }
            let records = application_records(datagram);
            let mut read = 0;
            BUF.with_borrow_mut(|buf| {
                while records.is_none_or(|n| read < n) {
                    match peer.stream.ssl_read(buf) {
                        Ok(n) => {
                            plain.push(buffer_of(&buf[..n]));
                            read += 1;
                        }
                        Err(e) if e.code() == ErrorCode::WANT_READ => break,
                        Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                            // close_notify: the device ended its session.
                            let _ = peer.stream.shutdown();
                            end = true;
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(error.message = %e, "DTLS: read failed");
                            end = true;
                            break;
                        }
                    }
                }
            });
        }
        out.append(&mut peer.stream.get_mut().outbox);
        end
    }

    /// Sends `datagrams` to `addr`, emptying the list (its buffers go back to the spares).
    fn transmit(&self, datagrams: &mut Vec<Vec<u8>>, addr: SocketAddr) {
        for d in datagrams.drain(..) {
            if let Err(e) = self.socket.try_send_to(&d, addr) {
                tracing::debug!(%addr, error.message = %e, "DTLS: send dropped");
            }
            recycle(d);
        }
    }
}

#[cfg(test)]
mod tests;
