//! Which shuffle reads of a Stage the coordinator may adapt once it knows how big each
//! partition turned out to be (see `coordinator::layout`):
//! - **coalesce**: one Task reads several neighbouring partitions. Safe when every operator of
//!   the fragment computes partition `p` from partition `p` of its children alone, so that a
//!   Task computing the union of some partitions computes the union of their results;
//! - **split**: the Tasks of one skewed partition each read a range of its producers on one
//!   side and the whole partition on every other side. Safe only for a reader from which every
//!   operator up to the Stage's output is row-wise on that side: projections, filters, partial
//!   aggregates, per-partition sorts, and joins whose type lets that side be cut (after Spark's
//!   rules: the left side of inner, left, left semi/anti/mark joins; the right side of inner,
//!   right, right semi/anti/mark joins; a full join never). Anything that must see a whole
//!   partition at once (a final aggregate, a window) makes its inputs unsplittable, with one
//!   exception:
//! - **merge split**: a final aggregate that reads a shuffle directly may have a skewed
//!   partition cut into pieces, each reducing its range of producers to partial aggregate
//!   states (`AggregateMode::PartialReduce`); the partition's planned Task then runs its plan
//!   over the pieces' outputs in place of the producers', merging their states. The states
//!   have the schema the producers wrote, so nothing else in the plan changes.
//!
//! The analysis is conservative: an operator it does not know makes the Stage keep its planned
//! reads.

use std::sync::Arc;

use datafusion::common::JoinType;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
#[allow(deprecated)]
use datafusion::physical_plan::coalesce_batches::CoalesceBatchesExec;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode, SortMergeJoinExec};
use datafusion::physical_plan::limit::LocalLimitExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowAggExec};
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};

use super::{Exchange, StageId, StageReaderExec};

/// The shuffle reads of a Stage that may be adapted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdaptiveReads {
    /// The shuffled Stages the fragment reads, all with the fragment's partition count.
    pub inputs: Vec<StageId>,
    /// Those whose partitions may be split over several Tasks (the others are then read whole
    /// by each of them).
    pub splittable: Vec<StageId>,
    /// Each Task's output is sorted: a gather that merges the Tasks' sorted runs cannot take a
    /// split partition's pieces one after the other.
    pub ordered: bool,
    /// The input a final aggregate reads directly, whose partitions may be split into pieces
    /// merged by their planned Task.
    pub merge: Option<MergeRead>,
}

/// How the pieces of a split partition of `input` reduce it: `piece` (the final aggregate's
/// input under an `AggregateMode::PartialReduce` aggregate) computes, for partition `p` of the
/// fragment, the partial states of what it reads of `input`'s partition `p`.
#[derive(Debug, Clone)]
pub struct MergeRead {
    pub input: StageId,
    pub piece: Arc<dyn ExecutionPlan>,
}

impl PartialEq for MergeRead {
    fn eq(&self, other: &Self) -> bool {
        self.input == other.input && Arc::ptr_eq(&self.piece, &other.piece)
    }
}

impl Eq for MergeRead {}

/// The adaptable reads of a Stage whose Task `p` computes partition `p` of `fragment`; None
/// when it reads no shuffle or when some operator ties a Task to its planned partition.
pub fn adaptive_reads(fragment: &Arc<dyn ExecutionPlan>) -> Option<AdaptiveReads> {
    let partitions = fragment.output_partitioning().partition_count();
    let mut readers = Vec::new();
    if partitions < 2 || !walk(fragment, true, partitions, &mut readers) || readers.is_empty() {
        return None;
    }
    let merge = merge_read(fragment, partitions).filter(|m| readers.iter().filter(|(stage, _)| *stage == m.input).count() == 1);
    let mut inputs: Vec<StageId> = readers.iter().map(|(stage, _)| *stage).collect();
    inputs.sort_unstable();
    inputs.dedup();
    // A Stage read twice cannot have one read split and the other whole.
    let once = |stage: &StageId| readers.iter().filter(|(s, _)| s == stage).count() == 1;
    let splittable = readers.iter().filter(|(stage, split)| *split && once(stage)).map(|(stage, _)| *stage).collect();
    Some(AdaptiveReads { inputs, splittable, ordered: fragment.output_ordering().is_some(), merge })
}

/// The one final aggregate of `fragment` that reads a shuffle of `partitions` parts directly,
/// as a [`MergeRead`]; None when there is none, or more than one.
fn merge_read(fragment: &Arc<dyn ExecutionPlan>, partitions: usize) -> Option<MergeRead> {
    let mut found = Vec::new();
    final_aggregates(fragment, &mut found);
    let [aggregate] = found.as_slice() else { return None };
    let reader = direct_reader(aggregate.input())?;
    if !matches!(reader.exchange(), Exchange::Shuffle { partitions: p } if p == partitions) || aggregate.limit_options().is_some() {
        return None;
    }
    let piece = AggregateExec::try_new(
        AggregateMode::PartialReduce,
        aggregate.group_expr().clone(),
        aggregate.aggr_expr().to_vec(),
        aggregate.filter_expr().to_vec(),
        Arc::clone(aggregate.input()),
        aggregate.input_schema(),
    )
    .ok()?;
    // The merge reads the pieces where it read the producers: their rows must look the same.
    (piece.schema().fields() == aggregate.input().schema().fields()).then(|| MergeRead { input: reader.stage(), piece: Arc::new(piece) })
}

fn final_aggregates<'a>(plan: &'a Arc<dyn ExecutionPlan>, found: &mut Vec<&'a AggregateExec>) {
    if let Some(aggregate) = plan.downcast_ref::<AggregateExec>().filter(|a| *a.mode() == AggregateMode::FinalPartitioned) {
        found.push(aggregate);
    }
    for child in plan.children() {
        final_aggregates(child, found);
    }
}

/// The Stage reader under `plan` when nothing but batch coalescing stands between them.
#[allow(deprecated)]
fn direct_reader(plan: &Arc<dyn ExecutionPlan>) -> Option<&StageReaderExec> {
    if let Some(reader) = plan.downcast_ref::<StageReaderExec>() {
        return Some(reader);
    }
    if is::<CoalesceBatchesExec>(plan.as_ref()) || is::<CooperativeExec>(plan.as_ref()) {
        return direct_reader(plan.children()[0]);
    }
    None
}

/// Collects the shuffle readers under `plan` with whether they may be split (`split`: every
/// operator above them is row-wise on their side); false when `plan` cannot be adapted.
fn walk(plan: &Arc<dyn ExecutionPlan>, split: bool, partitions: usize, readers: &mut Vec<(StageId, bool)>) -> bool {
    if let Some(reader) = plan.downcast_ref::<StageReaderExec>() {
        let shuffled = matches!(reader.exchange(), Exchange::Shuffle { partitions: p } if p == partitions);
        readers.push((reader.stage(), split));
        return shuffled;
    }
    // Read whole by every partition: not tied to the Task's partition.
    if is::<CoalescePartitionsExec>(plan.as_ref()) {
        return true;
    }
    if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        return match join.partition_mode() {
            PartitionMode::Partitioned => {
                let (left, right) = sides(join.join_type());
                walk(join.left(), split && left, partitions, readers) && walk(join.right(), split && right, partitions, readers)
            }
            // The build side is read whole; only probe-preserving joins run per partition.
            PartitionMode::CollectLeft => {
                let (_, right) = sides(join.join_type());
                right && walk(join.right(), split, partitions, readers)
            }
            PartitionMode::Auto => false,
        };
    }
    if let Some(join) = plan.downcast_ref::<SortMergeJoinExec>() {
        let (left, right) = sides(&join.join_type());
        return walk(join.left(), split && left, partitions, readers) && walk(join.right(), split && right, partitions, readers);
    }
    let Some(row_wise) = partition_wise(plan.as_ref()) else { return false };
    plan.children().into_iter().all(|child| walk(child, split && row_wise, partitions, readers))
}

fn is<T: ExecutionPlan + 'static>(plan: &dyn ExecutionPlan) -> bool {
    plan.downcast_ref::<T>().is_some()
}

/// For an operator whose partition `p` is computed from partition `p` of its one child:
/// whether it is also row-wise (its output for part of a partition is part of its output for
/// the whole). None for any other operator.
#[allow(deprecated)]
fn partition_wise(plan: &dyn ExecutionPlan) -> Option<bool> {
    if is::<ProjectionExec>(plan) || is::<FilterExec>(plan) || is::<CoalesceBatchesExec>(plan) || is::<CooperativeExec>(plan) {
        return Some(true);
    }
    if let Some(sort) = plan.downcast_ref::<SortExec>() {
        // Sorting a piece of a partition sorts that piece; the Stage's reader merges or
        // re-sorts. A sort into one partition (no preserve) would read every partition.
        return sort.preserve_partitioning().then_some(true);
    }
    if let Some(aggregate) = plan.downcast_ref::<AggregateExec>() {
        return Some(matches!(aggregate.mode(), AggregateMode::Partial));
    }
    if is::<BoundedWindowAggExec>(plan) || is::<WindowAggExec>(plan) || is::<LocalLimitExec>(plan) {
        return Some(false);
    }
    None
}

/// Which sides of a join of this type may be cut into pieces, each joined with the whole other
/// side: a side may be cut when the join never emits the other side's unmatched rows, nor
/// decides a row of the other side by all of this side's rows.
fn sides(join_type: &JoinType) -> (bool, bool) {
    match join_type {
        JoinType::Inner => (true, true),
        JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti | JoinType::LeftMark => (true, false),
        JoinType::Right | JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark => (false, true),
        JoinType::Full => (false, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_sides_follow_sparks_rules() {
        assert_eq!(sides(&JoinType::Inner), (true, true));
        assert_eq!(sides(&JoinType::Left), (true, false));
        assert_eq!(sides(&JoinType::LeftAnti), (true, false));
        assert_eq!(sides(&JoinType::Right), (false, true));
        assert_eq!(sides(&JoinType::RightSemi), (false, true));
        assert_eq!(sides(&JoinType::Full), (false, false));
    }
}
