//! Push notifications: every outbox record a subscription asks for becomes a delivery row (fan-out), and
//! deliveries are POSTed to the subscription's URL, signed, retried with exponential backoff, in order per
//! task, and survive restarts (everything is in the database).
//!
//! - **Fan-out** marks outbox records `fanned_at` and writes one `pending` delivery per subscription that
//!   wants the record (its resource, its project, created before the record), in one transaction. A
//!   unique index makes a second instance's fan-out of the same record fail instead of doubling it.
//! - **Delivery** looks at each subscription's own oldest pending deliveries (so a dead receiver never
//!   hides anyone else's), and sends only the oldest one per aggregate: per task for `batchtask`, per
//!   task and device for the per-device resource. Notifications therefore arrive in the order they
//!   happened, even across retries. A 2xx is `delivered`; anything else is retried after 1 s, 2 s, 4 s...
//!   (at most `max_backoff`) until `max_attempts`, then `failed` (and the next one goes out).
//! - Nothing runs while no subscription exists, except **pruning**: once an hour (injected clock), delivered
//!   and failed deliveries older than `retention` (7 days) go, and so do outbox records older than that
//!   which no pending delivery needs (records no subscription wanted are never delivered).
//! - **Private addresses** are refused unless `allow_private`: a callback URL naming a loopback, private,
//!   link-local or otherwise internal address (or a name resolving only to such) is never contacted, so a
//!   subscription cannot make Updraft probe its own network. Names are checked when resolved for each
//!   connection, which also defeats DNS rebinding.
//! - **Signature**: `X-Updraft-Signature: t=<unix ms>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//!   Receivers recompute it over the raw body and reject old `t` values to stop replays.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use domain::Timestamp;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait,
    Set,
};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::service::subscriptions::{self, BATCHTASK, BATCHTASK_DEVICE};
use crate::settings::NotifySettings;
use crate::storage::entity::{notification_deliveries, notification_subscriptions, outbox};
use crate::{AppState, Error, Result};
use domain::net::is_private;

/// Outbox rows fanned out per transaction.
const BATCH: u64 = 500;
/// Pending deliveries looked at per subscription and round.
const PER_SUBSCRIPTION: u64 = 200;

/// The delivery worker.
#[derive(Clone, Debug)]
pub struct Notifier {
    settings: NotifySettings,
    client: reqwest::Client,
}

impl Notifier {
    /// A notifier with its HTTPS client.
    ///
    /// # Errors
    /// [`Error::Internal`] for an unreadable extra CA or a client that cannot be built.
    pub fn new(settings: NotifySettings) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .timeout(settings.timeout)
            .dns_resolver(std::sync::Arc::new(Resolver {
                allow_private: settings.allow_private,
            }))
            .redirect(reqwest::redirect::Policy::none())
            // Never through a proxy from the environment (`HTTPS_PROXY`...): a proxy resolves the
            // callback's name itself, past the private-address check of `Resolver`.
            .no_proxy()
            .user_agent(concat!("updraft/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &settings.extra_ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Internal(format!("notification CA: {e}")))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| Error::Internal(format!("notification client: {e}")))?;
        Ok(Self { settings, client })
    }

    /// Fans out and delivers until `stop`; wakes at least every second and on new outbox records.
    pub async fn run(&self, state: AppState, stop: tokio_util::sync::CancellationToken) {
        let mut events = state.driver.subscribe();
        let mut pruned_at = None;
        loop {
            let now = state.clock.now();
            if pruned_at
                .is_none_or(|at: Timestamp| now.as_millis() - at.as_millis() >= PRUNE_EVERY_MS)
            {
                pruned_at = Some(now);
                if let Err(e) = prune(&state, now, self.settings.retention).await {
                    tracing::warn!(error.message = %e, "notifications: pruning failed");
                }
            }
            let busy = match self.tick(&state).await {
                Ok(sent) => sent > 0,
                Err(e) => {
                    tracing::warn!(error.message = %e, "notifications: round failed");
                    false
                }
            };
            if busy {
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                _ = events.recv() => {
                    // A burst of changes makes one round, not one round each.
                    while events.try_recv().is_ok() {}
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One round: fan out everything new, then send what is due. Returns how many were sent.
    ///
    /// # Errors
    /// [`Error::Db`].
    pub async fn tick(&self, state: &AppState) -> Result<usize> {
        let subs = notification_subscriptions::Entity::find()
            .filter(notification_subscriptions::Column::Enabled.eq(true))
            .all(&state.db)
            .await?;
        if subs.is_empty() {
            return Ok(0);
        }
        while fan_out(state, &subs).await? == BATCH as usize {}
        self.deliver_due(state, &subs).await
    }

    async fn deliver_due(
        &self,
        state: &AppState,
        subs: &[notification_subscriptions::Model],
    ) -> Result<usize> {
        let now = state.clock.now();
        let mut due = Vec::new();
        for sub in subs {
            let pending = notification_deliveries::Entity::find()
                .filter(notification_deliveries::Column::SubscriptionId.eq(&sub.id))
                .filter(notification_deliveries::Column::Status.eq("pending"))
                .order_by_asc(notification_deliveries::Column::Id)
                .limit(PER_SUBSCRIPTION)
                .all(&state.db)
                .await?;
            if pending.is_empty() {
                continue;
            }
            let records: HashMap<i64, outbox::Model> = outbox::Entity::find()
                .filter(outbox::Column::Id.is_in(pending.iter().map(|d| d.outbox_id)))
                .all(&state.db)
                .await?
                .into_iter()
                .map(|o| (o.id, o))
                .collect();
            // In order per aggregate: only each one's oldest unfinished delivery may go.
            let mut seen = HashSet::new();
            for d in pending {
                let Some(record) = records.get(&d.outbox_id) else {
                    continue;
                };
                if seen.insert(record.aggregate_id.clone()) && d.next_attempt_at <= now.as_millis()
                {
                    due.push((d, record.clone(), sub.clone()));
                }
            }
        }
        let n = due.len();
        let results: Vec<Result<()>> = futures::stream::iter(due)
            .map(|(delivery, record, sub)| self.deliver(state, delivery, record, sub))
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect()
            .await;
        for r in results {
            r?;
        }
        Ok(n)
    }

    async fn deliver(
        &self,
        state: &AppState,
        delivery: notification_deliveries::Model,
        record: outbox::Model,
        sub: notification_subscriptions::Model,
    ) -> Result<()> {
        if !claim(state, &delivery, self.settings.timeout).await? {
            // Another instance is sending it.
            return Ok(());
        }
        let prepared = state
            .sealer
            .open(&sub.id, &sub.secret_enc)
            .map_err(Error::from)
            .and_then(|secret| Ok((secret, notification_body(&record)?)));
        let (secret, body) = match prepared {
            Ok(p) => p,
            Err(e) => {
                // Our fault, and it will not get better by retrying: record it and let the next go.
                tracing::error!(delivery_id = delivery.id, error.message = %e, "notification cannot be built");
                let mut row: notification_deliveries::ActiveModel = delivery.into();
                row.status = Set("failed".to_owned());
                row.last_error = Set(Some(format!("internal error: {e}")));
                row.update(&state.db).await?;
                return Ok(());
            }
        };
        let at = state.clock.now();
        let signature = sign(secret.expose_secret(), at, &body);
        let literal = url::Url::parse(&sub.url).ok().and_then(|u| match u.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        });
        if let Some(ip) = literal.filter(|ip| !self.settings.allow_private && is_private(*ip)) {
            // Refused before any connection (IP literals are never resolved).
            let mut row: notification_deliveries::ActiveModel = delivery.into();
            row.status = Set("failed".to_owned());
            row.last_error = Set(Some(format!(
                "{ip} is a private or loopback address (notifications.allow_private is off)"
            )));
            row.update(&state.db).await?;
            return Ok(());
        }
        let outcome = self
            .client
            .post(&sub.url)
            .header("content-type", "application/json")
            .header("x-updraft-signature", signature)
            .header("x-updraft-delivery", delivery.id.to_string())
            .header("x-updraft-resource", resource_of_kind(&record.kind))
            .body(body)
            .send()
            .await;
        let (status, error) = match outcome {
            Ok(resp) if resp.status().is_success() => (Some(resp.status().as_u16()), None),
            Ok(resp) => (
                Some(resp.status().as_u16()),
                Some(format!("the receiver answered {}", resp.status())),
            ),
            Err(e) => (None, Some(describe(&e))),
        };
        let attempts = delivery.attempts.saturating_add(1);
        let now = state.clock.now().as_millis();
        let mut row: notification_deliveries::ActiveModel = delivery.into();
        row.claimed_by = Set(None);
        row.claimed_until = Set(None);
        row.attempts = Set(attempts);
        row.last_http_status = Set(status.map(i32::from));
        let outcome = match error {
            None => {
                row.status = Set("delivered".to_owned());
                row.delivered_at = Set(Some(now));
                "delivered"
            }
            Some(error) => {
                let gave_up =
                    u32::try_from(attempts).unwrap_or(u32::MAX) >= self.settings.max_attempts;
                tracing::info!(
                    subscription_id = %sub.id, url = %sub.url, attempts, gave_up, error = %error,
                    "notification not delivered"
                );
                row.last_error = Set(Some(error));
                if gave_up {
                    row.status = Set("failed".to_owned());
                    "abandoned"
                } else {
                    let wait = backoff(attempts, self.settings.max_backoff);
                    row.next_attempt_at =
                        Set(now + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2));
                    "failed"
                }
            }
        };
        row.update(&state.db).await?;
        state
            .metrics
            .webhook_deliveries
            .get_or_create(&crate::metrics::OutcomeLabels { outcome })
            .inc();
        Ok(())
    }
}

/// Claims `delivery` for this instance for as long as one attempt may take (and a margin): whoever
/// claims it sends it, so each delivery goes out from one instance. A claim left by an instance that died
/// mid-attempt expires. Returns whether this instance got it.
async fn claim(
    state: &AppState,
    delivery: &notification_deliveries::Model,
    timeout: Duration,
) -> Result<bool> {
    let now = state.clock.now().as_millis();
    let until = now + i64::try_from((timeout + Duration::from_secs(30)).as_millis()).unwrap_or(0);
    let claimed = notification_deliveries::Entity::update_many()
        .col_expr(
            notification_deliveries::Column::ClaimedBy,
            Expr::value(state.instance_id()),
        )
        .col_expr(
            notification_deliveries::Column::ClaimedUntil,
            Expr::value(until),
        )
        .filter(notification_deliveries::Column::Id.eq(delivery.id))
        .filter(notification_deliveries::Column::Status.eq("pending"))
        .filter(notification_deliveries::Column::Attempts.eq(delivery.attempts))
        .filter(
            sea_orm::Condition::any()
                .add(notification_deliveries::Column::ClaimedUntil.is_null())
                .add(notification_deliveries::Column::ClaimedUntil.lt(now)),
        )
        .exec(&state.db)
        .await?;
    Ok(claimed.rows_affected == 1)
}

/// The wait before attempt `attempts + 1`: 1 s, 2 s, 4 s... capped.
fn backoff(attempts: i32, max: Duration) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(30);
    Duration::from_secs(1u64 << exp).min(max)
}

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// `t=<ms>,v1=<hex HMAC-SHA256(secret, "<ms>.<body>")>`.
#[must_use]
pub fn sign(secret: &str, at: Timestamp, body: &[u8]) -> String {
    let t = at.as_millis();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn resource_of_kind(kind: &str) -> &'static str {
    if kind == "task.changed" {
        BATCHTASK
    } else {
        BATCHTASK_DEVICE
    }
}

/// Resolves callback host names, dropping private addresses unless they are allowed.
struct Resolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let allow_private = self.allow_private;
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let usable: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| allow_private || !is_private(a.ip()))
                .collect();
            if usable.is_empty() {
                return Err(format!(
                    "{host} resolves only to private or loopback addresses (notifications.allow_private is off)"
                )
                .into());
            }
            Ok(Box::new(usable.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// How often old deliveries and outbox records are pruned (ms on the injected clock).
const PRUNE_EVERY_MS: i64 = 3_600_000;

/// Deletes finished (delivered or failed) deliveries created before `now - retention`, then outbox
/// records created before it that no remaining delivery refers to. Returns (deliveries, records) deleted.
///
/// # Errors
/// [`Error::Db`].
pub async fn prune(state: &AppState, now: Timestamp, retention: Duration) -> Result<(u64, u64)> {
    let cutoff = now.as_millis() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let deliveries = notification_deliveries::Entity::delete_many()
        .filter(notification_deliveries::Column::CreatedAt.lt(cutoff))
        .filter(notification_deliveries::Column::Status.ne("pending"))
        .exec(&state.db)
        .await?
        .rows_affected;
    let still_needed = notification_deliveries::Entity::find()
        .select_only()
        .column(notification_deliveries::Column::OutboxId)
        .into_query();
    let records = outbox::Entity::delete_many()
        .filter(outbox::Column::CreatedAt.lt(cutoff))
        .filter(outbox::Column::Id.not_in_subquery(still_needed))
        .exec(&state.db)
        .await?
        .rows_affected;
    if deliveries + records > 0 {
        tracing::info!(deliveries, records, "notifications: pruned old records");
    }
    Ok((deliveries, records))
}

/// The JSON a receiver gets for an outbox record: IoTDA's notification envelope
/// (`resource`, `event`, `event_time`, `notify_data.body`).
fn notification_body(record: &outbox::Model) -> Result<Vec<u8>> {
    let event: Value = serde_json::from_str(&record.payload)
        .map_err(|e| Error::Internal(format!("outbox {}: {e}", record.id)))?;
    let at = Timestamp::from_millis(record.created_at);
    let body = if record.kind == "task.changed" {
        // IoTDA's batch-task notification body, plus the counters.
        json!({
            "app_id": event["app_id"],
            "task_id": event["task_id"],
            "task_type": event["task_type"],
            "status": event["status"],
            "status_desc": event["status_desc"],
            "task_progress": event["task_progress"],
        })
    } else {
        let error = if event["error_code"].is_null() {
            Value::Null
        } else {
            json!({"error_code": event["error_code"], "error_msg": event["error_msg"]})
        };
        json!({
            "task_id": event["task_id"],
            "target": event["device_id"],
            "status": event["status"],
            "step": event["step"],
            "progress": event["progress"],
            "attempts": event["attempts"],
            "error": error,
        })
    };
    serde_json::to_vec(&json!({
        "resource": resource_of_kind(&record.kind),
        "event": "update",
        "event_time": at.to_compact(),
        "event_time_ms": at.to_iso_millis(),
        "request_id": request_id(record),
        "notify_data": {"header": {"project_id": record.project_id}, "body": body},
    }))
    .map_err(|e| Error::Internal(e.to_string()))
}

/// A notification's `request_id`: UUID-shaped, derived from the outbox record, so that every delivery
/// of one change (retries, and every receiver) carries the same one and a receiver can drop repeats.
fn request_id(record: &outbox::Model) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!(
        "updraft-outbox:{}:{}",
        record.id, record.created_at
    ));
    let hex = hex::encode(&digest[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Turns outbox records not yet fanned out into pending deliveries, and marks them. Returns how many
/// records it took.
async fn fan_out(state: &AppState, subs: &[notification_subscriptions::Model]) -> Result<usize> {
    let records = outbox::Entity::find()
        .filter(outbox::Column::FannedAt.is_null())
        .order_by_asc(outbox::Column::Id)
        .limit(BATCH)
        .all(&state.db)
        .await?;
    if records.is_empty() {
        return Ok(0);
    }
    let now = state.clock.now().as_millis();
    let txn = crate::db::begin_write(&state.db).await?;
    // Write first (see `driver::apply_in`): mark the records; if another instance took some meanwhile,
    // leave them all to it.
    let marked = outbox::Entity::update_many()
        .col_expr(outbox::Column::FannedAt, Expr::value(now))
        .filter(outbox::Column::Id.is_in(records.iter().map(|r| r.id)))
        .filter(outbox::Column::FannedAt.is_null())
        .exec(&txn)
        .await?;
    if marked.rows_affected != records.len() as u64 {
        return Ok(0);
    }
    let mut rows = Vec::new();
    for record in &records {
        for sub in subs
            .iter()
            .filter(|s| s.project_id == record.project_id && s.created_at <= record.created_at)
        {
            let wanted = subscriptions::outbox_kind(&subscriptions::resource_of(sub));
            if wanted == Some(record.kind.as_str()) {
                rows.push(notification_deliveries::ActiveModel {
                    outbox_id: Set(record.id),
                    subscription_id: Set(sub.id.clone()),
                    status: Set("pending".to_owned()),
                    attempts: Set(0),
                    next_attempt_at: Set(now),
                    last_http_status: Set(None),
                    last_error: Set(None),
                    delivered_at: Set(None),
                    created_at: Set(now),
                    ..Default::default()
                });
            }
        }
    }
    for chunk in rows.chunks(200) {
        notification_deliveries::Entity::insert_many(chunk.to_vec())
            .exec(&txn)
            .await?;
    }
    txn.commit().await?;
    Ok(records.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child process of [`deliveries_ignore_proxies_from_the_environment`].
    const PROXY_CHILD: &str = "UPDRAFT_TEST_PROXY_CHILD";

    /// A proxy from the environment would resolve callback names past the private-address check, so
    /// the notifier's client ignores it. The environment is read when a client is built, so the check
    /// runs in a child process of this test binary started with `HTTPS_PROXY` set.
    #[test]
    fn deliveries_ignore_proxies_from_the_environment() {
        if std::env::var_os(PROXY_CHILD).is_some() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let notifier = Notifier::new(NotifySettings::default()).unwrap();
                // TEST-NET-1: nothing answers; through the proxy, the proxy would be asked.
                let _ = notifier
                    .client
                    .get("https://192.0.2.1/hook")
                    .timeout(Duration::from_millis(500))
                    .send()
                    .await;
            });
            return;
        }
        let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "notify::tests::deliveries_ignore_proxies_from_the_environment",
            ])
            .env(PROXY_CHILD, "1")
            .env(
                "HTTPS_PROXY",
                format!("http://{}", proxy.local_addr().unwrap()),
            )
            .env(
                "https_proxy",
                format!("http://{}", proxy.local_addr().unwrap()),
            )
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .status()
            .unwrap();
        assert!(status.success());
        proxy.set_nonblocking(true).unwrap();
        assert!(
            proxy.accept().is_err(),
            "the notifier connected to the proxy from the environment"
        );
    }

    #[tokio::test]
    async fn names_resolving_only_to_private_addresses_are_refused() {
        use reqwest::dns::Resolve;
        let name = || "localhost".parse::<reqwest::dns::Name>().unwrap();
        let Err(e) = (Resolver {
            allow_private: false,
        })
        .resolve(name())
        .await
        else {
            panic!("localhost was resolved");
        };
        assert!(e.to_string().contains("private or loopback"), "{e}");
        let allowed: Vec<SocketAddr> = (Resolver {
            allow_private: true,
        })
        .resolve(name())
        .await
        .unwrap()
        .collect();
        assert!(allowed.iter().all(|a| a.ip().is_loopback()) && !allowed.is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let max = Duration::from_secs(3600);
        let waits: Vec<u64> = (1..=14).map(|a| backoff(a, max).as_secs()).collect();
        assert_eq!(
            waits,
            [
                1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600
            ]
        );
    }

    #[test]
    fn signatures_cover_the_time_and_the_body() {
        let at = Timestamp::from_millis(1_700_000_000_000);
        let a = sign("secret", at, b"{}");
        assert!(a.starts_with("t=1700000000000,v1="));
        assert_ne!(a, sign("secret", at, b"{ }"));
        assert_ne!(a, sign("other", at, b"{}"));
        assert_ne!(
            a,
            sign("secret", Timestamp::from_millis(1_700_000_000_001), b"{}")
        );
    }
}
