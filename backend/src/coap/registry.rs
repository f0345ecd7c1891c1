//! The LwM2M registrations (`protocols.md` §2.1): who is registered, from where, until when, and under
//! which observe tokens their notifications come. Plain state behind one lock; the CoAP exchanges that
//! create and use it are in `lwm2m`.
//!
//! A registration is bound to the address it was made from: an update or a de-registration from
//! elsewhere is 4.04, and a device whose address changed registers again (as LwM2M clients do on 4.04),
//! so a registration id seen on the wire cannot move the device's traffic to another address.
//! Notifications are taken only under the observe tokens the platform issued to that device.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use coap_lite::ResponseType;

use super::transport::Token;
use super::{HashMap, lock};

/// Observe tokens remembered per device.
const ISSUED_OBSERVE_TOKENS: usize = 4;

/// A registered device.
#[derive(Clone, Debug)]
pub(super) struct Session {
    pub(super) device_id: String,
    pub(super) addr: SocketAddr,
    pub(super) reg_id: String,
    /// When the registration ends without an update (ms on the injected clock).
    pub(super) expires_at: i64,
    pub(super) lifetime: Duration,
    /// The token of the `/19/0/0` observation.
    pub(super) observe_token: Option<Vec<u8>>,
    /// The tokens of the `/5/0/3` (State) and `/5/0/5` (Update Result) observations.
    pub(super) firmware_tokens: [Option<Vec<u8>>; 2],
}

#[derive(Default)]
struct Sessions {
    by_device: HashMap<String, Session>,
    by_reg: HashMap<String, String>,
    by_addr: HashMap<SocketAddr, String>,
}

impl Sessions {
    fn remove(&mut self, device_id: &str) -> Option<Session> {
        let s = self.by_device.remove(device_id)?;
        self.by_reg.remove(&s.reg_id);
        if self.by_addr.get(&s.addr).is_some_and(|d| d == device_id) {
            self.by_addr.remove(&s.addr);
        }
        Some(s)
    }

    /// Records `s` (replacing its device's earlier registration); returns the registration of another
    /// device it displaced from its address.
    fn insert(&mut self, s: Session) -> Option<Session> {
        self.remove(&s.device_id);
        let displaced = match self.by_addr.get(&s.addr) {
            Some(other) => {
                let other = other.clone();
                self.remove(&other)
            }
            None => None,
        };
        self.by_reg.insert(s.reg_id.clone(), s.device_id.clone());
        self.by_addr.insert(s.addr, s.device_id.clone());
        self.by_device.insert(s.device_id.clone(), s);
        displaced
    }
}

/// Whose a notification is.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Observed {
    /// Nobody is registered at its address.
    Nobody,
    /// The device's observation of the Firmware Update object: State (0) or Update Result (1).
    Firmware { device_id: String, which: usize },
    /// The device's `/19/0/0` observation.
    Pcp { device_id: String },
    /// Registered there, but not under a token the platform issued to it.
    Stranger { device_id: String },
}

/// The registrations.
#[derive(Default)]
pub(super) struct Registry {
    sessions: Mutex<Sessions>,
    /// The `/19/0/0` observe tokens last issued to each device, newest last.
    observe_tokens: Mutex<HashMap<String, VecDeque<Token>>>,
}

impl Registry {
    /// Records a registration (replacing the device's earlier one). A registration of another device
    /// at the same address ends: that device is no longer there (a NAT gave its address and port to
    /// this one), and what is meant for it must not reach this one. Returns that device.
    pub(super) fn insert(&self, session: Session) -> Option<String> {
        lock(&self.sessions)
            .insert(session)
            .map(|displaced| displaced.device_id)
    }

    /// The device's registration.
    pub(super) fn session(&self, device_id: &str) -> Option<Session> {
        lock(&self.sessions).by_device.get(device_id).cloned()
    }

    /// The registration named `reg_id`.
    pub(super) fn by_reg(&self, reg_id: &str) -> Option<Session> {
        let sessions = lock(&self.sessions);
        sessions
            .by_reg
            .get(reg_id)
            .and_then(|d| sessions.by_device.get(d))
            .cloned()
    }

    /// Devices registered now.
    pub(super) fn len(&self) -> usize {
        lock(&self.sessions).by_device.len()
    }

    /// The devices registered now.
    pub(super) fn devices(&self) -> Vec<String> {
        lock(&self.sessions).by_device.keys().cloned().collect()
    }

    /// The addresses registrations are at.
    pub(super) fn addrs(&self) -> HashSet<SocketAddr> {
        lock(&self.sessions).by_addr.keys().copied().collect()
    }

    /// `POST /rd/{id}`: refreshes the registration's lifetime (`lifetime` replaces it when given), from
    /// the registration's address only.
    pub(super) fn update(
        &self,
        reg_id: &str,
        lifetime: Option<u32>,
        addr: SocketAddr,
        now: domain::Timestamp,
    ) -> ResponseType {
        let mut sessions = lock(&self.sessions);
        let Some(device_id) = sessions.by_reg.get(reg_id).cloned() else {
            return ResponseType::NotFound;
        };
        let Some(s) = sessions
            .by_device
            .get_mut(&device_id)
            .filter(|s| s.addr == addr)
        else {
            tracing::debug!(%addr, reg_id, "LwM2M update from another address than the registration's");
            return ResponseType::NotFound;
        };
        if let Some(lt) = lifetime {
            s.lifetime = Duration::from_secs(u64::from(lt));
        }
        s.expires_at = now.plus(s.lifetime).as_millis();
        ResponseType::Changed
    }

    /// `DELETE /rd/{id}`, from the registration's address only: the registration removed, or `None`.
    pub(super) fn deregister(&self, reg_id: &str, addr: SocketAddr) -> Option<Session> {
        let mut sessions = lock(&self.sessions);
        let device_id = sessions.by_reg.get(reg_id).cloned()?;
        if sessions
            .by_device
            .get(&device_id)
            .is_none_or(|s| s.addr != addr)
        {
            return None;
        }
        sessions.remove(&device_id)
    }

    /// Removes the registrations whose lifetime passed by `now` (ms); returns their devices.
    pub(super) fn expire(&self, now: i64) -> Vec<String> {
        let mut sessions = lock(&self.sessions);
        let ids: Vec<String> = sessions
            .by_device
            .values()
            .filter(|s| s.expires_at <= now)
            .map(|s| s.device_id.clone())
            .collect();
        for id in &ids {
            sessions.remove(id);
        }
        ids
    }

    /// A fresh `/19/0/0` observe token for the device, remembered before it is sent: on a lossy link the
    /// device may take up an observation even if its answer never arrives (or a later registration's
    /// observation crosses it), and its notifications under it are then still the platform's own.
    pub(super) fn issue_observe_token(&self, device_id: &str) -> Token {
        let token: Token = rand::random();
        let mut issued = lock(&self.observe_tokens);
        let tokens = issued.entry(device_id.to_owned()).or_default();
        if tokens.len() >= ISSUED_OBSERVE_TOKENS {
            tokens.pop_front();
        }
        tokens.push_back(token);
        token
    }

    /// Records the token of an accepted observation, if registration `reg_id` is still the device's:
    /// `/19/0/0` (`which` `None`), or the Firmware Update object's State (0) or Update Result (1).
    pub(super) fn observing(
        &self,
        device_id: &str,
        reg_id: &str,
        which: Option<usize>,
        token: Vec<u8>,
    ) {
        let mut sessions = lock(&self.sessions);
        let Some(s) = sessions
            .by_device
            .get_mut(device_id)
            .filter(|s| s.reg_id == reg_id)
        else {
            return;
        };
        match which {
            None => s.observe_token = Some(token),
            Some(w) => {
                if let Some(slot) = s.firmware_tokens.get_mut(w) {
                    *slot = Some(token);
                }
            }
        }
    }

    /// Whose a notification from `addr` under `token` is. A `/19/0/0` token issued to the device whose
    /// answer was lost is taken up as the current one.
    pub(super) fn observed(&self, addr: SocketAddr, token: &[u8]) -> Observed {
        let mut sessions = lock(&self.sessions);
        let Some(device_id) = sessions.by_addr.get(&addr).cloned() else {
            return Observed::Nobody;
        };
        let firmware = sessions.by_device.get(&device_id).and_then(|s| {
            s.firmware_tokens
                .iter()
                .position(|t| t.as_deref() == Some(token))
        });
        if let Some(which) = firmware {
            return Observed::Firmware { device_id, which };
        }
        let current = sessions
            .by_device
            .get(&device_id)
            .is_some_and(|s| s.observe_token.as_deref() == Some(token));
        let issued = !current
            && Token::try_from(token).is_ok_and(|t| {
                lock(&self.observe_tokens)
                    .get(&device_id)
                    .is_some_and(|tokens| tokens.contains(&t))
            });
        if issued && let Some(s) = sessions.by_device.get_mut(&device_id) {
            // An observation of ours whose answer was lost: take it up.
            s.observe_token = Some(token.to_vec());
        }
        if current || issued {
            Observed::Pcp { device_id }
        } else {
            Observed::Stranger { device_id }
        }
    }
}

#[cfg(test)]
mod tests {
    use domain::Timestamp;

    use super::*;

    fn session(device: &str, addr: &str, reg: &str) -> Session {
        Session {
            device_id: device.to_owned(),
            addr: addr.parse().unwrap(),
            reg_id: reg.to_owned(),
            expires_at: 1_000,
            lifetime: Duration::from_secs(60),
            observe_token: None,
            firmware_tokens: [None, None],
        }
    }

    #[test]
    fn a_registration_is_found_by_device_id_and_address() {
        let r = Registry::default();
        r.insert(session("d1", "10.0.0.1:5683", "r1"));
        assert_eq!(r.session("d1").unwrap().reg_id, "r1");
        assert_eq!(r.by_reg("r1").unwrap().device_id, "d1");
        assert_eq!(r.len(), 1);
        // Registering again replaces the earlier registration and its address.
        r.insert(session("d1", "10.0.0.2:5683", "r2"));
        assert!(r.by_reg("r1").is_none());
        assert_eq!(r.addrs(), HashSet::from(["10.0.0.2:5683".parse().unwrap()]));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_registration_from_another_devices_address_ends_that_devices_registration() {
        let r = Registry::default();
        assert_eq!(r.insert(session("d1", "10.0.0.1:5683", "r1")), None);
        assert_eq!(
            r.insert(session("d1", "10.0.0.1:5683", "r2")),
            None,
            "itself again"
        );
        // d2 got d1's NAT address and port: d1 is not there any more.
        assert_eq!(
            r.insert(session("d2", "10.0.0.1:5683", "r3")),
            Some("d1".to_owned())
        );
        assert!(r.session("d1").is_none() && r.by_reg("r2").is_none());
        assert_eq!(r.session("d2").unwrap().reg_id, "r3");
        assert_eq!(r.len(), 1);
        // Another address displaces nobody.
        assert_eq!(r.insert(session("d1", "10.0.0.9:5683", "r4")), None);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn updates_and_deregistrations_count_only_from_the_registrations_address() {
        let r = Registry::default();
        r.insert(session("d1", "10.0.0.1:5683", "r1"));
        let home = "10.0.0.1:5683".parse().unwrap();
        let elsewhere = "10.0.0.9:5683".parse().unwrap();
        let now = Timestamp::from_millis(5_000);
        assert_eq!(
            r.update("r1", Some(120), elsewhere, now),
            ResponseType::NotFound
        );
        assert_eq!(r.update("nope", None, home, now), ResponseType::NotFound);
        assert_eq!(r.update("r1", Some(120), home, now), ResponseType::Changed);
        assert_eq!(r.session("d1").unwrap().expires_at, 125_000);
        assert!(r.deregister("r1", elsewhere).is_none());
        assert_eq!(r.deregister("r1", home).unwrap().device_id, "d1");
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn registrations_past_their_lifetime_expire() {
        let r = Registry::default();
        r.insert(session("d1", "10.0.0.1:5683", "r1"));
        let mut later = session("d2", "10.0.0.2:5683", "r2");
        later.expires_at = 9_000;
        r.insert(later);
        assert_eq!(r.expire(1_000), vec!["d1".to_owned()]);
        assert_eq!(r.len(), 1);
        assert!(r.expire(1_000).is_empty());
    }

    #[test]
    fn notifications_count_only_under_tokens_issued_to_the_device() {
        let r = Registry::default();
        let addr: SocketAddr = "10.0.0.1:5683".parse().unwrap();
        r.insert(session("d1", "10.0.0.1:5683", "r1"));
        assert_eq!(
            r.observed("10.0.0.7:5683".parse().unwrap(), &[1; 8]),
            Observed::Nobody
        );
        assert_eq!(
            r.observed(addr, &[1; 8]),
            Observed::Stranger {
                device_id: "d1".to_owned()
            }
        );
        // An issued token whose answer was lost is taken up...
        let lost = r.issue_observe_token("d1");
        let current = r.issue_observe_token("d1");
        r.observing("d1", "r1", None, current.to_vec());
        let pcp = Observed::Pcp {
            device_id: "d1".to_owned(),
        };
        assert_eq!(r.observed(addr, &current), pcp);
        assert_eq!(r.observed(addr, &lost), pcp);
        assert_eq!(r.session("d1").unwrap().observe_token, Some(lost.to_vec()));
        // ...but only the last few are remembered.
        for _ in 0..ISSUED_OBSERVE_TOKENS {
            r.issue_observe_token("d1");
        }
        assert_eq!(
            r.observed(addr, &current),
            Observed::Stranger {
                device_id: "d1".to_owned()
            }
        );
        // Firmware observations, and none for a registration that was replaced.
        r.observing("d1", "r1", Some(1), vec![5; 8]);
        r.observing("d1", "old", Some(0), vec![6; 8]);
        assert_eq!(
            r.observed(addr, &[5; 8]),
            Observed::Firmware {
                device_id: "d1".to_owned(),
                which: 1
            }
        );
        assert!(matches!(
            r.observed(addr, &[6; 8]),
            Observed::Stranger { .. }
        ));
    }
}
