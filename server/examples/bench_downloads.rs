//! Download benchmarks (`make bench`): the real `updraft` binary against nginx, same file, same certificate.
//!
//! 1. **Throughput**: one package (256 MiB by default) fetched over HTTPS with 16 parallel connections, each
//!    taking a 1/16 `Range`, from Updraft and from nginx in alternating rounds; prints the median times and
//!    the ratio (nginx time / Updraft time, so ≥ 1.0 means Updraft is at least as fast).
//! 2. **Memory**: 1 000 concurrent downloads held open (each has received its first bytes and stops
//!    reading) while the server's peak RSS (`VmHWM`) is read from `/proc`.
//!
//! Setup goes through the services (product, streamed upload, a task with one subtask per download
//! token), then `updraft serve` runs as a child process with that data directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use backend::storage::entity::{subtasks, tasks};
use clap::Parser;
use sea_orm::{ActiveModelTrait, Set};

#[derive(Parser, Debug)]
struct Args {
    /// Package size in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Parallel connections for the throughput run.
    #[arg(long, default_value_t = 16)]
    connections: u64,
    /// Rounds per server (medians are reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Concurrent downloads for the memory run.
    #[arg(long, default_value_t = 1000)]
    concurrent: usize,
    /// The `updraft` binary (default: next to this example's directory).
    #[arg(long)]
    updraft: Option<PathBuf>,
    /// Hold idle keep-alive connections (after a `/healthz` request) instead of downloads: the
    /// per-connection baseline to compare the memory figure with.
    #[arg(long)]
    idle: bool,
    /// The nginx binary.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
}

struct Killed(Child);

impl Drop for Killed {
    /// SIGTERM first (nginx's master then stops its workers, which SIGKILL would orphan), SIGKILL if it
    /// is still running after 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    let updraft = match args.updraft.clone() {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("locating the target directory")?
            .join("updraft"),
    };
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let size = args.size_mib * 1024 * 1024;

    eprintln!(
        "setting up: {} MiB package in {}",
        args.size_mib,
        data.display()
    );
    let (package_id, tokens, sha) = setup(&data, size, args.concurrent + 1).await?;

    let port = free_port()?;
    let start_updraft = || -> Result<Killed> {
        Ok(Killed(
            Command::new(&updraft)
                .arg("serve")
                .env("UPDRAFT_DATA_DIR", &data)
                .env("UPDRAFT_HTTP__LISTEN", format!("127.0.0.1:{port}"))
                .env("UPDRAFT_MQTT__ENABLED", "false")
                .env("UPDRAFT_LOG__FILTER", "warn")
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", updraft.display()))?,
        ))
    };
    let server = start_updraft()?;
    let ca = reqwest::Certificate::from_pem(&wait_for_file(&data.join("tls/ca.pem")).await?)?;
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .http1_only()
        .pool_max_idle_per_host(0)
        .build()?;
    wait_ready(&client, &format!("https://localhost:{port}/healthz")).await?;

    let nginx_port = free_port()?;
    let _nginx = start_nginx(&args.nginx, dir.path(), &data, &package_id, nginx_port)?;
    wait_ready(&client, &format!("https://localhost:{nginx_port}/healthz")).await?;

    let path = format!("/download/{package_id}/bench.bin");
    let updraft_url = format!("https://localhost:{port}{path}");
    let nginx_url = format!("https://localhost:{nginx_port}{path}");
    let token = &tokens[0];

    // Warm both (page cache, TLS session setup paths), then alternate rounds.
    fetch_parallel(
        &client,
        &updraft_url,
        token,
        size,
        args.connections,
        Some(&sha),
    )
    .await?;
    fetch_parallel(
        &client,
        &nginx_url,
        token,
        size,
        args.connections,
        Some(&sha),
    )
    .await?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let a = fetch_parallel(&client, &updraft_url, token, size, args.connections, None).await?;
        let b = fetch_parallel(&client, &nginx_url, token, size, args.connections, None).await?;
        eprintln!(
            "round {}: updraft {:.3} s ({:.0} MiB/s), nginx {:.3} s ({:.0} MiB/s)",
            round + 1,
            a.as_secs_f64(),
            mib_per_s(size, a),
            b.as_secs_f64(),
            mib_per_s(size, b)
        );
        ours.push(a);
        theirs.push(b);
    }
    let (a, b) = (median(&mut ours), median(&mut theirs));
    println!(
        "throughput: {} MiB, {} connections, {} rounds: updraft median {:.3} s ({:.0} MiB/s), nginx median {:.3} s ({:.0} MiB/s), ratio {:.2}x nginx",
        args.size_mib,
        args.connections,
        args.rounds,
        a.as_secs_f64(),
        mib_per_s(size, a),
        b.as_secs_f64(),
        mib_per_s(size, b),
        b.as_secs_f64() / a.as_secs_f64()
    );

    // Memory is measured on a fresh server, so buffers kept from the throughput run do not count.
    drop(server);
    let server = start_updraft()?;
    wait_ready(&client, &format!("https://localhost:{port}/healthz")).await?;
    let pid = server.0.id();
    let before = rss(pid, "VmRSS")?;
    let hold_url = if args.idle {
        format!("https://localhost:{port}/healthz")
    } else {
        updraft_url.clone()
    };
    let peak = hold_downloads(&hold_url, &tokens[1..], pid, &data).await?;
    println!(
        "memory: {} concurrent downloads held open: fresh server RSS {:.1} MiB before, peak (VmHWM) {:.1} MiB",
        tokens.len() - 1,
        before as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    drop(server);
    Ok(())
}

fn mib_per_s(size: u64, d: Duration) -> f64 {
    size as f64 / 1024.0 / 1024.0 / d.as_secs_f64()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Product, package (streamed from a generated file), a task with `n` subtasks and one token each.
async fn setup(data: &Path, size: u64, n: usize) -> Result<(String, Vec<String>, String)> {
    use futures::StreamExt;
    let mut settings = server::config::Settings {
        data_dir: data.to_path_buf(),
        ..Default::default()
    };
    settings.packages.max_size = size + 1;
    let (state, project) =
        server::startup::open_state(&settings, Arc::new(backend::clock::SystemClock)).await?;
    backend::service::products::create(
        &state,
        &project.id,
        backend::service::products::NewProduct {
            product_id: Some("bench".into()),
            name: "Bench".into(),
            device_type: "Bench".into(),
            protocol_type: "MQTT".into(),
            ..Default::default()
        },
    )
    .await?;
    // Pseudo-random bytes from a counter (incompressible enough, cheap to make).
    let chunks = (0..size / (1024 * 1024)).map(|i| {
        let mut buf = vec![0u8; 1024 * 1024];
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        Ok::<_, std::io::Error>(bytes::Bytes::from(buf))
    });
    let meta = domain::package::PackageMetaInput {
        package_type: "softwarePackage".into(),
        product_id: "bench".into(),
        version: "1.0".into(),
        file_name: "bench.bin".into(),
        ..Default::default()
    };
    let package = backend::service::packages::upload(
        &state,
        &project.id,
        meta,
        futures::stream::iter(chunks).boxed(),
    )
    .await?;
    let app = backend::service::projects::default_app(&state, &project.id).await?;
    let task_id = backend::ids::object_id(domain::Timestamp::from_millis(0));
    tasks::ActiveModel {
        id: Set(task_id.clone()),
        project_id: Set(project.id.clone()),
        app_id: Set(app.id),
        task_name: Set("bench".into()),
        task_type: Set("softwareUpgrade".into()),
        task_mode: Set(None),
        need_confirm: Set(false),
        task_ext_info: Set(None),
        targets_filter: Set(None),
        document: Set("{}".into()),
        package_id: Set(Some(package.id.clone())),
        schedule_time: Set(None),
        retry_count: Set(0),
        retry_interval_min: Set(0),
        status: Set("Processing".into()),
        status_desc: Set(String::new()),
        total: Set(0),
        processing: Set(0),
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
    .insert(&state.db)
    .await?;
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        let subtask = subtasks::ActiveModel {
            task_id: Set(task_id.clone()),
            device_id: Set(format!("bench-{i}")),
            status: Set("Processing".into()),
            step: Set("download".into()),
            progress: Set(0),
            attempts: Set(1),
            created_at: Set(0),
            updated_at: Set(0),
            ..Default::default()
        }
        .insert(&state.db)
        .await?;
        tokens.push(
            backend::service::downloads::issue(&state, subtask.id, &package.id)
                .await?
                .token,
        );
    }
    state.db.clone().close().await?;
    Ok((package.id, tokens, package.sha256))
}

async fn wait_for_file(path: &Path) -> Result<Vec<u8>> {
    for _ in 0..600 {
        if let Ok(b) = std::fs::read(path)
            && !b.is_empty()
        {
            return Ok(b);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{} did not appear", path.display())
}

async fn wait_ready(client: &reqwest::Client, url: &str) -> Result<()> {
    for _ in 0..600 {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} did not become ready")
}

/// nginx serving the same object with the same certificate, the way one would configure it for this.
fn start_nginx(
    nginx: &Path,
    dir: &Path,
    data: &Path,
    package_id: &str,
    port: u16,
) -> Result<Killed> {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            r#"daemon off;
user root;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {dir}/nginx-tmp;
    proxy_temp_path {dir}/nginx-tmp;
    fastcgi_temp_path {dir}/nginx-tmp;
    uwsgi_temp_path {dir}/nginx-tmp;
    scgi_temp_path {dir}/nginx-tmp;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {data}/tls/server.pem;
        ssl_certificate_key {data}/tls/server.key;
        location = /healthz {{ return 200 "ok"; }}
        location = /download/{package_id}/bench.bin {{
            default_type application/octet-stream;
            alias {data}/packages/uploads/{package_id};
        }}
    }}
}}
"#,
            dir = dir.display(),
            data = data.display(),
        ),
    )?;
    let child = Command::new(nginx)
        .args(["-c"])
        .arg(&conf)
        .args(["-p"])
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (make bench installs it)", nginx.display()))?;
    Ok(Killed(child))
}

/// Downloads `size` bytes in `n` ranges over `n` connections at once; checks the SHA-256 when given.
async fn fetch_parallel(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    size: u64,
    n: u64,
    sha: Option<&str>,
) -> Result<Duration> {
    let part = size.div_ceil(n);
    let started = Instant::now();
    let mut jobs = tokio::task::JoinSet::new();
    for i in 0..n {
        let (start, end) = (i * part, ((i + 1) * part).min(size) - 1);
        let req = client
            .get(url)
            .header("authorization", format!("Bearer {token}"))
            .header("range", format!("bytes={start}-{end}"));
        let keep = sha.is_some();
        jobs.spawn(async move {
            let mut resp = req.send().await?.error_for_status()?;
            let mut got = Vec::new();
            let mut len = 0u64;
            while let Some(chunk) = resp.chunk().await? {
                len += chunk.len() as u64;
                if keep {
                    got.extend_from_slice(&chunk);
                }
            }
            anyhow::ensure!(len == end - start + 1, "short range {start}-{end}: {len}");
            Ok::<_, anyhow::Error>((i, got))
        });
    }
    let mut parts = Vec::new();
    while let Some(r) = jobs.join_next().await {
        parts.push(r??);
    }
    let elapsed = started.elapsed();
    if let Some(sha) = sha {
        use sha2::Digest;
        parts.sort_by_key(|(i, _)| *i);
        let mut h = sha2::Sha256::new();
        for (_, p) in &parts {
            h.update(p);
        }
        anyhow::ensure!(hex::encode(h.finalize()) == sha, "{url}: SHA-256 mismatch");
    }
    Ok(elapsed)
}

fn rss(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

/// Starts one download per token, each on its own connection; once every one has its first bytes (and
/// then stops reading), samples the server's memory; then lets them all go. Returns peak RSS in KiB.
async fn hold_downloads(url: &str, tokens: &[String], pid: u32, data: &Path) -> Result<u64> {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(data.join("tls/ca.pem"))?)?;
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let release = tokio_util::sync::CancellationToken::new();
    let mut jobs = tokio::task::JoinSet::new();
    for token in tokens {
        // One client per download: its own connection, as a thousand devices would have.
        let client = reqwest::Client::builder()
            .tls_certs_only([ca.clone()])
            .http1_only()
            .build()?;
        let req = client
            .get(url)
            .header("authorization", format!("Bearer {token}"));
        let (started, release) = (started.clone(), release.clone());
        jobs.spawn(async move {
            let mut resp = req.send().await?.error_for_status()?;
            let first = resp.chunk().await?;
            anyhow::ensure!(first.is_some_and(|c| !c.is_empty()), "no first bytes");
            // (An idle run reads the whole small body so the connection returns to the pool, open.)
            while resp.content_length().is_some_and(|l| l < 1024) && resp.chunk().await?.is_some() {
            }
            started.add_permits(1);
            release.cancelled().await;
            drop(resp);
            drop(client);
            Ok::<_, anyhow::Error>(())
        });
        // Pace the handshakes a little so 1 000 connections do not trip the listen backlog.
        tokio::task::yield_now().await;
    }
    let n = u32::try_from(tokens.len())?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut peak_rss = 0;
    loop {
        let ready = started.available_permits();
        peak_rss = peak_rss.max(rss(pid, "VmRSS")?);
        if ready >= n as usize {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {n} downloads started");
        }
        if let Some(Ok(Err(e))) = jobs.try_join_next() {
            bail!("a download failed: {e:#}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // All are open and stalled: let the server settle into its steady state, sample again.
    for _ in 0..25 {
        peak_rss = peak_rss.max(rss(pid, "VmRSS")?);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let hwm = rss(pid, "VmHWM")?;
    eprintln!(
        "{} downloads open; sampled RSS max {:.1} MiB",
        n,
        peak_rss as f64 / 1024.0
    );
    release.cancel();
    while jobs.join_next().await.is_some() {}
    Ok(hwm)
}
