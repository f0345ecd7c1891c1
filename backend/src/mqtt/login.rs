//! IoTDA device logins: the client id's shape, the HMAC password, the timestamp's freshness, and the
//! failed-login throttles, answered with the CONNACK code to refuse with.

use std::net::SocketAddr;
use std::time::Duration;

use protocol::mqtt_auth::{ClientId, SigType, verify_password};
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use sea_orm::EntityTrait;
use secrecy::ExposeSecret;

use super::codec::Connect;
use super::{Ctx, lock};
use crate::storage::entity::devices;

/// Checks an IoTDA login; the device id, or the CONNACK code to refuse with.
///
/// Failed logins are throttled per device id, where an attempt takes its place before any lookup (check
/// and record are one step: simultaneous guesses cannot all pass the check) and a successful one gives it
/// back; and per source address, where only failures count (a carrier NAT logs in thousands of devices
/// at once, none of which may be refused for the others being checked).
pub(super) async fn authenticate(
    ctx: &Ctx,
    connect: &Connect,
    peer: SocketAddr,
    secure: bool,
) -> Result<String, ConnectReturnCode> {
    let client = ClientId::parse(&connect.client_id).map_err(|_| ConnectReturnCode::BadClientId)?;
    let now = ctx.state.clock.now();
    let (device_key, address_key) = (client.device_id.to_owned(), peer.ip().to_string());
    {
        let mut failures = lock(&ctx.failures);
        let (by_device, by_address) = &mut *failures;
        if by_device.begin(&device_key, now).is_err() {
            return Err(ConnectReturnCode::ServiceUnavailable);
        }
        if by_address.check(&address_key, now).is_err() {
            by_device.forgive(&device_key, now);
            return Err(ConnectReturnCode::ServiceUnavailable);
        }
    }
    let checked = check_login(ctx, connect, &client, now).await;
    {
        let mut failures = lock(&ctx.failures);
        let (by_device, by_address) = &mut *failures;
        match checked {
            Ok(_) | Err(ConnectReturnCode::ServiceUnavailable) => {
                by_device.forgive(&device_key, now);
            }
            Err(_) => by_address.record_failure(&address_key, now),
        }
    }
    let (device_id, secure_access) = checked?;
    // IoTDA's `secure_access`: such a device logs in over TLS (8883) only. Decided after the password
    // (the answer says nothing about a device to who does not hold its secret), and not counted as a
    // failed login: a fleet on plain MQTT behind one carrier address must not get that address
    // throttled for the devices there that do use TLS.
    if secure_access && !secure && ctx.settings.enforce_secure_access {
        tracing::info!(
            device_id,
            "mqtt: a secure_access device refused on plain MQTT"
        );
        return Err(ConnectReturnCode::NotAuthorized);
    }
    Ok(device_id)
}

/// The login check proper (see [`authenticate`]): the device id and its `secure_access`.
async fn check_login(
    ctx: &Ctx,
    connect: &Connect,
    client: &ClientId<'_>,
    now: domain::Timestamp,
) -> Result<(String, bool), ConnectReturnCode> {
    let (username, password) = connect
        .login
        .as_ref()
        .ok_or(ConnectReturnCode::BadUserNamePassword)?;
    if username != client.device_id {
        return Err(ConnectReturnCode::BadUserNamePassword);
    }
    if client.sig_type == SigType::TimestampCheck
        && !timestamp_fresh(client.timestamp, now, ctx.settings.timestamp_skew)
    {
        return Err(ConnectReturnCode::BadUserNamePassword);
    }
    let device = devices::Entity::find_by_id(client.device_id.to_owned())
        .one(&ctx.state.db)
        .await
        .map_err(|e| {
            tracing::warn!(error.message = %e, "mqtt: login lookup failed");
            ConnectReturnCode::ServiceUnavailable
        })?
        .ok_or(ConnectReturnCode::BadUserNamePassword)?;
    let Some(sealed) = device.secret_enc.as_deref() else {
        return Err(ConnectReturnCode::BadUserNamePassword);
    };
    let secret = ctx.state.sealer.open(&device.id, sealed).map_err(|e| {
        tracing::warn!(device_id = %device.id, error.message = %e, "mqtt: device secret cannot be opened");
        ConnectReturnCode::ServiceUnavailable
    })?;
    if !verify_password(secret.expose_secret(), client.timestamp, password) {
        return Err(ConnectReturnCode::BadUserNamePassword);
    }
    if device.status == "FROZEN" {
        return Err(ConnectReturnCode::NotAuthorized);
    }
    Ok((device.id, device.secure_access))
}

/// Whether the UTC hour `YYYYMMDDHH` overlaps `now ± skew`.
fn timestamp_fresh(ts: &str, now: domain::Timestamp, skew: Duration) -> bool {
    let Ok(hour) = chrono::NaiveDateTime::parse_from_str(&format!("{ts}0000"), "%Y%m%d%H%M%S")
    else {
        return false;
    };
    let start = hour.and_utc().timestamp_millis();
    let end = start + 3_600_000;
    let skew = i64::try_from(skew.as_millis()).unwrap_or(i64::MAX);
    let now = now.as_millis();
    now >= start.saturating_sub(skew) && now < end.saturating_add(skew)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_type_1_timestamps_must_be_near_the_clock() {
        // 2026-12-01T10:30:00Z
        let now = domain::Timestamp::from_millis(1_796_121_000_000);
        let hour = Duration::from_secs(3600);
        assert!(timestamp_fresh("2026120110", now, Duration::ZERO));
        assert!(!timestamp_fresh("2026120109", now, Duration::ZERO));
        assert!(timestamp_fresh("2026120109", now, hour));
        assert!(timestamp_fresh("2026120111", now, hour));
        assert!(!timestamp_fresh("2026120112", now, hour));
        assert!(!timestamp_fresh("2026130110", now, hour), "no 13th month");
    }
}
