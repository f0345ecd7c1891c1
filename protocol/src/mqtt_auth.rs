//! IoTDA's MQTT device login: `client_id = {device_id}_0_{sig_type}_{YYYYMMDDHH}`, `username = device_id`,
//! `password = hex(HMAC-SHA256(key = YYYYMMDDHH, message = secret))` (`protocols.md` §1.1).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Whether the platform checks the client id's timestamp against its clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigType {
    /// `0`: the password is checked, the timestamp is not.
    NoTimestampCheck,
    /// `1`: the timestamp must also be close to the platform's clock.
    TimestampCheck,
}

/// A parsed IoTDA client id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientId<'a> {
    /// The device id (may itself contain `_`).
    pub device_id: &'a str,
    /// The signature type.
    pub sig_type: SigType,
    /// The UTC hour the password was made for, `YYYYMMDDHH`.
    pub timestamp: &'a str,
}

/// Why a client id was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientIdError {
    /// Not `{device_id}_0_{sig}_{YYYYMMDDHH}`.
    #[error("client id must look like {{device_id}}_0_{{0|1}}_{{YYYYMMDDHH}}")]
    Malformed,
    /// A signature type Updraft does not implement (2 = HMAC-SM3).
    #[error("unsupported signature type {0}")]
    UnsupportedSigType(String),
}

impl<'a> ClientId<'a> {
    /// Splits a client id from the right, so device ids containing `_` work.
    ///
    /// # Errors
    /// [`ClientIdError`] when the layout or signature type is wrong.
    pub fn parse(s: &'a str) -> Result<Self, ClientIdError> {
        let mut parts = s.rsplitn(4, '_');
        let (Some(timestamp), Some(sig), Some(kind), Some(device_id)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ClientIdError::Malformed);
        };
        if kind != "0"
            || device_id.is_empty()
            || timestamp.len() != 10
            || !timestamp.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(ClientIdError::Malformed);
        }
        let sig_type = match sig {
            "0" => SigType::NoTimestampCheck,
            "1" => SigType::TimestampCheck,
            other => return Err(ClientIdError::UnsupportedSigType(other.to_owned())),
        };
        Ok(Self {
            device_id,
            sig_type,
            timestamp,
        })
    }
}

/// The password a device with `secret` sends for the hour `timestamp` (`YYYYMMDDHH`).
#[must_use]
pub fn password(secret: &str, timestamp: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(timestamp.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(secret.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks `given` against the expected password in constant time.
#[must_use]
pub fn verify_password(secret: &str, timestamp: &str, given: &str) -> bool {
    let Ok(given) = hex::decode(given.trim()) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(timestamp.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(secret.as_bytes());
    mac.verify_slice(&given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_split_from_the_right() {
        let c = ClientId::parse("prod_1_node_7_0_1_2024052317").unwrap();
        assert_eq!(c.device_id, "prod_1_node_7");
        assert_eq!(c.sig_type, SigType::TimestampCheck);
        assert_eq!(c.timestamp, "2024052317");
        assert_eq!(
            ClientId::parse("D39564861q3gDa_0_0_2018072417")
                .unwrap()
                .sig_type,
            SigType::NoTimestampCheck
        );
        assert_eq!(
            ClientId::parse("dev_0_2_2018072417"),
            Err(ClientIdError::UnsupportedSigType("2".into()))
        );
        assert_eq!(
            ClientId::parse("dev_1_0_2018072417"),
            Err(ClientIdError::Malformed)
        );
        assert_eq!(
            ClientId::parse("dev_0_0_20180724"),
            Err(ClientIdError::Malformed)
        );
        assert_eq!(
            ClientId::parse("justadevice"),
            Err(ClientIdError::Malformed)
        );
    }

    #[test]
    fn password_is_hmac_keyed_by_the_timestamp() {
        // Computed independently with Python's hmac/hashlib, as Huawei's Python device SDK does.
        let p = password("12345678", "2018072417");
        assert_eq!(
            p,
            "cda20ea47ca2e8f01d9dd8aa9eb7e7937562f5be6982ea82d46c582c4a476b3f"
        );
        assert!(verify_password("12345678", "2018072417", &p));
        assert!(verify_password("12345678", "2018072417", &p.to_uppercase()));
        assert!(!verify_password("12345679", "2018072417", &p));
        assert!(!verify_password("12345678", "2018072418", &p));
        assert!(!verify_password("12345678", "2018072417", "not hex"));
    }
}
