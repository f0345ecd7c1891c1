//! Repository and service tests, run on a real SQLite file always and on PostgreSQL when
//! `UPDRAFT_TEST_POSTGRES_URL` is set (each test gets its own fresh database there). CI sets
//! `UPDRAFT_REQUIRE_POSTGRES=1`, which turns a missing PostgreSQL into a failure instead of a skip.

use std::sync::Arc;
use std::time::Duration;

use backend::clock::ManualClock;
use backend::objects::{PackageStore, StoreLocation, StoreSettings};
use backend::secrets::Sealer;
use backend::service::auth::{self, AdminBootstrap};
use backend::service::{Page, devices, groups, products, projects};
use backend::storage::entity::{self as e, *};
use backend::{AppState, Error};
use domain::Timestamp;
use migrations::{Migrator, MigratorTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, Database, DatabaseConnection, EntityTrait,
    ModelTrait, QueryFilter, Set, Statement,
};
use secrecy::{ExposeSecret, SecretString};

const START: i64 = 1_795_000_000_000; // 2026-11-17

/// One database under test, with services on a manual clock.
struct TestDb {
    kind: &'static str,
    state: AppState,
    clock: ManualClock,
    _dir: tempfile::TempDir,
    drop_pg: Option<(String, String)>,
}

impl TestDb {
    async fn cleanup(self) {
        self.state.db.clone().close().await.ok();
        if let Some((admin_url, name)) = self.drop_pg {
            let admin = Database::connect(&admin_url)
                .await
                .expect("postgres admin connection");
            // A backend of another role on it (autovacuum) can make FORCE fail for a moment.
            let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            let mut tries = 0;
            while let Err(e) = admin.execute_unprepared(&drop).await {
                tries += 1;
                assert!(tries < 20, "drop test db: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            admin.close().await.ok();
        }
    }
}

async fn state_on(db: DatabaseConnection, dir: &tempfile::TempDir) -> (AppState, ManualClock) {
    Migrator::up(&db, None).await.expect("migrations apply");
    let clock = ManualClock::new(Timestamp::from_millis(START));
    let sealer = Sealer::load_or_create(&dir.path().join("secret.key")).expect("secret key");
    let store = PackageStore::open(&StoreSettings {
        bucket: "updraft".into(),
        location: StoreLocation::Local {
            dir: dir.path().join("packages"),
        },
        max_package_size: 64 * 1024 * 1024,
        offload: false,
        max_open_files: 64,
        bucket_aliases: Vec::new(),
    })
    .expect("package store");
    let state = AppState::new(
        db,
        Arc::new(clock.clone()),
        Arc::new(sealer),
        store,
        Default::default(),
    );
    (state, clock)
}

/// Every database this run tests against.
async fn databases() -> Vec<TestDb> {
    let mut out = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("updraft.db").display()
    );
    let db = backend::db::connect(&url).await.expect("sqlite connects");
    let (state, clock) = state_on(db, &dir).await;
    out.push(TestDb {
        kind: "sqlite",
        state,
        clock,
        _dir: dir,
        drop_pg: None,
    });

    match std::env::var("UPDRAFT_TEST_POSTGRES_URL") {
        Ok(admin_url) => {
            let name = format!("updraft_test_{}", backend::ids::hex32());
            let admin = Database::connect(&admin_url)
                .await
                .expect("UPDRAFT_TEST_POSTGRES_URL connects");
            admin
                .execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create test database");
            admin.close().await.ok();
            let (base, _) = admin_url
                .rsplit_once('/')
                .expect("postgres URL has a database path");
            let db = backend::db::connect(&format!("{base}/{name}"))
                .await
                .expect("test database connects");
            let dir = tempfile::tempdir().unwrap();
            let (state, clock) = state_on(db, &dir).await;
            out.push(TestDb {
                kind: "postgres",
                state,
                clock,
                _dir: dir,
                drop_pg: Some((admin_url, name)),
            });
        }
        Err(_) if std::env::var("UPDRAFT_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!("UPDRAFT_REQUIRE_POSTGRES=1 but UPDRAFT_TEST_POSTGRES_URL is not set")
        }
        Err(_) => {}
    }
    out
}

async fn mqtt_product(t: &TestDb, project: &str) -> e::products::Model {
    products::create(
        &t.state,
        project,
        products::NewProduct {
            product_id: Some("meter".into()),
            name: "Water meter".into(),
            device_type: "WaterMeter".into(),
            protocol_type: "MQTT".into(),
            ..Default::default()
        },
    )
    .await
    .expect("product created")
}

#[tokio::test]
async fn migrations_roll_back_and_apply_again() {
    for t in databases().await {
        Migrator::down(&t.state.db, None)
            .await
            .unwrap_or_else(|e| panic!("{}: down: {e}", t.kind));
        Migrator::up(&t.state.db, None)
            .await
            .unwrap_or_else(|e| panic!("{}: up again: {e}", t.kind));
        assert!(
            projects::ensure_default(&t.state).await.is_ok(),
            "{}",
            t.kind
        );
        t.cleanup().await;
    }
}

#[tokio::test]
async fn sqlite_runs_in_wal_mode_with_foreign_keys() {
    let t = databases().await.into_iter().next().unwrap();
    let db = &t.state.db;
    let mode = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "PRAGMA journal_mode",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        mode.try_get_by_index::<String>(0).unwrap().to_lowercase(),
        "wal"
    );
    let fk = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "PRAGMA foreign_keys",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fk.try_get_by_index::<i32>(0).unwrap(), 1);
    t.cleanup().await;
}

#[tokio::test]
async fn the_whole_model_round_trips_and_cascades() {
    for t in databases().await {
        let kind = t.kind;
        let db = &t.state.db;
        let now = START;
        let project = projects::ensure_default(&t.state).await.unwrap();
        let product = mqtt_product(&t, &project.id).await;
        let registered = devices::register(
            &t.state,
            &project.id,
            devices::NewDevice {
                product_id: product.id.clone(),
                node_id: "node1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let device = registered.device;
        let group = groups::create(&t.state, &project.id, "north", "north wing")
            .await
            .unwrap();
        groups::add_device(&t.state, &project.id, &group.id, &device.id)
            .await
            .unwrap();
        groups::add_device(&t.state, &project.id, &group.id, &device.id)
            .await
            .expect("adding twice is harmless");
        let listed = groups::list(&t.state, &project.id, Page::default())
            .await
            .unwrap();
        assert_eq!(
            listed.items[0].members, 1,
            "{kind}: member counts come from one grouped query"
        );
        let products_listed = products::list(&t.state, &project.id, Page::default())
            .await
            .unwrap();
        assert_eq!(products_listed.items[0].devices, 1, "{kind}");

        let package = packages::ActiveModel {
            id: Set("pkg00000000000000000001".into()),
            project_id: Set(project.id.clone()),
            app_id: Set(product.app_id.clone()),
            product_id: Set(product.id.clone()),
            package_type: Set("softwarePackage".into()),
            module_name: Set(None),
            version: Set("2.0.0".into()),
            support_source_versions: Set(r#"["1.0.0"]"#.into()),
            description: Set(String::new()),
            custom_info: Set(String::new()),
            file_name: Set("app-2.0.0.bin".into()),
            size: Set(65_536),
            sha256: Set("ab".repeat(32)),
            source: Set("upload".into()),
            bucket: Set("updraft".into()),
            object_key: Set("meter/app-2.0.0.bin".into()),
            region: Set(None),
            segment_size: Set(500),
            created_at: Set(now),
        }
        .insert(db)
        .await
        .unwrap_or_else(|e| panic!("{kind}: package: {e}"));
        let task = tasks::ActiveModel {
            id: Set("0123456789abcdef01234567".into()),
            project_id: Set(project.id.clone()),
            app_id: Set(product.app_id.clone()),
            task_name: Set("upgrade_north".into()),
            task_type: Set("softwareUpgrade".into()),
            task_mode: Set(None),
            need_confirm: Set(false),
            task_ext_info: Set(None),
            targets_filter: Set(Some(format!(r#"{{"group_ids":["{}"]}}"#, group.id))),
            document: Set(format!(r#"{{"package_ids":["{}"]}}"#, package.id)),
            package_id: Set(Some(package.id.clone())),
            schedule_time: Set(None),
            retry_count: Set(2),
            retry_interval_min: Set(5),
            status: Set("Processing".into()),
            status_desc: Set(String::new()),
            total: Set(1),
            processing: Set(1),
            success: Set(0),
            fail: Set(0),
            waitting: Set(0),
            fail_wait_retry: Set(0),
            stopped: Set(0),
            removed: Set(0),
            created_at: Set(now),
            started_at: Set(Some(now)),
            finished_at: Set(None),
            updated_at: Set(now),
            claimed_by: Set(None),
            request_id: Set(None),
            rollout: Set(None),
            rollout_state: Set(None),
            rollout_wake_at: Set(None),
        }
        .insert(db)
        .await
        .unwrap_or_else(|e| panic!("{kind}: task: {e}"));
        let subtask = subtasks::ActiveModel {
            task_id: Set(task.id.clone()),
            device_id: Set(device.id.clone()),
            status: Set("Processing".into()),
            step: Set("Downloading".into()),
            progress: Set(40),
            attempts: Set(1),
            deadline_at: Set(Some(now + 86_400_000)),
            created_at: Set(now),
            updated_at: Set(now),
            ..Default::default()
        }
        .insert(db)
        .await
        .unwrap_or_else(|e| panic!("{kind}: subtask: {e}"));
        subtask_steps::ActiveModel {
            subtask_id: Set(subtask.id),
            at: Set(now),
            step: Set("VersionQuery".into()),
            status: Set("Processing".into()),
            progress: Set(0),
            detail: Set("sent version_query".into()),
            ..Default::default()
        }
        .insert(db)
        .await
        .unwrap();
        download_tokens::ActiveModel {
            token_hash: Set(backend::ids::sha256_hex("token")),
            subtask_id: Set(subtask.id),
            device_id: Set(device.id.clone()),
            package_id: Set(package.id.clone()),
            issued_at: Set(now),
            expires_at: Set(now + 86_400_000),
            revoked_at: Set(None),
            bytes_served: Set(0),
            last_used_at: Set(None),
        }
        .insert(db)
        .await
        .unwrap();
        let sub = notification_subscriptions::ActiveModel {
            id: Set("sub1".into()),
            project_id: Set(project.id.clone()),
            app_id: Set(None),
            url: Set("https://app.example/hook".into()),
            secret_enc: Set(t.state.sealer.seal("sub1", "hook-secret")),
            kinds: Set(r#"["batchtask.update"]"#.into()),
            enabled: Set(true),
            created_at: Set(now),
            updated_at: Set(now),
            rule_id: Set(None),
        }
        .insert(db)
        .await
        .unwrap();
        let event = outbox::ActiveModel {
            project_id: Set(project.id.clone()),
            kind: Set("batchtask.update".into()),
            aggregate_id: Set(task.id.clone()),
            payload: Set(r#"{"status":"Processing"}"#.into()),
            created_at: Set(now),
            ..Default::default()
        }
        .insert(db)
        .await
        .unwrap();
        notification_deliveries::ActiveModel {
            outbox_id: Set(event.id),
            subscription_id: Set(sub.id.clone()),
            status: Set("pending".into()),
            attempts: Set(0),
            next_attempt_at: Set(now),
            created_at: Set(now),
            ..Default::default()
        }
        .insert(db)
        .await
        .unwrap();
        api_credentials::ActiveModel {
            access_key: Set("AKUPDRAFTTEST0000001".into()),
            project_id: Set(project.id.clone()),
            secret_key_enc: Set(t.state.sealer.seal("AKUPDRAFTTEST0000001", "sk")),
            description: Set("ci".into()),
            created_at: Set(now),
            last_used_at: Set(None),
            revoked_at: Set(None),
        }
        .insert(db)
        .await
        .unwrap();

        // A product still used by devices cannot go (restrict). (A package used by a task may go once the
        // task is finished, leaving the task's history with a null package: the packages service decides.)
        assert!(
            product.clone().delete(db).await.is_err(),
            "{kind}: product delete must be refused"
        );

        // Deleting the task takes its subtasks, their history and their tokens with it.
        task.delete(db)
            .await
            .unwrap_or_else(|e| panic!("{kind}: task delete: {e}"));
        assert_eq!(
            subtasks::Entity::find().all(db).await.unwrap().len(),
            0,
            "{kind}"
        );
        assert_eq!(
            subtask_steps::Entity::find().all(db).await.unwrap().len(),
            0,
            "{kind}"
        );
        assert_eq!(
            download_tokens::Entity::find().all(db).await.unwrap().len(),
            0,
            "{kind}"
        );
        // Deleting a device removes its group memberships.
        e::devices::Entity::delete_by_id(device.id.clone())
            .exec(db)
            .await
            .unwrap();
        assert_eq!(
            device_group_members::Entity::find()
                .all(db)
                .await
                .unwrap()
                .len(),
            0,
            "{kind}"
        );
        t.cleanup().await;
    }
}

#[tokio::test]
async fn device_secrets_are_stored_sealed_and_open_with_the_key() {
    for t in databases().await {
        let project = projects::ensure_default(&t.state).await.unwrap();
        mqtt_product(&t, &project.id).await;
        let r = devices::register(
            &t.state,
            &project.id,
            devices::NewDevice {
                product_id: "meter".into(),
                node_id: "n-42".into(),
                secret: Some(SecretString::from("plain-secret-123".to_owned())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(r.device.id, "meter_n-42");
        let stored = e::devices::Entity::find_by_id("meter_n-42".to_owned())
            .one(&t.state.db)
            .await
            .unwrap()
            .unwrap();
        let sealed = stored.secret_enc.clone().unwrap();
        assert!(
            !sealed.windows(12).any(|w| w == b"plain-secret"),
            "{}: secret stored in clear",
            t.kind
        );
        let opened = devices::secret(&t.state, "meter_n-42")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(opened.expose_secret(), "plain-secret-123");

        // Generated secrets follow the protocol's rules.
        let generated = devices::register(
            &t.state,
            &project.id,
            devices::NewDevice {
                product_id: "meter".into(),
                node_id: "n-43".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(generated.secret.expose_secret().len(), 24);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn duplicates_and_bad_input_get_clear_errors() {
    for t in databases().await {
        let kind = t.kind;
        let project = projects::ensure_default(&t.state).await.unwrap();
        mqtt_product(&t, &project.id).await;
        let dup = products::create(
            &t.state,
            &project.id,
            products::NewProduct {
                product_id: Some("meter".into()),
                name: "x".into(),
                device_type: "y".into(),
                protocol_type: "MQTT".into(),
                ..Default::default()
            },
        )
        .await;
        assert!(matches!(dup, Err(Error::Conflict(_))), "{kind}: {dup:?}");

        let bad = products::create(
            &t.state,
            &project.id,
            products::NewProduct {
                name: "x".into(),
                device_type: "y".into(),
                protocol_type: "ZIGBEE".into(),
                ..Default::default()
            },
        )
        .await;
        match bad {
            Err(Error::Validation(v)) => assert_eq!(v.field, "protocol_type"),
            other => panic!("{kind}: {other:?}"),
        }

        let new = |node: &str| devices::NewDevice {
            product_id: "meter".into(),
            node_id: node.into(),
            ..Default::default()
        };
        devices::register(&t.state, &project.id, new("n1"))
            .await
            .unwrap();
        let again = devices::register(&t.state, &project.id, new("n1")).await;
        assert!(
            matches!(again, Err(Error::Conflict(_))),
            "{kind}: {again:?}"
        );
        match devices::register(&t.state, &project.id, new("bad id")).await {
            Err(Error::Validation(v)) => assert_eq!(v.field, "node_id"),
            other => panic!("{kind}: {other:?}"),
        }
        let unknown = devices::register(
            &t.state,
            &project.id,
            devices::NewDevice {
                product_id: "nope".into(),
                node_id: "n2".into(),
                ..Default::default()
            },
        )
        .await;
        assert!(
            matches!(unknown, Err(Error::NotFound { .. })),
            "{kind}: {unknown:?}"
        );

        groups::create(&t.state, &project.id, "north", "")
            .await
            .unwrap();
        let dup_group = groups::create(&t.state, &project.id, "north", "").await;
        assert!(
            matches!(dup_group, Err(Error::Conflict(_))),
            "{kind}: {dup_group:?}"
        );
        t.cleanup().await;
    }
}

#[tokio::test]
async fn device_lists_filter_search_and_page() {
    for t in databases().await {
        let kind = t.kind;
        let project = projects::ensure_default(&t.state).await.unwrap();
        mqtt_product(&t, &project.id).await;
        for i in 0..23 {
            t.clock.advance(Duration::from_secs(1));
            devices::register(
                &t.state,
                &project.id,
                devices::NewDevice {
                    product_id: "meter".into(),
                    node_id: format!("node{i:02}"),
                    device_name: if i % 2 == 0 {
                        format!("Pump {i}")
                    } else {
                        format!("Valve {i}")
                    },
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        let all = devices::DeviceFilter::default();
        let first = devices::list(&t.state, &project.id, &all, Page::new(10, 0))
            .await
            .unwrap();
        assert_eq!((first.total, first.items.len()), (23, 10), "{kind}");
        assert_eq!(first.items[0].node_id, "node22", "{kind}: newest first");
        let last = devices::list(&t.state, &project.id, &all, Page::new(10, 20))
            .await
            .unwrap();
        assert_eq!(last.items.len(), 3, "{kind}");

        let pumps = devices::DeviceFilter {
            search: "PUMP".into(),
            ..Default::default()
        };
        assert_eq!(
            devices::list(&t.state, &project.id, &pumps, Page::default())
                .await
                .unwrap()
                .total,
            12,
            "{kind}"
        );
        let literal = devices::DeviceFilter {
            search: "%".into(),
            ..Default::default()
        };
        assert_eq!(
            devices::list(&t.state, &project.id, &literal, Page::default())
                .await
                .unwrap()
                .total,
            0,
            "{kind}: % is literal"
        );
        let inactive = devices::DeviceFilter {
            status: "INACTIVE".into(),
            ..Default::default()
        };
        assert_eq!(
            devices::list(&t.state, &project.id, &inactive, Page::default())
                .await
                .unwrap()
                .total,
            23,
            "{kind}"
        );
        let online = devices::DeviceFilter {
            status: "ONLINE".into(),
            ..Default::default()
        };
        assert_eq!(
            devices::list(&t.state, &project.id, &online, Page::default())
                .await
                .unwrap()
                .total,
            0,
            "{kind}"
        );
        let bad = devices::DeviceFilter {
            status: "online".into(),
            ..Default::default()
        };
        assert!(matches!(
            devices::list(&t.state, &project.id, &bad, Page::default()).await,
            Err(Error::Validation(_))
        ));
        assert_eq!(
            devices::list(&t.state, "other-project", &all, Page::default())
                .await
                .unwrap()
                .total,
            0,
            "{kind}"
        );
        t.cleanup().await;
    }
}

#[tokio::test]
async fn the_first_admin_logs_in_and_failures_are_throttled_on_the_clock() {
    for t in databases().await {
        let kind = t.kind;
        let project = projects::ensure_default(&t.state).await.unwrap();
        let AdminBootstrap::CreatedWithGeneratedPassword { password, .. } =
            auth::bootstrap_admin(&t.state, "admin", None)
                .await
                .unwrap()
        else {
            panic!("{kind}: first start must generate a password");
        };
        assert!(matches!(
            auth::bootstrap_admin(&t.state, "admin", None)
                .await
                .unwrap(),
            AdminBootstrap::Existing
        ));
        let stored = users::Entity::find()
            .one(&t.state.db)
            .await
            .unwrap()
            .unwrap();
        assert!(stored.password_hash.starts_with("$argon2id$"), "{kind}");

        let login = |pw: &str, addr: &'static str| {
            let state = t.state.clone();
            let project = project.id.clone();
            let pw = SecretString::from(pw.to_owned());
            async move { auth::login(&state, "admin", pw, &project, Some(addr), None).await }
        };
        let session = login(password.expose_secret(), "10.0.0.1").await.unwrap();
        let me = auth::authenticate(&t.state, session.token.expose_secret())
            .await
            .unwrap();
        assert_eq!((me.username.as_str(), me.is_admin), ("admin", true));

        for _ in 0..5 {
            assert!(
                matches!(
                    login("wrong-password", "10.0.0.2").await,
                    Err(Error::Unauthorized(_))
                ),
                "{kind}"
            );
        }
        // Locked out, even with the right password, from that address...
        assert!(
            matches!(
                login(password.expose_secret(), "10.0.0.2").await,
                Err(Error::RateLimited { .. })
            ),
            "{kind}"
        );
        // ...but not from another.
        assert!(
            login(password.expose_secret(), "10.0.0.3").await.is_ok(),
            "{kind}"
        );
        t.clock.advance(Duration::from_secs(15 * 60));
        assert!(
            login(password.expose_secret(), "10.0.0.2").await.is_ok(),
            "{kind}: lockout ends with the window"
        );

        // Sessions slide with use and end after the idle time.
        t.clock.advance(Duration::from_secs(11 * 3600));
        assert!(
            auth::authenticate(&t.state, session.token.expose_secret())
                .await
                .is_ok(),
            "{kind}"
        );
        t.clock.advance(Duration::from_secs(11 * 3600));
        assert!(
            auth::authenticate(&t.state, session.token.expose_secret())
                .await
                .is_ok(),
            "{kind}: use slid the expiry"
        );
        t.clock.advance(Duration::from_secs(13 * 3600));
        assert!(
            matches!(
                auth::authenticate(&t.state, session.token.expose_secret()).await,
                Err(Error::Unauthorized(_))
            ),
            "{kind}"
        );

        let other = login(password.expose_secret(), "10.0.0.4").await.unwrap();
        auth::logout(&t.state, other.token.expose_secret())
            .await
            .unwrap();
        assert!(
            auth::authenticate(&t.state, other.token.expose_secret())
                .await
                .is_err(),
            "{kind}"
        );
        assert!(
            auth::authenticate(&t.state, "not-a-token").await.is_err(),
            "{kind}"
        );
        t.cleanup().await;
    }
}

#[tokio::test]
async fn a_given_admin_password_must_meet_the_policy() {
    let t = databases().await.into_iter().next().unwrap();
    let short = auth::bootstrap_admin(
        &t.state,
        "admin",
        Some(SecretString::from("short".to_owned())),
    )
    .await;
    assert!(matches!(short, Err(Error::Validation(_))), "{short:?}");
    let ok = auth::bootstrap_admin(
        &t.state,
        "admin",
        Some(SecretString::from("long-enough-pw".to_owned())),
    )
    .await
    .unwrap();
    assert!(matches!(
        ok,
        AdminBootstrap::CreatedWithGivenPassword { .. }
    ));
    t.cleanup().await;
}

/// A task in `status` for `package_id` with one subtask (the rows the task service will write).
async fn task_fixture(t: &TestDb, project: &str, package_id: &str, status: &str) -> (String, i64) {
    let app = projects::default_app(&t.state, project).await.unwrap();
    let id = backend::ids::object_id(t.state.clock.now());
    tasks::ActiveModel {
        id: Set(id.clone()),
        project_id: Set(project.to_owned()),
        app_id: Set(app.id),
        task_name: Set("fixture".into()),
        task_type: Set("softwareUpgrade".into()),
        task_mode: Set(None),
        need_confirm: Set(false),
        task_ext_info: Set(None),
        targets_filter: Set(None),
        document: Set("{}".into()),
        package_id: Set(Some(package_id.to_owned())),
        schedule_time: Set(None),
        retry_count: Set(0),
        retry_interval_min: Set(0),
        status: Set(status.to_owned()),
        status_desc: Set(String::new()),
        total: Set(1),
        processing: Set(0),
        success: Set(0),
        fail: Set(0),
        waitting: Set(0),
        fail_wait_retry: Set(0),
        stopped: Set(0),
        removed: Set(0),
        created_at: Set(START),
        started_at: Set(None),
        finished_at: Set(None),
        updated_at: Set(START),
        claimed_by: Set(None),
        request_id: Set(None),
        rollout: Set(None),
        rollout_state: Set(None),
        rollout_wake_at: Set(None),
    }
    .insert(&t.state.db)
    .await
    .unwrap();
    let sub = subtasks::ActiveModel {
        task_id: Set(id.clone()),
        device_id: Set("dev-1".into()),
        status: Set("Processing".into()),
        step: Set("download".into()),
        progress: Set(0),
        attempts: Set(1),
        created_at: Set(START),
        updated_at: Set(START),
        ..Default::default()
    }
    .insert(&t.state.db)
    .await
    .unwrap();
    (id, sub.id)
}

#[tokio::test]
async fn packages_and_download_tokens_follow_their_rules() {
    use backend::service::{downloads, packages as pkgs};
    use futures::stream;
    for t in databases().await {
        let kind = t.kind;
        let project = projects::ensure_default(&t.state).await.unwrap();
        mqtt_product(&t, &project.id).await;
        let meta = |version: &str| domain::package::PackageMetaInput {
            package_type: "firmwarePackage".into(),
            product_id: "meter".into(),
            version: version.into(),
            file_name: "fw.bin".into(),
            ..Default::default()
        };
        let body = |parts: Vec<&'static [u8]>| {
            stream::iter(
                parts
                    .into_iter()
                    .map(|p| Ok::<_, std::io::Error>(bytes::Bytes::from_static(p))),
            )
        };
        let p = pkgs::upload(
            &t.state,
            &project.id,
            meta("2.0"),
            body(vec![b"hello ", b"world"]),
        )
        .await
        .unwrap_or_else(|e| panic!("{kind}: upload: {e}"));
        assert_eq!(p.size, 11, "{kind}");
        assert_eq!(p.sha256, backend::ids::sha256_hex("hello world"), "{kind}");
        let dup = pkgs::upload(&t.state, &project.id, meta("2.0"), body(vec![b"x"])).await;
        assert!(matches!(dup, Err(Error::Conflict(_))), "{kind}: {dup:?}");
        let failed = pkgs::upload(
            &t.state,
            &project.id,
            meta("3.0"),
            stream::iter(vec![
                Ok(bytes::Bytes::from_static(b"part")),
                Err(std::io::Error::other("connection reset")),
            ]),
        )
        .await;
        assert!(
            matches!(&failed, Err(Error::Validation(v)) if v.field == "file"),
            "{kind}: {failed:?}"
        );

        // Tokens: issued per subtask, checked against the package, expiring on the clock, revocable,
        // counting bytes.
        let (task_id, subtask) = task_fixture(&t, &project.id, &p.id, "Processing").await;
        let issued = downloads::issue(&t.state, subtask, &p.id).await.unwrap();
        let grant = downloads::authorize(&t.state, Some(&issued.token), &p.id)
            .await
            .unwrap()
            .unwrap_or_else(|d| panic!("{kind}: {d}"));
        assert_eq!(grant.device_id, "dev-1", "{kind}");
        downloads::record_served(&t.state, &grant.token_hash, 7)
            .await
            .unwrap();
        downloads::record_served(&t.state, &grant.token_hash, 4)
            .await
            .unwrap();
        let row = downloads::find(&t.state, &issued.token)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.bytes_served, 11, "{kind}");
        assert_eq!(
            downloads::authorize(&t.state, None, &p.id)
                .await
                .unwrap()
                .unwrap_err(),
            downloads::Denied::Missing
        );
        assert_eq!(
            downloads::authorize(&t.state, Some("xyz"), &p.id)
                .await
                .unwrap()
                .unwrap_err(),
            downloads::Denied::Malformed
        );
        t.clock.advance(Duration::from_secs(24 * 3600));
        assert_eq!(
            downloads::authorize(&t.state, Some(&issued.token), &p.id)
                .await
                .unwrap()
                .unwrap_err(),
            downloads::Denied::Expired,
            "{kind}"
        );
        let second = downloads::issue(&t.state, subtask, &p.id).await.unwrap();
        assert_eq!(
            downloads::revoke_task(&t.state, &task_id).await.unwrap(),
            2,
            "{kind}"
        );
        assert_eq!(
            downloads::authorize(&t.state, Some(&second.token), &p.id)
                .await
                .unwrap()
                .unwrap_err(),
            downloads::Denied::Revoked,
            "{kind}"
        );

        // Delete: refused while the task runs, then allowed; the task keeps its row.
        let busy = pkgs::delete(&t.state, &project.id, &p.id).await;
        assert!(
            matches!(&busy, Err(Error::Conflict(m)) if m.contains(&task_id)),
            "{kind}: {busy:?}"
        );
        let mut task: tasks::ActiveModel = tasks::Entity::find_by_id(task_id.clone())
            .one(&t.state.db)
            .await
            .unwrap()
            .unwrap()
            .into();
        task.status = Set("Fail".into());
        task.update(&t.state.db).await.unwrap();
        pkgs::delete(&t.state, &project.id, &p.id)
            .await
            .unwrap_or_else(|e| panic!("{kind}: delete: {e}"));
        let task = tasks::Entity::find_by_id(task_id)
            .one(&t.state.db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(task.package_id, None, "{kind}");
        t.cleanup().await;
    }
}

/// A collecting downlink: what the driver published, per device.
#[derive(Debug, Default)]
struct Sent(std::sync::Mutex<Vec<(String, serde_json::Value)>>);

impl backend::driver::Downlink for Sent {
    fn publish(&self, device_id: &str, payload: Vec<u8>) {
        let v = serde_json::from_slice(&payload).expect("JSON payload");
        self.0.lock().unwrap().push((device_id.to_owned(), v));
    }
}

impl Sent {
    fn event_types(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, v)| v["services"][0]["event_type"].as_str().unwrap().to_owned())
            .collect()
    }
}

#[tokio::test]
async fn the_task_driver_runs_subtasks_and_queues_messages_without_a_broker() {
    use backend::driver::DeviceEvent;
    use backend::service::tasks;
    for t in databases().await {
        let project = projects::ensure_default(&t.state).await.unwrap().id;
        mqtt_product(&t, &project).await;
        for node in ["1", "2"] {
            devices::register(
                &t.state,
                &project,
                devices::NewDevice {
                    product_id: "meter".into(),
                    node_id: node.into(),
                    device_id: Some(format!("d{node}")),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(
            b"firmware",
        ))]);
        let package = backend::service::packages::upload(
            &t.state,
            &project,
            domain::package::PackageMetaInput {
                package_type: "firmwarePackage".into(),
                product_id: "meter".into(),
                version: "2.0".into(),
                file_name: "fw.bin".into(),
                ..Default::default()
            },
            body,
        )
        .await
        .unwrap();
        // Devices are online before the task; this process has no MQTT endpoint (like the CLI).
        for d in ["d1", "d2"] {
            t.state
                .driver
                .device_event(&t.state, d, DeviceEvent::Online)
                .await
                .unwrap();
        }
        let task = tasks::create(
            &t.state,
            &project,
            tasks::NewTask {
                task_name: "fw".into(),
                task_type: "firmwareUpgrade".into(),
                package_id: package.id.clone(),
                targets: vec!["d1".into(), "d2".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", t.kind));
        // This process runs no driver loop (like the command line): the task waits for one.
        assert_eq!(task.status, "Waitting", "{}", t.kind);
        t.state.driver.run_due(&t.state).await.unwrap();
        let task = tasks::get(&t.state, &project, &task.id).await.unwrap();
        assert_eq!(
            (task.status.as_str(), task.processing),
            ("Processing", 2),
            "{}",
            t.kind
        );
        let queued = e::device_messages::Entity::find()
            .all(&t.state.db)
            .await
            .unwrap();
        assert_eq!(
            queued.len(),
            2,
            "{}: version queries wait for the MQTT process",
            t.kind
        );

        // The process that serves MQTT publishes them (and the queue empties).
        let sent = Arc::new(Sent::default());
        t.state.driver.set_downlink(sent.clone());
        t.state.driver.run_due(&t.state).await.unwrap();
        assert_eq!(
            sent.event_types(),
            ["version_query", "version_query"],
            "{}",
            t.kind
        );
        assert!(
            e::device_messages::Entity::find()
                .all(&t.state.db)
                .await
                .unwrap()
                .is_empty()
        );

        // Several events in one batch, in order, for one device: report, then progress, then success.
        t.state
            .driver
            .device_events(
                &t.state,
                vec![
                    (
                        "d1".into(),
                        DeviceEvent::VersionReport {
                            sw_version: None,
                            fw_version: Some("1.0".into()),
                        },
                    ),
                    (
                        "d2".into(),
                        DeviceEvent::VersionReport {
                            sw_version: None,
                            fw_version: Some("2.0".into()),
                        },
                    ),
                ],
            )
            .await
            .unwrap();
        let types = sent.event_types();
        assert_eq!(
            types.last().map(String::as_str),
            Some("firmware_upgrade"),
            "{}",
            t.kind
        );
        t.state
            .driver
            .device_events(
                &t.state,
                vec![
                    (
                        "d1".into(),
                        DeviceEvent::Progress {
                            result_code: 0,
                            progress: Some(60),
                            version: Some("1.0".into()),
                            description: None,
                        },
                    ),
                    (
                        "d1".into(),
                        DeviceEvent::Progress {
                            result_code: 0,
                            progress: Some(100),
                            version: Some("2.0".into()),
                            description: None,
                        },
                    ),
                ],
            )
            .await
            .unwrap();
        let task = tasks::get(&t.state, &project, &task.id).await.unwrap();
        assert_eq!(
            (task.status.as_str(), task.success),
            ("Success", 2),
            "{}",
            t.kind
        );
        let d1 = e::devices::Entity::find_by_id("d1".to_owned())
            .one(&t.state.db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d1.fw_version.as_deref(), Some("2.0"), "{}", t.kind);
        let steps = tasks::history(&t.state, &project, &task.id, "d1")
            .await
            .unwrap();
        let progress: Vec<i32> = steps.iter().map(|s| s.progress).collect();
        assert!(progress.contains(&60), "{}: {progress:?}", t.kind);
        assert_eq!(steps.last().unwrap().status, "Success");
        let outbox = e::outbox::Entity::find().all(&t.state.db).await.unwrap();
        assert!(
            outbox
                .iter()
                .any(|o| o.kind == "task.changed" && o.payload.contains("\"Success\""))
        );
        tasks::delete(&t.state, &project, &task.id).await.unwrap();
        t.clock.advance(Duration::from_secs(1));
        t.cleanup().await;
    }
}

/// `n` devices `d0`.. of the `meter` product and a software package 2.0 for it.
async fn meters_and_package(
    t: &TestDb,
    project: &str,
    n: usize,
) -> (Vec<String>, e::packages::Model) {
    let mut ids = Vec::new();
    for i in 0..n {
        let d = devices::register(
            &t.state,
            project,
            devices::NewDevice {
                product_id: "meter".into(),
                node_id: format!("n{i}"),
                device_id: Some(format!("d{i}")),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        ids.push(d.device.id);
    }
    let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(
        b"software",
    ))]);
    let package = backend::service::packages::upload(
        &t.state,
        project,
        domain::package::PackageMetaInput {
            package_type: "softwarePackage".into(),
            product_id: "meter".into(),
            version: "2.0".into(),
            file_name: "sw.bin".into(),
            ..Default::default()
        },
        body,
    )
    .await
    .unwrap();
    (ids, package)
}

/// Two drivers on one database (two instances, or a crashed one still finishing a batch) handle the
/// same device events at the same time: each transition happens once, and the task's counters match
/// its subtasks.
#[tokio::test]
async fn two_drivers_on_one_database_never_apply_a_transition_twice() {
    use backend::driver::DeviceEvent;
    use backend::service::tasks;
    const N: usize = 40;
    for t in databases().await {
        let kind = t.kind;
        let project = projects::ensure_default(&t.state).await.unwrap().id;
        mqtt_product(&t, &project).await;
        let (ids, package) = meters_and_package(&t, &project, N).await;
        let task = begun_on(&t.state, &project, &package.id, &ids, "twice").await;
        // A second instance: same database, its own driver.
        let other = AppState::new(
            t.state.db.clone(),
            t.state.clock.clone(),
            t.state.sealer.clone(),
            t.state.store.clone(),
            t.state.settings.clone(),
        );
        for driver in [&t.state, &other] {
            driver.driver.set_downlink(Arc::new(Sent::default()));
        }
        let report = |v: &str| {
            ids.iter()
                .map(|d| {
                    (
                        d.clone(),
                        DeviceEvent::VersionReport {
                            sw_version: Some(v.into()),
                            fw_version: None,
                        },
                    )
                })
                .collect::<Vec<_>>()
        };
        let done = || {
            ids.iter()
                .map(|d| {
                    (
                        d.clone(),
                        DeviceEvent::Progress {
                            result_code: 0,
                            progress: Some(100),
                            version: Some("2.0".into()),
                            description: None,
                        },
                    )
                })
                .collect::<Vec<_>>()
        };
        // Device by device, so the two drivers' batches interleave.
        let feed = |state: AppState, events: Vec<(String, DeviceEvent)>| async move {
            for e in events {
                state.driver.device_events(&state, vec![e]).await.unwrap();
            }
        };
        tokio::join!(
            feed(t.state.clone(), report("1.0")),
            feed(other.clone(), report("1.0"))
        );
        tokio::join!(feed(t.state.clone(), done()), feed(other.clone(), done()));

        let task = tasks::get(&t.state, &project, &task.id).await.unwrap();
        assert_eq!(
            (
                task.status.as_str(),
                task.success,
                task.processing,
                task.waitting,
                task.fail
            ),
            ("Success", N as i64, 0, 0, 0),
            "{kind}"
        );
        for d in &ids {
            let steps = tasks::history(&t.state, &project, &task.id, d)
                .await
                .unwrap();
            let successes = steps.iter().filter(|s| s.status == "Success").count();
            assert_eq!(successes, 1, "{kind}: {d}: {steps:?}");
        }
        t.cleanup().await;
    }
}

/// Two instances on one database, each with its live stream: each broadcasts its own changes as they
/// commit, and the other's through its outbox tail, so both streams carry every change once, in the
/// same order.
#[tokio::test]
async fn every_instances_live_stream_shows_every_instances_changes_once() {
    use backend::driver::{DeviceEvent, Event};
    use tokio::sync::broadcast::Receiver;
    const N: usize = 5;
    fn drain(rx: &mut Receiver<Event>) -> Vec<Event> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }
    for t in databases().await {
        let kind = t.kind;
        let project = projects::ensure_default(&t.state).await.unwrap().id;
        mqtt_product(&t, &project).await;
        let (ids, package) = meters_and_package(&t, &project, N).await;
        let a = t.state.clone();
        let b = AppState::new(
            a.db.clone(),
            a.clock.clone(),
            a.sealer.clone(),
            a.store.clone(),
            a.settings.clone(),
        );
        for s in [&a, &b] {
            s.driver.set_downlink(Arc::new(Sent::default()));
        }
        let mut at_a = a.driver.outbox_head(&a).await.unwrap();
        let mut at_b = b.driver.outbox_head(&b).await.unwrap();
        let (mut rx_a, mut rx_b) = (a.driver.subscribe(), b.driver.subscribe());

        // Instance A: devices connect and a task starts (the version queries go out).
        begun_on(&a, &project, &package.id, &ids, "live").await;
        // Instance B: the devices report their versions there.
        let reports: Vec<_> = ids
            .iter()
            .map(|d| {
                (
                    d.clone(),
                    DeviceEvent::VersionReport {
                        sw_version: Some("1.0".into()),
                        fw_version: None,
                    },
                )
            })
            .collect();
        let mut seen_a = drain(&mut rx_a);
        let mut seen_b = drain(&mut rx_b);
        let own_a = seen_a.len();
        assert!(own_a > 0, "{kind}: A's own changes are broadcast at once");
        assert!(seen_b.is_empty(), "{kind}: B has not read the outbox yet");
        at_b = b.driver.tail_outbox(&b, at_b).await.unwrap();
        seen_b.extend(drain(&mut rx_b));
        b.driver.device_events(&b, reports).await.unwrap();
        seen_b.extend(drain(&mut rx_b));
        // Each tail skips what its own instance wrote.
        at_a = a.driver.tail_outbox(&a, at_a).await.unwrap();
        seen_a.extend(drain(&mut rx_a));
        at_b = b.driver.tail_outbox(&b, at_b).await.unwrap();
        seen_b.extend(drain(&mut rx_b));
        assert!(seen_a.len() > own_a, "{kind}: A shows B's changes too");
        assert_eq!(
            seen_a, seen_b,
            "{kind}: both streams carry every change once, in order"
        );
        assert_eq!(
            a.driver.tail_outbox(&a, at_a).await.unwrap(),
            at_a,
            "{kind}"
        );
        assert_eq!(
            b.driver.tail_outbox(&b, at_b).await.unwrap(),
            at_b,
            "{kind}"
        );
        assert!(
            drain(&mut rx_a).is_empty() && drain(&mut rx_b).is_empty(),
            "{kind}"
        );
        t.cleanup().await;
    }
}

/// A process that died while starting tasks: one task left `Initializing` (claimed, group unresolved),
/// one left `Processing` with subtasks never started. `recover` picks both up.
#[tokio::test]
async fn tasks_interrupted_while_starting_are_picked_up_after_a_restart() {
    use backend::service::tasks;
    for t in databases().await {
        let kind = t.kind;
        let project = projects::ensure_default(&t.state).await.unwrap().id;
        mqtt_product(&t, &project).await;
        devices::register(
            &t.state,
            &project,
            devices::NewDevice {
                product_id: "meter".into(),
                node_id: "n1".into(),
                device_id: Some("d1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let group = groups::create(&t.state, &project, "g", "").await.unwrap();
        groups::add_device(&t.state, &project, &group.id, "d1")
            .await
            .unwrap();
        let package = backend::service::packages::upload(
            &t.state,
            &project,
            domain::package::PackageMetaInput {
                package_type: "softwarePackage".into(),
                product_id: "meter".into(),
                version: "2.0".into(),
                file_name: "sw.bin".into(),
                ..Default::default()
            },
            futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"sw"))]),
        )
        .await
        .unwrap();
        let new = |name: &str, by_group: bool| tasks::NewTask {
            task_name: name.into(),
            task_type: "softwareUpgrade".into(),
            package_id: package.id.clone(),
            targets: if by_group { vec![] } else { vec!["d1".into()] },
            group_ids: if by_group {
                vec![group.id.clone()]
            } else {
                vec![]
            },
            ..Default::default()
        };
        let claimed = tasks::create(&t.state, &project, new("claimed", true))
            .await
            .unwrap();
        let half = tasks::create(&t.state, &project, new("half", false))
            .await
            .unwrap();
        // What the dead process left behind.
        for (id, status) in [(&claimed.id, "Initializing"), (&half.id, "Processing")] {
            e::tasks::Entity::update_many()
                .col_expr(
                    e::tasks::Column::Status,
                    sea_orm::sea_query::Expr::value(status),
                )
                .filter(e::tasks::Column::Id.eq(id.clone()))
                .exec(&t.state.db)
                .await
                .unwrap();
        }
        t.state.driver.recover(&t.state).await.unwrap();
        let step_of = |task_id: String| {
            let db = t.state.db.clone();
            async move {
                e::subtasks::Entity::find()
                    .filter(e::subtasks::Column::TaskId.eq(task_id))
                    .one(&db)
                    .await
                    .unwrap()
                    .unwrap()
                    .step
            }
        };
        assert_eq!(
            step_of(half.id.clone()).await,
            "wait_online",
            "{kind}: its subtask started (and waits for its offline device)"
        );
        assert_eq!(
            tasks::get(&t.state, &project, &claimed.id)
                .await
                .unwrap()
                .status,
            "Waitting",
            "{kind}"
        );
        t.state.driver.run_due(&t.state).await.unwrap();
        let claimed = tasks::get(&t.state, &project, &claimed.id).await.unwrap();
        assert_eq!(
            (claimed.status.as_str(), claimed.total),
            ("Processing", 1),
            "{kind}: started, its group resolved"
        );
        assert_eq!(step_of(claimed.id.clone()).await, "wait_online", "{kind}");
        t.cleanup().await;
    }
}

/// Two instances on one PostgreSQL: a task another live instance is starting (`Initializing`, claimed by
/// it) is left to it by a restarting instance's recovery; once that instance is reaped, the task waits
/// again and a survivor starts it.
#[tokio::test]
async fn a_task_a_live_instance_is_starting_is_left_to_it_until_it_dies() {
    use backend::cluster;
    use backend::service::tasks;
    for t in databases().await {
        if t.kind != "postgres" {
            // One instance per SQLite file: whatever it left `Initializing` is its own (test above).
            t.cleanup().await;
            continue;
        }
        let project = projects::ensure_default(&t.state).await.unwrap().id;
        mqtt_product(&t, &project).await;
        let (ids, package) = meters_and_package(&t, &project, 2).await;
        let instance = |id: &str| instance_on(&t, id, Some(Duration::from_secs(600)));
        let (a, b) = (instance("a"), instance("b"));
        for s in [&a, &b] {
            cluster::join(s, "").await.unwrap();
        }
        let task = software_task(&b, &project, &package.id, &ids, "claimed").await;
        // B is in the middle of starting it.
        e::tasks::Entity::update_many()
            .col_expr(
                e::tasks::Column::Status,
                sea_orm::sea_query::Expr::value("Initializing"),
            )
            .col_expr(
                e::tasks::Column::ClaimedBy,
                sea_orm::sea_query::Expr::value("b"),
            )
            .filter(e::tasks::Column::Id.eq(task.id.clone()))
            .exec(&t.state.db)
            .await
            .unwrap();
        let status = || async { tasks::get(&a, &project, &task.id).await.unwrap().status };
        a.driver.recover(&a).await.unwrap();
        a.driver.run_due(&a).await.unwrap();
        assert_eq!(status().await, "Initializing", "left to B, alive");
        t.clock.advance(Duration::from_secs(601));
        let beat = cluster::beat(&a, &a.driver).await.unwrap();
        assert_eq!(beat.reaped, ["b"]);
        assert_eq!(status().await, "Waitting", "B died while starting it");
        a.driver.run_due(&a).await.unwrap();
        let task = tasks::get(&a, &project, &task.id).await.unwrap();
        assert_eq!((task.status.as_str(), task.total), ("Processing", 2));
        t.cleanup().await;
    }
}

/// A chunk read ahead counts against the download budget while it waits, not only once returned: a
/// thousand stalled downloads must not each hold an uncounted read.
#[tokio::test]
async fn read_ahead_chunks_count_in_the_gauge_from_the_start_of_their_read() {
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let store = PackageStore::open(&StoreSettings {
        bucket: "updraft".into(),
        location: StoreLocation::Local {
            dir: dir.path().join("packages"),
        },
        max_package_size: 1024 * 1024,
        offload: false,
        max_open_files: 64,
        bucket_aliases: Vec::new(),
    })
    .unwrap();
    let key = domain::package::ObjectKey::parse("firmware/gauge.bin").unwrap();
    let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(vec![
        7u8;
        64 * 1024
    ]))]);
    store.put_stream(&key, body).await.unwrap();

    let gauge = Arc::new(AtomicUsize::new(0));
    let mut reader = store.open_range(&key, 0..64 * 1024, 4096).await.unwrap();
    reader.track(gauge.clone());
    reader.set_read_ahead(true);
    let first = reader.next().await.unwrap().unwrap();
    assert_eq!(first.len(), 4096);
    assert_eq!(
        gauge.load(Ordering::Relaxed),
        2 * 4096,
        "the chunk returned and the one being read ahead"
    );
    drop(first);
    assert_eq!(gauge.load(Ordering::Relaxed), 4096);
    let rest: Vec<_> = reader.map(Result::unwrap).collect().await;
    assert_eq!(rest.iter().map(bytes::Bytes::len).sum::<usize>(), 60 * 1024);
    drop(rest);
    assert_eq!(
        gauge.load(Ordering::Relaxed),
        0,
        "every chunk uncounted when dropped"
    );
}

/// Another instance (`id`) on `t`'s database, clock, keys and store, with its own lease if given.
fn instance_on(t: &TestDb, id: &str, lease: Option<Duration>) -> AppState {
    let mut settings = t.state.settings.clone();
    settings.cluster.instance_id = id.to_owned();
    if let Some(lease) = lease {
        settings.cluster.lease = lease;
    }
    AppState::new(
        t.state.db.clone(),
        t.state.clock.clone(),
        t.state.sealer.clone(),
        t.state.store.clone(),
        settings,
    )
}

/// `ids` connected to instance `a`, and a software task `name` on them begun there.
async fn begun_on(
    a: &AppState,
    project: &str,
    package_id: &str,
    ids: &[String],
    name: &str,
) -> e::tasks::Model {
    use backend::driver::DeviceEvent;
    let online: Vec<_> = ids
        .iter()
        .map(|d| (d.clone(), DeviceEvent::Online))
        .collect();
    a.driver.device_events(a, online).await.unwrap();
    let task = software_task(a, project, package_id, ids, name).await;
    a.driver.run_due(a).await.unwrap();
    task
}

/// A software task `name` on `ids`, created on `state`.
async fn software_task(
    state: &AppState,
    project: &str,
    package_id: &str,
    ids: &[String],
    name: &str,
) -> e::tasks::Model {
    backend::service::tasks::create(
        state,
        project,
        backend::service::tasks::NewTask {
            task_name: name.into(),
            task_type: "softwareUpgrade".into(),
            package_id: package_id.to_owned(),
            targets: ids.to_vec(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// Two instances on one PostgreSQL: a subtask whose deadline passed under another live instance's lease is
/// left to it; once that instance stops beating for a lease, a heartbeat of the other takes its subtasks
/// over and marks its devices offline. (On SQLite there is one instance: a heartbeat reaps only what an
/// earlier run left.)
#[tokio::test]
async fn a_silent_instances_subtasks_are_taken_over_after_its_lease() {
    use backend::cluster;
    use backend::driver::DeviceEvent;
    use sea_orm::QueryOrder;
    const N: usize = 6;
    for t in databases().await {
        let kind = t.kind;
        let project = projects::ensure_default(&t.state).await.unwrap().id;
        mqtt_product(&t, &project).await;
        let (ids, package) = meters_and_package(&t, &project, N).await;
        // A lease longer than the version query's timeout (3 min), so that a deadline passes under it.
        let instance = |id: &str| instance_on(&t, id, Some(Duration::from_secs(600)));
        let (a, b) = (instance("a"), instance("b"));
        for s in [&a, &b] {
            s.driver.set_downlink(Arc::new(Sent::default()));
            cluster::join(s, "").await.unwrap();
        }
        let task = begun_on(&a, &project, &package.id, &ids, "takeover").await;
        let rows = |db: &AppState| {
            let (db, task_id) = (db.db.clone(), task.id.clone());
            async move {
                subtasks::Entity::find()
                    .filter(subtasks::Column::TaskId.eq(task_id))
                    .order_by_asc(subtasks::Column::Id)
                    .all(&db)
                    .await
                    .unwrap()
            }
        };
        let started = rows(&a).await;
        assert!(
            started.iter().all(|r| r.step == "version_query"),
            "{kind}: {started:?}"
        );
        if kind == "sqlite" {
            // One instance per file: another recorded instance is an earlier run, reaped at once.
            let beat = cluster::beat(&b, &b.driver).await.unwrap();
            assert_eq!(beat.reaped, ["a"], "{kind}");
            t.cleanup().await;
            continue;
        }
        assert!(
            started
                .iter()
                .all(|r| r.lease_owner.as_deref() == Some("a")),
            "{kind}: the instance that began them drives them: {started:?}"
        );
        // The version queries time out, under A's lease: B leaves them to A.
        t.clock.advance(Duration::from_secs(3 * 60 + 1));
        b.driver.run_due(&b).await.unwrap();
        assert_eq!(
            rows(&b).await,
            started,
            "{kind}: B did not touch A's subtasks"
        );
        assert_eq!(cluster::beat(&b, &b.driver).await.unwrap().reaped.len(), 0);
        // A falls silent for longer than its lease.
        t.clock.advance(Duration::from_secs(601));
        let beat = cluster::beat(&b, &b.driver).await.unwrap();
        assert_eq!(beat.reaped, ["a"], "{kind}");
        assert_eq!(beat.taken_over, N as u64, "{kind}");
        assert_eq!(beat.devices_offline, N, "{kind}");
        assert!(
            rows(&b)
                .await
                .iter()
                .all(|r| r.lease_owner.as_deref() == Some("b")),
            "{kind}: B owns them now"
        );
        // The deadlines A never fired are B's now.
        b.driver.run_due(&b).await.unwrap();
        assert!(
            rows(&b)
                .await
                .iter()
                .zip(&started)
                .all(|(now, before)| now.machine != before.machine
                    && now.lease_owner.as_deref() == Some("b")),
            "{kind}: B fired the deadlines it took over"
        );
        for d in &ids {
            let device = e::devices::Entity::find_by_id(d.clone())
                .one(&b.db)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                (device.status.as_str(), device.instance_id),
                ("OFFLINE", None),
                "{kind}: {d}"
            );
        }
        let live: Vec<String> = cluster::live(&b)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(live, ["b"], "{kind}");
        // A device reconnecting (to B) takes its subtask along; a disconnect A reports late is ignored.
        b.driver
            .device_event(&b, &ids[0], DeviceEvent::Online)
            .await
            .unwrap();
        a.driver
            .device_event(&a, &ids[0], DeviceEvent::Offline)
            .await
            .unwrap();
        let device = e::devices::Entity::find_by_id(ids[0].clone())
            .one(&b.db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (device.status.as_str(), device.instance_id.as_deref()),
            ("ONLINE", Some("b")),
            "{kind}"
        );
        // So is A's death as reported by a second survivor that listed A's devices before this one
        // reconnected (here, to that survivor itself).
        b.driver
            .device_event(
                &b,
                &ids[0],
                DeviceEvent::Lost {
                    instance: "a".to_owned(),
                },
            )
            .await
            .unwrap();
        let device = e::devices::Entity::find_by_id(ids[0].clone())
            .one(&b.db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (device.status.as_str(), device.instance_id.as_deref()),
            ("ONLINE", Some("b")),
            "{kind}: a late report of A's death leaves a device that moved on alone"
        );
        t.cleanup().await;
    }
}

/// A downlink whose process holds the given devices' connections and sends nothing.
#[derive(Debug)]
struct Holding(Vec<String>);

impl backend::driver::Downlink for Holding {
    fn publish(&self, _device_id: &str, _payload: Vec<u8>) {}

    fn held(&self) -> Vec<String> {
        self.0.clone()
    }
}

/// Two instances on one PostgreSQL: A stalls past its lease while its devices stay connected to it; B
/// reaps it (the devices offline, the subtasks B's). When A beats again it joins again and records the
/// connections it still holds as its own, taking their subtasks back; a device that reconnected to B
/// meanwhile stays B's.
#[tokio::test]
async fn an_instance_taken_for_dead_records_its_connections_again() {
    use backend::cluster;
    use backend::driver::DeviceEvent;
    const N: usize = 4;
    for t in databases().await {
        if t.kind != "postgres" {
            // One instance per SQLite file: nobody else takes it for dead.
            t.cleanup().await;
            continue;
        }
        let project = projects::ensure_default(&t.state).await.unwrap().id;
        mqtt_product(&t, &project).await;
        let (ids, package) = meters_and_package(&t, &project, N).await;
        let instance = |id: &str| instance_on(&t, id, Some(Duration::from_secs(600)));
        let (a, b) = (instance("a"), instance("b"));
        a.driver.set_downlink(Arc::new(Holding(ids[1..].to_vec())));
        b.driver.set_downlink(Arc::new(Sent::default()));
        for s in [&a, &b] {
            cluster::join(s, "").await.unwrap();
        }
        let task = begun_on(&a, &project, &package.id, &ids, "stalled").await;
        // A stalls; B reaps it. Device 0 reconnects to B; the others stay connected to A.
        t.clock.advance(Duration::from_secs(601));
        let beat = cluster::beat(&b, &b.driver).await.unwrap();
        assert_eq!((beat.reaped.len(), beat.devices_offline), (1, N));
        b.driver
            .device_event(&b, &ids[0], DeviceEvent::Online)
            .await
            .unwrap();
        let beat = cluster::beat(&a, &a.driver).await.unwrap();
        assert_eq!(beat.held_again, N - 1, "A records what it still holds");
        assert!(beat.reaped.is_empty(), "B is alive: {beat:?}");
        let live: Vec<String> = cluster::live(&a)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(live.len(), 2, "A joined again: {live:?}");
        for (i, d) in ids.iter().enumerate() {
            let owner = if i == 0 { "b" } else { "a" };
            let device = e::devices::Entity::find_by_id(d.clone())
                .one(&a.db)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                (device.status.as_str(), device.instance_id.as_deref()),
                ("ONLINE", Some(owner)),
                "{d}"
            );
            let sub = subtasks::Entity::find()
                .filter(subtasks::Column::TaskId.eq(task.id.clone()))
                .filter(subtasks::Column::DeviceId.eq(d.clone()))
                .one(&a.db)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(sub.lease_owner.as_deref(), Some(owner), "{d}: {sub:?}");
        }
        t.cleanup().await;
    }
}

/// Two instances on one PostgreSQL, the race `make bench-cluster` found: a device that was held by an
/// instance that just died reconnects to B while another instance begins its subtask, reading the old
/// place and queueing the version query there. B's connect waits for the begin's lock on the device row;
/// it must then decide on the begun subtask (and ask again), and take over what was queued for the dead
/// instance, rather than decide on the never-started row it read before it waited.
#[tokio::test]
async fn a_connect_that_waited_for_a_begin_elsewhere_asks_the_device_again() {
    use backend::driver::DeviceEvent;
    use domain::flow::mqtt;
    use sea_orm::TransactionTrait;
    for t in databases().await {
        if t.kind != "postgres" {
            // One instance per SQLite file: there is no other instance to race.
            t.cleanup().await;
            continue;
        }
        let project = projects::ensure_default(&t.state).await.unwrap().id;
        mqtt_product(&t, &project).await;
        let (ids, package) = meters_and_package(&t, &project, 1).await;
        let device = ids[0].clone();
        let instance = |id: &str| instance_on(&t, id, None);
        let (a, b) = (instance("a"), instance("b"));
        let sent_b = Arc::new(Sent::default());
        a.driver.set_downlink(Arc::new(Sent::default()));
        b.driver.set_downlink(sent_b.clone());
        a.driver
            .device_event(&a, &device, DeviceEvent::Online)
            .await
            .unwrap();
        let task = software_task(&a, &project, &package.id, &ids, "race").await;
        let subtask = subtasks::Entity::find()
            .filter(subtasks::Column::TaskId.eq(task.id.clone()))
            .one(&t.state.db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(subtask.step, "pending");
        // The other instance's begin: it holds the device row (shared) while it decides.
        let begin = t.state.db.begin().await.unwrap();
        begin
            .execute_raw(Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT id FROM devices WHERE id = $1 FOR SHARE",
                [device.clone().into()],
            ))
            .await
            .unwrap();
        // Meanwhile the device connects to B, whose transaction waits for that lock.
        let connect = {
            let (b, device) = (b.clone(), device.clone());
            tokio::spawn(async move {
                b.driver
                    .device_event(&b, &device, DeviceEvent::Online)
                    .await
            })
        };
        let waiting = || async {
            let row = t
                .state
                .db
                .query_one_raw(Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT count(*) AS n FROM pg_locks WHERE NOT granted",
                ))
                .await
                .unwrap()
                .unwrap();
            row.try_get::<i64>("", "n").unwrap() > 0
        };
        let mut tries = 0;
        while !waiting().await {
            tries += 1;
            assert!(tries < 500, "B's connect never waited for the device row");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The begin, as the other instance writes it: version query asked, and queued for A, where it
        // read the device.
        let now = t.state.clock.now();
        let machine = mqtt::Subtask {
            phase: mqtt::Phase::WaitVersion {
                deadline: now.plus(Duration::from_secs(180)),
            },
            online: true,
            attempts: 1,
            source_version: None,
            progress: 0,
        };
        subtasks::Entity::update_many()
            .col_expr(
                subtasks::Column::Machine,
                sea_orm::sea_query::Expr::value(serde_json::to_string(&machine).unwrap()),
            )
            .col_expr(
                subtasks::Column::Status,
                sea_orm::sea_query::Expr::value("Processing"),
            )
            .col_expr(
                subtasks::Column::Step,
                sea_orm::sea_query::Expr::value("version_query"),
            )
            .filter(subtasks::Column::Id.eq(subtask.id))
            .exec(&begin)
            .await
            .unwrap();
        let queued = serde_json::json!({
            "object_device_id": device,
            "services": [{"service_id": "$ota", "event_type": "version_query", "event_id": "queued"}],
        });
        device_messages::ActiveModel {
            device_id: Set(device.clone()),
            payload: Set(serde_json::to_vec(&queued).unwrap()),
            created_at: Set(now.as_millis()),
            instance_id: Set(Some("a".to_owned())),
            kind: Set("mqtt".to_owned()),
            ..Default::default()
        }
        .insert(&begin)
        .await
        .unwrap();
        begin.commit().await.unwrap();
        connect.await.unwrap().unwrap();
        let sent: Vec<serde_json::Value> = sent_b
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, v)| v["services"][0].clone())
            .collect();
        assert_eq!(
            sent.iter()
                .map(|s| (s["event_type"].as_str(), s["event_id"].as_str()))
                .collect::<Vec<_>>(),
            [
                (Some("version_query"), Some("queued")),
                (Some("version_query"), None)
            ],
            "B sends what was queued for A, then asks again: {sent:?}"
        );
        assert_eq!(
            device_messages::Entity::find()
                .all(&t.state.db)
                .await
                .unwrap(),
            [],
            "nothing is left queued for A"
        );
        t.cleanup().await;
    }
}

/// Two instances on one PostgreSQL: the instance that was starting a task (its subtasks begin in batches)
/// dies half-way; a survivor's heartbeat that reaps it starts the rest (found by `make bench-cluster`,
/// where 7 000 subtasks stayed pending after the kill).
#[tokio::test]
async fn a_task_whose_starter_died_is_started_by_a_survivor() {
    use backend::cluster;
    for t in databases().await {
        if t.kind != "postgres" {
            // One instance per SQLite file: start-up's recovery resumes starts (tested elsewhere).
            t.cleanup().await;
            continue;
        }
        let project = projects::ensure_default(&t.state).await.unwrap().id;
        mqtt_product(&t, &project).await;
        let (ids, package) = meters_and_package(&t, &project, 3).await;
        let instance = |id: &str| instance_on(&t, id, None);
        let (a, b) = (instance("a"), instance("b"));
        for s in [&a, &b] {
            s.driver.set_downlink(Arc::new(Sent::default()));
            cluster::join(s, "").await.unwrap();
        }
        let task = software_task(&a, &project, &package.id, &ids, "cut_short").await;
        // A marked it running, then died before its subtasks began.
        e::tasks::Entity::update_many()
            .col_expr(
                e::tasks::Column::Status,
                sea_orm::sea_query::Expr::value("Processing"),
            )
            .filter(e::tasks::Column::Id.eq(task.id.clone()))
            .exec(&t.state.db)
            .await
            .unwrap();
        let pending = || async {
            subtasks::Entity::find()
                .filter(subtasks::Column::TaskId.eq(task.id.clone()))
                .filter(subtasks::Column::Step.eq("pending"))
                .all(&t.state.db)
                .await
                .unwrap()
                .len()
        };
        assert_eq!(pending().await, 3);
        let beat = cluster::beat(&b, &b.driver).await.unwrap();
        assert_eq!(
            (beat.reaped.len(), pending().await),
            (0, 3),
            "A is alive until its lease passes"
        );
        t.clock
            .advance(b.settings.cluster.lease + Duration::from_secs(1));
        let beat = cluster::beat(&b, &b.driver).await.unwrap();
        assert_eq!(beat.reaped, ["a"]);
        assert_eq!(beat.starts_resumed, 1);
        assert_eq!(pending().await, 0, "B began the rest");
        t.cleanup().await;
    }
}

/// The stored counts behind `/metrics` read alike on SQLite and PostgreSQL: subtasks by status, step and
/// protocol, tasks by status, the notification backlog.
#[tokio::test]
async fn the_metrics_count_what_is_stored_on_every_database() {
    for t in databases().await {
        let project = projects::ensure_default(&t.state).await.unwrap().id;
        mqtt_product(&t, &project).await;
        let (ids, package) = meters_and_package(&t, &project, 3).await;
        software_task(&t.state, &project, &package.id, &ids, "counted").await;
        let metrics = &t.state.metrics;
        metrics.refresh(&t.state.db).await.unwrap();
        let text = metrics.encode();
        let waiting = text
            .lines()
            .find(|l| l.starts_with("updraft_subtasks{") && l.contains(r#"status="Waitting""#))
            .unwrap_or_else(|| panic!("{}: no waiting subtasks in\n{text}", t.kind));
        assert!(
            waiting.contains(r#"protocol="MQTT""#),
            "{}: {waiting}",
            t.kind
        );
        assert!(waiting.ends_with(" 3"), "{}: {waiting}", t.kind);
        assert!(
            text.lines()
                .any(|l| l.starts_with("updraft_tasks{") && l.ends_with(" 1")),
            "{}: {text}",
            t.kind
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("updraft_outbox_backlog ")),
            "{}: {text}",
            t.kind
        );
        t.cleanup().await;
    }
}

/// The audit trail keeps entries for `audit.retention` and lists them newest first, filtered.
#[tokio::test]
async fn audit_entries_are_kept_for_their_retention_and_listed_newest_first() {
    use backend::service::audit;
    for t in databases().await {
        let project = projects::ensure_default(&t.state).await.unwrap().id;
        let entry = |action: &str, actor: &str| audit::Entry {
            project_id: Some(project.clone()),
            actor_type: audit::ActorType::User,
            actor: actor.to_owned(),
            source: Some("10.0.0.1".to_owned()),
            action: action.to_owned(),
            resource_type: Some("batchtasks".to_owned()),
            resource_id: Some("t1".to_owned()),
            success: true,
            status: Some(200),
            detail: None,
            request_id: None,
        };
        audit::record(&t.state, entry("old", "alice")).await;
        t.clock.advance(Duration::from_secs(100 * 86_400));
        audit::record(&t.state, entry("newer", "bob")).await;
        let all = audit::Filter {
            limit: 10,
            ..Default::default()
        };
        let (rows, count) = audit::list(&t.state, &project, &all).await.unwrap();
        assert_eq!(count, 2, "{}", t.kind);
        assert_eq!(rows[0].action, "newer", "{}", t.kind);
        let bobs = audit::Filter {
            actor: Some("bob".to_owned()),
            ..all.clone()
        };
        assert_eq!(audit::list(&t.state, &project, &bobs).await.unwrap().1, 1);
        t.clock.advance(Duration::from_secs(81 * 86_400));
        let retention = Duration::from_secs(180 * 86_400);
        assert_eq!(
            audit::prune(&t.state, retention).await.unwrap(),
            1,
            "{}",
            t.kind
        );
        let (rows, _) = audit::list(&t.state, &project, &all).await.unwrap();
        assert_eq!(rows.len(), 1, "{}", t.kind);
        assert_eq!(rows[0].action, "newer", "{}", t.kind);
        t.cleanup().await;
    }
}
