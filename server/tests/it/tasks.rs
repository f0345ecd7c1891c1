//! Upgrade tasks end to end over real sockets: simulated devices (`server::sim`) log in over MQTT on port 0,
//! answer `version_query`, download over HTTPS with their token and report; the server's task driver runs
//! on a manual clock, so 3-minute, 24-hour and 25-hour waits pass in milliseconds.

use std::sync::Arc;
use std::time::Duration;

use backend::service::{devices, packages, products, tasks};
use backend::storage::entity::{download_tokens, outbox, subtasks};
use bytes::Bytes;
use domain::Timestamp;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use secrecy::SecretString;
use serde_json::{Value, json};
use server::sim::{Behaviour, SimDevice, SimOptions, SimStats, run_fleet};
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, settings_for, spawn_app, spawn_with};

const PRODUCT: &str = "meter";
const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

pub(crate) struct Fixture {
    pub(crate) project: String,
    pub(crate) package: String,
    file: Vec<u8>,
}

/// A product, a 100 KiB software package 2.0 (from 1.0 or 1.1) and nothing else.
pub(crate) async fn fixture(app: &TestApp) -> Fixture {
    let project = backend::service::projects::ensure_default(&app.state)
        .await
        .unwrap()
        .id;
    products::create(
        &app.state,
        &project,
        products::NewProduct {
            product_id: Some(PRODUCT.into()),
            name: "Smart meter".into(),
            device_type: "Meter".into(),
            protocol_type: "MQTT".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let file: Vec<u8> = (0..100 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(file.clone()))]);
    let package = packages::upload(
        &app.state,
        &project,
        domain::package::PackageMetaInput {
            package_type: "softwarePackage".into(),
            product_id: PRODUCT.into(),
            version: "2.0".into(),
            support_source_versions: vec!["1.0".into(), "1.1".into()],
            file_name: "app-2.0.bin".into(),
            custom_info: "new features".into(),
            ..Default::default()
        },
        body,
    )
    .await
    .unwrap();
    Fixture {
        project,
        package: package.id,
        file,
    }
}

pub(crate) async fn register(app: &TestApp, fx: &Fixture, id: &str) -> SimDevice {
    let secret = format!("secret_{id}");
    devices::register(
        &app.state,
        &fx.project,
        devices::NewDevice {
            // Plain MQTT: IoTDA refuses a `secure_access` device on 1883.
            secure_access: Some(false),
            product_id: PRODUCT.into(),
            node_id: id.into(),
            device_id: Some(id.into()),
            secret: Some(SecretString::from(secret.clone())),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    SimDevice {
        device_id: id.into(),
        secret,
    }
}

/// Simulated devices connected to `app` (plain MQTT unless `opts.tls`), logging in on the app's clock.
pub(crate) struct Fleet {
    stop: CancellationToken,
    pub(crate) stats: Arc<SimStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Fleet {
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

pub(crate) fn fleet(app: &TestApp, devices: Vec<SimDevice>, opts: SimOptions) -> Fleet {
    let addr = if opts.tls { app.mqtts } else { app.mqtt };
    fleet_at(app, addr, devices, opts)
}

/// [`fleet`] connecting to `addr` (a balancer in front of several instances).
pub(crate) fn fleet_at(
    app: &TestApp,
    addr: std::net::SocketAddr,
    devices: Vec<SimDevice>,
    opts: SimOptions,
) -> Fleet {
    let opts = SimOptions {
        host: "localhost".into(),
        port: addr.port(),
        ca_pem: app.ca_pem.clone(),
        ..opts
    };
    let stop = CancellationToken::new();
    let stats = Arc::new(SimStats::default());
    let clock = app.clock.clone();
    let now: Arc<dyn Fn() -> i64 + Send + Sync> = Arc::new(move || {
        use backend::clock::Clock;
        clock.now().as_millis()
    });
    let task = tokio::spawn({
        let (stop, stats) = (stop.clone(), stats.clone());
        async move {
            run_fleet(opts, devices, now, stats, stop).await.unwrap();
        }
    });
    Fleet { stop, stats, task }
}

pub(crate) fn new_task(fx: &Fixture, name: &str, targets: &[&SimDevice]) -> tasks::NewTask {
    tasks::NewTask {
        task_name: name.into(),
        task_type: "softwareUpgrade".into(),
        package_id: fx.package.clone(),
        targets: targets.iter().map(|d| d.device_id.clone()).collect(),
        ..Default::default()
    }
}

/// Polls (real time, bounded) until `done` holds for the task; returns it.
pub(crate) async fn wait_task(
    app: &TestApp,
    fx: &Fixture,
    task_id: &str,
    what: &str,
    done: impl Fn(&backend::storage::entity::tasks::Model) -> bool,
) -> backend::storage::entity::tasks::Model {
    for _ in 0..1000 {
        let t = tasks::get(&app.state, &fx.project, task_id).await.unwrap();
        if done(&t) {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = tasks::get(&app.state, &fx.project, task_id).await.unwrap();
    let details = subtask_rows(app, task_id).await;
    panic!("task never got {what}: {t:#?}\n{details:#?}");
}

pub(crate) async fn subtask_rows(app: &TestApp, task_id: &str) -> Vec<subtasks::Model> {
    subtasks::Entity::find()
        .filter(subtasks::Column::TaskId.eq(task_id))
        .all(&app.state.db)
        .await
        .unwrap()
}

async fn subtask(app: &TestApp, task_id: &str, device: &str) -> subtasks::Model {
    subtask_rows(app, task_id)
        .await
        .into_iter()
        .find(|s| s.device_id == device)
        .unwrap()
}

/// Polls until the subtask of `device` satisfies `done`.
pub(crate) async fn wait_subtask(
    app: &TestApp,
    task_id: &str,
    device: &str,
    what: &str,
    done: impl Fn(&subtasks::Model) -> bool,
) -> subtasks::Model {
    for _ in 0..1000 {
        let s = subtask(app, task_id, device).await;
        if done(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "subtask never got {what}: {:#?}",
        subtask(app, task_id, device).await
    );
}

pub(crate) async fn wait_device_status(app: &TestApp, device: &str, status: &str) {
    for _ in 0..1000 {
        let d = backend::storage::entity::devices::Entity::find_by_id(device.to_owned())
            .one(&app.state.db)
            .await
            .unwrap()
            .unwrap();
        if d.status == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("device {device} never became {status}");
}

/// A token's served bytes once `done` holds for them (they are recorded in the background when a response
/// body is dropped), or as they are after a bounded wait.
async fn wait_served(app: &TestApp, token_hash: &str, done: impl Fn(i64) -> bool) -> i64 {
    let mut served = 0;
    for _ in 0..300 {
        served = download_tokens::Entity::find_by_id(token_hash.to_owned())
            .one(&app.state.db)
            .await
            .unwrap()
            .unwrap()
            .bytes_served;
        if done(served) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    served
}

/// Moves the manual clock and lets the driver act on deadlines at once.
async fn advance(app: &TestApp, d: Duration) {
    app.clock.advance(d);
    app.state.driver.run_due(&app.state).await.unwrap();
}

fn finished(t: &backend::storage::entity::tasks::Model) -> bool {
    domain::task::TaskStatus::parse(&t.status).is_ok_and(|s| s.is_completed())
}

#[tokio::test]
async fn devices_that_never_subscribe_upgrade_over_mqtt_and_https_and_the_task_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let quiet = register(&app, &fx, "dev-quiet").await;
    let subscriber = register(&app, &fx, "dev-sub").await;
    let tls = register(&app, &fx, "dev-tls").await;
    // Python-SDK-like devices never subscribe; a C-SDK-like one does; one uses MQTT over TLS.
    let a = fleet(&app, vec![quiet.clone()], SimOptions::default());
    let b = fleet(
        &app,
        vec![subscriber.clone()],
        SimOptions {
            subscribe: true,
            ..Default::default()
        },
    );
    let c = fleet(
        &app,
        vec![tls.clone()],
        SimOptions {
            tls: true,
            ..Default::default()
        },
    );
    for d in ["dev-quiet", "dev-sub", "dev-tls"] {
        wait_device_status(&app, d, "ONLINE").await;
    }
    let task = tasks::create(
        &app.state,
        &fx.project,
        new_task(&fx, "upgrade_all", &[&quiet, &subscriber, &tls]),
    )
    .await
    .unwrap();
    assert_eq!(task.total, 3);
    let done = wait_task(&app, &fx, &task.id, "Success", finished).await;
    assert_eq!(done.status, "Success", "{done:#?}");
    assert_eq!((done.success, done.fail, done.processing), (3, 0, 0));
    for fleet in [&a, &b, &c] {
        assert_eq!(
            fleet
                .stats
                .version_reports
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(
            fleet
                .stats
                .downloads
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
    for d in ["dev-quiet", "dev-sub", "dev-tls"] {
        let s = subtask(&app, &task.id, d).await;
        assert_eq!(
            (s.status.as_str(), s.progress, s.attempts),
            ("Success", 100, 1)
        );
        assert_eq!(s.source_version.as_deref(), Some("1.0"));
        // Tokens end with their subtask, and served exactly one package.
        let tokens = download_tokens::Entity::find()
            .filter(download_tokens::Column::SubtaskId.eq(s.id))
            .all(&app.state.db)
            .await
            .unwrap();
        assert_eq!(tokens.len(), 1);
        assert!(tokens[0].revoked_at.is_some(), "revoked at success");
        let served = wait_served(&app, &tokens[0].token_hash, |n| n == fx.file.len() as i64).await;
        assert_eq!(served, fx.file.len() as i64);
        let dev = backend::storage::entity::devices::Entity::find_by_id(d.to_owned())
            .one(&app.state.db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            dev.sw_version.as_deref(),
            Some("2.0"),
            "the device's new version is recorded"
        );
    }
    let history = tasks::history(&app.state, &fx.project, &task.id, "dev-quiet")
        .await
        .unwrap();
    let steps: Vec<&str> = history.iter().map(|h| h.step.as_str()).collect();
    assert_eq!(steps.first(), Some(&"version_query"));
    assert!(steps.contains(&"upgrading"));
    assert_eq!(history.last().unwrap().status, "Success");
    // Every change went to the outbox: subtask changes and the task's.
    let events = outbox::Entity::find()
        .filter(outbox::Column::AggregateId.eq(task.id.clone()))
        .filter(outbox::Column::Kind.eq("task.changed"))
        .all(&app.state.db)
        .await
        .unwrap();
    let last: Value = serde_json::from_str(&events.last().unwrap().payload).unwrap();
    assert_eq!(last["status"], "Success");
    assert_eq!(last["task_progress"]["success"], 3);
    for f in [a, b, c] {
        f.stop().await;
    }
    app.stop().await;
}

#[tokio::test]
async fn already_on_target_succeeds_with_nothing_sent_and_refusals_fail_with_their_meaning() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let current = register(&app, &fx, "dev-current").await;
    let busy = register(&app, &fx, "dev-busy").await;
    let old = register(&app, &fx, "dev-old").await;
    let f1 = fleet(
        &app,
        vec![current.clone()],
        SimOptions {
            sw_version: "2.0".into(),
            ..Default::default()
        },
    );
    let f2 = fleet(
        &app,
        vec![busy.clone()],
        SimOptions {
            behaviour: Behaviour::Refuse,
            ..Default::default()
        },
    );
    let f3 = fleet(
        &app,
        vec![old.clone()],
        SimOptions {
            sw_version: "0.9".into(),
            ..Default::default()
        },
    );
    for d in ["dev-current", "dev-busy", "dev-old"] {
        wait_device_status(&app, d, "ONLINE").await;
    }
    let task = tasks::create(
        &app.state,
        &fx.project,
        new_task(&fx, "mixed", &[&current, &busy, &old]),
    )
    .await
    .unwrap();
    let done = wait_task(&app, &fx, &task.id, "a final status", finished).await;
    assert_eq!(done.status, "PartialSuccess");
    assert_eq!((done.success, done.fail), (1, 2));
    let s = subtask(&app, &task.id, "dev-current").await;
    assert_eq!(s.status, "Success");
    assert_eq!(
        f1.stats.upgrades.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "nothing sent"
    );
    let s = subtask(&app, &task.id, "dev-busy").await;
    assert_eq!(s.status, "Fail");
    assert_eq!(s.error_code.as_deref(), Some("DEVICE_RESULT_1"));
    assert!(
        s.error_msg.as_deref().unwrap().starts_with("device in use"),
        "{s:?}"
    );
    assert!(
        f2.stats.bytes.load(std::sync::atomic::Ordering::Relaxed) == 0,
        "a refusing device downloads nothing"
    );
    let s = subtask(&app, &task.id, "dev-old").await;
    assert_eq!(
        s.error_code.as_deref(),
        Some("SOURCE_VERSION_NOT_SUPPORTED")
    );
    // Deleting is allowed once the task has completed.
    tasks::delete(&app.state, &fx.project, &task.id)
        .await
        .unwrap();
    assert!(subtask_rows(&app, &task.id).await.is_empty());
    for f in [f1, f2, f3] {
        f.stop().await;
    }
    app.stop().await;
}

#[tokio::test]
async fn every_wait_times_out_on_the_manual_clock_and_a_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let silent = register(&app, &fx, "dev-silent").await;
    let absent = register(&app, &fx, "dev-absent").await;
    let mute = fleet(
        &app,
        vec![silent.clone()],
        SimOptions {
            behaviour: Behaviour::Silent,
            ..Default::default()
        },
    );
    wait_device_status(&app, "dev-silent", "ONLINE").await;
    let mut new = new_task(&fx, "timeouts", &[&silent, &absent]);
    new.retry_count = Some(1);
    new.retry_interval = Some(5);
    let task = tasks::create(&app.state, &fx.project, new).await.unwrap();
    let s = subtask(&app, &task.id, "dev-silent").await;
    assert_eq!(
        (s.status.as_str(), s.step.as_str()),
        ("Processing", "version_query")
    );
    let s = subtask(&app, &task.id, "dev-absent").await;
    assert_eq!(
        (s.status.as_str(), s.step.as_str()),
        ("Waitting", "wait_online")
    );
    // Deleting a running task is refused.
    let e = tasks::delete(&app.state, &fx.project, &task.id)
        .await
        .unwrap_err();
    assert!(matches!(e, backend::Error::Conflict(_)), "{e}");

    // 3 minutes without a version report: the silent device fails and waits to retry.
    advance(&app, 3 * MIN - Duration::from_millis(1)).await;
    assert_eq!(
        subtask(&app, &task.id, "dev-silent").await.status,
        "Processing"
    );
    advance(&app, Duration::from_millis(1)).await;
    let s = subtask(&app, &task.id, "dev-silent").await;
    assert_eq!(s.status, "FailWaitRetry");
    assert_eq!(s.error_code.as_deref(), Some("VERSION_REPORT_TIMEOUT"));

    // The silent device is replaced by a well-behaved one before the retry is due.
    mute.stop().await;
    wait_device_status(&app, "dev-silent", "OFFLINE").await;
    let good = fleet(&app, vec![silent.clone()], SimOptions::default());
    wait_device_status(&app, "dev-silent", "ONLINE").await;
    advance(&app, 5 * MIN).await;
    wait_subtask(&app, &task.id, "dev-silent", "Success", |s| {
        s.status == "Success"
    })
    .await;
    assert_eq!(subtask(&app, &task.id, "dev-silent").await.attempts, 2);

    // The absent device never connects: 25 hours per attempt, then the retry, then final failure.
    advance(&app, 25 * HOUR).await;
    let s = subtask(&app, &task.id, "dev-absent").await;
    assert_eq!(s.status, "FailWaitRetry");
    assert_eq!(s.error_code.as_deref(), Some("DEVICE_OFFLINE_TIMEOUT"));
    advance(&app, 5 * MIN).await;
    assert_eq!(
        subtask(&app, &task.id, "dev-absent").await.step,
        "wait_online"
    );
    advance(&app, 25 * HOUR).await;
    let s = subtask(&app, &task.id, "dev-absent").await;
    assert_eq!((s.status.as_str(), s.attempts), ("Fail", 2));
    let t = tasks::get(&app.state, &fx.project, &task.id).await.unwrap();
    assert_eq!(t.status, "PartialSuccess");

    // An operator retry of the failed device: it comes online this time and upgrades.
    let absent_fleet = fleet(&app, vec![absent.clone()], SimOptions::default());
    wait_device_status(&app, "dev-absent", "ONLINE").await;
    let r = tasks::retry(&app.state, &fx.project, &task.id, None)
        .await
        .unwrap();
    assert!(r.is_empty(), "no per-target results without targets");
    let t = wait_task(&app, &fx, &task.id, "Success", |t| t.status == "Success").await;
    assert_eq!((t.success, t.fail), (2, 0));
    good.stop().await;
    absent_fleet.stop().await;
    app.stop().await;
}

/// A hand-driven device: logs in (without subscribing) and hands every down message to the test.
pub(crate) struct RawDevice {
    client: AsyncClient,
    down: tokio::sync::mpsc::UnboundedReceiver<Value>,
    up: String,
    task: tokio::task::JoinHandle<()>,
}

pub(crate) async fn raw_device(app: &TestApp, dev: &SimDevice) -> RawDevice {
    use backend::clock::Clock;
    let (client_id, password) =
        server::sim::login(&dev.device_id, &dev.secret, 1, app.clock.now().as_millis());
    let mut o = MqttOptions::new(client_id, "127.0.0.1", app.mqtt.port());
    o.set_credentials(dev.device_id.clone(), password);
    let (client, mut events) = AsyncClient::new(o, 16);
    let (tx, down) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(e) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = e
                && let Ok(v) = serde_json::from_slice::<Value>(&p.payload)
            {
                let _ = tx.send(v);
            }
        }
    });
    RawDevice {
        client,
        down,
        up: format!("$oc/devices/{}/sys/events/up", dev.device_id),
        task,
    }
}

impl RawDevice {
    pub(crate) async fn next(&mut self, event_type: &str) -> Value {
        self.next_message(event_type).await["services"][0]["paras"].clone()
    }

    /// The next whole message of `event_type` (with its `object_device_id`).
    pub(crate) async fn next_message(&mut self, event_type: &str) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.down.recv())
                .await
                .unwrap_or_else(|_| panic!("no {event_type} within 10 s"))
                .expect("connection open");
            if m["services"][0]["event_type"] == event_type {
                return m;
            }
        }
    }

    /// Whether nothing arrives within `wait`.
    pub(crate) async fn quiet(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.down.recv()).await.is_err()
    }

    pub(crate) async fn send(&self, event_type: &str, paras: Value) {
        let msg =
            json!({"services": [{"service_id": "$ota", "event_type": event_type, "paras": paras}]});
        self.publish(&msg).await;
    }

    /// Publishes `msg` on the device's system uplink topic.
    pub(crate) async fn publish(&self, msg: &Value) {
        self.client
            .publish(
                &self.up,
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(msg).unwrap(),
            )
            .await
            .unwrap();
    }

    pub(crate) async fn close(self) {
        let _ = self.client.disconnect().await;
        self.task.abort();
    }
}

#[tokio::test]
async fn stopping_mid_download_revokes_the_token_and_the_upgrade_times_out_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let d1 = register(&app, &fx, "dev-stop").await;
    let d2 = register(&app, &fx, "dev-slow").await;
    let mut r1 = raw_device(&app, &d1).await;
    let mut r2 = raw_device(&app, &d2).await;
    wait_device_status(&app, "dev-stop", "ONLINE").await;
    wait_device_status(&app, "dev-slow", "ONLINE").await;
    let task = tasks::create(&app.state, &fx.project, new_task(&fx, "stops", &[&d1, &d2]))
        .await
        .unwrap();
    for r in [&mut r1, &mut r2] {
        r.next("version_query").await;
        r.send("version_report", json!({"sw_version": "1.1"})).await;
    }
    let up1 = r1.next("software_upgrade").await;
    let up2 = r2.next("software_upgrade").await;
    assert_eq!(up1["version"], "2.0");
    assert_eq!(up1["file_size"], fx.file.len());
    assert_eq!(up1["file_name"], "app-2.0.bin");
    assert_eq!(up1["expires"], 86400);
    assert_eq!(up1["custom_info"], "new features");
    assert_eq!(up1["task_id"], task.id.as_str());
    assert_eq!(up1["sign"].as_str().unwrap().len(), 64);
    let url = up1["url"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with(&format!(
            "https://127.0.0.1:{}/download/",
            app.base.rsplit(':').next().unwrap()
        )),
        "{url}"
    );
    let token = up1["access_token"].as_str().unwrap().to_owned();
    // The first half arrives; then the operator stops this device.
    let get = |range: &str| {
        app.client
            .get(&url)
            .header("authorization", format!("Bearer {token}"))
            .header("range", range.to_owned())
            .send()
    };
    let half = get("bytes=0-51199").await.unwrap();
    assert_eq!(half.status(), 206);
    let results = tasks::stop(
        &app.state,
        &fx.project,
        &task.id,
        Some(&["dev-stop".to_owned(), "nobody".to_owned()]),
    )
    .await
    .unwrap();
    assert_eq!(results[0].status, "success");
    assert_eq!(results[1].status, "failure");
    assert_eq!(subtask(&app, &task.id, "dev-stop").await.status, "Stopped");
    let refused = get("bytes=51200-").await.unwrap();
    assert_eq!(
        refused.status(),
        401,
        "the stopped device's token is revoked"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error_code"], "IOTDA.000002");
    // Reports after the stop change nothing.
    r1.send(
        "upgrade_progress_report",
        json!({"result_code": 0, "progress": 100, "version": "2.0"}),
    )
    .await;
    r1.send("version_report", json!({"sw_version": "2.0"}))
        .await;

    // The other device got its upgrade event but never reports: 24 hours later it fails.
    let _ = up2;
    advance(&app, 24 * HOUR - Duration::from_millis(1)).await;
    assert_eq!(
        subtask(&app, &task.id, "dev-slow").await.status,
        "Processing"
    );
    advance(&app, Duration::from_millis(1)).await;
    let s = subtask(&app, &task.id, "dev-slow").await;
    assert_eq!(s.error_code.as_deref(), Some("UPGRADE_RESULT_TIMEOUT"));
    let t = tasks::get(&app.state, &fx.project, &task.id).await.unwrap();
    assert_eq!(t.status, "Fail", "one stopped, one failed, none succeeded");
    assert_eq!(subtask(&app, &task.id, "dev-stop").await.status, "Stopped");
    r1.close().await;
    r2.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_whole_task_stop_ends_every_open_subtask_and_a_stopped_task_refuses_retry() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let d1 = register(&app, &fx, "dev-1").await;
    let d2 = register(&app, &fx, "dev-2").await;
    let task = tasks::create(
        &app.state,
        &fx.project,
        new_task(&fx, "stop_all", &[&d1, &d2]),
    )
    .await
    .unwrap();
    assert_eq!(task.status, "Processing");
    tasks::stop(&app.state, &fx.project, &task.id, None)
        .await
        .unwrap();
    let t = tasks::get(&app.state, &fx.project, &task.id).await.unwrap();
    assert_eq!((t.status.as_str(), t.stopped), ("Stopped", 2));
    let e = tasks::stop(&app.state, &fx.project, &task.id, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Stopped"), "{e}");
    let e = tasks::retry(&app.state, &fx.project, &task.id, None)
        .await
        .unwrap_err();
    assert!(matches!(e, backend::Error::Conflict(_)));
    tasks::delete(&app.state, &fx.project, &task.id)
        .await
        .unwrap();
    app.stop().await;
}

#[tokio::test]
async fn a_scheduled_task_starts_at_its_time_and_an_offline_device_upgrades_when_it_connects() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let dev = register(&app, &fx, "dev-late").await;
    let group = backend::service::groups::create(&app.state, &fx.project, "meters", "")
        .await
        .unwrap();
    backend::service::groups::add_device(&app.state, &fx.project, &group.id, "dev-late")
        .await
        .unwrap();
    use backend::clock::Clock;
    let at = app.clock.now().plus(HOUR);
    let mut new = new_task(&fx, "tonight", &[]);
    new.group_ids = vec![group.id.clone()];
    new.schedule_time = Some(at);
    let task = tasks::create(&app.state, &fx.project, new).await.unwrap();
    assert_eq!(task.status, "Waitting");
    assert_eq!(task.total, 0, "a group is resolved when the task starts");
    // Too far ahead, or in the past: refused.
    let mut bad = new_task(&fx, "far", &[&dev]);
    bad.schedule_time = Some(app.clock.now().plus(8 * 24 * HOUR));
    let e = tasks::create(&app.state, &fx.project, bad)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("7 days"), "{e}");

    advance(&app, HOUR - Duration::from_millis(1)).await;
    assert_eq!(
        tasks::get(&app.state, &fx.project, &task.id)
            .await
            .unwrap()
            .status,
        "Waitting"
    );
    advance(&app, Duration::from_millis(1)).await;
    // The server's own driver loop may be the one that claimed the start: wait for whoever did.
    let t = wait_task(&app, &fx, &task.id, "Processing", |t| {
        t.status == "Processing"
    })
    .await;
    assert_eq!(t.total, 1);
    wait_subtask(&app, &task.id, "dev-late", "wait_online", |s| {
        s.step == "wait_online"
    })
    .await;
    // Twenty hours later the device connects: the upgrade runs.
    advance(&app, 20 * HOUR).await;
    let f = fleet(&app, vec![dev], SimOptions::default());
    let t = wait_task(&app, &fx, &task.id, "Success", finished).await;
    assert_eq!(t.status, "Success");
    f.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_download_cut_halfway_resumes_with_a_range_after_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let dev = register(&app, &fx, "dev-flaky").await;
    let f = fleet(
        &app,
        vec![dev.clone()],
        SimOptions {
            behaviour: Behaviour::Resume,
            ..Default::default()
        },
    );
    wait_device_status(&app, "dev-flaky", "ONLINE").await;
    let task = tasks::create(&app.state, &fx.project, new_task(&fx, "flaky", &[&dev]))
        .await
        .unwrap();
    let t = wait_task(&app, &fx, &task.id, "Success", finished).await;
    assert_eq!(t.status, "Success");
    let s = subtask(&app, &task.id, "dev-flaky").await;
    let token = download_tokens::Entity::find()
        .filter(download_tokens::Column::SubtaskId.eq(s.id))
        .one(&app.state.db)
        .await
        .unwrap()
        .unwrap();
    // The device read exactly one package, in two parts; the server counts what it sent, which for the
    // cut transfer includes what was in flight when the device hung up.
    assert_eq!(
        f.stats.bytes.load(std::sync::atomic::Ordering::Relaxed),
        fx.file.len() as u64
    );
    assert_eq!(
        f.stats.downloads.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let len = fx.file.len() as i64;
    let served = wait_served(&app, &token.token_hash, |n| n >= len).await;
    assert!(
        served >= len && served < 2 * len,
        "served {served} for a {len}-byte package"
    );
    f.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn bad_logins_get_connack_4_and_devices_cannot_use_other_devices_topics() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let dev = register(&app, &fx, "dev-a").await;
    let other = register(&app, &fx, "dev-b").await;
    use backend::clock::Clock;
    let now = app.clock.now().as_millis();
    let refused = |client_id: String, user: String, password: String| {
        let port = app.mqtt.port();
        async move {
            let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
            o.set_credentials(user, password);
            let (_c, mut ev) = AsyncClient::new(o, 4);
            loop {
                match ev.poll().await {
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return code,
                    Err(e) => panic!("expected a CONNACK refusal, got {e}"),
                    Ok(Event::Incoming(Packet::ConnAck(c))) => panic!("accepted: {c:?}"),
                    Ok(_) => {}
                }
            }
        }
    };
    let (cid, pw) = server::sim::login("dev-a", "wrong-secret", 0, now);
    assert_eq!(
        refused(cid, "dev-a".into(), pw).await,
        rumqttc::ConnectReturnCode::BadUserNamePassword
    );
    let (cid, pw) = server::sim::login("dev-a", &dev.secret, 0, now);
    assert_eq!(
        refused(cid, "dev-b".into(), pw).await,
        rumqttc::ConnectReturnCode::BadUserNamePassword,
        "user name must be the device id"
    );
    // Signature type 1 checks the hour against the clock; type 0 does not.
    let (cid, pw) = server::sim::login("dev-a", &dev.secret, 1, now - 5 * 3_600_000);
    assert_eq!(
        refused(cid, "dev-a".into(), pw).await,
        rumqttc::ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refused("not-an-iotda-id".into(), "dev-a".into(), "x".into()).await,
        rumqttc::ConnectReturnCode::BadClientId
    );
    let (cid, pw) = server::sim::login("ghost", "whatever1", 0, now);
    assert_eq!(
        refused(cid, "ghost".into(), pw).await,
        rumqttc::ConnectReturnCode::BadUserNamePassword
    );

    // A logged-in device may not subscribe to another device's topics, nor publish to them.
    let mut a = raw_device(&app, &dev).await;
    let mut b = raw_device(&app, &other).await;
    wait_device_status(&app, "dev-a", "ONLINE").await;
    wait_device_status(&app, "dev-b", "ONLINE").await;
    a.client
        .subscribe("$oc/devices/dev-b/sys/events/down", QoS::AtLeastOnce)
        .await
        .unwrap();
    a.client
        .publish(
            "$oc/devices/dev-b/sys/events/up",
            QoS::AtLeastOnce,
            false,
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    wait_device_status(&app, "dev-a", "OFFLINE").await;
    // dev-b was not disturbed: a task still reaches it.
    let task = tasks::create(&app.state, &fx.project, new_task(&fx, "acl", &[&other]))
        .await
        .unwrap();
    b.next("version_query").await;
    tasks::stop(&app.state, &fx.project, &task.id, None)
        .await
        .unwrap();
    assert!(
        a.down.try_recv().is_err(),
        "dev-a received nothing of dev-b's"
    );
    a.close().await;
    b.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_second_server_on_the_same_database_resumes_a_task_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let d1 = register(&app, &fx, "dev-q").await;
    let d2 = register(&app, &fx, "dev-u").await;
    let mut r1 = raw_device(&app, &d1).await;
    let mut r2 = raw_device(&app, &d2).await;
    wait_device_status(&app, "dev-q", "ONLINE").await;
    wait_device_status(&app, "dev-u", "ONLINE").await;
    let task = tasks::create(&app.state, &fx.project, new_task(&fx, "crash", &[&d1, &d2]))
        .await
        .unwrap();
    // dev-q has its query and does not answer before the crash; dev-u is mid-upgrade.
    r1.next("version_query").await;
    r2.next("version_query").await;
    r2.send("version_report", json!({"sw_version": "1.0"}))
        .await;
    let upgrade = r2.next("software_upgrade").await;
    r2.send(
        "upgrade_progress_report",
        json!({"result_code": 0, "progress": 30, "version": "1.0"}),
    )
    .await;
    wait_subtask(&app, &task.id, "dev-u", "progress 30", |s| s.progress == 30).await;
    use backend::clock::Clock;
    let now = app.clock.now();
    app.kill().await;
    r1.close().await;
    r2.close().await;

    // The same data directory, a new process-like server (new ports), the clock a minute on.
    let mut settings = settings_for(dir.path());
    settings.admin.password = None;
    let app = spawn_with(settings).await;
    app.clock.set(now.plus(MIN));
    let t = tasks::get(&app.state, &fx.project, &task.id).await.unwrap();
    assert_eq!(t.status, "Processing", "nothing lost");
    assert_eq!((t.processing + t.waitting, t.success, t.fail), (2, 0, 0));
    // dev-q's disconnect was recorded (it waits to come back); dev-u is still mid-upgrade.
    assert_eq!(subtask(&app, &task.id, "dev-q").await.step, "wait_online");
    let u = subtask(&app, &task.id, "dev-u").await;
    assert_eq!((u.step.as_str(), u.progress), ("upgrading", 30));
    // Devices reconnect (to the new server): dev-q is asked again, dev-u continues where it was.
    let mut r1 = raw_device(&app, &d1).await;
    r1.next("version_query").await;
    r1.send("version_report", json!({"sw_version": "1.0"}))
        .await;
    let up = r1.next("software_upgrade").await;
    assert_eq!(up["version"], "2.0");
    let mut r2 = raw_device(&app, &d2).await;
    wait_device_status(&app, "dev-u", "ONLINE").await;
    // dev-u, mid-upgrade, is asked its version (had it finished, that would be its success), not sent
    // the upgrade blindly.
    r2.next("version_query").await;
    // The old token still works for the device that had started downloading.
    let token = upgrade["access_token"].as_str().unwrap();
    let url = upgrade["url"].as_str().unwrap().replace(
        &format!(":{}/", url_port(upgrade["url"].as_str().unwrap())),
        &format!(":{}/", app.base.rsplit(':').next().unwrap()),
    );
    let resp = app
        .client
        .get(&url)
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    r2.send(
        "upgrade_progress_report",
        json!({"result_code": 0, "progress": 100, "version": "2.0"}),
    )
    .await;
    r1.send(
        "upgrade_progress_report",
        json!({"result_code": 0, "progress": 100, "version": "2.0"}),
    )
    .await;
    let t = wait_task(&app, &fx, &task.id, "Success", finished).await;
    assert_eq!((t.status.as_str(), t.success, t.total), ("Success", 2, 2));
    // Nothing done twice: one attempt each, one success each in the history.
    for d in ["dev-q", "dev-u"] {
        let s = subtask(&app, &task.id, d).await;
        assert_eq!(s.attempts, 1, "{d}");
        let successes = tasks::history(&app.state, &fx.project, &task.id, d)
            .await
            .unwrap()
            .iter()
            .filter(|h| h.status == "Success")
            .count();
        assert_eq!(successes, 1, "{d}");
    }
    assert!(
        r2.down.try_recv().is_err(),
        "dev-u, which had reported progress, was sent nothing more"
    );
    let events = outbox::Entity::find()
        .filter(outbox::Column::AggregateId.eq(format!("{}/dev-u", task.id)))
        .count(&app.state.db)
        .await
        .unwrap();
    assert!(events >= 3);
    r1.close().await;
    r2.close().await;
    app.stop().await;
}

fn url_port(url: &str) -> String {
    url.split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn task_input_is_validated_with_field_names() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let dev = register(&app, &fx, "dev-v").await;
    let field = |e: backend::Error| match e {
        backend::Error::Validation(v) => v.field,
        other => panic!("not a validation error: {other}"),
    };
    let mut t = new_task(&fx, "bad-name", &[&dev]);
    assert_eq!(
        field(
            tasks::create(&app.state, &fx.project, t.clone())
                .await
                .unwrap_err()
        ),
        "task_name"
    );
    t.task_name = "ok".into();
    t.task_type = "firmwareUpgrade".into();
    assert_eq!(
        field(
            tasks::create(&app.state, &fx.project, t.clone())
                .await
                .unwrap_err()
        ),
        "document.package_ids",
        "a software package in a firmware task"
    );
    t.task_type = "softwareUpgrade".into();
    t.targets = vec!["dev-v".into(), "nobody".into()];
    let e = tasks::create(&app.state, &fx.project, t.clone())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown devices: nobody"), "{e}");
    t.targets = vec![];
    assert_eq!(
        field(
            tasks::create(&app.state, &fx.project, t.clone())
                .await
                .unwrap_err()
        ),
        "targets"
    );
    t.targets = vec!["dev-v".into()];
    t.retry_count = Some(6);
    t.retry_interval = Some(5);
    assert_eq!(
        field(
            tasks::create(&app.state, &fx.project, t.clone())
                .await
                .unwrap_err()
        ),
        "retry_count"
    );
    t.retry_count = Some(2);
    t.retry_interval = None;
    assert_eq!(
        field(
            tasks::create(&app.state, &fx.project, t.clone())
                .await
                .unwrap_err()
        ),
        "task_policy.retry_interval"
    );
    t.retry_interval = Some(5);
    t.package_id = "000000000000000000000000".into();
    assert!(matches!(
        tasks::create(&app.state, &fx.project, t).await.unwrap_err(),
        backend::Error::NotFound { .. }
    ));
    let _ = Timestamp::from_millis(0);
    app.stop().await;
}

#[tokio::test]
async fn the_iotda_batch_task_api_creates_lists_shows_stops_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let dev = register(&app, &fx, "dev-api").await;
    let cookie = app.sign_in().await;
    let base = app.url(&format!("/v5/iot/{}/batchtasks", fx.project));
    let send = |req: reqwest::RequestBuilder| {
        req.header("origin", &app.origin)
            .header("cookie", &cookie)
            .send()
    };
    let resp = send(app.client.post(&base).json(&json!({
        "task_name": "api_task",
        "task_type": "softwareUpgrade",
        "targets": [dev.device_id],
        "document": {"package_ids": [fx.package]},
        "task_policy": {"retry_count": 2, "retry_interval": 5},
        "task_ext_info": {"batch": "north"},
    })))
    .await
    .unwrap();
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    let id = created["task_id"].as_str().unwrap().to_owned();
    assert_eq!(created["status"], "Processing");
    assert_eq!(created["targets"], json!(["dev-api"]));
    assert_eq!(created["document"]["package_ids"][0], fx.package.as_str());
    assert_eq!(created["task_policy"]["retry_count"], 2);
    assert_eq!(created["task_progress"]["total"], 1);
    assert_eq!(
        created["task_progress"]["waitting"], 1,
        "the device is offline"
    );
    assert_eq!(created["task_ext_info"]["batch"], "north");

    // Bad input: IoTDA-style 400s naming the problem.
    for (body, needle) in [
        (
            json!({"task_name": "x-y", "task_type": "softwareUpgrade", "targets": ["dev-api"],
                "document": {"package_ids": [fx.package]}}),
            "task_name",
        ),
        (
            json!({"task_name": "x", "task_type": "createCommands", "targets": ["dev-api"]}),
            "task_type",
        ),
        (
            json!({"task_name": "x", "task_type": "softwareUpgrade", "targets": ["dev-api"]}),
            "document",
        ),
        (
            json!({"task_name": "x", "task_type": "softwareUpgrade", "targets": ["dev-api"],
                "document": {"package_ids": [fx.package]}, "task_policy": {"schedule_time": "tomorrow"}}),
            "schedule_time",
        ),
        // An unknown field is ignored (a newer SDK may send one): what is missing is refused.
        (
            json!({"task_name": "x", "task_type": "softwareUpgrade", "bogus": 1}),
            "document.package_ids",
        ),
    ] {
        let resp = send(app.client.post(&base).json(&body)).await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["error_code"], "IOTDA.000006");
        assert!(
            e["error_msg"].as_str().unwrap().contains(needle),
            "{e} should mention {needle}"
        );
    }

    let list: Value = send(
        app.client
            .get(&base)
            .query(&[("task_type", "softwareUpgrade")]),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(list["page"]["count"], 1);
    assert_eq!(list["batchtasks"][0]["task_id"], id.as_str());
    let missing = send(app.client.get(&base)).await.unwrap();
    assert_eq!(missing.status(), 400, "task_type is required");

    let show: Value = send(app.client.get(format!("{base}/{id}")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(show["task_details"][0]["target"], "dev-api");
    assert_eq!(show["task_details"][0]["status"], "Waitting");
    assert_eq!(show["task_details"][0]["step"], "wait_online");

    let resp = send(app.client.delete(format!("{base}/{id}")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 409, "a running task cannot be deleted");
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error_code"], "IOTDA.000007");

    // Stop with no body (as the SDK sends when given none), then delete.
    let resp = send(app.client.post(format!("{base}/{id}/stop")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let show: Value = send(
        app.client
            .get(format!("{base}/{id}"))
            .query(&[("task_detail_status", "Stopped")]),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(show["batchtask"]["status"], "Stopped");
    assert_eq!(show["page"]["count"], 1);
    let resp = send(
        app.client
            .post(format!("{base}/{id}/retry"))
            .json(&json!({})),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 409, "a stopped task cannot be retried");
    let resp = send(app.client.delete(format!("{base}/{id}")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let resp = send(app.client.get(format!("{base}/{id}"))).await.unwrap();
    assert_eq!(resp.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn with_an_s3_store_and_offload_devices_download_from_the_bucket_with_a_v2_event() {
    let moto = crate::helpers::start_moto().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings_for(dir.path());
    settings.packages.store = server::config::StoreKind::S3;
    settings.packages.s3.endpoint = Some(moto.endpoint.clone());
    settings.packages.s3.allow_http = true;
    settings.packages.s3.access_key_id = Some("testing".into());
    settings.packages.s3.secret_access_key = Some("testing".to_owned().into());
    settings.packages.s3.offload = true;
    let app = spawn_with(settings).await;
    let fx = fixture(&app).await;
    let dev = register(&app, &fx, "dev-s3").await;
    let mut raw = raw_device(&app, &dev).await;
    wait_device_status(&app, "dev-s3", "ONLINE").await;
    let task = tasks::create(&app.state, &fx.project, new_task(&fx, "offload", &[&dev]))
        .await
        .unwrap();
    raw.next("version_query").await;
    raw.send("version_report", json!({"sw_version": "1.0"}))
        .await;
    let notice = raw.next("software_upgrade_v2").await;
    assert!(notice.get("access_token").is_none(), "{notice}");
    let url = notice["url"].as_str().unwrap();
    assert!(url.starts_with(&moto.endpoint), "{url}");
    assert!(url.contains("X-Amz-Signature"), "{url}");
    // Straight from the bucket, no Authorization header, exactly the package.
    let body = reqwest::get(url).await.unwrap();
    assert_eq!(body.status(), 200);
    assert_eq!(body.bytes().await.unwrap().as_ref(), fx.file.as_slice());
    raw.send(
        "upgrade_progress_report",
        json!({"result_code": 0, "progress": 100, "version": "2.0"}),
    )
    .await;
    let t = wait_task(&app, &fx, &task.id, "Success", finished).await;
    assert_eq!(t.status, "Success");
    let tokens = download_tokens::Entity::find()
        .count(&app.state.db)
        .await
        .unwrap();
    assert_eq!(
        tokens, 0,
        "no Updraft token is issued for a bucket download"
    );
    raw.close().await;
    app.stop().await;
}
