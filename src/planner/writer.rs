//! [`TaskWriterExec`]: writes one partition of its input to one Parquet file and returns the
//! row count. Workers run it inside write Tasks (one file per Attempt, named after it, so that
//! two Attempts of one Task never write the same file); the coordinator runs it when the last
//! Stage of a write is its own. The file is a local path or an object in a store (`s3://…`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{exec_err, DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::parquet::arrow::async_writer::AsyncFileWriter;
use datafusion::parquet::arrow::AsyncArrowWriter;
use object_store::buffered::BufWriter;
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning, PlanProperties,
};
use futures::StreamExt;

static COUNT_SCHEMA: LazyLock<SchemaRef> =
    LazyLock::new(|| Arc::new(Schema::new(vec![Field::new("count", DataType::UInt64, false)])));

/// The number of the Attempt a Task's plan runs as, in its `TaskContext`'s session config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptNumber(pub u32);

/// The file the coordinator writes when a write's last Stage runs on it.
pub const COORDINATOR_FILE: &str = "part-final.parquet";

/// The file Task `task` of write Stage `stage` writes into `dir`, before its Attempt is known.
pub fn task_file(dir: &Path, stage: usize, task: usize) -> PathBuf {
    dir.join(format!("part-{stage}-{task}.parquet"))
}

/// The file Attempt `attempt` of the Task whose file is `path` writes.
pub fn attempt_file(path: &Path, attempt: u32) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!("{stem}-a{attempt}.parquet"))
}

/// The schema of every write's result: one `count` column, as DataFusion's own DML returns.
pub fn count_schema() -> SchemaRef {
    Arc::clone(&COUNT_SCHEMA)
}

/// The properties of a writer: one partition of row counts, emitted when the write is done.
pub(super) fn count_properties() -> Arc<PlanProperties> {
    let properties = PlanProperties::new(
        EquivalenceProperties::new(count_schema()),
        Partitioning::UnknownPartitioning(1),
        EmissionType::Final,
        Boundedness::Bounded,
    );
    Arc::new(properties)
}

#[derive(Debug)]
pub struct TaskWriterExec {
    input: Arc<dyn ExecutionPlan>,
    /// The partition of `input` this writer writes.
    input_partition: usize,
    path: PathBuf,
    row_group_rows: usize,
    /// Columns that must hold no null (the target table's NOT NULL columns).
    not_null: Vec<usize>,
    properties: Arc<PlanProperties>,
}

impl TaskWriterExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, input_partition: usize, path: PathBuf, row_group_rows: usize) -> Self {
        Self { input, input_partition, path, row_group_rows, not_null: Vec::new(), properties: count_properties() }
    }

    /// Refuses a batch with a null in any of these columns, as DataFusion's own sinks do.
    pub fn with_not_null(mut self, columns: Vec<usize>) -> Self {
        self.not_null = columns;
        self
    }

    pub fn not_null(&self) -> &[usize] {
        &self.not_null
    }

    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    pub fn input_partition(&self) -> usize {
        self.input_partition
    }

    pub fn row_group_rows(&self) -> usize {
        self.row_group_rows
    }

    pub fn input(&self) -> &Arc<dyn ExecutionPlan> {
        &self.input
    }
}

impl DisplayAs for TaskWriterExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "TaskWriterExec: partition={}, path={}", self.input_partition, self.path.display())
    }
}

impl ExecutionPlan for TaskWriterExec {
    fn name(&self) -> &str {
        "TaskWriterExec"
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
        vec![&self.input]
    }

    fn with_new_children(self: Arc<Self>, mut children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return exec_err!("TaskWriterExec takes one child");
        }
        let writer = Self::new(children.remove(0), self.input_partition, self.path.clone(), self.row_group_rows);
        Ok(Arc::new(writer.with_not_null(self.not_null.clone())))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        if partition != 0 || self.input_partition >= self.input.output_partitioning().partition_count() {
            return exec_err!("TaskWriterExec writes one existing input partition");
        }
        let path = match context.session_config().get_extension::<AttemptNumber>() {
            Some(attempt) => attempt_file(&self.path, attempt.0),
            None => self.path.clone(),
        };
        let runtime = context.runtime_env();
        let input = self.input.execute(self.input_partition, context)?;
        let write = write_parquet(input, (path, runtime), self.row_group_rows, self.not_null.clone());
        let stream = futures::stream::once(write);
        Ok(Box::pin(RecordBatchStreamAdapter::new(count_schema(), stream)))
    }
}

/// Writes the stream to `path` (no file for an empty input) and returns `count` as a batch.
async fn write_parquet(
    mut input: SendableRecordBatchStream,
    (path, runtime): (PathBuf, Arc<RuntimeEnv>),
    row_group_rows: usize,
    not_null: Vec<usize>,
) -> Result<RecordBatch> {
    let mut writer = None;
    let mut rows = 0u64;
    while let Some(batch) = input.next().await {
        let batch = batch?;
        if batch.num_rows() == 0 {
            continue;
        }
        if let Some(&column) = not_null.iter().find(|&&c| batch.columns().get(c).is_some_and(|a| a.null_count() > 0)) {
            return exec_err!("Invalid batch column at '{column}' has null but schema specifies non-nullable");
        }
        if writer.is_none() {
            writer = Some(open_writer(&path, &runtime, input.schema(), row_group_rows).await?);
        }
        rows += batch.num_rows() as u64;
        writer.as_mut().expect("opened above").write(&batch).await.map_err(|e| cannot_write(&path, e))?;
    }
    if let Some(writer) = writer {
        writer.close().await.map_err(|e| cannot_write(&path, e))?;
        sync_local(&path).await?;
    }
    let counts = UInt64Array::from(vec![rows]);
    Ok(RecordBatch::try_new(count_schema(), vec![Arc::new(counts)])?)
}

/// Puts a local file's data on disk before its write reports it written: the commit that
/// lists it survives a power loss, and must not list a file that did not. (An object store's
/// object is durable once its upload completes.)
async fn sync_local(path: &Path) -> Result<()> {
    if crate::storage::object_location(&path.to_string_lossy()).is_some() {
        return Ok(());
    }
    let synced = async { tokio::fs::File::open(path).await?.sync_all().await };
    synced.await.map_err(|e| DataFusionError::IoError(std::io::Error::new(e.kind(), format!("cannot sync {}: {e}", path.display()))))
}

/// A failed write (a store that refuses the upload, a full disk) names the file.
fn cannot_write(path: &Path, e: datafusion::parquet::errors::ParquetError) -> DataFusionError {
    DataFusionError::IoError(std::io::Error::other(format!("cannot write {}: {e}", path.display())))
}

/// Opens `path` in its write's staging directory. The coordinator makes that directory before
/// the write starts and renames it when the write commits: an Attempt that runs on after its
/// write ended finds no directory, and cannot leave a file behind.
///
/// A `path` in an object store (`s3://…`) is written through the store the Task's assignment
/// opened. The object appears only when it is whole (a PUT, or a multipart upload completed
/// by `close`); the commit is the catalog entry that lists it, as a store cannot rename.
async fn open_writer(path: &Path, runtime: &RuntimeEnv, schema: SchemaRef, row_group_rows: usize) -> Result<AsyncArrowWriter<Box<dyn AsyncFileWriter>>> {
    let props = WriterProperties::builder().set_max_row_group_row_count(Some(row_group_rows.max(1))).build();
    let location = path.to_string_lossy();
    let file: Box<dyn AsyncFileWriter> = match crate::storage::object_location(&location) {
        Some(located) => {
            let (store_url, object) = located?;
            Box::new(BufWriter::new(runtime.object_store(&store_url)?, object))
        }
        None => Box::new(
            tokio::fs::File::create(path)
                .await
                .map_err(|e| DataFusionError::IoError(std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))))?,
        ),
    };
    Ok(AsyncArrowWriter::try_new(file, schema, Some(props))?)
}
