//! Carrying out a transition's effects: [`Effects`] is what the `mqtt`, `pcp` and `firmware` modules
//! read and write inside the transition's transaction, and [`Outgoing`] what they decide to send, sent
//! only once that transaction has committed (see [`super::apply`]).

use std::sync::Arc;

use domain::Timestamp;
use domain::flow::lwm2m;
use sea_orm::DatabaseTransaction;

use super::plan::TaskPlan;
use super::{BlockGrant, Lwm2mLink, SegmentSource};
use crate::Context;
use crate::settings::DriverSettings;
use crate::storage::entity::subtasks;

/// One transition's effects being carried out inside its transaction (see the `mqtt`, `pcp` and
/// `firmware` modules): what they read, and where they put what is sent after the commit.
pub(super) struct Effects<'a> {
    pub(super) state: &'a Context,
    pub(super) settings: &'a DriverSettings,
    pub(super) txn: &'a DatabaseTransaction,
    pub(super) now: Timestamp,
    pub(super) plan: &'a TaskPlan,
    pub(super) row: &'a subtasks::Model,
    pub(super) outgoing: &'a mut Vec<Outgoing>,
}

/// Something to send once the transaction that decided it has committed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outgoing {
    /// An MQTT message.
    Mqtt { device_id: String, payload: Vec<u8> },
    /// A PCP frame to an LwM2M device.
    Pcp { device_id: String, frame: Vec<u8> },
    /// A `/4/0` read.
    ReadCoverage { device_id: String },
    /// A `/4/0/8` read.
    ReadCellId { device_id: String },
    /// Start (or stop) serving segments.
    Serve {
        device_id: String,
        download: Option<Arc<SegmentSource>>,
    },
    /// A `/3/0/3` read.
    ReadFirmwareVersion { device_id: String },
    /// The Package URI write and the `/5/0` observations.
    StartFirmware {
        device_id: String,
        uri: String,
        blocks: Option<BlockGrant>,
    },
    /// The `/5/0/2` execute.
    ExecuteUpdate { device_id: String },
    /// Ask for a download slot.
    AskSlot { subtask: i64, slot: lwm2m::Slot },
    /// Give a download slot back.
    ReleaseSlot { subtask: i64 },
}

impl Outgoing {
    /// The device it is for (`None` for the slot bookkeeping).
    pub(super) fn device_id(&self) -> Option<&str> {
        match self {
            Self::Mqtt { device_id, .. }
            | Self::Pcp { device_id, .. }
            | Self::ReadCoverage { device_id }
            | Self::ReadCellId { device_id }
            | Self::Serve { device_id, .. }
            | Self::ReadFirmwareVersion { device_id }
            | Self::StartFirmware { device_id, .. }
            | Self::ExecuteUpdate { device_id } => Some(device_id),
            Self::AskSlot { .. } | Self::ReleaseSlot { .. } => None,
        }
    }

    /// Hands an LwM2M message to the CoAP adapter (the other kinds are not its business).
    pub(super) fn send_to(self, link: &dyn Lwm2mLink) {
        match self {
            Self::Pcp { device_id, frame } => link.send_pcp(&device_id, frame),
            Self::ReadCoverage { device_id } => link.read_coverage(&device_id),
            Self::ReadCellId { device_id } => link.read_cell_id(&device_id),
            Self::Serve {
                device_id,
                download,
            } => link.serve(&device_id, download),
            Self::ReadFirmwareVersion { device_id } => link.read_firmware_version(&device_id),
            Self::StartFirmware {
                device_id,
                uri,
                blocks,
            } => link.start_firmware(&device_id, uri, blocks),
            Self::ExecuteUpdate { device_id } => link.execute_update(&device_id),
            Self::Mqtt { .. } | Self::AskSlot { .. } | Self::ReleaseSlot { .. } => {}
        }
    }

    /// What both LwM2M methods do alike for `effect`: the radio reads and asking for a download slot.
    /// `None` for the effects each method does its own way.
    pub(super) fn radio(row: &subtasks::Model, effect: lwm2m::Effect) -> Option<Self> {
        let device_id = row.device_id.clone();
        Some(match effect {
            lwm2m::Effect::ReadCoverage => Self::ReadCoverage { device_id },
            lwm2m::Effect::ReadCellId => Self::ReadCellId { device_id },
            lwm2m::Effect::WaitSlot(slot) => Self::AskSlot {
                subtask: row.id,
                slot,
            },
            _ => return None,
        })
    }
}
