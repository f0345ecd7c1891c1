//! The LwM2M flow's effects for software upgrades over PCP (`protocols.md` §2.2): PCP frames written to
//! the device's `/19/1/0`, and the package's segments served from the CoAP adapter while the subtask
//! holds its download slot.

use std::sync::Arc;

use domain::flow::lwm2m::Effect;
use protocol::pcp::{Downlink as Pcp, ResultCode, Version};

use super::effects::{Effects, Outgoing};
use super::segment_source;
use crate::{Error, Result};

/// Carries out one LwM2M effect of a PCP subtask (nothing here writes to the database).
pub(super) fn carry_out(fx: &mut Effects<'_>, effect: Effect) -> Result<()> {
    let row = fx.row;
    let device_id = row.device_id.clone();
    let frame = |m: Pcp<'_>| Outgoing::Pcp {
        device_id: row.device_id.clone(),
        frame: m.encode(),
    };
    match effect {
        Effect::QueryVersion => fx.outgoing.push(frame(Pcp::QueryVersion)),
        Effect::ReadCoverage | Effect::ReadCellId | Effect::WaitSlot(_) => {
            fx.outgoing.extend(Outgoing::radio(row, effect));
        }
        Effect::Notify => {
            let package = &fx.plan.package;
            let source = segment_source(package)?;
            let version = Version::new(&source.version)
                .map_err(|e| Error::Internal(format!("package {}: {e}", package.id)))?;
            fx.outgoing.push(Outgoing::Serve {
                device_id,
                download: Some(Arc::new(source.clone())),
            });
            fx.outgoing.push(frame(Pcp::NewVersion {
                version,
                segment_size: source.segment_size,
                segment_count: source.count(),
                check_code: 0,
            }));
        }
        Effect::ReleaseSlot(_) => {
            fx.outgoing.push(Outgoing::Serve {
                device_id,
                download: None,
            });
            fx.outgoing.push(Outgoing::ReleaseSlot { subtask: row.id });
        }
        Effect::Execute => fx.outgoing.push(frame(Pcp::Execute)),
        Effect::AckDownload => fx.outgoing.push(frame(Pcp::DownloadAck {
            result: ResultCode::OK,
        })),
        Effect::AckUpgrade => fx.outgoing.push(frame(Pcp::UpgradeAck {
            result: ResultCode::OK,
        })),
    }
    Ok(())
}
