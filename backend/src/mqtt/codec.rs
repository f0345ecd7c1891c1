//! The MQTT versions a device may speak, behind one vocabulary: 3.1.1 (rumqttc's v4 codec), 3.1 (the
//! same wire format but for its CONNECT's protocol name `MQIsdp` and level 3, rewritten to 3.1.1's
//! before decoding) and 5.0 (rumqttc's v5 codec; properties are read and ignored, none are sent). The
//! device's CONNECT chooses; the session then reads [`Incoming`] and writes [`Outgoing`], and never sees
//! which version it speaks.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::{self, QoS};
use rumqttc::v5::mqttbytes as mqtt5;
use rumqttc::v5::mqttbytes::v5;

/// The version a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Version {
    /// MQTT 3.1 and 3.1.1.
    V4,
    /// MQTT 5.0.
    V5,
}

/// A CONNECT, whatever its version.
#[derive(Clone, Debug)]
pub(super) struct Connect {
    pub(super) client_id: String,
    /// User name and password, when given.
    pub(super) login: Option<(String, String)>,
    pub(super) keep_alive: u16,
}

/// A packet from a device.
#[derive(Debug)]
pub(super) enum Incoming {
    Connect(Connect),
    Publish {
        topic: String,
        payload: Bytes,
        qos: QoS,
        pkid: u16,
    },
    PubRel(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(String, QoS)>,
    },
    Unsubscribe {
        pkid: u16,
        topics: Vec<String>,
    },
    PingReq,
    Disconnect,
    /// An acknowledgement of something we never send with QoS > 0 (a stray): ignored.
    Ack,
    /// A packet only a server sends.
    ServerOnly,
}

/// A packet to a device.
#[derive(Debug)]
pub(super) enum Outgoing {
    /// The login's outcome, as an MQTT 3.1.1 code (translated for 5.0).
    ConnAck(v4::ConnectReturnCode),
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
    /// One granted QoS (or a refusal) per filter.
    SubAck {
        pkid: u16,
        granted: Vec<Option<QoS>>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    /// A QoS 0 message.
    Publish {
        topic: String,
        payload: Bytes,
    },
}

/// Why a packet could not be read.
#[derive(Debug)]
pub(super) enum CodecError {
    /// The buffer holds part of a packet: at least this many more bytes are needed.
    Insufficient(usize),
    /// A CONNECT of a protocol level this server does not speak.
    Level(u8),
    /// Anything else: the connection is unusable.
    Malformed(String),
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Insufficient(n) => write!(f, "{n} more bytes needed"),
            Self::Level(l) => write!(f, "unsupported protocol level {l}"),
            Self::Malformed(e) => f.write_str(e),
        }
    }
}

/// The version of the CONNECT at the start of `buf` (3.1's rewritten in place to 3.1.1's), once enough
/// of it is there.
///
/// # Errors
/// [`CodecError::Insufficient`] until the protocol level is in; [`CodecError::Level`] for a level other
/// than 3, 4 or 5; [`CodecError::Malformed`] for anything that is not a CONNECT, or one longer than
/// `max` (refused from its header, before its bytes arrive).
pub(super) fn connect_version(buf: &mut BytesMut, max: usize) -> Result<Version, CodecError> {
    let Some(&first) = buf.first() else {
        return Err(CodecError::Insufficient(2));
    };
    if first >> 4 != 1 {
        return Err(CodecError::Malformed(
            "the first packet is not CONNECT".into(),
        ));
    }
    let (len, header) = remaining_length(&buf[1..])?;
    if len > max {
        return Err(CodecError::Malformed(format!(
            "a CONNECT of {len} bytes (at most {max} before the login)"
        )));
    }
    // The protocol name's length, then the name.
    let start = 1 + header;
    let need = |n: usize| {
        if buf.len() < start + n {
            Err(CodecError::Insufficient(start + n - buf.len()))
        } else {
            Ok(())
        }
    };
    need(2)?;
    let name_len = usize::from(u16::from_be_bytes([buf[start], buf[start + 1]]));
    need(2 + name_len + 1)?;
    let name = &buf[start + 2..start + 2 + name_len];
    let level = buf[start + 2 + name_len];
    match (name, level) {
        (b"MQTT", 4) => Ok(Version::V4),
        (b"MQTT", 5) => Ok(Version::V5),
        (b"MQIsdp", 3) => {
            // Same packet with 3.1.1's name and level: two bytes shorter.
            let mut rewritten = BytesMut::with_capacity(buf.len());
            rewritten.extend_from_slice(&[first]);
            encode_length(len.saturating_sub(2), &mut rewritten);
            rewritten.extend_from_slice(&[0, 4]);
            rewritten.extend_from_slice(b"MQTT");
            rewritten.extend_from_slice(&[4]);
            rewritten.extend_from_slice(&buf[start + 2 + name_len + 1..]);
            *buf = rewritten;
            Ok(Version::V4)
        }
        (_, level) => Err(CodecError::Level(level)),
    }
}

/// The remaining length at the start of `bytes` and how many bytes encode it.
fn remaining_length(bytes: &[u8]) -> Result<(usize, usize), CodecError> {
    let mut len = 0usize;
    for (i, b) in bytes.iter().take(4).enumerate() {
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((len, i + 1));
        }
    }
    if bytes.len() >= 4 {
        Err(CodecError::Malformed("malformed remaining length".into()))
    } else {
        Err(CodecError::Insufficient(1))
    }
}

fn encode_length(mut len: usize, out: &mut BytesMut) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.extend_from_slice(&[byte]);
        if len == 0 {
            return;
        }
    }
}

/// Reads one packet of `version` from `buf` (consuming it), refusing packets larger than `max`.
///
/// # Errors
/// [`CodecError`].
pub(super) fn read(
    version: Version,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Incoming, CodecError> {
    match version {
        Version::V4 => read_v4(buf, max),
        Version::V5 => read_v5(buf, max),
    }
}

fn read_v4(buf: &mut BytesMut, max: usize) -> Result<Incoming, CodecError> {
    let packet = v4::Packet::read(buf, max).map_err(|e| match e {
        mqttbytes::Error::InsufficientBytes(n) => CodecError::Insufficient(n),
        mqttbytes::Error::InvalidProtocolLevel(l) => CodecError::Level(l),
        e => CodecError::Malformed(e.to_string()),
    })?;
    Ok(match packet {
        v4::Packet::Connect(c) => Incoming::Connect(Connect {
            client_id: c.client_id,
            login: c.login.map(|l| (l.username, l.password)),
            keep_alive: c.keep_alive,
        }),
        v4::Packet::Publish(p) => Incoming::Publish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            pkid: p.pkid,
        },
        v4::Packet::PubRel(r) => Incoming::PubRel(r.pkid),
        v4::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| (f.path, f.qos)).collect(),
        },
        v4::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            topics: u.topics,
        },
        v4::Packet::PingReq => Incoming::PingReq,
        v4::Packet::Disconnect => Incoming::Disconnect,
        v4::Packet::PubAck(_)
        | v4::Packet::PubRec(_)
        | v4::Packet::PubComp(_)
        | v4::Packet::PingResp => Incoming::Ack,
        v4::Packet::ConnAck(_) | v4::Packet::SubAck(_) | v4::Packet::UnsubAck(_) => {
            Incoming::ServerOnly
        }
    })
}

fn qos_from_5(q: mqtt5::QoS) -> QoS {
    match q {
        mqtt5::QoS::AtMostOnce => QoS::AtMostOnce,
        mqtt5::QoS::AtLeastOnce => QoS::AtLeastOnce,
        mqtt5::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to_5(q: QoS) -> mqtt5::QoS {
    match q {
        QoS::AtMostOnce => mqtt5::QoS::AtMostOnce,
        QoS::AtLeastOnce => mqtt5::QoS::AtLeastOnce,
        QoS::ExactlyOnce => mqtt5::QoS::ExactlyOnce,
    }
}

fn read_v5(buf: &mut BytesMut, max: usize) -> Result<Incoming, CodecError> {
    // MQTT 5.0 §3.14.2.1: a DISCONNECT with reason 0 and no properties may have no variable header,
    // which the v5 codec refuses.
    if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
        let _ = buf.split_to(2);
        return Ok(Incoming::Disconnect);
    }
    let max = u32::try_from(max).unwrap_or(u32::MAX);
    let packet = v5::Packet::read(buf, Some(max)).map_err(|e| match e {
        mqtt5::Error::InsufficientBytes(n) => CodecError::Insufficient(n),
        mqtt5::Error::InvalidProtocolLevel(l) => CodecError::Level(l),
        e => CodecError::Malformed(e.to_string()),
    })?;
    Ok(match packet {
        v5::Packet::Connect(c, _, login) => Incoming::Connect(Connect {
            client_id: c.client_id,
            login: login.map(|l| (l.username, l.password)),
            keep_alive: c.keep_alive,
        }),
        v5::Packet::Publish(p) => Incoming::Publish {
            topic: String::from_utf8(p.topic.to_vec())
                .map_err(|_| CodecError::Malformed("topic not UTF-8".into()))?,
            payload: p.payload,
            qos: qos_from_5(p.qos),
            pkid: p.pkid,
        },
        v5::Packet::PubRel(r) => Incoming::PubRel(r.pkid),
        v5::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos_from_5(f.qos)))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            topics: u.filters,
        },
        v5::Packet::PingReq(_) => Incoming::PingReq,
        v5::Packet::Disconnect(_) => Incoming::Disconnect,
        v5::Packet::PubAck(_)
        | v5::Packet::PubRec(_)
        | v5::Packet::PubComp(_)
        | v5::Packet::PingResp(_)
        | v5::Packet::Auth(_) => Incoming::Ack,
        v5::Packet::ConnAck(_) | v5::Packet::SubAck(_) | v5::Packet::UnsubAck(_) => {
            Incoming::ServerOnly
        }
    })
}

/// MQTT 5.0's CONNACK reason for a 3.1.1 return code.
fn reason_5(code: v4::ConnectReturnCode) -> v5::ConnectReturnCode {
    use v4::ConnectReturnCode as C;
    match code {
        C::Success => v5::ConnectReturnCode::Success,
        C::RefusedProtocolVersion => v5::ConnectReturnCode::UnsupportedProtocolVersion,
        C::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
        C::ServiceUnavailable => v5::ConnectReturnCode::ServerUnavailable,
        C::BadUserNamePassword => v5::ConnectReturnCode::BadUserNamePassword,
        C::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
    }
}

/// Encodes `packet` for `version` into `out`.
///
/// # Errors
/// A packet larger than `max`.
pub(super) fn write(
    version: Version,
    packet: Outgoing,
    out: &mut BytesMut,
    max: usize,
) -> Result<(), String> {
    match version {
        Version::V4 => {
            let packet = match packet {
                Outgoing::ConnAck(code) => v4::Packet::ConnAck(v4::ConnAck::new(code, false)),
                Outgoing::PubAck(pkid) => v4::Packet::PubAck(v4::PubAck::new(pkid)),
                Outgoing::PubRec(pkid) => v4::Packet::PubRec(v4::PubRec::new(pkid)),
                Outgoing::PubComp(pkid) => v4::Packet::PubComp(v4::PubComp::new(pkid)),
                Outgoing::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck::new(
                    pkid,
                    granted
                        .into_iter()
                        .map(|g| {
                            g.map_or(
                                v4::SubscribeReasonCode::Failure,
                                v4::SubscribeReasonCode::Success,
                            )
                        })
                        .collect(),
                )),
                Outgoing::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
                Outgoing::PingResp => v4::Packet::PingResp,
                Outgoing::Publish { topic, payload } => {
                    v4::Packet::Publish(v4::Publish::from_bytes(topic, QoS::AtMostOnce, payload))
                }
            };
            packet
                .write(out, max)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Version::V5 => {
            let packet = match packet {
                Outgoing::ConnAck(code) => v5::Packet::ConnAck(v5::ConnAck {
                    session_present: false,
                    code: reason_5(code),
                    properties: None,
                }),
                Outgoing::PubAck(pkid) => v5::Packet::PubAck(v5::PubAck::new(pkid, None)),
                Outgoing::PubRec(pkid) => v5::Packet::PubRec(v5::PubRec::new(pkid, None)),
                Outgoing::PubComp(pkid) => v5::Packet::PubComp(v5::PubComp::new(pkid, None)),
                Outgoing::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
                    pkid,
                    return_codes: granted
                        .into_iter()
                        .map(|g| {
                            g.map_or(v5::SubscribeReasonCode::NotAuthorized, |q| {
                                v5::SubscribeReasonCode::Success(qos_to_5(q))
                            })
                        })
                        .collect(),
                    properties: None,
                }),
                Outgoing::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid,
                    reasons: vec![v5::UnsubAckReason::Success; count],
                    properties: None,
                }),
                Outgoing::PingResp => v5::Packet::PingResp(v5::PingResp),
                Outgoing::Publish { topic, payload } => v5::Packet::Publish(v5::Publish::new(
                    topic,
                    mqtt5::QoS::AtMostOnce,
                    payload,
                    None,
                )),
            };
            let max = u32::try_from(max).unwrap_or(u32::MAX);
            packet
                .write(out, Some(max))
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_v4(client_id: &str) -> BytesMut {
        let mut c = v4::Connect::new(client_id);
        c.login = Some(v4::Login::new("dev", "pw"));
        c.keep_alive = 30;
        let mut out = BytesMut::new();
        v4::Packet::Connect(c).write(&mut out, 1 << 16).unwrap();
        out
    }

    #[test]
    fn an_mqtt_3_1_connect_reads_as_3_1_1() {
        let v311 = connect_v4("dev_0_0_2026120610");
        // The same CONNECT as 3.1 sends it: name MQIsdp, level 3, remaining length two bytes more.
        let mut v31 = BytesMut::new();
        v31.extend_from_slice(&[v311[0], v311[1] + 2, 0, 6]);
        v31.extend_from_slice(b"MQIsdp");
        v31.extend_from_slice(&[3]);
        v31.extend_from_slice(&v311[2 + 2 + 4 + 1..]);
        assert_eq!(connect_version(&mut v31, 1 << 16).unwrap(), Version::V4);
        assert_eq!(v31, v311);
        let Incoming::Connect(c) = read(Version::V4, &mut v31, 1 << 16).unwrap() else {
            panic!("not a CONNECT");
        };
        assert_eq!(c.client_id, "dev_0_0_2026120610");
        assert_eq!(c.login, Some(("dev".into(), "pw".into())));
        assert_eq!(c.keep_alive, 30);
    }

    #[test]
    fn an_mqtt_5_connect_and_its_packets_are_read_and_answered() {
        let mut c = v5::Connect {
            keep_alive: 60,
            client_id: "dev_0_0_2026120610".into(),
            clean_start: true,
            properties: None,
        };
        c.properties = None;
        let mut buf = BytesMut::new();
        v5::Packet::Connect(c, None, Some(v5::Login::new("dev", "pw")))
            .write(&mut buf, None)
            .unwrap();
        let mut publish = v5::Publish::new(
            "$oc/devices/dev/sys/events/up",
            mqtt5::QoS::AtLeastOnce,
            Bytes::from_static(b"{}"),
            None,
        );
        publish.pkid = 1;
        v5::Packet::Publish(publish).write(&mut buf, None).unwrap();
        buf.extend_from_slice(&[0xE0, 0]); // a bare DISCONNECT
        assert_eq!(connect_version(&mut buf, 1 << 16).unwrap(), Version::V5);
        let Incoming::Connect(c) = read(Version::V5, &mut buf, 1 << 16).unwrap() else {
            panic!("not a CONNECT");
        };
        assert_eq!(c.login, Some(("dev".into(), "pw".into())));
        assert!(matches!(
            read(Version::V5, &mut buf, 1 << 16).unwrap(),
            Incoming::Publish { qos: QoS::AtLeastOnce, ref topic, .. } if topic == "$oc/devices/dev/sys/events/up"
        ));
        assert!(matches!(
            read(Version::V5, &mut buf, 1 << 16).unwrap(),
            Incoming::Disconnect
        ));
        // A refused login is a 5.0 reason code.
        let mut out = BytesMut::new();
        write(
            Version::V5,
            Outgoing::ConnAck(v4::ConnectReturnCode::NotAuthorized),
            &mut out,
            1 << 16,
        )
        .unwrap();
        let v5::Packet::ConnAck(ack) = v5::Packet::read(&mut out, None).unwrap() else {
            panic!("not a CONNACK");
        };
        assert_eq!(ack.code, v5::ConnectReturnCode::NotAuthorized);
    }

    #[test]
    fn unknown_levels_and_other_first_packets_are_refused() {
        let mut v311 = connect_v4("x");
        let level = 2 + 2 + 4;
        v311[level] = 6;
        assert!(matches!(
            connect_version(&mut v311, 1 << 16),
            Err(CodecError::Level(6))
        ));
        let mut ping = BytesMut::from(&[0xC0u8, 0][..]);
        assert!(matches!(
            connect_version(&mut ping, 1 << 16),
            Err(CodecError::Malformed(_))
        ));
        let mut partial = BytesMut::from(&connect_v4("x")[..5]);
        assert!(matches!(
            connect_version(&mut partial, 1 << 16),
            Err(CodecError::Insufficient(_))
        ));
    }
}
