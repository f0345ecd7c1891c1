//! The `updraft` binary as an operator runs it: configuration errors, start-up output, SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn updraft(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_updraft"));
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("UPDRAFT_DATA_DIR", dir.join("data"))
        .env("UPDRAFT_HTTP__LISTEN", "127.0.0.1:0")
        .env("UPDRAFT_MQTT__LISTEN", "127.0.0.1:0")
        .env("UPDRAFT_MQTT__TLS_LISTEN", "127.0.0.1:0")
        .env("UPDRAFT_LWM2M__LISTEN", "127.0.0.1:0")
        .env("UPDRAFT_LWM2M__DTLS_LISTEN", "127.0.0.1:0")
        .env("UPDRAFT_HTTP__SHUTDOWN_GRACE", "1s")
        .env("USER", "ops-alice");
    cmd
}

#[test]
fn a_bad_environment_value_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = updraft(dir.path())
        .env("UPDRAFT_HTTP__LISTEN", "not-an-address")
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("http.listen") || err.contains("HTTP__LISTEN"),
        "names the key: {err}"
    );
    assert!(!dir.path().join("data").exists(), "nothing was created");
}

#[test]
fn unknown_or_bad_keys_in_the_file_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("updraft.toml"),
        "[http]\nlisen = \"0.0.0.0:1\"\n",
    )
    .unwrap();
    let out = updraft(dir.path()).arg("check-config").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lisen"), "names the unknown key: {err}");

    std::fs::write(
        dir.path().join("updraft.toml"),
        "[console]\nsession_idle = \"forever\"\n",
    )
    .unwrap();
    let out = updraft(dir.path()).arg("check-config").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("session_idle"), "names the key: {err}");

    std::fs::write(
        dir.path().join("updraft.toml"),
        "[console]\nsession_idle = \"2h\"\n",
    )
    .unwrap();
    let out = updraft(dir.path()).arg("check-config").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"session_idle\": \"2h\""));
}

/// Starts `updraft serve`, waits for the console line, returns the child and everything printed so far.
fn start(dir: &std::path::Path) -> (std::process::Child, String) {
    start_with(dir, &[])
}

fn start_with(dir: &std::path::Path, args: &[&str]) -> (std::process::Child, String) {
    let mut child = updraft(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("CA certificate:") {
            // Keep draining stdout so the server never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines.by_ref() {});
            return (child, seen);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("updraft did not start: {seen}");
}

fn sigterm_and_wait(child: &mut std::process::Child) -> Duration {
    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "clean exit after SIGTERM: {status:?}");
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "updraft must stop within 5 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_prints_how_to_connect_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, out) = start(dir.path());
    assert!(out.contains("Console:        https://127.0.0.1:"), "{out}");
    assert!(
        out.contains("First admin:    admin / "),
        "prints the generated password once: {out}"
    );
    let ca = std::fs::canonicalize(dir.path().join("data/tls/ca.pem")).unwrap();
    assert!(
        out.contains(&format!("CA certificate: {}", ca.display())),
        "{out}"
    );
    sigterm_and_wait(&mut child);

    // Second start: same data, no new password.
    let (mut child, out) = start(dir.path());
    assert!(out.contains("Sign in with an existing account."), "{out}");
    assert!(!out.contains("First admin:"), "{out}");
    sigterm_and_wait(&mut child);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, out) = start_with(dir.path(), &["--log-format", "json", "serve"]);
    let logs: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("valid JSON"))
        .collect();
    assert!(!logs.is_empty(), "{out}");
    assert!(
        logs.iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string()),
        "{out}"
    );
    assert!(
        logs.iter()
            .any(|l| l["message"] == "generated a local certificate authority"),
        "{out}"
    );
    sigterm_and_wait(&mut child);
}

#[tokio::test]
async fn packages_are_uploaded_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fw-2.0.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let upload = |version: &str| {
        updraft(dir.path())
            .args(["package", "upload"])
            .arg(&file)
            .args([
                "--product",
                "meter",
                "--version",
                version,
                "--type",
                "firmware",
            ])
            .args(["--source-version", "1.0", "--description", "from the CLI"])
            .output()
            .unwrap()
    };

    let out = upload("2.0");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("product meter does not exist"), "{err}");

    let settings = server::config::Settings {
        data_dir: dir.path().join("data"),
        ..Default::default()
    };
    let clock = std::sync::Arc::new(backend::clock::SystemClock);
    let (state, project) = server::startup::open_state(&settings, clock.clone())
        .await
        .unwrap();
    backend::service::products::create(
        &state,
        &project.id,
        backend::service::products::NewProduct {
            product_id: Some("meter".into()),
            name: "Meter".into(),
            device_type: "Meter".into(),
            protocol_type: "CoAP".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    state.db.clone().close().await.unwrap();

    let out = upload("2.0");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("uploaded package"), "{stdout}");
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(&data));
    assert!(stdout.contains(&sha), "prints the SHA-256: {stdout}");
    assert!(stdout.contains("fw-2.0.bin (3000000 bytes)"), "{stdout}");

    let out = upload("2.0");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already has a firmwarePackage with version 2.0"),
        "{err}"
    );

    let (state, project) = server::startup::open_state(&settings, clock).await.unwrap();
    let list = backend::service::packages::list(
        &state,
        &project.id,
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(list.total, 1);
    let p = &list.items[0].package;
    assert_eq!(
        (p.sha256.as_str(), p.size, p.version.as_str()),
        (sha.as_str(), 3_000_000, "2.0")
    );
    assert_eq!(p.description, "from the CLI");
    let stored = std::fs::read(dir.path().join("data/packages/uploads").join(&p.id)).unwrap();
    assert_eq!(stored, data);
}

/// Runs the binary with `args` in `dir`; returns stdout parsed as JSON (the command must succeed).
fn cli_json(dir: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = updraft(dir).arg("--json").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "updraft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "updraft {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn devices_groups_and_tasks_are_scripted_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let product = cli_json(d, &["product", "add", "--id", "meter", "--name", "Meter"]);
    assert_eq!(product["protocol_type"], "MQTT");
    let device = cli_json(
        d,
        &[
            "device",
            "add",
            "--product",
            "meter",
            "--node-id",
            "860000000000001",
        ],
    );
    assert_eq!(device["device_id"], "meter_860000000000001");
    assert_eq!(
        device["secret"].as_str().unwrap().len(),
        24,
        "the secret is printed once"
    );
    let listed = cli_json(d, &["device", "list", "--product", "meter"]);
    assert_eq!(listed["count"], 1);
    assert_eq!(listed["devices"][0]["status"], "INACTIVE");
    let group = cli_json(d, &["group", "add", "--name", "north"]);
    let group_id = group["group_id"].as_str().unwrap();
    cli_json(
        d,
        &["group", "add-devices", group_id, "meter_860000000000001"],
    );
    assert_eq!(cli_json(d, &["group", "list"])["groups"][0]["members"], 1);

    std::fs::write(d.join("app.bin"), vec![7u8; 4096]).unwrap();
    let out = updraft(d)
        .args([
            "package",
            "upload",
            "app.bin",
            "--product",
            "meter",
            "--version",
            "2.0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let packages = cli_json(d, &["package", "list"]);
    let package = packages["packages"][0]["package_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let task = cli_json(
        d,
        &[
            "task",
            "create",
            "--name",
            "north_2_0",
            "--package",
            &package,
            "--group",
            group_id,
            "--retry-count",
            "1",
            "--retry-interval",
            "5",
            "--rollout",
            r#"{"waves": [{"percent": 10}, {"count": 5, "soak_minutes": 30}], "max_per_minute": 50}"#,
        ],
    );
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    // The rollout is stored completed: a last wave for the rest, and a seed.
    let waves = task["rollout"]["waves"].as_array().unwrap();
    assert_eq!(waves.len(), 3, "{task}");
    assert_eq!(waves[1]["soak_minutes"], 30);
    assert_eq!(task["rollout"]["max_per_minute"], 50);
    assert!(task["rollout"]["seed"].is_u64());
    // Only a paused task resumes.
    let out = updraft(d)
        .args(["task", "resume", &task_id])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only a paused task resumes"));
    // A task whose devices wait for confirmation; not started yet (no server runs here), so there is
    // nothing to confirm.
    let confirming = cli_json(
        d,
        &[
            "task",
            "create",
            "--name",
            "confirm_me",
            "--package",
            &package,
            "--group",
            group_id,
            "--need-confirm",
        ],
    );
    assert_eq!(confirming["need_confirm"], true, "{confirming}");
    let out = updraft(d)
        .args(["task", "confirm", confirming["task_id"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has not started"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No server runs here: the task waits for one to start it (and to resolve its group then).
    assert_eq!(task["status"], "Waitting");
    assert_eq!(task["task_type"], "softwareUpgrade");
    assert_eq!(task["task_policy"]["retry_count"], 1);
    assert_eq!(task["task_progress"]["total"], 0);
    let shown = cli_json(d, &["task", "show", &task_id]);
    assert_eq!(shown["task_details"], serde_json::json!([]));

    let out = updraft(d)
        .args(["task", "delete", &task_id])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a running task cannot be deleted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it before deleting it"));
    let bad = updraft(d)
        .args([
            "task",
            "create",
            "--name",
            "bad-name",
            "--package",
            &package,
            "--device",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("task_name"));

    let stopped = cli_json(d, &["task", "stop", &task_id]);
    assert_eq!(stopped["targets"], serde_json::json!([]));
    let confirming_id = confirming["task_id"].as_str().unwrap();
    cli_json(d, &["task", "stop", confirming_id]);
    cli_json(d, &["task", "delete", confirming_id]);
    assert_eq!(
        cli_json(d, &["task", "list"])["batchtasks"][0]["status"],
        "Stopped"
    );
    assert_eq!(
        cli_json(d, &["task", "delete", &task_id])["deleted"],
        task_id.as_str()
    );
    assert_eq!(
        cli_json(d, &["task", "list"])["batchtasks"],
        serde_json::json!([])
    );

    // Every change above is in the audit trail as the command line's, with how it ended; reads are not.
    let audit = cli_json(d, &["audit", "list", "--limit", "100"]);
    let entries = audit["audit_logs"].as_array().unwrap();
    let seen: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            ("cli task delete", "success"),
            ("cli task delete", "success"),
            ("cli task stop", "success"),
            ("cli task stop", "success"),
            ("cli task create", "failure"),
            ("cli task delete", "failure"),
            ("cli task confirm", "failure"),
            ("cli task create", "success"),
            ("cli task resume", "failure"),
            ("cli task create", "success"),
            ("cli package upload", "success"),
            ("cli group add-devices", "success"),
            ("cli group add", "success"),
            ("cli device add", "success"),
            ("cli product add", "success"),
        ],
        "newest first"
    );
    assert!(
        entries
            .iter()
            .all(|e| e["actor_type"] == "cli" && e["actor"] == "ops-alice")
    );
    assert_eq!(entries[5]["resource_id"], task_id.as_str());
    assert!(
        entries[5]["detail"]
            .as_str()
            .unwrap()
            .contains("stop it before deleting it"),
        "{}",
        entries[5]
    );
}

#[test]
fn connection_caps_beyond_the_descriptor_limit_stop_start_up_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let out = updraft(dir.path())
        .env("UPDRAFT_MQTT__MAX_CONNECTIONS", "100000000")
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mqtt.max_connections 100000000") && err.contains("file descriptors"),
        "names the cap and the limit: {err}"
    );
}

#[test]
fn text_logs_keep_what_clients_send_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = updraft(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = |within: Duration| rx.recv_timeout(within).ok();
    let mut started = Vec::new();
    loop {
        match next(Duration::from_secs(60)) {
            Some(line) if line.contains("CA certificate:") => break,
            Some(line) => started.push(line),
            None => {
                let _ = child.kill();
                panic!("updraft did not start: {started:#?}");
            }
        }
    }
    // The MQTT port, from the banner (`mqtt://127.0.0.1:PORT`).
    let port: u16 = started
        .iter()
        .find_map(|l| {
            let at = l.find("mqtt://127.0.0.1:")? + "mqtt://127.0.0.1:".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("no MQTT address in the banner: {started:#?}")
        });
    // A client id with a line break and a forged log line after it.
    let mut connect = rumqttc::mqttbytes::v4::Connect::new("x\n2026-12-05T00:00:00Z  INFO forged");
    connect.login = Some(rumqttc::mqttbytes::v4::Login::new("x", "y"));
    let mut out = bytes::BytesMut::new();
    connect.write(&mut out).unwrap();
    let mut mqtt = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut mqtt, &out).unwrap();
    let mut lines = Vec::new();
    while let Some(line) = next(Duration::from_secs(10)) {
        let refused = line.contains("login refused");
        lines.push(line);
        if refused {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("login refused") && l.contains(r"x\n2026")),
        "the refusal is logged with the line break escaped: {lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("2026-12-05T00:00:00Z")),
        "{lines:#?}"
    );
}
