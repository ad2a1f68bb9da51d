//! What a plan's Parquet scans will read, found before the plan runs: the compressed bytes of
//! the column chunks they decode, in the row groups that their predicates do not prune by
//! statistics. The coordinator asks before distributing a Query, so that a selective lookup on
//! a large table counts as small and runs on the coordinator alone instead of queueing Tasks
//! behind another Query's (a point lookup on 60 MB of `orders` reads one row group). Footers come
//! through the process's metadata cache, the same entries the scan itself reads next, so a
//! second Query over the same files reads nothing from the store. The same footers say where
//! each row group begins, so that the planner cuts scans into Tasks at row groups
//! ([`row_group_starts`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
use datafusion::datasource::physical_plan::parquet::{ParquetAccessPlan, ParquetFileMetrics, RowGroupAccessPlanFilter};
use datafusion::datasource::physical_plan::{FileScanConfig, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::arrow::datatypes::DataType;
use datafusion::parquet::arrow::parquet_to_arrow_schema;
use datafusion::parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, RowGroupMetaData};
use datafusion::physical_expr::utils::collect_columns;
use datafusion::datasource::physical_plan::FileSource;
use datafusion::physical_optimizer::pruning::{PruningPredicate, PruningPredicateBuilder};
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::common::Result;
use futures::{FutureExt, StreamExt};
use object_store::path::Path;
use object_store::ObjectMeta;

/// Files whose footers one estimate reads at most; a plan over more is not small.
pub const PRUNING_FILES_MAX: usize = 64;
/// Footers read at once on a cold cache.
const FOOTER_READS_PARALLEL: usize = 8;

/// The bytes `plan`'s file scans will read after row-group pruning, when that is at most
/// `limit_bytes`; `None` when it is more, when a scan is not Parquet, or when a footer cannot be
/// read (the scan will report that error itself). Stops reading footers once over the limit.
pub async fn small_scan_bytes(plan: &Arc<dyn ExecutionPlan>, runtime: &RuntimeEnv, limit_bytes: u64) -> Option<u64> {
    let scans = parquet_scans(plan)?;
    let files: Vec<Vec<&ObjectMeta>> = scans.iter().map(unique_files).collect();
    let file_bytes: u64 = files.iter().flatten().map(|m| m.size).sum();
    // Small by its files' sizes alone: no footer needs reading (the common case of a small
    // query, whose latency this is on the path of).
    if file_bytes <= limit_bytes {
        return (!scans.is_empty()).then_some(file_bytes);
    }
    if files.iter().map(Vec::len).sum::<usize>() > PRUNING_FILES_MAX {
        return None;
    }
    let mut total = 0u64;
    for (scan, files) in scans.iter().zip(&files) {
        total += scan_bytes(scan, files, runtime, limit_bytes - total).await?;
        if total > limit_bytes {
            return None;
        }
    }
    Some(total)
}

/// The plan's file scans, or `None` when one of them is not a Parquet scan.
fn parquet_scans(plan: &Arc<dyn ExecutionPlan>) -> Option<Vec<FileScanConfig>> {
    let mut scans = Vec::new();
    let mut other = false;
    let _ = plan.apply(|node| {
        if let Some(config) = node.downcast_ref::<DataSourceExec>().and_then(|e| e.data_source().downcast_ref::<FileScanConfig>()) {
            match config.file_source.downcast_ref::<ParquetSource>() {
                Some(_) => scans.push(config.clone()),
                None => other = true,
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    (!other).then_some(scans)
}

/// A scan's files, each once: DataFusion may have cut a file into byte ranges read by several
/// partitions, which together read every row group once.
fn unique_files(scan: &FileScanConfig) -> Vec<&ObjectMeta> {
    let mut seen = HashSet::new();
    scan.file_groups.iter().flat_map(|g| g.iter()).map(|f| &f.object_meta).filter(|m| seen.insert(&m.location)).collect()
}

/// What one scan reads of its `files`, or `None` once it is over `limit_bytes`.
async fn scan_bytes(scan: &FileScanConfig, files: &[&ObjectMeta], runtime: &RuntimeEnv, limit_bytes: u64) -> Option<u64> {
    let source = scan.file_source.downcast_ref::<ParquetSource>()?;
    let schema = Arc::clone(source.table_schema().table_schema());
    let predicate = source.filter().and_then(|p| PruningPredicateBuilder::new().with_file_schema(Arc::clone(&schema)).build(p));
    let columns = read_columns(source);
    let files: Vec<ObjectMeta> = files.iter().map(|&m| m.clone()).collect();
    let mut footers = read_footers(scan, runtime, files)?;
    let mut total = 0u64;
    while let Some((meta, footer)) = footers.next().await {
        let footer = footer.ok()?;
        total += file_bytes(&meta, &footer, predicate.as_deref(), &schema, columns.as_ref());
        if total > limit_bytes {
            return None;
        }
    }
    Some(total)
}

/// Where each row group of the plan's Parquet files begins, by file: the offset of the row
/// group's first column chunk, which is what DataFusion's reader matches against a byte range to
/// decide which range reads the row group. The planner cuts scans at these offsets so that its
/// Tasks read equal bytes (`planner::RowGroupStarts`). Files whose footer cannot be read, and
/// every file of a plan over more than [`PRUNING_FILES_MAX`] files or with a scan that is not
/// Parquet, are left out: they are cut by bytes.
pub async fn row_group_starts(plan: &Arc<dyn ExecutionPlan>, runtime: &RuntimeEnv) -> HashMap<Path, Vec<u64>> {
    let mut starts = HashMap::new();
    let Some(scans) = parquet_scans(plan) else { return starts };
    if scans.iter().map(|scan| unique_files(scan).len()).sum::<usize>() > PRUNING_FILES_MAX {
        return starts;
    }
    // Every scan's footers at once: on a cold cache over an object store, each is a round trip.
    let mut seen = HashSet::new();
    let mut reads = Vec::new();
    for scan in &scans {
        let files: Vec<ObjectMeta> = unique_files(scan).into_iter().filter(|m| seen.insert(m.location.clone())).cloned().collect();
        reads.extend(read_footers(scan, runtime, files).map(StreamExt::boxed));
    }
    let mut footers = futures::stream::select_all(reads);
    while let Some((meta, footer)) = footers.next().await {
        if let Ok(footer) = footer {
            starts.insert(meta.location, footer.row_groups().iter().map(group_start).collect());
        }
    }
    starts
}

/// The footers of a scan's `files`, as they arrive ([`FOOTER_READS_PARALLEL`] at a time),
/// through the process's metadata cache; None when the scan's store is not registered.
fn read_footers(
    scan: &FileScanConfig,
    runtime: &RuntimeEnv,
    files: Vec<ObjectMeta>,
) -> Option<impl futures::Stream<Item = (ObjectMeta, Result<Arc<ParquetMetaData>>)>> {
    let store = runtime.object_store(&scan.object_store_url).ok()?;
    let cache = runtime.cache_manager.get_file_metadata_cache();
    // The scan's own guess at the footer's size: one read fetches the end of the file, footer
    // and all, where reading its length first would cost a second round trip to the store.
    let hint = scan.file_source.downcast_ref::<ParquetSource>().and_then(|p| p.table_parquet_options().global.metadata_size_hint);
    let reads = files.into_iter().map(move |meta| {
        let (store, cache) = (Arc::clone(&store), Arc::clone(&cache));
        async move {
            // Row-group statistics and offsets are in the footer: the page index is the scan's
            // business (asking for it here would re-read it on every Query for a file that has
            // none).
            let footer = DFParquetMetadata::new(store.as_ref(), &meta)
                .with_metadata_size_hint(hint)
                .with_file_metadata_cache(Some(cache))
                .with_page_index_policy(Some(PageIndexPolicy::Skip))
                .fetch_metadata()
                .await;
            (meta, footer)
        }
        .boxed()
    });
    Some(futures::stream::iter(reads).buffer_unordered(FOOTER_READS_PARALLEL))
}

/// The offset DataFusion's reader takes for a row group's position (its first column chunk's
/// first page) when it assigns row groups to byte ranges.
fn group_start(group: &RowGroupMetaData) -> u64 {
    let first = group.columns().first();
    first.map_or(0, |column| column.dictionary_page_offset().unwrap_or_else(|| column.data_page_offset()).max(0) as u64)
}

/// The top-level columns the scan decodes: its projection and its predicate's columns (which
/// a pushed-down row filter reads even when it projects them away). `None` means all.
fn read_columns(source: &ParquetSource) -> Option<HashSet<String>> {
    let schema = source.table_schema().table_schema();
    let indices = source.projection()?.column_indices();
    let mut names: HashSet<String> = indices.iter().map(|&i| schema.field(i).name().clone()).collect();
    if let Some(predicate) = source.filter() {
        names.extend(collect_columns(&predicate).into_iter().map(|c| c.name().to_string()));
    }
    Some(names)
}

/// The compressed bytes of `columns` over the row groups of one file that `predicate` keeps.
fn file_bytes(
    meta: &ObjectMeta,
    footer: &ParquetMetaData,
    predicate: Option<&PruningPredicate>,
    schema: &datafusion::arrow::datatypes::Schema,
    columns: Option<&HashSet<String>>,
) -> u64 {
    let groups = footer.row_groups();
    let mut access = RowGroupAccessPlanFilter::new(ParquetAccessPlan::new_all(groups.len()));
    if let Some(predicate) = predicate.filter(|_| laid_out_as(schema, footer)) {
        let metrics = ParquetFileMetrics::new(0, meta.location.as_ref(), &ExecutionPlanMetricsSet::new());
        access.prune_by_statistics(schema, footer.file_metadata().schema_descr(), groups, predicate, &metrics);
    }
    access.row_group_indexes().map(|i| group_bytes(&groups[i], columns)).sum()
}

/// Whether the file holds the table's columns in the table's order and in types whose
/// statistics read alike. The statistics are matched to the table's columns by position and read
/// in the table's types (DataFusion's scan adapts each file first): a file whose columns are in
/// another order, or whose timestamps are in another unit, would have its row groups judged by
/// the wrong numbers, and a large scan counted small. Such a file is counted whole.
fn laid_out_as(table: &datafusion::arrow::datatypes::Schema, footer: &ParquetMetaData) -> bool {
    let metadata = footer.file_metadata();
    let Ok(file) = parquet_to_arrow_schema(metadata.schema_descr(), metadata.key_value_metadata()) else { return false };
    table.fields().len() <= file.fields().len()
        && table.fields().iter().zip(file.fields()).all(|(t, f)| t.name() == f.name() && read_alike(t.data_type(), f.data_type()))
}

/// Types whose Parquet statistics DataFusion reads the same way: equal ones, and the string,
/// binary and dictionary forms of one kind of value.
fn read_alike(table: &DataType, file: &DataType) -> bool {
    use DataType::*;
    match (table, file) {
        _ if table == file => true,
        (Dictionary(_, value), other) | (other, Dictionary(_, value)) => read_alike(value, other),
        (Utf8 | LargeUtf8 | Utf8View, Utf8 | LargeUtf8 | Utf8View) => true,
        (Binary | LargeBinary | BinaryView, Binary | LargeBinary | BinaryView) => true,
        _ => false,
    }
}

fn group_bytes(group: &RowGroupMetaData, columns: Option<&HashSet<String>>) -> u64 {
    let read = |name: Option<&String>| match (columns, name) {
        (None, _) => true,
        (Some(columns), Some(name)) => columns.contains(name),
        (Some(_), None) => false,
    };
    group.columns().iter().filter(|c| read(c.column_path().parts().first())).map(|c| c.compressed_size().max(0) as u64).sum()
}

#[cfg(test)]
mod tests;
