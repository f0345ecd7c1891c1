//! One device connection, from CONNECT to close: keep-alive, the ACL, and the routing of publishes and
//! subscriptions to and from the router (on the blocking pool). The wire format (MQTT 3.1, 3.1.1 or 5.0,
//! as the device's CONNECT chooses) is `codec`'s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use rumqttd::Notification;
use rumqttd::local::LinkTx;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::codec::{self, CodecError, Connect, Incoming, Outgoing, Version};
use super::login::authenticate;
use super::{Ctx, DOWN_QUEUE, MAX_CONNECT, SessionHandle, device_link, internal, lock, own_prefix};
use crate::driver::DeviceEvent;
use crate::metrics::{DirectionLabels, ReasonLabels};

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

/// One connection, from CONNECT to close; `secure` when it came over TLS (a device with `secure_access`
/// is refused otherwise).
pub(super) async fn session<S>(
    ctx: &Arc<Ctx>,
    stream: S,
    peer: SocketAddr,
    secure: bool,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(512);
    let max = ctx.settings.max_packet_size;
    // Nothing larger than a CONNECT is read before the login is checked.
    let first = tokio::time::timeout(
        ctx.settings.connect_timeout,
        read_connect(&mut rd, &mut buf, max.min(MAX_CONNECT)),
    )
    .await;
    let (version, connect) = match first {
        Ok(Ok(Some(c))) => c,
        Ok(Err(ReadError::Codec(CodecError::Level(level)))) => {
            tracing::info!(%peer, level, "mqtt: refused protocol level");
            refused(ctx, "protocol_version");
            let refusal = Outgoing::ConnAck(ConnectReturnCode::RefusedProtocolVersion);
            let _ = write(&mut wr, Version::V4, refusal, max).await;
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
        refused(ctx, "busy");
        let refusal = Outgoing::ConnAck(ConnectReturnCode::ServiceUnavailable);
        let _ = write(&mut wr, version, refusal, max).await;
        let _ = wr.shutdown().await;
        return;
    }
    let device_id = match authenticate(ctx, &connect, peer, secure).await {
        Ok(id) => id,
        Err(code) => {
            // Debug-formatted: a client id is the client's text, and may hold line breaks.
            tracing::info!(%peer, client_id = ?connect.client_id, ?code, "mqtt: login refused");
            refused(
                ctx,
                match code {
                    ConnectReturnCode::BadUserNamePassword => "bad_credentials",
                    ConnectReturnCode::NotAuthorized => "not_authorized",
                    ConnectReturnCode::BadClientId => "bad_client_id",
                    ConnectReturnCode::ServiceUnavailable => "busy",
                    _ => "other",
                },
            );
            let _ = write(&mut wr, version, Outgoing::ConnAck(code), max).await;
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

    let metrics = &ctx.state.metrics;
    metrics.mqtt_connections.inc();
    let end = run_session(
        ctx,
        &device_id,
        &connect,
        Io {
            rd: &mut rd,
            wr: &mut wr,
            buf: &mut buf,
            version,
        },
        &mut down_rx,
        &kick,
        &stop,
    )
    .await;

    metrics.mqtt_connections.dec();
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

/// A session's socket halves, read buffer and wire version.
struct Io<'a, R, W> {
    rd: &'a mut R,
    wr: &'a mut W,
    buf: &'a mut BytesMut,
    version: Version,
}

async fn run_session<R, W>(
    ctx: &Arc<Ctx>,
    device_id: &str,
    connect: &Connect,
    io: Io<'_, R, W>,
    down_rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
    kick: &CancellationToken,
    stop: &CancellationToken,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Io {
        rd,
        wr,
        buf,
        version,
    } = io;
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
            let refusal = Outgoing::ConnAck(ConnectReturnCode::ServiceUnavailable);
            let _ = write(wr, version, refusal, max).await;
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
        version,
        Outgoing::ConnAck(ConnectReturnCode::Success),
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
            packet = read_packet(rd, buf, version, max) => {
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
                        if let Err(e) = write(wr, version, p, max).await {
                            break End::Io(e);
                        }
                    }
                    Reply::Disconnect => break End::Disconnect,
                }
            }
            Some(payload) = down_rx.recv() => {
                sent_out(ctx);
                let out = Outgoing::Publish { topic: down.clone(), payload };
                if let Err(e) = write(wr, version, out, max).await {
                    break End::Io(e);
                }
            }
            n = rx.next() => match n {
                Ok(Some(Notification::Forward(f))) => {
                    sent_out(ctx);
                    let topic = format!("${}", String::from_utf8_lossy(&f.publish.topic));
                    let out = Outgoing::Publish { topic, payload: f.publish.payload };
                    if let Err(e) = write(wr, version, out, max).await {
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
    Send(Outgoing),
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

/// Counts a refused connection or message (`updraft_mqtt_refused{reason}`).
fn refused(ctx: &Ctx, reason: &'static str) {
    ctx.state
        .metrics
        .mqtt_refused
        .get_or_create(&ReasonLabels { reason })
        .inc();
}

/// Counts a message to a device.
fn sent_out(ctx: &Ctx) {
    ctx.state
        .metrics
        .mqtt_messages
        .get_or_create(&DirectionLabels { direction: "out" })
        .inc();
}

/// One packet from a logged-in device: ACL, acknowledgements; what to route, and what to answer.
///
/// A device publishes its system events on its own uplink topic; its other topics under
/// `$oc/devices/{id}/` and its custom topics (any not starting with `$`) are accepted and go nowhere.
/// Another device's `$oc` topic, or any other `$` topic, ends the session.
fn on_packet(
    ctx: &Ctx,
    device_id: &str,
    topics: &Topics<'_>,
    packet: Incoming,
) -> Result<(Vec<Route>, Reply), End> {
    let mut routes = Vec::new();
    let reply = match packet {
        Incoming::Publish {
            topic,
            payload,
            qos,
            pkid,
        } => {
            let messages = &ctx.state.metrics.mqtt_messages;
            messages
                .get_or_create(&DirectionLabels { direction: "in" })
                .inc();
            if topic.starts_with('$') && !topic.starts_with(topics.prefix) {
                refused(ctx, "acl");
                return Err(End::Acl(format!("publish to {topic:?}")));
            }
            if topic == topics.up {
                routes.push(Route::Publish(internal(topics.up).to_owned(), payload));
            } else {
                tracing::debug!(device_id, topic = ?topic, "mqtt: publish outside sys/events/up dropped");
            }
            match qos {
                QoS::AtMostOnce => Reply::None,
                QoS::AtLeastOnce => Reply::Send(Outgoing::PubAck(pkid)),
                QoS::ExactlyOnce => Reply::Send(Outgoing::PubRec(pkid)),
            }
        }
        Incoming::PubRel(pkid) => Reply::Send(Outgoing::PubComp(pkid)),
        Incoming::Subscribe { pkid, filters } => {
            let mut granted = Vec::with_capacity(filters.len());
            for (path, qos) in &filters {
                match subscription(ctx, device_id, topics, path) {
                    Ok(new) => {
                        routes.extend(new.then(|| Route::Subscribe(internal(path).to_owned())));
                        granted.push(Some(if *qos == QoS::AtMostOnce {
                            QoS::AtMostOnce
                        } else {
                            QoS::AtLeastOnce
                        }));
                    }
                    Err(why) => {
                        tracing::info!(device_id, filter = ?path, why, "mqtt: subscription refused");
                        granted.push(None);
                    }
                }
            }
            Reply::Send(Outgoing::SubAck { pkid, granted })
        }
        Incoming::Unsubscribe {
            pkid,
            topics: filters,
        } => {
            for f in &filters {
                if f.starts_with(topics.prefix) && f != topics.down && f != topics.up {
                    routes.push(Route::Unsubscribe(internal(f).to_owned()));
                }
            }
            Reply::Send(Outgoing::UnsubAck {
                pkid,
                count: filters.len(),
            })
        }
        Incoming::PingReq => Reply::Send(Outgoing::PingResp),
        Incoming::Disconnect => Reply::Disconnect,
        // Acknowledgements of our QoS 0 downlinks cannot arrive; ignore strays.
        Incoming::Ack => Reply::None,
        Incoming::Connect(_) => return Err(End::Protocol("second CONNECT".to_owned())),
        Incoming::ServerOnly => {
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
        // A custom topic: granted, but nothing is ever published to it (devices' custom topics go
        // nowhere), so the router is not told.
        if !filter.starts_with('$') && rumqttc::mqttbytes::valid_filter(filter) {
            return Ok(false);
        }
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

#[derive(Debug)]
enum ReadError {
    Io(std::io::Error),
    Codec(CodecError),
}

/// Reads more of the stream into `buf`; false at its clean end.
async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    at_least: usize,
) -> Result<bool, ReadError> {
    buf.reserve(at_least.max(64));
    let read = rd.read_buf(buf).await.map_err(ReadError::Io)?;
    if read == 0 {
        return if buf.is_empty() {
            Ok(false)
        } else {
            Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()))
        };
    }
    Ok(true)
}

/// Reads the CONNECT, in whichever version the device speaks; `None` at a clean end of stream.
async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(Version, Connect)>, ReadError> {
    let version = loop {
        match codec::connect_version(buf, max) {
            Ok(v) => break v,
            Err(CodecError::Insufficient(n)) => {
                if buf.len() > max {
                    return Err(ReadError::Codec(CodecError::Malformed(
                        "CONNECT too large".into(),
                    )));
                }
                if !fill(rd, buf, n).await? {
                    return Ok(None);
                }
            }
            Err(e) => return Err(ReadError::Codec(e)),
        }
    };
    match read_packet(rd, buf, version, max).await? {
        Some(Incoming::Connect(c)) => Ok(Some((version, c))),
        Some(_) => Err(ReadError::Codec(CodecError::Malformed(
            "the first packet is not CONNECT".into(),
        ))),
        None => Ok(None),
    }
}

/// Reads one packet; `None` at a clean end of stream.
async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    version: Version,
    max: usize,
) -> Result<Option<Incoming>, ReadError> {
    loop {
        match codec::read(version, buf, max) {
            Ok(p) => return Ok(Some(p)),
            Err(CodecError::Insufficient(n)) => {
                if !fill(rd, buf, n).await? {
                    return Ok(None);
                }
            }
            Err(e) => return Err(ReadError::Codec(e)),
        }
    }
}

async fn write<W: AsyncWrite + Unpin>(
    wr: &mut W,
    version: Version,
    packet: Outgoing,
    max: usize,
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(64);
    codec::write(version, packet, &mut out, max)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    wr.write_all(&out).await?;
    wr.flush().await
}
