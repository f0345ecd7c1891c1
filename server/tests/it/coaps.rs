//! CoAPS: LwM2M devices over DTLS 1.2 with pre-shared keys (the node id as identity, the device's secret
//! as key) on the server's second UDP port (port 0 here). Simulated devices go through real upgrades
//! (PCP, and the Firmware Update object downloading block-wise over their session); a device that must
//! use DTLS is refused in plaintext; a wrong key gets no session; and libcoap's `coap-client-openssl`
//! (Debian's libcoap3-bin) registers as an independent client and cannot speak for another device.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backend::service::devices;
use backend::storage::entity::devices as device_rows;
use coap_lite::{MessageClass, ResponseType};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use secrecy::ExposeSecret;
use server::sim::lwm2m::{Lwm2mOptions, Lwm2mStats, run_fleet};
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, spawn_app};
use crate::lwm2m::{self, Fixture, raw, register_packet, subtask_rows, wait_finished};

/// Makes the devices DTLS-only (`secure_access`), and returns each node's key (its secret's bytes).
async fn dtls_only(app: &TestApp, product: &str, nodes: &[String]) -> HashMap<String, Vec<u8>> {
    let ids: Vec<String> = nodes.iter().map(|n| format!("{product}_{n}")).collect();
    device_rows::Entity::update_many()
        .col_expr(
            device_rows::Column::SecureAccess,
            sea_orm::sea_query::Expr::value(true),
        )
        .filter(device_rows::Column::Id.is_in(ids.clone()))
        .exec(&app.state.db)
        .await
        .unwrap();
    let mut keys = HashMap::new();
    for (node, id) in nodes.iter().zip(&ids) {
        let secret = devices::secret(&app.state, id).await.unwrap().unwrap();
        keys.insert(node.clone(), backend::coap::psk_key(secret.expose_secret()));
    }
    keys
}

/// A simulated fleet on CoAPS with `keys`.
struct SecureFleet {
    stats: Arc<Lwm2mStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn secure_fleet(app: &TestApp, nodes: &[String], keys: HashMap<String, Vec<u8>>) -> SecureFleet {
    let stats = Arc::new(Lwm2mStats::default());
    let stop = CancellationToken::new();
    let opts = Lwm2mOptions {
        server: app.coaps,
        retry: Duration::from_millis(300),
        block_size: 256,
        psks: Some(Arc::new(keys)),
        ..Lwm2mOptions::default()
    };
    let task = tokio::spawn(run_fleet(opts, nodes.to_vec(), stats.clone(), stop.clone()));
    SecureFleet { stats, stop, task }
}

impl SecureFleet {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn assert_images(stats: &Lwm2mStats, fx: &Fixture, n: usize) {
    let images = stats.images.lock().unwrap().clone();
    assert_eq!(images.len(), n, "{images:?}");
    assert!(
        images.values().all(|sha| *sha == fx.sha256),
        "the exact bytes"
    );
}

#[tokio::test]
async fn devices_upgrade_over_coaps_with_pcp_and_the_firmware_object_and_plaintext_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;

    // Software over PCP.
    let (fx, nodes) = lwm2m::fixture(&app, 3).await;
    let keys = dtls_only(&app, lwm2m::PRODUCT, &nodes).await;
    // A DTLS-only device registering in plaintext: 4.03.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(app.coap).await.unwrap();
    let refused = raw(&socket, &register_packet(&nodes[0], 1)).await;
    assert_eq!(
        refused.header.code,
        MessageClass::Response(ResponseType::Forbidden)
    );
    let fleet = secure_fleet(&app, &nodes, keys);
    let task_id = lwm2m::create_task(&app, &fx, &nodes).await;
    let task = wait_finished(&app, &fx, &task_id).await;
    assert_eq!(
        (task.status.as_str(), task.success),
        ("Success", 3),
        "{:#?}",
        subtask_rows(&app, &task_id).await
    );
    assert_images(&fleet.stats, &fx, 3);
    assert_eq!(fleet.stats.handshakes_failed.load(Ordering::Relaxed), 0);
    fleet.stop().await;

    // Firmware over the Firmware Update object: the Package URI is coaps:// (the simulated device on
    // DTLS takes no other) and its blocks come over the session.
    let (fx, nodes) = crate::firmware::fixture(&app, "tracker", "coap", 2).await;
    let keys = dtls_only(&app, "tracker", &nodes).await;
    let fleet = secure_fleet(&app, &nodes, keys);
    let task_id = crate::firmware::firmware_task(&app, &fx, "tracker", &nodes).await;
    let task = wait_finished(&app, &fx, &task_id).await;
    assert_eq!(
        (task.status.as_str(), task.success),
        ("Success", 2),
        "{:#?}",
        subtask_rows(&app, &task_id).await
    );
    assert_images(&fleet.stats, &fx, 2);
    fleet.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_wrong_key_gets_no_session_and_the_device_stays_offline() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (_fx, nodes) = lwm2m::fixture(&app, 1).await;
    let mut keys = dtls_only(&app, lwm2m::PRODUCT, &nodes).await;
    keys.insert(nodes[0].clone(), b"not the key".to_vec());
    let fleet = secure_fleet(&app, &nodes, keys);
    // The server drops the records it cannot decrypt (DTLS sends no alert for them): the device's
    // handshake times out (5 s in the simulator).
    for _ in 0..300 {
        if fleet.stats.handshakes_failed.load(Ordering::Relaxed) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fleet.stats.handshakes_failed.load(Ordering::Relaxed) >= 1);
    assert_eq!(fleet.stats.registered.load(Ordering::Relaxed), 0);
    fleet.stop().await;
    let device = devices::get(
        &app.state,
        &backend::service::projects::ensure_default(&app.state)
            .await
            .unwrap()
            .id,
        &lwm2m::device_id(&nodes[0]),
    )
    .await
    .unwrap();
    assert_ne!(device.status, "ONLINE");
    app.stop().await;
}

/// `coap-client-openssl` registering `endpoint` as `identity` with `key`; its output (stdout and stderr,
/// with the PDUs it sent and received logged).
async fn libcoap_register(app: &TestApp, identity: &str, key: &str, endpoint: &str) -> String {
    let out = tokio::process::Command::new("coap-client-openssl")
        .args([
            "-m",
            "post",
            "-u",
            identity,
            "-k",
            key,
            "-t",
            "40",
            "-e",
            "</3/0>,</5/0>,</19/0>",
            "-B",
            "5",
            "-v",
            "7",
            &format!(
                "coaps://127.0.0.1:{}/rd?ep={endpoint}&lt=300&b=U",
                app.coaps.port()
            ),
        ])
        .output()
        .await
        .expect("coap-client-openssl runs (Debian's libcoap3-bin; .ci/run installs it)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn libcoap_registers_over_coaps_and_a_session_speaks_only_for_its_own_device() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (fx, _) = lwm2m::fixture(&app, 0).await;
    // libcoap takes the key as text: a secret whose hex spells printable text.
    let key = "libcoap-key-0001";
    let mut nodes = Vec::new();
    for i in 0..2 {
        let node = format!("86370600{i:07}");
        devices::register(
            &app.state,
            &fx.project,
            devices::NewDevice {
                product_id: lwm2m::PRODUCT.into(),
                node_id: node.clone(),
                secret: Some(hex::encode(key).into()),
                secure_access: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        nodes.push(node);
    }
    // Its own endpoint: 2.01 with the registration's location (libcoap logs the PDUs it receives).
    let own = libcoap_register(&app, &nodes[0], key, &nodes[0]).await;
    assert!(
        own.contains("c:2.01") && own.contains("Location-Path:rd"),
        "{own}"
    );
    // Another device's endpoint over its session: 4.03.
    let other = libcoap_register(&app, &nodes[0], key, &nodes[1]).await;
    assert!(
        other.contains("c:4.03") && !other.contains("c:2.01"),
        "{other}"
    );
    // A wrong key: no session, no answer.
    let wrong = libcoap_register(&app, &nodes[1], "not-the-key-0000", &nodes[1]).await;
    assert!(
        !wrong.contains("c:2.01") && !wrong.contains("c:4.03"),
        "{wrong}"
    );
    app.stop().await;
}

#[tokio::test]
async fn with_require_dtls_no_device_registers_in_plaintext() {
    // Every device, the fixture's product's devices, another product's devices.
    let cases: [(bool, &[&str], ResponseType); 3] = [
        (true, &[], ResponseType::Forbidden),
        (false, &[lwm2m::PRODUCT], ResponseType::Forbidden),
        (false, &["another-product"], ResponseType::Created),
    ];
    for (everyone, products, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::helpers::settings_for(dir.path());
        settings.lwm2m.require_dtls = everyone;
        settings.lwm2m.require_dtls_products = products.iter().map(|p| (*p).to_owned()).collect();
        let app = crate::helpers::spawn_with(settings).await;
        // The fixture's devices have `secure_access: false`: the settings refuse them anyway.
        let (_fx, nodes) = lwm2m::fixture(&app, 1).await;
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(app.coap).await.unwrap();
        let answer = raw(&socket, &register_packet(&nodes[0], 1)).await;
        assert_eq!(
            answer.header.code,
            MessageClass::Response(expected),
            "require_dtls {everyone}, products {products:?}"
        );
        app.stop().await;
    }
}
