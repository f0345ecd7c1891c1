//! PCP (`protocols.md` §2.2) over the `/19` object: messages from devices (notifications of `/19/0/0`)
//! decoded into driver events, frames to devices written to `/19/1/0`, and segment requests (0x15)
//! answered here from the package cache, without the driver or the database, for the download the
//! driver told this endpoint to serve.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use coap_lite::{CoapOption, ContentFormat, MessageClass, Packet, RequestType};
use protocol::pcp::{self, Downlink as Pcp, ResultCode, Uplink};

use super::{CoapEndpoint, DeviceEvent, PROGRESS_STEP, SegmentSource, lock};

/// What a device is being served.
pub(super) struct Serving {
    source: Arc<SegmentSource>,
    /// The last progress step reported to the driver (percent), if any.
    reported: Option<u32>,
}

impl CoapEndpoint {
    /// Starts serving `source`'s segments to the device.
    pub(super) fn serve_segments(&self, device_id: &str, source: Arc<SegmentSource>) {
        lock(&self.inner.serving).insert(
            device_id.to_owned(),
            Serving {
                source,
                reported: None,
            },
        );
    }

    /// A PCP message from a device.
    pub(super) fn uplink(&self, device_id: &str, addr: SocketAddr, payload: &[u8]) {
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
            && let Some(bytes) = self.inner.cache.cached(&source.package_id)
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
                    match this.inner.cache.package(source).await {
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
        self.inner.state.metrics.pcp_segments.inc();
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
                self.serve_segments(device_id, source.clone());
                Some(source)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(device_id, error.message = %e, "PCP: looking up the download failed");
                None
            }
        }
    }

    /// Writes a PCP frame to the device's `/19/1/0` (confirmable, retransmitted; fire-and-forget).
    pub(super) fn write_pcp(&self, device_id: &str, addr: SocketAddr, frame: Vec<u8>) {
        let mut packet = Packet::new();
        packet.header.code = MessageClass::Request(RequestType::Put);
        for seg in ["19", "1", "0"] {
            packet.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        packet.set_content_format(ContentFormat::ApplicationOctetStream);
        packet.payload = frame;
        if !self.inner.transport.send_confirmable(addr, packet) {
            tracing::debug!(device_id, "PCP write could not be encoded");
        }
    }
}
