//! The application API with AK/SK signing: requests signed by an implementation of the SDK's algorithm
//! written here, independently of `protocol::apisign`, and checked against `iotda-api.md` §1.7 first.

use std::time::Duration;

use backend::clock::Clock;
use backend::service::{credentials, devices, products, projects};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{TestApp, spawn_app};

/// Python's `quote(s, safe='~')`.
fn quote(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The SDK's `Authorization` for a request (paths here need no decoding).
fn authorization(
    ak: &str,
    sk: &str,
    method: &str,
    path: &str,
    query: &[(&str, &str)],
    headers: &[(&str, &str)],
    payload_hash: &str,
) -> String {
    let mut query: Vec<_> = query.to_vec();
    query.sort();
    let query = query
        .iter()
        .map(|(k, v)| format!("{}={}", quote(k), quote(v)))
        .collect::<Vec<_>>()
        .join("&");
    let mut headers: Vec<(String, &str)> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim()))
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let uri = if path.ends_with('/') {
        path.to_owned()
    } else {
        format!("{path}/")
    };
    let canonical =
        format!("{method}\n{uri}\n{query}\n{canonical_headers}\n{signed}\n{payload_hash}");
    let date = headers
        .iter()
        .find(|(k, _)| k == "x-sdk-date")
        .map(|(_, v)| *v)
        .unwrap();
    let to_sign = format!(
        "SDK-HMAC-SHA256\n{date}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(sk.as_bytes()).unwrap();
    mac.update(to_sign.as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    format!("SDK-HMAC-SHA256 Access={ak}, SignedHeaders={signed}, Signature={signature}")
}

#[test]
fn the_test_signer_reproduces_the_documented_example() {
    let body = r#"{"app_id": "app01", "package_type": "firmwarePackage", "product_id": "prod01", "version": "V2.0", "file_location": {"obs_location": {"region_name": "cn-north-4", "bucket_name": "my-bucket", "object_key": "fw/v2.bin"}}}"#;
    let project = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let value = authorization(
        "HPUAEXAMPLEAK0000001",
        "ExampleSecretKey0000000000000000000000001",
        "POST",
        &format!("/v5/iot/{project}/ota-upgrades/packages"),
        &[],
        &[
            ("Content-Type", "application/json"),
            ("Host", "127.0.0.1:8443"),
            ("User-Agent", "huaweicloud-usdk-python/3.0"),
            ("X-Project-Id", project),
            ("X-Sdk-Date", "20240101T120000Z"),
        ],
        &hex::encode(Sha256::digest(body.as_bytes())),
    );
    assert!(
        value.ends_with(
            "Signature=11ef2dc7eda07061aea9dc78e2204a0e038d29383cea2c7da4fc62e1f2c6ea73"
        ),
        "{value}"
    );
}

/// An application: a credential and how to call the API with it.
pub(crate) struct Application<'a> {
    app: &'a TestApp,
    pub(crate) project: String,
    ak: String,
    sk: String,
    /// Seconds added to the server's clock when dating a request.
    date_offset: i64,
}

pub(crate) const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

impl Application<'_> {
    fn date(&self) -> String {
        let ms = self.app.clock.now().as_millis() + self.date_offset * 1000;
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .format("%Y%m%dT%H%M%SZ")
            .to_string()
    }

    fn host(&self) -> String {
        self.app.base.trim_start_matches("https://").to_owned()
    }

    /// A signed JSON request to `/v5/iot/{project}{rest}`, as the SDK sends it.
    pub(crate) async fn call(
        &self,
        method: &str,
        rest: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> reqwest::Response {
        let path = format!("/v5/iot/{}{rest}", self.project);
        let body = body
            .map(|b| serde_json::to_vec(b).unwrap())
            .unwrap_or_default();
        let hash = if body.is_empty() {
            EMPTY.to_owned()
        } else {
            hex::encode(Sha256::digest(&body))
        };
        self.send(method, &path, query, "application/json", body, &hash, &[])
            .await
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        content_type: &str,
        body: Vec<u8>,
        payload_hash: &str,
        extra: &[(&str, &str)],
    ) -> reqwest::Response {
        let (date, host) = (self.date(), self.host());
        let mut headers = vec![
            ("Content-Type", content_type),
            ("Host", host.as_str()),
            ("User-Agent", "huaweicloud-usdk-python/3.0; updraft-test"),
            ("X-Project-Id", self.project.as_str()),
            ("X-Sdk-Date", date.as_str()),
        ];
        headers.extend_from_slice(extra);
        let auth = authorization(
            &self.ak,
            &self.sk,
            method,
            path,
            query,
            &headers,
            payload_hash,
        );
        let mut url = reqwest::Url::parse(&self.app.url(path)).unwrap();
        if !query.is_empty() {
            let mut sorted = query.to_vec();
            sorted.sort();
            let q = sorted
                .iter()
                .map(|(k, v)| format!("{}={}", quote(k), quote(v)))
                .collect::<Vec<_>>()
                .join("&");
            url.set_query(Some(&q));
        }
        let mut req = self
            .app
            .client
            .request(method.parse().unwrap(), url)
            .header("authorization", auth)
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send().await.unwrap()
    }
}

pub(crate) async fn json_of(resp: reqwest::Response, status: u16) -> Value {
    let got = resp.status().as_u16();
    assert!(
        resp.headers().contains_key("x-request-id"),
        "every response carries a request id"
    );
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    body
}

async fn refused(resp: reqwest::Response, status: u16, code: &str) -> String {
    let body = json_of(resp, status).await;
    assert_eq!(body["error_code"], code, "{body}");
    body["error_msg"].as_str().unwrap().to_owned()
}

pub(crate) async fn application<'a>(app: &'a TestApp, project: &str) -> Application<'a> {
    let c = credentials::create(&app.state, project, "tests")
        .await
        .unwrap();
    use secrecy::ExposeSecret;
    Application {
        app,
        project: project.to_owned(),
        ak: c.credential.access_key,
        sk: c.secret_key.expose_secret().to_owned(),
        date_offset: 0,
    }
}

async fn mqtt_product_with_devices(app: &TestApp, project: &str, ids: &[&str]) {
    products::create(
        &app.state,
        project,
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
    for id in ids {
        devices::register(
            &app.state,
            project,
            devices::NewDevice {
                product_id: "meter".into(),
                node_id: (*id).into(),
                device_id: Some((*id).into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
}

/// A multipart upload signed with `UNSIGNED-PAYLOAD`, as the SDK signs multipart bodies.
async fn upload(a: &Application<'_>, version: &str) -> reqwest::Response {
    let boundary = "0123456789abcdef";
    let mut body = String::new();
    for (name, value) in [
        ("package_type", "softwarePackage"),
        ("product_id", "meter"),
        ("version", version),
    ] {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    body.push_str(&format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"app.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\nthe package bytes\r\n--{boundary}--\r\n"
    ));
    let path = format!("/v5/iot/{}/ota-upgrades/packages", a.project);
    a.send(
        "POST",
        &path,
        &[],
        &format!("multipart/form-data; boundary={boundary}"),
        body.into_bytes(),
        "UNSIGNED-PAYLOAD",
        &[("X-Sdk-Content-Sha256", "UNSIGNED-PAYLOAD")],
    )
    .await
}

#[tokio::test]
async fn a_signed_application_uploads_a_package_and_runs_a_batch_task() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let project = projects::ensure_default(&app.state).await.unwrap().id;
    mqtt_product_with_devices(&app, &project, &["dev-1", "dev-2"]).await;
    let a = application(&app, &project).await;

    let package = json_of(upload(&a, "2.0").await, 201).await;
    let package_id = package["package_id"].as_str().unwrap().to_owned();
    let list = json_of(
        a.call(
            "GET",
            "/ota-upgrades/packages",
            &[("limit", "10"), ("product_id", "meter")],
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(list["packages"][0]["package_id"], package_id.as_str());

    // A POST with no Origin: the signature is the proof, the console's same-origin rule does not apply.
    let task = json_of(
        a.call(
            "POST",
            "/batchtasks",
            &[],
            Some(&json!({"task_name": "api", "task_type": "softwareUpgrade",
                        "targets": ["dev-1", "dev-2"], "document": {"package_ids": [package_id]},
                        "task_policy": {"retry_count": 2, "retry_interval": 5}})),
        )
        .await,
        201,
    )
    .await;
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    assert_eq!(task["task_progress"]["total"], 2);
    let shown = json_of(
        a.call(
            "GET",
            &format!("/batchtasks/{task_id}"),
            &[("limit", "1"), ("offset", "0")],
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(shown["batchtask"]["task_name"], "api");
    let listed = json_of(
        a.call(
            "GET",
            "/batchtasks",
            &[("task_type", "softwareUpgrade"), ("limit", "10")],
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(listed["batchtasks"][0]["task_id"], task_id.as_str());
    // Stop, then delete; both signed, without a body.
    json_of(
        a.call("POST", &format!("/batchtasks/{task_id}/stop"), &[], None)
            .await,
        200,
    )
    .await;
    let gone = a
        .call("DELETE", &format!("/batchtasks/{task_id}"), &[], None)
        .await;
    assert!(gone.status().is_success(), "{}", gone.status());

    // The credential's last use is recorded.
    let listed = credentials::list(&app.state, &project).await.unwrap();
    assert!(listed[0].last_used_at.is_some());
    app.stop().await;
}

#[tokio::test]
async fn bad_signatures_get_401_and_other_projects_resources_404() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let project = projects::ensure_default(&app.state).await.unwrap().id;
    mqtt_product_with_devices(&app, &project, &["dev-1"]).await;
    let a = application(&app, &project).await;
    let package = json_of(upload(&a, "2.0").await, 201).await;
    let package_id = package["package_id"].as_str().unwrap();
    let packages = format!("/v5/iot/{project}/ota-upgrades/packages/{package_id}");

    // The right request, then the same with each thing wrong.
    json_of(
        a.call(
            "GET",
            &format!("/ota-upgrades/packages/{package_id}"),
            &[],
            None,
        )
        .await,
        200,
    )
    .await;
    let wrong_sk = Application {
        sk: "not-the-secret".into(),
        ..application(&app, &project).await
    };
    let msg = refused(
        wrong_sk
            .call(
                "GET",
                &format!("/ota-upgrades/packages/{package_id}"),
                &[],
                None,
            )
            .await,
        401,
        "IOTDA.000002",
    )
    .await;
    assert!(msg.contains("signature does not match"), "{msg}");

    // A body changed after signing.
    let date = a.date();
    let host = a.host();
    let signed_body = br#"{"task_name": "x"}"#;
    let auth = authorization(
        &a.ak,
        &a.sk,
        "POST",
        &format!("/v5/iot/{project}/batchtasks"),
        &[],
        &[
            ("Content-Type", "application/json"),
            ("Host", &host),
            ("X-Project-Id", &project),
            ("X-Sdk-Date", &date),
        ],
        &hex::encode(Sha256::digest(signed_body)),
    );
    let tampered = app
        .client
        .post(app.url(&format!("/v5/iot/{project}/batchtasks")))
        .header("authorization", auth)
        .header("content-type", "application/json")
        .header("host", &host)
        .header("x-project-id", &project)
        .header("x-sdk-date", &date)
        .body(r#"{"task_name": "y"}"#)
        .send()
        .await
        .unwrap();
    let msg = refused(tampered, 401, "IOTDA.000002").await;
    assert!(msg.contains("signature does not match"), "{msg}");

    // Dated outside the 15-minute skew, either way; inside it is fine.
    for (offset, ok) in [(-16 * 60, false), (16 * 60, false), (14 * 60, true)] {
        let skewed = Application {
            date_offset: offset,
            ..application(&app, &project).await
        };
        let resp = skewed
            .call("GET", "/ota-upgrades/packages", &[], None)
            .await;
        if ok {
            json_of(resp, 200).await;
        } else {
            let msg = refused(resp, 401, "IOTDA.000002").await;
            assert!(msg.contains("X-Sdk-Date"), "{msg}");
        }
    }
    // The server's clock moves, the request's date does not: a replay an hour later is refused.
    let date = a.date();
    app.clock.advance(Duration::from_secs(3600));
    let old = Application {
        date_offset: -3600,
        ..application(&app, &project).await
    };
    assert_eq!(old.date(), date);
    refused(
        old.call("GET", "/ota-upgrades/packages", &[], None).await,
        401,
        "IOTDA.000002",
    )
    .await;

    // A revoked key.
    let revoked = application(&app, &project).await;
    credentials::revoke(&app.state, &project, &revoked.ak)
        .await
        .unwrap();
    let msg = refused(
        revoked
            .call("GET", "/ota-upgrades/packages", &[], None)
            .await,
        401,
        "IOTDA.000002",
    )
    .await;
    assert!(msg.contains("revoked"), "{msg}");
    // Garbage in Authorization, and no credentials at all.
    for bad in ["Bearer abc", "SDK-HMAC-SHA256 Access=X"] {
        let resp = app
            .client
            .get(app.url(&packages))
            .header("authorization", bad)
            .send()
            .await
            .unwrap();
        let msg = refused(resp, 401, "IOTDA.000002").await;
        assert!(msg.contains("Authorization"), "{msg}");
    }
    refused(
        app.client.get(app.url(&packages)).send().await.unwrap(),
        401,
        "IOTDA.000002",
    )
    .await;
    // UNSIGNED-PAYLOAD on a JSON body is not accepted (the body would go unchecked).
    let resp = a
        .send(
            "POST",
            &format!("/v5/iot/{project}/batchtasks"),
            &[],
            "application/json",
            b"{}".to_vec(),
            "UNSIGNED-PAYLOAD",
            &[("X-Sdk-Content-Sha256", "UNSIGNED-PAYLOAD")],
        )
        .await;
    let msg = refused(resp, 401, "IOTDA.000002").await;
    assert!(msg.contains("multipart"), "{msg}");

    // Another project: its credential cannot name this project in the path or X-Project-Id (401), and
    // this project's ids are "not found" through its own path (404), so ids do not leak.
    let other = projects::create(&app.state, "other").await.unwrap();
    let b = application(&app, &other.id).await;
    let msg = refused(
        Application {
            project: project.clone(),
            ak: b.ak.clone(),
            sk: b.sk.clone(),
            app: &app,
            date_offset: 0,
        }
        .call("GET", "/ota-upgrades/packages", &[], None)
        .await,
        401,
        "IOTDA.000002",
    )
    .await;
    assert!(msg.contains("does not belong to project"), "{msg}");
    let msg = refused(
        b.call(
            "GET",
            &format!("/ota-upgrades/packages/{package_id}"),
            &[],
            None,
        )
        .await,
        404,
        "IOTDA.000005",
    )
    .await;
    assert!(msg.contains(package_id), "{msg}");
    app.stop().await;
}

#[tokio::test]
async fn products_devices_and_groups_through_the_signed_api() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let project = projects::ensure_default(&app.state).await.unwrap().id;
    let a = application(&app, &project).await;

    // Products.
    let product = json_of(
        a.call(
            "POST",
            "/products",
            &[],
            Some(&json!({"product_id": "meter", "name": "Water meter", "device_type": "WaterMeter",
                        "protocol_type": "MQTT", "data_format": "json", "service_capabilities": []})),
        )
        .await,
        201,
    )
    .await;
    assert_eq!(
        (product["product_id"].as_str(), product["app_name"].as_str()),
        (Some("meter"), Some("DefaultApp"))
    );
    let msg = refused(
        a.call(
            "POST",
            "/products",
            &[],
            Some(&json!({"name": "x", "device_type": "y", "protocol_type": "Carrier pigeon"})),
        )
        .await,
        400,
        "IOTDA.000006",
    )
    .await;
    assert!(msg.contains("protocol_type"), "{msg}");
    let updated = json_of(
        a.call(
            "PUT",
            "/products/meter",
            &[],
            Some(&json!({"name": "Smart water meter"})),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(updated["name"], "Smart water meter");
    let msg = refused(
        a.call(
            "PUT",
            "/products/meter",
            &[],
            Some(&json!({"protocol_type": "CoAP"})),
        )
        .await,
        400,
        "IOTDA.000006",
    )
    .await;
    assert!(msg.contains("CoAP"), "{msg}");
    let listed = json_of(a.call("GET", "/products", &[], None).await, 200).await;
    assert_eq!(listed["page"]["count"], 1);
    assert_eq!(listed["products"][0]["product_id"], "meter");

    // Devices: three registered, one refused twice over.
    for node in ["n1", "n2", "n3"] {
        let d = json_of(
            a.call(
                "POST",
                "/devices",
                &[],
                Some(&json!({"node_id": node, "product_id": "meter", "device_name": format!("dev {node}"),
                            "auth_info": {"auth_type": "SECRET", "secret": "s3cret_value", "secure_access": true}})),
            )
            .await,
            201,
        )
        .await;
        assert_eq!(d["device_id"], format!("meter_{node}"));
        assert_eq!(d["auth_info"]["secret"], "s3cret_value");
        assert_eq!(d["status"], "INACTIVE");
    }
    refused(
        a.call(
            "POST",
            "/devices",
            &[],
            Some(&json!({"node_id": "n1", "product_id": "meter"})),
        )
        .await,
        409,
        "IOTDA.000007",
    )
    .await;
    let msg = refused(
        a.call(
            "POST",
            "/devices",
            &[],
            Some(&json!({"node_id": "bad node!", "product_id": "meter"})),
        )
        .await,
        400,
        "IOTDA.000006",
    )
    .await;
    assert!(msg.contains("node_id"), "{msg}");
    // Paging: descending id, the marker moves on, the count stays.
    let first = json_of(
        a.call("GET", "/devices", &[("limit", "2")], None).await,
        200,
    )
    .await;
    let ids: Vec<&str> = first["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["meter_n3", "meter_n2"]);
    assert_eq!(first["page"]["count"], 3);
    assert!(
        first["devices"][0].get("auth_info").is_none(),
        "lists show no secrets"
    );
    let marker = first["page"]["marker"].as_str().unwrap().to_owned();
    let second = json_of(
        a.call(
            "GET",
            "/devices",
            &[("limit", "2"), ("marker", &marker)],
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(second["devices"][0]["device_id"], "meter_n1");
    assert_eq!(second["devices"].as_array().unwrap().len(), 1);
    let msg = refused(
        a.call("GET", "/devices", &[("limit", "51")], None).await,
        400,
        "IOTDA.000017",
    )
    .await;
    assert!(msg.contains("limit"), "{msg}");
    let by_node = json_of(
        a.call("GET", "/devices", &[("node_id", "n2")], None).await,
        200,
    )
    .await;
    assert_eq!(by_node["page"]["count"], 1);

    let shown = json_of(a.call("GET", "/devices/meter_n1", &[], None).await, 200).await;
    assert_eq!(shown["product_name"], "Smart water meter");
    assert_eq!(shown["gateway_id"], "meter_n1");
    let changed = json_of(
        a.call(
            "PUT",
            "/devices/meter_n1",
            &[],
            Some(&json!({"device_name": "kitchen", "extension_info": {"floor": 2}})),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(changed["device_name"], "kitchen");
    assert_eq!(changed["extension_info"]["floor"], 2);
    refused(
        a.call(
            "PUT",
            "/devices/meter_n1",
            &[],
            Some(&json!({"extension_info": "not an object"})),
        )
        .await,
        400,
        "IOTDA.000006",
    )
    .await;
    json_of(
        a.call("POST", "/devices/meter_n1/freeze", &[], None).await,
        200,
    )
    .await;
    let frozen = json_of(a.call("GET", "/devices/meter_n1", &[], None).await, 200).await;
    assert_eq!(frozen["status"], "FROZEN");
    json_of(
        a.call("POST", "/devices/meter_n1/unfreeze", &[], None)
            .await,
        200,
    )
    .await;
    let thawed = json_of(a.call("GET", "/devices/meter_n1", &[], None).await, 200).await;
    assert_eq!(thawed["status"], "INACTIVE");

    // Groups and membership.
    let group = json_of(
        a.call(
            "POST",
            "/device-group",
            &[],
            Some(&json!({"name": "north", "description": "north side"})),
        )
        .await,
        201,
    )
    .await;
    let group_id = group["group_id"].as_str().unwrap().to_owned();
    let action = format!("/device-group/{group_id}/action");
    json_of(
        a.call(
            "POST",
            &action,
            &[("action_id", "addDevice"), ("device_id", "meter_n1")],
            None,
        )
        .await,
        200,
    )
    .await;
    let members = json_of(
        a.call(
            "GET",
            &format!("/device-group/{group_id}/devices"),
            &[],
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(members["devices"][0]["device_id"], "meter_n1");
    assert_eq!(members["page"]["count"], 1);
    let msg = refused(
        a.call("DELETE", &format!("/device-group/{group_id}"), &[], None)
            .await,
        409,
        "IOTDA.000007",
    )
    .await;
    assert!(msg.contains("remove them first"), "{msg}");
    refused(
        a.call(
            "POST",
            &action,
            &[("action_id", "moveDevice"), ("device_id", "meter_n1")],
            None,
        )
        .await,
        400,
        "IOTDA.000006",
    )
    .await;
    json_of(
        a.call(
            "POST",
            &action,
            &[("action_id", "removeDevice"), ("device_id", "meter_n1")],
            None,
        )
        .await,
        200,
    )
    .await;
    refused(
        a.call(
            "POST",
            &action,
            &[("action_id", "removeDevice"), ("device_id", "meter_n1")],
            None,
        )
        .await,
        404,
        "IOTDA.000005",
    )
    .await;
    let renamed = json_of(
        a.call(
            "PUT",
            &format!("/device-group/{group_id}"),
            &[],
            Some(&json!({"name": "south"})),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(renamed["name"], "south");
    let groups = json_of(
        a.call("GET", "/device-group", &[("name", "south")], None)
            .await,
        200,
    )
    .await;
    assert_eq!(groups["device_groups"][0]["group_id"], group_id.as_str());
    let gone = a
        .call("DELETE", &format!("/device-group/{group_id}"), &[], None)
        .await;
    assert_eq!(gone.status(), 204);

    // A product in use is not deleted; an unused one is; devices go.
    let msg = refused(
        a.call("DELETE", "/products/meter", &[], None).await,
        409,
        "IOTDA.000007",
    )
    .await;
    assert!(msg.contains("devices"), "{msg}");
    for d in ["meter_n1", "meter_n2", "meter_n3"] {
        let resp = a.call("DELETE", &format!("/devices/{d}"), &[], None).await;
        assert_eq!(resp.status(), 204);
    }
    refused(
        a.call("GET", "/devices/meter_n1", &[], None).await,
        404,
        "IOTDA.000005",
    )
    .await;
    assert_eq!(
        a.call("DELETE", "/products/meter", &[], None)
            .await
            .status(),
        204
    );
    app.stop().await;
}

#[tokio::test]
async fn subscriptions_are_managed_through_the_signed_api() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let project = projects::ensure_default(&app.state).await.unwrap().id;
    let a = application(&app, &project).await;
    let created = json_of(
        a.call(
            "POST",
            "/subscriptions",
            &[],
            Some(
                &json!({"resource": "updraft.batchtask.device", "event": "update",
                        "callbackurl": "https://receiver.example.com/hook", "channel": "HTTP"}),
            ),
        )
        .await,
        201,
    )
    .await;
    let id = created["subscription_id"].as_str().unwrap().to_owned();
    assert_eq!(created["secret"].as_str().unwrap().len(), 64);
    for (body, field) in [
        (
            json!({"resource": "device", "event": "update", "callbackurl": "https://x.example.com/"}),
            "resource",
        ),
        (
            json!({"resource": "batchtask", "event": "delete", "callbackurl": "https://x.example.com/"}),
            "event",
        ),
        (
            json!({"resource": "batchtask", "event": "update", "callbackurl": "http://x.example.com/"}),
            "callbackurl",
        ),
        (
            json!({"resource": "batchtask", "event": "update", "callbackurl": "https://x.example.com/",
                   "channel": "AMQP"}),
            "channel",
        ),
    ] {
        let msg = refused(
            a.call("POST", "/subscriptions", &[], Some(&body)).await,
            400,
            "IOTDA.000006",
        )
        .await;
        assert!(msg.contains(field), "{field}: {msg}");
    }
    let listed = json_of(a.call("GET", "/subscriptions", &[], None).await, 200).await;
    assert_eq!(listed["subscriptions"][0]["subscription_id"], id.as_str());
    assert!(
        listed["subscriptions"][0].get("secret").is_none(),
        "the secret is shown once"
    );
    let shown = json_of(
        a.call("GET", &format!("/subscriptions/{id}"), &[], None)
            .await,
        200,
    )
    .await;
    assert_eq!(shown["resource"], "updraft.batchtask.device");
    let deliveries = json_of(
        a.call(
            "GET",
            &format!("/subscriptions/{id}/deliveries"),
            &[("failed", "true")],
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(deliveries["deliveries"], json!([]));
    assert_eq!(
        a.call("DELETE", &format!("/subscriptions/{id}"), &[], None)
            .await
            .status(),
        204
    );
    refused(
        a.call("GET", &format!("/subscriptions/{id}"), &[], None)
            .await,
        404,
        "IOTDA.000005",
    )
    .await;
    app.stop().await;
}

/// Every route `server::http::router` registers under `/v5/iot/{project_id}`, with its methods.
const API_ROUTES: &[(&str, &[&str])] = &[
    ("/ota-upgrades/packages", &["get", "post"]),
    ("/ota-upgrades/packages/{package_id}", &["get", "delete"]),
    ("/batchtasks", &["get", "post"]),
    ("/batchtasks/{task_id}", &["get", "delete"]),
    ("/batchtasks/{task_id}/stop", &["post"]),
    ("/batchtasks/{task_id}/retry", &["post"]),
    ("/devices", &["get", "post"]),
    ("/devices/{device_id}", &["get", "put", "delete"]),
    ("/devices/{device_id}/freeze", &["post"]),
    ("/devices/{device_id}/unfreeze", &["post"]),
    ("/device-group", &["get", "post"]),
    ("/device-group/{group_id}", &["get", "put", "delete"]),
    ("/device-group/{group_id}/action", &["post"]),
    ("/device-group/{group_id}/devices", &["get"]),
    ("/products", &["get", "post"]),
    ("/products/{product_id}", &["get", "put", "delete"]),
    ("/subscriptions", &["get", "post"]),
    ("/subscriptions/{subscription_id}", &["get", "delete"]),
    ("/subscriptions/{subscription_id}/deliveries", &["get"]),
    ("/audit-logs", &["get"]),
    ("/batchtasks/{task_id}/resume", &["post"]),
    ("/batchtasks/{task_id}/confirm", &["post"]),
    ("/apps", &["get"]),
    ("/apps/{app_id}", &["get"]),
    ("/routing-rule/rules", &["get", "post"]),
    ("/routing-rule/rules/{rule_id}", &["get", "put", "delete"]),
    ("/routing-rule/actions", &["get", "post"]),
    (
        "/routing-rule/actions/{action_id}",
        &["get", "put", "delete"],
    ),
];

/// The schema `schema` refers to (`{"$ref": "#/components/schemas/X"}`), or `schema` itself.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("a local schema reference: {r}"));
            let found = &doc["components"]["schemas"][name];
            assert!(found.is_object(), "{name} is in components.schemas");
            found
        }
        None => schema,
    }
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_without_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    // No cookie, no signature; a malformed Authorization does not matter either.
    let doc = json_of(
        app.client
            .get(app.url("/v5/openapi.json"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let resp = app
        .client
        .get(app.url("/v5/openapi.json"))
        .header("authorization", "Bearer abc")
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(resp, 200).await, doc);

    let version = doc["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1"), "{version}");
    assert_eq!(
        doc["info"]["title"],
        "Updraft application API (IoTDA v5 compatible)"
    );
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    // Every route with exactly its methods, and nothing else; each needs a signature or a session.
    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let paths = doc["paths"].as_object().unwrap();
    for (rest, methods) in API_ROUTES {
        let path = format!("/v5/iot/{{project_id}}{rest}");
        let item = paths
            .get(&path)
            .unwrap_or_else(|| panic!("{path} is documented"));
        let mut documented: Vec<&str> = METHODS
            .into_iter()
            .filter(|m| item.get(*m).is_some())
            .collect();
        documented.sort_unstable();
        let mut expected = methods.to_vec();
        expected.sort_unstable();
        assert_eq!(documented, expected, "{path}");
        for method in *methods {
            let operation = &item[*method];
            let security = operation["security"].to_string();
            assert!(
                security.contains("sdk_hmac_sha256") && security.contains("console_session"),
                "{method} {path}: {security}"
            );
            assert!(
                operation["tags"].as_array().is_some_and(|t| t.len() == 1),
                "{method} {path} has a tag"
            );
            let responses = operation["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{method} {path} documents its success"
            );
            assert!(responses.contains_key("401"), "{method} {path}");
        }
    }
    assert_eq!(paths.len(), API_ROUTES.len(), "only the API's routes");
    let ids: std::collections::HashSet<&str> = paths
        .values()
        .flat_map(|item| METHODS.into_iter().filter_map(|m| item.get(m)))
        .map(|op| op["operationId"].as_str().unwrap())
        .collect();
    let operations: usize = API_ROUTES.iter().map(|(_, m)| m.len()).sum();
    assert_eq!(ids.len(), operations, "operation ids are unique");

    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["sdk_hmac_sha256"]["type"], "apiKey");
    assert_eq!(schemes["sdk_hmac_sha256"]["in"], "header");
    assert_eq!(schemes["sdk_hmac_sha256"]["name"], "Authorization");
    assert!(
        schemes["sdk_hmac_sha256"]["description"]
            .as_str()
            .unwrap()
            .contains("SDK-HMAC-SHA256")
    );
    assert_eq!(schemes["console_session"]["in"], "cookie");
    assert_eq!(schemes["console_session"]["name"], "__Host-updraft_session");

    // The schemas come from the handlers' types.
    let api = |rest: &str| &doc["paths"][format!("/v5/iot/{{project_id}}{rest}")];
    let create_task = resolve(
        &doc,
        &api("/batchtasks")["post"]["requestBody"]["content"]["application/json"]["schema"],
    );
    for field in [
        "task_name",
        "task_type",
        "targets",
        "document",
        "task_policy",
    ] {
        assert!(
            create_task["properties"].get(field).is_some(),
            "CreateBatchTask has {field}: {create_task}"
        );
    }
    let required = create_task["required"].to_string();
    assert!(
        required.contains("task_name") && required.contains("task_type"),
        "{required}"
    );
    let device = resolve(
        &doc,
        &api("/devices/{device_id}")["get"]["responses"]["200"]["content"]["application/json"]["schema"],
    );
    for field in ["device_id", "node_id", "sw_version", "fw_version", "status"] {
        assert!(
            device["properties"].get(field).is_some(),
            "the device has {field}: {device}"
        );
    }
    let error = resolve(
        &doc,
        &api("/devices/{device_id}")["get"]["responses"]["404"]["content"]["application/json"]["schema"],
    );
    for field in ["error_code", "error_msg"] {
        assert!(error["properties"].get(field).is_some(), "{error}");
    }
    // The package POST takes JSON (a bucket location) or a multipart upload.
    let content = &api("/ota-upgrades/packages")["post"]["requestBody"]["content"];
    let json = resolve(&doc, &content["application/json"]["schema"]);
    assert!(json["properties"].get("file_location").is_some(), "{json}");
    let form = resolve(&doc, &content["multipart/form-data"]["schema"]);
    for field in [
        "package_type",
        "product_id",
        "version",
        "support_source_versions",
        "description",
        "custom_info",
        "file_name",
        "segment_size",
        "file",
    ] {
        assert!(form["properties"].get(field).is_some(), "{field}: {form}");
    }
    // Query parameters are documented per list.
    let params = api("/batchtasks")["get"]["parameters"].to_string();
    for name in [
        "project_id",
        "task_type",
        "status",
        "limit",
        "offset",
        "marker",
    ] {
        assert!(params.contains(&format!("\"{name}\"")), "{name}: {params}");
    }
    app.stop().await;
}

#[tokio::test]
async fn credentials_made_in_the_console_sign_requests_until_revoked_there() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let cookie = app.sign_in().await;
    let created = app
        .server_fn(&cookie, "create_credential", &[("description", "billing")])
        .await;
    assert_eq!(created.status(), 200);
    let created: Value = created.json().await.unwrap();
    let signer = Application {
        app: &app,
        project: created["project_id"].as_str().unwrap().to_owned(),
        ak: created["access_key"].as_str().unwrap().to_owned(),
        sk: created["secret_key"].as_str().unwrap().to_owned(),
        date_offset: 0,
    };
    json_of(signer.call("GET", "/products", &[], None).await, 200).await;

    let listed: Value = app
        .server_fn(&cookie, "list_credentials", &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["access_key"], signer.ak.as_str());
    assert_eq!(listed[0]["description"], "billing");
    assert!(
        listed[0]["last_used"].is_string(),
        "the signed call is recorded: {listed}"
    );
    assert!(
        listed[0].get("secret_key").is_none(),
        "the SK is shown only at creation"
    );

    let revoked = app
        .server_fn(&cookie, "revoke_credential", &[("access_key", &signer.ak)])
        .await;
    assert_eq!(revoked.status(), 200);
    refused(
        signer.call("GET", "/products", &[], None).await,
        401,
        "IOTDA.000002",
    )
    .await;
    let listed: Value = app
        .server_fn(&cookie, "list_credentials", &[])
        .await
        .json()
        .await
        .unwrap();
    assert!(listed[0]["revoked"].is_string(), "{listed}");
    app.stop().await;
}

/// Every change made through the signed API is in the audit trail under the access key that signed it,
/// with its resource and result; reads are not; `GET /audit-logs` filters and pages them.
#[tokio::test]
async fn the_signed_apis_changes_are_audited_with_their_access_key() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let project = projects::ensure_default(&app.state).await.unwrap().id;
    mqtt_product_with_devices(&app, &project, &["dev-1"]).await;
    let a = application(&app, &project).await;
    let package = json_of(upload(&a, "2.0").await, 201).await;
    let package_id = package["package_id"].as_str().unwrap().to_owned();
    let task = json_of(
        a.call(
            "POST",
            "/batchtasks",
            &[],
            Some(
                &json!({"task_name": "audited", "task_type": "softwareUpgrade",
                        "targets": ["dev-1"], "document": {"package_ids": [package_id]}}),
            ),
        )
        .await,
        201,
    )
    .await;
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    json_of(
        a.call(
            "GET",
            "/batchtasks",
            &[("task_type", "softwareUpgrade")],
            None,
        )
        .await,
        200,
    )
    .await;
    json_of(
        a.call("POST", &format!("/batchtasks/{task_id}/stop"), &[], None)
            .await,
        200,
    )
    .await;
    let retried = a
        .call("POST", &format!("/batchtasks/{task_id}/retry"), &[], None)
        .await;
    let retry_status = retried.status().as_u16();
    let deleted = a
        .call("DELETE", &format!("/batchtasks/{task_id}"), &[], None)
        .await;
    assert!(deleted.status().is_success());
    let deleted = a
        .call(
            "DELETE",
            &format!("/ota-upgrades/packages/{package_id}"),
            &[],
            None,
        )
        .await;
    assert!(deleted.status().is_success());
    json_of(
        a.call(
            "PUT",
            "/devices/dev-1",
            &[],
            Some(&json!({"device_name": "renamed"})),
        )
        .await,
        200,
    )
    .await;
    // A refused change is recorded too.
    refused(
        a.call(
            "POST",
            "/batchtasks",
            &[],
            Some(
                &json!({"task_name": "bad name!", "task_type": "softwareUpgrade",
                        "targets": ["dev-1"], "document": {"package_ids": ["x"]}}),
            ),
        )
        .await,
        400,
        "IOTDA.000006",
    )
    .await;

    let listed = json_of(
        a.call(
            "GET",
            "/audit-logs",
            &[("actor", &a.ak), ("limit", "50")],
            None,
        )
        .await,
        200,
    )
    .await;
    let entries = listed["audit_logs"].as_array().unwrap();
    let actions: Vec<(String, String, String)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["resource_id"].as_str().unwrap_or("").to_owned(),
                e["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        // A creation names what it created.
        (
            "POST /v5/iot/{project_id}/ota-upgrades/packages",
            package_id.as_str(),
            "success",
        ),
        (
            "POST /v5/iot/{project_id}/batchtasks",
            task_id.as_str(),
            "success",
        ),
        (
            "POST /v5/iot/{project_id}/batchtasks/{task_id}/stop",
            task_id.as_str(),
            "success",
        ),
        (
            "DELETE /v5/iot/{project_id}/batchtasks/{task_id}",
            task_id.as_str(),
            "success",
        ),
        (
            "DELETE /v5/iot/{project_id}/ota-upgrades/packages/{package_id}",
            package_id.as_str(),
            "success",
        ),
        (
            "PUT /v5/iot/{project_id}/devices/{device_id}",
            "dev-1",
            "success",
        ),
        ("POST /v5/iot/{project_id}/batchtasks", "", "failure"),
    ];
    for (action, id, result) in expected {
        assert!(
            actions.contains(&(action.to_owned(), id.to_owned(), result.to_owned())),
            "{action} {id} {result} missing from {actions:#?}"
        );
    }
    let retry = (
        "POST /v5/iot/{project_id}/batchtasks/{task_id}/retry".to_owned(),
        task_id.clone(),
        if retry_status < 400 {
            "success"
        } else {
            "failure"
        }
        .to_owned(),
    );
    assert!(actions.contains(&retry), "{actions:#?}");
    assert_eq!(
        listed["page"]["count"], 8,
        "reads are not recorded: {actions:#?}"
    );
    let newest = &entries[0];
    assert_eq!(newest["actor_type"], "application");
    assert_eq!(newest["actor"], a.ak.as_str());
    assert_eq!(newest["status"], 400);
    assert_eq!(newest["source"], "127.0.0.1");
    assert!(newest["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    // A failure is recorded with the error the caller was given.
    let detail = newest["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("IOTDA.000006: ") && detail.contains("task_name"),
        "{detail}"
    );
    // Filters and pages.
    let on_task = json_of(
        a.call(
            "GET",
            "/audit-logs",
            &[("resource_id", &task_id), ("limit", "1"), ("offset", "1")],
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(on_task["page"]["count"], 4, "{on_task}");
    assert_eq!(on_task["audit_logs"].as_array().unwrap().len(), 1);
    let nobody = json_of(
        a.call("GET", "/audit-logs", &[("actor", "someone-else")], None)
            .await,
        200,
    )
    .await;
    assert_eq!(nobody["page"]["count"], 0);
    refused(
        a.call("GET", "/audit-logs", &[("limit", "0")], None).await,
        400,
        "IOTDA.000006",
    )
    .await;
    app.stop().await;
}

/// What the server logs, captured (JSON lines).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// The request id of the call that created a task is in the driver's log lines for the task (started
/// later, by the driver's own loop), and the one of the call that stopped it is on the lines of the stop's
/// effects. (Each test is a process of its own under nextest, so the log subscriber is this test's.)
#[tokio::test]
async fn the_request_ids_of_api_calls_follow_the_tasks_they_created_and_stopped() {
    let logs = Captured::default();
    server::telemetry::init(
        server::config::LogFormat::Json,
        "info,backend=debug",
        logs.clone(),
        false,
    );
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let project = projects::ensure_default(&app.state).await.unwrap().id;
    mqtt_product_with_devices(&app, &project, &["dev-1"]).await;
    let a = application(&app, &project).await;
    let package = json_of(upload(&a, "2.0").await, 201).await;
    let created = a
        .call(
            "POST",
            "/batchtasks",
            &[],
            Some(&json!({"task_name": "traced", "task_type": "softwareUpgrade",
                        "targets": ["dev-1"], "document": {"package_ids": [package["package_id"]]}})),
        )
        .await;
    let create_id = created.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let task = json_of(created, 201).await;
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    app.state.driver.run_due(&app.state).await.unwrap();
    let stopped = a
        .call("POST", &format!("/batchtasks/{task_id}/stop"), &[], None)
        .await;
    let stop_id = stopped.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    json_of(stopped, 200).await;
    app.stop().await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let started = lines
        .iter()
        .find(|l| l["message"] == "task started" && l["task_id"] == task_id.as_str())
        .unwrap_or_else(|| panic!("no start line in\n{text}"));
    assert_eq!(started["request_id"], create_id.as_str(), "{started}");
    let stop_effect = lines
        .iter()
        .find(|l| {
            l["message"] == "subtask status"
                && l["to"] == "Stopped"
                && l["task_id"] == task_id.as_str()
        })
        .unwrap_or_else(|| panic!("no stop line in\n{text}"));
    assert_eq!(
        stop_effect["request_id"],
        create_id.as_str(),
        "{stop_effect}"
    );
    assert_eq!(
        stop_effect["span"]["request_id"],
        stop_id.as_str(),
        "{stop_effect}"
    );
}
