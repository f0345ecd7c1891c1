//! The CoAP transport (RFC 7252 §4): datagrams in and out, message ids, confirmable requests to devices
//! and their retransmission, acknowledgements, resets, and duplicate detection of what devices send.
//! What it does not understand (requests, and responses that answer none of its requests) it hands up
//! as [`Incoming`]. This is the layer a DTLS session goes under: everything above speaks in packets and
//! peer addresses.
//!
//! Requests to devices are confirmable and retransmitted with exponential back-off (`ack_timeout`, ×1-1.5
//! random, `max_retransmit` retransmissions); confirmable messages from devices are acknowledged, and a
//! duplicate (same peer and message id within the exchange lifetime) gets the same answer again without
//! being handed up twice. One task ([`Transport::retransmit`]) watches every request in flight: a request
//! joins a queue in the order sent (constant time, and nearly all are answered before their first
//! deadline), and moves to a deadline heap only when that passes unanswered; no task or timer per request.
//! Retransmission runs on real time (it is about the network, not the injected clock).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coap_lite::{MessageClass, MessageType, Packet, ResponseType};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::dtls::Dtls;

use super::{CoapSettings, HashMap, lock};

/// The token of a request to a device (always 8 bytes here).
pub(super) type Token = [u8; 8];

/// What the transport hands up.
pub(super) enum Incoming {
    /// A request from a device (not yet checked for duplicates: see [`Transport::duplicate`]), and the
    /// fingerprint of its bytes.
    Request(Packet, u64),
    /// A response that answers none of our requests: a notification of an observation. A confirmable
    /// one is already acknowledged, and a duplicate is not handed up.
    Notification(Packet),
}

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
    due: Instant,
    /// An empty ACK came: stop retransmitting, keep waiting for the separate response.
    acked: bool,
    /// Who waits for the answer (`None` when nobody does: fire-and-forget writes).
    answer: Option<oneshot::Sender<Option<Packet>>>,
}

/// A confirmable message already handled: the fingerprint of its bytes, its reply (none while in
/// progress), and until when it counts.
type Seen = (u64, Option<Vec<u8>>, Instant);

#[derive(Default)]
struct Exchanges {
    /// By token.
    pending: HashMap<Token, Pending>,
    /// Message id → token, for empty ACKs and resets.
    by_mid: HashMap<(SocketAddr, u16), Token>,
    /// Requests in the order sent, each with the earliest its first deadline can be (sent + ACK_TIMEOUT):
    /// answered ones are dropped from the front, late ones move to `due`.
    fresh: VecDeque<(Instant, Token)>,
    /// The next deadline of requests that passed their first unanswered (answered ones are skipped).
    due: BinaryHeap<Reverse<(Instant, Token)>>,
    /// Confirmable messages from devices already handled: the reply to repeat (none while in progress),
    /// and when the entry may go.
    seen: HashMap<(SocketAddr, u16), Seen>,
}

/// The transport over one UDP socket, and the DTLS sessions of the secure one.
pub(super) struct Transport {
    socket: UdpSocket,
    /// CoAPS: what goes to an address that speaks DTLS goes through its session.
    dtls: Option<Arc<Dtls>>,
    ack_timeout: Duration,
    max_retransmit: u32,
    /// RFC 7252 `EXCHANGE_LIFETIME`: how long a message id stays a duplicate.
    exchange_lifetime: Duration,
    exchanges: Mutex<Exchanges>,
    /// Wakes the retransmission task when a deadline earlier than all others was added.
    earlier_due: Notify,
    /// The next message id per peer: RFC 7252 forbids reusing one towards the same endpoint within
    /// `EXCHANGE_LIFETIME`, which a single counter shared by a fleet would do within seconds.
    next_mid: Mutex<HashMap<SocketAddr, u16>>,
    /// Confirmable messages remembered for duplicate detection at most (a flood from ever new source
    /// ports would otherwise fill the map for `EXCHANGE_LIFETIME`); past this, new ones are dropped.
    max_seen: usize,
    /// Fingerprints messages (seeded per process, so no one can make two differ and collide).
    fingerprints: foldhash::quality::RandomState,
    /// Counts the requests sent again (the instance's `updraft_coap_retransmissions`).
    pub(super) retransmitted: prometheus_client::metrics::counter::Counter,
}

impl Transport {
    pub(super) fn new(socket: UdpSocket, dtls: Option<Arc<Dtls>>, settings: &CoapSettings) -> Self {
        Self {
            socket,
            dtls,
            ack_timeout: settings.ack_timeout,
            max_retransmit: settings.max_retransmit,
            exchange_lifetime: settings.exchange_lifetime(),
            exchanges: Mutex::default(),
            earlier_due: Notify::new(),
            next_mid: Mutex::default(),
            max_seen: 200_000,
            fingerprints: foldhash::quality::RandomState::default(),
            retransmitted: prometheus_client::metrics::counter::Counter::default(),
        }
    }

    pub(super) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Receives one datagram into `buf`.
    pub(super) async fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buf).await
    }

    /// The DTLS side, when CoAPS is served.
    pub(super) fn dtls(&self) -> Option<&Arc<Dtls>> {
        self.dtls.as_ref()
    }

    /// Sends a datagram (a full socket buffer drops it, like the network may). To a peer of the DTLS
    /// socket (a [`secure`](super::dtls::secure) address) it goes through its session, and is dropped
    /// when that session ended: nothing meant for a secure peer goes out in plaintext.
    pub(super) fn send(&self, bytes: &[u8], addr: SocketAddr) {
        if let Some(network) = super::dtls::unsecure(addr) {
            let sent = self.dtls.as_ref().is_some_and(|d| d.send(bytes, network));
            if !sent {
                tracing::debug!(%network, "CoAPS: no session; message dropped");
            }
            return;
        }
        if let Err(e) = self.socket.try_send_to(bytes, addr) {
            tracing::debug!(%addr, error.message = %e, "CoAP send");
        }
    }

    /// A fresh message id for `addr` (starting from a random one).
    pub(super) fn next_mid(&self, addr: SocketAddr) -> u16 {
        let mut mids = lock(&self.next_mid);
        let mid = mids.entry(addr).or_insert_with(rand::random);
        *mid = mid.wrapping_add(1);
        *mid
    }

    /// Takes in a datagram: acknowledgements, resets and answers to our requests are settled here;
    /// requests and notifications are handed up.
    pub(super) fn receive(&self, bytes: &[u8], addr: SocketAddr) -> Option<Incoming> {
        let Ok(packet) = Packet::from_bytes(bytes) else {
            tracing::debug!(%addr, len = bytes.len(), "CoAP: not a CoAP message, dropped");
            return None;
        };
        let ty = packet.header.get_type();
        let mid = packet.header.message_id;
        match packet.header.code {
            MessageClass::Request(_) => {
                return Some(Incoming::Request(packet, self.fingerprint(bytes)));
            }
            MessageClass::Empty => match ty {
                MessageType::Acknowledgement => self.acknowledged(addr, mid, None),
                MessageType::Reset => self.reset_exchange(addr, mid),
                // A CoAP ping: answer with a reset.
                MessageType::Confirmable => self.send(&reset(mid), addr),
                MessageType::NonConfirmable => {}
            },
            MessageClass::Response(_) => match ty {
                MessageType::Acknowledgement => self.acknowledged(addr, mid, Some(packet)),
                MessageType::Reset => self.reset_exchange(addr, mid),
                MessageType::Confirmable | MessageType::NonConfirmable => {
                    if ty == MessageType::Confirmable {
                        let ack = empty_ack(mid);
                        let first = !self.duplicate(addr, mid, self.fingerprint(bytes));
                        self.remember(addr, mid, ack.clone());
                        self.send(&ack, addr);
                        if !first {
                            return None;
                        }
                    }
                    return self.separate_response(packet).map(Incoming::Notification);
                }
            },
            MessageClass::Reserved(_) => {
                if ty == MessageType::Confirmable {
                    self.send(&reset(mid), addr);
                }
            }
        }
        None
    }

    /// The fingerprint of a message's bytes (see [`Transport::duplicate`]).
    pub(super) fn fingerprint(&self, bytes: &[u8]) -> u64 {
        std::hash::BuildHasher::hash_one(&self.fingerprints, bytes)
    }

    /// Whether a confirmable message (its `fingerprint` that of its bytes) was seen before; if so, its
    /// reply (when ready) is sent again. A retransmission is the same message; another message under
    /// a message id seen from this address is a new one (another device behind the same NAT address and
    /// port, a device whose message ids wrapped), handled and remembered in place of the old: it must
    /// not get the old one's reply (a registration answered with another device's location).
    pub(super) fn duplicate(&self, addr: SocketAddr, mid: u16, fingerprint: u64) -> bool {
        let mut ex = lock(&self.exchanges);
        let until = Instant::now() + self.exchange_lifetime;
        match ex.seen.get_mut(&(addr, mid)) {
            Some((seen, reply, _)) if *seen == fingerprint => {
                if let Some(reply) = reply.clone() {
                    drop(ex);
                    self.send(&reply, addr);
                }
                return true;
            }
            Some(other) => {
                *other = (fingerprint, None, until);
                return false;
            }
            None => {}
        }
        if ex.seen.len() >= self.max_seen {
            // Treated as already seen (dropped): memory for duplicate detection is bounded.
            return true;
        }
        ex.seen.insert((addr, mid), (fingerprint, None, until));
        false
    }

    /// The reply to the message `mid` from `addr`, remembered for its retransmissions.
    fn remember(&self, addr: SocketAddr, mid: u16, reply: Vec<u8>) {
        let until = Instant::now() + self.exchange_lifetime;
        if let Some(seen) = lock(&self.exchanges).seen.get_mut(&(addr, mid)) {
            seen.1 = Some(reply);
            seen.2 = until;
        }
    }

    /// Sends `response` to `request`, remembered as the reply to repeat when a confirmable request comes
    /// again.
    pub(super) fn reply(&self, addr: SocketAddr, request: &Packet, response: &Packet) {
        let Ok(bytes) = response.to_bytes() else {
            return;
        };
        if request.header.get_type() == MessageType::Confirmable {
            self.remember(addr, request.header.message_id, bytes.clone());
        }
        self.send(&bytes, addr);
    }

    /// The answer to `request` from `addr`: piggybacked on the ACK of a confirmable request, else a
    /// non-confirmable message with a fresh id.
    pub(super) fn response_for(
        &self,
        request: &Packet,
        code: ResponseType,
        addr: SocketAddr,
    ) -> Packet {
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

    fn acknowledged(&self, addr: SocketAddr, mid: u16, response: Option<Packet>) {
        let mut ex = lock(&self.exchanges);
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

    fn reset_exchange(&self, addr: SocketAddr, mid: u16) {
        let mut ex = lock(&self.exchanges);
        if let Some(token) = ex.by_mid.remove(&(addr, mid))
            && let Some(mut p) = ex.pending.remove(&token)
            && let Some(tx) = p.answer.take()
        {
            let _ = tx.send(None);
        }
    }

    /// A response that is not piggybacked: settles the request of ours it answers (`None`), or is given
    /// back (a notification).
    fn separate_response(&self, packet: Packet) -> Option<Packet> {
        let mut ex = lock(&self.exchanges);
        if let Ok(token) = Token::try_from(packet.get_token())
            && let Some(mut p) = ex.pending.remove(&token)
        {
            ex.by_mid.remove(&(p.addr, p.mid));
            if let Some(tx) = p.answer.take() {
                let _ = tx.send(Some(packet));
            }
            return None;
        }
        Some(packet)
    }

    /// Sends a confirmable request and waits for its answer; `None` after the last retransmission, or
    /// on a reset.
    pub(super) async fn exchange(&self, addr: SocketAddr, packet: Packet) -> Option<Packet> {
        self.exchange_with(addr, packet, rand::random()).await
    }

    /// [`Self::exchange`] under the given token.
    pub(super) async fn exchange_with(
        &self,
        addr: SocketAddr,
        packet: Packet,
        token: Token,
    ) -> Option<Packet> {
        let (tx, rx) = oneshot::channel();
        if !self.start(addr, packet, Some(tx), token) {
            return None;
        }
        rx.await.ok().flatten()
    }

    /// Sends `packet` as a confirmable request nobody waits for the answer of (it is retransmitted
    /// all the same). False when it cannot be encoded.
    pub(super) fn send_confirmable(&self, addr: SocketAddr, packet: Packet) -> bool {
        self.start(addr, packet, None, rand::random())
    }

    /// Sends `packet` as a confirmable request; the retransmission task takes it from there. False when
    /// it cannot be encoded.
    fn start(
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
        let wait = self.ack_timeout.mul_f64(1.0 + rand::random::<f64>() * 0.5);
        let sent = Instant::now();
        let earliest = sent + self.ack_timeout;
        let wake = {
            let mut ex = lock(&self.exchanges);
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
                    retransmits_left: self.max_retransmit,
                    wait,
                    due: sent + wait,
                    acked: false,
                    answer,
                },
            );
            wake
        };
        if wake {
            self.earlier_due.notify_one();
        }
        tracing::trace!(%addr, mid, "CoAP request sent");
        self.send(&bytes, addr);
        true
    }

    /// Retransmits requests whose acknowledgement is late, and gives up on those out of
    /// retransmissions, until `stop` is cancelled.
    pub(super) async fn retransmit(&self, stop: CancellationToken) {
        loop {
            let next = {
                let ex = lock(&self.exchanges);
                let fresh = ex.fresh.front().map(|(at, _)| *at);
                let due = ex.due.peek().map(|Reverse((at, _))| *at);
                fresh.into_iter().chain(due).min()
            };
            let until = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.earlier_due.notified() => continue,
                () = tokio::time::sleep_until(until.into()) => {}
            }
            self.retransmit_due(Instant::now());
        }
    }

    fn retransmit_due(&self, now: Instant) {
        let mut resend = Vec::new();
        let mut gave_up = Vec::new();
        {
            let mut ex = lock(&self.exchanges);
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
                    self.retransmitted.inc();
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

    /// Forgets duplicates past their exchange lifetime, and the message-id counters of peers that are
    /// gone (neither `known` nor waited on).
    pub(super) fn forget_old(&self, known: &HashSet<SocketAddr>) {
        let instant = Instant::now();
        let mut ex = lock(&self.exchanges);
        ex.seen.retain(|_, (_, _, until)| *until > instant);
        let busy: HashSet<SocketAddr> = ex.pending.values().map(|p| p.addr).collect();
        drop(ex);
        lock(&self.next_mid).retain(|addr, _| known.contains(addr) || busy.contains(addr));
    }
}

fn empty_ack(mid: u16) -> Vec<u8> {
    let [hi, lo] = mid.to_be_bytes();
    vec![0x60, 0x00, hi, lo]
}

/// An empty reset message.
pub(super) fn reset(mid: u16) -> Vec<u8> {
    let [hi, lo] = mid.to_be_bytes();
    vec![0x70, 0x00, hi, lo]
}

#[cfg(test)]
mod tests {
    use coap_lite::{CoapOption, RequestType};

    use super::*;

    fn settings(ack_ms: u64, retransmits: u32) -> CoapSettings {
        CoapSettings {
            ack_timeout: Duration::from_millis(ack_ms),
            max_retransmit: retransmits,
            ..CoapSettings::default()
        }
    }

    async fn pair(ack_ms: u64, retransmits: u32) -> (std::sync::Arc<Transport>, UdpSocket) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // Sends are `try_send_to`: the socket must have been seen writable once (in the endpoint, its
        // receive loop does that long before anything is sent).
        socket.writable().await.unwrap();
        let transport =
            std::sync::Arc::new(Transport::new(socket, None, &settings(ack_ms, retransmits)));
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (transport, peer)
    }

    fn get(path: &str) -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(RequestType::Get);
        p.add_option(CoapOption::UriPath, path.as_bytes().to_vec());
        p
    }

    async fn recv(peer: &UdpSocket) -> Packet {
        let mut buf = [0u8; 1500];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
            .await
            .expect("a datagram")
            .unwrap();
        Packet::from_bytes(&buf[..n]).unwrap()
    }

    /// Runs the transport's receive side and retransmission task until the test ends.
    fn serve(transport: &std::sync::Arc<Transport>) -> CancellationToken {
        let stop = CancellationToken::new();
        let t = transport.clone();
        let s = stop.clone();
        tokio::spawn(async move { t.retransmit(s).await });
        let t = transport.clone();
        let s = stop.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                tokio::select! {
                    () = s.cancelled() => return,
                    r = t.recv(&mut buf) => if let Ok((n, addr)) = r {
                        let _ = t.receive(&buf[..n], addr);
                    },
                }
            }
        });
        stop
    }

    #[tokio::test]
    async fn a_request_is_sent_again_until_answered_with_the_same_message_id() {
        let (transport, peer) = pair(30, 4).await;
        let stop = serve(&transport);
        let to = peer.local_addr().unwrap();
        let t = transport.clone();
        let answer = tokio::spawn(async move { t.exchange(to, get("x")).await });
        let first = recv(&peer).await;
        // The first copy is lost; the retransmission is the same message.
        let again = recv(&peer).await;
        assert_eq!(again.header.message_id, first.header.message_id);
        assert_eq!(again.get_token(), first.get_token());
        let mut ack = Packet::new();
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.code = MessageClass::Response(ResponseType::Content);
        ack.header.message_id = again.header.message_id;
        ack.set_token(again.get_token().to_vec());
        ack.payload = b"ok".to_vec();
        peer.send_to(&ack.to_bytes().unwrap(), transport.local_addr().unwrap())
            .await
            .unwrap();
        let answered = answer.await.unwrap().expect("answered");
        assert_eq!(answered.payload, b"ok");
        stop.cancel();
    }

    #[tokio::test]
    async fn an_unanswered_request_gives_up_after_its_retransmissions() {
        let (transport, peer) = pair(10, 2).await;
        let stop = serve(&transport);
        let to = peer.local_addr().unwrap();
        let t = transport.clone();
        let answer = tokio::spawn(async move { t.exchange(to, get("x")).await });
        for _ in 0..3 {
            recv(&peer).await;
        }
        assert!(answer.await.unwrap().is_none());
        stop.cancel();
    }

    #[tokio::test]
    async fn a_reset_ends_the_exchange() {
        let (transport, peer) = pair(1000, 4).await;
        let stop = serve(&transport);
        let to = peer.local_addr().unwrap();
        let t = transport.clone();
        let answer = tokio::spawn(async move { t.exchange(to, get("x")).await });
        let sent = recv(&peer).await;
        peer.send_to(
            &reset(sent.header.message_id),
            transport.local_addr().unwrap(),
        )
        .await
        .unwrap();
        assert!(answer.await.unwrap().is_none());
        stop.cancel();
    }

    #[tokio::test]
    async fn a_duplicate_request_gets_the_same_reply_and_is_not_handed_up_again() {
        let (transport, peer) = pair(1000, 4).await;
        let from = peer.local_addr().unwrap();
        let mut request = get("rd");
        request.header.set_type(MessageType::Confirmable);
        request.header.message_id = 7;
        let bytes = request.to_bytes().unwrap();
        let Some(Incoming::Request(first, fingerprint)) = transport.receive(&bytes, from) else {
            panic!("a request is handed up");
        };
        assert!(!transport.duplicate(from, 7, fingerprint));
        let response = transport.response_for(&first, ResponseType::Created, from);
        transport.reply(from, &first, &response);
        assert_eq!(
            recv(&peer).await.header.code,
            MessageClass::Response(ResponseType::Created)
        );
        // The same message again: answered from memory.
        let Some(Incoming::Request(_, same)) = transport.receive(&bytes, from) else {
            panic!("a request is handed up");
        };
        assert_eq!(same, fingerprint);
        assert!(transport.duplicate(from, 7, same));
        let again = recv(&peer).await;
        assert_eq!(again.header.message_id, 7);
        assert_eq!(
            again.header.code,
            MessageClass::Response(ResponseType::Created)
        );
    }

    #[tokio::test]
    async fn another_request_under_a_seen_message_id_is_new_and_not_answered_from_memory() {
        // Another device behind the same NAT address and port, whose message id happens to be one the
        // address used: it must not get the earlier device's registration answer.
        let (transport, peer) = pair(1000, 4).await;
        let from = peer.local_addr().unwrap();
        let register = |ep: &str| {
            let mut request = get("rd");
            request.header.code = MessageClass::Request(coap_lite::RequestType::Post);
            request.header.set_type(MessageType::Confirmable);
            request.header.message_id = 7;
            request.set_token(b"reg".to_vec());
            request.add_option(CoapOption::UriQuery, format!("ep={ep}").into_bytes());
            request.to_bytes().unwrap()
        };
        let Some(Incoming::Request(first, a)) = transport.receive(&register("dev-a"), from) else {
            panic!("a request is handed up");
        };
        assert!(!transport.duplicate(from, 7, a));
        let created = transport.response_for(&first, ResponseType::Created, from);
        transport.reply(from, &first, &created);
        recv(&peer).await;
        let Some(Incoming::Request(second, b)) = transport.receive(&register("dev-b"), from) else {
            panic!("a request is handed up");
        };
        assert_ne!(a, b);
        assert!(!transport.duplicate(from, 7, b), "a new request, handled");
        let refused = transport.response_for(&second, ResponseType::Forbidden, from);
        transport.reply(from, &second, &refused);
        assert_eq!(
            recv(&peer).await.header.code,
            MessageClass::Response(ResponseType::Forbidden)
        );
        // Its retransmission gets its own answer; the first device's is forgotten.
        assert!(transport.duplicate(from, 7, b));
        assert_eq!(
            recv(&peer).await.header.code,
            MessageClass::Response(ResponseType::Forbidden)
        );
    }

    #[tokio::test]
    async fn a_confirmable_notification_is_acknowledged_and_handed_up_once() {
        let (transport, peer) = pair(1000, 4).await;
        let from = peer.local_addr().unwrap();
        let mut note = Packet::new();
        note.header.set_type(MessageType::Confirmable);
        note.header.code = MessageClass::Response(ResponseType::Content);
        note.header.message_id = 9;
        note.set_token(vec![1; 8]);
        let bytes = note.to_bytes().unwrap();
        assert!(matches!(
            transport.receive(&bytes, from),
            Some(Incoming::Notification(_))
        ));
        let ack = recv(&peer).await;
        assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(ack.header.message_id, 9);
        assert!(transport.receive(&bytes, from).is_none());
        assert_eq!(recv(&peer).await.header.message_id, 9);
    }
}
