//! How much work each Task of a Stage that reads other Stages does, against its Stage's typical
//! Task. Once the Stage's inputs have finished, the bytes each of its Tasks will read are
//! known. A Task reading several times the median (a skewed partition left whole: skew
//! splitting off, a side that may not be split, or one producer that wrote it all) is expected
//! to run longer. Speculation then allows it longer before it counts as a straggler, and worker
//! paces measure its Attempts against more work. Otherwise the worker that drew the hot
//! partition would look slow, and lose Tasks for being handed the most work, and a copy of that
//! Task would be started on another worker only to do the same work again
//! ([`policy::task_weights`] decides, within bounds).
//!
//! Only Stages whose reads the planner found adaptable are weighed: there Task `p` reads
//! partition `p` of each shuffled input, so its bytes are known. Elsewhere (a union of a
//! shuffle and other inputs, say) a Task's partition says nothing of what it reads.

use std::collections::BTreeMap;

use super::{policy, QueryRun, TaskId};

/// Each producer Task of an input Stage with the bytes of each part of its output.
type Produced = Vec<(u32, Vec<u64>)>;

impl QueryRun {
    /// Weighs the Tasks of each adaptable Stage whose inputs have all finished and that was not
    /// weighed yet. Run after the Stage's reads were laid out: a piece of a split partition
    /// reads less.
    pub(super) fn weigh_ready_stages(&mut self) {
        for stage in 0..self.stages.len() as u32 {
            let run = &self.stages[stage as usize];
            if run.weighed || run.held || run.adaptive.is_none() || !self.inputs_available(stage) {
                continue;
            }
            self.stages[stage as usize].weighed = true;
            self.weigh(stage);
        }
    }

    fn weigh(&mut self, stage: u32) {
        let produced: BTreeMap<u32, Produced> = self.stages[stage as usize].inputs.iter().map(|&input| (input, self.part_bytes(input))).collect();
        // A merge Task reads its pieces' partial states, a fraction of a Task's work: it is
        // left out of its Stage's finished Tasks, and out of the weighing.
        let ids: Vec<TaskId> = self
            .tasks
            .range((stage, 0)..(stage + 1, 0))
            .filter(|(_, t)| !t.absorbed && t.merges.is_empty())
            .map(|(id, _)| *id)
            .collect();
        let bytes: Vec<u64> = ids.iter().map(|&id| self.bytes_read(id, &produced)).collect();
        for (id, weight) in ids.into_iter().zip(policy::task_weights(&bytes)) {
            if let Some(task) = self.tasks.get_mut(&id) {
                task.weight = weight;
            }
        }
    }

    /// The bytes Task `id` reads of its inputs' outputs: its partitions of a shuffled input
    /// (from the producers it was given, all by default), all of a gathered one.
    fn bytes_read(&self, id: TaskId, produced: &BTreeMap<u32, Produced>) -> u64 {
        let Some(task) = self.tasks.get(&id) else { return 0 };
        let mut total = 0u64;
        for input in self.inputs_of(id) {
            let read = task.reads.iter().find(|r| r.stage == input && r.merged_from.is_none());
            let planned = [task.partition];
            let parts = read.map_or(&planned[..], |r| r.parts.as_slice());
            let from = read.map_or(&[][..], |r| r.tasks.as_slice());
            let shuffled = self.stages.get(input as usize).is_some_and(|s| s.shuffle);
            for (producer, part_bytes) in produced.get(&input).into_iter().flatten() {
                if !from.is_empty() && !from.contains(producer) {
                    continue;
                }
                total += match shuffled {
                    true => parts.iter().filter_map(|&p| part_bytes.get(p as usize)).sum::<u64>(),
                    false => part_bytes.iter().sum::<u64>(),
                };
            }
        }
        total
    }
}
