//! `GET /events`: the console's live updates, a server-sent event stream of the task driver's outbox
//! records for the caller's project (optionally one task's).
//!
//! Each event is named by its kind (`task.changed`, `subtask.changed`) and carries the record as JSON.
//! A client that falls behind by more than the broadcast buffer gets one `resync` event and should
//! reload what it shows. The stream ends when the server shuts down, and when the console session that
//! opened it ends (sign-out, expiry, a password change), checked every [`SESSION_RECHECK`].

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum_extra::extract::CookieJar;
use backend::driver::Event;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::ServerState;
use super::iotda::IotdaError;
use super::signed::Caller;

/// How often an open stream checks that its session still exists.
const SESSION_RECHECK: Duration = Duration::from_secs(30);

/// `?task_id=`: only this task's events.
#[derive(Debug, Deserialize)]
pub(super) struct EventsQuery {
    #[serde(default)]
    task_id: Option<String>,
}

/// `GET /events`
pub(super) async fn stream(
    State(state): State<ServerState>,
    jar: CookieJar,
    caller: Option<Extension<Caller>>,
    Query(query): Query<EventsQuery>,
) -> Response {
    let Some(Extension(caller)) = caller else {
        return IotdaError::unauthorized("not signed in").into_response();
    };
    let session = jar
        .get(super::auth::SESSION_COOKIE)
        .map(|c| c.value().to_owned());
    // One caller's streams are counted (its session, or its access key): each holds a connection and a
    // subscription to every change.
    let who = match (&session, &caller.access_key) {
        (Some(token), _) => format!("session:{}", backend::ids::sha256_hex(token)),
        (None, Some(ak)) => format!("key:{ak}"),
        (None, None) => format!("project:{}", caller.project_id),
    };
    let Some(place) = state.guards.stream(&who) else {
        return IotdaError::too_many(format!(
            "at most {} event streams per session or access key are open at once",
            super::guards::STREAMS_PER_CALLER
        ))
        .into_response();
    };
    let filter = Filter {
        project_id: caller.project_id,
        task_id: query.task_id.filter(|t| !t.is_empty()),
    };
    let receiver = state.app.driver.subscribe();
    let events = futures::stream::unfold(receiver, |mut rx| async move {
        match rx.recv().await {
            Ok(event) => Some((Some(event), rx)),
            Err(RecvError::Lagged(_)) => Some((None, rx)),
            Err(RecvError::Closed) => None,
        }
    })
    .filter_map(move |event| std::future::ready(filter.frame(event.as_ref())))
    // The place is held as long as the stream lives.
    .map(move |frame| {
        let _held = &place;
        frame
    });
    let stopping = state.stopping.clone();
    let app = state.app.clone();
    let session_ended = async move {
        // A signed API caller proved itself once; a console session can end while the stream is open.
        let Some(token) = session else {
            return std::future::pending().await;
        };
        let mut every = tokio::time::interval(SESSION_RECHECK);
        every.tick().await;
        loop {
            every.tick().await;
            if backend::service::auth::authenticate(&app, &token)
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let events = events.take_until(async move {
        tokio::select! {
            () = stopping.cancelled() => {}
            () = session_ended => {}
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Which events one stream carries.
#[derive(Debug)]
struct Filter {
    project_id: String,
    task_id: Option<String>,
}

impl Filter {
    /// The frame for `event` (`None`: missed events, so a `resync`), or nothing if it is not for this
    /// stream.
    fn frame(&self, event: Option<&Event>) -> Option<Result<SseEvent, Infallible>> {
        let Some(event) = event else {
            return Some(Ok(SseEvent::default().event("resync").data("{}")));
        };
        let (project_id, task_id, kind) = match event {
            Event::Subtask {
                project_id,
                task_id,
                ..
            } => (project_id, task_id, "subtask.changed"),
            Event::Task {
                project_id,
                task_id,
                ..
            } => (project_id, task_id, "task.changed"),
        };
        if *project_id != self.project_id || self.task_id.as_ref().is_some_and(|t| t != task_id) {
            return None;
        }
        let frame = SseEvent::default().event(kind).json_data(event).ok()?;
        Some(Ok(frame))
    }
}
