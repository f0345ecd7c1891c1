//! LwM2M helpers (OMA LwM2M 1.0/1.1 over CoAP): registration query parameters, resource values in the
//! content formats devices answer reads with (OMA-TLV, plain text, SenML JSON), and the resources the
//! upgrade flows use (`protocols.md` §2.1, §3.3).

use std::collections::BTreeMap;

/// CoAP content format `text/plain`.
pub const FORMAT_TEXT: u16 = 0;
/// CoAP content format `application/octet-stream`.
pub const FORMAT_OPAQUE: u16 = 42;
/// CoAP content format `application/senml+json`.
pub const FORMAT_SENML_JSON: u16 = 110;
/// CoAP content format `application/vnd.oma.lwm2m+tlv`.
pub const FORMAT_TLV: u16 = 11542;
/// The legacy LwM2M 1.0 TLV content format some clients still send.
pub const FORMAT_TLV_LEGACY: u16 = 1542;

/// Resources of the Connectivity Monitoring object (`/4/0`) the coverage check reads.
pub mod connectivity {
    /// `/4/0/2` Radio Signal Strength (NB-IoT: NRSRP), dBm.
    pub const RSRP: u16 = 2;
    /// `/4/0/8` Cell ID.
    pub const CELL_ID: u16 = 8;
    /// `/4/0/11` SignalSNR (SINR), dB.
    pub const SINR: u16 = 11;
}

/// The parameters of a Register (`POST /rd?ep=..&lt=..&b=..&lwm2m=..`) or Update (`POST /rd/{id}?lt=..`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegisterParams {
    /// `ep`: the endpoint name (Huawei: the node id, usually the IMEI).
    pub endpoint: Option<String>,
    /// `lt`: the registration lifetime in seconds.
    pub lifetime: Option<u32>,
    /// `b`: the binding mode (`U`, `UQ`, ...).
    pub binding: Option<String>,
    /// `lwm2m`: the protocol version.
    pub version: Option<String>,
}

/// Why a registration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// A query parameter with a bad value.
    #[error("registration query parameter {name:?}: {message}")]
    Param {
        /// The parameter.
        name: String,
        /// What is wrong.
        message: String,
    },
}

impl RegisterParams {
    /// Reads the `Uri-Query` options of a registration request. Unknown parameters (`sms`, `Q`...) are
    /// ignored.
    ///
    /// # Errors
    /// [`RegisterError`] for an empty endpoint name or a lifetime that is not a positive number.
    pub fn parse<'a>(queries: impl IntoIterator<Item = &'a [u8]>) -> Result<Self, RegisterError> {
        let mut params = Self::default();
        for query in queries {
            let query = String::from_utf8_lossy(query);
            let (name, value) = query.split_once('=').unwrap_or((&query, ""));
            let bad = |message: &str| RegisterError::Param {
                name: name.to_owned(),
                message: message.to_owned(),
            };
            match name {
                "ep" => {
                    if value.is_empty() {
                        return Err(bad("the endpoint name is empty"));
                    }
                    params.endpoint = Some(value.to_owned());
                }
                "lt" => {
                    let lt = value
                        .parse::<u32>()
                        .ok()
                        .filter(|v| *v > 0)
                        .ok_or_else(|| bad("must be a positive number of seconds"))?;
                    params.lifetime = Some(lt);
                }
                "b" => params.binding = Some(value.to_owned()),
                "lwm2m" => params.version = Some(value.to_owned()),
                _ => {}
            }
        }
        Ok(params)
    }
}

/// A request of LwM2M's registration interface (OMA LwM2M 1.x §6.2, the server side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registration {
    /// `POST /rd?ep=...`.
    Register {
        /// The endpoint name.
        endpoint: String,
        /// All parameters.
        params: RegisterParams,
    },
    /// `POST /rd/{id}` (parameters optional).
    Update {
        /// The registration's location id.
        id: String,
        /// What changed.
        params: RegisterParams,
    },
    /// `DELETE /rd/{id}`.
    Deregister {
        /// The registration's location id.
        id: String,
    },
}

/// Why a request is not one of the registration interface.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Another path or method: 4.04.
    #[error("no such resource")]
    NotFound,
    /// A registration without `ep`: 4.00.
    #[error("a registration needs an endpoint name (ep)")]
    NoEndpoint,
    /// Bad query parameters: 4.00.
    #[error(transparent)]
    Params(#[from] RegisterError),
}

/// Reads a CoAP request from a device as a registration-interface request.
///
/// # Errors
/// [`RequestError`]: not this interface (4.04), or bad parameters (4.00).
pub fn registration(packet: &coap_lite::Packet) -> Result<Registration, RequestError> {
    use coap_lite::{CoapOption, MessageClass, RequestType};
    let values = |option| {
        packet
            .get_option(option)
            .map(|l| l.iter().map(Vec::as_slice).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let path = values(CoapOption::UriPath);
    let MessageClass::Request(method) = packet.header.code else {
        return Err(RequestError::NotFound);
    };
    let id = || String::from_utf8_lossy(path[1]).into_owned();
    match (method, path.as_slice()) {
        (RequestType::Post, [b"rd"]) => {
            let params = RegisterParams::parse(values(CoapOption::UriQuery))?;
            let endpoint = params.endpoint.clone().ok_or(RequestError::NoEndpoint)?;
            Ok(Registration::Register { endpoint, params })
        }
        (RequestType::Post, [b"rd", _]) => Ok(Registration::Update {
            id: id(),
            params: RegisterParams::parse(values(CoapOption::UriQuery))?,
        }),
        (RequestType::Delete, [b"rd", _]) => Ok(Registration::Deregister { id: id() }),
        _ => Err(RequestError::NotFound),
    }
}

/// Why a resource value could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Malformed TLV.
    #[error("malformed OMA-TLV: {0}")]
    Tlv(&'static str),
    /// A value that is not an integer.
    #[error("resource {0} is not an integer")]
    NotInteger(u16),
    /// Malformed SenML JSON.
    #[error("malformed SenML JSON: {0}")]
    Senml(String),
    /// A content format this platform does not read.
    #[error("unsupported content format {0}")]
    Format(u16),
}

/// One OMA-TLV entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// Bits 7-6 of the type byte: 0 object instance, 1 resource instance, 2 multiple resource,
    /// 3 resource with value.
    pub kind: u8,
    /// The identifier.
    pub id: u16,
    /// The value (for kinds 0 and 2, nested TLV).
    pub value: &'a [u8],
}

/// Splits OMA-TLV bytes into entries (one level).
///
/// # Errors
/// [`ValueError::Tlv`] when an entry runs past the end.
pub fn tlv_entries(mut bytes: &[u8]) -> Result<Vec<Tlv<'_>>, ValueError> {
    let mut out = Vec::new();
    while let Some((&ty, rest)) = bytes.split_first() {
        let id_len = if ty & 0x20 != 0 { 2 } else { 1 };
        let len_len = usize::from((ty >> 3) & 0x03);
        if rest.len() < id_len + len_len {
            return Err(ValueError::Tlv("header runs past the end"));
        }
        let id = if id_len == 2 {
            u16::from_be_bytes([rest[0], rest[1]])
        } else {
            u16::from(rest[0])
        };
        let rest = &rest[id_len..];
        let (len, rest) = if len_len == 0 {
            (usize::from(ty & 0x07), rest)
        } else {
            let len = rest[..len_len]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[len_len..])
        };
        if rest.len() < len {
            return Err(ValueError::Tlv("value runs past the end"));
        }
        out.push(Tlv {
            kind: ty >> 6,
            id,
            value: &rest[..len],
        });
        bytes = &rest[len..];
    }
    Ok(out)
}

/// Encodes one TLV entry (devices and the simulator answer reads with these).
#[must_use]
pub fn tlv_encode(kind: u8, id: u16, value: &[u8]) -> Vec<u8> {
    let mut ty = (kind & 0x03) << 6;
    let mut out = Vec::with_capacity(value.len() + 6);
    let id_bytes: Vec<u8> = if id > 0xFF {
        ty |= 0x20;
        id.to_be_bytes().to_vec()
    } else {
        vec![u8::try_from(id).unwrap_or(0)]
    };
    let len = value.len();
    let len_bytes: Vec<u8> = if len < 8 {
        ty |= u8::try_from(len).unwrap_or(0);
        Vec::new()
    } else if len <= 0xFF {
        ty |= 0x08;
        vec![u8::try_from(len).unwrap_or(0)]
    } else if len <= 0xFFFF {
        ty |= 0x10;
        u16::try_from(len).unwrap_or(0).to_be_bytes().to_vec()
    } else {
        ty |= 0x18;
        u32::try_from(len).unwrap_or(0).to_be_bytes()[1..].to_vec()
    };
    out.push(ty);
    out.extend_from_slice(&id_bytes);
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(value);
    out
}

/// The shortest big-endian two's-complement form of an integer (1, 2, 4 or 8 bytes), as TLV wants.
#[must_use]
pub fn tlv_integer(v: i64) -> Vec<u8> {
    if let Ok(b) = i8::try_from(v) {
        b.to_be_bytes().to_vec()
    } else if let Ok(s) = i16::try_from(v) {
        s.to_be_bytes().to_vec()
    } else if let Ok(i) = i32::try_from(v) {
        i.to_be_bytes().to_vec()
    } else {
        v.to_be_bytes().to_vec()
    }
}

fn tlv_int(id: u16, bytes: &[u8]) -> Result<i64, ValueError> {
    Ok(match bytes.len() {
        1 => i64::from(i8::from_be_bytes([bytes[0]])),
        2 => i64::from(i16::from_be_bytes([bytes[0], bytes[1]])),
        4 => i64::from(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
        8 => i64::from_be_bytes(bytes.try_into().map_err(|_| ValueError::NotInteger(id))?),
        _ => return Err(ValueError::NotInteger(id)),
    })
}

/// The single-valued integer resources in the answer to a read of an object instance (`/4/0`) or of one
/// resource (`/4/0/8`, then `single` names it): resource id → value. Resources that are not integers
/// or have several instances are left out.
///
/// # Errors
/// [`ValueError`] when the payload is malformed or in a format this platform does not read.
pub fn integer_resources(
    format: u16,
    payload: &[u8],
    single: Option<u16>,
) -> Result<BTreeMap<u16, i64>, ValueError> {
    let mut out = BTreeMap::new();
    match format {
        FORMAT_TLV | FORMAT_TLV_LEGACY => {
            let mut entries = tlv_entries(payload)?;
            // An instance read may come wrapped in its object-instance entry.
            if let [only] = entries.as_slice()
                && only.kind == 0
            {
                entries = tlv_entries(only.value)?;
            }
            for e in entries {
                if e.kind == 3
                    && let Ok(v) = tlv_int(e.id, e.value)
                {
                    out.insert(e.id, v);
                }
            }
        }
        FORMAT_TEXT => {
            let id = single.ok_or(ValueError::Format(FORMAT_TEXT))?;
            let text = std::str::from_utf8(payload).map_err(|_| ValueError::NotInteger(id))?;
            let v = text
                .trim()
                .parse::<i64>()
                .map_err(|_| ValueError::NotInteger(id))?;
            out.insert(id, v);
        }
        FORMAT_SENML_JSON => {
            let records: Vec<serde_json::Value> =
                serde_json::from_slice(payload).map_err(|e| ValueError::Senml(e.to_string()))?;
            let mut base = String::new();
            for r in records {
                if let Some(bn) = r.get("bn").and_then(serde_json::Value::as_str) {
                    bn.clone_into(&mut base);
                }
                let name = r.get("n").and_then(serde_json::Value::as_str).unwrap_or("");
                let path = format!("{base}{name}");
                let Some(id) = path
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .and_then(|s| s.parse::<u16>().ok())
                else {
                    continue;
                };
                // `/4/0/1/0` (a resource instance) has five segments; only `/4/0/r` counts.
                if path.trim_matches('/').split('/').count() != 3 {
                    continue;
                }
                if let Some(v) = r.get("v").and_then(serde_json::Value::as_i64) {
                    out.insert(id, v);
                }
            }
        }
        other => return Err(ValueError::Format(other)),
    }
    Ok(out)
}

/// The value of a string resource read alone (`/3/0/3`, resource `id`), in plain text, OMA-TLV or SenML
/// JSON (`vs`).
///
/// # Errors
/// [`ValueError`] when the payload is malformed, not UTF-8, or in a format this platform does not read.
pub fn string_resource(format: u16, payload: &[u8], id: u16) -> Result<String, ValueError> {
    let text = |bytes: &[u8]| {
        std::str::from_utf8(bytes)
            .map(|s| s.trim_end_matches('\0').to_owned())
            .map_err(|_| ValueError::Tlv("a string resource that is not UTF-8"))
    };
    match format {
        FORMAT_TEXT => text(payload),
        FORMAT_TLV | FORMAT_TLV_LEGACY => {
            let entries = tlv_entries(payload)?;
            let entry = entries
                .iter()
                .find(|e| e.kind == 3 && e.id == id)
                .ok_or(ValueError::Tlv("the resource is missing"))?;
            text(entry.value)
        }
        FORMAT_SENML_JSON => {
            let records: Vec<serde_json::Value> =
                serde_json::from_slice(payload).map_err(|e| ValueError::Senml(e.to_string()))?;
            records
                .iter()
                .find_map(|r| r.get("vs").and_then(serde_json::Value::as_str))
                .map(str::to_owned)
                .ok_or_else(|| ValueError::Senml("no string value (vs)".to_owned()))
        }
        other => Err(ValueError::Format(other)),
    }
}

/// The Firmware Update object's resources (`/5/0/...`).
pub mod firmware {
    /// Package URI (write).
    pub const PACKAGE_URI: u16 = 1;
    /// Update (execute).
    pub const UPDATE: u16 = 2;
    /// State: 0 idle, 1 downloading, 2 downloaded, 3 updating.
    pub const STATE: u16 = 3;
    /// Update Result: 0 initial, 1 success, 2-9 failures.
    pub const UPDATE_RESULT: u16 = 5;
    /// The Device object's Firmware Version (`/3/0/3`).
    pub const DEVICE_FIRMWARE_VERSION: u16 = 3;
}

/// A CoAP Block1/Block2 option value (RFC 7959 §2.2): block number, whether more follow, and the size
/// exponent (size = 2^(szx + 4), 16 to 1024 bytes). coap-lite's own type stops at 65 535 blocks; the
/// RFC allows 2^20.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// The block number (20 bits at most).
    pub num: u32,
    /// More blocks follow.
    pub more: bool,
    /// The size exponent, 0-6.
    pub szx: u8,
}

/// Why an option value is not a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// More than 3 bytes.
    #[error("a block option has at most 3 bytes, not {0}")]
    Length(usize),
    /// SZX 7 is reserved (BERT, only over reliable transports).
    #[error("block size exponent 7 is reserved")]
    Reserved,
}

impl Block {
    /// The largest block number the option can carry.
    pub const MAX_NUM: u32 = (1 << 20) - 1;

    /// The block size in bytes.
    #[must_use]
    pub const fn size(self) -> usize {
        1 << (self.szx + 4)
    }

    /// The size exponent for a block size (16-1024, rounded down to a power of two).
    #[must_use]
    pub fn szx_for(size: usize) -> u8 {
        let size = size.clamp(16, 1024);
        let bits = usize::BITS - 1 - size.leading_zeros();
        u8::try_from(bits - 4).unwrap_or(6)
    }

    /// Decodes an option value.
    ///
    /// # Errors
    /// [`BlockError`] for more than 3 bytes or SZX 7.
    pub fn decode(value: &[u8]) -> Result<Self, BlockError> {
        if value.len() > 3 {
            return Err(BlockError::Length(value.len()));
        }
        let raw = value.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
        let szx = u8::try_from(raw & 0x7).unwrap_or(0);
        if szx == 7 {
            return Err(BlockError::Reserved);
        }
        Ok(Self {
            num: raw >> 4,
            more: raw & 0x8 != 0,
            szx,
        })
    }

    /// Encodes the option value in the fewest bytes (none for block 0 of 16 bytes with no more).
    #[must_use]
    pub fn encode(self) -> Vec<u8> {
        let raw = (self.num.min(Self::MAX_NUM) << 4)
            | (u32::from(self.more) << 3)
            | u32::from(self.szx & 0x7);
        let bytes = raw.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        bytes[skip..].to_vec()
    }

    /// The byte range of block `num` of `szx` in a body of `len` bytes, and whether more follow; `None`
    /// when the block starts past the end (an empty body has block 0, empty).
    #[must_use]
    pub fn slice(num: u32, szx: u8, len: usize) -> Option<(std::ops::Range<usize>, bool)> {
        let size = 1usize << (szx.min(6) + 4);
        let start = usize::try_from(num).ok()?.checked_mul(size)?;
        if start > len || (start == len && len > 0) {
            return None;
        }
        let end = (start + size).min(len);
        Some((start..end, end < len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_parameters_are_read_and_checked() {
        let q: Vec<&[u8]> = vec![
            b"ep=863703030000001",
            b"lt=86400",
            b"b=UQ",
            b"lwm2m=1.0",
            b"Q",
        ];
        let p = RegisterParams::parse(q).unwrap();
        assert_eq!(p.endpoint.as_deref(), Some("863703030000001"));
        assert_eq!(p.lifetime, Some(86_400));
        assert_eq!(p.binding.as_deref(), Some("UQ"));
        assert_eq!(p.version.as_deref(), Some("1.0"));
        for bad in [&b"ep="[..], b"lt=0", b"lt=-5", b"lt=ten"] {
            assert!(RegisterParams::parse([bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn registration_requests_are_recognised() {
        use coap_lite::{CoapOption, MessageClass, Packet, RequestType};
        let request = |method, path: &[&str], queries: &[&str]| {
            let mut p = Packet::new();
            p.header.code = MessageClass::Request(method);
            for s in path {
                p.add_option(CoapOption::UriPath, s.as_bytes().to_vec());
            }
            for q in queries {
                p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
            }
            p
        };
        let Ok(Registration::Register { endpoint, params }) =
            registration(&request(RequestType::Post, &["rd"], &["ep=imei1", "lt=60"]))
        else {
            panic!("a registration")
        };
        assert_eq!((endpoint.as_str(), params.lifetime), ("imei1", Some(60)));
        assert_eq!(
            registration(&request(RequestType::Post, &["rd", "ab12"], &[])),
            Ok(Registration::Update {
                id: "ab12".into(),
                params: RegisterParams::default()
            })
        );
        assert_eq!(
            registration(&request(RequestType::Delete, &["rd", "ab12"], &[])),
            Ok(Registration::Deregister { id: "ab12".into() })
        );
        assert_eq!(
            registration(&request(RequestType::Post, &["rd"], &["lt=60"])),
            Err(RequestError::NoEndpoint)
        );
        assert!(matches!(
            registration(&request(RequestType::Post, &["rd"], &["ep=x", "lt=0"])),
            Err(RequestError::Params(_))
        ));
        for (method, path) in [
            (RequestType::Get, &["rd"][..]),
            (RequestType::Post, &["rd", "a", "b"][..]),
            (RequestType::Put, &["19", "0", "0"][..]),
            (RequestType::Delete, &["rd"][..]),
        ] {
            assert_eq!(
                registration(&request(method, path, &[])),
                Err(RequestError::NotFound)
            );
        }
    }

    #[test]
    fn tlv_instances_and_resources_decode() {
        // /4/0 as an object instance holding RSRP -97, cell id 0x01A2B3C4, SINR 5 and a multiple resource.
        let mut inner = Vec::new();
        inner.extend(tlv_encode(3, 2, &tlv_integer(-97)));
        inner.extend(tlv_encode(3, 8, &tlv_integer(0x01A2_B3C4)));
        inner.extend(tlv_encode(3, 11, &tlv_integer(5)));
        inner.extend(tlv_encode(2, 1, &tlv_encode(1, 0, &tlv_integer(7))));
        inner.extend(tlv_encode(
            3,
            300,
            b"a long string of more than eight bytes",
        ));
        let wrapped = tlv_encode(0, 0, &inner);
        let expected = BTreeMap::from([(2, -97), (8, 0x01A2_B3C4), (11, 5)]);
        assert_eq!(
            integer_resources(FORMAT_TLV, &wrapped, None).unwrap(),
            expected
        );
        assert_eq!(
            integer_resources(FORMAT_TLV_LEGACY, &inner, None).unwrap(),
            expected
        );
        // Hand-written: type 0xC1 (resource, 8-bit id, length 1), id 8, value 0x2A.
        assert_eq!(
            integer_resources(FORMAT_TLV, &[0xC1, 0x08, 0x2A], Some(8)).unwrap(),
            BTreeMap::from([(8, 42)])
        );
        assert_eq!(
            tlv_entries(&[0xC8, 0x08, 0x05, 1, 2]),
            Err(ValueError::Tlv("value runs past the end"))
        );
        assert_eq!(
            tlv_entries(&[0xF8, 0x08]),
            Err(ValueError::Tlv("header runs past the end"))
        );
        let long = tlv_encode(3, 1, &[9; 70_000]);
        assert_eq!(tlv_entries(&long).unwrap()[0].value.len(), 70_000);
    }

    #[test]
    fn text_and_senml_answers_decode() {
        assert_eq!(
            integer_resources(FORMAT_TEXT, b"123456", Some(8)).unwrap(),
            BTreeMap::from([(8, 123_456)])
        );
        assert!(integer_resources(FORMAT_TEXT, b"12x", Some(8)).is_err());
        let senml = br#"[{"bn":"/4/0/","n":"2","v":-101},{"n":"8","v":4242},{"n":"11","v":-4},{"n":"1/0","v":7},{"n":"4/0","vs":"10.0.0.1"}]"#;
        assert_eq!(
            integer_resources(FORMAT_SENML_JSON, senml, None).unwrap(),
            BTreeMap::from([(2, -101), (8, 4242), (11, -4)])
        );
        assert!(matches!(
            integer_resources(FORMAT_SENML_JSON, b"{", None),
            Err(ValueError::Senml(_))
        ));
        assert_eq!(
            integer_resources(60, b"", None),
            Err(ValueError::Format(60))
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x1234_5678_u32;
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed.to_le_bytes()[0]
                })
                .collect();
            for format in [FORMAT_TLV, FORMAT_TEXT, FORMAT_SENML_JSON] {
                let _ = integer_resources(format, &bytes, Some(8));
            }
        }
    }

    #[test]
    fn block_options_round_trip_in_the_fewest_bytes() {
        // RFC 7959's examples: block 0 of 64 bytes with more = 0x0A; NUM needs 12 and 20 bits.
        let b = Block {
            num: 0,
            more: true,
            szx: 2,
        };
        assert_eq!(b.encode(), [0x0A]);
        assert_eq!(Block::decode(&[0x0A]), Ok(b));
        assert_eq!(
            Block::decode(&[]),
            Ok(Block {
                num: 0,
                more: false,
                szx: 0
            })
        );
        assert!(
            Block {
                num: 0,
                more: false,
                szx: 0
            }
            .encode()
            .is_empty()
        );
        for (num, len) in [(15, 1), (16, 2), (4095, 2), (4096, 3), (Block::MAX_NUM, 3)] {
            let b = Block {
                num,
                more: false,
                szx: 6,
            };
            let bytes = b.encode();
            assert_eq!(bytes.len(), len, "block {num}");
            assert_eq!(Block::decode(&bytes), Ok(b));
        }
        assert_eq!(Block::decode(&[0, 0, 0, 0]), Err(BlockError::Length(4)));
        assert_eq!(Block::decode(&[0x07]), Err(BlockError::Reserved));
        assert_eq!(
            (
                Block::szx_for(1024),
                Block::szx_for(16),
                Block::szx_for(700),
                Block::szx_for(4096)
            ),
            (6, 0, 5, 6)
        );
        assert_eq!(
            Block {
                num: 0,
                more: false,
                szx: 6
            }
            .size(),
            1024
        );
    }

    #[test]
    fn blocks_slice_a_body_and_say_whether_more_follow() {
        assert_eq!(Block::slice(0, 0, 40), Some((0..16, true)));
        assert_eq!(Block::slice(2, 0, 40), Some((32..40, false)));
        assert_eq!(Block::slice(3, 0, 40), None);
        assert_eq!(Block::slice(1, 0, 32), Some((16..32, false)));
        assert_eq!(Block::slice(2, 0, 32), None, "past the end");
        assert_eq!(
            Block::slice(0, 6, 0),
            Some((0..0, false)),
            "an empty body has one empty block"
        );
        assert_eq!(Block::slice(u32::MAX, 6, 10), None);
    }

    #[test]
    fn string_resources_read_in_every_format() {
        assert_eq!(string_resource(FORMAT_TEXT, b"V2.0", 3).unwrap(), "V2.0");
        let tlv = tlv_encode(3, 3, b"FW-1.2");
        assert_eq!(string_resource(FORMAT_TLV, &tlv, 3).unwrap(), "FW-1.2");
        assert!(string_resource(FORMAT_TLV, &tlv, 4).is_err());
        let senml = br#"[{"bn":"/3/0/3","vs":"1.0.7"}]"#;
        assert_eq!(
            string_resource(FORMAT_SENML_JSON, senml, 3).unwrap(),
            "1.0.7"
        );
        assert_eq!(string_resource(50, b"{}", 3), Err(ValueError::Format(50)));
        assert!(string_resource(FORMAT_TEXT, &[0xFF, 0xFE], 3).is_err());
    }
}
