//! Adaptive shuffle reads in the life of a Query: when the last input of an adaptable Stage
//! has an output, and before any of its Tasks is queued, the Stage's Tasks are laid out over
//! the sizes its producers reported ([`layout::layout`] decides). A Task whose partitions
//! another Task reads is *absorbed*: it never runs and its output is empty. A skewed partition
//! gets one new Task per piece (numbered after the planned ones), and its planned Task is
//! absorbed too, standing for its pieces: a shuffle reader takes part `p` of every producer it
//! is given, pieces included; a gather reader reads the planned Task's pieces one after the
//! other as that Task's output. A gather that merges sorted runs cannot read runs one after the
//! other, so such a Stage is never split.
//!
//! A skewed partition of the input a final aggregate reads (`planner::MergeRead`) is split
//! differently: its pieces run the pieces' plan, reducing their producers to partial states,
//! and its planned Task is not absorbed but *merges* them: it runs once they have their
//! outputs, reading them in place of the producers. The pieces are internal to the Stage:
//! consumers, the final Stage and the Stage's output statistics see the merge Task alone.
//!
//! The layout is decided once; Attempts run again (retries, recomputes, speculation) read what
//! their Task was given.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{layout, Action, QueryRun, TaskId, TaskOutcome, TaskRun};
use crate::protocol::ShuffleRead;

/// The shuffle reads of a Stage the planner found adaptable (see `planner::AdaptiveReads`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageReads {
    pub inputs: Vec<u32>,
    pub splittable: Vec<u32>,
    /// Its Tasks' outputs are sorted runs.
    pub ordered: bool,
    /// The input a final aggregate reads directly, with the plan of the pieces that reduce a
    /// split partition of it to partial states (see `planner::MergeRead`).
    pub merge: Option<(u32, Arc<Vec<u8>>)>,
}

impl QueryRun {
    /// Lays out the Tasks of each adaptable Stage whose inputs have all finished and that was
    /// not laid out yet.
    pub(super) fn adapt_ready_stages(&mut self, out: &mut Vec<Action>) {
        if self.read_policy.is_off() {
            return;
        }
        for stage in 0..self.stages.len() as u32 {
            let run = &self.stages[stage as usize];
            if run.adapted || run.held || run.adaptive.is_none() || !self.inputs_available(stage) {
                continue;
            }
            self.stages[stage as usize].adapted = true;
            self.adapt(stage, out);
        }
    }

    fn adapt(&mut self, stage: u32, out: &mut Vec<Action>) {
        let Some(reads) = self.stages[stage as usize].adaptive.clone() else { return };
        let planned: Vec<(TaskId, u32)> = self.tasks.range((stage, 0)..(stage + 1, 0)).map(|(id, t)| (*id, t.partition)).collect();
        // Task `p` computes partition `p`, and none has started: otherwise keep the plan.
        let partitions = planned.len();
        let as_planned = planned.iter().enumerate().all(|(i, ((_, task), partition))| *task == i as u32 && *partition == i as u32);
        let untouched = self.tasks.range((stage, 0)..(stage + 1, 0)).all(|(_, t)| t.attempts.is_empty());
        if !as_planned || !untouched {
            return;
        }
        let run = &self.stages[stage as usize];
        let may_grow = run.shuffle || !reads.ordered;
        // A piece's output is partial states, not rows: no key filter may summarize or filter
        // it as the Stage's output.
        let merge = reads.merge.clone().filter(|_| run.key_summary.is_empty() && run.key_filter.is_none());
        let inputs: Vec<layout::Input> = reads
            .inputs
            .iter()
            .map(|&input| layout::Input {
                stage: input,
                splittable: (may_grow && reads.splittable.contains(&input)) || merge.as_ref().is_some_and(|(m, _)| *m == input),
                producers: self.part_bytes(input),
            })
            .collect();
        let layout = layout::layout(partitions, &inputs, &self.read_policy);
        self.apply_layout(stage, &reads.inputs, merge, layout, out);
    }

    /// Each producer Task of `stage` with the bytes of each part of its output.
    pub(super) fn part_bytes(&self, stage: u32) -> Vec<(u32, Vec<u64>)> {
        self.tasks
            .range((stage, 0)..(stage + 1, 0))
            .filter(|(_, t)| t.merged_into.is_none())
            .filter_map(|(&(_, task), t)| t.output.map(|n| (task, t.attempts[n as usize].part_bytes.clone())))
            .collect()
    }

    fn apply_layout(&mut self, stage: u32, inputs: &[u32], merge: Option<(u32, Arc<Vec<u8>>)>, reads: Vec<layout::Read>, out: &mut Vec<Action>) {
        let final_input = self.stages[stage as usize].consumers.is_empty();
        let mut next = self.tasks.range((stage, 0)..(stage + 1, 0)).count() as u32;
        // The planned Task of each partition as it was, before any read replaced it.
        let planned: BTreeMap<u32, (Arc<Vec<u8>>, u32, String)> = self
            .tasks
            .range((stage, 0)..(stage + 1, 0))
            .map(|(&(_, task), t)| (task, (Arc::clone(&t.plan), t.partition, t.summary.clone())))
            .collect();
        let mut pieces: BTreeMap<u32, Vec<TaskId>> = BTreeMap::new();
        let mut merged: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        let mut coalesced = 0;
        for read in reads {
            let partition = read.parts[0];
            if read.parts.len() == 1 && read.split.is_none() {
                continue; // read as planned
            }
            if let (Some(piece), Some((input, plan))) = (&read.split, &merge) {
                if piece.stage == *input {
                    next += 1;
                    let summary = format!("{} (piece {} of {}: partial states)", planned[&partition].2, piece.index + 1, piece.of);
                    let mut task = TaskRun::new(Arc::clone(plan), planned[&partition].1, summary);
                    // The pieces' plan reads the merged input alone.
                    task.reads = Arc::new(shuffle_reads(&[*input], &read));
                    task.reads_text = Some(format!("{}, partial states", describe(&read)));
                    task.merged_into = Some(partition);
                    self.tasks.insert((stage, next - 1), task);
                    merged.entry(partition).or_default().push(next - 1);
                    continue;
                }
            }
            let id = match &read.split {
                Some(_) => {
                    next += 1;
                    (stage, next - 1)
                }
                None => (stage, partition),
            };
            for &absorbed in &read.parts[1..] {
                self.absorb((stage, absorbed), final_input.then_some(TaskOutcome::Empty), out);
            }
            coalesced += read.parts.len() as u32 - 1;
            let (plan, task_partition, summary) = planned[&partition].clone();
            let mut task = TaskRun::new(plan, task_partition, summary);
            if let Some(piece) = &read.split {
                task.summary = format!("{} (piece {} of {})", task.summary, piece.index + 1, piece.of);
                pieces.entry(partition).or_default().push(id);
            }
            task.reads = Arc::new(shuffle_reads(inputs, &read));
            task.reads_text = Some(describe(&read));
            self.tasks.insert(id, task);
        }
        for (&partition, ids) in &pieces {
            self.absorb((stage, partition), final_input.then(|| TaskOutcome::Pieces(ids.clone())), out);
            if let Some(task) = self.tasks.get_mut(&(stage, partition)) {
                task.pieces = ids.iter().map(|&(_, t)| t).collect();
            }
        }
        for (&partition, ids) in &merged {
            let input = merge.as_ref().map(|(input, _)| *input).expect("merged pieces have a merge input");
            let task = self.tasks.get_mut(&(stage, partition)).expect("a merged partition has its planned Task");
            task.reads = Arc::new(merge_reads(inputs, input, stage, partition, ids));
            task.reads_text = Some(format!("partition {partition}, merging the partial states of tasks {}", runs(ids)));
            task.merges = ids.clone();
        }
        let split = (pieces.len() + merged.len()) as u32;
        if coalesced > 0 || split > 0 {
            let run = &mut self.stages[stage as usize];
            (run.coalesced, run.split) = (coalesced, split);
            out.push(Action::Adapted { coalesced, split });
        }
    }

    /// Task `id` never runs; the final Stage, if it reads it, is told `published` instead.
    pub(super) fn absorb(&mut self, id: TaskId, published: Option<TaskOutcome>, out: &mut Vec<Action>) {
        if let Some(task) = self.tasks.get_mut(&id) {
            task.absorbed = true;
        }
        if let Some(outcome) = published {
            out.push(Action::Publish { task: id, outcome: Some(outcome) });
        }
    }
}

/// What a Task reads of each of the Stage's shuffled inputs: the Read's partitions, from the
/// piece's producers on the split side and from every producer elsewhere.
fn shuffle_reads(inputs: &[u32], read: &layout::Read) -> Vec<ShuffleRead> {
    inputs
        .iter()
        .map(|&input| ShuffleRead {
            stage: input,
            parts: read.parts.clone(),
            tasks: read.split.as_ref().filter(|piece| piece.stage == input).map(|piece| piece.tasks.clone()).unwrap_or_default(),
            merged_from: None,
        })
        .collect()
}

/// What the Task of a split partition `partition` reads when it merges `pieces` (Tasks of its
/// own Stage `stage`): part 0 of each piece in place of `merged`'s producers, and its
/// partition of every other input.
fn merge_reads(inputs: &[u32], merged: u32, stage: u32, partition: u32, pieces: &[u32]) -> Vec<ShuffleRead> {
    inputs
        .iter()
        .map(|&input| match input == merged {
            true => ShuffleRead { stage: input, parts: vec![0], tasks: pieces.to_vec(), merged_from: Some(stage) },
            false => ShuffleRead { stage: input, parts: vec![partition], tasks: Vec::new(), merged_from: None },
        })
        .collect()
}

/// How `quiver.tasks` shows an adapted read.
fn describe(read: &layout::Read) -> String {
    match &read.split {
        Some(piece) => format!(
            "partition {}, producers {} of stage {} (piece {} of {})",
            read.parts[0],
            runs(&piece.tasks),
            piece.stage,
            piece.index + 1,
            piece.of
        ),
        None => format!("partitions {}", runs(&read.parts)),
    }
}

/// `[0, 1, 2, 5, 7, 8]` as "0-2,5,7-8".
fn runs(numbers: &[u32]) -> String {
    let mut text: Vec<String> = Vec::new();
    let mut start = 0;
    for i in 1..=numbers.len() {
        if i == numbers.len() || numbers[i] != numbers[i - 1] + 1 {
            let (a, b) = (numbers[start], numbers[i - 1]);
            text.push(if a == b { a.to_string() } else { format!("{a}-{b}") });
            start = i;
        }
    }
    text.join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_compress_consecutive_numbers() {
        assert_eq!(super::runs(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(super::runs(&[4]), "4");
    }
}
