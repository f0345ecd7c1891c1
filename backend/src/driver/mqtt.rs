//! The MQTT flow's effects (`domain::flow::mqtt`): the version query and the upgrade notice, with the
//! download token it carries issued (or reused) in the transition's transaction, and tokens revoked when
//! the subtask no longer downloads.

use domain::flow::mqtt::Effect;
use domain::package::PackageType;

use super::effects::{Effects, Outgoing};
use crate::storage::entity::{packages, subtasks};
use crate::{Result, tokens};

/// Carries out one MQTT effect inside its transition's transaction.
pub(super) async fn carry_out(fx: &mut Effects<'_>, effect: Effect) -> Result<()> {
    let row = fx.row;
    let event_time = fx.now.to_compact();
    // A child device is reached through its gateway's topic; `object_device_id` names the child.
    let to = row
        .gateway_id
        .clone()
        .unwrap_or_else(|| row.device_id.clone());
    match effect {
        Effect::SendVersionQuery => {
            let info = task_info(fx).await?;
            fx.outgoing.push(Outgoing::Mqtt {
                device_id: to,
                payload: protocol::ota::version_query(&row.device_id, &event_time, &info),
            });
        }
        Effect::RevokeTokens => {
            tokens::revoke_subtask(fx.txn, fx.now, row.id).await?;
        }
        Effect::SendUpgrade => {
            let package = &fx.plan.package;
            let kind = match fx.plan.kind {
                PackageType::Software => protocol::ota::UpgradeKind::Software,
                PackageType::Firmware => protocol::ota::UpgradeKind::Firmware,
            };
            let ttl = fx.state.settings.download_token_ttl;
            let custom_info = Some(package.custom_info.clone()).filter(|c| !c.is_empty());
            let key = packages::object_key(package)?;
            let registered = package.source == packages::SOURCE_BUCKET;
            let payload =
                if let Some(url) = fx.state.store.offload_url(&key, registered, ttl).await? {
                    // IoTDA's `*_upgrade_v2`: the device fetches from the bucket, without a token.
                    let notice = protocol::ota::UpgradeNoticeV2 {
                        version: package.version.clone(),
                        url,
                        file_size: u64::try_from(package.size).unwrap_or(0),
                        file_name: package.file_name.clone(),
                        expires: ttl.as_secs(),
                        sign: package.sha256.clone(),
                        custom_info,
                        task: task_info(fx).await?,
                    };
                    protocol::ota::upgrade_event_v2(&row.device_id, &event_time, kind, &notice)
                } else {
                    // A re-send (after a reconnect or a restart) carries the token the device may be
                    // downloading with already, so it resumes instead of starting over.
                    let token = tokens::reuse_or_issue_in(
                        fx.txn,
                        &fx.state.sealer,
                        fx.now,
                        ttl,
                        row,
                        &package.id,
                    )
                    .await?;
                    let notice = protocol::ota::UpgradeNotice {
                        version: package.version.clone(),
                        url: download_url(
                            &fx.settings.download_base_url,
                            &package.id,
                            &package.file_name,
                        ),
                        file_size: u64::try_from(package.size).unwrap_or(0),
                        file_name: package.file_name.clone(),
                        access_token: token.token,
                        expires: ttl.as_secs(),
                        sign: package.sha256.clone(),
                        custom_info,
                        task: task_info(fx).await?,
                    };
                    protocol::ota::upgrade_event(&row.device_id, &event_time, kind, &notice)
                };
            fx.outgoing.push(Outgoing::Mqtt {
                device_id: to,
                payload,
            });
        }
    }
    Ok(())
}

/// What the task adds to its events: its id and `task_ext_info` (IoTDA sends both to every device), and
/// in a gateway-mode task, to a child device, how many of its gateway's children the task upgrades.
async fn task_info(fx: &Effects<'_>) -> Result<protocol::ota::TaskInfo> {
    use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
    let sub_device_count = match (&fx.row.gateway_id, fx.plan.gateway_mode) {
        (Some(gateway), true) => {
            let known = super::lock(&fx.plan.sub_devices).get(gateway).copied();
            Some(match known {
                Some(n) => n,
                None => {
                    let n = subtasks::Entity::find()
                        .filter(subtasks::Column::TaskId.eq(fx.row.task_id.as_str()))
                        .filter(subtasks::Column::GatewayId.eq(gateway.as_str()))
                        .count(fx.txn)
                        .await?;
                    super::lock(&fx.plan.sub_devices).insert(gateway.clone(), n);
                    n
                }
            })
        }
        _ => None,
    };
    Ok(protocol::ota::TaskInfo {
        task_id: Some(fx.row.task_id.clone()),
        sub_device_count,
        task_ext_info: fx.plan.task_ext_info.clone(),
    })
}

/// The URL a device downloads `file_name` of `package_id` from.
#[must_use]
pub fn download_url(base: &str, package_id: &str, file_name: &str) -> String {
    let name = percent_encode_path(file_name);
    format!(
        "{}/download/{package_id}/{name}",
        base.trim_end_matches('/')
    )
}

fn percent_encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_urls_escape_file_names() {
        assert_eq!(
            download_url("https://h:8443/", "abc", "fw 2.bin"),
            "https://h:8443/download/abc/fw%202.bin"
        );
        assert_eq!(
            download_url("https://h:8443", "abc", "fw-2.0_x.bin"),
            "https://h:8443/download/abc/fw-2.0_x.bin"
        );
    }
}
