//! The LwM2M layer: the registration interface (`/rd`), the observations (`/19/0/0` for PCP, `/5/0/3`
//! and `/5/0/5` for the Firmware Update object) and their notifications, and the reads, writes and
//! executes the driver asks for (`/4/0`, `/3/0/3`, `/5/0/1`, `/5/0/2`).

use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::{
    CoapOption, ContentFormat, MessageClass, MessageType, Packet, RequestType, ResponseType,
};
use protocol::lwm2m::{self, RegisterParams, Registration, RequestError, connectivity};

use super::registry::{Observed, Session};
use super::transport::reset;
use super::{CoapEndpoint, DeviceEvent};

impl CoapEndpoint {
    /// A request to the registration interface, answered; a new registration is then observed.
    /// `secure`: the device the DTLS session it came over authenticated.
    pub(super) async fn registration(
        &self,
        packet: Packet,
        addr: SocketAddr,
        secure: Option<String>,
    ) {
        let (code, location) = match lwm2m::registration(&packet) {
            Ok(Registration::Register { endpoint, params }) => {
                self.register(&endpoint, &params, addr, secure).await
            }
            Ok(Registration::Update { id, params }) => {
                let now = self.inner.state.clock.now();
                let code = self.inner.registry.update(&id, params.lifetime, addr, now);
                (code, None)
            }
            Ok(Registration::Deregister { id }) => (self.deregister(&id, addr), None),
            Err(RequestError::NotFound) => (ResponseType::NotFound, None),
            Err(e) => {
                tracing::debug!(%addr, error.message = %e, "LwM2M registration request refused");
                (ResponseType::BadRequest, None)
            }
        };
        let transport = &self.inner.transport;
        let mut response = transport.response_for(&packet, code, addr);
        if let Some(id) = &location {
            response.add_option(CoapOption::LocationPath, b"rd".to_vec());
            response.add_option(CoapOption::LocationPath, id.as_bytes().to_vec());
        }
        transport.reply(addr, &packet, &response);
        if let Some(reg_id) = location {
            let this = self.clone();
            tokio::spawn(async move { this.observe_and_announce(reg_id).await });
        }
    }

    /// `POST /rd?ep=...`: 2.01 with a location, or 4.03 for an unknown or frozen endpoint, for a device
    /// that must use DTLS (`secure_access`) in plaintext, and over DTLS for another device than the
    /// session's.
    /// Sets `updraft_lwm2m_registrations` to the registrations held.
    pub(super) fn count_registrations(&self) {
        let n = i64::try_from(self.inner.registry.len()).unwrap_or(i64::MAX);
        self.inner.state.metrics.lwm2m_registrations.set(n);
    }

    /// Whether `device` may register over DTLS only.
    fn needs_dtls(&self, device: &crate::storage::entity::devices::Model) -> bool {
        let settings = &self.inner.settings;
        device.secure_access
            || settings.require_dtls
            || settings.require_dtls_products.contains(&device.product_id)
    }

    async fn register(
        &self,
        endpoint: &str,
        params: &RegisterParams,
        addr: SocketAddr,
        secure: Option<String>,
    ) -> (ResponseType, Option<String>) {
        let device = match crate::service::devices::find_lwm2m(&self.inner.state, endpoint).await {
            Ok(Some(d)) if secure.as_ref().is_some_and(|s| *s != d.id) => {
                // A session speaks for its own device only.
                tracing::warn!(%addr, endpoint, session_device = ?secure, "LwM2M registration refused: the endpoint is not the DTLS session's device");
                return (ResponseType::Forbidden, None);
            }
            Ok(Some(d)) if secure.is_none() && self.needs_dtls(&d) => {
                // The device must come over DTLS (its `secure_access`, its product's or every
                // device's setting); a plain registration of it is refused, so no one can take its
                // place on plain CoAP.
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
        let displaced = self.inner.registry.insert(Session {
            device_id: device.id.clone(),
            addr,
            reg_id: reg_id.clone(),
            expires_at: now.plus(lifetime).as_millis(),
            lifetime,
            observe_token: None,
            firmware_tokens: [None, None],
        });
        if let Some(gone) = displaced {
            tracing::info!(device_id = %gone, %addr, by = %device.id, "LwM2M: another device registered from this device's address; its registration ended");
            self.event(&gone, DeviceEvent::Offline);
        }
        self.count_registrations();
        tracing::debug!(device_id = %device.id, endpoint, %addr, "LwM2M registered");
        (ResponseType::Created, Some(reg_id))
    }

    /// `DELETE /rd/{id}` (from the registration's address only, like an update).
    fn deregister(&self, reg_id: &str, addr: SocketAddr) -> ResponseType {
        match self.inner.registry.deregister(reg_id, addr) {
            Some(s) => {
                self.count_registrations();
                self.event(&s.device_id, DeviceEvent::Offline);
                ResponseType::Deleted
            }
            None => ResponseType::NotFound,
        }
    }

    /// After a registration was answered: observe `/19/0/0`, then tell the driver the device is here (so
    /// its answers to what the driver sends can arrive).
    async fn observe_and_announce(&self, reg_id: String) {
        let Some(session) = self.inner.registry.by_reg(&reg_id) else {
            return;
        };
        let mut observe = Packet::new();
        observe.header.code = MessageClass::Request(RequestType::Get);
        observe.add_option(CoapOption::Observe, Vec::new());
        for seg in ["19", "0", "0"] {
            observe.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        observe.add_option(CoapOption::Accept, format_bytes(lwm2m::FORMAT_OPAQUE));
        let token = self.inner.registry.issue_observe_token(&session.device_id);
        let answer = self
            .inner
            .transport
            .exchange_with(session.addr, observe, token)
            .await;
        let accepted = answer.filter(|a| {
            matches!(
                a.header.code,
                MessageClass::Response(ResponseType::Content | ResponseType::Changed)
            )
        });
        match accepted {
            Some(answer) => self.inner.registry.observing(
                &session.device_id,
                &reg_id,
                None,
                answer.get_token().to_vec(),
            ),
            None => {
                tracing::info!(device_id = %session.device_id, "LwM2M: observing /19/0/0 failed")
            }
        }
        // Not if the registration ended meanwhile (deregistered, replaced, its DTLS session closed):
        // its end was announced already.
        if self.inner.registry.by_reg(&reg_id).is_some() {
            self.event(&session.device_id, DeviceEvent::Online);
        }
    }

    /// A notification: a PCP message on `/19/0/0`, or a Firmware Update object value.
    pub(super) fn notification(&self, packet: Packet, addr: SocketAddr) {
        let device_id = match self.inner.registry.observed(addr, packet.get_token()) {
            Observed::Nobody => {
                // Nobody registered there (Updraft restarted, or the device moved): the device cancels
                // its observation on a reset and registers again.
                if packet.header.get_type() == MessageType::NonConfirmable {
                    self.send(&reset(packet.header.message_id), addr);
                }
                return;
            }
            Observed::Firmware { device_id, which } => {
                self.firmware_notification(&device_id, which, &packet);
                return;
            }
            Observed::Stranger { device_id } => {
                // Not an observation of ours (one from before a restart, or a forgery from the device's
                // address): a reset makes a real device cancel it; nothing it says is taken.
                tracing::debug!(device_id, %addr, "LwM2M: notification with an unknown token, reset");
                self.send(&reset(packet.header.message_id), addr);
                return;
            }
            Observed::Pcp { device_id } => device_id,
        };
        if matches!(
            packet.header.code,
            MessageClass::Response(ResponseType::Content | ResponseType::Changed)
        ) && !packet.payload.is_empty()
        {
            self.uplink(&device_id, addr, &packet.payload);
        }
    }

    /// Reads `path` (`/4/0`, or `/4/0/8` named by `single`); the integer resources of the answer, in
    /// whatever format the device chose (OMA-TLV, either number, plain text or SenML JSON). No Accept
    /// option is sent: clients that do not know a content format number drop the whole request.
    pub(super) async fn read(
        &self,
        device_id: &str,
        path: &[&str],
        single: Option<u16>,
    ) -> Option<Vec<(u16, i64)>> {
        let session = self.inner.registry.session(device_id)?;
        let mut packet = Packet::new();
        packet.header.code = MessageClass::Request(RequestType::Get);
        for seg in path {
            packet.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        let answer = self.inner.transport.exchange(session.addr, packet).await?;
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

    /// The radio coverage (`/4/0`).
    pub(super) async fn coverage(&self, device_id: &str) -> DeviceEvent {
        match self.read(device_id, &["4", "0"], None).await {
            Some(values) => {
                let get = |id: u16| values.iter().find(|(r, _)| *r == id).map(|(_, v)| *v);
                DeviceEvent::Coverage {
                    rsrp: get(connectivity::RSRP).and_then(|v| i32::try_from(v).ok()),
                    sinr: get(connectivity::SINR).and_then(|v| i32::try_from(v).ok()),
                    cell: get(connectivity::CELL_ID).and_then(|v| u32::try_from(v).ok()),
                }
            }
            None => DeviceEvent::CoverageFailed,
        }
    }

    /// The cell id (`/4/0/8`).
    pub(super) async fn cell_id(&self, device_id: &str) -> DeviceEvent {
        let cell = self
            .read(device_id, &["4", "0", "8"], Some(connectivity::CELL_ID))
            .await
            .and_then(|values| {
                values
                    .iter()
                    .find(|(r, _)| *r == connectivity::CELL_ID)
                    .and_then(|(_, v)| u32::try_from(*v).ok())
            });
        cell.map_or(DeviceEvent::CellIdFailed, DeviceEvent::CellId)
    }

    /// Writes the Package URI, then observes the State and the Update Result.
    pub(super) async fn write_uri_and_observe(&self, device_id: &str, uri: String) {
        let Some(session) = self.inner.registry.session(device_id) else {
            return;
        };
        let transport = &self.inner.transport;
        let mut write = Packet::new();
        write.header.code = MessageClass::Request(RequestType::Put);
        for seg in ["5", "0", "1"] {
            write.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        write.set_content_format(ContentFormat::TextPlain);
        write.payload = uri.into_bytes();
        match transport.exchange(session.addr, write).await {
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
            let Some(answer) = transport.exchange(session.addr, observe).await else {
                tracing::info!(device_id, resource, "LwM2M: observing /5/0 failed");
                continue;
            };
            if answer.header.code != MessageClass::Response(ResponseType::Content) {
                tracing::info!(device_id, resource, code = %answer.header.code, "LwM2M: observe of /5/0 refused");
                continue;
            }
            self.inner.registry.observing(
                device_id,
                &session.reg_id,
                Some(which),
                answer.get_token().to_vec(),
            );
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
    pub(super) async fn read_string(&self, device_id: &str) -> Option<String> {
        let session = self.inner.registry.session(device_id)?;
        let mut packet = Packet::new();
        packet.header.code = MessageClass::Request(RequestType::Get);
        for seg in ["3", "0", "3"] {
            packet.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        let answer = self.inner.transport.exchange(session.addr, packet).await?;
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

    /// Executes Update (`/5/0/2`).
    pub(super) async fn execute(&self, device_id: &str) {
        let Some(session) = self.inner.registry.session(device_id) else {
            return;
        };
        let mut packet = Packet::new();
        packet.header.code = MessageClass::Request(RequestType::Post);
        for seg in ["5", "0", "2"] {
            packet.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        match self.inner.transport.exchange(session.addr, packet).await {
            Some(a) if a.header.code == MessageClass::Response(ResponseType::Changed) => {}
            Some(a) => {
                tracing::info!(device_id, code = %a.header.code, "LwM2M: execute /5/0/2 refused")
            }
            None => tracing::info!(device_id, "LwM2M: execute /5/0/2 not answered"),
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

/// A message's Content-Format (plain text when absent).
fn content_format(packet: &Packet) -> u16 {
    packet
        .get_first_option(CoapOption::ContentFormat)
        .map_or(lwm2m::FORMAT_TEXT, |v| {
            v.iter().fold(0u16, |acc, b| (acc << 8) | u16::from(*b))
        })
}
