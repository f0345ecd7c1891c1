//! IoTDA's MQTT `$ota` events (`protocols.md` §1.2-§1.8): topics, the uplink events devices send
//! (`version_report`, `upgrade_progress_report`), and the downlink events the platform sends
//! (`version_query`, `software_upgrade` / `firmware_upgrade`).
//!
//! Uplink parsing is tolerant, as real clients require: `event_time` in any format or absent,
//! `"event_id": null`, pretty-printed JSON, unknown keys, services other than `$ota` in the same message,
//! numbers sent as strings. Garbage is an [`UplinkError`], never a panic.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The service id of OTA events.
pub const OTA_SERVICE: &str = "$ota";

/// `$oc/devices/{device_id}/sys/events/down`: where the platform publishes to a device.
#[must_use]
pub fn down_topic(device_id: &str) -> String {
    format!("$oc/devices/{device_id}/sys/events/down")
}

/// The device id of an uplink topic `$oc/devices/{device_id}/sys/events/up`, if it is one.
#[must_use]
pub fn up_topic_device(topic: &str) -> Option<&str> {
    let id = topic
        .strip_prefix("$oc/devices/")?
        .strip_suffix("/sys/events/up")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// One event a device sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uplink {
    /// `version_report`.
    VersionReport {
        /// `sw_version`.
        sw_version: Option<String>,
        /// `fw_version`.
        fw_version: Option<String>,
    },
    /// `upgrade_progress_report`.
    Progress {
        /// `result_code`.
        result_code: i64,
        /// `progress` (0-100), when sent.
        progress: Option<i64>,
        /// `version`: the device's current version.
        version: Option<String>,
        /// `description`.
        description: Option<String>,
    },
    /// `$sdk_info` / `sdk_info_report`: the device SDK's version and the device's versions (the Python
    /// SDK sends it on connect).
    SdkInfo {
        /// `device_sdk_version`.
        device_sdk_version: Option<String>,
        /// `sw_version`.
        sw_version: Option<String>,
        /// `fw_version`.
        fw_version: Option<String>,
    },
    /// Anything else (`$log`, other `$ota` event types): accepted and ignored.
    Other {
        /// `service_id`.
        service_id: String,
        /// `event_type`.
        event_type: String,
    },
}

/// Why an uplink message was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UplinkError {
    /// Not JSON.
    #[error("not JSON: {0}")]
    Json(String),
    /// JSON without a `services` array.
    #[error("no \"services\" array")]
    NoServices,
    /// A known event with a required field missing or of the wrong type.
    #[error("{event}: {problem}")]
    Field {
        /// The event type.
        event: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// One uplink message: whose events they are, and the events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkMessage {
    /// `object_device_id`: the device the events are about when it is not the sender (a gateway
    /// reporting for a child device); `None` when absent or empty.
    pub object_device_id: Option<String>,
    /// One entry per service event, in order.
    pub events: Vec<Uplink>,
}

/// Parses an uplink message: one entry per service event, in order.
///
/// # Errors
/// [`UplinkError`] for anything that is not an events envelope, or an OTA event without its required
/// fields.
pub fn parse_uplink(payload: &[u8]) -> Result<Vec<Uplink>, UplinkError> {
    parse_uplink_message(payload).map(|m| m.events)
}

/// [`parse_uplink`], with the message's `object_device_id`.
///
/// # Errors
/// As [`parse_uplink`].
pub fn parse_uplink_message(payload: &[u8]) -> Result<UplinkMessage, UplinkError> {
    let root: Value =
        serde_json::from_slice(payload).map_err(|e| UplinkError::Json(e.to_string()))?;
    let services = root
        .get("services")
        .and_then(Value::as_array)
        .ok_or(UplinkError::NoServices)?;
    Ok(UplinkMessage {
        object_device_id: root
            .get("object_device_id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_owned),
        events: services
            .iter()
            .map(parse_service)
            .collect::<Result<_, _>>()?,
    })
}

/// The service id of the device SDK's information report.
pub const SDK_INFO_SERVICE: &str = "$sdk_info";

fn parse_service(service: &Value) -> Result<Uplink, UplinkError> {
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let service_id = text(service, "service_id").unwrap_or_default();
    let event_type = text(service, "event_type").unwrap_or_default();
    let paras = service.get("paras").unwrap_or(&Value::Null);
    if service_id == SDK_INFO_SERVICE && event_type == "sdk_info_report" {
        return Ok(Uplink::SdkInfo {
            device_sdk_version: text(paras, "device_sdk_version"),
            sw_version: text(paras, "sw_version"),
            fw_version: text(paras, "fw_version"),
        });
    }
    if service_id != OTA_SERVICE {
        return Ok(Uplink::Other {
            service_id,
            event_type,
        });
    }
    match event_type.as_str() {
        "version_report" => Ok(Uplink::VersionReport {
            sw_version: text(paras, "sw_version"),
            fw_version: text(paras, "fw_version"),
        }),
        "upgrade_progress_report" => {
            let field = |problem: String| UplinkError::Field {
                event: "upgrade_progress_report",
                problem,
            };
            let result_code = integer(paras.get("result_code"))
                .ok_or_else(|| field("result_code must be an integer".to_owned()))?;
            let progress = match paras.get("progress") {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    integer(Some(v))
                        .ok_or_else(|| field("progress must be an integer".to_owned()))?,
                ),
            };
            Ok(Uplink::Progress {
                result_code,
                progress,
                version: text(paras, "version"),
                description: text(paras, "description"),
            })
        }
        _ => Ok(Uplink::Other {
            service_id,
            event_type,
        }),
    }
}

/// An integer, or a string holding one (some clients quote numbers).
fn integer(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[derive(Serialize)]
struct Envelope<'a, P: Serialize> {
    object_device_id: &'a str,
    services: [Service<'a, P>; 1],
}

#[derive(Serialize)]
struct Service<'a, P: Serialize> {
    service_id: &'static str,
    event_type: &'a str,
    event_time: &'a str,
    paras: P,
}

fn envelope<P: Serialize>(
    device_id: &str,
    event_type: &str,
    event_time: &str,
    paras: P,
) -> Vec<u8> {
    let message = Envelope {
        object_device_id: device_id,
        services: [Service {
            service_id: OTA_SERVICE,
            event_type,
            event_time,
            paras,
        }],
    };
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_vec(&message).unwrap_or_default()
}

/// What a task adds to the events it sends a device (`protocols.md` §1.4, §1.6): its id, the number of
/// devices behind the gateway it upgrades (gateway mode), and the task's `task_ext_info`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// The batch task id.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub task_id: Option<String>,
    /// Gateway mode: how many of the gateway's child devices the task upgrades.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sub_device_count: Option<u64>,
    /// The task's `task_ext_info`, as given at creation.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub task_ext_info: Option<serde_json::Value>,
}

/// `version_query` for `device_id`; `event_time` in IoTDA's compact form (`20151212T121212Z`). Its
/// `paras` carry `info`'s fields that are set (none: `{}`).
#[must_use]
pub fn version_query(device_id: &str, event_time: &str, info: &TaskInfo) -> Vec<u8> {
    envelope(device_id, "version_query", event_time, info)
}

/// The `paras` of `software_upgrade` / `firmware_upgrade` (`protocols.md` §1.6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeNotice {
    /// The package version.
    pub version: String,
    /// The download URL (with an explicit port: Huawei's C SDK requires one).
    pub url: String,
    /// Package size in bytes.
    pub file_size: u64,
    /// The file name.
    pub file_name: String,
    /// The bearer token for `url`.
    pub access_token: String,
    /// Token validity in seconds.
    pub expires: u64,
    /// SHA-256 of the package, lowercase hex.
    pub sign: String,
    /// The package's custom information, when it has any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub custom_info: Option<String>,
    /// The task's id, `sub_device_count` and `task_ext_info`.
    #[serde(flatten)]
    pub task: TaskInfo,
}

/// Which upgrade event to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpgradeKind {
    /// `software_upgrade`.
    Software,
    /// `firmware_upgrade`.
    Firmware,
}

/// `software_upgrade` or `firmware_upgrade` for `device_id`.
#[must_use]
pub fn upgrade_event(
    device_id: &str,
    event_time: &str,
    kind: UpgradeKind,
    notice: &UpgradeNotice,
) -> Vec<u8> {
    let event_type = match kind {
        UpgradeKind::Software => "software_upgrade",
        UpgradeKind::Firmware => "firmware_upgrade",
    };
    envelope(device_id, event_type, event_time, notice)
}

/// The `paras` of `software_upgrade_v2` / `firmware_upgrade_v2` (`protocols.md` §1.7): the package is
/// fetched from a presigned object-store URL, with no token and no `Authorization` header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeNoticeV2 {
    /// The package version.
    pub version: String,
    /// The presigned download URL.
    pub url: String,
    /// Package size in bytes.
    pub file_size: u64,
    /// The file name.
    pub file_name: String,
    /// URL validity in seconds.
    pub expires: u64,
    /// SHA-256 of the package, lowercase hex.
    pub sign: String,
    /// The package's custom information, when it has any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub custom_info: Option<String>,
    /// The task's id, `sub_device_count` and `task_ext_info`.
    #[serde(flatten)]
    pub task: TaskInfo,
}

/// `software_upgrade_v2` or `firmware_upgrade_v2` for `device_id`.
#[must_use]
pub fn upgrade_event_v2(
    device_id: &str,
    event_time: &str,
    kind: UpgradeKind,
    notice: &UpgradeNoticeV2,
) -> Vec<u8> {
    let event_type = match kind {
        UpgradeKind::Software => "software_upgrade_v2",
        UpgradeKind::Firmware => "firmware_upgrade_v2",
    };
    envelope(device_id, event_type, event_time, notice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_their_device() {
        assert_eq!(down_topic("d1"), "$oc/devices/d1/sys/events/down");
        assert_eq!(up_topic_device("$oc/devices/d1/sys/events/up"), Some("d1"));
        assert_eq!(up_topic_device("$oc/devices/d1/sys/events/down"), None);
        assert_eq!(up_topic_device("$oc/devices//sys/events/up"), None);
        assert_eq!(up_topic_device("$oc/devices/a/b/sys/events/up"), None);
    }

    #[test]
    fn the_python_sdks_version_report_parses() {
        let py = br#"{"object_device_id": "dev1", "services": [{"service_id": "$ota", "event_type": "version_report",
            "event_time": "2024-07-26T11:42:52Z", "event_id": null, "paras": {"fw_version": "v1.0.0", "sw_version": "v1.0.0"}}]}"#;
        assert_eq!(
            parse_uplink(py).unwrap(),
            [Uplink::VersionReport {
                sw_version: Some("v1.0.0".into()),
                fw_version: Some("v1.0.0".into())
            }]
        );
    }

    #[test]
    fn pretty_printed_c_sdk_progress_without_optional_fields_parses() {
        let c = b"{\n\t\"services\":\t[{\n\t\t\t\"service_id\":\t\"$ota\",\n\t\t\t\"event_type\":\t\"upgrade_progress_report\",\n\t\t\t\"paras\":\t{\n\t\t\t\t\"result_code\":\t0,\n\t\t\t\t\"progress\":\t80,\n\t\t\t\t\"version\":\t\"V2.0\"\n\t\t\t}\n\t\t}]\n}";
        assert_eq!(
            parse_uplink(c).unwrap(),
            [Uplink::Progress {
                result_code: 0,
                progress: Some(80),
                version: Some("V2.0".into()),
                description: None
            }]
        );
        let quoted = br#"{"services":[{"service_id":"$ota","event_type":"upgrade_progress_report","paras":{"result_code":"7","progress":null,"version":"1.0","description":"bad sign","extra":1}}]}"#;
        assert_eq!(
            parse_uplink(quoted).unwrap(),
            [Uplink::Progress {
                result_code: 7,
                progress: None,
                version: Some("1.0".into()),
                description: Some("bad sign".into())
            }]
        );
    }

    #[test]
    fn sdk_info_and_the_object_device_are_read() {
        // The Python SDK's `report_device_info`, sent by a gateway for its child `child-1`.
        let m = br#"{"object_device_id":"child-1","services":[{"service_id":"$sdk_info","event_type":"sdk_info_report","event_time":"20261206T120000Z","paras":{"device_sdk_version":"Python_v1.2.0","sw_version":"1.0","fw_version":"f1"}}]}"#;
        let parsed = parse_uplink_message(m).unwrap();
        assert_eq!(parsed.object_device_id.as_deref(), Some("child-1"));
        assert_eq!(
            parsed.events,
            [Uplink::SdkInfo {
                device_sdk_version: Some("Python_v1.2.0".into()),
                sw_version: Some("1.0".into()),
                fw_version: Some("f1".into()),
            }]
        );
        let direct = br#"{"object_device_id":"","services":[]}"#;
        assert_eq!(parse_uplink_message(direct).unwrap().object_device_id, None);
    }

    #[test]
    fn other_services_are_accepted_and_garbage_is_an_error() {
        let log = br#"{"object_device_id":"d","services":[{"service_id":"$log","event_type":"log_report","event_time":"2026-11-27T19:34:15Z","event_id":"","paras":{"type":"DEVICE_STATUS"}},{"service_id":"$ota","event_type":"something_new"}]}"#;
        let parsed = parse_uplink(log).unwrap();
        assert_eq!(parsed.len(), 2);
        assert!(matches!(&parsed[0], Uplink::Other { service_id, .. } if service_id == "$log"));
        assert!(
            matches!(&parsed[1], Uplink::Other { event_type, .. } if event_type == "something_new")
        );
        assert!(matches!(
            parse_uplink(b"not json"),
            Err(UplinkError::Json(_))
        ));
        assert_eq!(parse_uplink(b"{\"x\":1}"), Err(UplinkError::NoServices));
        let missing = br#"{"services":[{"service_id":"$ota","event_type":"upgrade_progress_report","paras":{"progress":5}}]}"#;
        assert!(matches!(
            parse_uplink(missing),
            Err(UplinkError::Field { .. })
        ));
        assert!(matches!(
            parse_uplink(&[0xff, 0xfe]),
            Err(UplinkError::Json(_))
        ));
    }

    #[test]
    fn downlink_events_have_iotdas_shape() {
        let q: Value = serde_json::from_slice(&version_query(
            "dev1",
            "20261127T120000Z",
            &TaskInfo::default(),
        ))
        .unwrap();
        assert_eq!(q["object_device_id"], "dev1");
        assert_eq!(q["services"][0]["service_id"], "$ota");
        assert_eq!(q["services"][0]["event_type"], "version_query");
        assert_eq!(q["services"][0]["event_time"], "20261127T120000Z");
        assert_eq!(q["services"][0]["paras"], serde_json::json!({}));
        // D-3028's gateway-mode example.
        let info = TaskInfo {
            task_id: Some("65d31bf2581ed33a42a58d76".into()),
            sub_device_count: Some(2),
            task_ext_info: Some(serde_json::json!({"device_type": "DDC"})),
        };
        let q: Value =
            serde_json::from_slice(&version_query("dev1", "20261127T120000Z", &info)).unwrap();
        assert_eq!(
            q["services"][0]["paras"],
            serde_json::json!({"task_id": "65d31bf2581ed33a42a58d76", "sub_device_count": 2,
                               "task_ext_info": {"device_type": "DDC"}})
        );

        let notice = UpgradeNotice {
            version: "2.0".into(),
            url: "https://ota.example:8443/download/p/fw.bin".into(),
            file_size: 81_362_928,
            file_name: "fw.bin".into(),
            access_token: "ab".repeat(32),
            expires: 86_400,
            sign: "cd".repeat(32),
            custom_info: None,
            task: TaskInfo {
                task_id: Some("65d31bf2581ed33a42a58d76".into()),
                sub_device_count: None,
                task_ext_info: Some(serde_json::json!({"device_type": "DDC"})),
            },
        };
        let u: Value = serde_json::from_slice(&upgrade_event(
            "dev1",
            "20261127T120000Z",
            UpgradeKind::Firmware,
            &notice,
        ))
        .unwrap();
        let s = &u["services"][0];
        assert_eq!(s["event_type"], "firmware_upgrade");
        assert_eq!(s["paras"]["file_size"], 81_362_928);
        assert_eq!(s["paras"]["expires"], 86_400);
        assert_eq!(s["paras"]["task_id"], "65d31bf2581ed33a42a58d76");
        assert_eq!(s["paras"]["task_ext_info"]["device_type"], "DDC");
        assert!(s["paras"].get("sub_device_count").is_none());
        assert!(
            s["paras"].get("custom_info").is_none(),
            "absent optional fields are left out"
        );
        assert!(s["paras"].get("sign_type").is_none());
        let back: UpgradeNotice = serde_json::from_value(s["paras"].clone()).unwrap();
        assert_eq!(back, notice);
    }

    #[test]
    fn v2_upgrade_events_carry_a_presigned_url_and_no_token() {
        let notice = UpgradeNoticeV2 {
            version: "2.0".into(),
            url: "https://bucket.example.com/fw.bin?X-Amz-Signature=abc".into(),
            file_size: 10,
            file_name: "fw.bin".into(),
            expires: 86400,
            sign: "00".repeat(32),
            custom_info: None,
            task: TaskInfo {
                task_id: Some("t1".into()),
                ..TaskInfo::default()
            },
        };
        let msg: serde_json::Value = serde_json::from_slice(&upgrade_event_v2(
            "d1",
            "20261201T000000Z",
            UpgradeKind::Firmware,
            &notice,
        ))
        .unwrap();
        let service = &msg["services"][0];
        assert_eq!(service["event_type"], "firmware_upgrade_v2");
        assert_eq!(service["service_id"], "$ota");
        assert!(service["paras"].get("access_token").is_none());
        assert!(service["paras"].get("custom_info").is_none());
        assert_eq!(service["paras"]["url"], notice.url.as_str());
        assert_eq!(msg["object_device_id"], "d1");
    }
}
