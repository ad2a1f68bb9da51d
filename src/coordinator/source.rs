//! How the final Stage reads a worker Stage: wait until the Query's run names the Attempt whose
//! output to read, then fetch it (or one part of it, for a shuffle) from the worker that holds
//! it, over Flight.
//!
//! Rows the final Stage has passed on cannot be taken back, so a part is *held back* until it
//! has been read whole: if its worker dies half-way, the part is read again, from the start,
//! from a recomputed Attempt, and no row is passed on twice or lost. Holding costs memory, so
//! it has a budget over all Queries ([`FINAL_HOLD_BYTES`]); a part that finds the budget spent
//! streams through, and losing it half-way fails the Query with an error that says so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::Result;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::watch;

use super::cluster::{Cluster, TaskOutcome};
use crate::config::FINAL_HOLD_BYTES;
use crate::planner::{StageId, StageSource};
use crate::protocol::{error_text, quiver_error, ErrorKind, QuiverError, TaskKey};
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
        let outcome = self.cluster.subscribe(&self.query_id, stage as u32, task as u32)?;
        let part = Part { cluster: Arc::clone(&self.cluster), query_id: self.query_id.clone(), part: partition as u32, schema: Arc::clone(&schema) };
        let stream = futures::stream::once(part.read_task(outcome)).try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// One part of one Task's output, as the final Stage reads it.
#[derive(Clone)]
struct Part {
    cluster: Arc<Cluster>,
    query_id: String,
    part: u32,
    schema: SchemaRef,
}

impl Part {
    /// Reads the part of a Task; of a split one, the part of each of its pieces in turn.
    async fn read_task(self, mut outcome: watch::Receiver<Option<TaskOutcome>>) -> Result<BoxStream<'static, Result<RecordBatch>>> {
        let pieces = outcome.wait_for(|o| o.is_some()).await.ok().and_then(|o| match &*o {
            Some(TaskOutcome::Pieces(ids)) => Some(ids.clone()),
            _ => None,
        });
        let Some(pieces) = pieces else { return self.read(outcome).await };
        let receivers = pieces
            .iter()
            .map(|&(stage, task)| self.cluster.subscribe(&self.query_id, stage, task))
            .collect::<Result<Vec<_>>>()?;
        let stream = futures::stream::iter(receivers).then(move |receiver| self.clone().read(receiver)).try_flatten();
        Ok(stream.boxed())
    }

    /// Reads the part from the Attempt the run names; when that output turns out to be
    /// unreadable, tells the run (which recomputes it) and reads the next Attempt named.
    async fn read(self, mut outcome: watch::Receiver<Option<TaskOutcome>>) -> Result<BoxStream<'static, Result<RecordBatch>>> {
        let mut unreadable: Option<TaskKey> = None;
        loop {
            let (key, url) = match next_output(&mut outcome, unreadable.as_ref()).await? {
                Named::Output(key, url) => (key, url),
                Named::Empty => return Ok(futures::stream::empty().boxed()),
                Named::Pieces => return Err(quiver_error(ErrorKind::Internal, "a piece of a split Task was split again")),
            };
            tracing::debug!(task = %key, part = self.part, "task output fetch starts");
            // A fetch from a worker cut off the network would wait for TCP to give up; the run
            // declares such an output lost sooner, and then the fetch is dropped.
            let fetched = tokio::select! {
                fetched = self.fetch_held(&key, &url) => fetched,
                () = output_replaced(outcome.clone(), &key) => {
                    unreadable = Some(key);
                    continue;
                }
            };
            match fetched {
                Ok(batches) => return Ok(batches),
                Err(e) => {
                    let error = QuiverError::fetch_failed(key.clone(), &url, &e);
                    tracing::warn!("{}; reading it from another attempt", error.message);
                    if !self.cluster.output_unreadable(&key, &error) {
                        return Err(error.into_datafusion());
                    }
                    unreadable = Some(key);
                }
            }
        }
    }

    /// Fetches the part, holding its batches until it has been read whole (or until the hold
    /// budget is spent; then the rest streams through).
    async fn fetch_held(&self, key: &TaskKey, url: &str) -> Result<BoxStream<'static, Result<RecordBatch>>> {
        let mut stream = fetch_output(self.cluster.security(), url, key.clone(), self.part, Arc::clone(&self.schema)).await?;
        let mut held = Hold::default();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            if !held.add(batch) {
                return Ok(self.stream_rest(held, stream, key.clone()));
            }
        }
        self.cluster.mark_part_read(key, self.part);
        Ok(held.into_stream())
    }

    /// The held batches, then the rest of the part as it arrives. Once a batch has been passed
    /// on, losing the part cannot be repaired: the error says so.
    fn stream_rest(&self, held: Hold, rest: SendableRecordBatchStream, key: TaskKey) -> BoxStream<'static, Result<RecordBatch>> {
        let (cluster, part) = (Arc::clone(&self.cluster), self.part);
        let failed_key = key.clone();
        let rest = rest.map_err(move |e| {
            quiver_error(
                ErrorKind::Execution,
                format!(
                    "the output of task {failed_key} was lost after part of it had been passed on (it was larger than the \
                     final stage's hold budget of {FINAL_HOLD_BYTES} bytes), so the query cannot be recovered exactly: {}",
                    error_text(&e)
                ),
            )
        });
        let done = futures::stream::once(async move {
            cluster.mark_part_read(&key, part);
            None
        });
        held.into_stream().chain(rest.map(Some).chain(done).filter_map(futures::future::ready)).boxed()
    }
}

/// What the run names for a Task.
enum Named {
    Output(TaskKey, String),
    /// Nothing to read: the Task's partitions were coalesced into another's.
    Empty,
    /// Its pieces are to be read instead.
    Pieces,
}

/// Waits until the run names an output to read other than `unreadable`, or fails.
async fn next_output(outcome: &mut watch::Receiver<Option<TaskOutcome>>, unreadable: Option<&TaskKey>) -> Result<Named> {
    let named = outcome
        .wait_for(|o| match o {
            Some(TaskOutcome::Succeeded { key, .. }) => Some(key) != unreadable,
            Some(TaskOutcome::Failed(_) | TaskOutcome::Empty | TaskOutcome::Pieces(_)) => true,
            None => false,
        })
        .await
        .map_err(|_| quiver_error(ErrorKind::Cancelled, "the query ended"))?
        .clone();
    match named {
        Some(TaskOutcome::Succeeded { key, worker_url }) => Ok(Named::Output(key, worker_url)),
        Some(TaskOutcome::Empty) => Ok(Named::Empty),
        Some(TaskOutcome::Pieces(_)) => Ok(Named::Pieces),
        Some(TaskOutcome::Failed(error)) => Err(error.into_datafusion()),
        None => unreachable!("waited for an outcome"),
    }
}

/// Returns once the run no longer names `key` as the output to read.
async fn output_replaced(mut outcome: watch::Receiver<Option<TaskOutcome>>, key: &TaskKey) {
    let named = |o: &Option<TaskOutcome>| matches!(o, Some(TaskOutcome::Succeeded { key: k, .. }) if k == key);
    if outcome.wait_for(|o| !named(o)).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Bytes held back by the final Stages of every Query in this process.
static HELD_BYTES: AtomicU64 = AtomicU64::new(0);

/// Batches held back, with their share of [`FINAL_HOLD_BYTES`], given back when dropped.
#[derive(Default)]
struct Hold {
    batches: Vec<RecordBatch>,
    bytes: u64,
}

impl Hold {
    /// Holds `batch` if the budget allows it; otherwise keeps it last and returns false.
    fn add(&mut self, batch: RecordBatch) -> bool {
        let size = batch.get_array_memory_size() as u64;
        let reserved = HELD_BYTES.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
            (used + size <= FINAL_HOLD_BYTES).then_some(used + size)
        });
        self.batches.push(batch);
        if reserved.is_ok() {
            self.bytes += size;
        }
        reserved.is_ok()
    }

    /// The held batches; their bytes are given back as the stream is dropped.
    fn into_stream(mut self) -> BoxStream<'static, Result<RecordBatch>> {
        let batches = std::mem::take(&mut self.batches);
        let release = futures::stream::once(async move {
            drop(self);
            None::<Result<RecordBatch>>
        });
        futures::stream::iter(batches.into_iter().map(Ok)).chain(release.filter_map(futures::future::ready)).boxed()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        HELD_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}
