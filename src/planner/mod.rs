//! The distributed planner: turns one DataFusion physical plan into a DAG of Stages.
//!
//! DataFusion plans the Query once, on the coordinator. This module cuts the plan at the
//! Exchanges DataFusion put in it:
//! - a hash (or range) `RepartitionExec` becomes a *shuffle*: the Stage below it partitions its output
//!   and the Stage above reads part `p` of every Task's output in its Task `p`;
//! - a `CoalescePartitionsExec` or `SortPreservingMergeExec` becomes a *gather*: the Stage below
//!   runs on workers and the operator reads all its Task outputs. Inside a worker Stage that is a
//!   broadcast (every Task reads the whole output, e.g. a join's build side); at the top of the
//!   plan it is the final merge on the coordinator.
//!
//! A chain of task-local operators over one file scan (see [`rules`]) is cut into Tasks by
//! slicing its files; every other Stage has one Task per partition of its plan fragment. What
//! only the coordinator can run (scalar subqueries, in-memory tables) stays in the final Stage
//! with everything above it. The planner knows nothing of the network: how a reader gets its
//! data is the business of the [`StageSource`] the caller supplies.

mod adaptive;
mod copy;
mod display;
mod key_filter;
mod probe_filter;
mod reader;
mod rules;
mod split;
mod writer;

use std::sync::Arc;

use datafusion::common::Result;
use datafusion::datasource::sink::DataSinkExec;
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::joins::HashJoinExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{
    replace_children_if_necessary, ExecutionPlan, ExecutionPlanProperties, Partitioning,
};

use crate::config::PlannerConfig;
pub use adaptive::{AdaptiveReads, MergeRead};
pub use probe_filter::apply_key_filter;
pub use key_filter::{summarize_stream, FilterCounts, FilterSource, KeyFilter, KeyFilterLink, KeySummary, SummaryForm};
pub use copy::{copy_attempt_dir, copy_task_dir, file_sink_config, retarget, CopyTaskExec};
pub use reader::{Exchange, StageReaderExec, StageSource};
pub use rules::shuffle_partitioning;
pub use split::{narrow_task_plan, RowGroupStarts, TaskSlice};
pub use writer::{attempt_file, count_schema, task_file, AttemptNumber, TaskWriterExec, COORDINATOR_FILE};

/// Index of a Stage within its Query. Stages are numbered so that inputs come first.
pub type StageId = usize;

/// One Task: a plan fragment and the one partition of it the Task computes.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub stage: StageId,
    pub task: usize,
    /// The plan the worker runs. When its root is a hash or range `RepartitionExec`, the worker
    /// computes partition `partition` of the repartition's input and keeps one output part per
    /// output partition; otherwise it computes partition `partition` of the plan.
    pub plan: Arc<dyn ExecutionPlan>,
    pub partition: usize,
    /// What a person needs to know about the Task: the operators and the input it reads.
    pub summary: String,
    /// The bytes of its scan slice when the coordinator may cut the slice into pieces at
    /// dispatch ([`narrow_task_plan`]): pieces read one after the other compute what the Task
    /// computes. None: the Task runs as planned.
    pub slice_bytes: Option<u64>,
}

/// A Stage that runs on workers as a set of Tasks.
#[derive(Debug, Clone)]
pub struct Stage {
    pub id: StageId,
    pub tasks: Vec<TaskSpec>,
    /// Stages whose outputs this Stage's Tasks read: they must have finished first.
    pub inputs: Vec<StageId>,
    /// How the consumer reads this Stage.
    pub exchange: Exchange,
    /// True when the Tasks are slices of a file scan (each reads other files or row groups);
    /// false when Task `i` computes partition `i` of the fragment.
    pub sliced: bool,
    /// What the Stage runs, for EXPLAIN: the fragment every Task computes a partition of, or
    /// the first Task's plan when the Tasks are slices of a scan.
    pub fragment: Arc<dyn ExecutionPlan>,
    /// The shuffle reads the coordinator may coalesce or split once its inputs have finished;
    /// None when the Tasks must read as planned.
    pub adaptive: Option<AdaptiveReads>,
    /// The output's join key columns, when it is the build side of a join whose probe Stage
    /// filters by them: its Tasks summarize these columns.
    pub key_summary: Option<Vec<usize>>,
    /// The build Stage whose join keys filter this Stage's output, and this side's keys.
    pub key_filter: Option<KeyFilterLink>,
}

/// The result of distributing one physical plan.
#[derive(Debug, Clone)]
pub struct DistributedPlan {
    /// Stages that run on workers, inputs first. Empty when nothing could be distributed.
    pub stages: Vec<Stage>,
    /// The final Stage, run by the coordinator; it reads the worker Stages through readers.
    pub root: Arc<dyn ExecutionPlan>,
    /// The Stage whose Tasks write the files of a distributed write (INSERT, CREATE TABLE AS).
    pub write_stage: Option<StageId>,
    /// Set when the whole plan runs on the coordinator because its scans read only these bytes
    /// (after row-group pruning, when the caller measured it), at most
    /// `PlannerConfig::small_query_max_bytes`.
    pub small_input_bytes: Option<u64>,
}

impl DistributedPlan {
    pub fn task_count(&self) -> usize {
        self.stages.iter().map(|s| s.tasks.len()).sum()
    }

    pub fn is_distributed(&self) -> bool {
        !self.stages.is_empty()
    }

    /// The Stage DAG as text: one block per Stage, then the final Stage. With `annotate`, each
    /// Stage's header gets its text and the final Stage shows its operators' metrics.
    pub fn display(&self, annotate: Option<&dyn Fn(StageId) -> String>) -> String {
        display::render(self, annotate)
    }
}

/// What the planner needs to know about the cluster and the caller.
pub struct DistributeOptions<'a> {
    pub config: &'a PlannerConfig,
    /// Total Task slots over all live workers.
    pub total_slots: usize,
    /// Where readers get Task outputs from.
    pub source: Arc<dyn StageSource>,
    /// When set, the last Stage's Tasks write their output to files in this directory
    /// (INSERT, CREATE TABLE AS, COPY) and return row counts.
    pub write_dir: Option<WriteTarget>,
    /// Link the two Stage inputs of a join with a key filter (`quiver.join_key_filters`).
    pub join_key_filters: bool,
    /// The bytes the plan's scans read after row-group pruning, when the caller found them to
    /// be at most `PlannerConfig::small_query_max_bytes` (`storage::pruning`): the plan then runs
    /// on the coordinator alone even though its table files hold more.
    pub pruned_input_bytes: Option<u64>,
    /// Where the row groups of the scanned Parquet files begin, so that scans are cut into
    /// Tasks at row groups; files missing from it are cut by bytes.
    pub row_group_starts: RowGroupStarts,
}

/// Where a distributed write puts its files.
#[derive(Debug, Clone)]
pub struct WriteTarget {
    pub dir: std::path::PathBuf,
    pub kind: WriteKind,
}

/// How a distributed write writes its files.
#[derive(Debug, Clone)]
pub enum WriteKind {
    /// One Parquet file per Task (a Quiver table's segment); the columns at `not_null` (the
    /// table's NOT NULL columns) must hold no null.
    Table { row_group_rows: usize, not_null: Vec<usize> },
    /// DataFusion's file sink of a `COPY … TO` a directory: one directory per Task.
    Copy { sink: Arc<dyn datafusion::datasource::sink::DataSink> },
}

impl WriteTarget {
    /// The writer of Task `task` of Stage `stage`, over partition `partition` of `input`.
    fn task_writer(&self, input: Arc<dyn ExecutionPlan>, partition: usize, stage: StageId, task: usize) -> Arc<dyn ExecutionPlan> {
        match &self.kind {
            WriteKind::Table { row_group_rows, not_null } => {
                let path = task_file(&self.dir, stage, task);
                Arc::new(TaskWriterExec::new(input, partition, path, *row_group_rows).with_not_null(not_null.clone()))
            }
            WriteKind::Copy { sink } => {
                let sink = Arc::new(DataSinkExec::new(input, Arc::clone(sink), None));
                Arc::new(CopyTaskExec::new(sink, partition, copy_task_dir(&self.dir, stage, task)))
            }
        }
    }

    /// The writer the coordinator runs over its single-partition `input`.
    fn coordinator_writer(&self, input: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
        match &self.kind {
            WriteKind::Table { row_group_rows, not_null } => {
                let path = self.dir.join(COORDINATOR_FILE);
                Arc::new(TaskWriterExec::new(input, 0, path, *row_group_rows).with_not_null(not_null.clone()))
            }
            WriteKind::Copy { sink } => {
                let sink = Arc::new(DataSinkExec::new(input, Arc::clone(sink), None));
                Arc::new(CopyTaskExec::new(sink, 0, self.dir.join(COORDINATOR_DIR)))
            }
        }
    }
}

/// The directory the coordinator writes into when a copy's last Stage is its own.
pub const COORDINATOR_DIR: &str = "coordinator";

/// What a Stage does with its Tasks' results.
enum Output<'a> {
    Gather,
    Shuffle(Partitioning),
    Write(&'a WriteTarget),
}

/// Cuts `plan` into Stages. The result computes exactly what `plan` computes.
pub fn distribute(plan: Arc<dyn ExecutionPlan>, opts: &DistributeOptions) -> Result<DistributedPlan> {
    let max_small = opts.config.small_query_max_bytes;
    let pruned = opts.pruned_input_bytes.filter(|&b| max_small > 0 && b <= max_small);
    if let Some(bytes) = split::small_input(&plan, max_small).or(pruned) {
        let root = match &opts.write_dir {
            Some(target) => target.coordinator_writer(single_partition(plan)),
            None => plan,
        };
        return Ok(DistributedPlan { stages: Vec::new(), root, write_stage: None, small_input_bytes: Some(bytes) });
    }
    let mut builder = Builder { opts, stages: Vec::new() };
    let mut write_stage = None;
    let root: Arc<dyn ExecutionPlan> = match &opts.write_dir {
        Some(target) if rules::runs_on_workers(&plan) && rules::reads_files(&plan) => {
            let cut = builder.stage(Arc::clone(&plan), Output::Write(target))?;
            write_stage = Some(cut.id);
            let counts = EquivalenceProperties::new(count_schema());
            let partitioning = Partitioning::UnknownPartitioning(cut.tasks);
            Arc::new(StageReaderExec::with_properties(cut.id, cut.tasks, Exchange::Gather, counts, partitioning, Arc::clone(&opts.source)))
        }
        // The coordinator writes what only it can compute, after the final Stage.
        Some(target) => {
            let single = single_partition(builder.coordinator(plan)?);
            target.coordinator_writer(single)
        }
        None => builder.coordinator(plan)?,
    };
    if opts.join_key_filters {
        key_filter::link_stages(&mut builder.stages, &root);
    }
    Ok(DistributedPlan { stages: builder.stages, root, write_stage, small_input_bytes: None })
}

/// A Stage just cut out of the plan, as its reader needs to know it.
struct Cut {
    id: StageId,
    tasks: usize,
    /// The limit the consumer must apply again after merging the Tasks' outputs.
    fetch: Option<usize>,
    /// The Tasks are slices of a scan, not the partitions of the replaced subtree.
    sliced: bool,
}

struct Builder<'a> {
    opts: &'a DistributeOptions<'a>,
    stages: Vec<Stage>,
}

impl Builder<'_> {
    /// Cuts a subtree that runs in the final Stage: every maximal subtree that can run on
    /// workers becomes Stages, read back through a gather or a shuffle reader.
    fn coordinator(&mut self, plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
        self.coordinator_under(plan, true)
    }

    /// [`Self::coordinator`] for a subtree whose parent reads its partitions `merged` (a merge,
    /// or the Query's result), or else one by one.
    fn coordinator_under(&mut self, plan: Arc<dyn ExecutionPlan>, merged: bool) -> Result<Arc<dyn ExecutionPlan>> {
        if rules::runs_on_workers(&plan) && rules::reads_files(&plan) {
            if let Some(partitioning) = rules::shuffle_partitioning(&plan) {
                return self.shuffle(plan, partitioning);
            }
            if !rules::is_gather(plan.as_ref()) {
                let reader = self.gather(plan)?;
                if !merged {
                    // A parent that reads partition `p` alone may pair it with partition `p`
                    // of another input (a partitioned join, an interleave): each Task must
                    // stay its partition, never coalesced with its neighbours.
                    if let Some(stage) = self.stages.last_mut() {
                        stage.adaptive = None;
                    }
                }
                return Ok(reader);
            }
        }
        let merges = rules::is_gather(plan.as_ref());
        map_children(plan, |child| self.coordinator_under(child, merges))
    }

    /// Cuts a subtree that runs inside a worker Stage's Tasks at its Exchanges.
    fn fragment(&mut self, plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
        if let Some(partitioning) = rules::shuffle_partitioning(&plan) {
            return self.shuffle(plan, partitioning);
        }
        if let Some(repartition) = plan.downcast_ref::<RepartitionExec>() {
            // A round-robin repartition only spreads rows over threads; across Tasks it would
            // make each Task recompute its whole input for a share of the rows.
            return self.fragment(Arc::clone(repartition.input()));
        }
        if rules::is_gather(plan.as_ref()) {
            let child = Arc::clone(plan.children()[0]);
            let child = self.gather(child)?;
            return replace_children_if_necessary(plan, vec![child]);
        }
        let plan = rules::whole_probe_side(plan)?;
        let plan = self.cut_build_side(plan)?;
        if rules::collects_build_side(plan.as_ref()) {
            let children = plan.children();
            let build = self.broadcast(Arc::clone(children[0]))?;
            let probe = self.fragment(Arc::clone(children[1]))?;
            return replace_children_if_necessary(plan, vec![build, probe]);
        }
        map_children(plan, |child| self.fragment(child))
    }

    /// A partitioned join whose build side drops rows in this Stage, with that side cut into a
    /// Stage of its own so that its keys can filter the probe side (`key_filter::build_side_to_cut`).
    fn cut_build_side(&mut self, plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
        let Some(join) = plan.downcast_ref::<HashJoinExec>().filter(|_| self.opts.join_key_filters) else { return Ok(plan) };
        let Some(partitioning) = key_filter::build_side_to_cut(join) else { return Ok(plan) };
        let (build, probe) = (Arc::clone(join.left()), Arc::clone(join.right()));
        let build = self.shuffle(Arc::new(RepartitionExec::try_new(build, partitioning.clone())?), partitioning)?;
        replace_children_if_necessary(plan, vec![build, probe])
    }

    /// A join's build side: computed once by a Stage of its own, read whole by every Task.
    fn broadcast(&mut self, build: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
        if rules::is_gather(build.as_ref()) {
            return self.fragment(build);
        }
        self.gather(build)
    }

    /// `plan` becomes a Stage whose Task outputs the enclosing plan reads whole.
    fn gather(&mut self, plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
        let original_partitions = plan.output_partitioning().partition_count();
        let cut = self.stage(Arc::clone(&plan), Output::Gather)?;
        let source = Arc::clone(&self.opts.source);
        let reader: Arc<dyn ExecutionPlan> =
            Arc::new(StageReaderExec::new(cut.id, cut.tasks, Exchange::Gather, plan.as_ref(), cut.sliced, source));
        // A consumer that was given one partition must still get one: merge the Task outputs,
        // and apply again the limit that held for that one partition.
        if (original_partitions == 1 || cut.fetch.is_some()) && cut.tasks != 1 {
            return Ok(merge_partitions(reader, cut.fetch));
        }
        Ok(reader)
    }

    /// `repartition`'s input becomes a Stage that hash-partitions its output; the enclosing
    /// plan reads it through a shuffle reader.
    fn shuffle(&mut self, repartition: Arc<dyn ExecutionPlan>, partitioning: Partitioning) -> Result<Arc<dyn ExecutionPlan>> {
        let input = Arc::clone(repartition.children()[0]);
        let partitions = partitioning.partition_count();
        let cut = self.stage(input, Output::Shuffle(partitioning))?;
        let exchange = Exchange::Shuffle { partitions };
        let source = Arc::clone(&self.opts.source);
        let reader = StageReaderExec::new(cut.id, cut.tasks, exchange, repartition.as_ref(), cut.sliced, source);
        let reader: Arc<dyn ExecutionPlan> = Arc::new(reader);
        // Parts from many producers arrive interleaved: restore a per-partition order that
        // a sort-preserving repartition promised.
        match repartition.output_ordering() {
            Some(ordering) => Ok(Arc::new(SortExec::new(ordering.clone(), reader).with_preserve_partitioning(true))),
            None => Ok(reader),
        }
    }

    /// Makes `plan` a Stage.
    fn stage(&mut self, plan: Arc<dyn ExecutionPlan>, output: Output) -> Result<Cut> {
        let sliceable = rules::is_task_local_tree(&plan)
            && rules::limits_are_restorable(&plan)
            && (matches!(output, Output::Gather) || rules::chain_fetch(&plan).is_none());
        let mut adaptive = None;
        let (fragment, parts, fetch) = if sliceable {
            let chain = self.prepare_chain(plan)?;
            let slices = split::slice_scan(&chain, self.opts.config, self.opts.total_slots, &self.opts.row_group_starts)?;
            // Pieces of a slice, read one after the other, compute what the slice computes,
            // unless a Task sorts its rows (a gather merges sorted runs) or writes files.
            let cuttable = split::ranges_splittable(&chain)
                && match &output {
                    Output::Shuffle(_) => true,
                    Output::Gather => !rules::sorts_rows(&chain),
                    Output::Write(_) => false,
                };
            let parts = slices
                .iter()
                .map(|slice| {
                    let summary = format!("{} over {}", rules::operator_chain(&chain), slice.describe());
                    Ok((rules::task_plan(&chain, slice)?, 0, summary, cuttable.then_some(slice.bytes)))
                })
                .collect::<Result<Vec<_>>>()?;
            let fetch = rules::chain_fetch(&chain);
            (chain, parts, fetch)
        } else {
            let fragment = self.fragment(plan)?;
            let count = fragment.output_partitioning().partition_count();
            let summary = rules::operator_chain(&fragment);
            if !matches!(output, Output::Write(_)) {
                adaptive = adaptive::adaptive_reads(&fragment);
            }
            // The Tasks compute partitions of one plan, shared (and encoded once).
            let fragment = match &output {
                Output::Shuffle(partitioning) => Arc::new(RepartitionExec::try_new(fragment, partitioning.clone())?) as _,
                _ => fragment,
            };
            let parts = (0..count).map(|p| (Arc::clone(&fragment), p, format!("{summary}, partition {p}"), None)).collect();
            (fragment, parts, None)
        };
        let id = self.stages.len();
        let mut tasks = Vec::with_capacity(parts.len());
        for (task, (plan, partition, summary, slice_bytes)) in parts.into_iter().enumerate() {
            let (plan, partition): (Arc<dyn ExecutionPlan>, usize) = match &output {
                Output::Shuffle(partitioning) if sliceable => (Arc::new(RepartitionExec::try_new(plan, partitioning.clone())?), partition),
                Output::Write(target) => (target.task_writer(plan, partition, id, task), 0),
                _ => (plan, partition),
            };
            tasks.push(TaskSpec { stage: id, task, plan, partition, summary, slice_bytes });
        }
        let exchange = match &output {
            Output::Shuffle(partitioning) => Exchange::Shuffle { partitions: partitioning.partition_count() },
            _ => Exchange::Gather,
        };
        // Shown in EXPLAIN: what a worker really runs when the Tasks are slices of a scan (the
        // first Task's plan), the shared fragment otherwise.
        let fragment = if sliceable { Arc::clone(&tasks[0].plan) } else { fragment };
        let inputs = display::stage_inputs(&fragment);
        let count = tasks.len();
        self.stages.push(Stage { id, tasks, inputs, exchange, sliced: sliceable, fragment, adaptive, key_summary: None, key_filter: None });
        Ok(Cut { id, tasks: count, fetch, sliced: sliceable })
    }

    /// A task-local chain with the build sides of its broadcast joins cut into Stages of their
    /// own: each Task of the chain reads them whole.
    fn prepare_chain(&mut self, plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
        if rules::file_scan(plan.as_ref()).is_some() {
            return Ok(plan);
        }
        if let Some(join) = rules::broadcast_join(plan.as_ref()) {
            let (build, probe) = (Arc::clone(join.left()), Arc::clone(join.right()));
            let build = self.broadcast(build)?;
            let probe = self.prepare_chain(probe)?;
            return replace_children_if_necessary(plan, vec![build, probe]);
        }
        map_children(plan, |child| self.prepare_chain(child))
    }
}

/// `plan` with each child replaced by `f(child)`.
fn map_children(
    plan: Arc<dyn ExecutionPlan>,
    f: impl FnMut(Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let children = plan.children().into_iter().map(Arc::clone).map(f).collect::<Result<Vec<_>>>()?;
    replace_children_if_necessary(plan, children)
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
