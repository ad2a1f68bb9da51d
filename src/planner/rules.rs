//! Which operators may run inside a Task, and how a Task's plan is derived from a Stage's.
//!
//! An operator is *task-local* when running it on every slice of its input separately and
//! concatenating the outputs equals running it once on the whole input: filters, projections,
//! partial aggregates, per-partition sorts and limits. A subtree made only of task-local operators
//! over one file scan can be cut into Tasks by cutting its scan's files.
//!
//! A hash join that collects its build side is task-local on its probe side when its output for
//! a probe row depends only on that row (inner, right, right semi/anti/mark): each Task reads
//! the whole build side, computed once by a Stage of its own (a broadcast), and joins it with
//! its slice of the probe side.

use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::{exec_err, Result};
use datafusion::physical_expr::expressions::Literal;
use datafusion::physical_expr::scalar_subquery::ScalarSubqueryExpr;
use datafusion::datasource::physical_plan::{FileScanConfig, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
#[allow(deprecated)]
use datafusion::physical_plan::coalesce_batches::CoalesceBatchesExec;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::common::JoinType;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::joins::{CrossJoinExec, HashJoinExec, NestedLoopJoinExec, PartitionMode};
use datafusion::physical_plan::placeholder_row::PlaceholderRowExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::limit::LocalLimitExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::windows::{BoundedWindowAggExec, StandardWindowExpr, WindowAggExec, WindowUDFExpr};
use datafusion::physical_plan::{replace_children_if_necessary, ExecutionPlan, ExecutionPlanProperties, Partitioning};

use super::split::TaskSlice;
use super::StageReaderExec;

/// Returns the file scan config of a DataSourceExec over files, if `plan` is one.
pub(super) fn file_scan(plan: &dyn ExecutionPlan) -> Option<&FileScanConfig> {
    let exec = plan.downcast_ref::<DataSourceExec>()?;
    exec.data_source().downcast_ref::<FileScanConfig>()
}

/// The child through which a task-local chain reaches its scan: the probe side of a broadcast
/// join, the only child otherwise.
pub(super) fn chain_child(plan: &Arc<dyn ExecutionPlan>) -> Option<&Arc<dyn ExecutionPlan>> {
    match broadcast_join(plan.as_ref()) {
        Some(join) => Some(join.right()),
        None => plan.children().into_iter().next(),
    }
}

/// A hash join that collects its build side and whose output for a probe row depends only on
/// that row and the whole build side: it can run in the Tasks of its probe side, each reading
/// the whole build side (a broadcast).
pub(super) fn broadcast_join(plan: &dyn ExecutionPlan) -> Option<&HashJoinExec> {
    let join = plan.downcast_ref::<HashJoinExec>()?;
    let collect_left = *join.partition_mode() == PartitionMode::CollectLeft;
    (collect_left && is_probe_preserving(join.join_type()) && runs_on_workers(join.left())).then_some(join)
}

/// Join types whose result for one probe row needs no other probe row: the probe side may be
/// cut into parts that run in different processes. The others emit unmatched build rows once
/// every probe partition has finished, which only works with all of them in one process.
fn is_probe_preserving(join_type: &JoinType) -> bool {
    matches!(
        join_type,
        JoinType::Inner | JoinType::Right | JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark
    )
}

/// Operators that read their whole first (build) child in every partition.
pub(super) fn collects_build_side(plan: &dyn ExecutionPlan) -> bool {
    if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        return *join.partition_mode() == PartitionMode::CollectLeft;
    }
    plan.is::<NestedLoopJoinExec>() || plan.is::<CrossJoinExec>()
}

/// A join that collects its build side and must see every probe row in one process (it emits
/// unmatched build rows at the end: left, full, left semi/anti/mark) cannot have its probe
/// partitions run as separate Tasks. It becomes a partitioned hash join (both sides shuffled by
/// the join keys, each Task joins one key range), which is exact for every join type; when that
/// is not possible (a null-aware anti join, an order to keep, a nested-loop join) it gets a
/// single probe partition instead, so that the one Task that runs it sees every probe row.
pub(super) fn whole_probe_side(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    let join_type = if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        (*join.partition_mode() == PartitionMode::CollectLeft).then_some(*join.join_type())
    } else {
        plan.downcast_ref::<NestedLoopJoinExec>().map(|join| *join.join_type())
    };
    let Some(join_type) = join_type else { return Ok(plan) };
    let children = plan.children();
    let probe = children[1];
    let partitions = probe.output_partitioning().partition_count();
    if is_probe_preserving(&join_type) || partitions == 1 {
        return Ok(plan);
    }
    if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        if !join.null_aware && plan.output_ordering().is_none() {
            return partitioned_join(join, partitions);
        }
    }
    let build = Arc::clone(children[0]);
    let probe: Arc<dyn ExecutionPlan> = Arc::new(CoalescePartitionsExec::new(Arc::clone(probe)));
    replace_children_if_necessary(plan, vec![build, probe])
}

/// The same join in partitioned mode: both sides hash-partitioned by their join keys into
/// `partitions` partitions.
fn partitioned_join(join: &HashJoinExec, partitions: usize) -> Result<Arc<dyn ExecutionPlan>> {
    let build = match join.left().downcast_ref::<CoalescePartitionsExec>() {
        Some(merge) if merge.fetch().is_none() => Arc::clone(merge.input()),
        _ => Arc::clone(join.left()),
    };
    let build_keys = join.on().iter().map(|(left, _)| Arc::clone(left)).collect();
    let probe_keys = join.on().iter().map(|(_, right)| Arc::clone(right)).collect();
    let build = Arc::new(RepartitionExec::try_new(build, Partitioning::Hash(build_keys, partitions))?);
    let probe = Arc::new(RepartitionExec::try_new(Arc::clone(join.right()), Partitioning::Hash(probe_keys, partitions))?);
    join.builder()
        .with_partition_mode(PartitionMode::Partitioned)
        .with_new_children(vec![build, probe])?
        .recompute_properties()
        .reset_state()
        .build_exec()
}

/// The partitioning of a `RepartitionExec` that routes rows by value (hash or range): a shuffle
/// Exchange. Round-robin only spreads rows over threads and is no Exchange between Stages.
pub fn shuffle_partitioning(plan: &Arc<dyn ExecutionPlan>) -> Option<Partitioning> {
    let repartition = plan.downcast_ref::<RepartitionExec>()?;
    match repartition.partitioning() {
        Partitioning::RoundRobinBatch(_) | Partitioning::UnknownPartitioning(_) => None,
        by_value => Some(by_value.clone()),
    }
}

/// Operators that merge all partitions of their child into one: a gather Exchange.
pub(super) fn is_gather(plan: &dyn ExecutionPlan) -> bool {
    plan.is::<CoalescePartitionsExec>() || plan.is::<SortPreservingMergeExec>()
}

/// True when the subtree reads table files: only then is there work worth sending to workers
/// (`SELECT 1` or `VALUES` answer faster, and without workers, on the coordinator).
pub(super) fn reads_files(plan: &Arc<dyn ExecutionPlan>) -> bool {
    file_scan(plan.as_ref()).is_some() || plan.children().into_iter().any(reads_files)
}

/// Operators only the coordinator can run: they hold state of the coordinator's session.
const COORDINATOR_ONLY: [&str; 4] = ["ScalarSubqueryExec", "RecursiveQueryExec", "DataSinkExec", "TaskWriterExec"];

/// Operators DataFusion's plan serialization (datafusion-proto 55) has no encoding for, both
/// behind optimizer settings that are off by default: they run where the plan was made.
const NOT_SENDABLE: [&str; 2] = ["PiecewiseMergeJoinExec", "PartitionedTopKExec"];

/// Operators DataFusion's plan serialization encodes, but not faithfully, so that a worker
/// would compute something else: an aggregate over the one empty grouping set
/// (`GROUP BY GROUPING SETS (())`) comes back as an aggregate without groups, which on a
/// worker returns no row at all; see also the two functions below.
fn loses_in_encoding(plan: &dyn ExecutionPlan) -> bool {
    lost_in_encoding(plan).is_some()
}

/// What the encoding would lose of `plan` ([`loses_in_encoding`]), in words.
fn lost_in_encoding(plan: &dyn ExecutionPlan) -> Option<&'static str> {
    let empty_grouping_set = plan
        .downcast_ref::<AggregateExec>()
        .is_some_and(|a| a.group_expr().has_grouping_set() && a.group_expr().expr().is_empty());
    match () {
        _ if empty_grouping_set => Some("an aggregate over the empty grouping set"),
        _ if window_ignores_nulls(plan) => Some("a window function's IGNORE NULLS"),
        _ if has_lossy_expression(plan) => Some("a Float16 literal"),
        _ if has_virtual_columns(plan) => Some("a file scan's virtual columns (file_row_index())"),
        _ => None,
    }
}

/// Why file scans in `root` (the final Stage) stay on the coordinator: the first operator, from
/// the top, over one of them that may not run on workers, in words. None when no scan is there
/// or none of these rules keeps it.
pub(super) fn why_scans_stay(root: &Arc<dyn ExecutionPlan>) -> Option<String> {
    if !reads_files(root) {
        return None;
    }
    let name = root.name();
    let own = if reads_scalar_subquery(root.as_ref()) {
        Some(format!("{name} reads a scalar subquery's value"))
    } else if COORDINATOR_ONLY.contains(&name) {
        Some(format!("{name} runs only on the coordinator"))
    } else if NOT_SENDABLE.contains(&name) {
        Some(format!("DataFusion's plan encoding has no form for {name}"))
    } else {
        lost_in_encoding(root.as_ref()).map(|what| format!("DataFusion's plan encoding would lose {what} ({name})"))
    };
    own.or_else(|| root.children().into_iter().find_map(why_scans_stay))
}

/// A file scan with virtual columns (`file_row_index()` adds one): the encoding drops them, and
/// a worker's scan then fails ("Column index 1 out of bounds for projected expressions").
fn has_virtual_columns(plan: &dyn ExecutionPlan) -> bool {
    file_scan(plan).is_some_and(|scan| !scan.file_source().table_schema().virtual_columns().is_empty())
}

/// An expression of `plan` the encoding changes: a Float16 literal (it arrives as Float32).
fn has_lossy_expression(plan: &dyn ExecutionPlan) -> bool {
    let mut lossy = false;
    let _ = plan.apply_expressions(&mut |root| {
        root.apply(|e| {
            lossy |= e.downcast_ref::<Literal>().is_some_and(|literal| literal.value().data_type() == DataType::Float16);
            Ok(if lossy { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
        })
    });
    lossy
}

/// A window function such as FIRST_VALUE with IGNORE NULLS: the encoding of a window UDF has no
/// place for IGNORE NULLS, so a worker would not skip nulls. (The flag has no accessor; its
/// `Debug` shows it.)
fn window_ignores_nulls(plan: &dyn ExecutionPlan) -> bool {
    let exprs = match (plan.downcast_ref::<BoundedWindowAggExec>(), plan.downcast_ref::<WindowAggExec>()) {
        (Some(w), _) => w.window_expr(),
        (_, Some(w)) => w.window_expr(),
        _ => return false,
    };
    exprs.iter().any(|e| {
        let udf = e.as_any().downcast_ref::<StandardWindowExpr>().map(|s| s.get_standard_func_expr());
        udf.and_then(|f| f.as_any().downcast_ref::<WindowUDFExpr>()).is_some_and(|u| format!("{u:?}").contains("ignore_nulls: true"))
    })
}

/// True when every operator of the subtree can run in a worker: its leaves read files (or no
/// data at all) and nothing in it reads a scalar subquery's result or other coordinator state.
pub(super) fn runs_on_workers(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let name = plan.name();
    if reads_scalar_subquery(plan.as_ref()) || COORDINATOR_ONLY.contains(&name) || NOT_SENDABLE.contains(&name) || loses_in_encoding(plan.as_ref()) {
        return false;
    }
    let children = plan.children();
    if children.is_empty() {
        return file_scan(plan.as_ref()).is_some()
            || plan.is::<EmptyExec>()
            || plan.is::<PlaceholderRowExec>()
            || plan.is::<StageReaderExec>();
    }
    children.into_iter().all(runs_on_workers)
}

/// True when `plan` is a chain of task-local operators ending in exactly one file scan.
pub(super) fn is_task_local_tree(plan: &Arc<dyn ExecutionPlan>) -> bool {
    if file_scan(plan.as_ref()).is_some() {
        return !reads_scalar_subquery(plan.as_ref());
    }
    if let Some(join) = broadcast_join(plan.as_ref()) {
        return !reads_scalar_subquery(plan.as_ref()) && is_task_local_tree(join.right());
    }
    let children = plan.children();
    children.len() == 1
        && is_task_local_operator(plan.as_ref())
        && !reads_scalar_subquery(plan.as_ref())
        && is_task_local_tree(children[0])
}

/// A limit inside a Task limits only that Task's slice. That is still exact when every
/// operator above the limit keeps or reorders rows without dropping any, because the final
/// Stage applies the limit again after merging ([`chain_fetch`]). Above a filter or an
/// aggregate it is not, and the subtree must not be cut there.
pub(super) fn limits_are_restorable(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut dropping_rows_above = false;
    let mut node = Some(plan);
    while let Some(current) = node {
        let whole_input = current.output_partitioning().partition_count() == 1;
        // A limit on an operator that merges rows (e.g. a partial aggregate limited to N groups)
        // cannot be re-applied to the merged outputs of several Tasks either.
        if current.fetch().is_some() && (dropping_rows_above || (whole_input && !keeps_all_rows(current.as_ref()))) {
            return false;
        }
        dropping_rows_above |= !keeps_all_rows(current.as_ref());
        node = chain_child(current);
    }
    true
}

#[allow(deprecated)]
fn keeps_all_rows(plan: &dyn ExecutionPlan) -> bool {
    plan.is::<ProjectionExec>()
        || plan.is::<CoalesceBatchesExec>()
        || plan.is::<CooperativeExec>()
        || plan.is::<RepartitionExec>()
        || plan.is::<SortExec>()
        || plan.is::<LocalLimitExec>()
        || file_scan(plan).is_some()
}

/// True when a task-local chain sorts its rows (a per-partition sort, a top-K): its output is a
/// sorted run, and two runs read one after the other are not one.
pub(super) fn sorts_rows(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.is::<SortExec>() || chain_child(plan).is_some_and(sorts_rows)
}

/// The smallest limit in a task-local chain that held for a single partition, i.e. for the
/// whole input (a round-robin repartition above it only spread its rows): the merged Task
/// outputs must be cut to it again.
pub(super) fn chain_fetch(plan: &Arc<dyn ExecutionPlan>) -> Option<usize> {
    let here = plan.fetch().filter(|_| plan.output_partitioning().partition_count() == 1);
    let below = chain_child(plan).and_then(chain_fetch);
    match (here, below) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Scalar subquery results are computed by a `ScalarSubqueryExec` above; until the coordinator
/// has computed one, an expression that reads it can only run where that operator runs (the
/// final Stage). Once computed, it travels to workers as a literal.
fn reads_scalar_subquery(plan: &dyn ExecutionPlan) -> bool {
    let empty = RecordBatch::new_empty(Arc::new(Schema::empty()));
    let mut found = false;
    let _ = plan.apply_expressions(&mut |expr| {
        expr.apply(|e| {
            found |= e.is::<ScalarSubqueryExpr>() && e.evaluate(&empty).is_err();
            Ok(if found { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
        })
    });
    found
}

#[allow(deprecated)]
fn is_task_local_operator(plan: &dyn ExecutionPlan) -> bool {
    if let Some(agg) = plan.downcast_ref::<AggregateExec>() {
        return *agg.mode() == AggregateMode::Partial;
    }
    if let Some(sort) = plan.downcast_ref::<SortExec>() {
        return sort.preserve_partitioning();
    }
    if let Some(repartition) = plan.downcast_ref::<RepartitionExec>() {
        // Round-robin only spreads work over threads; it is dropped from Task plans.
        return matches!(repartition.partitioning(), Partitioning::RoundRobinBatch(_))
            && !repartition.preserve_order();
    }
    plan.is::<FilterExec>()
        || plan.is::<ProjectionExec>()
        || plan.is::<CoalesceBatchesExec>()
        || plan.is::<LocalLimitExec>()
        || plan.is::<CooperativeExec>()
}

/// Rebuilds a task-local subtree so that it reads only `slice` and has one output partition.
pub(super) fn task_plan(plan: &Arc<dyn ExecutionPlan>, slice: &TaskSlice) -> Result<Arc<dyn ExecutionPlan>> {
    if let Some(config) = file_scan(plan.as_ref()) {
        let config = FileScanConfigBuilder::from(config.clone())
            .with_file_groups(vec![slice.group.clone()])
            .build();
        return Ok(DataSourceExec::from_data_source(config));
    }
    if let Some(join) = broadcast_join(plan.as_ref()) {
        let probe = task_plan(join.right(), slice)?;
        return replace_children_if_necessary(Arc::clone(plan), vec![Arc::clone(join.left()), probe]);
    }
    let children = plan.children();
    let [child] = children.as_slice() else {
        return exec_err!("task plan over {} with {} children", plan.name(), children.len());
    };
    let child = task_plan(child, slice)?;
    if plan.is::<RepartitionExec>() {
        return Ok(child);
    }
    replace_children_if_necessary(Arc::clone(plan), vec![child])
}

/// "AggregateExec(Partial) ← FilterExec ← DataSourceExec" for Task summaries.
#[allow(deprecated)]
pub(super) fn operator_chain(plan: &Arc<dyn ExecutionPlan>) -> String {
    let mut names = Vec::new();
    let mut node = Some(plan);
    while let Some(current) = node {
        if !current.is::<RepartitionExec>() && !current.is::<CooperativeExec>() && !current.is::<CoalesceBatchesExec>() {
            names.push(match current.downcast_ref::<AggregateExec>() {
                Some(agg) => format!("{}({:?})", current.name(), agg.mode()),
                None => current.name().to_string(),
            });
        }
        node = chain_child(current);
    }
    names.join(" <- ")
}
