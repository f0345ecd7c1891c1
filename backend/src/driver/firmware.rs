//! The LwM2M flow's effects for firmware upgrades through the Firmware Update object (Object 5): the
//! version read from `/3/0/3`, the Package URI written to `/5/0/1` with a fresh download token (issued
//! in the transition's transaction, and revoked when the download ends), and Update executed on `/5/0/2`.
//! The object has no acknowledgements, so PCP's are nothing here.

use std::sync::Arc;

use domain::device::FirmwareDownload;
use domain::flow::lwm2m::Effect;

use super::effects::{Effects, Outgoing};
use super::{BlockGrant, segment_source};
use crate::{Result, tokens};

/// Carries out one LwM2M effect of a firmware (Object 5) subtask.
pub(super) async fn carry_out(fx: &mut Effects<'_>, effect: Effect) -> Result<()> {
    let row = fx.row;
    let device_id = row.device_id.clone();
    match effect {
        Effect::QueryVersion => fx
            .outgoing
            .push(Outgoing::ReadFirmwareVersion { device_id }),
        Effect::ReadCoverage | Effect::ReadCellId | Effect::WaitSlot(_) => {
            fx.outgoing.extend(Outgoing::radio(row, effect));
        }
        Effect::Notify => {
            // A fresh URI each time (a device that registered again starts over with it).
            tokens::revoke_subtask(fx.txn, fx.now, row.id).await?;
            let package = &fx.plan.package;
            let ttl = fx.state.settings.download_token_ttl;
            let token =
                tokens::issue_in(fx.txn, &fx.state.sealer, fx.now, ttl, row, &package.id).await?;
            let (uri, blocks) = match fx.plan.firmware_download {
                FirmwareDownload::Coap => (
                    format!(
                        "{}/fw/{}",
                        fx.settings.coap_base_url.trim_end_matches('/'),
                        token.token
                    ),
                    Some(BlockGrant {
                        token_hash: crate::ids::sha256_hex(&token.token),
                        expires_at: token.expires_at.as_millis(),
                        source: Arc::new(segment_source(package)?),
                    }),
                ),
                FirmwareDownload::Https => (
                    format!(
                        "{}/fw/{}",
                        fx.settings.download_base_url.trim_end_matches('/'),
                        token.token
                    ),
                    None,
                ),
            };
            fx.outgoing.push(Outgoing::StartFirmware {
                device_id,
                uri,
                blocks,
            });
        }
        Effect::ReleaseSlot(_) => {
            // The download is over (done, failed or stopped): its URI stops working.
            tokens::revoke_subtask(fx.txn, fx.now, row.id).await?;
            fx.outgoing.push(Outgoing::Serve {
                device_id,
                download: None,
            });
            fx.outgoing.push(Outgoing::ReleaseSlot { subtask: row.id });
        }
        Effect::Execute => fx.outgoing.push(Outgoing::ExecuteUpdate { device_id }),
        Effect::AckDownload | Effect::AckUpgrade => {}
    }
    Ok(())
}
