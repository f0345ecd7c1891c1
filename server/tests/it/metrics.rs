//! `GET /metrics` scraped while simulated devices upgrade (MQTT over HTTPS downloads, then LwM2M with
//! PCP): the families move as the devices do, the bearer token guards the endpoint, and every scrape
//! parses with an independent parser (the OpenMetrics parser of Python's `prometheus_client`, Debian's
//! python3-prometheus-client).

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use server::sim::SimOptions;
use server::sim::lwm2m::Lwm2mOptions;

use crate::helpers::{TestApp, settings_for, spawn_with};

const TOKEN: &str = "scrape-token-1";

/// The samples of a scrape, `name{k="v",...}` (labels sorted) → value, as Python's OpenMetrics parser
/// reads them; panics when it refuses the text.
fn parse(text: &str) -> HashMap<String, f64> {
    const SCRIPT: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        print("%s{%s} %r" % (s.name, labels, s.value))
"#;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (Debian's python3-prometheus-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

/// The sum of the samples of `name` whose labels include every one of `having`.
fn sum(samples: &HashMap<String, f64>, name: &str, having: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
                && having.iter().all(|h| k.contains(h))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn get(app: &TestApp, token: Option<&str>) -> reqwest::Response {
    let mut req = app.client.get(format!("{}/metrics", app.base));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    let resp = get(app, Some(TOKEN)).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()[http::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    parse(&resp.text().await.unwrap())
}

/// Scrapes until the sample `key` is `value` (5 s at most); that scrape.
async fn scrape_until(app: &TestApp, key: &str, value: f64) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for _ in 0..250 {
        samples = scrape(app).await;
        if samples.get(key) == Some(&value) {
            return samples;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{key} never became {value}: {samples:#?}");
}

async fn metrics_app(dir: &std::path::Path) -> TestApp {
    let mut settings = settings_for(dir);
    settings.metrics.token = Some(TOKEN.to_owned().into());
    spawn_with(settings).await
}

#[tokio::test]
async fn metrics_follow_an_mqtt_upgrade_and_need_their_token() {
    let dir = tempfile::tempdir().unwrap();
    let app = metrics_app(dir.path()).await;
    assert_eq!(get(&app, None).await.status(), 401);
    assert_eq!(get(&app, Some("wrong")).await.status(), 401);

    let fx = crate::tasks::fixture(&app).await;
    let mut devices = Vec::new();
    for i in 0..3 {
        devices.push(crate::tasks::register(&app, &fx, &format!("dev-m{i}")).await);
    }
    let fleet = crate::tasks::fleet(&app, devices.clone(), SimOptions::default());
    let idle = scrape_until(&app, "updraft_mqtt_connections{}", 3.0).await;
    assert_eq!(sum(&idle, "updraft_subtasks", &[]), 0.0);
    assert_eq!(idle[r#"updraft_build_info{version="0.1.0"}"#], 1.0);
    assert!(idle["updraft_process_resident_memory_bytes{}"] > 1e6);
    assert!(idle["updraft_process_open_fds{}"] > 5.0);
    assert!(idle["updraft_process_start_time_seconds{}"] > 1.7e9);

    let targets: Vec<_> = devices.iter().collect();
    let task = backend::service::tasks::create(
        &app.state,
        &fx.project,
        crate::tasks::new_task(&fx, "measured", &targets),
    )
    .await
    .unwrap();
    let done =
        crate::tasks::wait_task(&app, &fx, &task.id, "Success", |t| t.status == "Success").await;
    assert_eq!(done.success, 3);
    let after = scrape(&app).await;
    let success = [r#"status="Success""#, r#"protocol="MQTT""#];
    assert_eq!(sum(&after, "updraft_subtasks", &success), 3.0, "{after:#?}");
    assert_eq!(
        sum(
            &after,
            "updraft_subtask_transitions_total",
            &[r#"to="Success""#]
        ),
        3.0
    );
    assert_eq!(after[r#"updraft_tasks{status="Success"}"#], 1.0);
    // Every device left at least one step, each seen entering it here.
    assert!(sum(&after, "updraft_task_step_seconds_count", &[]) >= 3.0);
    assert!(
        after["updraft_download_bytes_total{}"] >= 3.0 * 1024.0,
        "{after:#?}"
    );
    assert!(sum(&after, "updraft_download_responses_total", &[r#"code="20"#]) >= 3.0);
    assert!(after[r#"updraft_mqtt_messages_total{direction="in"}"#] >= 6.0);
    assert!(after[r#"updraft_mqtt_messages_total{direction="out"}"#] >= 3.0);
    assert_eq!(after["updraft_downloads_in_flight{}"], 0.0);
    // The scrapes before were counted, by their route template.
    assert!(
        after[r#"updraft_http_requests_total{code="200",route="/metrics"}"#] >= 1.0,
        "{after:#?}"
    );
    assert!(after[r#"updraft_http_requests_total{code="401",route="/metrics"}"#] >= 2.0);
    assert!(
        sum(
            &after,
            "updraft_http_request_seconds_count",
            &[r#"route="/metrics""#]
        ) >= 3.0
    );
    fleet.stop().await;
    scrape_until(&app, "updraft_mqtt_connections{}", 0.0).await;
    app.stop().await;
}

#[tokio::test]
async fn metrics_follow_an_lwm2m_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let app = metrics_app(dir.path()).await;
    let (fx, nodes) = crate::lwm2m::fixture(&app, 4).await;
    let fleet = crate::lwm2m::fleet(
        &app,
        &nodes,
        Lwm2mOptions {
            cells: 2,
            ..Lwm2mOptions::default()
        },
    );
    scrape_until(&app, "updraft_lwm2m_registrations{}", 4.0).await;
    let task_id = crate::lwm2m::create_task(&app, &fx, &nodes).await;
    let task = crate::lwm2m::wait_finished(&app, &fx, &task_id).await;
    assert_eq!(task.success, 4);
    let after = scrape(&app).await;
    let success = [r#"status="Success""#, r#"protocol="CoAP""#];
    assert_eq!(sum(&after, "updraft_subtasks", &success), 4.0, "{after:#?}");
    // 20 000 bytes in 500-byte segments: 40 a device.
    assert!(after["updraft_pcp_segments_total{}"] >= 160.0, "{after:#?}");
    assert_eq!(after["updraft_lwm2m_registrations{}"], 4.0);
    assert!(after.contains_key("updraft_coap_retransmissions_total{}"));
    // Every slot was given back.
    assert_eq!(sum(&after, "updraft_cell_slots_in_use", &[]), 0.0);
    fleet.stop().await;
    app.stop().await;
}

/// The metric families `text` names (`updraft_...`, without the `_total`, `_bucket`, `_count` and
/// `_sum` of their samples).
fn families_named(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("updraft_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let family = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        out.insert(family.to_owned());
    }
    out
}

#[tokio::test]
async fn the_dashboard_and_the_alert_rules_use_only_exported_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let app = metrics_app(dir.path()).await;
    let resp = get(&app, Some(TOKEN)).await;
    let scrape = resp.text().await.unwrap();
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let dashboard = std::fs::read_to_string(deploy.join("grafana/updraft.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let exprs: Vec<&str> = parsed["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    let rules = std::fs::read_to_string(deploy.join("prometheus/updraft-rules.yml")).unwrap();
    let used = families_named(&format!("{}\n{rules}", exprs.join("\n")));
    assert!(used.len() >= 15, "{used:?}");
    // Registered: a family shows in a scrape from its first sample on.
    let registered: std::collections::BTreeSet<String> = app
        .state
        .metrics
        .families()
        .iter()
        .map(|f| (*f).to_owned())
        .collect();
    let unknown: Vec<_> = used.difference(&registered).collect();
    assert!(unknown.is_empty(), "not exported: {unknown:?}");
    // Those with samples already are in the scrape under that name.
    for family in [
        "updraft_mqtt_connections",
        "updraft_build_info",
        "updraft_outbox_backlog",
    ] {
        assert!(
            scrape.contains(&format!("# TYPE {family} ")),
            "{family} is not in the scrape:\n{scrape}"
        );
    }
    // And the other way round: the dashboard shows every family.
    let shown = families_named(&exprs.join("\n"));
    let missing: Vec<_> = registered.difference(&shown).collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
    app.stop().await;
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings_for(dir.path());
    settings.metrics.enabled = false;
    let app = spawn_with(settings).await;
    assert_eq!(get(&app, None).await.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn a_plain_listener_serves_metrics_to_a_private_network_with_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings_for(dir.path());
    settings.metrics.token = Some(TOKEN.to_owned().into());
    settings.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let app = spawn_with(settings).await;
    let addr = app.metrics_plain.expect("metrics.listen is bound");
    let url = format!("http://{addr}/metrics");
    let plain = reqwest::Client::new();
    let refused = plain.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let resp = plain.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let samples = parse(&resp.text().await.unwrap());
    assert_eq!(samples[r#"updraft_build_info{version="0.1.0"}"#], 1.0);
    // Only /metrics there.
    let other = plain
        .get(format!("http://{addr}/v5/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    app.stop().await;
}
