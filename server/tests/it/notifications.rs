//! Push notifications to a real local HTTPS receiver: signed, retried after failures, in order per task,
//! and delivered after a server restart.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use backend::clock::Clock;
use backend::service::{devices, products, projects, subscriptions, tasks};
use backend::storage::entity::outbox;
use hmac::{Hmac, Mac};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use secrecy::ExposeSecret;
use serde_json::Value;
use sha2::Sha256;

use crate::helpers::{TestApp, settings_for, spawn_with};

/// What the receiver saw: every POST, with whether it accepted it.
#[derive(Default)]
pub(crate) struct Received {
    posts: Mutex<Vec<(HeaderMap, Vec<u8>, bool)>>,
    failing: AtomicBool,
}

impl Received {
    pub(crate) fn accepted(&self) -> Vec<(HeaderMap, Value)> {
        self.accepted_raw()
            .into_iter()
            .map(|(h, b)| (h, serde_json::from_slice(&b).unwrap()))
            .collect()
    }

    pub(crate) fn accepted_raw(&self) -> Vec<(HeaderMap, Vec<u8>)> {
        self.posts
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, ok)| *ok)
            .map(|(h, b, _)| (h.clone(), b.clone()))
            .collect()
    }

    fn refused(&self) -> usize {
        self.posts
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, ok)| !ok)
            .count()
    }
}

async fn hook(
    State(r): State<Arc<Received>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let fail = r.failing.load(Ordering::SeqCst);
    r.posts
        .lock()
        .unwrap()
        .push((headers, body.to_vec(), !fail));
    if fail {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// An HTTPS receiver on 127.0.0.1 port 0 with its own self-signed certificate (PEM returned).
pub(crate) async fn receiver() -> (SocketAddr, Arc<Received>, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = cert.cert.pem();
    let key_pem = cert.signing_key.serialize_pem();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        cert_pem.clone().into_bytes(),
        key_pem.into_bytes(),
    )
    .await
    .unwrap();
    let received = Arc::new(Received::default());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(received.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    tokio::spawn(async move {
        axum_server::from_tcp_rustls(listener, tls)
            .unwrap()
            .serve(app.into_make_service())
            .await
            .unwrap();
    });
    (addr, received, cert_pem.into_bytes())
}

/// Checks `X-Updraft-Signature` over the raw bytes received, as a receiver must.
fn verify(secret: &str, headers: &HeaderMap, raw: &[u8]) -> bool {
    let sig = headers["x-updraft-signature"].to_str().unwrap();
    let (t, v1) = sig
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(raw);
    hex::encode(mac.finalize().into_bytes()) == v1
}

pub(crate) async fn app_with_receiver(dir: &std::path::Path, ca: &[u8]) -> TestApp {
    let ca_path = dir.join("receiver-ca.pem");
    std::fs::write(&ca_path, ca).unwrap();
    let mut settings = settings_for(dir);
    settings.notifications.extra_ca = Some(ca_path);
    spawn_with(settings).await
}

/// Polls (real time, bounded) until `done`.
pub(crate) async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..300 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn notifications_are_signed_retried_in_order_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, received, ca) = receiver().await;
    let app = app_with_receiver(dir.path(), &ca).await;
    let project = projects::ensure_default(&app.state).await.unwrap().id;
    let url = format!("https://localhost:{}/hook", addr.port());
    let sub = subscriptions::create(&app.state, &project, "batchtask", "update", &url)
        .await
        .unwrap();
    let secret = sub.secret.expose_secret().to_owned();
    // Bad subscriptions are refused with the field named.
    for (resource, url) in [
        ("nonsense", url.as_str()),
        ("batchtask", "http://localhost/x"),
    ] {
        let e = subscriptions::create(&app.state, &project, resource, "update", url)
            .await
            .unwrap_err();
        assert!(matches!(e, backend::Error::Validation(_)), "{e}");
    }

    products::create(
        &app.state,
        &project,
        products::NewProduct {
            product_id: Some("meter".into()),
            name: "Meter".into(),
            device_type: "Meter".into(),
            protocol_type: "MQTT".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for node in ["a", "b"] {
        devices::register(
            &app.state,
            &project,
            devices::NewDevice {
                product_id: "meter".into(),
                node_id: node.into(),
                device_id: Some(format!("dev-{node}")),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let package = backend::service::packages::upload(
        &app.state,
        &project,
        domain::package::PackageMetaInput {
            package_type: "softwarePackage".into(),
            product_id: "meter".into(),
            version: "2.0".into(),
            file_name: "app.bin".into(),
            ..Default::default()
        },
        futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"app"))]),
    )
    .await
    .unwrap();

    // The receiver is down while a task starts and stops: its notifications wait and are retried.
    received.failing.store(true, Ordering::SeqCst);
    let task = tasks::create(
        &app.state,
        &project,
        tasks::NewTask {
            task_name: "notify".into(),
            task_type: "softwareUpgrade".into(),
            package_id: package.id.clone(),
            targets: vec!["dev-a".into(), "dev-b".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    eventually("a refused attempt", || received.refused() >= 1).await;
    // Only the oldest of the task's notifications is tried while it fails: order is kept.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tried: Vec<Value> = received
        .posts
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b, _)| serde_json::from_slice(b).unwrap())
        .collect();
    assert!(
        tried.windows(2).all(|w| w[0] == w[1]),
        "only the first notification is retried while it fails: {tried:?}"
    );
    tasks::stop(&app.state, &project, &task.id, None)
        .await
        .unwrap();

    // Back up: after the backoff every notification arrives, in the order the outbox holds them.
    received.failing.store(false, Ordering::SeqCst);
    app.clock.advance(Duration::from_secs(10));
    let expected = outbox::Entity::find()
        .filter(outbox::Column::Kind.eq("task.changed"))
        .filter(outbox::Column::AggregateId.eq(task.id.clone()))
        .order_by_asc(outbox::Column::Id)
        .all(&app.state.db)
        .await
        .unwrap();
    assert!(expected.len() >= 2, "a start and a stop at least");
    eventually("every notification", || {
        received.accepted().len() >= expected.len()
    })
    .await;
    let got = received.accepted();
    let statuses: Vec<String> = got
        .iter()
        .map(|(_, b)| {
            b["notify_data"]["body"]["status"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let want: Vec<String> = expected
        .iter()
        .map(|o| {
            serde_json::from_str::<Value>(&o.payload).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(statuses, want, "in order, each once");
    for (headers, raw) in received.accepted_raw() {
        assert!(verify(&secret, &headers, &raw), "signed with the secret");
        assert!(!verify("another secret", &headers, &raw));
    }
    let ids: std::collections::HashSet<String> = got
        .iter()
        .map(|(h, _)| h["x-updraft-delivery"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), got.len(), "each delivery once");
    for (headers, body) in &got {
        assert_eq!(body["resource"], "batchtask");
        assert_eq!(body["event"], "update");
        assert_eq!(body["notify_data"]["body"]["task_id"], task.id.as_str());
        assert_eq!(headers["x-updraft-resource"], "batchtask");
    }
    let deliveries =
        subscriptions::deliveries(&app.state, &project, &sub.subscription.id, true, 50)
            .await
            .unwrap();
    assert!(
        deliveries.iter().any(|d| d.status == "delivered"
            && d.attempts >= 2
            && d.last_error.as_deref().is_some_and(|e| e.contains("503"))),
        "the retried delivery shows its earlier failure: {deliveries:?}"
    );

    // Pending deliveries survive a crash: the receiver is down, the server dies, a new one delivers.
    received.failing.store(true, Ordering::SeqCst);
    let before = received.accepted().len();
    let second = tasks::create(
        &app.state,
        &project,
        tasks::NewTask {
            task_name: "after_restart".into(),
            task_type: "softwareUpgrade".into(),
            package_id: package.id.clone(),
            targets: vec!["dev-a".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    eventually("a refused attempt for the second task", || {
        received
            .posts
            .lock()
            .unwrap()
            .iter()
            .any(|(_, b, ok)| !ok && String::from_utf8_lossy(b).contains(&second.id))
    })
    .await;
    let now = app.clock.now();
    app.kill().await;
    received.failing.store(false, Ordering::SeqCst);
    let app = app_with_receiver(dir.path(), &ca).await;
    app.clock.set(now.plus(Duration::from_secs(60)));
    eventually("the second task's notification after the restart", || {
        received.accepted()[before..]
            .iter()
            .any(|(_, b)| b["notify_data"]["body"]["task_id"] == second.id.as_str())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn old_finished_deliveries_and_unneeded_outbox_records_are_pruned() {
    use backend::storage::entity::notification_deliveries as deliveries;
    use sea_orm::{ActiveModelTrait, Set};
    let dir = tempfile::tempdir().unwrap();
    // No notifier running: its own hourly pruning would race with this test's.
    let mut settings = settings_for(dir.path());
    settings.notifications.enabled = false;
    let app = spawn_with(settings).await;
    let project = projects::ensure_default(&app.state).await.unwrap().id;
    let sub = subscriptions::create(
        &app.state,
        &project,
        "batchtask",
        "update",
        "https://localhost:9/hook",
    )
    .await
    .unwrap();
    let day: i64 = 24 * 3600 * 1000;
    let now = app.clock.now();
    let old = now.as_millis() - 8 * day;
    // (outbox record created at, its delivery's status if any)
    let rows = [
        (old, Some("delivered")),
        (old, Some("failed")),
        (old, Some("pending")), // a receiver down for 8 days: kept, and its record
        (old, None),            // nobody wanted it
        (now.as_millis() - day, Some("delivered")), // recent: kept
        (now.as_millis() - day, None),
    ];
    for (i, (at, status)) in rows.iter().enumerate() {
        let record = outbox::ActiveModel {
            project_id: Set(project.clone()),
            kind: Set("batchtask".to_owned()),
            aggregate_id: Set(format!("task-{i}")),
            payload: Set("{}".to_owned()),
            created_at: Set(*at),
            fanned_at: Set(status.map(|_| *at)),
            ..Default::default()
        }
        .insert(&app.state.db)
        .await
        .unwrap();
        if let Some(status) = status {
            deliveries::ActiveModel {
                outbox_id: Set(record.id),
                subscription_id: Set(sub.subscription.id.clone()),
                status: Set((*status).to_owned()),
                attempts: Set(1),
                next_attempt_at: Set(*at),
                created_at: Set(*at),
                ..Default::default()
            }
            .insert(&app.state.db)
            .await
            .unwrap();
        }
    }
    let pruned = backend::notify::prune(&app.state, now, Duration::from_secs(7 * 24 * 3600))
        .await
        .unwrap();
    assert_eq!(pruned, (2, 3), "(deliveries, outbox records)");
    let left: Vec<String> = outbox::Entity::find()
        .order_by_asc(outbox::Column::Id)
        .all(&app.state.db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.aggregate_id)
        .collect();
    assert_eq!(left, ["task-2", "task-4", "task-5"]);
    let statuses: Vec<String> = deliveries::Entity::find()
        .all(&app.state.db)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.status)
        .collect();
    assert_eq!(statuses, ["pending", "delivered"]);
    app.stop().await;
}

#[tokio::test]
async fn callback_urls_on_internal_addresses_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings_for(dir.path());
    settings.notifications.allow_private = false;
    let app = spawn_with(settings).await;
    let project = projects::ensure_default(&app.state).await.unwrap().id;
    for url in [
        "https://localhost:9443/hook",
        "https://127.0.0.1/hook",
        "https://10.0.0.7/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://app.localhost/hook",
    ] {
        let e = subscriptions::create(&app.state, &project, "batchtask", "update", url)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("loopback or private"), "{url}: {e}");
    }
    subscriptions::create(
        &app.state,
        &project,
        "batchtask",
        "update",
        "https://8.8.8.8/hook",
    )
    .await
    .expect("a public address is fine");
    app.stop().await;
}

#[tokio::test]
async fn a_routing_rule_forwards_iotdas_batch_task_notification_while_active() {
    use crate::api::{application, json_of};
    let dir = tempfile::tempdir().unwrap();
    let (addr, received, ca) = receiver().await;
    let app = app_with_receiver(dir.path(), &ca).await;
    let fx = crate::tasks::fixture(&app).await;
    let a = application(&app, &fx.project).await;
    let d = crate::tasks::register(&app, &fx, "dev-r").await;
    let url = format!("https://localhost:{}/hook", addr.port());
    let rule = json_of(
        a.call(
            "POST",
            "/routing-rule/rules",
            &[],
            Some(&serde_json::json!({"rule_name": "tasks", "subject": {"resource": "batchtask", "event": "update"},
                                     "app_type": "GLOBAL"})),
        )
        .await,
        201,
    )
    .await;
    assert_eq!(
        rule["active"], false,
        "created inactive, as on IoTDA: {rule}"
    );
    let rule_id = rule["rule_id"].as_str().unwrap().to_owned();
    let refused = json_of(
        a.call(
            "POST",
            "/routing-rule/rules",
            &[],
            Some(&serde_json::json!({"rule_name": "props", "subject": {"resource": "device.property", "event": "report"}})),
        )
        .await,
        400,
    )
    .await;
    assert!(
        refused["error_msg"]
            .as_str()
            .unwrap()
            .contains("subject.resource"),
        "{refused}"
    );
    let action = json_of(
        a.call(
            "POST",
            "/routing-rule/actions",
            &[],
            Some(&serde_json::json!({"rule_id": rule_id, "channel": "HTTP_FORWARDING",
                                     "channel_detail": {"http_forwarding": {"url": url, "token": "tok-123"}}})),
        )
        .await,
        201,
    )
    .await;
    let action_id = action["action_id"].as_str().unwrap().to_owned();
    assert_eq!(
        action["channel_detail"]["http_forwarding"]["token"],
        "tok-123"
    );
    // UpdateRuleAction: a bad URL is refused; a new token signs from then on.
    let bad = json_of(
        a.call(
            "PUT",
            &format!("/routing-rule/actions/{action_id}"),
            &[],
            Some(&serde_json::json!({"channel_detail": {"http_forwarding": {"url": "ftp://x/"}}})),
        )
        .await,
        400,
    )
    .await;
    assert!(bad["error_msg"].as_str().unwrap().contains("url"), "{bad}");
    json_of(
        a.call(
            "PUT",
            &format!("/routing-rule/actions/{action_id}"),
            &[],
            Some(&serde_json::json!({"channel_detail": {"http_forwarding": {"url": url, "token": "tok-456"}}})),
        )
        .await,
        200,
    )
    .await;

    // Inactive: a task's changes are not forwarded.
    let first = tasks::create(
        &app.state,
        &fx.project,
        crate::tasks::new_task(&fx, "quiet", &[&d]),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        received.accepted().is_empty(),
        "nothing while the rule is inactive"
    );

    let active = json_of(
        a.call(
            "PUT",
            &format!("/routing-rule/rules/{rule_id}"),
            &[],
            Some(&serde_json::json!({"active": true})),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(active["active"], true);
    app.clock.advance(Duration::from_millis(10));
    tasks::stop(&app.state, &fx.project, &first.id, None)
        .await
        .unwrap();
    eventually("the stop's notification", || {
        received
            .accepted()
            .iter()
            .any(|(_, b)| b["notify_data"]["body"]["status"] == "Stopped")
    })
    .await;
    let apps = json_of(a.call("GET", "/apps", &[], None).await, 200).await;
    for (headers, raw) in received.accepted_raw() {
        assert!(
            verify("tok-456", &headers, &raw),
            "signed with the action's new token"
        );
        let b: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(b["resource"], "batchtask");
        assert_eq!(b["event"], "update");
        // IoTDA's shape: a string timestamp, a request id, and the body's app_id and task_type.
        let ms = b["event_time_ms"].as_str().unwrap();
        assert!(
            ms.len() == 24 && ms.ends_with('Z') && ms.contains('.'),
            "{b}"
        );
        let request_id = b["request_id"].as_str().unwrap();
        assert_eq!(request_id.len(), 36, "{b}");
        assert_eq!(request_id.matches('-').count(), 4, "{b}");
        let body = &b["notify_data"]["body"];
        assert_eq!(
            body["task_id"],
            first.id.as_str(),
            "only what happened after the activation"
        );
        assert_eq!(body["task_type"], "softwareUpgrade");
        assert_eq!(body["app_id"], apps["applications"][0]["app_id"]);
        assert!(body["status_desc"].is_string(), "{b}");
    }

    // Deactivated: nothing more. Deleted: its action goes with it.
    json_of(
        a.call(
            "PUT",
            &format!("/routing-rule/rules/{rule_id}"),
            &[],
            Some(&serde_json::json!({"active": false})),
        )
        .await,
        200,
    )
    .await;
    let before = received.accepted().len();
    let second = tasks::create(
        &app.state,
        &fx.project,
        crate::tasks::new_task(&fx, "after", &[&d]),
    )
    .await
    .unwrap();
    tasks::stop(&app.state, &fx.project, &second.id, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(received.accepted().len(), before);
    let listed = json_of(
        a.call(
            "GET",
            "/routing-rule/actions",
            &[("rule_id", rule_id.as_str())],
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(listed["count"], 1, "{listed}");
    assert!(
        listed["actions"][0]["channel_detail"]["http_forwarding"]
            .get("token")
            .is_none()
    );
    let deleted = a
        .call(
            "DELETE",
            &format!("/routing-rule/rules/{rule_id}"),
            &[],
            None,
        )
        .await;
    assert_eq!(deleted.status().as_u16(), 204);
    json_of(
        a.call(
            "GET",
            &format!("/routing-rule/actions/{action_id}"),
            &[],
            None,
        )
        .await,
        404,
    )
    .await;
    app.stop().await;
}
