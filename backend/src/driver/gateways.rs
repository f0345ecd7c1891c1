//! Gateways and their child devices (IoTDA's gateway OTA): a child has no connection of its own, so it
//! is as connected as its gateway, and what it says arrives on its gateway's uplink with its id in
//! `object_device_id`. Its downlinks go out on the gateway's topic with the child's id (see
//! `driver::mqtt`).

use std::collections::HashMap;

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};

use super::{BATCH, DeviceEvent};
use crate::storage::entity::devices;
use crate::{Context, Result};

/// Prepares device events for the driver: an event a gateway sent about another device is kept, as that
/// device's, only when the device is the gateway's child (a gateway can never report for a device that
/// is not its own, nor its child's report reach the gateway's upgrade); a gateway's connects and
/// disconnects are also its children's, right after its own.
pub(super) async fn through_gateways(
    state: &Context,
    events: Vec<(String, DeviceEvent)>,
) -> Result<Vec<(String, DeviceEvent)>> {
    let relayed: Vec<String> = events
        .iter()
        .filter(|(_, e)| matches!(e, DeviceEvent::FromGateway { .. }))
        .map(|(id, _)| id.clone())
        .collect();
    let connecting: Vec<String> = events
        .iter()
        .filter(|(_, e)| is_connection(e))
        .map(|(id, _)| id.clone())
        .collect();
    let children = children_of(state, connecting).await?;
    if children.is_empty() && relayed.is_empty() {
        return Ok(events);
    }
    let parents = gateways_of(state, relayed).await?;
    let mut out = Vec::with_capacity(events.len());
    for (device_id, event) in events {
        match event {
            DeviceEvent::FromGateway { gateway, event } => {
                if parents.get(&device_id) == Some(&gateway) {
                    out.push((device_id, *event));
                } else {
                    tracing::warn!(
                        gateway,
                        device_id,
                        "mqtt: an event about a device that is not the sender's child was dropped"
                    );
                }
            }
            event => {
                let kids = if is_connection(&event) {
                    children.get(&device_id).cloned().unwrap_or_default()
                } else {
                    Vec::new()
                };
                out.push((device_id, event.clone()));
                out.extend(kids.into_iter().map(|child| (child, event.clone())));
            }
        }
    }
    Ok(out)
}

/// A connect or a disconnect: what a gateway's children share with it.
const fn is_connection(event: &DeviceEvent) -> bool {
    matches!(
        event,
        DeviceEvent::Online | DeviceEvent::Offline | DeviceEvent::Lost { .. }
    )
}

/// The gateway of each of `ids` that has one.
async fn gateways_of(state: &Context, mut ids: Vec<String>) -> Result<HashMap<String, String>> {
    ids.sort_unstable();
    ids.dedup();
    let mut out = HashMap::new();
    for chunk in ids.chunks(BATCH as usize) {
        let rows: Vec<(String, Option<String>)> = devices::Entity::find()
            .select_only()
            .column(devices::Column::Id)
            .column(devices::Column::GatewayId)
            .filter(devices::Column::Id.is_in(chunk.to_vec()))
            .into_tuple()
            .all(&state.db)
            .await?;
        out.extend(rows.into_iter().filter_map(|(id, g)| Some((id, g?))));
    }
    Ok(out)
}

/// The children of each of `ids` that has any.
async fn children_of(
    state: &Context,
    mut ids: Vec<String>,
) -> Result<HashMap<String, Vec<String>>> {
    ids.sort_unstable();
    ids.dedup();
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for chunk in ids.chunks(BATCH as usize) {
        let rows: Vec<(String, Option<String>)> = devices::Entity::find()
            .select_only()
            .column(devices::Column::Id)
            .column(devices::Column::GatewayId)
            .filter(devices::Column::GatewayId.is_in(chunk.to_vec()))
            .into_tuple()
            .all(&state.db)
            .await?;
        for (child, gateway) in rows {
            if let Some(g) = gateway {
                out.entry(g).or_default().push(child);
            }
        }
    }
    Ok(out)
}
