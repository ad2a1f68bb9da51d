//! [`StageReaderExec`]: the leaf of the final Stage that stands where a worker Stage was cut out.
//! Partition `i` of the reader is the output of Task `i` of that Stage.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{internal_err, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning, PlanProperties,
};

use super::StageId;

/// Where Task outputs come from. The coordinator implements it over the network; the planner
/// only needs to know that Task `task` of Stage `stage` yields a stream of batches.
pub trait StageSource: fmt::Debug + Send + Sync {
    fn open(&self, stage: StageId, task: usize, schema: SchemaRef) -> Result<SendableRecordBatchStream>;
}

#[derive(Debug)]
pub struct StageReaderExec {
    stage: StageId,
    tasks: usize,
    properties: Arc<PlanProperties>,
    source: Arc<dyn StageSource>,
}

impl StageReaderExec {
    /// A reader with the schema and orderings of `replaced`, one partition per Task.
    pub fn new(stage: StageId, tasks: usize, replaced: &dyn ExecutionPlan, source: Arc<dyn StageSource>) -> Self {
        let properties = PlanProperties::new(
            replaced.equivalence_properties().clone(),
            Partitioning::UnknownPartitioning(tasks),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self { stage, tasks, properties: Arc::new(properties), source }
    }

    pub fn stage(&self) -> StageId {
        self.stage
    }
}

impl DisplayAs for StageReaderExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "StageReaderExec: stage={}, tasks={}", self.stage, self.tasks)
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
            return internal_err!("StageReaderExec has no children");
        }
        Ok(self)
    }

    fn execute(&self, partition: usize, _context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        if partition >= self.tasks {
            return internal_err!("stage {} has {} tasks, partition {partition} asked", self.stage, self.tasks);
        }
        self.source.open(self.stage, partition, self.schema())
    }
}
