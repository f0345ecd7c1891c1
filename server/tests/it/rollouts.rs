//! Safe rollouts end to end (README, "Safe rollouts"): simulated MQTT devices upgrade in waves; a wave
//! failing past its threshold pauses the task with nothing started beyond it, across a restart, until it
//! is resumed through the API; pacing and maintenance windows hold starts back on the manual clock.

use std::time::Duration;

use backend::service::{groups, tasks};
use backend::storage::entity::{outbox, subtasks};
use domain::rollout::Rollout;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use server::sim::{Behaviour, SimDevice, SimOptions};

use crate::api::{application, json_of};
use crate::helpers::{TestApp, settings_for, spawn_app, spawn_on_clock};
use crate::tasks::{
    Fixture, fixture, fleet, new_task, register, subtask_rows, wait_device_status, wait_task,
};

fn rollout(json: Value) -> Option<Rollout> {
    Some(serde_json::from_value(json).unwrap())
}

async fn devices(app: &TestApp, fx: &Fixture, prefix: &str, n: usize) -> Vec<SimDevice> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(register(app, fx, &format!("{prefix}-{i:02}")).await);
    }
    out
}

/// The started subtasks (begun: no longer at the `pending` step) and the waves they are in.
async fn started(app: &TestApp, task_id: &str) -> Vec<(String, i32)> {
    subtask_rows(app, task_id)
        .await
        .into_iter()
        .filter(|s| s.step != "pending")
        .map(|s| (s.device_id, s.wave))
        .collect()
}

fn status_is(status: &'static str) -> impl Fn(&backend::storage::entity::tasks::Model) -> bool {
    move |t| t.status == status
}

/// A 4-wave task whose canary wave fails past its threshold: it pauses with nothing started in later
/// waves, stays paused across a restart, and resumed through the API runs the other waves to the end.
#[tokio::test]
async fn a_failing_canary_wave_pauses_the_task_until_it_is_resumed_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let canaries = devices(&app, &fx, "canary", 2).await;
    let fleet_devices = devices(&app, &fx, "fleet", 18).await;
    let group = groups::create(&app.state, &fx.project, "canaries", "")
        .await
        .unwrap();
    for c in &canaries {
        groups::add_device(&app.state, &fx.project, &group.id, &c.device_id)
            .await
            .unwrap();
    }
    // The canaries refuse the upgrade; everyone else upgrades.
    let bad = fleet(
        &app,
        canaries.clone(),
        SimOptions {
            behaviour: Behaviour::Refuse,
            ..Default::default()
        },
    );
    let good = fleet(&app, fleet_devices.clone(), SimOptions::default());
    for d in canaries.iter().chain(&fleet_devices) {
        wait_device_status(&app, &d.device_id, "ONLINE").await;
    }
    let all: Vec<&SimDevice> = canaries.iter().chain(&fleet_devices).collect();
    let mut new = new_task(&fx, "canary_first", &all);
    new.rollout = rollout(json!({
        "waves": [
            {"group_ids": [group.id], "error_threshold": {"max_failures": 0, "count": ["device_failure"]}},
            {"percent": 25},
            {"percent": 50},
        ],
    }));
    let task = tasks::create(&app.state, &fx.project, new).await.unwrap();
    let paused = wait_task(&app, &fx, &task.id, "Paused", status_is("Paused")).await;
    // One or both canaries may have failed by the time the driver decides.
    let desc = &paused.status_desc;
    assert!(
        desc.starts_with("paused: wave 1 error threshold: ")
            && desc.ends_with("failed, more than the 0 allowed"),
        "{desc}"
    );
    // Nothing beyond the canaries started.
    let begun = started(&app, &task.id).await;
    assert!(
        begun
            .iter()
            .all(|(d, w)| d.starts_with("canary") && *w == 0),
        "{begun:?}"
    );
    // The waves are 2 canaries, 25 % and 50 % of 20 (5 and 10), and the 3 left.
    let mut sizes = [0; 4];
    for s in subtask_rows(&app, &task.id).await {
        sizes[usize::try_from(s.wave).unwrap()] += 1;
    }
    assert_eq!(sizes, [2, 5, 10, 3]);
    // The pause is notified (the outbox feeds webhooks and the console).
    let records = outbox::Entity::find()
        .filter(outbox::Column::AggregateId.eq(task.id.as_str()))
        .all(&app.state.db)
        .await
        .unwrap();
    assert!(
        records
            .iter()
            .any(|r| r.payload.contains("\"status\":\"Paused\"")
                && r.payload.contains("wave 1 error threshold")),
        "the pause and its reason are notified"
    );
    // Wait for the second canary too (the task stays paused while it finishes).
    wait_task(&app, &fx, &task.id, "both canaries done", |t| t.fail == 2).await;

    // A restart: still paused, still nothing more started.
    bad.stop().await;
    good.stop().await;
    let clock = app.clock.clone();
    app.stop().await;
    let app = spawn_on_clock(settings_for(dir.path()), clock).await;
    app.state.driver.run_due(&app.state).await.unwrap();
    let t = tasks::get(&app.state, &fx.project, &task.id).await.unwrap();
    assert_eq!(t.status, "Paused");
    assert_eq!(started(&app, &task.id).await.len(), 2);

    // ShowBatchTask shows the rollout and why it paused; ResumeBatchTask continues it.
    let good = fleet(&app, fleet_devices.clone(), SimOptions::default());
    for d in &fleet_devices {
        wait_device_status(&app, &d.device_id, "ONLINE").await;
    }
    let api = application(&app, &fx.project).await;
    let shown = json_of(
        api.call("GET", &format!("/batchtasks/{}", task.id), &[], None)
            .await,
        200,
    )
    .await;
    let r = &shown["batchtask"]["rollout"];
    assert_eq!(shown["batchtask"]["status"], "Paused");
    assert!(
        r["state"]["paused"]["reason"]
            .as_str()
            .unwrap()
            .contains("wave 1")
    );
    assert_eq!(r["waves"][0]["failed"], 2);
    assert_eq!(r["waves"][1]["pending"], 5);
    assert_eq!(r["policy"]["waves"].as_array().unwrap().len(), 4);
    let resumed = json_of(
        api.call(
            "POST",
            &format!("/batchtasks/{}/resume", task.id),
            &[],
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(
        resumed["rollout"]["state"]["wave"], 1,
        "the failed wave is accepted"
    );
    let done = wait_task(
        &app,
        &fx,
        &task.id,
        "PartialSuccess",
        status_is("PartialSuccess"),
    )
    .await;
    assert_eq!((done.success, done.fail), (18, 2));
    // Resuming what is not paused is a conflict.
    let again = api
        .call(
            "POST",
            &format!("/batchtasks/{}/resume", task.id),
            &[],
            None,
        )
        .await;
    assert_eq!(again.status(), 409);
    good.stop().await;
    app.stop().await;
}

/// `max_per_minute` on the manual clock: never more starts in a minute than allowed, and the rest start
/// as the minute passes.
#[tokio::test]
async fn pacing_starts_at_most_n_devices_per_minute() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let fleet_devices = devices(&app, &fx, "paced", 12).await;
    let f = fleet(&app, fleet_devices.clone(), SimOptions::default());
    for d in &fleet_devices {
        wait_device_status(&app, &d.device_id, "ONLINE").await;
    }
    let all: Vec<&SimDevice> = fleet_devices.iter().collect();
    let mut new = new_task(&fx, "paced", &all);
    new.rollout = rollout(json!({"max_per_minute": 5}));
    let task = tasks::create(&app.state, &fx.project, new).await.unwrap();
    wait_task(&app, &fx, &task.id, "5 done", |t| t.success == 5).await;
    // Half a minute later: still 5.
    app.clock.advance(Duration::from_secs(30));
    app.state.driver.run_due(&app.state).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(started(&app, &task.id).await.len(), 5);
    // A minute after the first starts, 5 more.
    app.clock.advance(Duration::from_secs(30));
    app.state.driver.run_due(&app.state).await.unwrap();
    wait_task(&app, &fx, &task.id, "10 done", |t| t.success == 10).await;
    assert_eq!(started(&app, &task.id).await.len(), 10);
    app.clock.advance(Duration::from_secs(60));
    app.state.driver.run_due(&app.state).await.unwrap();
    let done = wait_task(&app, &fx, &task.id, "Success", status_is("Success")).await;
    assert_eq!(done.success, 12);
    // No 60-second window holds more than 5 starts.
    let starts: Vec<i64> = subtask_rows(&app, &task.id)
        .await
        .iter()
        .map(|s| s.started_at.unwrap())
        .collect();
    for a in &starts {
        let n = starts
            .iter()
            .filter(|s| **s >= *a && **s < a + 60_000)
            .count();
        assert!(n <= 5, "{n} starts in the minute from {a}: {starts:?}");
    }
    f.stop().await;
    app.stop().await;
}

/// A maintenance window: nothing starts before it opens; devices started inside it finish after it
/// closes.
#[tokio::test]
async fn nothing_starts_outside_the_maintenance_window_and_started_devices_finish_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let fx = fixture(&app).await;
    let fleet_devices = devices(&app, &fx, "night", 4).await;
    let all: Vec<&SimDevice> = fleet_devices.iter().collect();
    // The clock stands at 11:06:40 UTC: the window opens at 13:00 and closes at 14:00.
    let mut new = new_task(&fx, "windowed", &all);
    new.rollout = rollout(json!({
        "maintenance_windows": [{"start": "13:00", "end": "14:00", "time_zone": "UTC"}],
    }));
    let task = tasks::create(&app.state, &fx.project, new).await.unwrap();
    app.state.driver.run_due(&app.state).await.unwrap();
    assert!(
        started(&app, &task.id).await.is_empty(),
        "before the window"
    );
    let t = tasks::get(&app.state, &fx.project, &task.id).await.unwrap();
    assert_eq!(
        t.rollout_wake_at.map(|w| w % 86_400_000),
        Some(13 * 3_600_000)
    );
    // 13:00: every device starts (they are offline: they wait for their devices).
    app.clock.advance(Duration::from_millis(
        u64::try_from(13 * 3_600_000 - 40_000_000).unwrap(),
    ));
    app.state.driver.run_due(&app.state).await.unwrap();
    assert_eq!(started(&app, &task.id).await.len(), 4);
    // 14:30, the window closed: the devices connect and finish anyway.
    app.clock.advance(Duration::from_secs(90 * 60));
    let f = fleet(&app, fleet_devices.clone(), SimOptions::default());
    let done = wait_task(&app, &fx, &task.id, "Success", status_is("Success")).await;
    assert_eq!(done.success, 4);
    let rows = subtasks::Entity::find()
        .filter(subtasks::Column::TaskId.eq(task.id.as_str()))
        .all(&app.state.db)
        .await
        .unwrap();
    assert!(
        rows.iter()
            .all(|s| s.finished_at.unwrap() % 86_400_000 > 14 * 3_600_000)
    );
    f.stop().await;
    app.stop().await;
}

/// A pause and a resume reach a `batchtask` subscriber as signed notifications, the pause with its
/// reason.
#[tokio::test]
async fn a_pause_and_a_resume_are_pushed_to_subscribers_with_the_reason() {
    use crate::notifications::{app_with_receiver, eventually, receiver};
    let dir = tempfile::tempdir().unwrap();
    let (addr, received, ca) = receiver().await;
    let app = app_with_receiver(dir.path(), &ca).await;
    let fx = fixture(&app).await;
    let url = format!("https://localhost:{}/hook", addr.port());
    backend::service::subscriptions::create(&app.state, &fx.project, "batchtask", "update", &url)
        .await
        .unwrap();
    let refusing = devices(&app, &fx, "refusing", 3).await;
    let f = fleet(
        &app,
        refusing.clone(),
        SimOptions {
            behaviour: Behaviour::Refuse,
            ..Default::default()
        },
    );
    for d in &refusing {
        wait_device_status(&app, &d.device_id, "ONLINE").await;
    }
    let all: Vec<&SimDevice> = refusing.iter().collect();
    let mut new = new_task(&fx, "pushed", &all);
    new.rollout = rollout(json!({
        "waves": [{"count": 1, "error_threshold": {"max_failures": 0}}],
    }));
    let task = tasks::create(&app.state, &fx.project, new).await.unwrap();
    wait_task(&app, &fx, &task.id, "Paused", status_is("Paused")).await;
    let statuses = || -> Vec<(String, String)> {
        received
            .accepted()
            .into_iter()
            .map(|(_, b)| b["notify_data"]["body"].clone())
            .filter(|b| b["task_id"] == task.id.as_str())
            .map(|b| {
                (
                    b["status"].as_str().unwrap_or("").to_owned(),
                    b["status_desc"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    eventually("the pause notified", || {
        statuses().iter().any(|(s, d)| {
            s == "Paused"
                && d == "paused: wave 1 error threshold: 1 device failed, more than the 0 allowed"
        })
    })
    .await;
    tasks::resume(&app.state, &fx.project, &task.id)
        .await
        .unwrap();
    eventually("the resume notified after the pause", || {
        let seen = statuses();
        let paused = seen.iter().position(|(s, _)| s == "Paused");
        paused.is_some_and(|p| seen[p..].iter().any(|(s, _)| s != "Paused"))
    })
    .await;
    f.stop().await;
    app.stop().await;
}
