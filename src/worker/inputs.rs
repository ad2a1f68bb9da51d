//! How a Task reads the outputs of the Stages below it: the coordinator told it which worker
//! holds each producer's output; parts held by this worker are read from its own store, the
//! others are fetched over Flight.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::TryStreamExt;

use super::State;
use crate::planner::{StageId, StageSource};
use crate::protocol::{quiver_error, ErrorKind, OutputLocation, QuiverError, TaskKey};
use crate::transport::fetch_output;

pub(super) struct TaskInputs {
    state: Arc<State>,
    locations: HashMap<(u32, u32), (TaskKey, String)>,
}

impl std::fmt::Debug for TaskInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TaskInputs({} producers)", self.locations.len())
    }
}

impl TaskInputs {
    pub(super) fn new(state: Arc<State>, inputs: Vec<OutputLocation>) -> Self {
        let locations = inputs
            .into_iter()
            .filter_map(|l| l.key.map(|key| ((key.stage, key.task), (key, l.worker_url))))
            .collect();
        Self { state, locations }
    }
}

impl StageSource for TaskInputs {
    /// Any error reading an input is a fetch failure that names the Attempt it could not read:
    /// the coordinator recomputes that output and runs this Task again.
    fn open(&self, stage: StageId, task: usize, partition: usize, schema: SchemaRef) -> Result<SendableRecordBatchStream> {
        let Some((key, url)) = self.locations.get(&(stage as u32, task as u32)).cloned() else {
            return Err(quiver_error(ErrorKind::Plan, format!("the task was given no location for the output of stage {stage} task {task}")));
        };
        let failed = {
            let (key, url) = (key.clone(), url.clone());
            move |e: DataFusionError| QuiverError::fetch_failed(key.clone(), &url, &e).into_datafusion()
        };
        if url == self.state.url {
            let stream = self.state.outputs.open(&key, partition as u32).map_err(&failed)?;
            return Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream.map_err(failed))));
        }
        let fetch_schema = Arc::clone(&schema);
        let fetch = async move { fetch_output(&url, key, partition as u32, fetch_schema).await };
        let stream = futures::stream::once(fetch).try_flatten().map_err(failed);
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}
