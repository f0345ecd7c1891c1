//! LwM2M devices upgraded with PCP over real UDP: simulated NB-IoT devices (`server::sim::lwm2m`) against
//! the running server's CoAP endpoint on port 0.

use std::sync::Arc;
use std::time::Duration;

use backend::service::{devices, packages, products, tasks};
use backend::storage::entity::subtasks;
use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use server::sim::lwm2m::{Lwm2mOptions, Lwm2mStats, Radio, run_fleet};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, spawn_app};

pub(crate) const PRODUCT: &str = "nb-meter";

pub(crate) struct Fixture {
    pub(crate) project: String,
    pub(crate) package: String,
    pub(crate) sha256: String,
}

/// A CoAP product, a 20 000-byte software package V2.0 (from V1.0) cut in 500-byte segments, and `n`
/// devices with node ids `8637...`.
pub(crate) async fn fixture(app: &TestApp, n: usize) -> (Fixture, Vec<String>) {
    let project = backend::service::projects::ensure_default(&app.state)
        .await
        .unwrap()
        .id;
    products::create(
        &app.state,
        &project,
        products::NewProduct {
            product_id: Some(PRODUCT.into()),
            name: "NB-IoT meter".into(),
            device_type: "Meter".into(),
            protocol_type: "CoAP".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let file: Vec<u8> = (0..20_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let sha256 = hex::encode(Sha256::digest(&file));
    let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(file))]);
    let package = packages::upload(
        &app.state,
        &project,
        domain::package::PackageMetaInput {
            package_type: "softwarePackage".into(),
            product_id: PRODUCT.into(),
            version: "V2.0".into(),
            support_source_versions: vec!["V1.0".into()],
            file_name: "meter-2.0.bin".into(),
            ..Default::default()
        },
        body,
    )
    .await
    .unwrap();
    let mut nodes = Vec::new();
    for i in 0..n {
        let node = format!("86370300{i:07}");
        devices::register(
            &app.state,
            &project,
            devices::NewDevice {
                product_id: PRODUCT.into(),
                node_id: node.clone(),
                device_name: format!("meter {i}"),
                // Plain CoAP: a secure_access device is refused without DTLS.
                secure_access: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        nodes.push(node);
    }
    (
        Fixture {
            project,
            package: package.id,
            sha256,
        },
        nodes,
    )
}

pub(crate) fn device_id(node: &str) -> String {
    format!("{PRODUCT}_{node}")
}

pub(crate) async fn create_task(app: &TestApp, fx: &Fixture, nodes: &[String]) -> String {
    tasks::create(
        &app.state,
        &fx.project,
        tasks::NewTask {
            task_name: "pcp".into(),
            task_type: "softwareUpgrade".into(),
            package_id: fx.package.clone(),
            targets: nodes.iter().map(|n| device_id(n)).collect(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .id
}

pub(crate) struct Fleet {
    pub(crate) stats: Arc<Lwm2mStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Fleet {
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

pub(crate) fn fleet(app: &TestApp, nodes: &[String], opts: Lwm2mOptions) -> Fleet {
    let stats = Arc::new(Lwm2mStats::default());
    let stop = CancellationToken::new();
    let opts = Lwm2mOptions {
        server: app.coap,
        retry: Duration::from_millis(300),
        ..opts
    };
    let task = tokio::spawn(run_fleet(opts, nodes.to_vec(), stats.clone(), stop.clone()));
    Fleet { stats, stop, task }
}

/// Polls until the task is finished (real time, bounded).
pub(crate) async fn wait_finished(
    app: &TestApp,
    fx: &Fixture,
    task_id: &str,
) -> backend::storage::entity::tasks::Model {
    for _ in 0..1500 {
        let t = tasks::get(&app.state, &fx.project, task_id).await.unwrap();
        if domain::task::TaskStatus::parse(&t.status).is_ok_and(|s| s.is_completed()) {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows = subtasks::Entity::find()
        .filter(subtasks::Column::TaskId.eq(task_id))
        .all(&app.state.db)
        .await
        .unwrap();
    panic!("task {task_id} never finished: {rows:#?}");
}

pub(crate) async fn subtask_rows(app: &TestApp, task_id: &str) -> Vec<subtasks::Model> {
    subtasks::Entity::find()
        .filter(subtasks::Column::TaskId.eq(task_id))
        .all(&app.state.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn nb_iot_devices_upgrade_with_pcp_over_coap_and_the_task_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (fx, nodes) = fixture(&app, 4).await;
    let fleet = fleet(
        &app,
        &nodes,
        Lwm2mOptions {
            cells: 2,
            ..Lwm2mOptions::default()
        },
    );
    let task_id = create_task(&app, &fx, &nodes).await;
    let task = wait_finished(&app, &fx, &task_id).await;
    assert_eq!(
        task.status,
        "Success",
        "{:#?}",
        subtask_rows(&app, &task_id).await
    );
    assert_eq!(task.success, 4);
    for node in &nodes {
        let d = devices::get(&app.state, &fx.project, &device_id(node))
            .await
            .unwrap();
        assert_eq!(d.sw_version.as_deref(), Some("V2.0"));
        assert_eq!(d.status, "ONLINE");
        let radio: serde_json::Value =
            serde_json::from_str(d.last_radio.as_deref().unwrap()).unwrap();
        assert_eq!(radio["rsrp"], -85, "{radio}");
        assert_eq!(radio["sinr"], 15);
    }
    let images = fleet.stats.images.lock().unwrap().clone();
    assert_eq!(images.len(), 4);
    assert!(
        images.values().all(|sha| *sha == fx.sha256),
        "every device got the package's exact bytes"
    );
    for row in subtask_rows(&app, &task_id).await {
        assert_eq!((row.progress, row.step.as_str()), (100, "done"));
        assert_eq!(row.source_version.as_deref(), Some("V1.0"));
    }
    fleet.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_download_resumes_after_a_restart_on_a_lossy_link_with_liteos_quirks() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (fx, nodes) = fixture(&app, 3).await;
    let fleet = fleet(
        &app,
        &nodes,
        Lwm2mOptions {
            loss: 0.05,
            restart_after: Some(17),
            silent_accept: true,
            ..Lwm2mOptions::default()
        },
    );
    // A lost version answer (a non-confirmable notification) is only recovered by the platform asking
    // again after 30 s: the manual clock moves 10 s every 300 ms of this test.
    let ticking = CancellationToken::new();
    let ticker = tokio::spawn({
        let (clock, state, stop) = (app.clock.clone(), app.state.clone(), ticking.clone());
        async move {
            while !stop.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                clock.advance(Duration::from_secs(10));
                let _ = state.driver.run_due(&state).await;
            }
        }
    });
    let task_id = create_task(&app, &fx, &nodes).await;
    let task = wait_finished(&app, &fx, &task_id).await;
    ticking.cancel();
    let _ = ticker.await;
    assert_eq!(
        task.status,
        "Success",
        "{:#?}",
        subtask_rows(&app, &task_id).await
    );
    let stats = &fleet.stats;
    assert_eq!(stats.restarts.load(std::sync::atomic::Ordering::Relaxed), 3);
    // 40 segments each; a device that restarted after 17 resumed instead of starting over.
    let segments = stats.segments.load(std::sync::atomic::Ordering::Relaxed);
    assert!(segments <= 3 * 40 + 6, "segments received: {segments}");
    assert!(
        stats
            .images
            .lock()
            .unwrap()
            .values()
            .all(|s| *s == fx.sha256),
        "resumed images are whole"
    );
    fleet.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn per_cell_caps_hold_and_coverage_falls_back_to_the_cell_id() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (fx, nodes) = fixture(&app, 12).await;
    // Poor coverage: one device per cell at a time, in 2 cells.
    let (poor, cell_only) = nodes.split_at(6);
    let poor_fleet = fleet(
        &app,
        poor,
        Lwm2mOptions {
            cells: 2,
            radio: Radio::Poor,
            segment_delay: Duration::from_millis(2),
            ..Lwm2mOptions::default()
        },
    );
    let task_id = create_task(&app, &fx, poor).await;
    let task = wait_finished(&app, &fx, &task_id).await;
    assert_eq!(task.status, "Success");
    let peaks = poor_fleet.stats.peaks();
    assert_eq!(peaks.len(), 2, "{peaks:?}");
    assert!(peaks.values().all(|p| *p == 1), "cap 1 per cell: {peaks:?}");
    poor_fleet.stop().await;

    // /4/0 fails, /4/0/8 answers: cell id only, 10 per cell; all 6 in one cell may download together.
    let fallback = fleet(
        &app,
        cell_only,
        Lwm2mOptions {
            radio: Radio::CellOnly,
            ..Lwm2mOptions::default()
        },
    );
    let task_id = create_task(&app, &fx, cell_only).await;
    let task = wait_finished(&app, &fx, &task_id).await;
    assert_eq!(task.status, "Success");
    let peaks = fallback.stats.peaks();
    assert!(peaks.values().all(|p| *p <= 10), "{peaks:?}");
    let history = backend::storage::entity::subtask_steps::Entity::find()
        .all(&app.state.db)
        .await
        .unwrap();
    assert!(
        history.iter().any(|s| s.step == "cell_id_query"),
        "the cell id was read after the coverage read failed"
    );
    fallback.stop().await;

    app.stop().await;
}

#[tokio::test]
async fn an_upgrade_fails_clearly_when_neither_coverage_nor_cell_id_can_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (fx, nodes) = fixture(&app, 1).await;
    let fleet = fleet(
        &app,
        &nodes,
        Lwm2mOptions {
            radio: Radio::None,
            ..Lwm2mOptions::default()
        },
    );
    let task_id = create_task(&app, &fx, &nodes).await;
    let task = wait_finished(&app, &fx, &task_id).await;
    assert_eq!(task.status, "Fail");
    let row = &subtask_rows(&app, &task_id).await[0];
    assert_eq!(
        row.error_code.as_deref(),
        Some("RADIO_COVERAGE_UNAVAILABLE")
    );
    fleet.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn mqtt_and_lwm2m_tasks_run_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let mqtt_fx = crate::tasks::fixture(&app).await;
    let mut mqtt_devices = Vec::new();
    for id in ["mixed-a", "mixed-b"] {
        mqtt_devices.push(crate::tasks::register(&app, &mqtt_fx, id).await);
    }
    let mqtt_fleet = crate::tasks::fleet(
        &app,
        mqtt_devices.clone(),
        server::sim::SimOptions::default(),
    );
    let (fx, nodes) = fixture(&app, 3).await;
    let lwm2m_fleet = fleet(&app, &nodes, Lwm2mOptions::default());
    let mqtt_task = tasks::create(
        &app.state,
        &mqtt_fx.project,
        crate::tasks::new_task(&mqtt_fx, "mqtt", &mqtt_devices.iter().collect::<Vec<_>>()),
    )
    .await
    .unwrap()
    .id;
    let lwm2m_task = create_task(&app, &fx, &nodes).await;
    let (a, b) = tokio::join!(
        wait_finished(&app, &fx, &mqtt_task),
        wait_finished(&app, &fx, &lwm2m_task)
    );
    assert_eq!((a.status.as_str(), a.success), ("Success", 2));
    assert_eq!((b.status.as_str(), b.success), ("Success", 3));
    mqtt_fleet.stop().await;
    lwm2m_fleet.stop().await;
    app.stop().await;
}

/// A raw CoAP exchange from a socket that is not a simulated device.
pub(crate) async fn raw(socket: &tokio::net::UdpSocket, packet: &Packet) -> Packet {
    socket.send(&packet.to_bytes().unwrap()).await.unwrap();
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    Packet::from_bytes(&buf[..n]).unwrap()
}

/// The next message from the platform (within 2 s) and its path (`19/0/0`).
pub(crate) async fn next_request(socket: &tokio::net::UdpSocket) -> Option<(Packet, String)> {
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    let packet = Packet::from_bytes(&buf[..n]).ok()?;
    let path = packet
        .get_option(CoapOption::UriPath)
        .map(|l| {
            l.iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_default();
    Some((packet, path))
}

pub(crate) fn register_packet(endpoint: &str, mid: u16) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(vec![1, 2, 3]);
    p.add_option(CoapOption::UriPath, b"rd".to_vec());
    p.add_option(CoapOption::UriQuery, format!("ep={endpoint}").into_bytes());
    p.add_option(CoapOption::UriQuery, b"lt=300".to_vec());
    p
}

#[tokio::test]
async fn unknown_endpoints_are_refused_and_corrupt_pcp_frames_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (fx, nodes) = fixture(&app, 1).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(app.coap).await.unwrap();

    let answer = raw(&socket, &register_packet("999999999999999", 7)).await;
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::Forbidden)
    );
    let bad = raw(&socket, &{
        let mut p = register_packet(&nodes[0], 8);
        p.add_option(CoapOption::UriQuery, b"lt=0".to_vec());
        p
    })
    .await;
    assert_eq!(
        bad.header.code,
        MessageClass::Response(ResponseType::BadRequest)
    );

    // A real registration, then the platform observes /19/0/0 and asks for the version.
    let created = raw(&socket, &register_packet(&nodes[0], 9)).await;
    assert_eq!(
        created.header.code,
        MessageClass::Response(ResponseType::Created)
    );
    // The same registration again (a retransmission): the same answer, not a second registration. The
    // platform's observe request may come first; it is answered below when it comes again.
    socket
        .send(&register_packet(&nodes[0], 9).to_bytes().unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 1500];
    let again = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
            .await
            .expect("the repeated answer")
            .unwrap();
        let p = Packet::from_bytes(&buf[..n]).unwrap();
        if p.header.get_type() == MessageType::Acknowledgement && p.header.message_id == 9 {
            break p;
        }
    };
    assert_eq!(
        again.get_option(CoapOption::LocationPath),
        created.get_option(CoapOption::LocationPath)
    );

    let mut observe_token = None;
    let task_id = create_task(&app, &fx, &nodes).await;
    let mut query_seen = false;
    let mut unanswered_query = None;
    for _ in 0..20 {
        let Some((req, path)) = next_request(&socket).await else {
            break;
        };
        // The first 0x13 write goes unanswered: it must come again, under the same message id.
        if path == "19/1/0" && unanswered_query.is_none() {
            unanswered_query = Some(req.header.message_id);
            continue;
        }
        if path == "19/1/0" {
            assert_eq!(
                Some(req.header.message_id),
                unanswered_query,
                "a retransmission"
            );
        }
        let mut ack = Packet::new();
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.message_id = req.header.message_id;
        ack.set_token(req.get_token().to_vec());
        if path == "19/0/0" {
            observe_token = Some(req.get_token().to_vec());
            ack.header.code = MessageClass::Response(ResponseType::Content);
            ack.set_observe_value(1);
        } else {
            ack.header.code = MessageClass::Response(ResponseType::Changed);
            if req.payload == protocol::pcp::Downlink::QueryVersion.encode() {
                query_seen = true;
            }
        }
        socket.send(&ack.to_bytes().unwrap()).await.unwrap();
        if query_seen {
            break;
        }
    }
    assert!(query_seen, "the platform sent PCP 0x13");
    let token = observe_token.expect("the platform observed /19/0/0");
    let notify = |payload: Vec<u8>, seq: u32| {
        let mut n = Packet::new();
        n.header.set_type(MessageType::NonConfirmable);
        n.header.code = MessageClass::Response(ResponseType::Content);
        n.header.message_id = 100 + seq as u16;
        n.set_token(token.clone());
        n.set_observe_value(seq);
        n.payload = payload;
        n.to_bytes().unwrap()
    };
    // A version answer with its check code damaged is dropped...
    let mut corrupt = protocol::pcp::Uplink::Version {
        result: protocol::pcp::ResultCode::OK,
        version: protocol::pcp::Version::new("V1.0").unwrap(),
    }
    .encode();
    corrupt[5] ^= 0xFF;
    socket.send(&notify(corrupt, 2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let row = &subtask_rows(&app, &task_id).await[0];
    assert_eq!(row.step, "version_query", "a corrupt frame changes nothing");
    // No usable answer came: 30 s later the platform asks again.
    app.clock.advance(Duration::from_secs(30));
    app.state.driver.run_due(&app.state).await.unwrap();
    let mut asked_again = false;
    for _ in 0..5 {
        let Some((req, path)) = next_request(&socket).await else {
            break;
        };
        if path == "19/1/0" && req.payload == protocol::pcp::Downlink::QueryVersion.encode() {
            let mut ack = Packet::new();
            ack.header.set_type(MessageType::Acknowledgement);
            ack.header.code = MessageClass::Response(ResponseType::Changed);
            ack.header.message_id = req.header.message_id;
            ack.set_token(req.get_token().to_vec());
            socket.send(&ack.to_bytes().unwrap()).await.unwrap();
            asked_again = true;
            break;
        }
    }
    assert!(
        asked_again,
        "0x13 is sent again after 30 s without an answer"
    );
    // ... an intact one moves the upgrade on to the coverage read.
    let good = protocol::pcp::Uplink::Version {
        result: protocol::pcp::ResultCode::OK,
        version: protocol::pcp::Version::new("V1.0").unwrap(),
    }
    .encode();
    socket.send(&notify(good, 3)).await.unwrap();
    let mut read_seen = false;
    for _ in 0..10 {
        let Some((_, path)) = next_request(&socket).await else {
            break;
        };
        if path == "4/0" {
            read_seen = true;
            break;
        }
    }
    assert!(read_seen, "the platform read /4/0 after the intact answer");
    app.stop().await;
}

/// A device's side of `socket`: the platform's observe requests (`/19/0/0`) are answered, the answers to
/// the device's requests go to `answers`.
async fn observed_device(
    socket: Arc<tokio::net::UdpSocket>,
    answers: tokio::sync::mpsc::UnboundedSender<Packet>,
) {
    let mut buf = [0u8; 1500];
    while let Ok(n) = socket.recv(&mut buf).await {
        let Ok(p) = Packet::from_bytes(&buf[..n]) else {
            continue;
        };
        if p.header.get_type() == MessageType::Acknowledgement {
            let _ = answers.send(p);
        } else if p.header.code == MessageClass::Request(RequestType::Get) {
            let mut ack = Packet::new();
            ack.header.set_type(MessageType::Acknowledgement);
            ack.header.message_id = p.header.message_id;
            ack.header.code = MessageClass::Response(ResponseType::Content);
            ack.set_token(p.get_token().to_vec());
            ack.set_observe_value(1);
            let _ = socket.send(&ack.to_bytes().unwrap()).await;
        }
    }
}

#[tokio::test]
async fn a_device_given_another_devices_address_and_message_id_registers_as_itself() {
    // A NAT gives the address and port a device registered from to another device, whose message id
    // happens to be the one the first used: the second is registered (not answered with the first's
    // registration), and the first, no longer there, goes offline.
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (_fx, nodes) = fixture(&app, 2).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(app.coap).await.unwrap();
    let socket = Arc::new(socket);
    let (tx, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let device = tokio::spawn(observed_device(socket.clone(), tx));
    let mut register = async |node: &str| {
        let bytes = register_packet(node, 9).to_bytes().unwrap();
        socket.send(&bytes).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), answers.recv())
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(answer.header.message_id, 9);
        answer
    };

    let first = register(&nodes[0]).await;
    assert_eq!(
        first.header.code,
        MessageClass::Response(ResponseType::Created)
    );
    crate::tasks::wait_device_status(&app, &device_id(&nodes[0]), "ONLINE").await;

    let second = register(&nodes[1]).await;
    assert_eq!(
        second.header.code,
        MessageClass::Response(ResponseType::Created)
    );
    assert_ne!(
        second.get_option(CoapOption::LocationPath),
        first.get_option(CoapOption::LocationPath),
        "a registration of its own, not the first device's answer again"
    );
    crate::tasks::wait_device_status(&app, &device_id(&nodes[1]), "ONLINE").await;
    crate::tasks::wait_device_status(&app, &device_id(&nodes[0]), "OFFLINE").await;
    device.abort();
    app.stop().await;
}
