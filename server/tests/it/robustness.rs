//! Overload and crashes: a server at its connection caps answers "busy" in each protocol (CONNACK 3,
//! HTTP 503 with `Retry-After`) and devices retry instead of failing; a server killed mid-campaign (the
//! in-process equivalent of `kill -9`: its task is aborted, nothing shuts down cleanly) and started again
//! on the same data directory and ports completes every subtask, each device upgrading once.

use std::sync::atomic::Ordering;
use std::time::Duration;

use backend::service::tasks;
use backend::storage::entity::{download_tokens, subtasks};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use server::config::Settings;
use server::sim::{Behaviour, SimOptions};

use crate::helpers::{TestApp, settings_for, spawn_with};
use crate::tasks::{fixture, fleet, new_task, register};

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (real time, bounded) until a killed server's listeners are gone, then starts it again.
pub(crate) async fn restart(settings: &Settings) -> TestApp {
    for _ in 0..200 {
        let free = [
            settings.http.listen,
            settings.mqtt.listen,
            settings.mqtt.tls_listen,
        ]
        .iter()
        .all(|a| std::net::TcpListener::bind(a).is_ok());
        if free {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    spawn_with(settings.clone()).await
}

/// Settings on fixed free ports, so a restarted server is found where its devices left it.
pub(crate) fn fixed_ports(dir: &std::path::Path) -> Settings {
    let mut s = settings_for(dir);
    s.http.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    s.mqtt.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    s.mqtt.tls_listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    s
}

#[tokio::test]
async fn connections_past_the_caps_get_connack_3_and_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings_for(dir.path());
    settings.http.max_connections = Some(2);
    settings.mqtt.max_connections = Some(2);
    let app = spawn_with(settings).await;
    let fx = fixture(&app).await;

    // HTTPS: two kept-alive connections fill the cap; a third is told to come back.
    let client = || {
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&app.ca_pem).unwrap()])
            .build()
            .unwrap()
    };
    let (a, b, c) = (client(), client(), client());
    for held in [&a, &b] {
        let r = held.get(app.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = c.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "2");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error_code"], "UPDRAFT.000503", "{body}");
    // A connection that closes frees its place.
    drop(a);
    let mut served = false;
    for _ in 0..100 {
        if client()
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the freed place is used again");
    drop(b);

    // MQTT: two devices connected; a third gets CONNACK 3 (server unavailable), before its login is
    // even checked.
    let devs = [
        register(&app, &fx, "cap-0").await,
        register(&app, &fx, "cap-1").await,
        register(&app, &fx, "cap-2").await,
    ];
    let f = fleet(&app, devs[..2].to_vec(), SimOptions::default());
    for _ in 0..500 {
        if f.stats.connected.load(Ordering::Relaxed) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(f.stats.connected.load(Ordering::Relaxed), 2);
    let mut o = MqttOptions::new("cap-2_0_0_2026120500", "127.0.0.1", app.mqtt.port());
    o.set_credentials("cap-2", "not even checked");
    let (_client, mut events) = AsyncClient::new(o, 8);
    let refused = loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(c))) => panic!("connected: {c:?}"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            refused,
            ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable)
        ),
        "{refused:?}"
    );
    f.stop().await;
    app.stop().await;
}

/// Polls (real time, bounded) until every subtask of the task is final; returns the rows.
async fn wait_all_final(app: &TestApp, task_id: &str, limit: Duration) -> Vec<subtasks::Model> {
    let started = std::time::Instant::now();
    loop {
        let rows = subtasks::Entity::find()
            .filter(subtasks::Column::TaskId.eq(task_id))
            .all(&app.state.db)
            .await
            .unwrap();
        let open = rows
            .iter()
            .filter(|s| !matches!(s.status.as_str(), "Success" | "Fail" | "Stopped"))
            .count();
        if open == 0 {
            return rows;
        }
        assert!(
            started.elapsed() < limit,
            "{open} subtasks still open after {limit:?}: {:#?}",
            rows.iter()
                .filter(|s| s.status != "Success")
                .take(5)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn succeeded(app: &TestApp, task_id: &str) -> usize {
    subtasks::Entity::find()
        .filter(subtasks::Column::TaskId.eq(task_id))
        .filter(subtasks::Column::Status.eq("Success"))
        .all(&app.state.db)
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn a_campaign_killed_twice_completes_after_each_restart_with_every_device_upgraded_once() {
    const DEVICES: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let settings = fixed_ports(dir.path());
    let app = spawn_with(settings.clone()).await;
    let fx = fixture(&app).await;
    let mut devs = Vec::new();
    for n in 0..DEVICES {
        devs.push(register(&app, &fx, &format!("chaos-{n:03}")).await);
    }
    let f = fleet(&app, devs.clone(), SimOptions::default());
    for _ in 0..1000 {
        if f.stats.connected.load(Ordering::Relaxed) as usize == DEVICES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let task = tasks::create(
        &app.state,
        &fx.project,
        new_task(&fx, "chaos", &devs.iter().collect::<Vec<_>>()),
    )
    .await
    .unwrap();
    let mut app = app;
    // Kill at about a third and two thirds done, or after a moment if the campaign is slower.
    for kill_at in [DEVICES / 3, 2 * DEVICES / 3] {
        for _ in 0..200 {
            if succeeded(&app, &task.id).await >= kill_at {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let done = succeeded(&app, &task.id).await;
        assert!(
            done < DEVICES,
            "the kill at {kill_at} interrupts the campaign ({done} done)"
        );
        app.kill().await;
        app = restart(&settings).await;
    }
    let rows = wait_all_final(&app, &task.id, Duration::from_secs(120)).await;
    let ok = rows.iter().filter(|s| s.status == "Success").count();
    assert_eq!(ok, DEVICES, "every device succeeded");
    assert_eq!(
        f.stats.upgrades.load(Ordering::Relaxed) as usize,
        DEVICES,
        "each device downloaded and installed once"
    );
    assert_eq!(
        f.stats.repeated.load(Ordering::Relaxed),
        0,
        "no device was asked to install what it had installed"
    );
    assert_eq!(f.stats.failed.load(Ordering::Relaxed), 0);
    let t = tasks::get(&app.state, &fx.project, &task.id).await.unwrap();
    assert_eq!(t.status, "Success");
    assert_eq!(
        (t.total, t.success, t.processing, t.fail, t.waitting),
        (DEVICES as i64, DEVICES as i64, 0, 0, 0),
        "counters equal rows"
    );
    f.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_download_interrupted_by_a_restart_resumes_with_the_same_token() {
    let dir = tempfile::tempdir().unwrap();
    let settings = fixed_ports(dir.path());
    let app = spawn_with(settings.clone()).await;
    let fx = fixture(&app).await;
    let dev = register(&app, &fx, "dev-restart").await;
    // `Resume` cuts the download halfway and waits to be back online before going on: the server is
    // killed in between.
    let f = fleet(
        &app,
        vec![dev.clone()],
        SimOptions {
            behaviour: Behaviour::Resume,
            ..Default::default()
        },
    );
    let task = tasks::create(&app.state, &fx.project, new_task(&fx, "restart", &[&dev]))
        .await
        .unwrap();
    for _ in 0..500 {
        if f.stats.bytes.load(Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        f.stats.bytes.load(Ordering::Relaxed) > 0,
        "the download began"
    );
    assert_eq!(
        f.stats.downloads.load(Ordering::Relaxed),
        0,
        "the server is killed before the download is whole"
    );
    app.kill().await;
    let app = restart(&settings).await;
    let rows = wait_all_final(&app, &task.id, Duration::from_secs(60)).await;
    assert_eq!(rows[0].status, "Success");
    let tokens = download_tokens::Entity::find()
        .filter(download_tokens::Column::SubtaskId.eq(rows[0].id))
        .all(&app.state.db)
        .await
        .unwrap();
    assert_eq!(tokens.len(), 1, "the re-sent event carried the same token");
    assert_eq!(f.stats.downloads.load(Ordering::Relaxed), 1);
    assert_eq!(
        f.stats.bytes.load(Ordering::Relaxed),
        fx_len(),
        "the second half came with a Range, nothing twice"
    );
    f.stop().await;
    app.stop().await;
}

/// The fixture package's size.
const fn fx_len() -> u64 {
    100 * 1024
}

#[tokio::test]
async fn coap_requests_past_the_in_flight_cap_get_5_03_with_max_age() {
    use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings_for(dir.path());
    settings.lwm2m.max_in_flight = 0;
    let app = spawn_with(settings).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut register = Packet::new();
    register.header.set_type(MessageType::Confirmable);
    register.header.code = MessageClass::Request(RequestType::Post);
    register.header.message_id = 4711;
    register.set_token(vec![1, 2, 3, 4]);
    register.add_option(CoapOption::UriPath, b"rd".to_vec());
    register.add_option(CoapOption::UriQuery, b"ep=863703000000001".to_vec());
    register.add_option(CoapOption::UriQuery, b"lt=300".to_vec());
    register.payload = b"</19/0>,</19/1>".to_vec();
    socket
        .send_to(&register.to_bytes().unwrap(), app.coap)
        .await
        .unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let answer = Packet::from_bytes(&buf[..n]).unwrap();
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::ServiceUnavailable)
    );
    assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(answer.header.message_id, 4711);
    assert_eq!(answer.get_token(), [1, 2, 3, 4]);
    let max_age = answer.get_option(CoapOption::MaxAge).expect("Max-Age");
    assert_eq!(max_age.front().map(Vec::as_slice), Some(&[2u8][..]));
    assert!(
        n <= register.to_bytes().unwrap().len(),
        "the busy answer ({n} bytes) is no larger than the request"
    );
    app.stop().await;
}

/// Two servers on one SQLite database would drive the same subtasks twice: the second is refused, with a
/// message that says why and what to do instead; once the first is gone (here it crashes), a server
/// starts again on the same data.
#[tokio::test]
async fn a_second_server_on_one_sqlite_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = crate::helpers::spawn_app(dir.path()).await;
    let clock =
        backend::clock::ManualClock::new(domain::Timestamp::from_millis(crate::helpers::START));
    let refused =
        server::startup::Application::build(settings_for(dir.path()), std::sync::Arc::new(clock))
            .await
            .err()
            .expect("a second server on the same SQLite database is refused");
    let message = format!("{refused:#}");
    assert!(
        message.contains("another `updraft serve` is running on the SQLite database"),
        "{message}"
    );
    assert!(message.contains("Stop the other one first"), "{message}");
    first.kill().await;
    let again = crate::helpers::spawn_app(dir.path()).await;
    again.stop().await;
}
