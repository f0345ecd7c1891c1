//! How fast the console's task detail page loads for a task of 100 000 devices (`make bench-console`).
//!
//! Starts Updraft on a temporary SQLite database, writes 100 000 devices (bulk rows: registering them
//! one by one is not what is measured) and creates one task for all of them through the task service
//! (the real path: 100 000 subtasks). The devices never connect, so the task keeps running. Then it signs
//! in and times, over HTTPS with a session, the server-rendered task page (first page of devices, a
//! status filter, a page deep in the list) and the `task_detail` server function the hydrated page
//! calls on every live update. Prints the median and the slowest of `--runs` loads of each.
//!
//!   cargo run --release -p server --example bench_console -- [--devices 100000] [--runs 20]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use backend::service::{packages, products, tasks};
use backend::storage::entity::devices;
use bytes::Bytes;
use clap::Parser;
use sea_orm::{EntityTrait, Set};

#[derive(Parser, Debug)]
struct Args {
    /// Devices in the task.
    #[arg(long, default_value_t = 100_000)]
    devices: usize,
    /// Loads of each page.
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

const PASSWORD: &str = "benchmark-password";

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let mut settings = server::config::Settings {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    settings.http.listen = "127.0.0.1:0".parse()?;
    settings.mqtt.enabled = false;
    settings.lwm2m.enabled = false;
    settings.admin.password = Some(PASSWORD.to_owned().into());
    settings.log.filter = "warn".to_owned();
    let app = server::startup::Application::build(settings, Arc::new(backend::clock::SystemClock))
        .await?;
    let addr = app.https_addr();
    let ca = std::fs::read(app.ca_path().context("a generated CA")?)?;
    let state = app.state().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let project = backend::service::projects::ensure_default(&state).await?.id;
    products::create(
        &state,
        &project,
        products::NewProduct {
            product_id: Some("meter".into()),
            name: "Meter".into(),
            device_type: "Meter".into(),
            protocol_type: "MQTT".into(),
            ..Default::default()
        },
    )
    .await?;
    let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(vec![7_u8; 4096]))]);
    let package = packages::upload(
        &state,
        &project,
        domain::package::PackageMetaInput {
            package_type: "softwarePackage".into(),
            product_id: "meter".into(),
            version: "2.0".into(),
            file_name: "meter.bin".into(),
            ..Default::default()
        },
        body,
    )
    .await?;

    let started = Instant::now();
    let now = state.clock.now().as_millis();
    let ids: Vec<String> = (0..args.devices).map(|i| format!("meter_{i:07}")).collect();
    for chunk in ids.chunks(1_000) {
        devices::Entity::insert_many(chunk.iter().map(|id| devices::ActiveModel {
            id: Set(id.clone()),
            project_id: Set(project.clone()),
            app_id: Set(project.clone()),
            product_id: Set("meter".into()),
            node_id: Set(id.trim_start_matches("meter_").to_owned()),
            device_name: Set(String::new()),
            description: Set(String::new()),
            gateway_id: Set(None),
            node_type: Set("GATEWAY".into()),
            auth_type: Set("SECRET".into()),
            secret_enc: Set(None),
            secondary_secret_enc: Set(None),
            fingerprint: Set(None),
            secure_access: Set(true),
            status: Set("OFFLINE".into()),
            sw_version: Set(Some("1.0".into())),
            fw_version: Set(None),
            device_sdk_version: Set(None),
            extension_info: Set(None),
            last_radio: Set(None),
            connection_status_update_time: Set(None),
            active_time: Set(None),
            instance_id: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        }))
        .exec(&state.db)
        .await?;
    }
    let seeded = started.elapsed();
    let started = Instant::now();
    let task = tasks::create(
        &state,
        &project,
        tasks::NewTask {
            task_name: "big_rollout".into(),
            task_type: "softwareUpgrade".into(),
            package_id: package.id.clone(),
            targets: ids,
            ..Default::default()
        },
    )
    .await?;
    println!(
        "seeded {} devices in {:.1} s; created the task ({} subtasks) in {:.1} s",
        args.devices,
        seeded.as_secs_f64(),
        task.total,
        started.elapsed().as_secs_f64()
    );

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let base = format!("https://{addr}");
    let login = client
        .post(format!("{base}/auth/login"))
        .header("origin", &base)
        .form(&[("username", "admin"), ("password", PASSWORD), ("next", "")])
        .send()
        .await?;
    let cookie = login
        .headers()
        .get("set-cookie")
        .context("a session cookie")?
        .to_str()?
        .split(';')
        .next()
        .unwrap_or_default()
        .to_owned();

    let deep = args.devices / 2;
    let pages = [
        (
            "page, first 50 devices",
            format!("/upgrades/tasks/{}", task.id),
        ),
        (
            "page, filtered by status",
            format!("/upgrades/tasks/{}?status=Waitting", task.id),
        ),
        (
            "page, devices at offset N/2",
            format!("/upgrades/tasks/{}?offset={deep}", task.id),
        ),
    ];
    for (name, path) in &pages {
        let times = time(args.runs, || async {
            let resp = client
                .get(format!("{base}{path}"))
                .header("cookie", &cookie)
                .send()
                .await?;
            anyhow::ensure!(resp.status() == 200, "{path}: {}", resp.status());
            let html = resp.text().await?;
            anyhow::ensure!(
                html.contains("big_rollout"),
                "{path}: the task is on the page"
            );
            Ok(())
        })
        .await?;
        report(name, &times);
    }
    let times = time(args.runs, || async {
        let resp = client
            .post(format!("{base}/api/task_detail"))
            .header("origin", &base)
            .header("cookie", &cookie)
            .form(&[
                ("task_id", task.id.as_str()),
                ("status", ""),
                ("offset", "0"),
            ])
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 200, "task_detail: {}", resp.status());
        resp.bytes().await?;
        Ok(())
    })
    .await?;
    report("task_detail server function (live refresh)", &times);

    let _ = stop.send(());
    server.await??;
    Ok(())
}

async fn time<F, Fut>(runs: usize, mut f: F) -> Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    f().await?; // warm-up
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f().await?;
        out.push(t.elapsed());
    }
    out.sort();
    Ok(out)
}

fn report(name: &str, times: &[Duration]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<45} median {:>7.1} ms   slowest {:>7.1} ms   ({} loads)",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1]),
        times.len()
    );
}
