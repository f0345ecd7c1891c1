//! Simulated NB-IoT devices (`updraft sim lwm2m`): each registers over LwM2M/CoAP on real UDP, answers the
//! platform's observe of `/19/0/0`, its radio coverage reads (`/4/0`, `/4/0/8`) and its PCP messages
//! written to `/19/1/0`, downloads the package segment by segment (stop-and-wait, re-requesting after a
//! silence as Huawei's LiteOS agent does), installs, re-registers as after a reboot and reports the result.
//!
//! They also carry the standard Firmware Update object (`/5/0`) with the Device object's firmware version
//! (`/3/0/3`): a Package URI written to `/5/0/1` (`coap://.../fw/<token>`; the host is taken to be the
//! platform's) is downloaded block-wise with Block2, stop-and-wait, asking again after a silence; the State
//! (`/5/0/3`) and Update Result (`/5/0/5`) are observable; executing `/5/0/2` installs and reboots into
//! `firmware_next`, registering again. An `https` URI is answered with Update Result 9 (unsupported
//! protocol), as by a device without HTTPS.
//!
//! Knobs make devices misbehave as real ones do: datagram loss in both directions, a restart in the
//! middle of a download (the device keeps what it has and resumes when notified again), LiteOS's
//! habit of not answering 0x14, refusals and failures with a PCP result code. Every device records
//! how many devices of its cell are downloading at once, so a run proves the per-cell caps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use protocol::lwm2m::{self, connectivity, tlv_encode, tlv_integer};
use protocol::pcp::{self, Downlink, ResultCode, Uplink, Version};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::link::Link;

/// What a device's radio coverage reads answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Radio {
    /// RSRP -85 dBm, SINR 15 dB (range 0 with the default ranges: 50 per cell).
    #[default]
    Good,
    /// RSRP -110, SINR 2 (range 1: 10 per cell).
    Fair,
    /// RSRP -122, SINR -6 (range 2: 1 per cell).
    Poor,
    /// Per cell: good, fair, poor in turn.
    Mixed,
    /// `/4/0` answers without SINR (cell id only: 10 per cell).
    NoSinr,
    /// `/4/0` fails with 4.04; `/4/0/8` answers (10 per cell).
    CellOnly,
    /// Both reads fail (the upgrade fails).
    None,
}

/// How a device answers the upgrade.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Lwm2mBehaviour {
    /// Download, install, report success on the new version.
    #[default]
    Normal,
    /// Answer 0x14 with `fail_code` (default 0x04, low battery); refuse the `/5/0/1` write (4.05).
    Refuse,
    /// Download, then report 0x16 with `fail_code` (default 0x07, check failed); Update Result
    /// `fail_code` (default 5, integrity check failure).
    FailDownload,
    /// Install, then report 0x18 with `fail_code` (default 0x0A, install failed); Update Result
    /// `fail_code` (default 8, firmware update failed).
    FailUpgrade,
    /// Register and answer CoAP, never PCP; take a Package URI and never download it.
    Silent,
}

/// How every device of a run behaves and where it registers.
#[derive(Clone, Debug)]
pub struct Lwm2mOptions {
    /// The platform's CoAP address.
    pub server: SocketAddr,
    /// The software version devices run before upgrading.
    pub version: String,
    /// Devices are spread over this many cells (device `i` is in cell `1000 + i % cells`).
    pub cells: u32,
    /// The coverage reads' answers.
    pub radio: Radio,
    /// The behaviour.
    pub behaviour: Lwm2mBehaviour,
    /// The result code for refusals and failures.
    pub fail_code: Option<u8>,
    /// Probability that any datagram, in either direction, is lost.
    pub loss: f64,
    /// Restart once after this many segments of a download.
    pub restart_after: Option<u16>,
    /// LiteOS style: no 0x14 answer, straight to requesting segments.
    pub silent_accept: bool,
    /// How long a device waits for an answer before sending its pending PCP request again.
    pub retry: Duration,
    /// A pause between receiving a segment and asking for the next (a slow radio).
    pub segment_delay: Duration,
    /// The registration lifetime sent (seconds).
    pub lifetime: u32,
    /// The firmware version devices run before upgrading (`/3/0/3`).
    pub firmware_version: String,
    /// The firmware version a downloaded image installs.
    pub firmware_next: String,
    /// The Block2 size asked for (16-1024; 0 asks for none and takes the platform's).
    pub block_size: usize,
    /// CoAPS: each endpoint's pre-shared key (`server` is then the CoAPS address). A device on DTLS
    /// takes only `coaps://` Package URIs.
    pub psks: Option<Arc<HashMap<String, Vec<u8>>>>,
    /// CoAPS: the cipher suites offered (OpenSSL's names); `None`: the two IoTDA serves.
    pub dtls_ciphers: Option<String>,
}

impl Default for Lwm2mOptions {
    fn default() -> Self {
        Self {
            server: SocketAddr::from(([127, 0, 0, 1], 5683)),
            version: "V1.0".to_owned(),
            cells: 1,
            radio: Radio::Good,
            behaviour: Lwm2mBehaviour::Normal,
            fail_code: None,
            loss: 0.0,
            restart_after: None,
            silent_accept: false,
            retry: Duration::from_secs(2),
            segment_delay: Duration::ZERO,
            lifetime: 86_400,
            firmware_version: "V1.0".to_owned(),
            firmware_next: "V2.0".to_owned(),
            block_size: 512,
            psks: None,
            dtls_ciphers: None,
        }
    }
}

/// Counters shared by a run's devices.
#[derive(Debug, Default)]
pub struct Lwm2mStats {
    /// DTLS handshakes (or sockets) that failed; the device tried again.
    pub handshakes_failed: AtomicU64,
    /// Registrations answered 2.01 (a device counts again after each reboot or restart).
    pub registered: AtomicU64,
    /// Registrations refused.
    pub refused: AtomicU64,
    /// Segments received.
    pub segments: AtomicU64,
    /// Downloads completed (the SHA-256 of every image is in `images`).
    pub downloads: AtomicU64,
    /// Upgrades reported successful and acknowledged.
    pub succeeded: AtomicU64,
    /// Failures reported (refusals, failed downloads or installs).
    pub failed: AtomicU64,
    /// Restarts done mid-download.
    pub restarts: AtomicU64,
    /// PCP requests sent again after a silence.
    pub resends: AtomicU64,
    /// Per cell: devices downloading now, and the most at once.
    pub cells: Mutex<HashMap<u32, (usize, usize)>>,
    /// SHA-256 (hex) of each completed download, by endpoint.
    pub images: Mutex<HashMap<String, String>>,
}

impl Lwm2mStats {
    /// The most devices of each cell that were downloading at once.
    #[must_use]
    pub fn peaks(&self) -> HashMap<u32, usize> {
        lock(&self.cells)
            .iter()
            .map(|(c, (_, p))| (*c, *p))
            .collect()
    }

    fn downloading(&self, cell: u32, delta: isize) {
        let mut cells = lock(&self.cells);
        let (now, peak) = cells.entry(cell).or_default();
        *now = now.saturating_add_signed(delta);
        *peak = (*peak).max(*now);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The cell of device number `index`.
#[must_use]
pub fn cell_of(index: usize, cells: u32) -> u32 {
    1000 + u32::try_from(index).unwrap_or(0) % cells.max(1)
}

/// Runs one device per endpoint name (node id) until `stop`.
pub async fn run_fleet(
    opts: Lwm2mOptions,
    endpoints: Vec<String>,
    stats: Arc<Lwm2mStats>,
    stop: CancellationToken,
) {
    let opts = Arc::new(opts);
    let mut set = tokio::task::JoinSet::new();
    for (i, endpoint) in endpoints.into_iter().enumerate() {
        let cell = cell_of(i, opts.cells);
        let radio = match opts.radio {
            Radio::Mixed => [Radio::Good, Radio::Fair, Radio::Poor][(cell % 3) as usize],
            r => r,
        };
        let device = Device {
            endpoint,
            cell,
            radio,
            opts: opts.clone(),
            stats: stats.clone(),
            version: opts.version.clone(),
            reg: None,
            observe: None,
            observe_seq: 2,
            mid: rand::random(),
            state: State::Idle,
            image: Vec::new(),
            have: 0,
            pending: None,
            replies: HashMap::new(),
            restarted: false,
            counted: false,
            firmware: opts.firmware_version.clone(),
            fw_state: 0,
            fw_result: 0,
            fw_obs: [None, None],
            fw_download: None,
        };
        let stop = stop.clone();
        set.spawn(async move {
            if let Err(e) = device.run(stop).await {
                tracing::warn!(error.message = %e, "simulated LwM2M device stopped");
            }
        });
    }
    while set.join_next().await.is_some() {}
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Idle,
    Downloading {
        target: Version,
        size: u16,
        count: u16,
    },
    /// Downloaded; waiting for 0x17.
    Downloaded {
        target: Version,
    },
    /// Rebooting into `target`: report 0x18 once observed again.
    Rebooting {
        target: Version,
    },
}

struct Device {
    endpoint: String,
    cell: u32,
    radio: Radio,
    opts: Arc<Lwm2mOptions>,
    stats: Arc<Lwm2mStats>,
    version: String,
    /// The registration location.
    reg: Option<String>,
    /// The platform's observation of `/19/0/0`.
    observe: Option<Vec<u8>>,
    observe_seq: u32,
    mid: u16,
    state: State,
    image: Vec<u8>,
    /// Segments held (a restart keeps them).
    have: u16,
    /// The PCP message to send again after a silence.
    pending: Option<Vec<u8>>,
    /// Replies to the platform's confirmable requests, by message id (duplicates get them again).
    replies: HashMap<u16, Vec<u8>>,
    restarted: bool,
    /// Counted in its cell's downloading devices.
    counted: bool,
    /// `/3/0/3`.
    firmware: String,
    /// `/5/0/3`: 0 idle, 1 downloading, 2 downloaded, 3 updating.
    fw_state: u8,
    /// `/5/0/5`.
    fw_result: u8,
    /// The platform's observations of `/5/0/3` and `/5/0/5`.
    fw_obs: [Option<Vec<u8>>; 2],
    /// A block-wise download in progress.
    fw_download: Option<FwDownload>,
}

/// A block-wise firmware download: where, the next block, and the request waiting for its answer.
struct FwDownload {
    token: Vec<u8>,
    next: u32,
    szx: Option<u8>,
    request: Vec<u8>,
}

impl Device {
    async fn run(mut self, stop: CancellationToken) -> anyhow::Result<()> {
        let psk = self
            .opts
            .psks
            .as_ref()
            .map(|keys| keys.get(&self.endpoint).cloned().unwrap_or_default());
        let socket = loop {
            let link = Link::connect(
                self.opts.server,
                psk.as_deref().map(|k| (self.endpoint.as_str(), k)),
                self.opts.dtls_ciphers.as_deref(),
            );
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                r = link => match r {
                    Ok(link) => break link,
                    Err(e) => {
                        tracing::debug!(endpoint = %self.endpoint, error.message = %e, "sim: connecting failed");
                        self.stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(self.opts.retry).await;
                    }
                },
            }
        };
        let mut buf = vec![0u8; 2048];
        let mut register_at = tokio::time::Instant::now();
        let mut resend = tokio::time::interval(self.opts.retry);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(register_at), if self.reg.is_none() => {
                    self.send_register(&socket).await;
                    register_at = tokio::time::Instant::now() + self.opts.retry;
                }
                _ = resend.tick() => {
                    if let Some(request) = self.fw_download.as_ref().map(|d| d.request.clone()) {
                        self.stats.resends.fetch_add(1, Ordering::Relaxed);
                        self.send(&socket, &request).await;
                    }
                    if let (Some(frame), Some(_)) = (self.pending.clone(), &self.observe) {
                        self.stats.resends.fetch_add(1, Ordering::Relaxed);
                        self.notify(&socket, frame).await;
                    }
                }
                r = socket.recv(&mut buf) => {
                    let Ok(n) = r else { continue };
                    if self.lost() {
                        continue;
                    }
                    let Ok(packet) = Packet::from_bytes(&buf[..n]) else { continue };
                    tracing::trace!(endpoint = %self.endpoint, code = %packet.header.code, mid = packet.header.message_id, "sim received");
                    self.received(&socket, packet).await;
                    if self.reg.is_none() {
                        // Restarted or rebooted: register again after a moment.
                        register_at = tokio::time::Instant::now() + Duration::from_millis(20);
                    }
                }
            }
        }
    }

    fn lost(&self) -> bool {
        self.opts.loss > 0.0 && rand::random::<f64>() < self.opts.loss
    }

    async fn send(&self, socket: &Link, bytes: &[u8]) {
        if !self.lost() {
            let _ = socket.send(bytes).await;
        }
    }

    fn next_mid(&mut self) -> u16 {
        self.mid = self.mid.wrapping_add(1);
        self.mid
    }

    async fn send_register(&mut self, socket: &Link) {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Post);
        p.header.message_id = self.next_mid();
        p.set_token(b"reg".to_vec());
        p.add_option(CoapOption::UriPath, b"rd".to_vec());
        for q in [
            format!("ep={}", self.endpoint),
            format!("lt={}", self.opts.lifetime),
            "b=U".to_owned(),
            "lwm2m=1.0".to_owned(),
        ] {
            p.add_option(CoapOption::UriQuery, q.into_bytes());
        }
        p.add_option(CoapOption::ContentFormat, vec![40]);
        p.payload = b"</1/0>,</3/0>,</4/0>,</5/0>,</19/0>,</19/1>".to_vec();
        if let Ok(bytes) = p.to_bytes() {
            self.send(socket, &bytes).await;
        }
    }

    async fn received(&mut self, socket: &Link, packet: Packet) {
        match packet.header.code {
            MessageClass::Response(code) if packet.get_token() == b"reg" => {
                if code == ResponseType::Created && self.reg.is_none() {
                    let location: Vec<String> = packet
                        .get_option(CoapOption::LocationPath)
                        .map(|l| {
                            l.iter()
                                .map(|s| String::from_utf8_lossy(s).into_owned())
                                .collect()
                        })
                        .unwrap_or_default();
                    self.reg = Some(location.join("/"));
                    self.stats.registered.fetch_add(1, Ordering::Relaxed);
                } else if code == ResponseType::Forbidden {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            MessageClass::Response(code) if packet.get_token() == b"blk" => {
                self.block_answer(socket, code, &packet).await;
            }
            MessageClass::Request(method) => {
                let mid = packet.header.message_id;
                if let Some(reply) = self.replies.get(&mid).cloned() {
                    self.send(socket, &reply).await;
                    return;
                }
                let reply = self.request(socket, method, &packet).await;
                if let Ok(bytes) = reply.to_bytes() {
                    if self.replies.len() > 256 {
                        self.replies.clear();
                    }
                    self.replies.insert(mid, bytes.clone());
                    self.send(socket, &bytes).await;
                }
                self.after_request(socket, &packet).await;
            }
            _ => {}
        }
    }

    async fn request(&mut self, _socket: &Link, method: RequestType, req: &Packet) -> Packet {
        let path: Vec<String> = req
            .get_option(CoapOption::UriPath)
            .map(|l| {
                l.iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        let mut ack = Packet::new();
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.message_id = req.header.message_id;
        ack.set_token(req.get_token().to_vec());
        let code = match (method, path.as_slice()) {
            (RequestType::Get, ["19", "0", "0"]) => {
                self.observe = Some(req.get_token().to_vec());
                ack.set_observe_value(1);
                ack.add_option(
                    CoapOption::ContentFormat,
                    lwm2m::FORMAT_OPAQUE.to_be_bytes()[1..].to_vec(),
                );
                ResponseType::Content
            }
            (RequestType::Put, ["19", "1", "0"]) => ResponseType::Changed,
            (RequestType::Get, ["4", "0"]) => match self.radio {
                Radio::CellOnly | Radio::None => ResponseType::NotFound,
                radio => {
                    let (rsrp, sinr) = match radio {
                        Radio::Fair => (-110, 2),
                        Radio::Poor => (-122, -6),
                        _ => (-85, 15),
                    };
                    let mut tlv = tlv_encode(3, 0, &tlv_integer(7));
                    tlv.extend(tlv_encode(3, connectivity::RSRP, &tlv_integer(rsrp)));
                    tlv.extend(tlv_encode(
                        3,
                        connectivity::CELL_ID,
                        &tlv_integer(i64::from(self.cell)),
                    ));
                    if radio != Radio::NoSinr {
                        tlv.extend(tlv_encode(3, connectivity::SINR, &tlv_integer(sinr)));
                    }
                    ack.add_option(
                        CoapOption::ContentFormat,
                        lwm2m::FORMAT_TLV.to_be_bytes().to_vec(),
                    );
                    ack.payload = tlv;
                    ResponseType::Content
                }
            },
            (RequestType::Get, ["3", "0", "3"]) => {
                ack.payload = self.firmware.clone().into_bytes();
                ResponseType::Content
            }
            (RequestType::Put, ["5", "0", "1"]) => {
                if self.opts.behaviour == Lwm2mBehaviour::Refuse {
                    ResponseType::MethodNotAllowed
                } else {
                    ResponseType::Changed
                }
            }
            (RequestType::Get, ["5", "0", r @ ("3" | "5")]) => {
                let which = usize::from(*r == "5");
                if req.get_first_option(CoapOption::Observe).is_some() {
                    self.fw_obs[which] = Some(req.get_token().to_vec());
                    ack.set_observe_value(1);
                }
                let value = if which == 0 {
                    self.fw_state
                } else {
                    self.fw_result
                };
                ack.payload = value.to_string().into_bytes();
                ResponseType::Content
            }
            (RequestType::Post, ["5", "0", "2"]) => {
                if self.fw_state == 2 {
                    ResponseType::Changed
                } else {
                    ResponseType::MethodNotAllowed
                }
            }
            (RequestType::Get, ["4", "0", "8"]) => {
                if self.radio == Radio::None {
                    ResponseType::NotFound
                } else {
                    ack.payload = self.cell.to_string().into_bytes();
                    ResponseType::Content
                }
            }
            _ => ResponseType::NotFound,
        };
        ack.header.code = MessageClass::Response(code);
        ack
    }

    /// What follows a request once it is answered: PCP handling, and the 0x18 after a reboot once
    /// observed again.
    async fn after_request(&mut self, socket: &Link, req: &Packet) {
        let is = |p: &[&str]| {
            req.get_option(CoapOption::UriPath).is_some_and(|l| {
                l.len() == p.len() && l.iter().zip(p).all(|(a, b)| a.as_slice() == b.as_bytes())
            })
        };
        if is(&["19", "0", "0"]) {
            if let State::Rebooting { target } = self.state.clone() {
                self.state = State::Idle;
                let (result, version) = if self.opts.behaviour == Lwm2mBehaviour::FailUpgrade {
                    (
                        self.opts.fail_code.unwrap_or(0x0A),
                        Version::new(&self.version).unwrap_or(target),
                    )
                } else {
                    self.version = target.as_string();
                    (0, target)
                };
                let frame = Uplink::UpgradeResult {
                    result: ResultCode(result),
                    version,
                }
                .encode();
                self.pending = Some(frame.clone());
                self.notify(socket, frame).await;
            }
        } else if is(&["5", "0", "1"])
            && !matches!(
                self.opts.behaviour,
                Lwm2mBehaviour::Refuse | Lwm2mBehaviour::Silent
            )
        {
            let uri = String::from_utf8_lossy(&req.payload).into_owned();
            self.start_firmware(socket, &uri).await;
        } else if is(&["5", "0", "2"]) && self.fw_state == 2 {
            self.install_firmware(socket).await;
        } else if is(&["19", "1", "0"]) && self.opts.behaviour != Lwm2mBehaviour::Silent {
            let payload = req.payload.clone();
            let Ok(frame) = pcp::decode_exact(&payload) else {
                return;
            };
            let Ok(message) = Downlink::parse(&frame) else {
                return;
            };
            self.pcp(socket, message).await;
        }
    }

    async fn pcp(&mut self, socket: &Link, message: Downlink<'_>) {
        let opts = self.opts.clone();
        let fail_code = |default: u8| ResultCode(opts.fail_code.unwrap_or(default));
        match message {
            Downlink::QueryVersion => {
                let Ok(version) = Version::new(&self.version) else {
                    return;
                };
                let frame = Uplink::Version {
                    result: ResultCode::OK,
                    version,
                }
                .encode();
                self.notify(socket, frame).await;
            }
            Downlink::NewVersion {
                version,
                segment_size,
                segment_count,
                ..
            } => {
                if self.opts.behaviour == Lwm2mBehaviour::Refuse {
                    let frame = Uplink::NewVersionAnswer {
                        result: fail_code(0x04),
                    }
                    .encode();
                    self.notify(socket, frame).await;
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // Notified again for the version it was downloading (after a restart): resume.
                let resume =
                    matches!(&self.state, State::Downloading { target, .. } if *target == version);
                if !resume {
                    self.have = 0;
                    self.image.clear();
                }
                self.state = State::Downloading {
                    target: version,
                    size: segment_size,
                    count: segment_count,
                };
                if !self.opts.silent_accept {
                    let frame = Uplink::NewVersionAnswer {
                        result: ResultCode::OK,
                    }
                    .encode();
                    self.notify(socket, frame).await;
                }
                if !self.counted {
                    self.counted = true;
                    self.stats.downloading(self.cell, 1);
                }
                self.request_segment(socket).await;
            }
            Downlink::Segment {
                result,
                segment,
                data,
            } => {
                let State::Downloading {
                    target,
                    size,
                    count,
                } = self.state.clone()
                else {
                    return;
                };
                if !result.is_ok() {
                    // The platform has no task for us (stopped): give up.
                    self.stop_downloading();
                    self.state = State::Idle;
                    self.pending = None;
                    return;
                }
                if segment != self.have {
                    return;
                }
                let offset = usize::from(segment) * usize::from(size);
                self.image.truncate(offset);
                self.image.extend_from_slice(data);
                self.have += 1;
                self.stats.segments.fetch_add(1, Ordering::Relaxed);
                if self.have >= count {
                    self.stop_downloading();
                    let digest = hex::encode(Sha256::digest(&self.image));
                    lock(&self.stats.images).insert(self.endpoint.clone(), digest);
                    self.stats.downloads.fetch_add(1, Ordering::Relaxed);
                    let result = if self.opts.behaviour == Lwm2mBehaviour::FailDownload {
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                        self.state = State::Idle;
                        fail_code(0x07)
                    } else {
                        self.state = State::Downloaded { target };
                        ResultCode::OK
                    };
                    let frame = Uplink::DownloadResult { result }.encode();
                    self.pending = Some(frame.clone());
                    self.notify(socket, frame).await;
                    return;
                }
                if self.opts.restart_after == Some(self.have) && !self.restarted {
                    // Power cycle: the image and the count of segments survive in flash; the registration
                    // and the observation do not. The platform notifies again once we are back.
                    self.restarted = true;
                    self.stats.restarts.fetch_add(1, Ordering::Relaxed);
                    self.reg = None;
                    self.observe = None;
                    self.pending = None;
                    return;
                }
                if !self.opts.segment_delay.is_zero() {
                    tokio::time::sleep(self.opts.segment_delay).await;
                }
                self.request_segment(socket).await;
            }
            Downlink::DownloadAck { .. } => {
                if matches!(self.state, State::Downloaded { .. } | State::Idle) {
                    self.pending = None;
                }
            }
            Downlink::Execute => {
                let State::Downloaded { target } = self.state.clone() else {
                    return;
                };
                let frame = Uplink::ExecuteAnswer {
                    result: ResultCode::OK,
                }
                .encode();
                self.pending = None;
                self.notify(socket, frame).await;
                // Reboot into the new image: register again, then report.
                self.state = State::Rebooting { target };
                self.reg = None;
                self.observe = None;
            }
            Downlink::UpgradeAck { .. } => {
                if self.pending.take().is_some() {
                    if self.opts.behaviour == Lwm2mBehaviour::FailUpgrade {
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// A Package URI was written: download it block-wise, or refuse a protocol it lacks.
    async fn start_firmware(&mut self, socket: &Link, uri: &str) {
        let scheme = if self.opts.psks.is_some() {
            "coaps://"
        } else {
            "coap://"
        };
        let token = uri
            .strip_prefix(scheme)
            .and_then(|rest| rest.split_once("/fw/"))
            .map(|(_, token)| token.as_bytes().to_vec());
        let Some(token) = token else {
            // An empty URI cancels; anything but coap:// (coaps:// on DTLS) is a protocol this device
            // lacks.
            self.fw_download = None;
            self.fw_state = 0;
            self.fw_result = if uri.is_empty() { 0 } else { 9 };
            self.fw_notify(socket, 1).await;
            return;
        };
        self.image.clear();
        self.fw_state = 1;
        self.fw_result = 0;
        let szx = (self.opts.block_size > 0).then(|| lwm2m::Block::szx_for(self.opts.block_size));
        self.fw_download = Some(FwDownload {
            token,
            next: 0,
            szx,
            request: Vec::new(),
        });
        if !self.counted {
            self.counted = true;
            self.stats.downloading(self.cell, 1);
        }
        self.fw_notify(socket, 0).await;
        self.request_block(socket).await;
    }

    async fn request_block(&mut self, socket: &Link) {
        let mid = self.next_mid();
        let Some(d) = self.fw_download.as_mut() else {
            return;
        };
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Get);
        p.header.message_id = mid;
        p.set_token(b"blk".to_vec());
        p.add_option(CoapOption::UriPath, b"fw".to_vec());
        p.add_option(CoapOption::UriPath, d.token.clone());
        // Without a size of its own the first request names none; later ones follow the platform's.
        if let Some(szx) = d.szx {
            let block = lwm2m::Block {
                num: d.next,
                more: false,
                szx,
            };
            p.add_option(CoapOption::Block2, block.encode());
        }
        let Ok(bytes) = p.to_bytes() else {
            return;
        };
        d.request.clone_from(&bytes);
        self.send(socket, &bytes).await;
    }

    /// The answer to a block request.
    async fn block_answer(&mut self, socket: &Link, code: ResponseType, packet: &Packet) {
        let Some(d) = self.fw_download.as_mut() else {
            return;
        };
        if code != ResponseType::Content {
            // Refused: the token is bad (invalid URI) or the platform cannot serve.
            self.fw_download = None;
            self.stop_downloading();
            self.fw_state = 0;
            self.fw_result = if matches!(
                code,
                ResponseType::Unauthorized | ResponseType::NotFound | ResponseType::Forbidden
            ) {
                7
            } else {
                4
            };
            self.fw_notify(socket, 1).await;
            self.fw_notify(socket, 0).await;
            return;
        }
        let Some(block) = packet
            .get_first_option(CoapOption::Block2)
            .and_then(|v| lwm2m::Block::decode(v).ok())
        else {
            return;
        };
        if block.num != d.next {
            return; // a late answer to a repeated request
        }
        d.szx = Some(block.szx);
        self.image.extend_from_slice(&packet.payload);
        self.stats.segments.fetch_add(1, Ordering::Relaxed);
        if block.more {
            d.next += 1;
            self.request_block(socket).await;
            return;
        }
        self.fw_download = None;
        self.stop_downloading();
        let digest = hex::encode(Sha256::digest(&self.image));
        lock(&self.stats.images).insert(self.endpoint.clone(), digest);
        self.stats.downloads.fetch_add(1, Ordering::Relaxed);
        if self.opts.behaviour == Lwm2mBehaviour::FailDownload {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            self.fw_state = 0;
            self.fw_result = self.opts.fail_code.unwrap_or(5);
            self.fw_notify(socket, 1).await;
        } else {
            self.fw_state = 2;
        }
        self.fw_notify(socket, 0).await;
    }

    /// `/5/0/2` executed: install, then reboot into the new firmware (or report the failure).
    async fn install_firmware(&mut self, socket: &Link) {
        self.fw_state = 3;
        self.fw_notify(socket, 0).await;
        if self.opts.behaviour == Lwm2mBehaviour::FailUpgrade {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            self.fw_state = 0;
            self.fw_result = self.opts.fail_code.unwrap_or(8);
            self.fw_notify(socket, 1).await;
            self.fw_notify(socket, 0).await;
            return;
        }
        self.firmware.clone_from(&self.opts.firmware_next);
        self.fw_state = 0;
        self.fw_result = 1;
        self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
        // The reboot: observations and the registration are gone; it registers again.
        self.fw_obs = [None, None];
        self.observe = None;
        self.reg = None;
    }

    /// Notifies the State (`which` 0) or the Update Result (1), when observed.
    async fn fw_notify(&mut self, socket: &Link, which: usize) {
        let Some(token) = self.fw_obs[which].clone() else {
            return;
        };
        self.observe_seq += 1;
        let value = if which == 0 {
            self.fw_state
        } else {
            self.fw_result
        };
        let mut p = Packet::new();
        p.header.set_type(MessageType::NonConfirmable);
        p.header.code = MessageClass::Response(ResponseType::Content);
        p.header.message_id = self.next_mid();
        p.set_token(token);
        p.set_observe_value(self.observe_seq);
        p.payload = value.to_string().into_bytes();
        if let Ok(bytes) = p.to_bytes() {
            self.send(socket, &bytes).await;
        }
    }

    fn stop_downloading(&mut self) {
        if self.counted {
            self.counted = false;
            self.stats.downloading(self.cell, -1);
        }
    }

    async fn request_segment(&mut self, socket: &Link) {
        let State::Downloading { target, .. } = &self.state else {
            return;
        };
        let frame = Uplink::SegmentRequest {
            version: *target,
            segment: self.have,
        }
        .encode();
        self.pending = Some(frame.clone());
        self.notify(socket, frame).await;
    }

    /// Sends a PCP frame as a notification of the `/19/0/0` observation.
    async fn notify(&mut self, socket: &Link, frame: Vec<u8>) {
        let Some(token) = self.observe.clone() else {
            return;
        };
        self.observe_seq += 1;
        let mut p = Packet::new();
        p.header.set_type(MessageType::NonConfirmable);
        p.header.code = MessageClass::Response(ResponseType::Content);
        p.header.message_id = self.next_mid();
        p.set_token(token);
        p.set_observe_value(self.observe_seq);
        p.add_option(
            CoapOption::ContentFormat,
            lwm2m::FORMAT_OPAQUE.to_be_bytes()[1..].to_vec(),
        );
        p.payload = frame;
        if let Ok(bytes) = p.to_bytes() {
            self.send(socket, &bytes).await;
        }
    }
}
