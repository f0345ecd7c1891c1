//! Device uplinks: the platform's router link, subscribed to every device's up topic, and the hand-over
//! of connects, disconnects and `$ota` reports to the task driver (in arrival order, in batches).

use std::sync::Arc;
use std::time::Duration;

use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};

use super::{PLATFORM_LINK, UP_FILTER};
use crate::AppState;
use crate::driver::DeviceEvent;

/// The platform's router link, subscribed to every device's uplinks. Blocks on the router's reply: call
/// it at start-up or on the blocking pool.
pub(super) fn platform_link(broker: &rumqttd::Broker) -> Result<(LinkTx, LinkRx), String> {
    let (mut tx, rx) = broker
        .link(PLATFORM_LINK)
        .map_err(|e| format!("linking to the MQTT router: {e}"))?;
    tx.subscribe(UP_FILTER)
        .map_err(|e| format!("subscribing device uplinks: {e}"))?;
    Ok((tx, rx))
}

/// Hands connects, disconnects and `$ota` events to the task driver, in arrival order, the ones that
/// arrived together in one call (one transaction for the lot): with thousands of devices, per-event
/// transactions would queue behind SQLite's single writer. When the router drops the platform's link,
/// it is linked again (backing off up to 5 s) and the events go on.
pub(super) async fn uplinks(
    state: AppState,
    broker: Arc<rumqttd::Broker>,
    link: (LinkTx, LinkRx),
    mut sessions: tokio::sync::mpsc::UnboundedReceiver<(String, DeviceEvent)>,
) {
    let (mut _tx, mut rx) = link;
    loop {
        if !forward_uplinks(&state, &mut rx, &mut sessions).await {
            return;
        }
        tracing::error!("mqtt: the router dropped the platform link; linking again");
        let mut wait = Duration::from_millis(50);
        loop {
            let broker = broker.clone();
            match tokio::task::spawn_blocking(move || platform_link(&broker)).await {
                Ok(Ok((tx, new_rx))) => {
                    (_tx, rx) = (tx, new_rx);
                    tracing::info!("mqtt: platform link restored");
                    break;
                }
                Ok(Err(e)) => tracing::warn!(error.message = %e, "mqtt: linking again failed"),
                Err(e) => tracing::warn!(error.message = %e, "mqtt: linking again failed"),
            }
            if sessions.is_closed() {
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}

/// Forwards events until the router link is lost (true) or the endpoint is gone (false).
async fn forward_uplinks(
    state: &AppState,
    rx: &mut LinkRx,
    sessions: &mut tokio::sync::mpsc::UnboundedReceiver<(String, DeviceEvent)>,
) -> bool {
    use futures::FutureExt;
    const MAX_BATCH: usize = 512;
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            // A session's connect is queued before it reads the device's first message: taking the
            // session queue first keeps a device's connect ahead of what it then says.
            biased;
            e = sessions.recv() => match e {
                Some(e) => batch.push(e),
                None => return false,
            },
            n = rx.next() => match n {
                Ok(n) => {
                    if !router_notification(n, rx, &mut batch).await {
                        apply_with_retries(state, batch).await;
                        return true;
                    }
                }
                Err(e) => {
                    tracing::info!(error.message = %e, "mqtt: router link closed");
                    apply_with_retries(state, batch).await;
                    return true;
                }
            },
        }
        // Whatever else is already here, without waiting.
        while batch.len() < MAX_BATCH {
            let mut more = false;
            while let Ok(e) = sessions.try_recv() {
                batch.push(e);
                more = true;
            }
            if let Some(Ok(n)) = rx.next().now_or_never() {
                if !router_notification(n, rx, &mut batch).await {
                    apply_with_retries(state, batch).await;
                    return true;
                }
                more = true;
            }
            if !more {
                break;
            }
        }
        apply_with_retries(state, batch).await;
    }
}

/// Hands `batch` to the driver; a failure (the database busy or briefly unreachable) is tried again with
/// backoff rather than dropped, because a dropped batch loses connects and final reports, and with them
/// the devices' subtasks. Events wait meanwhile (the router link and the session queue hold them).
async fn apply_with_retries(state: &AppState, batch: Vec<(String, DeviceEvent)>) {
    const ATTEMPTS: u32 = 10;
    for attempt in 1..=ATTEMPTS {
        let Err(e) = state.driver.device_events(state, batch.clone()).await else {
            return;
        };
        if attempt == ATTEMPTS || !e.is_internal() {
            tracing::error!(
                error.message = %e, error.cause_chain = ?e, events = batch.len(),
                "mqtt: handling device events failed; the devices' next connect or report catches up"
            );
            return;
        }
        let wait = Duration::from_millis(100u64 << attempt.min(7));
        tracing::warn!(error.message = %e, attempt, retry_in = ?wait, "mqtt: handling device events failed; retrying");
        tokio::time::sleep(wait).await;
    }
}

/// Adds the events of one router notification to `batch`; false when the router link is gone.
async fn router_notification(
    n: Option<Notification>,
    rx: &mut LinkRx,
    batch: &mut Vec<(String, DeviceEvent)>,
) -> bool {
    match n {
        Some(Notification::Forward(forward)) => {
            let topic = String::from_utf8_lossy(&forward.publish.topic);
            let external = format!("${topic}");
            if let Some(device_id) = protocol::ota::up_topic_device(&external) {
                uplink_events(device_id, &forward.publish.payload, batch);
            }
            true
        }
        Some(Notification::Unschedule) => match rx.wake().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error.message = %e, "mqtt: waking the router link failed");
                false
            }
        },
        // The router ended the link (another link took its id, or the router restarted it).
        Some(Notification::Disconnect(..)) => false,
        _ => true,
    }
}

/// The driver events in one uplink message (`$ota` and `$sdk_info` events; others are logged and
/// ignored). A message about another device (`object_device_id`, a gateway reporting for a child) is
/// handed over as the gateway's, for the driver to check that the child is the gateway's.
fn uplink_events(device_id: &str, payload: &[u8], out: &mut Vec<(String, DeviceEvent)>) {
    let message = match protocol::ota::parse_uplink_message(payload) {
        Ok(message) => message,
        Err(e) => {
            tracing::warn!(device_id, error.message = %e, "mqtt: unreadable uplink ignored");
            return;
        }
    };
    let child = message.object_device_id.filter(|o| o != device_id);
    for event in message.events {
        let event = match event {
            protocol::ota::Uplink::VersionReport {
                sw_version,
                fw_version,
            } => DeviceEvent::VersionReport {
                sw_version,
                fw_version,
            },
            protocol::ota::Uplink::Progress {
                result_code,
                progress,
                version,
                description,
            } => DeviceEvent::Progress {
                result_code,
                progress,
                version,
                description,
            },
            protocol::ota::Uplink::SdkInfo {
                device_sdk_version,
                sw_version,
                fw_version,
            } => DeviceEvent::SdkInfo {
                device_sdk_version,
                sw_version,
                fw_version,
            },
            protocol::ota::Uplink::Other {
                service_id,
                event_type,
            } => {
                tracing::debug!(device_id, service_id, event_type, "mqtt: event ignored");
                continue;
            }
        };
        match &child {
            None => out.push((device_id.to_owned(), event)),
            Some(child) => out.push((
                child.clone(),
                DeviceEvent::FromGateway {
                    gateway: device_id.to_owned(),
                    event: Box::new(event),
                },
            )),
        }
    }
}
