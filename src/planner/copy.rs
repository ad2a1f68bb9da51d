//! [`CopyTaskExec`]: one Task of a `COPY … TO` a directory. It writes one partition of its
//! input with DataFusion's own file sink (Parquet, CSV or JSON, with the statement's options
//! and `PARTITIONED BY`), into a directory of its own Attempt inside the copy's staging
//! directory, and returns the row count. The coordinator moves the files of exactly one
//! Attempt per Task into the target when the copy commits.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, UInt64Array};
use datafusion::common::{exec_err, not_impl_err, DataFusionError, Result};
use datafusion::datasource::file_format::csv::CsvSink;
use datafusion::datasource::file_format::json::JsonSink;
use datafusion::datasource::file_format::parquet::ParquetSink;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::physical_plan::{FileOutputMode, FileSink, FileSinkConfig};
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties};

use super::writer::{count_properties, count_schema, AttemptNumber};

/// The directory Task `task` of copy Stage `stage` writes into, before its Attempt is known.
pub fn copy_task_dir(staging: &Path, stage: usize, task: usize) -> PathBuf {
    staging.join(format!("t-{stage}-{task}"))
}

/// The directory Attempt `attempt` of the Task whose directory is `dir` writes into.
pub fn copy_attempt_dir(dir: &Path, attempt: u32) -> PathBuf {
    let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    dir.with_file_name(format!("{name}-a{attempt}"))
}

/// The configuration of a file sink, when `sink` is one of the formats Quiver distributes.
pub fn file_sink_config(sink: &dyn DataSink) -> Option<&FileSinkConfig> {
    if let Some(s) = sink.downcast_ref::<ParquetSink>() {
        return Some(s.config());
    }
    if let Some(s) = sink.downcast_ref::<CsvSink>() {
        return Some(s.config());
    }
    sink.downcast_ref::<JsonSink>().map(|s| s.config())
}

/// `sink` writing to local `path` instead of its own target: into the directory `path` with
/// generated file names, or to the file `path` itself.
pub fn retarget(sink: &dyn DataSink, path: &Path, mode: FileOutputMode) -> Result<Arc<dyn DataSink>> {
    let Some(config) = file_sink_config(sink) else {
        return not_impl_err!("COPY to this file format is not supported by Quiver");
    };
    let mut url = path.to_string_lossy().into_owned();
    if mode == FileOutputMode::Directory && !url.ends_with('/') {
        url.push('/');
    }
    let config = FileSinkConfig {
        original_url: url.clone(),
        table_paths: vec![ListingTableUrl::parse(&url)?],
        file_output_mode: mode,
        ..config.clone()
    };
    if let Some(s) = sink.downcast_ref::<ParquetSink>() {
        return Ok(Arc::new(ParquetSink::new(config, s.parquet_options().clone())));
    }
    if let Some(s) = sink.downcast_ref::<CsvSink>() {
        return Ok(Arc::new(CsvSink::new(config, s.writer_options().clone())));
    }
    match sink.downcast_ref::<JsonSink>() {
        Some(s) => Ok(Arc::new(JsonSink::new(config, s.writer_options().clone()))),
        None => not_impl_err!("COPY to this file format is not supported by Quiver"),
    }
}

#[derive(Debug)]
pub struct CopyTaskExec {
    /// The statement's sink over the Stage fragment: it travels to the worker in
    /// datafusion-proto's own encoding, with the target the statement named.
    sink: Arc<dyn ExecutionPlan>,
    /// The partition of the sink's input this Task writes.
    input_partition: usize,
    /// Where this Task writes, before its Attempt is known.
    dir: PathBuf,
    properties: Arc<PlanProperties>,
}

impl CopyTaskExec {
    /// `sink` must be a [`DataSinkExec`] whose sink is a file sink.
    pub fn new(sink: Arc<dyn ExecutionPlan>, input_partition: usize, dir: PathBuf) -> Self {
        Self { sink, input_partition, dir, properties: count_properties() }
    }

    pub fn input_partition(&self) -> usize {
        self.input_partition
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sink_exec(&self) -> Result<&DataSinkExec> {
        match self.sink.downcast_ref::<DataSinkExec>() {
            Some(sink) => Ok(sink),
            None => exec_err!("CopyTaskExec wraps a DataSinkExec, not {}", self.sink.name()),
        }
    }
}

impl DisplayAs for CopyTaskExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "CopyTaskExec: partition={}, dir={}", self.input_partition, self.dir.display())
    }
}

impl ExecutionPlan for CopyTaskExec {
    fn name(&self) -> &str {
        "CopyTaskExec"
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
        vec![&self.sink]
    }

    fn with_new_children(self: Arc<Self>, mut children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return exec_err!("CopyTaskExec takes one child");
        }
        Ok(Arc::new(Self::new(children.remove(0), self.input_partition, self.dir.clone())))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let exec = self.sink_exec()?;
        let input = exec.input();
        if partition != 0 || self.input_partition >= input.output_partitioning().partition_count() {
            return exec_err!("CopyTaskExec writes one existing input partition");
        }
        let dir = match context.session_config().get_extension::<AttemptNumber>() {
            Some(attempt) => copy_attempt_dir(&self.dir, attempt.0),
            None => self.dir.clone(),
        };
        // Not create_dir_all: the staging directory exists only while its copy runs, so an
        // Attempt that starts after the copy ended fails here instead of writing a stray file.
        std::fs::create_dir(&dir)
            .map_err(|e| DataFusionError::IoError(std::io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))))?;
        let sink = retarget(exec.sink(), &dir, FileOutputMode::Directory)?;
        let data = input.execute(self.input_partition, Arc::clone(&context))?;
        let write = async move {
            let rows = sink.write_all(data, &context).await?;
            Ok(RecordBatch::try_new(count_schema(), vec![Arc::new(UInt64Array::from(vec![rows]))])?)
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(count_schema(), futures::stream::once(write))))
    }
}
