//! Several instances on one PostgreSQL: two `Application`s in this process share a database, a package
//! directory, TLS material and a clock, behind a small TCP round-robin balancer (the stand-in for
//! HAProxy: it spreads connections and moves a device to a live instance when its own dies). The tests
//! need `UPDRAFT_TEST_POSTGRES_URL` (CI sets it, and `UPDRAFT_REQUIRE_POSTGRES=1` makes its absence a
//! failure); each gets a fresh database.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backend::clock::ManualClock;
use backend::service::tasks;
use backend::storage::entity::{subtask_steps, subtasks};
use domain::Timestamp;
use sea_orm::{ColumnTrait, ConnectionTrait, Database, EntityTrait, QueryFilter};
use server::config::Settings;
use server::sim::SimOptions;
use server::sim::lwm2m::{Lwm2mOptions, Lwm2mStats, Radio};
use tokio_util::sync::CancellationToken;

use crate::helpers::{START, TestApp, settings_for, spawn_on_clock};
use crate::robustness::{free_port, succeeded};

/// A fresh PostgreSQL database, dropped by [`Pg::drop_database`].
struct Pg {
    admin_url: String,
    name: String,
    url: String,
}

impl Pg {
    /// `None` (the test is skipped, loudly) without `UPDRAFT_TEST_POSTGRES_URL`, unless PostgreSQL is
    /// required.
    async fn create() -> Option<Self> {
        let Ok(admin_url) = std::env::var("UPDRAFT_TEST_POSTGRES_URL") else {
            assert_ne!(
                std::env::var("UPDRAFT_REQUIRE_POSTGRES").as_deref(),
                Ok("1"),
                "UPDRAFT_REQUIRE_POSTGRES=1 but UPDRAFT_TEST_POSTGRES_URL is not set"
            );
            eprintln!("skipped: the cluster tests need UPDRAFT_TEST_POSTGRES_URL");
            return None;
        };
        let name = format!("updraft_cluster_{}", backend::ids::hex32());
        let admin = Database::connect(&admin_url).await.expect("postgres");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        admin.close().await.ok();
        let (base, _) = admin_url.rsplit_once('/').expect("a database path");
        let url = format!("{base}/{name}");
        Some(Self {
            admin_url,
            name,
            url,
        })
    }

    async fn drop_database(self) {
        let admin = Database::connect(&self.admin_url).await.expect("postgres");
        // A backend of another role on it (autovacuum) can make FORCE fail for a moment.
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let mut tries = 0;
        while let Err(e) = admin.execute_unprepared(&drop).await {
            tries += 1;
            assert!(tries < 20, "drop test database: {e}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        admin.close().await.ok();
    }
}

/// A TCP round-robin balancer: each connection goes to the next backend that accepts it.
struct Balancer {
    addr: SocketAddr,
    stop: CancellationToken,
    /// Connections forwarded per backend.
    per_backend: Arc<Vec<AtomicUsize>>,
}

impl Balancer {
    /// Listens on `port` (0: any) of 127.0.0.1.
    async fn start(port: u16, backends: Vec<SocketAddr>) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let per_backend: Arc<Vec<AtomicUsize>> =
            Arc::new(backends.iter().map(|_| AtomicUsize::new(0)).collect());
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn({
            let (stop, per_backend) = (stop.clone(), Arc::clone(&per_backend));
            async move {
                loop {
                    let mut client = tokio::select! {
                        () = stop.cancelled() => return,
                        a = listener.accept() => match a {
                            Ok((c, _)) => c,
                            Err(_) => continue,
                        },
                    };
                    let (backends, next, per_backend, stop) = (
                        backends.clone(),
                        next.clone(),
                        Arc::clone(&per_backend),
                        stop.clone(),
                    );
                    tokio::spawn(async move {
                        let first = next.fetch_add(1, Ordering::Relaxed);
                        for i in 0..backends.len() {
                            let n = (first + i) % backends.len();
                            if let Ok(mut server) =
                                tokio::net::TcpStream::connect(backends[n]).await
                            {
                                per_backend[n].fetch_add(1, Ordering::Relaxed);
                                tokio::select! {
                                    () = stop.cancelled() => {}
                                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                                }
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self {
            addr,
            stop,
            per_backend,
        }
    }

    fn forwarded(&self) -> Vec<usize> {
        self.per_backend
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Two instances, `a` and `b`, on `pg`, sharing `dir` (packages, TLS, secret key) and `clock`. Downloads
/// are advertised at `download_port` (the HTTPS balancer).
struct Pair {
    a: TestApp,
    b: TestApp,
    clock: ManualClock,
}

fn instance_settings(dir: &std::path::Path, pg: &Pg, id: &str, download_port: u16) -> Settings {
    let mut s = settings_for(dir);
    // Trusts the notification receiver's certificate, when a test wrote it.
    let receiver_ca = dir.join("receiver-ca.pem");
    s.notifications.extra_ca = receiver_ca.exists().then_some(receiver_ca);
    s.database.url = Some(pg.url.clone().into());
    s.cluster.instance_id = Some(id.to_owned());
    // Real time between beats; the lease is judged on the shared manual clock.
    s.cluster.heartbeat = Duration::from_millis(100);
    s.downloads.public_url = Some(format!("https://localhost:{download_port}"));
    s
}

async fn pair(dir: &std::path::Path, pg: &Pg, download_port: u16) -> Pair {
    let clock = ManualClock::new(Timestamp::from_millis(START));
    // One after the other: the first creates the TLS material and secret key the second loads.
    let a = spawn_on_clock(
        instance_settings(dir, pg, "a", download_port),
        clock.clone(),
    )
    .await;
    let b = spawn_on_clock(
        instance_settings(dir, pg, "b", download_port),
        clock.clone(),
    )
    .await;
    Pair { a, b, clock }
}

/// Polls (real time, bounded) until every subtask of the task is final; returns the rows.
async fn all_final(app: &TestApp, task_id: &str, limit: Duration) -> Vec<subtasks::Model> {
    let started = std::time::Instant::now();
    loop {
        let rows = subtasks::Entity::find()
            .filter(subtasks::Column::TaskId.eq(task_id))
            .all(&app.state.db)
            .await
            .unwrap();
        let open = rows
            .iter()
            .filter(|s| !matches!(s.status.as_str(), "Success" | "Fail" | "Stopped"))
            .count();
        if open == 0 {
            return rows;
        }
        if started.elapsed() >= limit {
            let slots = backend::storage::entity::download_slots::Entity::find()
                .all(&app.state.db)
                .await
                .unwrap();
            panic!(
                "{open} subtasks still open after {limit:?}: {:#?}\nslots: {slots:#?}",
                rows.iter()
                    .filter(|s| s.status != "Success")
                    .map(|s| (&s.device_id, &s.step, &s.lease_owner, &s.deadline_at))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each subtask's history reached `Success` once.
async fn successes_per_subtask(app: &TestApp, rows: &[subtasks::Model]) -> Vec<usize> {
    let history = subtask_steps::Entity::find()
        .filter(subtask_steps::Column::SubtaskId.is_in(rows.iter().map(|r| r.id)))
        .filter(subtask_steps::Column::Status.eq("Success"))
        .all(&app.state.db)
        .await
        .unwrap();
    rows.iter()
        .map(|r| history.iter().filter(|h| h.subtask_id == r.id).count())
        .collect()
}

/// 200 MQTT devices through the balancer, spread over two instances, one task: every subtask succeeds
/// once; then the same with one instance killed mid-campaign, its devices moving to the survivor.
#[tokio::test]
async fn two_instances_drive_one_mqtt_campaign_and_the_survivor_finishes_after_a_kill() {
    const DEVICES: usize = 200;
    for kill in [false, true] {
        let Some(pg) = Pg::create().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        // Both instances send notifications, to one receiver.
        let (hook, received, hook_ca) = crate::notifications::receiver().await;
        std::fs::write(dir.path().join("receiver-ca.pem"), &hook_ca).unwrap();
        // The HTTPS balancer's port is chosen before the instances start, since they advertise it.
        let https_port = free_port();
        let Pair { a, b, clock } = pair(dir.path(), &pg, https_port).await;
        let https = Balancer::start(https_port, vec![https_addr(&a), https_addr(&b)]).await;
        let mqtt = Balancer::start(0, vec![a.mqtt, b.mqtt]).await;
        let fx = crate::tasks::fixture(&a).await;
        let mut devs = Vec::new();
        let prefix = if kill { "k" } else { "n" };
        for n in 0..DEVICES {
            devs.push(crate::tasks::register(&a, &fx, &format!("{prefix}-{n:03}")).await);
        }
        let fleet = crate::tasks::fleet_at(&a, mqtt.addr, devs.clone(), SimOptions::default());
        for _ in 0..1500 {
            if fleet.stats.connected.load(Ordering::Relaxed) as usize == DEVICES {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            fleet.stats.connected.load(Ordering::Relaxed) as usize,
            DEVICES
        );
        let spread = mqtt.forwarded();
        assert!(
            spread.iter().all(|n| *n >= DEVICES / 3),
            "devices are spread over both instances: {spread:?}"
        );
        backend::service::subscriptions::create(
            &a.state,
            &fx.project,
            "batchtask",
            "update",
            &format!("https://localhost:{}/hook", hook.port()),
        )
        .await
        .unwrap();
        // The task is created on B, while most devices' connections are elsewhere half the time.
        let task = tasks::create(
            &b.state,
            &fx.project,
            crate::tasks::new_task(&fx, "cluster", &devs.iter().collect::<Vec<_>>()),
        )
        .await
        .unwrap();
        let (survivor, other) = if kill {
            for _ in 0..500 {
                if succeeded(&b, &task.id).await >= DEVICES / 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let done = succeeded(&b, &task.id).await;
            assert!(
                done < DEVICES,
                "the kill interrupts the campaign ({done} done)"
            );
            a.kill().await;
            // The lease (15 s) runs out on the shared clock; B's next beat takes A's subtasks over.
            // (45 s: also past the claim of a notification A may have been sending when it died.)
            clock.advance(Duration::from_secs(45));
            b.state.driver.kick();
            (b, None)
        } else {
            (b, Some(a))
        };
        let rows = all_final(&survivor, &task.id, Duration::from_secs(120)).await;
        let ok = rows.iter().filter(|s| s.status == "Success").count();
        assert_eq!(ok, DEVICES, "kill={kill}: every device succeeded");
        assert!(
            successes_per_subtask(&survivor, &rows)
                .await
                .iter()
                .all(|n| *n == 1),
            "kill={kill}: each subtask succeeded once"
        );
        let stats = &fleet.stats;
        assert_eq!(stats.failed.load(Ordering::Relaxed), 0, "kill={kill}");
        assert_eq!(
            stats.repeated.load(Ordering::Relaxed),
            0,
            "kill={kill}: no device was asked to install what it had installed"
        );
        if !kill {
            assert_eq!(
                stats.upgrades.load(Ordering::Relaxed) as usize,
                DEVICES,
                "one upgrade event per device: no subtask was driven by both instances"
            );
        }
        let t = tasks::get(&survivor.state, &fx.project, &task.id)
            .await
            .unwrap();
        assert_eq!(t.status, "Success");
        assert_eq!(
            (t.total, t.success, t.processing, t.fail, t.waitting),
            (DEVICES as i64, DEVICES as i64, 0, 0, 0),
            "kill={kill}: counters equal rows"
        );
        // Every notification was sent, by one instance or the other, once.
        let deliveries = || async {
            backend::storage::entity::notification_deliveries::Entity::find()
                .all(&survivor.state.db)
                .await
                .unwrap()
        };
        for _ in 0..600 {
            if deliveries().await.iter().all(|d| d.status != "pending") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rows = deliveries().await;
        assert!(
            rows.iter().all(|d| d.status == "delivered"),
            "kill={kill}: {:?}",
            rows.iter()
                .filter(|d| d.status != "delivered")
                .collect::<Vec<_>>()
        );
        let mut sent: Vec<String> = received
            .accepted_raw()
            .iter()
            .map(|(h, _)| h["x-updraft-delivery"].to_str().unwrap().to_owned())
            .collect();
        let posts = sent.len();
        sent.sort();
        sent.dedup();
        if !kill {
            // (A kill may cut an attempt after the receiver took it: at least once, then.)
            assert_eq!(posts, sent.len(), "no delivery was sent twice");
        }
        assert_eq!(
            sent.len(),
            rows.len(),
            "kill={kill}: every delivery arrived"
        );
        if let Some(a) = other {
            // The other instance's view is the same.
            let seen_by_a = tasks::get(&a.state, &fx.project, &task.id).await.unwrap();
            assert_eq!((seen_by_a.status, seen_by_a.success), (t.status, t.success));
            a.stop().await;
        }
        fleet.stop().await;
        drop((https, mqtt));
        survivor.stop().await;
        pg.drop_database().await;
    }
}

/// The HTTPS address of `app` (its base URL names localhost).
fn https_addr(app: &TestApp) -> SocketAddr {
    let port: u16 = app
        .base
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap();
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// LwM2M devices of two cells with poor coverage (cap 1 per cell), registered half with each instance:
/// no cell ever has more than one device downloading, across both.
#[tokio::test]
async fn per_cell_caps_hold_across_instances() {
    let Some(pg) = Pg::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Pair { a, b, clock: _ } = pair(dir.path(), &pg, free_port()).await;
    let (fx, nodes) = crate::lwm2m::fixture(&a, 8).await;
    let stats = Arc::new(Lwm2mStats::default());
    let stop = CancellationToken::new();
    let mut fleets = Vec::new();
    for (app, half) in [(&a, &nodes[..4]), (&b, &nodes[4..])] {
        let opts = Lwm2mOptions {
            server: app.coap,
            retry: Duration::from_millis(300),
            cells: 2,
            radio: Radio::Poor,
            segment_delay: Duration::from_millis(2),
            ..Lwm2mOptions::default()
        };
        fleets.push(tokio::spawn(server::sim::lwm2m::run_fleet(
            opts,
            half.to_vec(),
            stats.clone(),
            stop.clone(),
        )));
    }
    let task = tasks::create(
        &a.state,
        &fx.project,
        tasks::NewTask {
            task_name: "pcp".into(),
            task_type: "softwareUpgrade".into(),
            package_id: fx.package.clone(),
            targets: nodes.iter().map(|n| format!("nb-meter_{n}")).collect(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let rows = all_final(&b, &task.id, Duration::from_secs(90)).await;
    assert!(
        rows.iter().all(|r| r.status == "Success"),
        "{:#?}",
        rows.iter()
            .filter(|r| r.status != "Success")
            .collect::<Vec<_>>()
    );
    let peaks = stats.peaks();
    assert_eq!(peaks.len(), 2, "{peaks:?}");
    assert!(
        peaks.values().all(|p| *p == 1),
        "cap 1 per cell across both instances: {peaks:?}"
    );
    assert!(
        stats
            .images
            .lock()
            .unwrap()
            .values()
            .all(|sha| *sha == fx.sha256),
        "every image is whole"
    );
    stop.cancel();
    for f in fleets {
        let _ = f.await;
    }
    a.stop().await;
    b.stop().await;
    pg.drop_database().await;
}
