//! LwM2M/PCP benchmarks (`make bench-lwm2m`): Updraft and simulated NB-IoT devices (`server::sim::lwm2m`)
//! in one process but on separate runtimes (threads named `updraft-*` and `sim-*`, one worker each by
//! default, like two machines of one core), over real UDP on loopback, on the system clock. Each thread's
//! CPU time is read from `/proc/self/task/*/schedstat`, so the server's cost per segment is known apart
//! from the simulator's.
//!
//! 1. **Segments**: `--stream-devices` devices in cells roomy enough for all of them download a large
//!    package (`--stream-kib`); prints PCP segments served per second while every device downloads (each
//!    segment is a device's 0x15 notification, the platform's confirmable 0x15 write, and its ACK).
//! 2. **Blocks**: `--block-devices` devices download a `--block-kib` firmware package through the Firmware
//!    Update object, CoAP block-wise (Block2, `--block-size` bytes); prints blocks and bytes per second.
//! 3. **Campaign**: `--devices` devices in `--cells` cells with mixed coverage (cells of range 0, 1 and 2
//!    in turn: 50, 10 and 1 at a time) upgrade a `--campaign-kib` package in one task; prints the time from
//!    task creation to every subtask done, and the most devices each cell had downloading at once, next
//!    to its cap.
//!
//! The segment run is made three times: over CoAP, then over CoAPS (DTLS 1.2, PSK) with each suite IoTDA
//! serves (AES-128-CCM-8, then AES-128-CBC with HMAC-SHA256; `--suites` to choose), for the ratios in one
//! run (`--skip-dtls` skips the DTLS runs). `--rounds N` makes the three N times in turn and prints the
//! ratios' medians; `--segments-only` stops after them. Over DTLS the fleet's handshakes and
//! registrations are timed (handshakes per second), with the process's resident memory before and after
//! (an upper bound of a session's memory: both ends' sessions live in this process). `--dtls` makes the
//! block-wise and campaign runs use CoAPS too.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use backend::service::{devices, packages, products, tasks};
use bytes::Bytes;
use clap::Parser;
use server::sim::lwm2m::{Lwm2mOptions, Lwm2mStats, Radio, cell_of, run_fleet};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
struct Args {
    /// Devices in the segment run.
    #[arg(long, default_value_t = 200)]
    stream_devices: usize,
    /// Package size of the segment run, KiB.
    #[arg(long, default_value_t = 1024)]
    stream_kib: usize,
    /// Devices in the campaign.
    #[arg(long, default_value_t = 5000)]
    devices: usize,
    /// Cells in the campaign.
    #[arg(long, default_value_t = 100)]
    cells: u32,
    /// Package size of the campaign, KiB.
    #[arg(long, default_value_t = 64)]
    campaign_kib: usize,
    /// Skip the segment and block runs.
    #[arg(long)]
    campaign_only: bool,
    /// Devices in the block-wise run.
    #[arg(long, default_value_t = 200)]
    block_devices: usize,
    /// Firmware size of the block-wise run, KiB.
    #[arg(long, default_value_t = 1024)]
    block_kib: usize,
    /// The Block2 size devices ask for.
    #[arg(long, default_value_t = 1024)]
    block_size: usize,
    /// Worker threads of Updraft's runtime.
    #[arg(long, default_value_t = 1)]
    server_threads: usize,
    /// Worker threads of the simulator's runtime.
    #[arg(long, default_value_t = 1)]
    sim_threads: usize,
    /// The block-wise and campaign runs over CoAPS too (DTLS with the devices' secrets as keys).
    #[arg(long)]
    dtls: bool,
    /// Skip the segment run over DTLS (by default it follows the plain one, for comparison).
    #[arg(long)]
    skip_dtls: bool,
    /// The cipher suites of the DTLS segment runs (OpenSSL's names, comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "PSK-AES128-CCM8,PSK-AES128-CBC-SHA256"
    )]
    suites: Vec<String>,
    /// Segment runs (plain, then each suite) made this many times in turn; the ratios' medians are
    /// printed (the machine's noise shows in the spread).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Only the segment runs (no block-wise run, no campaign).
    #[arg(long)]
    segments_only: bool,
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time so far of this process's threads (ns): Updraft's (everything but the simulator) and the
/// simulator's.
fn cpu_ns() -> (u64, u64) {
    let (mut server, mut sim) = (0, 0);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (0, 0);
    };
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let ns: u64 = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        if comm.starts_with("sim-") {
            sim += ns;
        } else {
            server += ns;
        }
    }
    (server, sim)
}

struct Server {
    state: backend::AppState,
    coap: std::net::SocketAddr,
    coaps: std::net::SocketAddr,
    project: String,
    /// Fleets made so far (each gives its node ids a prefix of its own).
    fleets: std::sync::atomic::AtomicUsize,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start() -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let mut settings = server::config::Settings {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    settings.http.listen = "127.0.0.1:0".parse()?;
    settings.mqtt.enabled = false;
    settings.lwm2m.listen = "127.0.0.1:0".parse()?;
    settings.lwm2m.dtls_listen = "127.0.0.1:0".parse()?;
    settings.admin.password = Some("benchmark-password".to_owned().into());
    settings.log.filter = "warn".to_owned();
    let app = server::startup::Application::build(settings, Arc::new(backend::clock::SystemClock))
        .await?;
    let coap = app.coap_addr().context("CoAP enabled")?;
    let coaps = app.coaps_addr().context("CoAPS enabled")?;
    let state = app.state().clone();
    let project = backend::service::projects::ensure_default(&state).await?.id;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    Ok(Server {
        state,
        coap,
        coaps,
        project,
        fleets: std::sync::atomic::AtomicUsize::new(0),
        stop: Some(tx),
        task,
        _dir: dir,
    })
}

impl Server {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// A CoAP product with a package of `kib` KiB (`softwarePackage` or `firmwarePackage`) and `n`
    /// devices; returns (package, nodes).
    async fn fleet(
        &self,
        name: &str,
        package_type: &str,
        kib: usize,
        n: usize,
    ) -> Result<(String, Vec<String>)> {
        products::create(
            &self.state,
            &self.project,
            products::NewProduct {
                product_id: Some(name.into()),
                name: name.into(),
                device_type: "Meter".into(),
                protocol_type: "CoAP".into(),
                ..Default::default()
            },
        )
        .await?;
        let file: Vec<u8> = (0..kib * 1024).map(|i| (i % 251) as u8).collect();
        let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(file))]);
        let package = packages::upload(
            &self.state,
            &self.project,
            domain::package::PackageMetaInput {
                package_type: package_type.into(),
                product_id: name.into(),
                version: "V2.0".into(),
                file_name: format!("{name}.bin"),
                ..Default::default()
            },
            body,
        )
        .await?;
        // Node ids are unique across the runs (an endpoint name finds one device): a prefix per fleet,
        // then 7 digits.
        let prefix = self.fleets.fetch_add(1, Ordering::Relaxed) + 1;
        if n > 10_000_000 {
            bail!("at most 10 000 000 devices in a fleet");
        }
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let node = format!("{prefix}{i:07}");
            devices::register(
                &self.state,
                &self.project,
                devices::NewDevice {
                    product_id: name.into(),
                    node_id: node.clone(),
                    secure_access: Some(false),
                    ..Default::default()
                },
            )
            .await?;
            nodes.push(node);
        }
        Ok((package.id, nodes))
    }

    /// Where `name`'s devices connect and their keys: CoAPS with `dtls`, else CoAP.
    async fn link(
        &self,
        name: &str,
        nodes: &[String],
        dtls: bool,
    ) -> Result<(
        std::net::SocketAddr,
        Option<Arc<std::collections::HashMap<String, Vec<u8>>>>,
    )> {
        if !dtls {
            return Ok((self.coap, None));
        }
        let mut keys = std::collections::HashMap::new();
        for node in nodes {
            let secret = devices::secret(&self.state, &format!("{name}_{node}"))
                .await?
                .context("a device secret")?;
            keys.insert(
                node.clone(),
                backend::coap::psk_key(secrecy::ExposeSecret::expose_secret(&secret)),
            );
        }
        Ok((self.coaps, Some(Arc::new(keys))))
    }

    async fn task(&self, name: &str, package: &str, nodes: &[String]) -> Result<String> {
        let task_type = if name == "blocks" {
            "firmwareUpgrade"
        } else {
            "softwareUpgrade"
        };
        Ok(tasks::create(
            &self.state,
            &self.project,
            tasks::NewTask {
                task_name: name.into(),
                task_type: task_type.into(),
                package_id: package.into(),
                targets: nodes.iter().map(|n| format!("{name}_{n}")).collect(),
                ..Default::default()
            },
        )
        .await?
        .id)
    }

    async fn wait(
        &self,
        task_id: &str,
        limit: Duration,
    ) -> Result<backend::storage::entity::tasks::Model> {
        let started = Instant::now();
        loop {
            let t = tasks::get(&self.state, &self.project, task_id).await?;
            if domain::task::TaskStatus::parse(&t.status).is_ok_and(|s| s.is_completed()) {
                return Ok(t);
            }
            if started.elapsed() > limit {
                bail!(
                    "task not done after {limit:?}: {} ({})",
                    t.status,
                    t.status_desc
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn devices_fleet(
    sim: &tokio::runtime::Handle,
    coap: std::net::SocketAddr,
    nodes: Vec<String>,
    opts: Lwm2mOptions,
) -> (
    Arc<Lwm2mStats>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let stats = Arc::new(Lwm2mStats::default());
    let stop = CancellationToken::new();
    let opts = Lwm2mOptions {
        server: coap,
        ..opts
    };
    let task = sim.spawn(run_fleet(opts, nodes, stats.clone(), stop.clone()));
    (stats, stop, task)
}

/// The segment run: `args.stream_devices` devices of product `name` download the stream package, over
/// DTLS with the cipher suite `suite` (OpenSSL's name) when given; returns the segments per second.
async fn segment_run(
    server: &Server,
    sim: &tokio::runtime::Handle,
    args: &Args,
    name: &str,
    suite: Option<&str>,
) -> Result<f64> {
    let dtls = suite.is_some();
    let (package, nodes) = server
        .fleet(
            name,
            "softwarePackage",
            args.stream_kib,
            args.stream_devices,
        )
        .await?;
    // 4 cells of good coverage hold 200 devices at 50 each.
    let cells = u32::try_from(args.stream_devices.div_ceil(50)).unwrap_or(1);
    let (addr, psks) = server.link(name, &nodes, dtls).await?;
    let rss_before = rss_kib();
    let cpu_registering = cpu_ns();
    let registering = Instant::now();
    let (stats, stop, fleet) = devices_fleet(
        sim,
        addr,
        nodes.clone(),
        Lwm2mOptions {
            cells,
            retry: Duration::from_secs(2),
            psks,
            dtls_ciphers: suite.map(str::to_owned),
            ..Lwm2mOptions::default()
        },
    );
    registered(&stats, nodes.len()).await?;
    let secs = registering.elapsed().as_secs_f64();
    let cpu_registered = cpu_ns();
    println!(
        "registrations: {} devices {} in {secs:.2} s = {:.0}/s; Updraft used {:.0} µs of CPU per device",
        nodes.len(),
        suite.map_or_else(
            || "registered".to_owned(),
            |s| format!("handshook (DTLS, {s}) and registered")
        ),
        nodes.len() as f64 / secs,
        (cpu_registered.0 - cpu_registering.0) as f64 / 1e3 / nodes.len() as f64
    );
    if dtls {
        // Let the observations settle before reading the memory.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let grown = rss_kib().saturating_sub(rss_before);
        println!(
            "memory: resident memory grew {:.1} MiB with {} sessions (both ends in this process): at most {:.1} KiB per session",
            grown as f64 / 1024.0,
            nodes.len(),
            grown as f64 / nodes.len() as f64
        );
    }
    let task_id = server.task(name, &package, &nodes).await?;
    let (secs, cpu_before, cpu_after) = downloading(&stats, nodes.len(), "segment").await?;
    let segments = stats.segments.load(Ordering::Relaxed);
    println!(
        "segments{}: {} devices downloaded {} KiB each: {segments} segments in {secs:.2} s = {:.0} segments/s ({:.1} MiB/s of package data)",
        suite.map_or_else(String::new, |s| format!(" over DTLS ({s})")),
        nodes.len(),
        args.stream_kib,
        segments as f64 / secs,
        (segments as f64 * 500.0) / secs / 1_048_576.0
    );
    let server_cpu = (cpu_after.0 - cpu_before.0) as f64 / 1e9;
    let sim_cpu = (cpu_after.1 - cpu_before.1) as f64 / 1e9;
    println!(
        "segments: Updraft used {server_cpu:.2} CPU-s ({:.1} µs per segment = {:.0} segments per CPU-second), the simulator {sim_cpu:.2} CPU-s ({:.1} µs per segment)",
        server_cpu * 1e6 / segments as f64,
        segments as f64 / server_cpu,
        sim_cpu * 1e6 / segments as f64,
    );
    let t = server.wait(&task_id, Duration::from_secs(120)).await?;
    println!("segment run task: {} ({})", t.status, t.status_desc);
    stop.cancel();
    let _ = fleet.await;
    Ok(segments as f64 / secs)
}

/// Waits until `devices` registered (2 min at most).
async fn registered(stats: &Lwm2mStats, devices: usize) -> Result<()> {
    let started = Instant::now();
    while stats.registered.load(Ordering::Relaxed) < devices as u64 {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {} of {devices} devices registered",
                stats.registered.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Waits from the fleet's first segment (or block) to its last download; returns the seconds taken and
/// the CPU times (`cpu_ns`) at both ends.
async fn downloading(
    stats: &Lwm2mStats,
    devices: usize,
    run: &str,
) -> Result<(f64, (u64, u64), (u64, u64))> {
    while stats.segments.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = Instant::now();
    let cpu_before = cpu_ns();
    while stats.downloads.load(Ordering::Relaxed) < devices as u64 {
        if first.elapsed() > Duration::from_secs(600) {
            bail!("{run} run did not finish");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((first.elapsed().as_secs_f64(), cpu_before, cpu_ns()))
}

/// The segment runs, `args.rounds` times: plain, then over DTLS with each suite; prints each round's
/// DTLS figures as a share of the plain one of the same round, and their medians.
async fn segment_runs(server: &Server, sim: &tokio::runtime::Handle, args: &Args) -> Result<()> {
    let suites: &[String] = if args.skip_dtls { &[] } else { &args.suites };
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); suites.len()];
    for round in 1..=args.rounds.max(1) {
        let plain = segment_run(server, sim, args, &format!("stream{round}"), None).await?;
        let mut line = Vec::new();
        for (k, suite) in suites.iter().enumerate() {
            // Updraft prefers the first of IoTDA's suites when a device offers both.
            let name = format!("stream{round}s{k}");
            let secure = segment_run(server, sim, args, &name, Some(suite)).await?;
            ratios[k].push(secure / plain);
            line.push(format!(
                "{suite} {secure:.0}/s = {:.0} %",
                secure * 100.0 / plain
            ));
        }
        if !suites.is_empty() {
            println!(
                "segments over DTLS (round {round}): {} of plain ({plain:.0}/s)",
                line.join(", ")
            );
        }
    }
    if args.rounds > 1 {
        for (suite, mut r) in suites.iter().zip(ratios) {
            r.sort_by(f64::total_cmp);
            let shown: Vec<String> = r.iter().map(|x| format!("{:.0}", x * 100.0)).collect();
            let n = r.len();
            let median = f64::midpoint(r[(n - 1) / 2], r[n / 2]);
            println!(
                "segments over DTLS ({suite}): median {:.0} % of plain over {n} rounds ({} %)",
                median * 100.0,
                shown.join(", ")
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let sim = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.sim_threads.max(1))
        .thread_name("sim-worker")
        .enable_all()
        .build()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.server_threads.max(1))
        .thread_name("updraft-worker")
        .enable_all()
        .build()?
        .block_on(run(args, sim.handle().clone()))
}

async fn run(args: Args, sim: tokio::runtime::Handle) -> Result<()> {
    let server = start().await?;

    if !args.campaign_only {
        segment_runs(&server, &sim, &args).await?;
        if args.segments_only {
            server.stop().await;
            return Ok(());
        }
    }

    if !args.campaign_only {
        let (package, nodes) = server
            .fleet(
                "blocks",
                "firmwarePackage",
                args.block_kib,
                args.block_devices,
            )
            .await?;
        let cells = u32::try_from(args.block_devices.div_ceil(50)).unwrap_or(1);
        let (addr, psks) = server.link("blocks", &nodes, args.dtls).await?;
        let (stats, stop, fleet) = devices_fleet(
            &sim,
            addr,
            nodes.clone(),
            Lwm2mOptions {
                cells,
                retry: Duration::from_secs(2),
                block_size: args.block_size,
                psks,
                ..Lwm2mOptions::default()
            },
        );
        registered(&stats, nodes.len()).await?;
        let task_id = server.task("blocks", &package, &nodes).await?;
        let (secs, cpu_before, cpu_after) = downloading(&stats, nodes.len(), "block-wise").await?;
        let blocks = stats.segments.load(Ordering::Relaxed);
        let bytes = (args.block_kib * 1024 * nodes.len()) as f64;
        println!(
            "blocks: {} devices downloaded {} KiB each in {}-byte blocks: {blocks} blocks in {secs:.2} s = {:.0} blocks/s, {:.1} MiB/s",
            nodes.len(),
            args.block_kib,
            args.block_size,
            blocks as f64 / secs,
            bytes / secs / 1_048_576.0
        );
        let server_cpu = (cpu_after.0 - cpu_before.0) as f64 / 1e9;
        println!(
            "blocks: Updraft used {server_cpu:.2} CPU-s ({:.1} µs per block), the simulator {:.2} CPU-s",
            server_cpu * 1e6 / blocks as f64,
            (cpu_after.1 - cpu_before.1) as f64 / 1e9,
        );
        let t = server.wait(&task_id, Duration::from_secs(120)).await?;
        println!("block-wise run task: {} ({})", t.status, t.status_desc);
        stop.cancel();
        let _ = fleet.await;
    }

    let (package, nodes) = server
        .fleet(
            "campaign",
            "softwarePackage",
            args.campaign_kib,
            args.devices,
        )
        .await?;
    let (addr, psks) = server.link("campaign", &nodes, args.dtls).await?;
    let (stats, stop, fleet) = devices_fleet(
        &sim,
        addr,
        nodes.clone(),
        Lwm2mOptions {
            cells: args.cells,
            radio: Radio::Mixed,
            retry: Duration::from_secs(2),
            psks,
            ..Lwm2mOptions::default()
        },
    );
    // Let the fleet register first, as a deployed fleet would be.
    let registering = Instant::now();
    while stats.registered.load(Ordering::Relaxed) < nodes.len() as u64 {
        if registering.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {} of {} devices registered",
                stats.registered.load(Ordering::Relaxed),
                nodes.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let task_id = server.task("campaign", &package, &nodes).await?;
    let t = server.wait(&task_id, Duration::from_secs(3600)).await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "campaign: {} devices in {} cells, {} KiB: {} in {secs:.1} s ({})",
        nodes.len(),
        args.cells,
        args.campaign_kib,
        t.status,
        t.status_desc
    );
    stop.cancel();
    let _ = fleet.await;
    // Caps of the default coverage settings: cells 1000 + c, coverage by c % 3 (Radio::Mixed).
    let coverage = domain::flow::lwm2m::Coverage::default();
    let peaks = stats.peaks();
    let mut over = Vec::new();
    let mut by_cap: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
    for i in 0..nodes.len() {
        let cell = cell_of(i, args.cells);
        let cap = coverage.caps[(cell % 3) as usize];
        let peak = peaks.get(&cell).copied().unwrap_or(0);
        let seen = by_cap.entry(cap).or_default();
        *seen = (*seen).max(peak);
        if peak > cap as usize {
            over.push((cell, peak, cap));
        }
    }
    for (cap, peak) in &by_cap {
        println!("cells capped at {cap}: most downloading at once in one cell {peak}");
    }
    over.sort_unstable();
    over.dedup();
    server.stop().await;
    if over.is_empty() {
        println!("no cell exceeded its cap");
        Ok(())
    } else {
        bail!("cells over their cap (cell, peak, cap): {over:?}")
    }
}
