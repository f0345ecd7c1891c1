//! Block-wise firmware downloads (RFC 7959 Block2) of `coap://host:port/fw/<token>`, the Package URI the
//! driver has written for a firmware upgrade: one block per `GET`, 16-1024 bytes as the device asks
//! (`lwm2m.block_size` when it does not), from the package cache. The token is a download token like the
//! HTTPS ones: bound to one subtask, expiring, revoked when its download ends. Block requests are answered
//! without duplicate detection (a block is safe to send twice) and, once the token is open, without a
//! lookup.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use coap_lite::{CoapOption, ContentFormat, MessageClass, Packet, RequestType, ResponseType};
use protocol::lwm2m;

use super::{BlockGrant, CoapEndpoint, DeviceEvent, PROGRESS_STEP, SegmentSource, lock};

/// A block-wise firmware download open at `/fw/<token>`.
pub(super) struct BlockServing {
    device_id: String,
    source: Arc<SegmentSource>,
    /// When the token expires (ms on the injected clock).
    expires_at: i64,
    /// The last progress step reported to the driver (percent), if any.
    reported: Option<u32>,
    /// Bytes served and not yet added to the token's count.
    unrecorded: u64,
}

impl CoapEndpoint {
    /// Opens the download the driver granted (its Package URI is about to be written).
    pub(super) fn open_blocks(&self, device_id: &str, grant: BlockGrant) {
        lock(&self.inner.blocks).insert(
            grant.token_hash,
            BlockServing {
                device_id: device_id.to_owned(),
                source: grant.source,
                expires_at: grant.expires_at,
                reported: None,
                unrecorded: 0,
            },
        );
    }

    /// Closes the device's block downloads (the driver ended its download), counting what they served.
    pub(super) fn close_blocks(&self, device_id: &str) {
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

    /// `GET /fw/<token>` with Block2: one block of the firmware package the token opens.
    pub(super) fn block_request(&self, packet: &Packet, addr: SocketAddr) {
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
            self.error_reply(
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
                self.error_reply(
                    packet,
                    addr,
                    ResponseType::Unauthorized,
                    "the download token has expired",
                );
                return;
            }
            if let Some(bytes) = self.inner.cache.cached(&source.package_id) {
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
                                this.error_reply(
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
                        this.error_reply(
                            &packet,
                            addr,
                            ResponseType::Unauthorized,
                            &denied.to_string(),
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error.message = %e, "block download: token lookup failed");
                        this.error_reply(
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
                this.error_reply(&packet, addr, ResponseType::BadOption, "no such block");
                return;
            };
            match this.inner.cache.range(&source, range.clone()).await {
                Ok(block) => {
                    this.answer_block_range(&packet, addr, &hash, size, num, szx, range, &block)
                }
                Err(e) => {
                    tracing::warn!(package_id = %source.package_id, error.message = %e, "block download: package bytes unavailable");
                    this.error_reply(
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
            self.error_reply(request, addr, ResponseType::BadOption, "no such block");
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
        let mut response = self
            .inner
            .transport
            .response_for(request, ResponseType::Content, addr);
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
}

/// Whether a request is a block download (`GET /fw/<token>`).
pub(super) fn is_block_request(packet: &Packet) -> bool {
    packet.header.code == MessageClass::Request(RequestType::Get)
        && packet
            .get_option(CoapOption::UriPath)
            .is_some_and(|p| p.len() == 2 && p.front().is_some_and(|s| s == b"fw"))
}

/// An unsigned integer option value in the fewest bytes.
fn uint_bytes(v: u64) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(code: RequestType, path: &[&str]) -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(code);
        for seg in path {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        p
    }

    #[test]
    fn only_a_get_of_fw_and_one_token_is_a_block_download() {
        assert!(is_block_request(&request(RequestType::Get, &["fw", "abc"])));
        assert!(!is_block_request(&request(
            RequestType::Post,
            &["fw", "abc"]
        )));
        assert!(!is_block_request(&request(RequestType::Get, &["fw"])));
        assert!(!is_block_request(&request(
            RequestType::Get,
            &["fw", "a", "b"]
        )));
        assert!(!is_block_request(&request(
            RequestType::Get,
            &["rd", "abc"]
        )));
    }

    #[test]
    fn sizes_are_sent_in_the_fewest_bytes() {
        assert_eq!(uint_bytes(0), Vec::<u8>::new());
        assert_eq!(uint_bytes(255), vec![255]);
        assert_eq!(uint_bytes(256), vec![1, 0]);
        assert_eq!(uint_bytes(1 << 20), vec![0x10, 0, 0]);
    }
}
