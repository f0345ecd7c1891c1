//! HTTPS, health, sign-in, sessions, CSRF and server functions, end to end over real sockets.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{PASSWORD, settings_for, spawn_app, spawn_with};

#[tokio::test]
async fn health_and_readiness_answer_over_verified_https() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let resp = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().contains_key("x-request-id"),
        "every response carries a request id"
    );
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "ok");
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap()["database"], "ok");
    app.stop().await;
}

#[tokio::test]
async fn pages_without_a_session_redirect_to_the_login_page() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let resp = app
        .client
        .get(app.url("/devices?q=pump"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(
        resp.headers()["location"],
        "/login?next=/devices%3Fq%3Dpump"
    );
    let login = app.client.get(app.url("/login")).send().await.unwrap();
    assert_eq!(login.status(), 200);
    let html = login.text().await.unwrap();
    assert!(
        html.contains(r#"action="/auth/login""#),
        "server-rendered sign-in form"
    );
    let stale = app
        .client
        .get(app.url("/devices"))
        .header("cookie", "__Host-updraft_session=stale")
        .send()
        .await
        .unwrap();
    assert_eq!(
        stale.headers()["location"],
        "/login?error=expired&next=/devices"
    );
    app.stop().await;
}

#[tokio::test]
async fn signing_in_sets_a_secure_cookie_and_serves_the_rendered_console() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let resp = app
        .client
        .post(app.url("/auth/login"))
        .header("origin", &app.origin)
        .form(&[
            ("username", "admin"),
            ("password", PASSWORD),
            ("next", "/groups"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/groups");
    let set_cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attr in [
        "__Host-updraft_session=",
        "Secure",
        "HttpOnly",
        "SameSite=Lax",
        "Path=/",
    ] {
        assert!(
            set_cookie.contains(attr),
            "cookie lacks {attr}: {set_cookie}"
        );
    }
    let cookie = set_cookie.split(';').next().unwrap().to_owned();

    let page = app
        .client
        .get(app.url("/devices"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("<h1>Devices</h1>"), "rendered on the server");
    assert!(html.contains("/pkg/updraft.js"), "loads the hydrate bundle");
    assert!(html.contains("Software/Firmware Upgrades"), "navigation");

    let logout = app
        .client
        .post(app.url("/auth/logout"))
        .header("origin", &app.origin)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(logout.headers()["location"], "/login");
    let after = app
        .client
        .get(app.url("/devices"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 303, "the session is gone after logout");
    app.stop().await;
}

#[tokio::test]
async fn server_functions_need_a_session_and_report_field_errors() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let anon = app
        .server_fn(
            "",
            "list_devices",
            &[
                ("search", ""),
                ("product_id", ""),
                ("status", ""),
                ("protocol", ""),
                ("version", ""),
                ("offset", "0"),
            ],
        )
        .await;
    assert_eq!(anon.status(), 401);
    assert_eq!(anon.json::<Value>().await.unwrap()["code"], "unauthorized");

    let cookie = app.sign_in().await;
    let created = app
        .server_fn(
            &cookie,
            "create_product",
            &[
                ("product_id", "meter"),
                ("name", "Meter"),
                ("device_type", "WaterMeter"),
                ("protocol_type", "MQTT"),
                ("manufacturer_name", ""),
            ],
        )
        .await;
    assert_eq!(created.status(), 200, "{}", created.text().await.unwrap());

    let bad = app
        .server_fn(
            &cookie,
            "register_device",
            &[
                ("product_id", "meter"),
                ("node_id", "bad id"),
                ("device_name", ""),
                ("device_id", ""),
                ("secret", ""),
            ],
        )
        .await;
    assert_eq!(
        bad.status(),
        422,
        "validation errors are 422, with the details in the body"
    );
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["code"], "validation");
    assert!(
        body["fields"]["node_id"]
            .as_str()
            .unwrap()
            .contains("may contain only"),
        "{body}"
    );

    let ok = app
        .server_fn(
            &cookie,
            "register_device",
            &[
                ("product_id", "meter"),
                ("node_id", "n1"),
                ("device_name", "Pump"),
                ("device_id", ""),
                ("secret", ""),
            ],
        )
        .await;
    assert_eq!(ok.status(), 200);
    let reg: Value = ok.json().await.unwrap();
    assert_eq!(reg["device_id"], "meter_n1");
    assert_eq!(reg["secret"].as_str().unwrap().len(), 24);

    let list = app
        .server_fn(
            &cookie,
            "list_devices",
            &[
                ("search", "pump"),
                ("product_id", ""),
                ("status", ""),
                ("protocol", ""),
                ("version", ""),
                ("offset", "0"),
            ],
        )
        .await;
    let page: Value = list.json().await.unwrap();
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["device_id"], "meter_n1");
    assert!(
        page["items"][0].get("secret").is_none(),
        "lists never carry secrets"
    );
    app.stop().await;
}

#[tokio::test]
async fn cross_origin_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let forged = app
        .client
        .post(app.url("/auth/login"))
        .header("origin", "https://evil.example")
        .form(&[("username", "admin"), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.headers()["location"], "/login?error=csrf");
    assert!(!forged.headers().contains_key("set-cookie"));

    let cookie = app.sign_in().await;
    let args = [("name", "g1"), ("description", "")];
    let evil = app
        .client
        .post(app.url("/api/create_group"))
        .header("origin", "https://evil.example")
        .header("cookie", &cookie)
        .form(&args)
        .send()
        .await
        .unwrap();
    assert_eq!(evil.status(), 403);
    let bare = app
        .client
        .post(app.url("/api/create_group"))
        .header("cookie", &cookie)
        .form(&args)
        .send()
        .await
        .unwrap();
    assert_eq!(
        bare.status(),
        403,
        "no Origin and no Referer is refused too"
    );
    let referer = app
        .client
        .post(app.url("/api/create_group"))
        .header("referer", format!("{}/groups", app.origin))
        .header("cookie", &cookie)
        .header("accept", "application/json")
        .form(&args)
        .send()
        .await
        .unwrap();
    assert_eq!(referer.status(), 200, "a same-origin Referer is enough");
    app.stop().await;
}

#[tokio::test]
async fn failed_logins_are_throttled_until_the_window_passes() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let attempt = |password: &'static str| {
        app.client
            .post(app.url("/auth/login"))
            .header("origin", &app.origin)
            .form(&[("username", "admin"), ("password", password)])
            .send()
    };
    for _ in 0..5 {
        assert_eq!(
            attempt("wrong-password").await.unwrap().headers()["location"],
            "/login?error=invalid"
        );
    }
    let locked = attempt(PASSWORD).await.unwrap();
    assert_eq!(
        locked.headers()["location"],
        "/login?error=throttled",
        "even the right password waits"
    );
    app.clock.advance(Duration::from_secs(15 * 60));
    assert_eq!(
        attempt(PASSWORD).await.unwrap().headers()["location"],
        "/devices"
    );
    app.stop().await;
}

#[tokio::test]
async fn data_and_keys_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let cookie = app.sign_in().await;
    app.server_fn(
        &cookie,
        "create_product",
        &[
            ("product_id", "meter"),
            ("name", "Meter"),
            ("device_type", "T"),
            ("protocol_type", "MQTT"),
            ("manufacturer_name", ""),
        ],
    )
    .await;
    let reg: Value = app
        .server_fn(
            &cookie,
            "register_device",
            &[
                ("product_id", "meter"),
                ("node_id", "n1"),
                ("device_name", ""),
                ("device_id", ""),
                ("secret", "restart-secret-1"),
            ],
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(reg["device_id"], "meter_n1");
    let ca_before = std::fs::read(dir.path().join("tls/ca.pem")).unwrap();
    app.stop().await;

    let app = spawn_app(dir.path()).await;
    assert_eq!(
        std::fs::read(dir.path().join("tls/ca.pem")).unwrap(),
        ca_before,
        "the CA is kept"
    );
    let cookie = app.sign_in().await; // the admin created on first start, same password
    let page: Value = app
        .server_fn(
            &cookie,
            "list_devices",
            &[
                ("search", ""),
                ("product_id", ""),
                ("status", ""),
                ("protocol", ""),
                ("version", ""),
                ("offset", "0"),
            ],
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["total"], 1);
    // The secret key file was reused: the sealed secret still opens.
    let state_db = backend::db::connect(&format!(
        "sqlite://{}?mode=rw",
        app.data_dir.join("updraft.db").display()
    ))
    .await
    .unwrap();
    let sealer =
        backend::secrets::Sealer::load_or_create(&app.data_dir.join("secret.key")).unwrap();
    use sea_orm::EntityTrait;
    let row = backend::storage::entity::devices::Entity::find_by_id("meter_n1".to_owned())
        .one(&state_db)
        .await
        .unwrap()
        .unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(
        sealer
            .open(&row.id, &row.secret_enc.unwrap())
            .unwrap()
            .expose_secret(),
        "restart-secret-1"
    );
    state_db.close().await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn operator_provided_certificates_are_served_instead_of_generated_ones() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.path().join("own.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("own.key"), key.serialize_pem()).unwrap();
    let mut settings = settings_for(&dir.path().join("data"));
    settings.tls.cert = Some(dir.path().join("own.pem"));
    settings.tls.key = Some(dir.path().join("own.key"));
    let app = spawn_with(settings).await;
    // The client trusts only the operator's certificate, so this succeeds only if it is the one served.
    assert_eq!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        !dir.path().join("data/tls/ca.pem").exists(),
        "no CA is generated when certificates are given"
    );
    app.stop().await;
}

#[tokio::test]
async fn changing_the_password_checks_the_old_one_and_ends_other_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let mine = app.sign_in().await;
    let other = app.sign_in().await;
    let (app_ref, mine_ref) = (&app, &mine);
    let change = |current: &'static str, new: &'static str, confirm: &'static str| async move {
        let args = [
            ("current_password", current),
            ("password", new),
            ("confirm", confirm),
        ];
        app_ref.server_fn(mine_ref, "change_password", &args).await
    };
    let wrong: Value = change("not-it-at-all", "a-new-password-1", "a-new-password-1")
        .await
        .json()
        .await
        .unwrap();
    assert!(wrong["fields"]["current_password"].is_string(), "{wrong}");
    let mismatch: Value = change(PASSWORD, "a-new-password-1", "a-new-password-2")
        .await
        .json()
        .await
        .unwrap();
    assert!(mismatch["fields"]["confirm"].is_string(), "{mismatch}");
    let short: Value = change(PASSWORD, "short", "short")
        .await
        .json()
        .await
        .unwrap();
    assert!(short["fields"]["password"].is_string(), "{short}");

    assert_eq!(
        change(PASSWORD, "a-new-password-1", "a-new-password-1")
            .await
            .status(),
        200
    );
    let page = |cookie: &str| {
        app.client
            .get(app.url("/devices"))
            .header("cookie", cookie.to_owned())
            .send()
    };
    assert_eq!(
        page(&mine).await.unwrap().status(),
        200,
        "this session stays"
    );
    assert_eq!(
        page(&other).await.unwrap().status(),
        303,
        "other sessions end"
    );
    let old = app
        .client
        .post(app.url("/auth/login"))
        .header("origin", &app.origin)
        .form(&[("username", "admin"), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(old.headers()["location"], "/login?error=invalid");
    let new = app
        .client
        .post(app.url("/auth/login"))
        .header("origin", &app.origin)
        .form(&[("username", "admin"), ("password", "a-new-password-1")])
        .send()
        .await
        .unwrap();
    assert_eq!(new.headers()["location"], "/devices");
    app.stop().await;
}

/// Sign-ins (both ways) and the console's changes are in the audit trail under the user, from the
/// browser's address; the console's reads are not.
#[tokio::test]
async fn console_changes_and_sign_ins_are_audited_with_the_user() {
    use backend::service::audit;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let failed = app
        .client
        .post(app.url("/auth/login"))
        .header("origin", &app.origin)
        .form(&[("username", "admin"), ("password", "not-the-password")])
        .send()
        .await
        .unwrap();
    assert_eq!(failed.headers()["location"], "/login?error=invalid");
    let cookie = app.sign_in().await;
    let created = app
        .server_fn(
            &cookie,
            "create_product",
            &[
                ("product_id", "meter"),
                ("name", "Meter"),
                ("device_type", "WaterMeter"),
                ("protocol_type", "MQTT"),
                ("manufacturer_name", ""),
            ],
        )
        .await;
    assert_eq!(created.status(), 200);
    assert_eq!(created.headers()["x-resource-id"], "meter");
    let renamed = app
        .server_fn(
            &cookie,
            "rename_product",
            &[("product_id", "meter"), ("name", "Water meter")],
        )
        .await;
    assert_eq!(
        renamed.status(),
        200,
        "the form read for the audit reaches the function"
    );
    // As a browser asks: a compressed answer welcome (the audit still reads the error).
    let bad = app
        .client
        .post(app.url("/api/register_device"))
        .header("origin", &app.origin)
        .header("cookie", &cookie)
        .header("accept-encoding", "gzip, deflate, br, zstd")
        .form(&[
            ("product_id", "meter"),
            ("node_id", "bad id"),
            ("device_name", ""),
            ("device_id", ""),
            ("secret", ""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let read = app
        .server_fn(&cookie, "list_products", &[("offset", "0")])
        .await;
    assert!(read.status().as_u16() < 500);

    let project = backend::service::projects::ensure_default(&app.state)
        .await
        .unwrap()
        .id;
    let (rows, count) = audit::list(
        &app.state,
        &project,
        &audit::Filter {
            limit: 50,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let seen: Vec<(&str, &str, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r.action.as_str(),
                r.actor_type.as_str(),
                r.actor.as_str(),
                r.result.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("console register_device", "user", "admin", "failure"),
            ("console rename_product", "user", "admin", "success"),
            ("console create_product", "user", "admin", "success"),
            ("sign-in", "user", "admin", "success"),
            ("sign-in", "user", "admin", "failure"),
        ],
        "newest first, reads left out"
    );
    assert_eq!(count, 5);
    assert_eq!(rows[0].status, Some(422));
    let refused = rows[0].detail.as_deref().unwrap();
    assert!(
        refused.contains("node_id: "),
        "the field's message: {refused}"
    );
    // Named as the API names them, with the id from the form or the creation's answer.
    for row in &rows[1..3] {
        assert_eq!(row.resource_type.as_deref(), Some("products"));
        assert_eq!(row.resource_id.as_deref(), Some("meter"));
    }
    assert_eq!(
        rows[4].detail.as_deref(),
        Some("wrong user name or password")
    );
    assert!(
        rows.iter()
            .all(|r| r.source.as_deref() == Some("127.0.0.1"))
    );

    // Settings › Audit log, rendered on the server, filtered in the URL.
    let page = |query: &'static str| {
        let (app, cookie) = (&app, &cookie);
        async move {
            let resp = app
                .client
                .get(app.url(&format!("/settings/audit{query}")))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.text().await.unwrap()
        }
    };
    let all = page("").await;
    assert!(all.contains("<h1>Audit log</h1>"), "{all}");
    assert!(all.contains("1–5 of 5"), "every entry, counted");
    assert!(all.contains(">sign-in<"));
    let products = page("?actor=admin&resource_type=products&resource_id=meter").await;
    assert!(
        products.contains("console rename_product") && products.contains("console create_product")
    );
    assert!(!products.contains(">sign-in<"), "filtered by resource");
    assert!(products.contains("1–2 of 2"));
    let later = page("?from=2999-01-01T00:00").await;
    assert!(later.contains("No entries match."), "filtered by time");
    let refused = app
        .server_fn(
            &cookie,
            "list_audit",
            &[
                ("actor", ""),
                ("resource_type", ""),
                ("resource_id", ""),
                ("from", "yesterday"),
                ("to", ""),
                ("offset", "0"),
            ],
        )
        .await;
    assert_eq!(
        refused.status(),
        422,
        "a time that does not parse is a field error"
    );
    app.stop().await;
}
