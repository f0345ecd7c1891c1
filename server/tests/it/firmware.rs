//! LwM2M firmware upgrades with the Firmware Update object (`/5/0`) over real UDP: simulated devices
//! (`server::sim::lwm2m`) download the package block-wise (CoAP Block2) from the running server's CoAP
//! endpoint on port 0, or are handed an HTTPS URI.

use std::sync::atomic::Ordering;
use std::time::Duration;

use backend::service::{devices, packages, products, tasks};
use backend::storage::entity::download_tokens;
use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use server::sim::lwm2m::{Lwm2mBehaviour, Lwm2mOptions};
use sha2::{Digest, Sha256};

use crate::helpers::{TestApp, spawn_app};
use crate::lwm2m::{Fixture, fleet, subtask_rows, wait_finished};

/// A CoAP product fetching firmware over `download` (`coap` or `https`), a 30 000-byte firmware package
/// V2.0 (from V1.0), and `n` devices.
pub(crate) async fn fixture(
    app: &TestApp,
    product: &str,
    download: &str,
    n: usize,
) -> (Fixture, Vec<String>) {
    let project = backend::service::projects::ensure_default(&app.state)
        .await
        .unwrap()
        .id;
    products::create(
        &app.state,
        &project,
        products::NewProduct {
            product_id: Some(product.into()),
            name: format!("{product} tracker"),
            device_type: "Tracker".into(),
            protocol_type: "CoAP".into(),
            firmware_download: Some(download.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let file: Vec<u8> = (0..30_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let sha256 = hex::encode(Sha256::digest(&file));
    let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(file))]);
    let package = packages::upload(
        &app.state,
        &project,
        domain::package::PackageMetaInput {
            package_type: "firmwarePackage".into(),
            product_id: product.into(),
            version: "V2.0".into(),
            support_source_versions: vec!["V1.0".into()],
            file_name: "tracker-fw-2.0.bin".into(),
            ..Default::default()
        },
        body,
    )
    .await
    .unwrap();
    let mut nodes = Vec::new();
    for i in 0..n {
        let node = format!(
            "{}{i:07}",
            if download == "https" {
                "86370400"
            } else {
                "86370500"
            }
        );
        devices::register(
            &app.state,
            &project,
            devices::NewDevice {
                product_id: product.into(),
                node_id: node.clone(),
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

pub(crate) async fn firmware_task(
    app: &TestApp,
    fx: &Fixture,
    product: &str,
    nodes: &[String],
) -> String {
    tasks::create(
        &app.state,
        &fx.project,
        tasks::NewTask {
            task_name: "firmware".into(),
            task_type: "firmwareUpgrade".into(),
            package_id: fx.package.clone(),
            targets: nodes.iter().map(|n| format!("{product}_{n}")).collect(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .id
}

#[tokio::test]
async fn a_standard_lwm2m_client_upgrades_its_firmware_block_wise_and_the_token_closes() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (fx, nodes) = fixture(&app, "tracker", "coap", 3).await;
    // One device takes the platform's block size (512), the others ask for 1024 and 64 bytes.
    let fleets: Vec<_> = [(0, 1024), (1, 0), (2, 64)]
        .into_iter()
        .map(|(i, block_size)| {
            fleet(
                &app,
                &nodes[i..=i],
                Lwm2mOptions {
                    block_size,
                    ..Lwm2mOptions::default()
                },
            )
        })
        .collect();
    let task_id = firmware_task(&app, &fx, "tracker", &nodes).await;
    let task = wait_finished(&app, &fx, &task_id).await;
    let rows = subtask_rows(&app, &task_id).await;
    assert_eq!(task.status, "Success", "{rows:#?}");
    for row in &rows {
        assert_eq!((row.progress, row.step.as_str()), (100, "done"));
        assert_eq!(row.source_version.as_deref(), Some("V1.0"));
    }
    for node in &nodes {
        let d = devices::get(&app.state, &fx.project, &format!("tracker_{node}"))
            .await
            .unwrap();
        assert_eq!(d.fw_version.as_deref(), Some("V2.0"), "read from /3/0/3");
    }
    let mut blocks = Vec::new();
    for f in fleets {
        let images = f.stats.images.lock().unwrap().clone();
        assert_eq!(images.len(), 1);
        assert!(
            images.values().all(|sha| *sha == fx.sha256),
            "the exact bytes"
        );
        blocks.push(f.stats.segments.load(Ordering::Relaxed));
        f.stop().await;
    }
    assert_eq!(
        blocks,
        [30, 59, 469],
        "30 000 bytes in 1024-, 512- and 64-byte blocks"
    );
    // Every token counted what it served and was revoked when its download ended. The last count is
    // written in the background after the last block: poll for it (bounded).
    let mut tokens = Vec::new();
    for _ in 0..250 {
        tokens = download_tokens::Entity::find()
            .all(&app.state.db)
            .await
            .unwrap();
        if tokens.iter().all(|t| t.bytes_served >= 30_000) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(tokens.len(), 3);
    for t in &tokens {
        assert!(t.revoked_at.is_some(), "{t:?}");
        // A block the client asked for again (its request or our answer late on a loaded machine) is
        // served, and counted, again: the image plus at most a few whole blocks.
        let again = t.bytes_served - 30_000;
        assert!(
            (0..=3 * 1024).contains(&again) && [64, 512, 1024].iter().any(|b| again % b == 0),
            "{t:?}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_block_wise_download_resumes_after_packet_loss() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (fx, nodes) = fixture(&app, "tracker", "coap", 2).await;
    let fleet = fleet(
        &app,
        &nodes,
        Lwm2mOptions {
            loss: 0.1,
            block_size: 512,
            ..Lwm2mOptions::default()
        },
    );
    // Registered before the task starts, mostly: a device whose 2.01 was lost registers again, and a
    // registration mid-download rightly restarts the download with a fresh URI.
    for _ in 0..500 {
        if fleet.stats.registered.load(Ordering::Relaxed) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let task_id = firmware_task(&app, &fx, "tracker", &nodes).await;
    let task = wait_finished(&app, &fx, &task_id).await;
    assert_eq!(
        task.status,
        "Success",
        "{:#?}",
        subtask_rows(&app, &task_id).await
    );
    let stats = &fleet.stats;
    assert!(
        stats.resends.load(Ordering::Relaxed) > 0,
        "requests were lost and asked again"
    );
    // Lost requests and answers were asked again, not restarted from block 0 (unless a registration
    // lost its 2.01 and came again mid-download, which hands out a fresh URI: at most once per device).
    let blocks = stats.segments.load(Ordering::Relaxed);
    assert!(
        (2 * 59..=4 * 59).contains(&blocks),
        "blocks received: {blocks}"
    );
    assert!(
        stats
            .images
            .lock()
            .unwrap()
            .values()
            .all(|s| *s == fx.sha256)
    );
    fleet.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn every_update_result_failure_fails_the_device_with_its_meaning() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    // Results 2-8 from devices (2-5 after the download, 6-8 after install), 9 from a device handed an
    // HTTPS URI it cannot follow.
    let (fx, nodes) = fixture(&app, "tracker", "coap", 7).await;
    let fleets: Vec<_> = (2..=8u8)
        .zip(&nodes)
        .map(|(code, node)| {
            let behaviour = if code <= 5 {
                Lwm2mBehaviour::FailDownload
            } else {
                Lwm2mBehaviour::FailUpgrade
            };
            fleet(
                &app,
                std::slice::from_ref(node),
                Lwm2mOptions {
                    behaviour,
                    fail_code: Some(code),
                    ..Lwm2mOptions::default()
                },
            )
        })
        .collect();
    let task_id = firmware_task(&app, &fx, "tracker", &nodes).await;
    let task = wait_finished(&app, &fx, &task_id).await;
    assert_eq!(task.status, "Fail");
    let mut rows = subtask_rows(&app, &task_id).await;
    rows.sort_by_key(|r| r.device_id.clone());
    for (row, code) in rows.iter().zip(2..=8u8) {
        assert_eq!(row.status, "Fail");
        assert_eq!(
            row.error_code.as_deref(),
            Some(format!("FIRMWARE_UPDATE_RESULT_{code}").as_str())
        );
        let meaning = domain::flow::lwm2m::update_result_meaning(code);
        assert!(
            row.error_msg.as_deref().unwrap().contains(meaning),
            "{row:?}"
        );
    }
    for f in fleets {
        f.stop().await;
    }

    let (https, https_nodes) = fixture(&app, "camera", "https", 1).await;
    let fleet = fleet(&app, &https_nodes, Lwm2mOptions::default());
    let task_id = firmware_task(&app, &https, "camera", &https_nodes).await;
    let task = wait_finished(&app, &https, &task_id).await;
    let row = &subtask_rows(&app, &task_id).await[0];
    assert_eq!(task.status, "Fail");
    assert_eq!(row.error_code.as_deref(), Some("FIRMWARE_UPDATE_RESULT_9"));
    assert!(
        row.error_msg
            .as_deref()
            .unwrap()
            .contains("unsupported protocol")
    );
    fleet.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn firmware_downloads_time_out_on_the_manual_clock_and_refused_uris_fail() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (fx, nodes) = fixture(&app, "tracker", "coap", 2).await;
    // One device takes the URI and never downloads; the other refuses the write (no /5/0).
    let silent = fleet(
        &app,
        &nodes[..1],
        Lwm2mOptions {
            behaviour: Lwm2mBehaviour::Silent,
            ..Lwm2mOptions::default()
        },
    );
    let refusing = fleet(
        &app,
        &nodes[1..],
        Lwm2mOptions {
            behaviour: Lwm2mBehaviour::Refuse,
            ..Lwm2mOptions::default()
        },
    );
    let task_id = firmware_task(&app, &fx, "tracker", &nodes).await;
    let downloading = |rows: &[backend::storage::entity::subtasks::Model]| {
        rows.iter()
            .find(|r| r.device_id.ends_with(&nodes[0]))
            .is_some_and(|r| r.step == "downloading")
    };
    for _ in 0..500 {
        if downloading(&subtask_rows(&app, &task_id).await) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(downloading(&subtask_rows(&app, &task_id).await));
    app.clock.advance(Duration::from_secs(59 * 60));
    app.state.driver.run_due(&app.state).await.unwrap();
    assert!(
        downloading(&subtask_rows(&app, &task_id).await),
        "59 min is not yet too long"
    );
    app.clock.advance(Duration::from_secs(60));
    app.state.driver.run_due(&app.state).await.unwrap();
    let task = wait_finished(&app, &fx, &task_id).await;
    assert_eq!(task.status, "Fail");
    let mut rows = subtask_rows(&app, &task_id).await;
    rows.sort_by_key(|r| r.device_id.clone());
    let codes: Vec<_> = rows.iter().map(|r| r.error_code.clone().unwrap()).collect();
    assert_eq!(codes, ["DOWNLOAD_RESULT_TIMEOUT", "FIRMWARE_URI_REFUSED"]);
    // The timed-out download's URI no longer opens anything.
    let tokens = download_tokens::Entity::find()
        .filter(download_tokens::Column::DeviceId.eq(format!("tracker_{}", nodes[0])))
        .all(&app.state.db)
        .await
        .unwrap();
    assert!(tokens.iter().all(|t| t.revoked_at.is_some()));
    silent.stop().await;
    refusing.stop().await;
    app.stop().await;
}

/// Registers a raw CoAP client as `node`, answers the platform until it writes `/5/0/1`, and returns the
/// URI written.
async fn package_uri(app: &TestApp, socket: &tokio::net::UdpSocket, node: &str) -> String {
    let mut reg = Packet::new();
    reg.header.set_type(MessageType::Confirmable);
    reg.header.code = MessageClass::Request(RequestType::Post);
    reg.header.message_id = 1;
    reg.set_token(vec![9]);
    reg.add_option(CoapOption::UriPath, b"rd".to_vec());
    reg.add_option(CoapOption::UriQuery, format!("ep={node}").into_bytes());
    socket.send(&reg.to_bytes().unwrap()).await.unwrap();
    let mut buf = [0u8; 1500];
    for _ in 0..50 {
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
            .await
            .expect("the platform talks")
            .unwrap();
        let req = Packet::from_bytes(&buf[..n]).unwrap();
        let MessageClass::Request(method) = req.header.code else {
            continue;
        };
        let path: Vec<String> = req
            .get_option(CoapOption::UriPath)
            .map(|l| {
                l.iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let mut ack = Packet::new();
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.message_id = req.header.message_id;
        ack.set_token(req.get_token().to_vec());
        let code = match (method, path.join("/").as_str()) {
            (RequestType::Put, "5/0/1") => {
                ack.header.code = MessageClass::Response(ResponseType::Changed);
                socket.send(&ack.to_bytes().unwrap()).await.unwrap();
                return String::from_utf8(req.payload).unwrap();
            }
            (RequestType::Get, "3/0/3") => {
                ack.payload = b"V1.0".to_vec();
                ResponseType::Content
            }
            (RequestType::Get, "4/0/8") => {
                ack.payload = b"77".to_vec();
                ResponseType::Content
            }
            (RequestType::Get, "19/0/0") => ResponseType::Content,
            _ => ResponseType::NotFound,
        };
        ack.header.code = MessageClass::Response(code);
        socket.send(&ack.to_bytes().unwrap()).await.unwrap();
        let _ = app;
    }
    panic!("no Package URI written");
}

#[tokio::test]
async fn https_products_get_an_https_uri_that_serves_the_package_and_coap_tokens_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (fx, nodes) = fixture(&app, "camera", "https", 1).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(app.coap).await.unwrap();
    let task_id = firmware_task(&app, &fx, "camera", &nodes).await;
    let uri = package_uri(&app, &socket, &nodes[0]).await;
    assert!(uri.starts_with("https://") && uri.contains("/fw/"), "{uri}");
    let base = &uri[..uri.len() - 64];
    let body = app.client.get(&uri).send().await.unwrap();
    assert_eq!(body.status(), 200);
    let body = body.bytes().await.unwrap();
    assert_eq!(hex::encode(Sha256::digest(&body)), fx.sha256);
    // The token is the path: another one opens nothing.
    let forged = format!("{base}{}", "ab".repeat(32));
    assert_eq!(app.client.get(&forged).send().await.unwrap().status(), 401);
    tasks::stop(&app.state, &fx.project, &task_id, None)
        .await
        .unwrap();

    // A CoAP block request with a token that was never issued: 4.01 with a reason.
    let mut get = Packet::new();
    get.header.set_type(MessageType::Confirmable);
    get.header.code = MessageClass::Request(RequestType::Get);
    get.header.message_id = 4242;
    get.set_token(b"blk".to_vec());
    get.add_option(CoapOption::UriPath, b"fw".to_vec());
    get.add_option(CoapOption::UriPath, "cd".repeat(32).into_bytes());
    socket.send(&get.to_bytes().unwrap()).await.unwrap();
    let mut buf = [0u8; 1500];
    let answer = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let p = Packet::from_bytes(&buf[..n]).unwrap();
        if p.header.message_id == 4242 && p.header.get_type() == MessageType::Acknowledgement {
            break p;
        }
    };
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::Unauthorized)
    );
    assert_eq!(answer.payload, b"unknown download token");
    app.stop().await;
}

/// A third-party LwM2M client: Telefonica's `lwm2m-node-lib` with node-coap's block-wise transfers
/// (`end2end/lwm2m/client.js`, installed by `scripts/setup.sh` with the end2end npm packages).
#[tokio::test]
async fn a_third_party_lwm2m_client_upgrades_its_firmware_block_wise() {
    let end2end = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../end2end");
    assert!(
        end2end.join("node_modules/lwm2m-node-lib").exists(),
        "end2end/node_modules/lwm2m-node-lib is missing: run scripts/setup.sh (npm ci in end2end/)"
    );
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (fx, nodes) = fixture(&app, "tracker", "coap", 1).await;
    let mut client = tokio::process::Command::new("node")
        .arg(end2end.join("lwm2m/client.js"))
        .args([
            app.coap.ip().to_string(),
            app.coap.port().to_string(),
            nodes[0].clone(),
            "V1.0".to_owned(),
            "V2.0".to_owned(),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(client.stdout.take().unwrap()));
    let first = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("the client runs");
            if let Some(ours) = line.strip_prefix("client: ") {
                return ours.to_owned();
            }
        }
    })
    .await
    .expect("the client registers");
    assert!(first.starts_with("registered rd/"), "{first}");
    let task_id = firmware_task(&app, &fx, "tracker", &nodes).await;
    let task = wait_finished(&app, &fx, &task_id).await;
    let rows = subtask_rows(&app, &task_id).await;
    assert_eq!(task.status, "Success", "{rows:#?}");
    let d = devices::get(&app.state, &fx.project, &format!("tracker_{}", nodes[0]))
        .await
        .unwrap();
    assert_eq!(d.fw_version.as_deref(), Some("V2.0"));
    let mut said = Vec::new();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await
    {
        if let Some(ours) = line.strip_prefix("client: ") {
            said.push(ours.to_owned());
        }
    }
    assert!(
        said.contains(&format!("downloaded 30000 {}", fx.sha256)),
        "the client's own block-wise download got the package: {said:?}"
    );
    let _ = client.kill().await;
    app.stop().await;
}

/// Sends a block request for `token` and returns the answer to it (skipping the platform's own requests).
pub(crate) async fn get_block(
    socket: &tokio::net::UdpSocket,
    token: &str,
    num: u32,
    mid: u16,
) -> Packet {
    let mut get = Packet::new();
    get.header.set_type(MessageType::Confirmable);
    get.header.code = MessageClass::Request(RequestType::Get);
    get.header.message_id = mid;
    get.set_token(b"blk".to_vec());
    get.add_option(CoapOption::UriPath, b"fw".to_vec());
    get.add_option(CoapOption::UriPath, token.as_bytes().to_vec());
    get.add_option(
        CoapOption::Block2,
        protocol::lwm2m::Block {
            num,
            more: false,
            szx: 2,
        }
        .encode(),
    );
    socket.send(&get.to_bytes().unwrap()).await.unwrap();
    let mut buf = [0u8; 1500];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let p = Packet::from_bytes(&buf[..n]).unwrap();
        if p.header.message_id == mid && p.header.get_type() == MessageType::Acknowledgement {
            return p;
        }
    }
}

#[tokio::test]
async fn a_block_wise_download_stops_when_its_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = crate::helpers::settings_for(dir.path());
    // Shorter than the 60-minute download timeout, so expiry is what ends it.
    settings.downloads.token_ttl = Duration::from_secs(30 * 60);
    // Smaller than the package: each block is read from the store on its own.
    settings.lwm2m.cache_bytes = 16;
    let app = crate::helpers::spawn_with(settings).await;
    let (fx, nodes) = fixture(&app, "tracker", "coap", 1).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(app.coap).await.unwrap();
    firmware_task(&app, &fx, "tracker", &nodes).await;
    let uri = package_uri(&app, &socket, &nodes[0]).await;
    assert!(uri.starts_with("coap://127.0.0.1:"), "{uri}");
    let token = uri.rsplit('/').next().unwrap().to_owned();

    let first = get_block(&socket, &token, 0, 5000).await;
    assert_eq!(
        first.header.code,
        MessageClass::Response(ResponseType::Content)
    );
    assert_eq!(first.payload.len(), 64);
    let block = first.get_first_option(CoapOption::Block2).unwrap();
    let block = protocol::lwm2m::Block::decode(block).unwrap();
    assert_eq!((block.num, block.more, block.size()), (0, true, 64));

    app.clock.advance(Duration::from_secs(30 * 60));
    let late = get_block(&socket, &token, 1, 5001).await;
    assert_eq!(
        late.header.code,
        MessageClass::Response(ResponseType::Unauthorized)
    );
    assert_eq!(late.payload, b"the download token has expired");
    app.stop().await;
}
