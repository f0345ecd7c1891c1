//! What operators and devices ask of the driver: stop, retry and refresh (through `service::tasks`), and
//! device events (through the MQTT and CoAP adapters). Each becomes inputs to [`Driver::apply_in`].

use domain::task::SubtaskStatus;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};

use super::transition::refresh_task;
use super::{BATCH, DeviceEvent, Driver, Step};
use crate::storage::entity::subtasks;
use crate::{Context, Result, tokens};

impl Driver {
    /// Carries a whole-task stop through, from a task already marked `Stopping`: every open subtask is
    /// stopped, the task's download tokens are revoked, and the task's status follows. Each step is
    /// idempotent, so a stop cut short by a crash is carried through again at start-up (and by a second
    /// stop request) with the same outcome.
    pub(crate) async fn finish_stop(&self, state: &Context, task_id: &str) -> Result<()> {
        let open: Vec<&str> = SubtaskStatus::OPEN.iter().map(|s| s.as_str()).collect();
        let ids: Vec<i64> = subtasks::Entity::find()
            .select_only()
            .column(subtasks::Column::Id)
            .filter(subtasks::Column::TaskId.eq(task_id))
            .filter(subtasks::Column::Status.is_in(open))
            .into_tuple()
            .all(&state.db)
            .await?;
        self.command(state, ids, Step::Stop).await?;
        tokens::revoke_task(&state.db, state.clock.now(), task_id).await?;
        self.refresh(state, task_id).await
    }

    /// Re-derives a task's status from its counters (after a stop, or a start with nothing to do).
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub(crate) async fn refresh(&self, state: &Context, task_id: &str) -> Result<()> {
        let events = {
            let _w = self.inner.write.lock().await;
            let txn = crate::db::begin_write(&state.db).await?;
            let mut events = Vec::new();
            refresh_task(&txn, task_id, state.clock.now(), &mut events).await?;
            self.own_records(&events);
            txn.commit().await?;
            events
        };
        self.publish_events(events);
        Ok(())
    }

    /// Applies an operator command (`Start` to retry, `Stop`) to the given subtasks.
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub(crate) async fn command(
        &self,
        state: &Context,
        subtask_ids: Vec<i64>,
        input: Step<'static>,
    ) -> Result<()> {
        for chunk in subtask_ids.chunks(BATCH as usize) {
            self.apply(state, chunk.to_vec(), input.clone()).await?;
        }
        Ok(())
    }

    /// Restarts subtasks (an operator retry): each is told whether its device is connected now, read
    /// under the device's lock when the retry is applied (finished subtasks stop following connects and
    /// disconnects), then started.
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub(crate) async fn restart(&self, state: &Context, subtask_ids: Vec<i64>) -> Result<()> {
        for chunk in subtask_ids.chunks(BATCH as usize) {
            let steps = chunk
                .iter()
                .map(|id| (*id, Step::Start { online: false }))
                .collect();
            self.apply_in(state, steps, &[]).await?;
        }
        Ok(())
    }

    /// Feeds a device event to the device's open subtasks, and records its online state and versions.
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub async fn device_event(
        &self,
        state: &Context,
        device_id: &str,
        event: DeviceEvent,
    ) -> Result<()> {
        self.device_events(state, vec![(device_id.to_owned(), event)])
            .await
    }

    /// [`Driver::device_event`] for many events at once (in order), in one transaction each for the
    /// device records and the subtasks: what the MQTT adapter hands over when messages arrive together.
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub async fn device_events(
        &self,
        state: &Context,
        events: Vec<(String, DeviceEvent)>,
    ) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let events = super::gateways::through_gateways(state, events).await?;
        // The device's open subtasks are looked up under the write lock (in `apply_once`): a task
        // starting meanwhile either sees the device's new state or is seen by the lookup.
        self.apply_in(state, Vec::new(), &events).await
    }
}
