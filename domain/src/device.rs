//! Devices: node ids, secrets, protocols and online status.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// The device's own identifier (IMEI, MAC, serial): 1-64 characters of `[A-Za-z0-9_-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// Validates a node id.
    ///
    /// # Errors
    /// [`ValidationError`] for `node_id`.
    pub fn parse(s: impl Into<String>) -> Result<Self, ValidationError> {
        let s = s.into();
        if s.is_empty() || s.len() > 64 {
            return Err(ValidationError::new(
                "node_id",
                "must be 1 to 64 characters",
            ));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ValidationError::new(
                "node_id",
                "may contain only letters, digits, '_' and '-'",
            ));
        }
        Ok(Self(s))
    }

    /// The node id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for NodeId {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<NodeId> for String {
    fn from(n: NodeId) -> Self {
        n.0
    }
}

/// Checks a device secret: 8-32 characters of `[A-Za-z0-9_-]`; hexadecimal only for LwM2M (NB-IoT) devices.
///
/// The secret itself is never kept in a domain value: callers move it straight into encrypted storage.
///
/// # Errors
/// [`ValidationError`] for `secret`.
pub fn check_secret(secret: &str, protocol: ProtocolType) -> Result<(), ValidationError> {
    if !(8..=32).contains(&secret.len()) {
        return Err(ValidationError::new("secret", "must be 8 to 32 characters"));
    }
    if !secret
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(ValidationError::new(
            "secret",
            "may contain only letters, digits, '_' and '-'",
        ));
    }
    if protocol == ProtocolType::CoAP && !secret.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ValidationError::new(
            "secret",
            "must be hexadecimal for LwM2M/CoAP devices",
        ));
    }
    Ok(())
}

macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident, $field:literal { $($(#[$vdoc:meta])* $variant:ident = $wire:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $wire)] $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The spelling on the wire and in the database.
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $wire),+ }
            }

            /// Parses the wire spelling.
            ///
            /// # Errors
            /// [`ValidationError`] listing the accepted values.
            pub fn parse(s: &str) -> Result<Self, ValidationError> {
                match s {
                    $($wire => Ok(Self::$variant),)+
                    _ => Err(ValidationError::new($field, format!(
                        "must be one of {}", [$($wire),+].join(", ")))),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use wire_enum;

wire_enum!(
    /// A product's protocol (`protocol_type`). Updraft upgrades `MQTT` devices with the `$ota` flow and
    /// `CoAP` (LwM2M) devices with PCP or Object 5; the other values are stored and echoed for IoTDA parity.
    ProtocolType, "protocol_type" {
        /// MQTT (IoTDA's `$oc/devices/...` topics).
        Mqtt = "MQTT",
        /// LwM2M over CoAP (NB-IoT class).
        CoAP = "CoAP",
        /// HTTP.
        Http = "HTTP",
        /// HTTPS.
        Https = "HTTPS",
        /// Modbus.
        Modbus = "Modbus",
        /// ONVIF.
        Onvif = "ONVIF",
        /// OPC-UA.
        OpcUa = "OPC-UA",
        /// OPC-DA.
        OpcDa = "OPC-DA",
        /// Anything else.
        Other = "Other",
        /// Raw TCP.
        Tcp = "TCP",
        /// Raw UDP.
        Udp = "UDP",
    }
);

wire_enum!(
    /// A device's connection status as IoTDA reports it (`status`).
    DeviceStatus, "status" {
        /// Connected now.
        Online = "ONLINE",
        /// Was connected, is not now.
        Offline = "OFFLINE",
        /// Connected but misbehaving.
        Abnormal = "ABNORMAL",
        /// Registered, never connected.
        Inactive = "INACTIVE",
        /// Refused connection by an operator.
        Frozen = "FROZEN",
    }
);

wire_enum!(
    /// A product's payload format (`data_format`).
    DataFormat, "data_format" {
        /// JSON payloads.
        Json = "json",
        /// Binary payloads (typical for NB-IoT).
        Binary = "binary",
    }
);

wire_enum!(
    /// How a product's LwM2M devices fetch firmware named in the Firmware Update object's Package URI
    /// (`firmware_download`, an Updraft extension).
    FirmwareDownload, "firmware_download" {
        /// CoAP block-wise from Updraft's CoAP endpoint (`coap://.../fw/<token>`); any LwM2M client can.
        Coap = "coap",
        /// HTTPS from Updraft's download endpoint, the token in the URL path.
        Https = "https",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_follow_the_protocol_rules() {
        assert!(check_secret("abcdefgh", ProtocolType::Mqtt).is_ok());
        assert!(check_secret("abcdefg", ProtocolType::Mqtt).is_err());
        assert!(check_secret("abcdefgh!", ProtocolType::Mqtt).is_err());
        assert!(check_secret("abcdefgh", ProtocolType::CoAP).is_err());
        assert!(check_secret("0123abcdef", ProtocolType::CoAP).is_ok());
    }

    #[test]
    fn wire_enums_round_trip_and_explain_failures() {
        for p in ProtocolType::ALL {
            assert_eq!(ProtocolType::parse(p.as_str()).unwrap(), *p);
        }
        let e = DeviceStatus::parse("online").unwrap_err();
        assert!(e.message.contains("ONLINE"), "{e}");
        assert_eq!(e.field, "status");
    }

    #[test]
    fn node_ids_are_checked() {
        assert!(NodeId::parse("863703030000001").is_ok());
        assert!(NodeId::parse("").is_err());
        assert!(NodeId::parse("a:b").is_err());
    }
}
