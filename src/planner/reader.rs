//! [`StageReaderExec`]: the leaf that stands where a Stage was cut out of the plan. It reads the
//! Stage's Task outputs through an Exchange:
//! - *gather*: partition `i` of the reader is the whole output of Task `i`;
//! - *shuffle*: every Task hash-partitioned its output into `partitions` parts, and partition
//!   `p` of the reader is part `p` of every Task's output.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{exec_err, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning, PlanProperties,
};
use futures::StreamExt;

use super::StageId;
use crate::config::EXCHANGE_FETCHES_MAX;

/// Where Task outputs come from. The coordinator and the workers implement it over the network;
/// the planner only needs to know that part `partition` of the output of Task `task` of Stage
/// `stage` is a stream of batches.
pub trait StageSource: fmt::Debug + Send + Sync {
    fn open(&self, stage: StageId, task: usize, partition: usize, schema: SchemaRef) -> Result<SendableRecordBatchStream>;

    /// The (producer Task, part) pairs partition `partition` of a shuffle reader of `stage`
    /// reads. As planned that is part `partition` of each of the Stage's `tasks` Tasks; a
    /// source whose Task was given an adapted read (coalesced partitions, or a range of the
    /// producers of a skewed one) answers with that instead.
    fn shuffle_inputs(&self, stage: StageId, tasks: usize, partition: usize) -> Vec<(usize, usize)> {
        let _ = stage;
        (0..tasks).map(|task| (task, partition)).collect()
    }
}

/// How a reader maps its partitions onto the Stage's Task outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// Reader partition `i` is Task `i`'s whole output.
    Gather,
    /// Reader partition `p` is part `p` of every Task's output.
    Shuffle { partitions: usize },
}

#[derive(Debug)]
pub struct StageReaderExec {
    stage: StageId,
    tasks: usize,
    exchange: Exchange,
    properties: Arc<PlanProperties>,
    source: Arc<dyn StageSource>,
}

impl StageReaderExec {
    /// A reader in place of `replaced`: it reports the properties `replaced` had, so that the
    /// plan rebuilt around it keeps DataFusion's invariants (an interleave of hash-partitioned
    /// inputs, a window's ordered partition columns). `sliced` says the Tasks are slices of a
    /// scan rather than the partitions of `replaced`.
    pub fn new(
        stage: StageId,
        tasks: usize,
        exchange: Exchange,
        replaced: &dyn ExecutionPlan,
        sliced: bool,
        source: Arc<dyn StageSource>,
    ) -> Self {
        let mut equivalence = replaced.equivalence_properties().clone();
        let partitioning = match exchange {
            // Part `p` of every producer holds exactly the rows the repartition routed to `p`,
            // but parts from many producers arrive interleaved: no order survives.
            Exchange::Shuffle { .. } => {
                equivalence.clear_orderings();
                replaced.output_partitioning().clone()
            }
            Exchange::Gather if !sliced && replaced.output_partitioning().partition_count() == tasks => {
                replaced.output_partitioning().clone()
            }
            // Slices regroup the scan's files: what held per partition may not hold per Task.
            Exchange::Gather => {
                equivalence.clear_per_partition_constants();
                Partitioning::UnknownPartitioning(tasks)
            }
        };
        Self::with_properties(stage, tasks, exchange, equivalence, partitioning, source)
    }

    /// A reader with exactly these properties: what a worker decodes.
    pub fn with_properties(
        stage: StageId,
        tasks: usize,
        exchange: Exchange,
        equivalence: EquivalenceProperties,
        partitioning: Partitioning,
        source: Arc<dyn StageSource>,
    ) -> Self {
        let properties = PlanProperties::new(equivalence, partitioning, EmissionType::Incremental, Boundedness::Bounded);
        Self { stage, tasks, exchange, properties: Arc::new(properties), source }
    }

    /// The number of partitions a reader of `tasks` Tasks through `exchange` has.
    pub fn partitions(exchange: Exchange, tasks: usize) -> usize {
        match exchange {
            Exchange::Gather => tasks,
            Exchange::Shuffle { partitions } => partitions,
        }
    }

    pub fn stage(&self) -> StageId {
        self.stage
    }

    pub fn tasks(&self) -> usize {
        self.tasks
    }

    pub fn exchange(&self) -> Exchange {
        self.exchange
    }
}

impl DisplayAs for StageReaderExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match self.exchange {
            Exchange::Gather => write!(f, "StageReaderExec: stage={}, gather {} task(s)", self.stage, self.tasks),
            Exchange::Shuffle { partitions } => write!(
                f,
                "StageReaderExec: stage={}, shuffle {} task(s) into {partitions} partition(s)",
                self.stage, self.tasks
            ),
        }
    }
}

impl ExecutionPlan for StageReaderExec {
    fn name(&self) -> &str {
        "StageReaderExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn datafusion::physical_expr::PhysicalExpr>) -> Result<datafusion::common::tree_node::TreeNodeRecursion>,
    ) -> Result<datafusion::common::tree_node::TreeNodeRecursion> {
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        if !children.is_empty() {
            return exec_err!("StageReaderExec has no children");
        }
        Ok(self)
    }

    fn execute(&self, partition: usize, _context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let count = self.properties.output_partitioning().partition_count();
        if partition >= count {
            return exec_err!("stage {} reader has {count} partitions, partition {partition} asked", self.stage);
        }
        match self.exchange {
            Exchange::Gather => self.source.open(self.stage, partition, 0, self.schema()),
            Exchange::Shuffle { .. } => {
                let parts = (self.source.shuffle_inputs(self.stage, self.tasks, partition).into_iter())
                    .map(|(task, part)| self.source.open(self.stage, task, part, self.schema()))
                    .collect::<Result<Vec<_>>>()?;
                // Fetch from several producers at once: each waits on a different worker.
                let merged = futures::stream::iter(parts).flatten_unordered(EXCHANGE_FETCHES_MAX);
                Ok(Box::pin(RecordBatchStreamAdapter::new(self.schema(), merged)))
            }
        }
    }
}
