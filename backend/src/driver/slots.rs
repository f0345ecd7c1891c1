//! Per-cell download slots of LwM2M devices (`design.md`, LwM2M steps 7-9): devices of one cell and
//! coverage class download at most `cap` at a time; the rest wait in the order they asked.
//!
//! The slots live in memory and are rebuilt from the subtasks at start-up ([`super::Driver::recover`]):
//! a `downloading` subtask holds its slot, a `wait_slot` one queues. A grant whose subtask no longer waits
//! (it was stopped meanwhile) is handed back and goes to the next in line. The driver's side of them
//! (rebuilding, granting, sweeping out holders that ended elsewhere) is the `impl Driver` below.

use std::collections::{HashMap, HashSet, VecDeque};

use domain::flow::lwm2m::{self, Class, Slot};
use domain::task::SubtaskStatus;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::{BATCH, Driver, Step};
use crate::storage::entity::subtasks;
use crate::{Context, Result};

#[derive(Debug, Default)]
struct Cell {
    cap: u32,
    held: HashSet<i64>,
    queue: VecDeque<i64>,
}

impl Cell {
    fn has_room(&self) -> bool {
        self.held.len() < self.cap as usize
    }

    /// Moves waiters into free places; returns who got one.
    fn fill(&mut self, granted: &mut Vec<i64>) {
        while self.has_room() {
            let Some(next) = self.queue.pop_front() else {
                break;
            };
            if self.held.insert(next) {
                granted.push(next);
            }
        }
    }
}

/// The slot table.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    cells: HashMap<(u32, Class), Cell>,
    /// Where each subtask holds or waits.
    of: HashMap<i64, (u32, Class)>,
}

impl Slots {
    fn cell(&mut self, slot: Slot) -> &mut Cell {
        let cell = self.cells.entry((slot.cell, slot.class)).or_default();
        // The cap is configuration: the newest ask says what it is now.
        cell.cap = slot.cap;
        cell
    }

    /// `subtask` asks for `slot`: granted at once when there is room (returned), queued otherwise.
    pub(crate) fn ask(&mut self, subtask: i64, slot: Slot, granted: &mut Vec<i64>) {
        if let Some(key) = self.of.get(&subtask).copied() {
            if key == (slot.cell, slot.class) {
                let cell = self.cell(slot);
                if cell.held.contains(&subtask) {
                    // Asked again while holding (a retry after a lost grant): it holds it already.
                    granted.push(subtask);
                    return;
                }
                if cell.queue.contains(&subtask) {
                    return;
                }
            } else {
                self.release(subtask, granted);
            }
        }
        self.of.insert(subtask, (slot.cell, slot.class));
        let cell = self.cell(slot);
        cell.queue.push_back(subtask);
        cell.fill(granted);
    }

    /// `subtask` holds `slot` (rebuilt at start-up).
    pub(crate) fn hold(&mut self, subtask: i64, slot: Slot) {
        self.of.insert(subtask, (slot.cell, slot.class));
        self.cell(slot).held.insert(subtask);
    }

    /// `subtask` gives its slot back (or stops waiting); the freed place goes to the next in line.
    pub(crate) fn release(&mut self, subtask: i64, granted: &mut Vec<i64>) {
        let Some(key) = self.of.remove(&subtask) else {
            return;
        };
        if let Some(cell) = self.cells.get_mut(&key) {
            cell.held.remove(&subtask);
            cell.queue.retain(|s| *s != subtask);
            cell.fill(granted);
            if cell.held.is_empty() && cell.queue.is_empty() {
                self.cells.remove(&key);
            }
        }
    }

    /// Every subtask holding a slot.
    pub(crate) fn holders(&self) -> Vec<i64> {
        self.cells
            .values()
            .flat_map(|c| c.held.iter().copied())
            .collect()
    }

    /// Devices downloading in `cell` with `class` now.
    #[cfg(test)]
    pub(crate) fn held(&self, cell: u32, class: Class) -> usize {
        self.cells.get(&(cell, class)).map_or(0, |c| c.held.len())
    }
}

impl Driver {
    /// Rebuilds the LwM2M download slots from the subtasks (at start-up): downloading subtasks hold
    /// theirs, waiting ones queue in the order they started waiting, and free places are granted.
    pub(super) async fn recover_slots(&self, state: &Context) -> Result<()> {
        let rows: Vec<(i64, String, Option<String>)> = subtasks::Entity::find()
            .select_only()
            .column(subtasks::Column::Id)
            .column(subtasks::Column::Step)
            .column(subtasks::Column::Machine)
            .filter(subtasks::Column::Status.eq(SubtaskStatus::Processing.as_str()))
            .filter(subtasks::Column::Step.is_in(["downloading", "wait_slot"]))
            .order_by_asc(subtasks::Column::UpdatedAt)
            .order_by_asc(subtasks::Column::Id)
            .into_tuple()
            .all(&state.db)
            .await?;
        let mut granted = Vec::new();
        {
            let mut slots = self.slots();
            for (id, _, json) in &rows {
                let Some(machine) = json
                    .as_deref()
                    .and_then(|j| serde_json::from_str::<lwm2m::Subtask>(j).ok())
                else {
                    continue;
                };
                match machine.phase {
                    lwm2m::Phase::Downloading { slot, .. } => slots.hold(*id, slot),
                    lwm2m::Phase::WaitSlot { slot } => slots.ask(*id, slot, &mut granted),
                    _ => {}
                }
            }
        }
        self.grant(state, granted).await
    }

    /// Hands granted slots to their subtasks (see [`Driver::apply_in`]).
    pub(super) async fn grant(&self, state: &Context, granted: Vec<i64>) -> Result<()> {
        let steps = granted
            .into_iter()
            .map(|id| (id, Step::Lwm2m(lwm2m::Input::SlotGranted)))
            .collect();
        self.apply_in(state, steps, &[]).await
    }

    /// Frees slots whose holders ended without this process seeing it (stopped from the command line,
    /// or by another instance).
    pub(super) async fn sweep_slots(&self, state: &Context) -> Result<()> {
        let holders = self.slots().holders();
        if holders.is_empty() {
            return Ok(());
        }
        let mut still = std::collections::HashSet::new();
        for chunk in holders.chunks(BATCH as usize) {
            let ids: Vec<i64> = subtasks::Entity::find()
                .select_only()
                .column(subtasks::Column::Id)
                .filter(subtasks::Column::Id.is_in(chunk.to_vec()))
                // Not the step: a subtask granted a slot a moment ago still says `wait_slot`.
                .filter(subtasks::Column::Status.eq(SubtaskStatus::Processing.as_str()))
                .into_tuple()
                .all(&state.db)
                .await?;
            still.extend(ids);
        }
        let mut granted = Vec::new();
        {
            let mut slots = self.slots();
            for id in holders {
                if !still.contains(&id) {
                    slots.release(id, &mut granted);
                }
            }
        }
        self.grant(state, granted).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(cell: u32, cap: u32) -> Slot {
        Slot {
            cell,
            class: Class::Range1,
            cap,
        }
    }

    #[test]
    fn a_cell_admits_its_cap_and_queues_the_rest_in_order() {
        let mut s = Slots::default();
        let mut granted = Vec::new();
        for id in 1..=4 {
            s.ask(id, slot(7, 2), &mut granted);
        }
        s.ask(9, slot(8, 2), &mut granted);
        assert_eq!(granted, [1, 2, 9]);
        assert_eq!(s.held(7, Class::Range1), 2);
        granted.clear();
        s.release(2, &mut granted);
        assert_eq!(granted, [3]);
        granted.clear();
        // A waiter that leaves gives up its place in the queue.
        s.release(4, &mut granted);
        s.release(1, &mut granted);
        s.release(3, &mut granted);
        assert!(granted.is_empty());
        assert_eq!(s.held(7, Class::Range1), 0);
        // Classes of one cell are counted apart.
        let poor = Slot {
            cell: 8,
            class: Class::Range2,
            cap: 1,
        };
        s.ask(10, poor, &mut granted);
        s.ask(11, poor, &mut granted);
        assert_eq!(granted, [10]);
        assert_eq!(s.held(8, Class::Range2), 1);
    }

    #[test]
    fn asking_twice_neither_queues_twice_nor_holds_twice() {
        let mut s = Slots::default();
        let mut granted = Vec::new();
        s.ask(1, slot(7, 1), &mut granted);
        s.ask(1, slot(7, 1), &mut granted);
        assert_eq!(granted, [1, 1], "a holder asking again is told it holds");
        s.ask(2, slot(7, 1), &mut granted);
        s.ask(2, slot(7, 1), &mut granted);
        granted.clear();
        s.release(1, &mut granted);
        assert_eq!(granted, [2]);
        granted.clear();
        s.release(2, &mut granted);
        assert!(granted.is_empty());
        s.hold(5, slot(7, 1));
        s.ask(6, slot(7, 1), &mut granted);
        assert!(granted.is_empty(), "rebuilt holders count");
    }
}
