//! Adaptive shuffle reads: once every input of a Stage has finished, the coordinator knows how
//! many bytes each producer wrote into each partition, and lays the Stage's Tasks out over
//! them (after Spark's adaptive query execution):
//! - **coalesce**: neighbouring small partitions become one Task, up to a target size. The
//!   target is the session's `quiver.coalesce_target_bytes`, lowered to the data's share of
//!   one slot so that coalescing never leaves slots idle that the planned Tasks would have
//!   used;
//! - **skew split**: a partition bigger than `quiver.skew_factor` times the median partition
//!   of its side, and than `quiver.skew_min_bytes`, is read by several Tasks, each over a
//!   contiguous range of that side's producers; the other sides' parts are read whole by each
//!   piece. Only sides the planner found splittable (`planner::AdaptiveReads`) are split.
//!
//! This is policy only: pure functions from partition sizes to Task reads, with no state.

use crate::config::{QuiverOptions, COALESCE_TASK_MIN_BYTES};

/// How a Query's Stages adapt their shuffle reads; from the session's `quiver.*` settings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReadPolicy {
    /// Coalesce partitions up to this many bytes per Task; None: off.
    pub coalesce_target_bytes: Option<u64>,
    pub skew: Option<Skew>,
    /// Task slots over the live workers when the Query started.
    pub slots: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Skew {
    pub factor: f64,
    pub min_bytes: u64,
}

impl ReadPolicy {
    pub fn from_options(options: &QuiverOptions, slots: usize) -> Self {
        Self {
            coalesce_target_bytes: options.coalesce_partitions.then_some(options.coalesce_target_bytes.max(1)),
            skew: options.skew_split.then(|| Skew { factor: options.skew_factor.max(1.0), min_bytes: options.skew_min_bytes }),
            slots: slots.max(1),
        }
    }

    pub fn is_off(&self) -> bool {
        self.coalesce_target_bytes.is_none() && self.skew.is_none()
    }
}

/// One shuffled input of a Stage, as its producers left it.
#[derive(Debug, Clone)]
pub struct Input {
    pub stage: u32,
    pub splittable: bool,
    /// Each producer Task with the bytes of each part of its output.
    pub producers: Vec<(u32, Vec<u64>)>,
}

impl Input {
    fn part_bytes(&self, partition: usize) -> u64 {
        self.producers.iter().map(|(_, parts)| parts.get(partition).copied().unwrap_or(0)).sum()
    }
}

/// What one Task of the Stage reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// Partitions, in order; the first is the one the Task's plan computes.
    pub parts: Vec<u32>,
    pub split: Option<Piece>,
}

/// One piece of a split partition: its share of one side's producers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub stage: u32,
    pub tasks: Vec<u32>,
    pub index: u32,
    pub of: u32,
}

/// The Tasks of a Stage of `partitions` partitions over `inputs`: one [`Read`] per Task, in
/// partition order. Without adaptation, that is one Read per partition.
pub fn layout(partitions: usize, inputs: &[Input], policy: &ReadPolicy) -> Vec<Read> {
    let bytes: Vec<u64> = (0..partitions).map(|p| inputs.iter().map(|i| i.part_bytes(p)).sum()).collect();
    let splits = policy.skew.map(|skew| skewed(partitions, inputs, &skew)).unwrap_or_default();
    let target = policy.coalesce_target_bytes.map(|t| t.min((bytes.iter().sum::<u64>() / policy.slots as u64).max(COALESCE_TASK_MIN_BYTES)));
    let mut reads = Vec::new();
    let mut group: Option<(Vec<u32>, u64)> = None;
    for (p, &size) in bytes.iter().enumerate() {
        if let Some(pieces) = splits.iter().find(|(part, _)| *part == p).map(|(_, pieces)| pieces) {
            reads.extend(group.take().map(|(parts, _)| Read { parts, split: None }));
            reads.extend(pieces.iter().cloned().map(|piece| Read { parts: vec![p as u32], split: Some(piece) }));
            continue;
        }
        group = match (group.take(), target) {
            (Some((mut parts, sum)), Some(target)) if sum + size <= target => {
                parts.push(p as u32);
                Some((parts, sum + size))
            }
            (previous, _) => {
                reads.extend(previous.map(|(parts, _)| Read { parts, split: None }));
                Some((vec![p as u32], size))
            }
        };
    }
    reads.extend(group.map(|(parts, _)| Read { parts, split: None }));
    reads
}

/// The skewed partitions and their pieces: for each, the splittable side where it is biggest
/// against that side's median, cut into ranges of producers of about a typical partition's
/// size each.
fn skewed(partitions: usize, inputs: &[Input], skew: &Skew) -> Vec<(usize, Vec<Piece>)> {
    let mut splits = Vec::new();
    for p in 0..partitions {
        let mut best: Option<(&Input, u64, u64)> = None;
        for input in inputs.iter().filter(|i| i.splittable && i.producers.len() > 1) {
            let sizes: Vec<u64> = (0..partitions).map(|q| input.part_bytes(q)).collect();
            let median = median(&sizes);
            let size = sizes[p];
            let threshold = (median as f64 * skew.factor).max(skew.min_bytes as f64);
            if (size as f64) > threshold && best.is_none_or(|(_, s, _)| size > s) {
                best = Some((input, size, typical(&sizes, threshold)));
            }
        }
        if let Some((input, size, typical)) = best {
            let pieces = pieces(input, p, size, typical);
            if pieces.len() > 1 {
                splits.push((p, pieces));
            }
        }
    }
    splits
}

/// Cuts the producers of partition `p` of `input` into contiguous ranges of about `target`
/// bytes each (at least two, at most one per producer that wrote to it).
fn pieces(input: &Input, p: usize, size: u64, target: u64) -> Vec<Piece> {
    let producers: Vec<(u32, u64)> =
        input.producers.iter().map(|(task, parts)| (*task, parts.get(p).copied().unwrap_or(0))).collect();
    let writers = producers.iter().filter(|(_, b)| *b > 0).count() as u64;
    if writers < 2 {
        return Vec::new(); // one producer's rows cannot be cut by producer
    }
    let count = size.div_ceil(target.max(1)).clamp(2, writers);
    let share = size as f64 / count as f64;
    let mut ranges: Vec<Vec<u32>> = vec![Vec::new()];
    let mut sum = 0u64;
    for (task, b) in producers {
        // A new range starts once the current one has its share, unless it is the last one.
        if sum as f64 >= share * ranges.len() as f64 && (ranges.len() as u64) < count && !ranges.last().is_some_and(Vec::is_empty) {
            ranges.push(Vec::new());
        }
        ranges.last_mut().expect("one range at least").push(task);
        sum += b;
    }
    let of = ranges.len() as u32;
    ranges.into_iter().enumerate().map(|(i, tasks)| Piece { stage: input.stage, tasks, index: i as u32, of }).collect()
}

/// The lower median: with two partitions (one per slot on a small cluster) the upper median
/// would be the skewed partition itself, and nothing would ever count as skewed.
fn median(sizes: &[u64]) -> u64 {
    let mut sorted = sizes.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len().saturating_sub(1) / 2).copied().unwrap_or(0)
}

/// The mean size of the partitions that are not skewed: what one piece should be.
fn typical(sizes: &[u64], threshold: f64) -> u64 {
    let normal: Vec<u64> = sizes.iter().copied().filter(|&s| (s as f64) <= threshold).collect();
    (normal.iter().sum::<u64>() / normal.len().max(1) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn input(stage: u32, splittable: bool, producers: &[&[u64]]) -> Input {
        Input { stage, splittable, producers: producers.iter().enumerate().map(|(t, p)| (t as u32, p.to_vec())).collect() }
    }

    fn parts(reads: &[Read]) -> Vec<Vec<u32>> {
        reads.iter().map(|r| r.parts.clone()).collect()
    }

    #[test]
    fn without_adaptation_each_partition_is_a_task() {
        let inputs = [input(0, true, &[&[5, 500 * MIB, 5, 5]])];
        let reads = layout(4, &inputs, &ReadPolicy { slots: 2, ..Default::default() });
        assert_eq!(parts(&reads), vec![vec![0], vec![1], vec![2], vec![3]]);
        assert!(reads.iter().all(|r| r.split.is_none()));
    }

    #[test]
    fn small_neighbours_are_coalesced_but_slots_stay_busy() {
        let policy = ReadPolicy { coalesce_target_bytes: Some(64 * MIB), skew: None, slots: 2 };
        // Tiny data: everything fits one Task.
        let tiny = [input(0, false, &[&[10, 20, 30, 40], &[1, 2, 3, 4]])];
        assert_eq!(parts(&layout(4, &tiny, &policy)), vec![vec![0, 1, 2, 3]]);
        // 4 × 20 MiB over 2 slots: Tasks of at most 40 MiB, not 64.
        let big = [input(0, false, &[&[20 * MIB; 4]])];
        assert_eq!(parts(&layout(4, &big, &policy)), vec![vec![0, 1], vec![2, 3]]);
        // Both sides of a join count.
        let join = [input(0, false, &[&[20 * MIB, MIB, MIB, 20 * MIB]]), input(1, false, &[&[20 * MIB, MIB, MIB, 20 * MIB]])];
        assert_eq!(parts(&layout(4, &join, &policy)), vec![vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn a_skewed_partition_is_split_over_ranges_of_its_producers() {
        let policy = ReadPolicy { coalesce_target_bytes: None, skew: Some(Skew { factor: 5.0, min_bytes: MIB }), slots: 4 };
        let hot = 40 * MIB;
        let skewed = input(0, true, &[&[MIB, hot, MIB, MIB], &[MIB, hot, MIB, MIB], &[MIB, hot, MIB, MIB], &[MIB, hot, MIB, MIB]]);
        let other = input(1, false, &[&[MIB; 4]]);
        let reads = layout(4, &[skewed, other], &policy);
        assert_eq!(parts(&reads), vec![vec![0], vec![1], vec![1], vec![1], vec![1], vec![2], vec![3]]);
        let pieces: Vec<&Piece> = reads.iter().filter_map(|r| r.split.as_ref()).collect();
        assert_eq!(pieces.iter().map(|p| p.tasks.clone()).collect::<Vec<_>>(), vec![vec![0], vec![1], vec![2], vec![3]]);
        assert!(pieces.iter().all(|p| p.stage == 0 && p.of == 4));
    }

    #[test]
    fn only_splittable_sides_over_both_thresholds_are_split() {
        let skew = Some(Skew { factor: 5.0, min_bytes: 10 * MIB });
        let policy = ReadPolicy { coalesce_target_bytes: None, skew, slots: 4 };
        let producers: &[&[u64]] = &[&[MIB, 30 * MIB, MIB], &[MIB, 30 * MIB, MIB]];
        assert!(layout(3, &[input(0, false, producers)], &policy).iter().all(|r| r.split.is_none()), "not splittable");
        let small: &[&[u64]] = &[&[1, 30, 1], &[1, 30, 1]];
        assert!(layout(3, &[input(0, true, small)], &policy).iter().all(|r| r.split.is_none()), "under the minimum");
        assert_eq!(layout(3, &[input(0, true, producers)], &policy).len(), 4);
        let one_producer: &[&[u64]] = &[&[MIB, 60 * MIB, MIB]];
        assert_eq!(layout(3, &[input(0, true, one_producer)], &policy).len(), 3, "one producer cannot be cut");
        let one_writer: &[&[u64]] = &[&[MIB, 60 * MIB, MIB], &[MIB, 0, MIB]];
        assert_eq!(layout(3, &[input(0, true, one_writer)], &policy).len(), 3, "nor one that alone wrote the partition");
    }

    #[test]
    fn pieces_cover_every_producer_once() {
        let hot: Vec<Vec<u64>> = (0..7).map(|t| vec![0, (t + 1) * MIB]).collect();
        let refs: Vec<&[u64]> = hot.iter().map(Vec::as_slice).collect();
        let i = input(3, true, &refs);
        let pieces = pieces(&i, 1, 28 * MIB, 9 * MIB);
        let mut all: Vec<u32> = pieces.iter().flat_map(|p| p.tasks.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        assert_eq!(pieces.len(), 4);
        assert!(pieces.iter().all(|p| !p.tasks.is_empty()));
    }
}
