//! The console's devices, groups, packages and tasks through its server functions, and the live event
//! stream (`GET /events`) the task pages follow, over real HTTPS.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{TestApp, spawn_app};

/// Calls a server function and returns its JSON, asserting the status.
async fn call(
    app: &TestApp,
    cookie: &str,
    name: &str,
    args: &[(&str, &str)],
    status: u16,
) -> Value {
    let resp = app.server_fn(cookie, name, args).await;
    let code = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(code, status, "{name}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Reads the event stream until `needle` has arrived (or fails after 10 s).
async fn read_until(stream: &mut reqwest::Response, seen: &mut String, needle: &str) {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.contains(needle) {
            let chunk = stream
                .chunk()
                .await
                .unwrap()
                .expect("the stream stays open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(found.is_ok(), "no {needle:?} in the stream; got:\n{seen}");
}

#[tokio::test]
async fn the_console_imports_groups_uploads_and_runs_a_task_with_live_events() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let cookie = app.sign_in().await;
    let project = call(&app, &cookie, "whoami", &[], 200).await["project_id"]
        .as_str()
        .unwrap()
        .to_owned();
    call(
        &app,
        &cookie,
        "create_product",
        &[
            ("product_id", "meter"),
            ("name", "Meter"),
            ("device_type", "WaterMeter"),
            ("protocol_type", "MQTT"),
            ("manufacturer_name", ""),
        ],
        200,
    )
    .await;

    call(
        &app,
        &cookie,
        "rename_product",
        &[("product_id", "meter"), ("name", "Water meter")],
        200,
    )
    .await;
    let bad_name = call(
        &app,
        &cookie,
        "rename_product",
        &[("product_id", "meter"), ("name", "")],
        422,
    )
    .await;
    assert!(bad_name["fields"]["name"].is_string(), "{bad_name}");
    let products = call(&app, &cookie, "list_products", &[], 200).await;
    assert_eq!(products["items"][0]["name"], "Water meter");

    // CSV import: good lines are registered (secrets returned once), a bad line is reported by number.
    let csv = "node_id,device_name\nn1,Pump house\n\"n2\",\"Tank, north\"\nbad id!,Broken\n";
    let imported = call(
        &app,
        &cookie,
        "import_devices",
        &[("product_id", "meter"), ("csv", csv)],
        200,
    )
    .await;
    assert_eq!(
        imported["registered"].as_array().unwrap().len(),
        2,
        "{imported}"
    );
    assert_eq!(imported["registered"][1]["device_id"], "meter_n2");
    assert_eq!(
        imported["registered"][0]["secret"].as_str().unwrap().len(),
        24
    );
    let refused = imported["refused"][0].as_str().unwrap();
    assert!(refused.starts_with("line 4: node_id"), "{refused}");
    let empty = call(
        &app,
        &cookie,
        "import_devices",
        &[("product_id", "meter"), ("csv", "node_id\n")],
        422,
    )
    .await;
    assert_eq!(empty["fields"]["csv"], "has no devices");

    // Filters: protocol and version.
    let list = |protocol: &'static str, version: &'static str| {
        let (app, cookie) = (&app, cookie.clone());
        async move {
            call(
                app,
                &cookie,
                "list_devices",
                &[
                    ("search", ""),
                    ("product_id", ""),
                    ("status", ""),
                    ("protocol", protocol),
                    ("version", version),
                    ("offset", "0"),
                ],
                200,
            )
            .await["total"]
                .as_u64()
                .unwrap()
        }
    };
    assert_eq!(list("MQTT", "").await, 2);
    assert_eq!(list("CoAP", "").await, 0);
    assert_eq!(list("", "9.9").await, 0);

    // A group; members added from a selection (an unknown id is reported, the others added).
    let group = call(
        &app,
        &cookie,
        "create_group",
        &[("name", "north"), ("description", "")],
        200,
    )
    .await
    .as_str()
    .unwrap()
    .to_owned();
    let added = call(
        &app,
        &cookie,
        "change_members",
        &[
            ("group_id", &group),
            ("device_ids", "meter_n1,meter_n2,nope"),
            ("add", "true"),
        ],
        200,
    )
    .await;
    assert_eq!(added["changed"], 2);
    assert!(
        added["refused"][0].as_str().unwrap().starts_with("nope:"),
        "{added}"
    );
    call(
        &app,
        &cookie,
        "rename_group",
        &[
            ("group_id", &group),
            ("name", "north_side"),
            ("description", "pumps"),
        ],
        200,
    )
    .await;
    let detail = call(
        &app,
        &cookie,
        "group_detail",
        &[("group_id", &group), ("offset", "0")],
        200,
    )
    .await;
    assert_eq!(detail["group"]["name"], "north_side");
    assert_eq!(detail["members"]["total"], 2);
    let refused = call(&app, &cookie, "delete_group", &[("group_id", &group)], 409).await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("remove them first"),
        "{refused}"
    );

    // The package, uploaded as the console does (multipart to the packages API, with the session).
    let form = reqwest::multipart::Form::new()
        .text("package_type", "softwarePackage")
        .text("product_id", "meter")
        .text("version", "2.0")
        .part(
            "file",
            reqwest::multipart::Part::bytes(vec![9_u8; 4096]).file_name("fw.bin"),
        );
    let uploaded = app
        .client
        .post(app.url(&format!("/v5/iot/{project}/ota-upgrades/packages")))
        .header("origin", &app.origin)
        .header("cookie", &cookie)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), 201);
    let package = uploaded.json::<Value>().await.unwrap()["package_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let count = call(
        &app,
        &cookie,
        "target_count",
        &[("package_id", &package), ("group_id", &group)],
        200,
    )
    .await;
    assert_eq!(count, 2);

    // A subscription whose receiver is down: its failed deliveries show in Settings.
    let subscribed = call(
        &app,
        &cookie,
        "create_subscription",
        &[
            ("resource", "batchtask"),
            ("url", "https://127.0.0.1:9/hook"),
        ],
        200,
    )
    .await;
    assert!(
        subscribed["secret"].as_str().unwrap().len() >= 32,
        "{subscribed}"
    );
    let bad_url = call(
        &app,
        &cookie,
        "create_subscription",
        &[("resource", "batchtask"), ("url", "ftp://example.com/")],
        422,
    )
    .await;
    assert!(bad_url["fields"]["url"].is_string(), "{bad_url}");
    let subscriptions = call(&app, &cookie, "list_subscriptions", &[], 200).await;
    assert_eq!(subscriptions[0]["url"], "https://127.0.0.1:9/hook");
    assert!(subscriptions[0].get("secret").is_none());

    // The live stream, open before the task exists.
    let mut stream = app
        .client
        .get(app.url("/events"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let anonymous = app.client.get(app.url("/events")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401, "the stream needs a session");

    // Form errors come back per field, named as the form names them.
    let task_form = |name: &'static str, retry: &'static str, count: &'static str| {
        vec![
            ("task_name", name),
            ("package_id", ""),
            ("targets", "group"),
            ("group_id", ""),
            ("device_ids", ""),
            ("start", "now"),
            ("schedule_time", ""),
            ("tz_offset", "0"),
            ("retry", retry),
            ("retry_count", count),
            ("retry_interval", "5"),
        ]
    };
    let mut args = task_form("rollout", "on", "9");
    args[1].1 = &package;
    args[3].1 = &group;
    let bad = call(&app, &cookie, "create_task", &args, 422).await;
    assert!(bad["fields"]["retry_count"].is_string(), "{bad}");
    let mut args = task_form("rollout", "on", "2");
    args[1].1 = &package;
    args[3].1 = "";
    let bad = call(&app, &cookie, "create_task", &args, 422).await;
    assert_eq!(bad["fields"]["group_id"], "choose a group");
    let mut args = task_form("rollout", "on", "2");
    args[1].1 = &package;
    args[3].1 = &group;
    let task = call(&app, &cookie, "create_task", &args, 200)
        .await
        .as_str()
        .unwrap()
        .to_owned();

    let mut seen = String::new();
    read_until(&mut stream, &mut seen, "event: task.changed").await;
    read_until(&mut stream, &mut seen, &format!("\"task_id\":\"{task}\"")).await;

    let view = call(
        &app,
        &cookie,
        "task_detail",
        &[("task_id", &task), ("status", ""), ("offset", "0")],
        200,
    )
    .await;
    assert_eq!(view["task"]["total"], 2);
    assert_eq!(view["retry_count"], 2);
    assert_eq!(view["devices"]["items"].as_array().unwrap().len(), 2);
    let none = call(
        &app,
        &cookie,
        "task_detail",
        &[("task_id", &task), ("status", "Success"), ("offset", "0")],
        200,
    )
    .await;
    assert_eq!(none["devices"]["total"], 0, "filtered by status");
    let device = call(
        &app,
        &cookie,
        "device_detail",
        &[("device_id", "meter_n1")],
        200,
    )
    .await;
    assert_eq!(device["upgrades"][0]["task_name"], "rollout");
    assert_eq!(device["groups"][0][1], "north_side");
    let steps = call(
        &app,
        &cookie,
        "step_history",
        &[("task_id", &task), ("device_id", "meter_n1")],
        200,
    )
    .await;
    assert!(!steps.as_array().unwrap().is_empty());
    let package_view = call(
        &app,
        &cookie,
        "package_detail",
        &[("package_id", &package)],
        200,
    )
    .await;
    assert_eq!(package_view["tasks"][0]["task_id"], task.as_str());

    // "Wait for confirmation": the device waits until the task page's Confirm.
    let mut args = task_form("confirmed", "", "");
    args[1].1 = &package;
    args[2].1 = "devices";
    args[4].1 = "meter_n2";
    args.push(("need_confirm", "on"));
    let waiting = call(&app, &cookie, "create_task", &args, 200)
        .await
        .as_str()
        .unwrap()
        .to_owned();
    let detail = |task: String| {
        let (app, cookie) = (&app, cookie.clone());
        async move {
            call(
                app,
                &cookie,
                "task_detail",
                &[("task_id", &task), ("status", ""), ("offset", "0")],
                200,
            )
            .await
        }
    };
    let view = detail(waiting.clone()).await;
    assert_eq!(view["unconfirmed"], 1, "{view}");
    assert_eq!(view["devices"]["items"][0]["step"], "unconfirmed");
    let confirmed = call(
        &app,
        &cookie,
        "confirm_task",
        &[("task_id", &waiting), ("device_ids", "")],
        200,
    )
    .await;
    assert_eq!(confirmed["refused"], serde_json::json!([]), "{confirmed}");
    let view = detail(waiting.clone()).await;
    assert_eq!(view["unconfirmed"], 0, "{view}");
    assert_ne!(view["devices"]["items"][0]["step"], "unconfirmed");

    let failed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let rows = call(&app, &cookie, "failed_deliveries", &[], 200).await;
            if let Some(row) = rows.as_array().and_then(|r| r.first()).cloned() {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the refused delivery is listed");
    assert_eq!(failed["url"], "https://127.0.0.1:9/hook");
    assert!(!failed["error"].as_str().unwrap().is_empty(), "{failed}");
    call(
        &app,
        &cookie,
        "delete_subscription",
        &[(
            "subscription_id",
            subscribed["subscription_id"].as_str().unwrap(),
        )],
        200,
    )
    .await;
    assert_eq!(
        call(&app, &cookie, "list_subscriptions", &[], 200).await,
        serde_json::json!([])
    );

    // The devices are offline, so the task runs on: delete is refused with the reason, the package too.
    let refused = call(&app, &cookie, "delete_task", &[("task_id", &task)], 409).await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("stop it before deleting it"),
        "{refused}"
    );
    call(
        &app,
        &cookie,
        "delete_package",
        &[("package_id", &package)],
        409,
    )
    .await;

    // Stop one device, then the task; the stream carries both.
    let one = call(
        &app,
        &cookie,
        "stop_task",
        &[("task_id", &task), ("device_ids", "meter_n1,meter_n9")],
        200,
    )
    .await;
    assert_eq!(one["applied"], 1);
    assert!(
        one["refused"][0].as_str().unwrap().contains("meter_n9"),
        "{one}"
    );
    read_until(
        &mut stream,
        &mut seen,
        "\"device_id\":\"meter_n1\",\"status\":\"Stopped\"",
    )
    .await;
    call(
        &app,
        &cookie,
        "stop_task",
        &[("task_id", &task), ("device_ids", "")],
        200,
    )
    .await;
    read_until(
        &mut stream,
        &mut seen,
        "\"status\":\"Stopped\",\"task_progress\"",
    )
    .await;
    call(&app, &cookie, "delete_task", &[("task_id", &task)], 200).await;
    let gone = call(
        &app,
        &cookie,
        "task_detail",
        &[("task_id", &task), ("status", ""), ("offset", "0")],
        404,
    )
    .await;
    assert_eq!(gone["code"], "not_found");

    // Shutting down ends the stream instead of waiting for the browser to leave.
    let stopped = tokio::time::timeout(Duration::from_secs(10), app.stop()).await;
    assert!(stopped.is_ok(), "the server stops with a stream open");
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(rest.is_ok(), "the stream ends at shutdown");
}

#[tokio::test]
async fn the_api_reference_lists_every_operation_of_the_openapi_document() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let cookie = app.sign_in().await;
    let reference = call(&app, &cookie, "api_reference", &[], 200).await;
    let sections = reference["sections"].as_array().unwrap();
    let operations: Vec<&str> = sections
        .iter()
        .flat_map(|s| s["operations"].as_array().unwrap())
        .map(|o| o["operation_id"].as_str().unwrap())
        .collect();
    let document: Value = app
        .client
        .get(app.url("/v5/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let in_document = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .filter(|op| op.get("operationId").is_some())
        .count();
    assert_eq!(operations.len(), in_document, "every operation is listed");
    assert!(operations.contains(&"CreateBatchTask"));
    let page = app
        .client
        .get(app.url("/api-reference"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("CreateBatchTask"), "rendered on the server");
    app.stop().await;
}

/// A change another process makes (the command line, another instance on the same database) reaches the
/// console's live stream through the server's outbox tail.
#[tokio::test]
async fn the_live_stream_shows_changes_made_by_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = crate::tasks::fixture(&app).await;
    // An offline device: its subtask waits, so the task stays open until stopped.
    let device = crate::tasks::register(&app, &fx, "waiting-1").await;
    let task = backend::service::tasks::create(
        &app.state,
        &fx.project,
        crate::tasks::new_task(&fx, "stopped_elsewhere", &[&device]),
    )
    .await
    .unwrap();
    let cookie = app.sign_in().await;
    let mut stream = app
        .client
        .get(app.url(&format!("/events?task_id={}", task.id)))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // Another process: its own driver on the same database, as `updraft task stop` has.
    let other = backend::AppState::new(
        app.state.db.clone(),
        app.state.clock.clone(),
        app.state.sealer.clone(),
        app.state.store.clone(),
        app.state.settings.clone(),
    );
    backend::service::tasks::stop(&other, &fx.project, &task.id, None)
        .await
        .unwrap();
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, "\"status\":\"Stopped\"").await;
    assert!(seen.contains(&device.device_id), "{seen}");
}
