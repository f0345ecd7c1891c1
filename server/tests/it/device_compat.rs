//! IoTDA's device-side behaviours a switching fleet relies on, through hand-driven MQTT devices: gateway
//! OTA (a child device upgraded through its gateway's connection), `task_ext_info` in the events, a
//! success report on the wrong version, `$sdk_info`, MQTT 3.1 and 5.0 logins (Eclipse Paho) with custom
//! topics, and `secure_access` on plain MQTT.

use std::time::Duration;

use backend::service::tasks;
use backend::storage::entity::devices;
use domain::task::SubtaskStatus;
use sea_orm::EntityTrait;
use serde_json::{Value, json};

use crate::api::{application, json_of};
use crate::helpers::spawn_app;
use crate::tasks::{
    fixture, new_task, raw_device, register, wait_device_status, wait_subtask, wait_task,
};

#[tokio::test]
async fn a_child_device_is_upgraded_through_its_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let a = application(&app, &fx.project).await;
    let gateway = register(&app, &fx, "gw-1").await;
    let other = register(&app, &fx, "gw-2").await;
    // Children are registered through the API, as IoTDA applications do.
    for (child, parent) in [
        ("child-1", "gw-1"),
        ("child-2", "gw-1"),
        ("stranger", "gw-2"),
    ] {
        let body = json!({"product_id": "meter", "node_id": child, "device_id": child,
                          "gateway_id": parent, "future_sdk_field": true});
        let d = json_of(a.call("POST", "/devices", &[], Some(&body)).await, 201).await;
        assert_eq!(d["gateway_id"], parent, "{d}");
        assert_eq!(d["node_type"], "ENDPOINT", "{d}");
    }
    let listed = json_of(
        a.call("GET", "/devices", &[("gateway_id", "gw-1")], None)
            .await,
        200,
    )
    .await;
    let mut ids: Vec<&str> = listed["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["child-1", "child-2"], "{listed}");
    assert_eq!(listed["page"]["count"], 2);
    // Children are reached through a directly connected gateway: no grandchildren.
    let nested = json!({"product_id": "meter", "node_id": "grandchild", "gateway_id": "child-1"});
    let refused = json_of(a.call("POST", "/devices", &[], Some(&nested)).await, 400).await;
    assert!(
        refused["error_msg"]
            .as_str()
            .unwrap()
            .contains("gateway_id"),
        "{refused}"
    );
    let refused = json_of(a.call("DELETE", "/devices/gw-1", &[], None).await, 409).await;
    assert!(
        refused["error_msg"].as_str().unwrap().contains("child"),
        "{refused}"
    );

    let mut gw = raw_device(&app, &gateway).await;
    let mut gw2 = raw_device(&app, &other).await;
    wait_device_status(&app, "gw-1", "ONLINE").await;
    // The gateway's connection is its children's.
    wait_device_status(&app, "child-1", "ONLINE").await;
    wait_device_status(&app, "stranger", "ONLINE").await;

    let body = json!({
        "task_name": "through_the_gateway", "task_type": "softwareUpgrade", "task_mode": "GATEWAY",
        "targets": ["child-1", "child-2"], "document": {"package_ids": [fx.package]},
        "task_ext_info": {"device_type": "DDC"}
    });
    let task = json_of(a.call("POST", "/batchtasks", &[], Some(&body)).await, 201).await;
    assert_eq!(task["task_mode"], "GATEWAY", "{task}");
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    let mut queried = Vec::new();
    for _ in 0..2 {
        let q = gw.next_message("version_query").await;
        let paras = &q["services"][0]["paras"];
        assert_eq!(paras["task_id"], task_id.as_str(), "{q}");
        assert_eq!(paras["sub_device_count"], 2, "{q}");
        assert_eq!(paras["task_ext_info"], json!({"device_type": "DDC"}), "{q}");
        queried.push(q["object_device_id"].as_str().unwrap().to_owned());
    }
    queried.sort();
    assert_eq!(queried, ["child-1", "child-2"]);
    assert!(
        gw2.quiet(Duration::from_millis(300)).await,
        "nothing for gw-2"
    );

    // Another gateway cannot speak for gw-1's children: its report is dropped.
    gw2.publish(&child_event(
        "child-1",
        "version_report",
        json!({"sw_version": "2.0"}),
    ))
    .await;
    // gw-1 answers for child-1 only; child-2 stays silent.
    gw.publish(&child_event(
        "child-1",
        "version_report",
        json!({"sw_version": "1.0"}),
    ))
    .await;
    let up = gw.next_message("software_upgrade").await;
    assert_eq!(up["object_device_id"], "child-1", "{up}");
    let paras = &up["services"][0]["paras"];
    assert_eq!(paras["sub_device_count"], 2);
    assert_eq!(paras["task_ext_info"]["device_type"], "DDC");
    assert!(paras["access_token"].is_string());
    let db = app.state.db.clone();
    let row = |id: &'static str| {
        let db = db.clone();
        async move {
            devices::Entity::find_by_id(id.to_owned())
                .one(&db)
                .await
                .unwrap()
                .unwrap()
        }
    };
    // The forged report (2.0, the target) would have made child-1 "already upgraded".
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(row("child-1").await.sw_version.as_deref(), Some("1.0"));
    gw.publish(&child_event(
        "child-1",
        "upgrade_progress_report",
        json!({"result_code": 0, "progress": 100, "version": "2.0"}),
    ))
    .await;
    wait_subtask(&app, &task_id, "child-1", "success", |s| {
        s.status == SubtaskStatus::Success.as_str()
    })
    .await;
    let child2 = crate::tasks::subtask_rows(&app, &task_id)
        .await
        .into_iter()
        .find(|s| s.device_id == "child-2")
        .unwrap();
    assert_eq!(
        child2.step, "version_query",
        "child-2 still waits for its report"
    );
    // The child's record has its new version; the gateway's own is untouched.
    assert_eq!(row("child-1").await.sw_version.as_deref(), Some("2.0"));
    assert_eq!(row("gw-1").await.sw_version, None);

    // The gateway goes: so do its children, and their upgrades wait for it.
    gw.close().await;
    wait_device_status(&app, "child-2", "OFFLINE").await;
    gw2.close().await;
    app.stop().await;
}

fn child_event(child: &str, event_type: &str, paras: Value) -> Value {
    json!({"object_device_id": child,
           "services": [{"service_id": "$ota", "event_type": event_type, "paras": paras}]})
}

#[tokio::test]
async fn a_success_report_on_the_wrong_version_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let d = register(&app, &fx, "dev-wrong").await;
    let mut raw = raw_device(&app, &d).await;
    wait_device_status(&app, "dev-wrong", "ONLINE").await;
    let mut new = new_task(&fx, "wrong", &[&d]);
    new.task_ext_info = Some(json!({"batch": 7}));
    let task = tasks::create(&app.state, &fx.project, new).await.unwrap();
    let query = raw.next("version_query").await;
    assert_eq!(query["task_ext_info"], json!({"batch": 7}), "{query}");
    assert_eq!(query["task_id"], task.id.as_str());
    assert!(query.get("sub_device_count").is_none(), "{query}");
    raw.send("version_report", json!({"sw_version": "1.0"}))
        .await;
    let up = raw.next("software_upgrade").await;
    assert_eq!(up["task_ext_info"], json!({"batch": 7}), "{up}");
    raw.send(
        "upgrade_progress_report",
        json!({"result_code": 0, "progress": 100, "version": "1.0"}),
    )
    .await;
    // No clock moves: the failure comes from the report itself, not the 24-hour deadline.
    let s = wait_subtask(&app, &task.id, "dev-wrong", "failed", |s| {
        s.status == SubtaskStatus::Fail.as_str()
    })
    .await;
    assert_eq!(s.error_code.as_deref(), Some("VERSION_MISMATCH"));
    assert!(
        s.error_msg.as_deref().unwrap_or_default().contains("1.0"),
        "{s:?}"
    );
    wait_task(&app, &fx, &task.id, "Fail", |t| t.status == "Fail").await;
    raw.close().await;
    app.stop().await;
}

#[tokio::test]
async fn sdk_info_reports_update_the_device_record() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let d = register(&app, &fx, "dev-sdk").await;
    let raw = raw_device(&app, &d).await;
    wait_device_status(&app, "dev-sdk", "ONLINE").await;
    // What the Python device SDK's `report_device_info` sends.
    raw.publish(&json!({"object_device_id": "dev-sdk", "services": [{
        "service_id": "$sdk_info", "event_type": "sdk_info_report", "event_time": "20261206T120000Z",
        "event_id": null,
        "paras": {"device_sdk_version": "Python_v1.2.0", "sw_version": "1.1", "fw_version": "fw-7"}}]}))
        .await;
    let a = application(&app, &fx.project).await;
    for _ in 0..500 {
        let shown = json_of(a.call("GET", "/devices/dev-sdk", &[], None).await, 200).await;
        if shown["device_sdk_version"] == "Python_v1.2.0" {
            assert_eq!(shown["sw_version"], "1.1", "{shown}");
            assert_eq!(shown["fw_version"], "fw-7", "{shown}");
            raw.close().await;
            app.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the $sdk_info report never reached the device record");
}

/// Runs `end2end/sdk/mqtt_versions.py` (Eclipse Paho) as `dev` in MQTT `version`; its JSON result.
async fn paho(app: &crate::helpers::TestApp, dev: &server::sim::SimDevice, version: &str) -> Value {
    use backend::clock::Clock;
    // Signature type 0: the password is checked without the hour (the test's clock is not the
    // client's).
    let (client_id, password) =
        server::sim::login(&dev.device_id, &dev.secret, 0, app.clock.now().as_millis());
    let port = app.mqtt.port().to_string();
    crate::sdk::run_script(
        "mqtt_versions.py",
        &[
            ("MQTT_HOST", crate::sdk::os("127.0.0.1")),
            ("MQTT_PORT", crate::sdk::os(&port)),
            ("MQTT_VERSION", crate::sdk::os(version)),
            ("DEVICE_ID", crate::sdk::os(&dev.device_id)),
            ("CLIENT_ID", crate::sdk::os(&client_id)),
            ("PASSWORD", crate::sdk::os(&password)),
            ("SW_VERSION", crate::sdk::os("2.0")),
        ],
        Duration::from_secs(60),
    )
    .await
}

#[tokio::test]
async fn mqtt_3_1_and_5_0_devices_log_in_publish_custom_topics_and_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    for version in ["31", "5"] {
        let d = register(&app, &fx, &format!("dev-v{version}")).await;
        let run = paho(&app, &d, version);
        let started = async {
            wait_device_status(&app, &d.device_id, "ONLINE").await;
            tasks::create(
                &app.state,
                &fx.project,
                new_task(&fx, &format!("v{version}"), &[&d]),
            )
            .await
            .unwrap()
        };
        let (result, task) = tokio::join!(run, started);
        assert_eq!(result["connack"], 0, "MQTT {version}: {result}");
        assert_eq!(
            result["custom_acked"], true,
            "a custom topic is acknowledged: {result}"
        );
        assert_eq!(
            result["version_query"]["topic"],
            format!("$oc/devices/{}/sys/events/down", d.device_id),
            "{result}"
        );
        assert_eq!(
            result["version_query"]["paras"]["task_id"],
            task.id.as_str()
        );
        // It reported the target version: already upgraded.
        wait_subtask(&app, &task.id, &d.device_id, "success", |s| {
            s.status == SubtaskStatus::Success.as_str()
        })
        .await;
    }
    app.stop().await;
}

#[tokio::test]
async fn a_secure_access_device_is_refused_on_plain_mqtt_and_served_over_tls() {
    use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let secret = "secret_secure-1";
    backend::service::devices::register(
        &app.state,
        &fx.project,
        backend::service::devices::NewDevice {
            product_id: "meter".into(),
            node_id: "secure-1".into(),
            device_id: Some("secure-1".into()),
            secret: Some(secrecy::SecretString::from(secret)),
            // IoTDA's default: TLS only.
            ..Default::default()
        },
    )
    .await
    .unwrap();
    use backend::clock::Clock;
    let (client_id, password) =
        server::sim::login("secure-1", secret, 1, app.clock.now().as_millis());
    let mut plain = MqttOptions::new(client_id.clone(), "127.0.0.1", app.mqtt.port());
    plain.set_credentials("secure-1", password.clone());
    let (_c, mut events) = AsyncClient::new(plain, 4);
    let refused = loop {
        match events.poll().await {
            Err(ConnectionError::ConnectionRefused(code)) => break code,
            Err(e) => panic!("{e}"),
            Ok(_) => {}
        }
    };
    assert_eq!(refused, ConnectReturnCode::NotAuthorized);
    // Over TLS the same login is served.
    let mut tls = MqttOptions::new(client_id, "localhost", app.mqtts.port());
    tls.set_credentials("secure-1", password);
    tls.set_transport(rumqttc::Transport::tls(app.ca_pem.clone(), None, None));
    let (_c, mut events) = AsyncClient::new(tls, 4);
    let ack = loop {
        if let Event::Incoming(Packet::ConnAck(a)) = events.poll().await.unwrap() {
            break a;
        }
    };
    assert_eq!(ack.code, ConnectReturnCode::Success);
    wait_device_status(&app, "secure-1", "ONLINE").await;
    app.stop().await;

    // The switch for a fleet registered before Updraft enforced it: plain logins are served again.
    let mut settings = crate::helpers::settings_for(dir.path());
    settings.mqtt.enforce_secure_access = false;
    let app = crate::helpers::spawn_with(settings).await;
    let (client_id, password) =
        server::sim::login("secure-1", secret, 1, app.clock.now().as_millis());
    let mut plain = MqttOptions::new(client_id, "127.0.0.1", app.mqtt.port());
    plain.set_credentials("secure-1", password);
    let (_c, mut events) = AsyncClient::new(plain, 4);
    let ack = loop {
        if let Event::Incoming(Packet::ConnAck(a)) = events.poll().await.unwrap() {
            break a;
        }
    };
    assert_eq!(ack.code, ConnectReturnCode::Success);
    app.stop().await;
}

#[tokio::test]
async fn a_device_that_connects_before_its_confirmation_still_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let d = register(&app, &fx, "dev-unconfirmed").await;
    let mut new = new_task(&fx, "confirm_first", &[&d]);
    new.need_confirm = true;
    let task = tasks::create(&app.state, &fx.project, new).await.unwrap();
    // The device connects (and reconnects) while its subtask waits for confirmation.
    for _ in 0..2 {
        let mut raw = raw_device(&app, &d).await;
        wait_device_status(&app, "dev-unconfirmed", "ONLINE").await;
        assert!(
            raw.quiet(Duration::from_millis(300)).await,
            "nothing sent before the confirmation"
        );
        raw.close().await;
        wait_device_status(&app, "dev-unconfirmed", "OFFLINE").await;
    }
    let row = &crate::tasks::subtask_rows(&app, &task.id).await[0];
    assert_eq!(row.step, "unconfirmed", "{row:?}");
    // Confirmed while connected: it starts with the connection it has.
    let mut raw = raw_device(&app, &d).await;
    wait_device_status(&app, "dev-unconfirmed", "ONLINE").await;
    tasks::confirm(&app.state, &fx.project, &task.id, None)
        .await
        .unwrap();
    let query = raw.next("version_query").await;
    assert_eq!(query["task_id"], task.id.as_str());
    raw.close().await;
    app.stop().await;
}
