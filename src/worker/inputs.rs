//! How a Task reads the outputs of the Stages below it: the coordinator told it which worker
//! holds each producer's output; parts held by this worker are read from its own store, the
//! others are fetched over Flight. A shuffle read the coordinator adapted (coalesced
//! partitions, a range of a skewed partition's producers, the pieces whose partial aggregates
//! a Task merges) reads what the assignment names.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::{StreamExt, TryStreamExt};

use super::State;
use crate::planner::{StageId, StageSource};
use crate::protocol::{quiver_error, ErrorKind, OutputLocation, QuiverError, ShuffleRead, TaskKey};
use crate::transport::fetch_output;

pub(super) struct TaskInputs {
    state: Arc<State>,
    locations: BTreeMap<(u32, u32), Location>,
    reads: HashMap<u32, ShuffleRead>,
}

/// Where one producer Task's output is.
#[derive(Clone)]
enum Location {
    /// Held by the worker at this URL, under this Attempt.
    At(TaskKey, String),
    /// Nowhere: the Task never ran, its partitions were coalesced into another's.
    Empty,
    /// In these Tasks of the same Stage, read one after the other: its partition was split.
    Pieces(Vec<u32>),
}

impl std::fmt::Debug for TaskInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TaskInputs({} producers)", self.locations.len())
    }
}

impl TaskInputs {
    pub(super) fn new(state: Arc<State>, inputs: Vec<OutputLocation>, reads: Vec<ShuffleRead>) -> Self {
        let locations = inputs
            .into_iter()
            .filter_map(|l| {
                let key = l.key?;
                let id = (key.stage, key.task);
                let location = match (l.empty, l.pieces.is_empty()) {
                    (false, _) => Location::At(key, l.worker_url),
                    (true, true) => Location::Empty,
                    (true, false) => Location::Pieces(l.pieces),
                };
                Some((id, location))
            })
            .collect();
        let reads = reads.into_iter().map(|r| (r.stage, r)).collect();
        Self { state, locations, reads }
    }
}

impl TaskInputs {
    /// Part `partition` of the output of Attempt `key`, held by the worker at `url`. Any error
    /// reading it is a fetch failure that names the Attempt: the coordinator recomputes that
    /// output and runs this Task again.
    fn read(&self, key: TaskKey, url: String, partition: usize, schema: SchemaRef) -> Result<SendableRecordBatchStream> {
        let failed = {
            let (key, url) = (key.clone(), url.clone());
            move |e: DataFusionError| QuiverError::fetch_failed(key.clone(), &url, &e).into_datafusion()
        };
        if url == self.state.url {
            let stream = self.state.outputs.open(&key, partition as u32).map_err(&failed)?;
            return Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream.map_err(failed))));
        }
        let fetch_schema = Arc::clone(&schema);
        let state = Arc::clone(&self.state);
        let fetch = async move { fetch_output(&state.security, &url, key, partition as u32, fetch_schema).await };
        let stream = futures::stream::once(fetch).try_flatten().map_err(failed);
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }

    fn location(&self, stage: u32, task: u32) -> Result<Location> {
        // A merge reads its producers' pieces, Tasks of its own Stage, in their stead.
        let stage = self.reads.get(&stage).and_then(|read| read.merged_from).unwrap_or(stage);
        self.locations.get(&(stage, task)).cloned().ok_or_else(|| {
            quiver_error(ErrorKind::Plan, format!("the task was given no location for the output of stage {stage} task {task}"))
        })
    }
}

impl StageSource for TaskInputs {
    fn open(&self, stage: StageId, task: usize, partition: usize, schema: SchemaRef) -> Result<SendableRecordBatchStream> {
        match self.location(stage as u32, task as u32)? {
            Location::At(key, url) => self.read(key, url, partition, schema),
            Location::Empty => Ok(Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::empty()))),
            Location::Pieces(pieces) => {
                let mut streams = Vec::with_capacity(pieces.len());
                for piece in pieces {
                    let Location::At(key, url) = self.location(stage as u32, piece)? else {
                        return Err(quiver_error(ErrorKind::Plan, format!("piece {piece} of stage {stage} task {task} has no output")));
                    };
                    streams.push(self.read(key, url, partition, Arc::clone(&schema))?);
                }
                Ok(Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::iter(streams).flatten())))
            }
        }
    }

    /// The producers the coordinator gave locations for (a skewed Stage may have more Tasks
    /// than it was planned with), or the adapted read the assignment names.
    fn shuffle_inputs(&self, stage: StageId, _tasks: usize, partition: usize) -> Vec<(usize, usize)> {
        let stage = stage as u32;
        let producers: Vec<u32> = match self.reads.get(&stage) {
            Some(read) if !read.tasks.is_empty() => read.tasks.clone(),
            _ => {
                let held = self.locations.range((stage, 0)..(stage + 1, 0)).filter(|(_, l)| matches!(l, Location::At(..)));
                held.map(|((_, t), _)| *t).collect()
            }
        };
        let parts = match self.reads.get(&stage) {
            Some(read) => read.parts.clone(),
            None => vec![partition as u32],
        };
        producers.iter().flat_map(|&task| parts.iter().map(move |&part| (task as usize, part as usize))).collect()
    }
}
