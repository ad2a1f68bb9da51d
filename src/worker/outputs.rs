//! Task outputs held by a worker until the Query that needs them ends: in memory within a
//! budget, spilled to local disk as Arrow IPC beyond it, served over Flight by TaskKey.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::FileReader;
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;

use crate::protocol::TaskKey;

enum Output {
    Memory { schema: SchemaRef, batches: Vec<RecordBatch>, bytes: u64 },
    Spilled { schema: SchemaRef, path: PathBuf },
}

/// What a stored output amounts to.
pub struct Stored {
    pub rows: u64,
    pub bytes: u64,
}

pub struct OutputStore {
    outputs: Mutex<HashMap<TaskKey, Output>>,
    memory_used: AtomicU64,
    memory_budget_bytes: u64,
    spill_dir: PathBuf,
}

impl OutputStore {
    pub fn new(memory_budget_bytes: u64, spill_dir: PathBuf) -> Self {
        Self { outputs: Mutex::default(), memory_used: AtomicU64::new(0), memory_budget_bytes, spill_dir }
    }

    pub fn memory_used(&self) -> u64 {
        self.memory_used.load(Ordering::Relaxed)
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

    /// Drains `stream` into the store under `key`.
    pub async fn store(&self, key: &TaskKey, mut stream: SendableRecordBatchStream) -> Result<Stored> {
        let schema = stream.schema();
        let (mut batches, mut reserved, mut rows, mut bytes) = (Vec::new(), 0u64, 0u64, 0u64);
        let mut spill: Option<(PathBuf, FileWriter<File>)> = None;
        let result = async {
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                let size = batch.get_array_memory_size() as u64;
                rows += batch.num_rows() as u64;
                bytes += size;
                if spill.is_none() && self.reserve(size) {
                    reserved += size;
                    batches.push(batch);
                    continue;
                }
                if spill.is_none() {
                    spill = Some(self.open_spill(key, &schema)?);
                    let (_, writer) = spill.as_mut().expect("just opened");
                    for b in batches.drain(..) {
                        writer.write(&b)?;
                    }
                    self.release(std::mem::take(&mut reserved));
                }
                spill.as_mut().expect("spilling").1.write(&batch)?;
            }
            Ok::<(), DataFusionError>(())
        }
        .await;
        if let Err(e) = result {
            self.release(reserved);
            if let Some((path, _)) = spill {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        let output = match spill {
            Some((path, mut writer)) => {
                writer.finish()?;
                Output::Spilled { schema, path }
            }
            None => Output::Memory { schema, batches, bytes: reserved },
        };
        self.outputs.lock().expect("outputs lock").insert(key.clone(), output);
        Ok(Stored { rows, bytes })
    }

    fn open_spill(&self, key: &TaskKey, schema: &SchemaRef) -> Result<(PathBuf, FileWriter<File>)> {
        std::fs::create_dir_all(&self.spill_dir)?;
        let name = format!("{}-{}-{}-{}.arrow", key.query_id, key.stage, key.task, key.attempt);
        let path = self.spill_dir.join(name);
        let writer = FileWriter::try_new(File::create(&path)?, schema)?;
        Ok((path, writer))
    }

    /// Streams a stored output; it stays stored until its Query is released.
    pub fn open(&self, key: &TaskKey) -> Result<SendableRecordBatchStream> {
        let outputs = self.outputs.lock().expect("outputs lock");
        match outputs.get(key) {
            Some(Output::Memory { schema, batches, .. }) => {
                let stream = futures::stream::iter(batches.clone().into_iter().map(Ok));
                Ok(Box::pin(RecordBatchStreamAdapter::new(schema.clone(), stream)))
            }
            Some(Output::Spilled { schema, path }) => Ok(read_spill(schema.clone(), path.clone())),
            None => Err(DataFusionError::Execution(format!("no output for task {key} on this worker"))),
        }
    }

    /// Frees every output of a Query.
    pub fn release_query(&self, query_id: &str) {
        let mut outputs = self.outputs.lock().expect("outputs lock");
        let keys: Vec<TaskKey> = outputs.keys().filter(|k| k.query_id == query_id).cloned().collect();
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

    pub fn len(&self) -> usize {
        self.outputs.lock().expect("outputs lock").len()
    }
}

impl Drop for OutputStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.spill_dir);
    }
}

/// Reads a spill file on a blocking thread, a few batches ahead of the consumer.
fn read_spill(schema: SchemaRef, path: PathBuf) -> SendableRecordBatchStream {
    let (tx, rx) = tokio::sync::mpsc::channel(crate::config::READER_BUFFER_BATCHES);
    tokio::task::spawn_blocking(move || {
        let reader = File::open(&path).map_err(DataFusionError::from).and_then(|f| Ok(FileReader::try_new(f, None)?));
        match reader {
            Ok(reader) => {
                for batch in reader {
                    if tx.blocking_send(batch.map_err(DataFusionError::from)).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
            }
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, tokio_stream::wrappers::ReceiverStream::new(rx)))
}
