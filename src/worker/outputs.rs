//! Task outputs held by a worker until the Query that needs them ends: in memory within a
//! budget, spilled to local disk as Arrow IPC beyond it, served over Flight by TaskKey and part
//! (the hash partition of a shuffle output; 0 for a gathered output).

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use std::sync::Arc;

use datafusion::arrow::array::{make_array, Array, ArrayRef, AsArray, MutableArrayData, RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::FileReader;
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::repartition::BatchPartitioner;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;

use crate::protocol::{ErrorKind, QuiverError, TaskKey};

enum Output {
    Memory { schema: SchemaRef, batches: Vec<RecordBatch>, bytes: u64 },
    Spilled { schema: SchemaRef, path: PathBuf },
}

/// What a stored output amounts to, over all its parts.
pub struct Stored {
    pub rows: u64,
    pub bytes: u64,
    /// Rows and bytes of each output part (each shuffle partition), in part order.
    pub part_rows: Vec<u64>,
    pub part_bytes: Vec<u64>,
}

/// Sends each batch of a Task's result to the output part(s) it belongs to.
pub enum Router {
    /// One part: the whole result (a gathered Stage).
    Whole,
    /// One part per hash partition (a shuffled Stage), split as DataFusion's repartition does.
    Partition { partitioner: BatchPartitioner, parts: usize },
}

impl Router {
    fn parts(&self) -> usize {
        match self {
            Router::Whole => 1,
            Router::Partition { parts, .. } => *parts,
        }
    }

    fn route(&mut self, batch: RecordBatch) -> Result<Vec<(usize, RecordBatch)>> {
        match self {
            Router::Whole => Ok(vec![(0, batch)]),
            Router::Partition { partitioner, .. } => partitioner.partition_iter(batch)?.collect(),
        }
    }
}

/// One part being written: in memory until the budget runs out, then in a spill file.
struct Part {
    batches: Vec<RecordBatch>,
    reserved: u64,
    spill: Option<(PathBuf, FileWriter<File>)>,
}

struct Pending<'a> {
    store: &'a OutputStore,
    parts: Vec<Part>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        for part in self.parts.drain(..) {
            self.store.release(part.reserved);
            if let Some((path, _)) = part.spill {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Task outputs by (Attempt, part).
type OutputKey = (TaskKey, u32);

pub struct OutputStore {
    outputs: Mutex<HashMap<OutputKey, Output>>,
    memory_used: AtomicU64,
    memory_budget_bytes: u64,
    spill_dir: PathBuf,
    spilled_parts_total: AtomicU64,
}

impl OutputStore {
    pub fn new(memory_budget_bytes: u64, spill_dir: PathBuf) -> Self {
        Self {
            outputs: Mutex::default(),
            memory_used: AtomicU64::new(0),
            memory_budget_bytes,
            spill_dir,
            spilled_parts_total: AtomicU64::new(0),
        }
    }

    pub fn memory_used(&self) -> u64 {
        self.memory_used.load(Ordering::Relaxed)
    }

    pub fn spilled_parts_total(&self) -> u64 {
        self.spilled_parts_total.load(Ordering::Relaxed)
    }

    fn reserve(&self, bytes: u64) -> bool {
        let mut used = self.memory_used.load(Ordering::Relaxed);
        loop {
            if used + bytes > self.memory_budget_bytes {
                return false;
            }
            match self.memory_used.compare_exchange(used, used + bytes, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn release(&self, bytes: u64) {
        self.memory_used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Drains `stream` into the store under `key`, one part per output partition of `router`.
    /// Every part is stored, empty ones too: a consumer asks for each.
    pub async fn store(&self, key: &TaskKey, mut stream: SendableRecordBatchStream, mut router: Router) -> Result<Stored> {
        let schema = stream.schema();
        let parts = (0..router.parts()).map(|_| Part { batches: Vec::new(), reserved: 0, spill: None }).collect();
        // Owns the parts until they are stored: an error or an aborted Task (the future is
        // dropped) gives their memory back and deletes their spill files.
        let mut pending = Pending { store: self, parts };
        let (mut part_rows, mut part_bytes) = (vec![0u64; router.parts()], vec![0u64; router.parts()]);
        while let Some(batch) = stream.next().await {
            for (index, part) in router.route(batch?)? {
                if part.num_rows() == 0 {
                    continue;
                }
                let (part, size) = compact(part)?;
                part_rows[index] += part.num_rows() as u64;
                part_bytes[index] += size;
                self.append(key, index, &schema, &mut pending.parts[index], part, size)?;
            }
        }
        for part in &mut pending.parts {
            if let Some((_, writer)) = &mut part.spill {
                writer.finish()?;
            }
        }
        let parts = std::mem::take(&mut pending.parts);
        let stored: Vec<_> = parts
            .into_iter()
            .enumerate()
            .map(|(index, part)| {
                let output = match part.spill {
                    Some((path, _)) => Output::Spilled { schema: schema.clone(), path },
                    None => Output::Memory { schema: schema.clone(), batches: part.batches, bytes: part.reserved },
                };
                ((key.clone(), index as u32), output)
            })
            .collect();
        self.outputs.lock().expect("outputs lock").extend(stored);
        Ok(Stored { rows: part_rows.iter().sum(), bytes: part_bytes.iter().sum(), part_rows, part_bytes })
    }

    fn append(&self, key: &TaskKey, index: usize, schema: &SchemaRef, part: &mut Part, batch: RecordBatch, size: u64) -> Result<()> {
        if part.spill.is_none() && self.reserve(size) {
            part.reserved += size;
            part.batches.push(batch);
            return Ok(());
        }
        if part.spill.is_none() {
            // Owned by the part before anything is written: a failed write still deletes it.
            part.spill = Some(self.open_spill(key, index, schema)?);
            self.spilled_parts_total.fetch_add(1, Ordering::Relaxed);
            let writer = &mut part.spill.as_mut().expect("just opened").1;
            for b in part.batches.drain(..) {
                writer.write(&b)?;
            }
            self.release(std::mem::take(&mut part.reserved));
        }
        part.spill.as_mut().expect("spilling").1.write(&batch)?;
        Ok(())
    }

    fn open_spill(&self, key: &TaskKey, index: usize, schema: &SchemaRef) -> Result<(PathBuf, FileWriter<File>)> {
        std::fs::create_dir_all(&self.spill_dir)?;
        let name = format!("{}-{}-{}-{}-{index}.arrow", key.query_id, key.stage, key.task, key.attempt);
        let path = self.spill_dir.join(name);
        match FileWriter::try_new(File::create(&path)?, schema) {
            Ok(writer) => Ok((path, writer)),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e.into())
            }
        }
    }

    /// Streams one part of a stored output; it stays stored until its Query is released.
    pub fn open(&self, key: &TaskKey, part: u32) -> Result<SendableRecordBatchStream> {
        let outputs = self.outputs.lock().expect("outputs lock");
        match outputs.get(&(key.clone(), part)) {
            Some(Output::Memory { schema, batches, .. }) => {
                let stream = futures::stream::iter(batches.clone().into_iter().map(Ok));
                Ok(Box::pin(RecordBatchStreamAdapter::new(schema.clone(), stream)))
            }
            Some(Output::Spilled { schema, path }) => Ok(read_spill(schema.clone(), path.clone())),
            None => Err(QuiverError {
                kind: ErrorKind::FetchFailed,
                message: format!("no output part {part} of task {key} on this worker: it was freed or never written"),
                output: Some(key.clone()),
            }
            .into_datafusion()),
        }
    }

    /// The Queries it holds outputs of.
    pub fn query_ids(&self) -> std::collections::BTreeSet<String> {
        self.outputs.lock().expect("outputs lock").keys().map(|(key, _)| key.query_id.clone()).collect()
    }

    /// Frees every output of a Query.
    pub fn release_query(&self, query_id: &str) {
        self.release_where(|key| key.query_id == query_id);
    }

    /// Frees the outputs of one Attempt.
    pub fn release_attempt(&self, attempt: &TaskKey) {
        self.release_where(|key| key == attempt);
    }

    /// Frees every output.
    pub fn clear(&self) {
        self.release_where(|_| true);
    }

    fn release_where(&self, matches: impl Fn(&TaskKey) -> bool) {
        let mut outputs = self.outputs.lock().expect("outputs lock");
        let keys: Vec<OutputKey> = outputs.keys().filter(|k| matches(&k.0)).cloned().collect();
        for key in keys {
            match outputs.remove(&key) {
                Some(Output::Memory { bytes, .. }) => self.release(bytes),
                Some(Output::Spilled { path, .. }) => {
                    let _ = std::fs::remove_file(path);
                }
                None => {}
            }
        }
    }

    /// Number of output parts held.
    pub fn len(&self) -> usize {
        self.outputs.lock().expect("outputs lock").len()
    }

    /// Number of spill files on disk.
    pub fn spill_files(&self) -> usize {
        std::fs::read_dir(&self.spill_dir).map(|d| d.count()).unwrap_or(0)
    }
}

impl Drop for OutputStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.spill_dir);
    }
}

/// Slack a stored column's buffers may have beyond twice what its rows use before they are
/// copied to buffers of their own size.
const COMPACT_SLACK_BYTES: usize = 16 * 1024;

/// A batch that holds only what its rows need, and its size. String and binary views keep
/// whole data buffers of the batch they were cut from alive (a join's output points into the
/// whole build side): stored or sent as they are, every batch would carry those buffers again.
/// Other columns of a shuffle part are slices of buffers shared with the other parts; they are
/// charged for their slice only, and copied out when their buffers are more than twice what
/// they use (a reader in this process would otherwise hold and account for the whole buffers).
fn compact(batch: RecordBatch) -> Result<(RecordBatch, u64)> {
    let mut size = 0u64;
    let mut columns = Vec::with_capacity(batch.num_columns());
    for column in batch.columns() {
        let owned: ArrayRef = if let Some(views) = column.as_string_view_opt() {
            Arc::new(views.gc())
        } else if let Some(views) = column.as_binary_view_opt() {
            Arc::new(views.gc())
        } else {
            let used = column.to_data().get_slice_memory_size().unwrap_or_else(|_| column.get_array_memory_size());
            if column.get_array_memory_size() <= 2 * used + COMPACT_SLACK_BYTES {
                size += used as u64;
                columns.push(Arc::clone(column));
                continue;
            }
            // Buffers far larger than the rows they hold (a scan's batch of a few rows keeps
            // buffers sized for a full batch): the rows are copied out, or a reader in this
            // process would hold, and account for, every such buffer.
            let data = column.to_data();
            let mut copy = MutableArrayData::new(vec![&data], false, data.len());
            copy.try_extend(0, 0, data.len())?;
            make_array(copy.freeze())
        };
        size += owned.get_array_memory_size() as u64;
        columns.push(owned);
    }
    // The row count too: a batch without columns (a cross join side, a count's input) has rows.
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok((RecordBatch::try_new_with_options(batch.schema(), columns, &options)?, size))
}

/// Reads a spill file one batch per blocking call, as the consumer asks for it: a reader nobody
/// polls holds no thread. (A thread per open reader, blocked until its consumer reads on, could
/// fill the runtime's blocking pool: a merge opening a part of each of many spilled outputs
/// would hold a thread per part read so far and wait forever for parts that get none.)
fn read_spill(schema: SchemaRef, path: PathBuf) -> SendableRecordBatchStream {
    let batches = futures::stream::unfold(Spill::Closed(path), |spill| async move {
        match tokio::task::spawn_blocking(move || spill.next()).await {
            Ok(next) => next,
            Err(e) => Some((Err(DataFusionError::External(Box::new(e))), Spill::Done)),
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, batches))
}

/// Where a spill file's reader is.
enum Spill {
    Closed(PathBuf),
    Open(FileReader<File>),
    Done,
}

impl Spill {
    /// The next batch and what is left; blocks on the file.
    fn next(self) -> Option<(Result<RecordBatch>, Spill)> {
        let mut reader = match self {
            Spill::Done => return None,
            Spill::Open(reader) => reader,
            Spill::Closed(path) => match File::open(&path).map_err(DataFusionError::from).and_then(|f| Ok(FileReader::try_new(f, None)?)) {
                Ok(reader) => reader,
                Err(e) => return Some((Err(e), Spill::Done)),
            },
        };
        let batch = reader.next()?;
        Some((batch.map_err(DataFusionError::from), Spill::Open(reader)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use futures::TryStreamExt;

    fn batch_of(column: ArrayRef) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![column]).unwrap()
    }

    /// Regression: a scan of row groups of a few rows gives batches whose buffers are sized for
    /// a full batch. Stored as they were, a reader in this process (`quiver local`) held and
    /// accounted for every such buffer, and a join's build side over many of them ran out of
    /// memory (a NOT IN over 30,000 rows asked for 512 MB).
    /// Regression: each open spilled part read ahead on a blocking thread of its own until its
    /// consumer read on; with the blocking pool full of such readers, a part opened next never
    /// got a thread, and a merge waiting for its first batch waited forever.
    #[test]
    fn spilled_parts_read_at_once_need_no_thread_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part.arrow");
        let batch = batch_of(Arc::new(Int64Array::from_iter_values(0..10)));
        let mut writer = FileWriter::try_new(File::create(&path).unwrap(), &batch.schema()).unwrap();
        for _ in 0..20 {
            writer.write(&batch).unwrap();
        }
        writer.finish().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().max_blocking_threads(1).enable_all().build().unwrap();
        runtime.block_on(async {
            let mut readers: Vec<_> = (0..3).map(|_| read_spill(batch.schema(), path.clone())).collect();
            for reader in &mut readers {
                let first = tokio::time::timeout(std::time::Duration::from_secs(10), reader.next()).await;
                assert_eq!(first.expect("a batch, not a wait").unwrap().unwrap().num_rows(), 10);
            }
            let rest: Vec<RecordBatch> = readers.remove(0).try_collect().await.unwrap();
            assert_eq!(rest.len(), 19);
        });
    }

    #[test]
    fn a_few_rows_in_large_buffers_are_stored_in_buffers_of_their_own_size() {
        let full: ArrayRef = Arc::new(Int64Array::from_iter_values(0..8192));
        let few = full.slice(100, 7);
        let (stored, size) = compact(batch_of(Arc::clone(&few))).unwrap();
        assert_eq!(stored.column(0).as_ref(), few.as_ref());
        assert!(stored.get_array_memory_size() < 1024, "{} bytes", stored.get_array_memory_size());
        assert!(size < 1024, "{size}");
        // Half of a batch (one of two shuffle parts) stays a slice of the shared buffers.
        let half = full.slice(0, 4096);
        let (stored, size) = compact(batch_of(Arc::clone(&half))).unwrap();
        assert_eq!(stored.column(0).to_data().buffers()[0].as_ptr(), half.to_data().buffers()[0].as_ptr());
        assert_eq!(size, 4096 * 8);
    }
}
