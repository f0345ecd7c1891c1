//! Packages and downloads over real HTTPS: multipart uploads, bucket registrations, the IoTDA list/show/
//! delete API and its rules, token-protected downloads with ranges, every refusal, Huawei's C SDK raw
//! request, and the same flows against a real S3-compatible server (moto).

use std::sync::Arc;
use std::time::Duration;

use backend::service::{downloads, packages, products};
use backend::storage::entity::{subtasks, tasks};
use bytes::Bytes;
use futures::StreamExt;
use sea_orm::{ActiveModelTrait, EntityTrait, Set};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{TestApp, settings_for, spawn_app, spawn_with, start_moto};

const PRODUCT: &str = "meter";

fn random_bytes(len: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

async fn project_id(app: &TestApp) -> String {
    backend::service::projects::ensure_default(&app.state)
        .await
        .unwrap()
        .id
}

async fn with_product(app: &TestApp) -> String {
    let project = project_id(app).await;
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
    project
}

fn packages_url(app: &TestApp, project: &str) -> String {
    app.url(&format!("/v5/iot/{project}/ota-upgrades/packages"))
}

/// A multipart upload: metadata fields first, then the file.
async fn upload(
    app: &TestApp,
    cookie: &str,
    project: &str,
    fields: &[(&str, &str)],
    file: Vec<u8>,
) -> reqwest::Response {
    let mut form = reqwest::multipart::Form::new();
    for (k, v) in fields {
        form = form.text((*k).to_owned(), (*v).to_owned());
    }
    form = form.part(
        "file",
        reqwest::multipart::Part::bytes(file).file_name("app.bin"),
    );
    app.client
        .post(packages_url(app, project))
        .header("origin", &app.origin)
        .header("cookie", cookie)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

/// `GET url?query` with the session cookie.
async fn get(app: &TestApp, cookie: &str, url: &str, query: &[(&str, &str)]) -> reqwest::Response {
    app.client
        .get(url)
        .header("cookie", cookie)
        .query(query)
        .send()
        .await
        .unwrap()
}

/// `POST` to the packages collection with the session cookie from this origin.
fn post(app: &TestApp, cookie: &str, project: &str) -> reqwest::RequestBuilder {
    app.client
        .post(packages_url(app, project))
        .header("origin", &app.origin)
        .header("cookie", cookie)
}

/// `DELETE url` with the session cookie from this origin.
async fn delete(app: &TestApp, cookie: &str, url: &str) -> reqwest::Response {
    app.client
        .delete(url)
        .header("origin", &app.origin)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
}

const SOFTWARE_V2: &[(&str, &str)] = &[
    ("package_type", "softwarePackage"),
    ("product_id", PRODUCT),
    ("version", "2.0.0"),
    ("support_source_versions", "1.0.0,1.1.0"),
    ("description", "adds features"),
    ("custom_info", "reboot after install"),
];

async fn error_of(resp: reqwest::Response, status: u16) -> (String, String) {
    assert_eq!(resp.status(), status, "status");
    assert!(
        resp.headers().contains_key("x-request-id"),
        "errors carry a request id"
    );
    let body: Value = resp.json().await.expect("a JSON error body");
    (
        body["error_code"].as_str().expect("error_code").to_owned(),
        body["error_msg"].as_str().expect("error_msg").to_owned(),
    )
}

/// A task in `status` using `package_id`, with one subtask for `device_id`: the rows the task service
/// (a later issue) will write.
async fn task_with_subtask(
    app: &TestApp,
    project: &str,
    task_id: &str,
    package_id: &str,
    device_id: &str,
    status: &str,
) -> i64 {
    let app_row = backend::service::projects::default_app(&app.state, project)
        .await
        .unwrap();
    tasks::ActiveModel {
        id: Set(task_id.to_owned()),
        project_id: Set(project.to_owned()),
        app_id: Set(app_row.id),
        task_name: Set(format!("upgrade {task_id}")),
        task_type: Set("softwareUpgrade".into()),
        task_mode: Set(None),
        need_confirm: Set(false),
        task_ext_info: Set(None),
        targets_filter: Set(None),
        document: Set(format!("{{\"package_ids\":[\"{package_id}\"]}}")),
        package_id: Set(Some(package_id.to_owned())),
        schedule_time: Set(None),
        retry_count: Set(0),
        retry_interval_min: Set(0),
        status: Set(status.to_owned()),
        status_desc: Set(String::new()),
        total: Set(1),
        processing: Set(1),
        success: Set(0),
        fail: Set(0),
        waitting: Set(0),
        fail_wait_retry: Set(0),
        stopped: Set(0),
        removed: Set(0),
        created_at: Set(0),
        started_at: Set(None),
        finished_at: Set(None),
        updated_at: Set(0),
        claimed_by: Set(None),
        request_id: Set(None),
        rollout: Set(None),
        rollout_state: Set(None),
        rollout_wake_at: Set(None),
    }
    .insert(&app.state.db)
    .await
    .unwrap();
    subtasks::ActiveModel {
        task_id: Set(task_id.to_owned()),
        device_id: Set(device_id.to_owned()),
        status: Set("Processing".into()),
        step: Set("download".into()),
        progress: Set(0),
        attempts: Set(1),
        created_at: Set(0),
        updated_at: Set(0),
        ..Default::default()
    }
    .insert(&app.state.db)
    .await
    .unwrap()
    .id
}

#[tokio::test]
async fn uploads_are_listed_shown_and_deleted_the_iotda_way() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let project = with_product(&app).await;
    let cookie = app.sign_in().await;
    let file = random_bytes(300_000);

    let resp = upload(&app, &cookie, &project, SOFTWARE_V2, file.clone()).await;
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    let id = created["package_id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 24);
    assert_eq!(created["file_size"], 300_000);
    assert_eq!(created["file_name"], "app.bin");
    assert_eq!(created["product_name"], "Smart meter");
    assert_eq!(created["segment_size"], 500);
    assert_eq!(
        created["support_source_versions"],
        serde_json::json!(["1.0.0", "1.1.0"])
    );
    let obs = &created["file_location"]["obs_location"];
    assert_eq!(obs["bucket_name"], "updraft");
    assert_eq!(obs["sign"], sha256(&file));
    assert_eq!(obs["sign_method"], "SHA256");
    assert_eq!(
        created["create_time"].as_str().unwrap().len(),
        16,
        "yyyyMMddTHHmmssZ"
    );
    let stored = std::fs::read(dir.path().join("packages/uploads").join(&id)).unwrap();
    assert_eq!(stored, file, "the object holds exactly the uploaded bytes");

    // The same product + type + version again: 409, and nothing new is stored.
    let (code, msg) = error_of(
        upload(&app, &cookie, &project, SOFTWARE_V2, random_bytes(10)).await,
        409,
    )
    .await;
    assert_eq!(code, "IOTDA.000007");
    assert!(msg.contains("2.0.0"), "{msg}");
    // The same version as firmware is another package.
    let mut firmware = SOFTWARE_V2.to_vec();
    firmware[0] = ("package_type", "firmwarePackage");
    firmware.push(("segment_size", "256"));
    let resp = upload(&app, &cookie, &project, &firmware, random_bytes(1000)).await;
    assert_eq!(resp.status(), 201);
    let fw: Value = resp.json().await.unwrap();
    assert_eq!(fw["segment_size"], 256);

    // List: IoTDA shape, newest first, no file_location, filters and paging.
    let list: Value = get(
        &app,
        &cookie,
        &packages_url(&app, &project),
        &[("package_type", "softwarePackage")],
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(list["page"]["count"], 1);
    assert_eq!(list["packages"][0]["package_id"], id.as_str());
    assert!(list["packages"][0].get("file_location").is_none());
    let all: Value = get(
        &app,
        &cookie,
        &packages_url(&app, &project),
        &[("limit", "1")],
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(all["page"]["count"], 2);
    assert_eq!(
        all["packages"][0]["package_id"], fw["package_id"],
        "newest first"
    );
    let marker = all["page"]["marker"].as_str().unwrap();
    let next: Value = get(
        &app,
        &cookie,
        &packages_url(&app, &project),
        &[("limit", "1"), ("marker", marker)],
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(next["packages"][0]["package_id"], id.as_str());
    for bad in [
        ("limit", "0"),
        ("limit", "51"),
        ("offset", "501"),
        ("marker", "xyz"),
        ("package_type", "modulePackage"),
    ] {
        let resp = get(&app, &cookie, &packages_url(&app, &project), &[bad]).await;
        let (code, msg) = error_of(resp, 400).await;
        // IoTDA's own code for a `limit` out of range.
        let want = if bad.0 == "limit" {
            "IOTDA.000017"
        } else {
            "IOTDA.000006"
        };
        assert_eq!(code, want);
        assert!(msg.contains(bad.0), "{msg} names {}", bad.0);
    }

    // Show.
    let shown: Value = get(
        &app,
        &cookie,
        &format!("{}/{id}", packages_url(&app, &project)),
        &[],
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(shown["version"], "2.0.0");
    assert_eq!(
        shown["file_location"]["obs_location"]["object_key"],
        format!("uploads/{id}")
    );
    let (_, msg) = error_of(
        get(
            &app,
            &cookie,
            &format!("{}/0123456789abcdef01234567", packages_url(&app, &project)),
            &[],
        )
        .await,
        404,
    )
    .await;
    assert!(msg.contains("0123456789abcdef01234567"));

    // Another project's path, and no session at all.
    let (code, _) = error_of(
        app.client
            .get(packages_url(&app, "someoneelse"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    assert_eq!(code, "IOTDA.000005");
    let (code, _) = error_of(
        app.client
            .get(packages_url(&app, &project))
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    assert_eq!(code, "IOTDA.000002");

    // Delete: 204, gone from the API and from the store.
    let resp = delete(
        &app,
        &cookie,
        &format!("{}/{id}", packages_url(&app, &project)),
    )
    .await;
    assert_eq!(resp.status(), 204);
    assert!(!dir.path().join("packages/uploads").join(&id).exists());
    let resp = get(
        &app,
        &cookie,
        &format!("{}/{id}", packages_url(&app, &project)),
        &[],
    )
    .await;
    assert_eq!(resp.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn bad_uploads_are_refused_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings_for(dir.path());
    settings.packages.max_size = 1024 * 1024;
    let app = spawn_with(settings).await;
    let project = with_product(&app).await;
    let cookie = app.sign_in().await;

    let with = |k: &'static str, v: &'static str| {
        let mut f: Vec<(&str, &str)> = SOFTWARE_V2
            .iter()
            .copied()
            .filter(|(n, _)| *n != k)
            .collect();
        f.push((k, v));
        f
    };
    for (fields, field) in [
        (with("version", "2.0 beta"), "version"),
        (with("package_type", "modulePackage"), "package_type"),
        (with("segment_size", "31"), "segment_size"),
        (
            with("support_source_versions", "1.0/x"),
            "support_source_versions",
        ),
        (with("file_name", "../../secret.key"), "file_name"),
    ] {
        let (code, msg) = error_of(
            upload(&app, &cookie, &project, &fields, random_bytes(100)).await,
            400,
        )
        .await;
        assert_eq!(code, "IOTDA.000006");
        assert!(msg.starts_with(field), "{msg} names {field}");
    }
    let (_, msg) = error_of(
        upload(
            &app,
            &cookie,
            &project,
            &with("product_id", "nope"),
            random_bytes(10),
        )
        .await,
        404,
    )
    .await;
    assert!(msg.contains("nope"));
    let (_, msg) = error_of(
        upload(&app, &cookie, &project, SOFTWARE_V2, Vec::new()).await,
        400,
    )
    .await;
    assert!(msg.contains("empty"), "{msg}");
    let (code, _) = error_of(
        upload(
            &app,
            &cookie,
            &project,
            SOFTWARE_V2,
            random_bytes(1024 * 1024 + 1),
        )
        .await,
        413,
    )
    .await;
    assert_eq!(code, "UPDRAFT.000413");
    let (_, msg) = error_of(
        post(&app, &cookie, &project)
            .multipart(reqwest::multipart::Form::new().text("product_id", PRODUCT))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(msg.contains("file"), "{msg}");
    let (_, msg) = error_of(
        post(&app, &cookie, &project)
            .multipart(
                reqwest::multipart::Form::new()
                    .part("file", reqwest::multipart::Part::bytes(vec![1, 2, 3]))
                    .text("product_id", PRODUCT),
            )
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(msg.contains("before the file part"), "{msg}");
    let (code, _) = error_of(
        post(&app, &cookie, &project)
            .header("content-type", "text/plain")
            .body("hello")
            .send()
            .await
            .unwrap(),
        415,
    )
    .await;
    assert_eq!(code, "IOTDA.000008", "IoTDA's code for a wrong media type");

    // A body that breaks off mid-file: the request fails and no object or row remains.
    let head = {
        let mut s = String::new();
        for (k, v) in SOFTWARE_V2 {
            s.push_str(&format!(
                "--XyZ\r\ncontent-disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
            ));
        }
        s.push_str(
            "--XyZ\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n\r\n",
        );
        s
    };
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from(head)),
        Ok(Bytes::from(random_bytes(200_000))),
        Err(std::io::Error::other("client gave up")),
    ];
    let result = post(&app, &cookie, &project)
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    if let Ok(resp) = result {
        assert!(resp.status().is_client_error(), "{}", resp.status());
    }
    // Aborting runs in the background; wait (bounded) for the staging file to go.
    let uploads = dir.path().join("packages/uploads");
    let mut left = Vec::new();
    for _ in 0..100 {
        left = std::fs::read_dir(&uploads)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(left.is_empty(), "nothing may be left in uploads/: {left:?}");
    let rows = packages::list(&app.state, &project, Default::default(), Default::default())
        .await
        .unwrap();
    assert_eq!(rows.total, 0, "no package rows after refused uploads");
    app.stop().await;
}

#[tokio::test]
async fn bucket_objects_are_registered_with_their_measured_size_and_hash() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let project = with_product(&app).await;
    let cookie = app.sign_in().await;
    let file = random_bytes(50_000);
    std::fs::create_dir_all(dir.path().join("packages/fw")).unwrap();
    std::fs::write(dir.path().join("packages/fw/v2.bin"), &file).unwrap();
    std::fs::write(dir.path().join("outside.bin"), b"secret").unwrap();

    let body = |key: &str, bucket: &str, sign: Option<&str>| {
        let mut obs = serde_json::json!({"region_name": "cn-north-4", "bucket_name": bucket, "object_key": key});
        if let Some(s) = sign {
            obs["sign"] = s.into();
        }
        serde_json::json!({"app_id": null, "package_type": "firmwarePackage", "product_id": PRODUCT,
            "version": "V2.0", "support_source_versions": ["V1.0"], "file_location": {"obs_location": obs}})
    };
    let post = |b: Value| post(&app, &cookie, &project).json(&b).send();
    for (key, bucket, sign, field) in [
        ("../outside.bin", "updraft", None, "object_key"),
        ("fw/../../outside.bin", "updraft", None, "object_key"),
        ("/etc/passwd", "updraft", None, "object_key"),
        ("uploads/x", "updraft", None, "object_key"),
        ("fw/missing.bin", "updraft", None, "object_key"),
        ("fw/v2.bin", "other-bucket", None, "bucket_name"),
        (
            "fw/v2.bin",
            "updraft",
            Some("00".repeat(32).as_str()),
            "sign",
        ),
    ] {
        let sign = sign.map(str::to_owned);
        let (code, msg) =
            error_of(post(body(key, bucket, sign.as_deref())).await.unwrap(), 400).await;
        assert_eq!(code, "IOTDA.000006");
        assert!(msg.starts_with(field), "{key}: {msg} names {field}");
    }
    let resp = post(body(
        "fw/v2.bin",
        "updraft",
        Some(&sha256(&file).to_uppercase()),
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["file_size"], 50_000);
    assert_eq!(created["file_name"], "v2.bin");
    assert_eq!(created["source"], "bucket");
    assert_eq!(
        created["file_location"]["obs_location"]["sign"],
        sha256(&file)
    );
    assert_eq!(
        created["file_location"]["obs_location"]["region_name"],
        "cn-north-4"
    );
    let resp = post(serde_json::json!({"package_type": "firmwarePackage"}))
        .await
        .unwrap();
    let (code, msg) = error_of(resp, 400).await;
    assert!(msg.contains("product_id"), "{msg}");
    assert_eq!(
        code, "IOTDA.000006",
        "JSON that does not fit is invalid input"
    );

    // Deleting a registered package leaves the bucket object alone (as IoTDA does).
    let id = created["package_id"].as_str().unwrap();
    let resp = delete(
        &app,
        &cookie,
        &format!("{}/{id}", packages_url(&app, &project)),
    )
    .await;
    assert_eq!(resp.status(), 204);
    assert!(dir.path().join("packages/fw/v2.bin").exists());
    app.stop().await;
}

#[tokio::test]
async fn a_package_in_use_by_an_executing_task_cannot_be_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let project = with_product(&app).await;
    let cookie = app.sign_in().await;
    let created: Value = upload(&app, &cookie, &project, SOFTWARE_V2, random_bytes(1000))
        .await
        .json()
        .await
        .unwrap();
    let id = created["package_id"].as_str().unwrap().to_owned();
    let task_id = "aaaaaaaaaaaaaaaaaaaaaaaa";
    task_with_subtask(&app, &project, task_id, &id, "dev-1", "Processing").await;
    let delete = || {
        app.client
            .delete(format!("{}/{id}", packages_url(&app, &project)))
            .header("origin", &app.origin)
            .header("cookie", &cookie)
            .send()
    };
    let (code, msg) = error_of(delete().await.unwrap(), 409).await;
    assert_eq!(code, "IOTDA.000007");
    assert!(msg.contains(task_id) && msg.contains("Processing"), "{msg}");

    let mut task: tasks::ActiveModel = tasks::Entity::find_by_id(task_id.to_owned())
        .one(&app.state.db)
        .await
        .unwrap()
        .unwrap()
        .into();
    task.status = Set("Success".into());
    task.update(&app.state.db).await.unwrap();
    assert_eq!(delete().await.unwrap().status(), 204);
    let task = tasks::Entity::find_by_id(task_id.to_owned())
        .one(&app.state.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        task.package_id, None,
        "the finished task keeps its history without the package"
    );
    app.stop().await;
}

/// An uploaded package, a running task for `dev-1` and a token for its subtask.
async fn download_fixture(app: &TestApp, len: usize) -> (Vec<u8>, String, i64, String) {
    let project = with_product(app).await;
    let cookie = app.sign_in().await;
    let file = random_bytes(len);
    let created: Value = upload(app, &cookie, &project, SOFTWARE_V2, file.clone())
        .await
        .json()
        .await
        .unwrap();
    let id = created["package_id"].as_str().unwrap().to_owned();
    let subtask = task_with_subtask(
        app,
        &project,
        "bbbbbbbbbbbbbbbbbbbbbbbb",
        &id,
        "dev-1",
        "Processing",
    )
    .await;
    let token = downloads::issue(&app.state, subtask, &id).await.unwrap();
    (file, id, subtask, token.token)
}

async fn served_bytes(app: &TestApp, token: &str, expect: i64) -> i64 {
    // Counting happens when a response body is dropped, in the background: wait for it (bounded).
    let mut served = 0;
    for _ in 0..200 {
        served = downloads::find(&app.state, token)
            .await
            .unwrap()
            .unwrap()
            .bytes_served;
        if served == expect {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    served
}

#[tokio::test]
async fn downloads_stream_exact_bytes_and_resume_with_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (file, id, _, token) = download_fixture(&app, 1_000_000).await;
    let url = app.url(&format!("/download/{id}/app.bin"));

    let resp = app
        .client
        .get(&url)
        .header("authorization", format!("Bearer {token}"))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-length"], "1000000");
    assert_eq!(h["content-type"], "application/octet-stream");
    assert_eq!(h["content-disposition"], "attachment; filename=app.bin");
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["etag"], format!("\"{}\"", sha256(&file)).as_str());
    assert!(!h.contains_key("transfer-encoding"), "never chunked");
    assert!(!h.contains_key("content-encoding"), "never compressed");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), file.as_slice());

    // An interrupted download resumes where it stopped.
    let resp = app
        .client
        .get(&url)
        .header("authorization", format!("Bearer {token}"))
        .header("range", "bytes=400000-")
        .header("if-range", format!("\"{}\"", sha256(&file)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        "bytes 400000-999999/1000000"
    );
    assert_eq!(resp.headers()["content-length"], "600000");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &file[400_000..]);
    let resp = app
        .client
        .get(&url)
        .header("authorization", format!("Bearer {token}"))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &file[10..20]);

    assert_eq!(
        served_bytes(&app, &token, 1_600_010).await,
        1_600_010,
        "bytes served are counted"
    );
    app.stop().await;
}

#[tokio::test]
async fn download_refusals_are_iotda_errors_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (_, id, subtask, token) = download_fixture(&app, 10_000).await;
    let url = app.url(&format!("/download/{id}/app.bin"));
    let get = |auth: Option<String>, range: Option<&'static str>, url: String| {
        let mut r = app.client.get(url);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        if let Some(range) = range {
            r = r.header("range", range);
        }
        r.send()
    };
    let bearer = |t: &str| Some(format!("Bearer {t}"));

    let resp = get(None, None, url.clone()).await.unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let (code, msg) = error_of(resp, 401).await;
    assert_eq!(code, "IOTDA.000002");
    assert!(msg.contains("missing"), "{msg}");
    for (auth, what) in [
        (bearer("not-a-token"), "malformed"),
        (Some(format!("Basic {token}")), "malformed"),
        (bearer(&"ab".repeat(32)), "unknown"),
    ] {
        let (_, msg) = error_of(get(auth, None, url.clone()).await.unwrap(), 401).await;
        assert!(msg.contains(what), "{msg} says {what}");
    }

    // Bad ranges: 416 with the size.
    for range in ["bytes=10000-", "bytes=500-100", "bytes=x-y"] {
        let resp = get(bearer(&token), Some(range), url.clone()).await.unwrap();
        assert_eq!(resp.headers()["content-range"], "bytes */10000");
        let (code, _) = error_of(resp, 416).await;
        assert_eq!(code, "UPDRAFT.000416");
    }
    // Wrong file name or unknown package: 404.
    let (_, msg) = error_of(
        get(
            bearer(&token),
            None,
            app.url(&format!("/download/{id}/other.bin")),
        )
        .await
        .unwrap(),
        404,
    )
    .await;
    assert!(msg.contains("other.bin"));
    error_of(
        get(
            bearer(&token),
            None,
            app.url("/download/0123456789abcdef01234567/app.bin"),
        )
        .await
        .unwrap(),
        404,
    )
    .await;

    // A live token for another package: 403.
    let project = project_id(&app).await;
    let cookie = app.sign_in().await;
    let mut v3 = SOFTWARE_V2.to_vec();
    v3[2] = ("version", "3.0.0");
    let other: Value = upload(&app, &cookie, &project, &v3, random_bytes(100))
        .await
        .json()
        .await
        .unwrap();
    let other_id = other["package_id"].as_str().unwrap();
    let (code, _) = error_of(
        get(
            bearer(&token),
            None,
            app.url(&format!("/download/{other_id}/app.bin")),
        )
        .await
        .unwrap(),
        403,
    )
    .await;
    assert_eq!(code, "IOTDA.000003");

    // Revoked when the subtask ends.
    let second = downloads::issue(&app.state, subtask, &id)
        .await
        .unwrap()
        .token;
    assert_eq!(
        downloads::revoke_subtask(&app.state.db, app.state.clock.now(), subtask)
            .await
            .unwrap(),
        2
    );
    let (_, msg) = error_of(get(bearer(&second), None, url.clone()).await.unwrap(), 401).await;
    assert!(msg.contains("revoked"), "{msg}");

    // Expires after 24 hours (on the manual clock), and revoked when the task stops.
    let fresh = downloads::issue(&app.state, subtask, &id)
        .await
        .unwrap()
        .token;
    app.clock
        .advance(Duration::from_secs(24 * 3600) - Duration::from_millis(1));
    assert_eq!(
        get(bearer(&fresh), None, url.clone())
            .await
            .unwrap()
            .status(),
        200,
        "still valid at 24 h - 1 ms"
    );
    app.clock.advance(Duration::from_millis(1));
    let (_, msg) = error_of(get(bearer(&fresh), None, url.clone()).await.unwrap(), 401).await;
    assert!(msg.contains("expired"), "{msg}");
    let stopped = downloads::issue(&app.state, subtask, &id)
        .await
        .unwrap()
        .token;
    assert_eq!(
        downloads::revoke_task(&app.state, "bbbbbbbbbbbbbbbbbbbbbbbb")
            .await
            .unwrap(),
        2,
        "the expired token and the new one"
    );
    let (_, msg) = error_of(get(bearer(&stopped), None, url.clone()).await.unwrap(), 401).await;
    assert!(msg.contains("revoked"), "{msg}");

    // Path traversal, sent raw (clients normalise dot segments away).
    for path in [
        "/download/../secret.key",
        "/download/%2e%2e/secret.key",
        "/download/x/..%2fsecret.key",
    ] {
        let response = raw_request(
            &app,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 400"), "{path}: {response}");
        assert!(response.contains("IOTDA.000006"), "{response}");
    }
    app.stop().await;
}

/// Sends `request` as written over TLS and returns the whole response as text (lossy).
async fn raw_request(app: &TestApp, request: &str) -> String {
    let mut tls = app.tls_connect().await;
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn the_c_sdk_raw_request_with_bare_line_feeds_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (file, id, _, token) = download_fixture(&app, 20_000).await;
    // Exactly what IOTA_GetOTAPackages_Ext writes: LF line endings, Host without port, no space after
    // "Authorization:", a Content-Type on a GET, then CRLF CRLF.
    let request = format!(
        "GET /download/{id}/app.bin HTTP/1.1\nHost: localhost\nContent-Type: application/json\nAuthorization:Bearer {token}\r\n\r\n"
    );
    let ca = std::fs::read(app.data_dir.join("tls/ca.pem")).unwrap();
    assert!(!ca.is_empty());
    let response = tokio::time::timeout(Duration::from_secs(10), async {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let port = app.base.trim_start_matches("https://localhost:");
        let tcp = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
            .await
            .unwrap();
        let mut tls = connector
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        tls.write_all(request.as_bytes()).await.unwrap();
        // Read the head (the SDK parses it from its first read), then exactly Content-Length bytes.
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let head_end = loop {
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the head");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let len: usize = head
            .split("Content-Length: ")
            .nth(1)
            .expect("the literal \"Content-Length: \" the C SDK searches for")
            .split("\r\n")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        while buf.len() < head_end + len {
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed early");
            buf.extend_from_slice(&chunk[..n]);
        }
        (head, buf[head_end..].to_vec())
    })
    .await
    .expect("the download completes");
    let (head, body) = response;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("filename=app.bin"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body, file);
    app.stop().await;
}

#[tokio::test]
async fn the_same_flows_work_against_a_real_s3_compatible_server() {
    let moto = start_moto().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings_for(dir.path());
    settings.packages.store = server::config::StoreKind::S3;
    settings.packages.max_size = 20 * 1024 * 1024;
    settings.packages.s3.endpoint = Some(moto.endpoint.clone());
    settings.packages.s3.allow_http = true;
    settings.packages.s3.access_key_id = Some("testing".into());
    settings.packages.s3.secret_access_key = Some("testing".to_owned().into());
    let app = spawn_with(settings).await;

    // 9 MiB: more than one multipart part.
    let (file, id, _, token) = download_fixture(&app, 9 * 1024 * 1024 + 123).await;
    let listed = app.state.store.list_keys("uploads").await.unwrap();
    assert_eq!(listed, vec![format!("uploads/{id}")]);
    let url = app.url(&format!("/download/{id}/app.bin"));
    let resp = app
        .client
        .get(&url)
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"],
        file.len().to_string().as_str()
    );
    assert_eq!(resp.bytes().await.unwrap().as_ref(), file.as_slice());
    let resp = app
        .client
        .get(&url)
        .header("authorization", format!("Bearer {token}"))
        .header("range", "bytes=8388600-8388700")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        &file[8_388_600..=8_388_700]
    );

    // Registering an object that is already in the bucket.
    let project = project_id(&app).await;
    let cookie = app.sign_in().await;
    let object = random_bytes(70_000);
    app.state
        .store
        .put_bytes("fw/v9.bin", Bytes::from(object.clone()))
        .await
        .unwrap();
    let resp = post(&app, &cookie, &project)
        .json(&serde_json::json!({"package_type": "firmwarePackage", "product_id": PRODUCT, "version": "9",
            "file_location": {"obs_location": {"region_name": "us-east-1", "bucket_name": "updraft", "object_key": "fw/v9.bin"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    assert_eq!(
        created["file_location"]["obs_location"]["sign"],
        sha256(&object)
    );
    assert_eq!(created["file_size"], 70_000);

    // Too large: refused, and the multipart upload is aborted (no object).
    let mut v4 = SOFTWARE_V2.to_vec();
    v4[2] = ("version", "4.0.0");
    let resp = upload(
        &app,
        &cookie,
        &project,
        &v4,
        random_bytes(20 * 1024 * 1024 + 1),
    )
    .await;
    assert_eq!(resp.status(), 413);
    assert_eq!(app.state.store.list_keys("uploads").await.unwrap().len(), 1);

    // Deleting the uploaded package deletes its object.
    let resp = delete(
        &app,
        &cookie,
        &format!("{}/{id}", packages_url(&app, &project)),
    )
    .await;
    assert_eq!(resp.status(), 409, "its task is still running");
    let mut task: tasks::ActiveModel =
        tasks::Entity::find_by_id("bbbbbbbbbbbbbbbbbbbbbbbb".to_owned())
            .one(&app.state.db)
            .await
            .unwrap()
            .unwrap()
            .into();
    task.status = Set("Stopped".into());
    task.update(&app.state.db).await.unwrap();
    let resp = delete(
        &app,
        &cookie,
        &format!("{}/{id}", packages_url(&app, &project)),
    )
    .await;
    assert_eq!(resp.status(), 204);
    assert!(
        app.state
            .store
            .list_keys("uploads")
            .await
            .unwrap()
            .is_empty()
    );
    app.stop().await;
    drop(moto);
}

#[tokio::test]
async fn object_keys_streamed_from_the_store_match_their_digest() {
    // The store's digest and a ranged read agree with the bytes written, for the local directory.
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let data = random_bytes(3 * 1024 * 1024 + 7);
    app.state
        .store
        .put_bytes("a/b.bin", Bytes::from(data.clone()))
        .await
        .unwrap();
    let key = domain::package::ObjectKey::parse("a/b.bin").unwrap();
    let digest = app.state.store.digest(&key).await.unwrap().unwrap();
    assert_eq!(digest.size, data.len() as u64);
    assert_eq!(digest.sha256, sha256(&data));
    let mut reader = app
        .state
        .store
        .open_range(&key, 5..2_000_005, 16 * 1024)
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(chunk) = reader.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.len() <= 16 * 1024);
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, &data[5..2_000_005]);
    app.stop().await;
}
