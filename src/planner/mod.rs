//! The distributed planner: turns one DataFusion physical plan into a DAG of Stages.
//!
//! DataFusion plans the Query once, on the coordinator. This module then finds the largest
//! subtrees that can run as independent Tasks, each reading its own slice of the input files,
//! and replaces each with a [`StageReaderExec`] that reads the Tasks' outputs. What remains above
//! the readers is the final Stage: it runs on the coordinator and performs the real combine
//! (final aggregation, sorted-run merge, global limit, joins). It knows nothing of the network:
//! how a reader gets its data is the business of the [`StageSource`] the caller supplies.

mod reader;
mod rules;
mod split;
mod writer;

use std::sync::Arc;

use datafusion::common::Result;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{
    replace_children_if_necessary, ExecutionPlan, ExecutionPlanProperties,
};

use crate::config::PlannerConfig;
pub use reader::{StageReaderExec, StageSource};
pub use split::TaskSlice;
pub use writer::{count_schema, TaskWriterExec};

/// Index of a Stage within its Query.
pub type StageId = usize;

/// One Task: a plan fragment with exactly one output partition that reads one slice of input.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub stage: StageId,
    pub task: usize,
    pub plan: Arc<dyn ExecutionPlan>,
    /// What a person needs to know about the Task: the operators and the input it reads.
    pub summary: String,
}

/// A Stage that runs on workers as a set of Tasks; its output is read by the final Stage.
#[derive(Debug, Clone)]
pub struct Stage {
    pub id: StageId,
    pub tasks: Vec<TaskSpec>,
}

/// The result of distributing one physical plan.
#[derive(Debug, Clone)]
pub struct DistributedPlan {
    /// Stages that run on workers. Empty when nothing could be distributed.
    pub stages: Vec<Stage>,
    /// The final Stage, run by the coordinator; it reads the worker Stages through readers.
    pub root: Arc<dyn ExecutionPlan>,
}

impl DistributedPlan {
    pub fn task_count(&self) -> usize {
        self.stages.iter().map(|s| s.tasks.len()).sum()
    }

    pub fn is_distributed(&self) -> bool {
        !self.stages.is_empty()
    }
}

/// What the planner needs to know about the cluster and the caller.
pub struct DistributeOptions<'a> {
    pub config: &'a PlannerConfig,
    /// Total Task slots over all live workers.
    pub total_slots: usize,
    /// Where the readers of the final Stage get Task outputs from.
    pub source: Arc<dyn StageSource>,
    /// When set, every Task writes its output to a Parquet file in this directory instead of
    /// returning it (INSERT and CREATE TABLE AS), and returns a row count.
    pub write_dir: Option<WriteTarget>,
}

/// Where a distributed write puts its files.
#[derive(Debug, Clone)]
pub struct WriteTarget {
    pub dir: std::path::PathBuf,
    pub row_group_rows: usize,
}

/// Cuts `plan` into Stages. The result computes exactly what `plan` computes.
pub fn distribute(plan: Arc<dyn ExecutionPlan>, opts: &DistributeOptions) -> Result<DistributedPlan> {
    let mut stages = Vec::new();
    let root_is_stage = rules::is_task_local_tree(&plan);
    let write = opts.write_dir.as_ref().filter(|_| root_is_stage);
    let root = cut(plan, opts, write, &mut stages)?;
    let root = match (&opts.write_dir, write) {
        // The whole plan ran as Tasks that wrote their own files; the root sums their counts.
        (Some(_), Some(_)) => root,
        // The writes happen on the coordinator, after the final Stage.
        (Some(target), None) => {
            let single = single_partition(root);
            let path = target.dir.join("part-final.parquet");
            Arc::new(TaskWriterExec::new(single, path, target.row_group_rows)) as _
        }
        (None, _) => root,
    };
    Ok(DistributedPlan { stages, root })
}

/// Top-down: the first task-local subtree met on each path becomes a Stage.
fn cut(
    plan: Arc<dyn ExecutionPlan>,
    opts: &DistributeOptions,
    write: Option<&WriteTarget>,
    stages: &mut Vec<Stage>,
) -> Result<Arc<dyn ExecutionPlan>> {
    if rules::is_task_local_tree(&plan) && rules::limits_are_restorable(&plan) {
        return make_stage(plan, opts, write, stages);
    }
    let children = plan
        .children()
        .into_iter()
        .map(|child| cut(Arc::clone(child), opts, None, stages))
        .collect::<Result<Vec<_>>>()?;
    replace_children_if_necessary(plan, children)
}

fn make_stage(
    plan: Arc<dyn ExecutionPlan>,
    opts: &DistributeOptions,
    write: Option<&WriteTarget>,
    stages: &mut Vec<Stage>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let id = stages.len();
    let slices = split::slice_scan(&plan, opts.config, opts.total_slots)?;
    let mut tasks = Vec::with_capacity(slices.len());
    for (task, slice) in slices.into_iter().enumerate() {
        let summary = format!("{} over {}", rules::operator_chain(&plan), slice.describe());
        let mut task_plan = rules::task_plan(&plan, &slice)?;
        if let Some(target) = write {
            let path = target.dir.join(format!("part-{id}-{task}.parquet"));
            task_plan = Arc::new(TaskWriterExec::new(task_plan, path, target.row_group_rows));
        }
        tasks.push(TaskSpec { stage: id, task, plan: task_plan, summary });
    }
    let schema_source: Arc<dyn ExecutionPlan> = match &tasks.first() {
        Some(t) if write.is_some() => Arc::clone(&t.plan),
        _ => Arc::clone(&plan),
    };
    let reader =
        StageReaderExec::new(id, tasks.len(), schema_source.as_ref(), Arc::clone(&opts.source));
    let original_partitions = plan.output_partitioning().partition_count();
    let fetch = if write.is_some() { None } else { rules::chain_fetch(&plan) };
    stages.push(Stage { id, tasks });
    let reader: Arc<dyn ExecutionPlan> = Arc::new(reader);
    // A consumer that was given one partition must still get one: merge the Task outputs, and
    // apply again the limit that held for that one partition.
    let tasks_count = reader.output_partitioning().partition_count();
    if (original_partitions == 1 || fetch.is_some()) && tasks_count != 1 {
        return Ok(merge_partitions(reader, fetch));
    }
    Ok(reader)
}

/// Merges all partitions of `plan` into one, keeping its sort order when it has one.
fn single_partition(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    if plan.output_partitioning().partition_count() == 1 {
        return plan;
    }
    merge_partitions(plan, None)
}

fn merge_partitions(plan: Arc<dyn ExecutionPlan>, fetch: Option<usize>) -> Arc<dyn ExecutionPlan> {
    match plan.output_ordering() {
        Some(ordering) => Arc::new(SortPreservingMergeExec::new(ordering.clone(), plan).with_fetch(fetch)),
        None => Arc::new(CoalescePartitionsExec::new(plan).with_fetch(fetch)),
    }
}
