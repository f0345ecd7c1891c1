//! IoTDA compatibility through the signed API: paging by marker to the end, ConfirmBatchTask and
//! `need_confirm`, IoTDA's error codes for malformed input, unknown body fields, ListDevices' time
//! window, and ShowApplications.

use std::collections::HashSet;

use backend::clock::Clock;
use backend::service::{devices, groups};
use domain::Timestamp;
use serde_json::{Value, json};

use crate::api::{Application, EMPTY, application, json_of};
use crate::helpers::{TestApp, spawn_app};
use crate::tasks::{Fixture, fixture};

/// Registers `n` offline devices `{prefix}-000`... of the fixture's product.
pub(crate) async fn offline_devices(
    app: &TestApp,
    fx: &Fixture,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{prefix}-{i:03}");
        devices::register(
            &app.state,
            &fx.project,
            devices::NewDevice {
                product_id: "meter".into(),
                node_id: id.clone(),
                device_id: Some(id.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        ids.push(id);
    }
    ids
}

/// Pages `rest` by `marker` (limit 10) to the end; every page's `page.count` must be `count`. Returns
/// the `key` of every item, in order.
async fn page_to_the_end(
    a: &Application<'_>,
    rest: &str,
    extra: &[(&str, &str)],
    items: &str,
    key: &str,
    count: usize,
) -> Vec<String> {
    let mut seen = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let mut query = vec![("limit", "10")];
        query.extend_from_slice(extra);
        if let Some(m) = &marker {
            query.push(("marker", m.as_str()));
        }
        let page = json_of(a.call("GET", rest, &query, None).await, 200).await;
        assert_eq!(
            page["page"]["count"], count,
            "{rest}: every page counts every match"
        );
        let got = page[items].as_array().unwrap();
        seen.extend(got.iter().map(|i| i[key].as_str().unwrap().to_owned()));
        if got.len() < 10 {
            return seen;
        }
        marker = Some(page["page"]["marker"].as_str().unwrap().to_owned());
        assert!(seen.len() <= count, "{rest}: paging does not end");
    }
}

#[tokio::test]
async fn markers_page_task_devices_groups_and_tasks_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let a = application(&app, &fx.project).await;
    let ids = offline_devices(&app, &fx, "pg", 27).await;
    let body = json!({"task_name": "paged", "task_type": "softwareUpgrade", "targets": ids,
                      "document": {"package_ids": [fx.package]}});
    let task = json_of(a.call("POST", "/batchtasks", &[], Some(&body)).await, 201).await;
    let task_id = task["task_id"].as_str().unwrap();
    let rest = format!("/batchtasks/{task_id}");
    let first = json_of(a.call("GET", &rest, &[("limit", "10")], None).await, 200).await;
    let marker = first["page"]["marker"].as_str().unwrap();
    assert!(
        marker.len() == 24 && marker.bytes().all(|b| b.is_ascii_hexdigit()),
        "IoTDA markers are 24 hex digits: {marker}"
    );
    let targets = page_to_the_end(&a, &rest, &[], "task_details", "target", 27).await;
    assert_eq!(targets.len(), 27);
    assert_eq!(
        targets.iter().collect::<HashSet<_>>().len(),
        27,
        "no repeats"
    );
    // Newest subtask first, as IoTDA lists.
    assert_eq!(targets[0], "pg-026");
    // IoTDA's documented default marker starts from the newest.
    let fs = json_of(
        a.call(
            "GET",
            &rest,
            &[("marker", "ffffffffffffffffffffffff")],
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(fs["task_details"][0]["target"], "pg-026");
    let bad = json_of(a.call("GET", &rest, &[("marker", "12")], None).await, 400).await;
    assert_eq!(bad["error_code"], "IOTDA.000006");

    let group = groups::create(&app.state, &fx.project, "paged", "")
        .await
        .unwrap();
    for id in &ids {
        groups::add_device(&app.state, &fx.project, &group.id, id)
            .await
            .unwrap();
    }
    let members = page_to_the_end(
        &a,
        &format!("/device-group/{}/devices", group.id),
        &[],
        "devices",
        "device_id",
        27,
    )
    .await;
    let mut sorted = ids.clone();
    sorted.sort_unstable_by(|x, y| y.cmp(x));
    assert_eq!(members, sorted, "every member once, by descending id");

    // ListBatchTasks: page.count is every match, whatever the marker.
    for (n, id) in ids.iter().take(11).enumerate() {
        let body = json!({"task_name": format!("more_{n}"), "task_type": "softwareUpgrade",
                          "targets": [id], "document": {"package_ids": [fx.package]}});
        json_of(a.call("POST", "/batchtasks", &[], Some(&body)).await, 201).await;
    }
    let listed = page_to_the_end(
        &a,
        "/batchtasks",
        &[("task_type", "softwareUpgrade")],
        "batchtasks",
        "task_id",
        12,
    )
    .await;
    assert_eq!(listed.len(), 12);
    app.stop().await;
}

#[tokio::test]
async fn need_confirm_tasks_wait_for_confirm_batch_task() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let a = application(&app, &fx.project).await;
    let ids = offline_devices(&app, &fx, "cf", 3).await;
    let body = json!({"task_name": "confirmed", "task_type": "softwareUpgrade", "targets": ids,
                      "need_confirm": true, "document": {"package_ids": [fx.package]}});
    let task = json_of(a.call("POST", "/batchtasks", &[], Some(&body)).await, 201).await;
    assert_eq!(task["need_confirm"], true, "{task}");
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    let rest = format!("/batchtasks/{task_id}");
    let steps = |shown: &Value| -> Vec<(String, String)> {
        let mut s: Vec<(String, String)> = shown["task_details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["target"].as_str().unwrap().to_owned(),
                    d["step"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        s.sort();
        s
    };
    let shown = json_of(a.call("GET", &rest, &[], None).await, 200).await;
    assert!(
        steps(&shown).iter().all(|(_, step)| step == "unconfirmed"),
        "{shown}"
    );
    assert!(
        shown["task_details"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["status"] == "Waitting")
    );
    let confirm = format!("{rest}/confirm");
    // A misspelt key is refused rather than read as "every device".
    let misspelt = json!({"target": ["cf-000"]});
    let refused = json_of(a.call("POST", &confirm, &[], Some(&misspelt)).await, 400).await;
    assert!(
        refused["error_msg"].as_str().unwrap().contains("targets"),
        "{refused}"
    );
    let one = json!({"targets": ["cf-000", "nobody"]});
    let answer = json_of(a.call("POST", &confirm, &[], Some(&one)).await, 200).await;
    assert_eq!(answer["targets"][0]["target"], "cf-000");
    assert_eq!(answer["targets"][0]["status"], "success");
    assert_eq!(answer["targets"][1]["status"], "failure", "{answer}");
    let shown = json_of(a.call("GET", &rest, &[], None).await, 200).await;
    assert_eq!(
        steps(&shown),
        [
            ("cf-000".into(), "wait_online".into()),
            ("cf-001".into(), "unconfirmed".into()),
            ("cf-002".into(), "unconfirmed".into())
        ],
        "only the confirmed device started (it waits for its connection)"
    );
    // Confirmed again: it no longer waits for confirmation.
    let again = json_of(
        a.call("POST", &confirm, &[], Some(&json!({"targets": ["cf-000"]})))
            .await,
        200,
    )
    .await;
    assert_eq!(again["targets"][0]["status"], "failure", "{again}");
    // No body confirms every device that waits (the SDK sends none when the caller gives none).
    let all = a
        .send(
            "POST",
            &format!("/v5/iot/{}{confirm}", a.project),
            &[],
            "application/json",
            Vec::new(),
            EMPTY,
            &[],
        )
        .await;
    json_of(all, 200).await;
    let shown = json_of(a.call("GET", &rest, &[], None).await, 200).await;
    assert!(
        steps(&shown).iter().all(|(_, step)| step == "wait_online"),
        "{shown}"
    );
    json_of(
        a.call("POST", &format!("{rest}/stop"), &[], None).await,
        200,
    )
    .await;
    let refused = json_of(a.call("POST", &confirm, &[], None).await, 409).await;
    assert_eq!(refused["error_code"], "IOTDA.000007");

    // A scheduled task has no devices to confirm yet.
    let later = Timestamp::from_millis(app.clock.now().as_millis() + 3_600_000).to_compact();
    let body = json!({"task_name": "later", "task_type": "softwareUpgrade", "targets": ["cf-001"],
                      "need_confirm": true, "task_policy": {"schedule_time": later},
                      "document": {"package_ids": [fx.package]}});
    let task = json_of(a.call("POST", "/batchtasks", &[], Some(&body)).await, 201).await;
    let refused = json_of(
        a.call(
            "POST",
            &format!("/batchtasks/{}/confirm", task["task_id"].as_str().unwrap()),
            &[],
            None,
        )
        .await,
        409,
    )
    .await;
    assert!(
        refused["error_msg"]
            .as_str()
            .unwrap()
            .contains("not started"),
        "{refused}"
    );
    app.stop().await;
}

#[tokio::test]
async fn errors_carry_iotdas_codes_and_unknown_fields_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let a = application(&app, &fx.project).await;
    let early = offline_devices(&app, &fx, "early", 2).await;
    app.clock.advance(std::time::Duration::from_secs(7200));
    let middle = Timestamp::from_millis(app.clock.now().as_millis() - 3_600_000).to_compact();
    offline_devices(&app, &fx, "late", 3).await;

    // A newer SDK's extra field is ignored.
    let body = json!({"task_name": "future", "task_type": "softwareUpgrade", "targets": early,
                      "document": {"package_ids": [fx.package], "package_digest": "x"},
                      "a_field_from_2030": {"nested": true}});
    json_of(a.call("POST", "/batchtasks", &[], Some(&body)).await, 201).await;

    let path = format!("/v5/iot/{}/batchtasks", a.project);
    let raw = |body: &'static [u8]| {
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body));
        (body.to_vec(), hash)
    };
    let (body, hash) = raw(b"{\"task_name\": ");
    let r = a
        .send("POST", &path, &[], "application/json", body, &hash, &[])
        .await;
    assert_eq!(json_of(r, 400).await["error_code"], "IOTDA.000008");
    let (body, hash) = raw(b"{\"task_name\": 5, \"task_type\": \"softwareUpgrade\"}");
    let r = a
        .send("POST", &path, &[], "application/json", body, &hash, &[])
        .await;
    assert_eq!(json_of(r, 400).await["error_code"], "IOTDA.000006");
    let (body, hash) = raw(b"task_name=x");
    let r = a
        .send("POST", &path, &[], "text/plain", body, &hash, &[])
        .await;
    assert_eq!(json_of(r, 415).await["error_code"], "IOTDA.000008");
    let r = a
        .call(
            "GET",
            "/batchtasks",
            &[("task_type", "softwareUpgrade"), ("limit", "0")],
            None,
        )
        .await;
    assert_eq!(json_of(r, 400).await["error_code"], "IOTDA.000017");

    // ListDevices' registration window.
    let r = a
        .call("GET", "/devices", &[("start_time", "2026-12-06")], None)
        .await;
    assert_eq!(json_of(r, 400).await["error_code"], "IOTDA.000009");
    let r = a
        .call(
            "GET",
            "/devices",
            &[
                ("start_time", "20261207T000000Z"),
                ("end_time", "20261206T000000Z"),
            ],
            None,
        )
        .await;
    assert_eq!(json_of(r, 400).await["error_code"], "IOTDA.000010");
    let late = json_of(
        a.call("GET", "/devices", &[("start_time", middle.as_str())], None)
            .await,
        200,
    )
    .await;
    assert_eq!(late["page"]["count"], 3, "{late}");
    let early = json_of(
        a.call("GET", "/devices", &[("end_time", middle.as_str())], None)
            .await,
        200,
    )
    .await;
    assert_eq!(early["page"]["count"], 2, "{early}");
    app.stop().await;
}

#[tokio::test]
async fn show_applications_tells_a_client_its_app_id() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let a = application(&app, &fx.project).await;
    let apps = json_of(a.call("GET", "/apps", &[], None).await, 200).await;
    let list = apps["applications"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{apps}");
    assert_eq!(list[0]["default_app"], true);
    let app_id = list[0]["app_id"].as_str().unwrap();
    // The one a device's record names.
    let device = offline_devices(&app, &fx, "ap", 1).await;
    let shown = json_of(
        a.call("GET", &format!("/devices/{}", device[0]), &[], None)
            .await,
        200,
    )
    .await;
    assert_eq!(shown["app_id"], app_id);
    let one = json_of(
        a.call("GET", &format!("/apps/{app_id}"), &[], None).await,
        200,
    )
    .await;
    assert_eq!(one["app_id"], app_id);
    assert!(one["create_time"].as_str().unwrap().ends_with('Z'));
    json_of(a.call("GET", "/apps/nope", &[], None).await, 404).await;
    let others = json_of(
        a.call("GET", "/apps", &[("default_app", "false")], None)
            .await,
        200,
    )
    .await;
    assert_eq!(others["applications"], json!([]));
    app.stop().await;
}

#[tokio::test]
async fn create_ota_package_accepts_the_configured_bucket_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = crate::helpers::settings_for(dir.path());
    // The OBS bucket the application's code already names.
    settings.packages.bucket_aliases = vec!["acme-firmware".into()];
    let app = crate::helpers::spawn_with(settings).await;
    let fx = fixture(&app).await;
    let a = application(&app, &fx.project).await;
    let object = app.data_dir.join("packages").join("fw/app-3.0.bin");
    std::fs::create_dir_all(object.parent().unwrap()).unwrap();
    std::fs::write(&object, vec![7u8; 4096]).unwrap();
    let body = |bucket: &str| {
        json!({"package_type": "softwarePackage", "product_id": "meter", "version": "3.0",
               "file_location": {"obs_location": {"region_name": "cn-north-4", "bucket_name": bucket,
                                                  "object_key": "fw/app-3.0.bin"}}})
    };
    let refused = json_of(
        a.call(
            "POST",
            "/ota-upgrades/packages",
            &[],
            Some(&body("someone-elses")),
        )
        .await,
        400,
    )
    .await;
    assert!(
        refused["error_msg"].as_str().unwrap().contains("bucket"),
        "{refused}"
    );
    let created = json_of(
        a.call(
            "POST",
            "/ota-upgrades/packages",
            &[],
            Some(&body("acme-firmware")),
        )
        .await,
        201,
    )
    .await;
    let obs = &created["file_location"]["obs_location"];
    assert_eq!(obs["region_name"], "cn-north-4", "{created}");
    assert_eq!(created["file_size"], 4096, "{created}");
    app.stop().await;
}
