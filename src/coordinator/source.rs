//! How the final Stage reads a worker Stage: wait for the Task's outcome, then fetch its output
//! (or one part of it, for a shuffle) from the worker that holds it, over Flight.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::{StreamExt, TryStreamExt};

use super::cluster::{outcome_error, Cluster, TaskOutcome};
use crate::planner::{StageId, StageSource};
use crate::transport::fetch_output;

/// The [`StageSource`] of one Query.
pub struct QueryTasks {
    pub query_id: String,
    pub cluster: Arc<Cluster>,
}

impl std::fmt::Debug for QueryTasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QueryTasks({})", self.query_id)
    }
}

impl StageSource for QueryTasks {
    fn open(&self, stage: StageId, task: usize, partition: usize, schema: SchemaRef) -> Result<SendableRecordBatchStream> {
        let (stage, task) = (stage as u32, task as u32);
        let mut outcome = self.cluster.subscribe(&self.query_id, stage, task)?;
        let (cluster, query_id) = (Arc::clone(&self.cluster), self.query_id.clone());
        let fetch_schema = Arc::clone(&schema);
        let open = async move {
            let outcome = outcome
                .wait_for(|o| o.is_some())
                .await
                .map_err(|_| DataFusionError::Execution(format!("query {query_id} ended")))?
                .clone()
                .expect("waited for an outcome");
            let (key, url) = match outcome {
                TaskOutcome::Succeeded { key, worker_url } => (key, worker_url),
                TaskOutcome::Failed(error) => return Err(outcome_error(error)),
            };
            tracing::debug!(task = %key, partition, "task output fetch starts");
            let batches = fetch_output(&url, key, partition as u32, fetch_schema).await?;
            Ok::<_, DataFusionError>(mark_consumed_at_end(batches, cluster, query_id, stage, task))
        };
        let stream = futures::stream::once(open).try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// Passes batches through and records the part as read once it has been read whole.
fn mark_consumed_at_end(
    batches: SendableRecordBatchStream,
    cluster: Arc<Cluster>,
    query_id: String,
    stage: u32,
    task: u32,
) -> futures::stream::BoxStream<'static, Result<datafusion::arrow::array::RecordBatch>> {
    let done = futures::stream::once(async move {
        cluster.mark_part_read(&query_id, stage, task);
        None
    });
    batches.map(Some).chain(done).filter_map(futures::future::ready).boxed()
}
