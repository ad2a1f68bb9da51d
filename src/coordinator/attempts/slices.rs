//! Dynamic granularity in the life of a Query: when a slot is about to take the first Attempt
//! of a scan slice that the Query's `Granularity` finds too large for what its Stage still
//! has to read (queued, and left to its running slices), the slice is cut instead. Its Task is absorbed and stands for its pieces: new
//! Tasks of its Stage, numbered after the others, each reading one contiguous piece of the
//! slice (the worker narrows the plan's files, `planner::narrow_task_plan`). Consumers read
//! the pieces exactly as they read the pieces of a split partition: a shuffle reader takes them
//! with the other producers, a gather reads them one after the other as the Task's output.
//!
//! Only a slice whose one Attempt is still queued is cut; pieces are never cut again, and their
//! retries, recomputes and speculative Attempts read the piece they were given.

use std::sync::Arc;
use std::time::Instant;

use super::{Action, QueryRun, RunState, TaskId, TaskOutcome, TaskRun};
use crate::protocol::{SlicePiece, TaskKey, TaskState};

impl QueryRun {
    /// Cuts the Task of the queued Attempt `key` into pieces when its slice is too large for
    /// its share of what its Stage has left to read, on a cluster of `slots` slots; the pieces' first
    /// Attempts are queued. True when it was cut (the Attempt `key` is then gone).
    pub fn cut_slice(&mut self, key: &TaskKey, slots: usize, now: Instant, out: &mut Vec<Action>) -> bool {
        let Some(policy) = self.granularity.filter(|_| self.state == RunState::Running) else { return false };
        let id = (key.stage, key.task);
        let Some(bytes) = self.tasks.get(&id).filter(|t| key.attempt == 0 && waits_whole(t)).and_then(|t| t.slice_bytes) else {
            return false;
        };
        let queued: u64 = self
            .tasks
            .range((id.0, 0)..(id.0 + 1, 0))
            .filter(|(_, t)| waits_whole(t))
            .filter_map(|(_, t)| t.slice_bytes)
            .sum();
        let pieces = policy.pieces(bytes, queued.saturating_add(self.running_slice_bytes(id.0, now)), slots);
        if pieces < 2 {
            return false;
        }
        self.cut(id, pieces, now, out);
        true
    }

    fn cut(&mut self, id: TaskId, pieces: u32, now: Instant, out: &mut Vec<Action>) {
        let (stage, number) = id;
        let final_input = self.stages[stage as usize].consumers.is_empty();
        let first = self.tasks.range((stage, 0)..(stage + 1, 0)).next_back().map_or(0, |(&(_, t), _)| t + 1);
        let ids: Vec<u32> = (first..first + pieces).collect();
        let task = self.tasks.get_mut(&id).expect("a queued Attempt has a Task");
        // The queue drops the Attempt once it is no longer queued here.
        task.attempts.clear();
        task.slice_bytes = None;
        task.pieces = ids.clone();
        let (plan, partition, summary, reads) = (Arc::clone(&task.plan), task.partition, task.summary.clone(), Arc::clone(&task.reads));
        let weight = task.weight;
        for (index, &piece_number) in ids.iter().enumerate() {
            let mut piece = TaskRun::new(Arc::clone(&plan), partition, format!("{summary} (piece {} of {pieces})", index + 1));
            piece.reads = Arc::clone(&reads);
            piece.slice = Some(SlicePiece { index: index as u32, of: pieces });
            piece.weight = weight;
            piece.reads_text = Some(format!("piece {} of {pieces} of task {number}'s slice", index + 1));
            self.tasks.insert((stage, piece_number), piece);
        }
        self.absorb(id, final_input.then(|| TaskOutcome::Pieces(ids.iter().map(|&t| (stage, t)).collect())), out);
        let run = &mut self.stages[stage as usize];
        run.slices_cut += 1;
        run.slice_pieces += pieces;
        out.push(Action::SliceCut { pieces });
        self.schedule(now, out);
    }

    /// What the running whole slices of `stage` still have to read, estimated from how fast its
    /// finished slices were read. A slot busy with a slice it has just started is not about to
    /// go idle: cutting the last queued slice for it only adds a Task (a regression: q16's
    /// last partsupp slice was cut in two, read one after the other by the same slot, while
    /// the other slot read its equal slice whole). Without a finished slice to go by, a running
    /// one counts whole.
    fn running_slice_bytes(&self, stage: u32, now: Instant) -> u64 {
        let slices = || self.tasks.range((stage, 0)..(stage + 1, 0)).filter_map(|(_, t)| t.slice_bytes.map(|b| (t, b)));
        let (mut done_bytes, mut done_ms) = (0u64, 0u128);
        for (task, bytes) in slices() {
            let succeeded = task.output.and_then(|a| task.attempts.get(a as usize)).filter(|a| a.record.state == TaskState::Succeeded);
            if let Some((start, end)) = succeeded.and_then(|a| a.assigned_at.zip(a.ended_at)) {
                done_bytes += bytes;
                done_ms += end.saturating_duration_since(start).as_millis().max(1);
            }
        }
        let running = slices().filter(|(t, _)| !t.absorbed && t.output.is_none());
        let started = running.filter_map(|(t, bytes)| {
            let first = t.attempts.iter().filter(|a| a.is_live() && a.record.state == TaskState::Running).filter_map(|a| a.assigned_at).min()?;
            Some((bytes, now.saturating_duration_since(first).as_millis()))
        });
        started
            .map(|(bytes, elapsed_ms)| match done_ms {
                0 => bytes,
                _ => bytes.saturating_sub((elapsed_ms * done_bytes as u128 / done_ms).min(u64::MAX as u128) as u64),
            })
            .sum()
    }
}

/// A Task whose only Attempt is its first and still waits for a worker.
fn waits_whole(task: &TaskRun) -> bool {
    !task.absorbed && task.attempts.len() == 1 && task.attempts[0].record.state == TaskState::Queued
}
