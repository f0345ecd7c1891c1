//! The outbox tail: every process that serves live views broadcasts the outbox records other processes
//! wrote (another instance, or a command-line process stopping a task), so a console on any of them shows
//! every change. Records this process wrote are broadcast when their transaction commits and skipped here.
//!
//! A record is read once the tail passes its id. Ids come from one sequence, but on PostgreSQL transactions
//! commit in any order: an id the tail passed without finding it (a *gap*) may belong to a transaction not
//! committed yet, so gaps are looked for again on every pass for [`GAP_WAIT`], then given up (a transaction
//! that rolled back leaves its id unused for ever). On SQLite writers are serialised and gaps are rare.

use std::time::Duration;

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tokio_util::sync::CancellationToken;

use super::{Driver, Event, lock};
use crate::storage::entity::outbox;
use crate::{Context, Result};

/// How often the tail looks for new records.
const EVERY: Duration = Duration::from_millis(250);

/// Records read per look, at most.
const BATCH: u64 = 500;

/// How long an id the tail passed without finding it is looked for again. Far longer than a transition's
/// transaction takes to commit.
pub(super) const GAP_WAIT: Duration = Duration::from_secs(10);

/// Gaps looked for at most (a sequence jump after a large rollback would otherwise be tracked id by id).
const MAX_GAPS: usize = 10_000;

impl Driver {
    /// Where a tail starts: after the newest outbox record now (history is not replayed).
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub async fn outbox_head(&self, state: &Context) -> Result<i64> {
        // From now on this process's own records are noted, so its tail can skip them (records written
        // before are at or below the head).
        self.inner
            .tailing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let head: Option<i64> = outbox::Entity::find()
            .select_only()
            .column_as(outbox::Column::Id.max(), "m")
            .into_tuple::<Option<i64>>()
            .one(&state.db)
            .await?
            .flatten();
        Ok(head.unwrap_or(0))
    }

    /// Broadcasts the outbox records after `after` that other processes wrote (at most [`BATCH`]);
    /// returns the position to go on from.
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub async fn tail_outbox(&self, state: &Context, after: i64) -> Result<i64> {
        let waiting: Vec<i64> = {
            let mut gaps = lock(&self.inner.gaps);
            gaps.retain(|_, since| since.elapsed() < GAP_WAIT);
            gaps.keys().copied().collect()
        };
        let mut wanted = sea_orm::Condition::any().add(outbox::Column::Id.gt(after));
        if !waiting.is_empty() {
            wanted = wanted.add(outbox::Column::Id.is_in(waiting));
        }
        let rows: Vec<(i64, String)> = outbox::Entity::find()
            .select_only()
            .column(outbox::Column::Id)
            .column(outbox::Column::Payload)
            .filter(wanted)
            .order_by_asc(outbox::Column::Id)
            .limit(BATCH)
            .into_tuple()
            .all(&state.db)
            .await?;
        let last = rows.last().map_or(after, |(id, _)| *id).max(after);
        let foreign: Vec<(i64, String)> = {
            let mut gaps = lock(&self.inner.gaps);
            let mut expected = after + 1;
            for (id, _) in &rows {
                gaps.remove(id);
                while expected < *id && gaps.len() < MAX_GAPS {
                    gaps.insert(expected, std::time::Instant::now());
                    expected += 1;
                }
                expected = expected.max(id + 1);
            }
            let mut own = lock(&self.inner.own_records);
            let foreign = rows.into_iter().filter(|(id, _)| !own.remove(id)).collect();
            // Ids at or below `last` will not be read again, unless they are gaps.
            own.retain(|id| *id > last || gaps.contains_key(id));
            foreign
        };
        for (id, payload) in foreign {
            match serde_json::from_str::<Event>(&payload) {
                // No receiver is fine: nobody is watching.
                Ok(event) => drop(self.inner.events.send(event)),
                Err(e) => {
                    tracing::warn!(outbox_id = id, error.message = %e, "outbox record not understood");
                }
            }
        }
        Ok(last)
    }

    /// Runs the tail until `stop` is cancelled.
    pub async fn tail(&self, state: Context, stop: CancellationToken) {
        let mut after = loop {
            match self.outbox_head(&state).await {
                Ok(head) => break head,
                Err(e) => {
                    tracing::warn!(error.message = %e, "outbox tail: reading the head failed")
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(EVERY) => {}
            }
        };
        loop {
            if stop.is_cancelled() {
                return;
            }
            match self.tail_outbox(&state, after).await {
                Ok(next) if next != after => {
                    after = next;
                    // More may be waiting: look again at once.
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error.message = %e, "outbox tail: reading records failed"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(EVERY) => {}
            }
        }
    }
}
