//! Huawei's official application SDK (`huaweicloudsdkiotda` from PyPI, installed by scripts/setup.sh)
//! against a running Updraft, with two simulated MQTT devices doing the real upgrade
//! (`end2end/sdk/iotda_sdk_check.py`).

use std::path::PathBuf;
use std::time::Duration;

use backend::service::{credentials, devices, products, projects};
use domain::Timestamp;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use server::sim::{SimDevice, SimOptions};

use crate::helpers::spawn_app;
use crate::tasks::fleet;

/// The SDK's Python, from the venv scripts/setup.sh creates.
fn sdk_python() -> PathBuf {
    let venv = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".cache/updraft/iotda-venv/bin/python");
    assert!(
        venv.is_file(),
        "{} is missing: run scripts/setup.sh (it installs huaweicloudsdkiotda)",
        venv.display()
    );
    venv
}

/// `s` as an environment value.
pub(crate) fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// Runs `end2end/sdk/{script}` with the venv's Python and `envs`; the JSON of its last output line
/// (the scripts print their results so).
pub(crate) async fn run_script(
    script: &str,
    envs: &[(&str, &std::ffi::OsStr)],
    timeout: Duration,
) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../end2end/sdk")
        .join(script);
    let out = tokio::process::Command::new(sdk_python())
        .arg(path)
        .envs(envs.iter().copied())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, out)
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {timeout:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script} printed no JSON result ({e}):\n{stdout}"))
}

#[tokio::test]
async fn the_official_python_sdk_runs_an_upgrade_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    // The SDK dates its requests with the real clock.
    app.clock.set(Timestamp::from_millis(
        chrono::Utc::now().timestamp_millis(),
    ));
    let project = projects::ensure_default(&app.state).await.unwrap().id;
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
    let mut sims = Vec::new();
    for id in ["sdk-1", "sdk-2", "sdk-idle"] {
        let secret = format!("secret_{id}");
        devices::register(
            &app.state,
            &project,
            devices::NewDevice {
                // Plain MQTT: IoTDA refuses a `secure_access` device on 1883.
                secure_access: Some(false),
                product_id: "meter".into(),
                node_id: id.into(),
                device_id: Some(id.into()),
                secret: Some(SecretString::from(secret.clone())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        if id != "sdk-idle" {
            sims.push(SimDevice {
                device_id: id.into(),
                secret,
            });
        }
    }
    // The package is an object already in the store ("bucket" updraft, the local directory).
    let key = "fw/app-2.0.bin";
    let object = app.data_dir.join("packages").join(key);
    std::fs::create_dir_all(object.parent().unwrap()).unwrap();
    std::fs::write(&object, vec![42u8; 50_000]).unwrap();
    let devices = fleet(&app, sims, SimOptions::default());
    let cred = credentials::create(&app.state, &project, "sdk test")
        .await
        .unwrap();
    let ca = app.data_dir.join("tls").join("ca.pem");

    let result = run_script(
        "iotda_sdk_check.py",
        &[
            ("UPDRAFT_ENDPOINT", os(&app.base)),
            ("UPDRAFT_AK", os(&cred.credential.access_key)),
            ("UPDRAFT_SK", os(cred.secret_key.expose_secret())),
            ("UPDRAFT_PROJECT", os(&project)),
            ("UPDRAFT_CA", ca.as_os_str()),
            ("UPDRAFT_BUCKET", os("updraft")),
            ("UPDRAFT_OBJECT_KEY", os(key)),
            ("UPDRAFT_PRODUCT", os("meter")),
            ("UPDRAFT_DEVICES", os("sdk-1,sdk-2")),
            ("UPDRAFT_IDLE_DEVICE", os("sdk-idle")),
            // The SDK writes ~/.huaweicloud/application_id.
            ("HOME", dir.path().as_os_str()),
        ],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(result["package_version"], "2.0", "{result}");
    assert_eq!(result["status"], "Success", "{result}");
    assert_eq!(result["success"], 2, "{result}");
    assert_eq!(result["details"], serde_json::json!(["sdk-1", "sdk-2"]));
    assert_eq!(result["delete_running"]["status"], 409, "{result}");
    assert_eq!(result["delete_running"]["code"], "IOTDA.000007");
    assert_eq!(result["delete_running"]["request_id"], true);
    assert_eq!(result["stopped_status"], "Stopped", "{result}");
    assert_eq!(result["after_delete"], 404, "{result}");
    assert_eq!(
        devices
            .stats
            .succeeded
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    devices.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn the_official_python_sdk_pages_confirms_and_routes() {
    use backend::service::groups;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    app.clock.set(Timestamp::from_millis(
        chrono::Utc::now().timestamp_millis(),
    ));
    let fx = crate::tasks::fixture(&app).await;
    // 2 000 devices for the task, the first 1 000 of them in a group.
    let group = groups::create(&app.state, &fx.project, "big", "")
        .await
        .unwrap();
    let ids = crate::compat::offline_devices(&app, &fx, "many", 2000).await;
    for id in &ids[..1000] {
        groups::add_device(&app.state, &fx.project, &group.id, id)
            .await
            .unwrap();
    }
    let list = dir.path().join("devices.txt");
    std::fs::write(&list, ids.join("\n")).unwrap();
    let cred = credentials::create(&app.state, &fx.project, "sdk test")
        .await
        .unwrap();
    let ca = app.data_dir.join("tls").join("ca.pem");
    let r = run_script(
        "iotda_sdk_compat.py",
        &[
            ("UPDRAFT_ENDPOINT", os(&app.base)),
            ("UPDRAFT_AK", os(&cred.credential.access_key)),
            ("UPDRAFT_SK", os(cred.secret_key.expose_secret())),
            ("UPDRAFT_PROJECT", os(&fx.project)),
            ("UPDRAFT_CA", ca.as_os_str()),
            ("UPDRAFT_PACKAGE", os(&fx.package)),
            ("UPDRAFT_TASK_DEVICES", list.as_os_str()),
            ("UPDRAFT_GROUP", os(&group.id)),
            ("UPDRAFT_HOOK_URL", os("https://127.0.0.1:9/hook")),
            ("HOME", dir.path().as_os_str()),
        ],
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(r["apps"], 1, "{r}");
    assert_eq!(r["default_app"], true, "{r}");
    assert_eq!(r["need_confirm"], true, "{r}");
    assert_eq!(
        r["task_devices"], 2000,
        "every device reached by marker: {r}"
    );
    assert_eq!(r["task_pages_count"], serde_json::json!([2000]), "{r}");
    assert_eq!(r["all_waiting"], true, "{r}");
    assert_eq!(
        r["confirmed"],
        serde_json::json!(["success", "success", "success"])
    );
    assert_eq!(
        r["group_devices"], 1000,
        "every member reached by marker: {r}"
    );
    assert_eq!(r["group_pages_count"], serde_json::json!([1000]), "{r}");
    assert_eq!(r["rule_active_at_creation"], false, "{r}");
    assert_eq!(r["rule_active"], true, "{r}");
    assert_eq!(r["action_rule"], true, "{r}");
    assert_eq!(r["action_url"], "https://127.0.0.1:9/hook");
    assert_eq!(r["rules"], serde_json::json!(["batchtask_to_billing"]));
    assert_eq!(r["actions"], 1);
    app.stop().await;
}
