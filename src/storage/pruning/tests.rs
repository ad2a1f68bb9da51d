//! Footer reads against a store that counts its requests.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::arrow::array::{Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, Result,
};
use url::Url;

use super::{row_group_starts, small_scan_bytes};

/// An in-memory store that counts the reads made through it.
#[derive(Debug, Default)]
struct Counting {
    inner: InMemory,
    reads: AtomicUsize,
}

impl fmt::Display for Counting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Counting {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A Parquet file of three row groups of 1000 rows: `columns` named in order, each holding
/// `0..3000`, or `3000..0` where `descending`.
fn three_row_groups_of(columns: &[(&str, bool)]) -> Vec<u8> {
    let fields: Vec<Field> = columns.iter().map(|(name, _)| Field::new(*name, DataType::Int64, false)).collect();
    let schema = Arc::new(Schema::new(fields));
    let arrays = columns
        .iter()
        .map(|(_, descending)| match descending {
            false => Arc::new(Int64Array::from_iter_values(0..3000)) as _,
            true => Arc::new(Int64Array::from_iter_values((0..3000).rev())) as _,
        })
        .collect();
    let batch = RecordBatch::try_new(Arc::clone(&schema), arrays).unwrap();
    let properties = WriterProperties::builder().set_max_row_group_row_count(Some(1000)).build();
    let mut bytes = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut bytes, schema, Some(properties)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    bytes
}

fn three_row_groups() -> Vec<u8> {
    three_row_groups_of(&[("v", false)])
}

/// On a cold cache, a footer is one read from the store: the end of the file, as much as the
/// scan's `metadata_size_hint` says, holds it whole. (Without the hint it took two: the
/// footer's length, then the footer.)
#[tokio::test]
async fn a_footer_is_read_in_one_request() {
    let store = Arc::new(Counting::default());
    store.put(&Path::from("t/data.parquet"), PutPayload::from(three_row_groups())).await.unwrap();
    let url = Url::parse("counting://bucket").unwrap();
    let planning = RuntimeEnvBuilder::new().build_arc().unwrap();
    planning.register_object_store(&url, Arc::clone(&store) as Arc<dyn ObjectStore>);
    let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), planning);
    ctx.register_parquet("t", "counting://bucket/t/", ParquetReadOptions::default()).await.unwrap();
    let plan = ctx.sql("SELECT v FROM t").await.unwrap().create_physical_plan().await.unwrap();

    // A process whose metadata cache has never seen the file.
    let cold = RuntimeEnvBuilder::new().build_arc().unwrap();
    cold.register_object_store(&url, Arc::clone(&store) as Arc<dyn ObjectStore>);
    let before = store.reads.load(Ordering::SeqCst);
    let starts = row_group_starts(&plan, &cold).await;
    assert_eq!(store.reads.load(Ordering::SeqCst) - before, 1, "reads of one footer");
    assert_eq!(starts.get(&Path::from("t/data.parquet")).map(Vec::len), Some(3));
}

/// Regression: the small-query estimate matched row-group statistics to the table's columns by
/// position, so a table declared with its columns in another order than the file's judged `a`
/// by `b`'s statistics, and could count a large scan small. Such a file now counts whole.
#[tokio::test]
async fn a_file_laid_out_unlike_its_table_is_not_pruned_by_the_estimate() {
    let store = Arc::new(InMemory::new());
    // `a` ascending, `b` descending: a filter on `a` keeps the first row group, on `b` the last.
    let file = three_row_groups_of(&[("a", false), ("b", true)]);
    // Under the file's size: the footer is read (a file at most the limit counts whole unread).
    let limit = file.len() as u64 - 1;
    store.put(&Path::from("t/data.parquet"), PutPayload::from(file)).await.unwrap();
    let url = Url::parse("memory://bucket").unwrap();
    let runtime = RuntimeEnvBuilder::new().build_arc().unwrap();
    runtime.register_object_store(&url, Arc::clone(&store) as Arc<dyn ObjectStore>);
    let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), Arc::clone(&runtime));
    let swapped = Schema::new(vec![Field::new("b", DataType::Int64, false), Field::new("a", DataType::Int64, false)]);
    ctx.register_parquet("as_written", "memory://bucket/t/", ParquetReadOptions::default()).await.unwrap();
    ctx.register_parquet("swapped", "memory://bucket/t/", ParquetReadOptions::default().schema(&swapped)).await.unwrap();
    let mut estimates = Vec::new();
    for table in ["as_written", "swapped"] {
        let plan = ctx.sql(&format!("SELECT a FROM {table} WHERE a < 10")).await.unwrap().create_physical_plan().await.unwrap();
        estimates.push(small_scan_bytes(&plan, &runtime, limit).await.expect("an estimate"));
    }
    assert!(estimates[1] > 2 * estimates[0], "one row group as written, all three when swapped: {estimates:?}");
}
