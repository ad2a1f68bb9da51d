//! Running one SQL statement on the coordinator: DDL against the persistent catalog, writes as
//! distributed Tasks that each write a Parquet file, and queries as a Stage DAG whose final Stage
//! streams to the client.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{AsArray, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::{Schema, SchemaRef, UInt64Type};
use datafusion::common::{exec_err, not_impl_err, plan_err, DFSchema, DataFusionError, ParamValues, Result, TableReference};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use datafusion::logical_expr::{DdlStatement, DmlStatement, LogicalPlan, Statement, WriteOp};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{EmptyRecordBatchStream, ExecutionPlan, ExecutionPlanProperties};
use futures::future::Either;
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};

use super::catalog::{defaults_to_sql, store_table_location, KeyDef, TableDef};
use super::store_writes::{self, SweepOnDrop, WritePrefix};
use super::cluster::{NewStage, NewTask, StageReads, TaskOutcome};
use super::source::QueryTasks;
use super::snapshot::Snapshot;
use super::Core;
use crate::planner::{self, attempt_file, count_schema, task_file, DistributeOptions, COORDINATOR_FILE, DistributedPlan, Exchange, MergeRead, TaskSpec, WriteKind, WriteTarget};
use crate::auth::Caller;
use crate::protocol::{cancelled_error, classify, encode_plan_when_resolved, quiver_error, ErrorKind};

/// How long a Query that needs workers waits for the first one to register.
const WORKER_WAIT_MS: u64 = 10_000;

/// Starts one statement with the values of its `$n` placeholders; returns the Query's id and
/// its result. The Query is recorded from start to end. A statement that changes the catalog or
/// writes has ended (committed) when this returns; a query runs while its result is read.
pub async fn start(
    core: &Arc<Core>,
    caller: &Caller,
    sql: &str,
    parameters: Option<ParamValues>,
) -> Result<(String, SendableRecordBatchStream)> {
    let id = format!("q-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    core.cluster.begin_query(&id, sql, &caller.name);
    tracing::info!(query = %id, "query started: {}", crate::storage::redact_sql(sql.trim()));
    let abandoned = Abandoned { core: Some(Arc::clone(core)), id: id.clone() };
    // A panic while the statement is planned (a dependency's bug on a corrupt file, say) is
    // this statement's error, not a dropped connection; so is one while its result streams
    // (`QueryStream`).
    let ran = std::panic::AssertUnwindSafe(run(core, caller, &id, sql, parameters)).catch_unwind();
    let ran = super::access::as_viewer(caller, ran).await.unwrap_or_else(|panic| Err(panicked(panic.as_ref())));
    abandoned.disarm();
    match ran {
        Ok((stream, false)) => {
            let stream = QueryStream { inner: stream, rows: 0, core: Some(Arc::clone(core)), id: id.clone() };
            Ok((id, Box::pin(stream)))
        }
        Ok((stream, true)) => {
            let schema = stream.schema();
            let batches: Vec<RecordBatch> = match stream.try_collect().await {
                Ok(batches) => batches,
                Err(error) => {
                    core.finish(&id, 0, Some(&error), false);
                    return Err(error);
                }
            };
            core.finish(&id, batches.iter().map(|b| b.num_rows() as u64).sum(), None, false);
            let stream = RecordBatchStreamAdapter::new(schema, futures::stream::iter(batches.into_iter().map(Ok)));
            Ok((id, Box::pin(stream)))
        }
        Err(error) => {
            core.finish(&id, 0, Some(&error), false);
            Err(error)
        }
    }
}

/// The error a statement that panicked answers with.
fn panicked(payload: &(dyn std::any::Any + Send)) -> DataFusionError {
    let message = payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str));
    DataFusionError::Internal(format!("the statement failed inside the engine (a panic): {}", message.unwrap_or("no message")))
}

/// Ends a Query as cancelled when its start is dropped half-way (the client went away while it
/// was planned or while its write ran), so that it never stays running with nobody to end it.
struct Abandoned {
    core: Option<Arc<Core>>,
    id: String,
}

impl Abandoned {
    fn disarm(mut self) {
        self.core = None;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(core) = self.core.take() {
            tracing::info!(query = %self.id, "client went away before the statement started");
            core.finish(&self.id, 0, None, true);
        }
    }
}

/// Runs a statement up to its result; true when the statement has already done all its work
/// (DDL, writes): its result is a count or nothing, in memory.
async fn run(
    core: &Arc<Core>,
    caller: &Caller,
    id: &str,
    sql: &str,
    parameters: Option<ParamValues>,
) -> Result<(SendableRecordBatchStream, bool)> {
    if let Some(table) = refresh_target(sql) {
        // It only forgets a cached listing, which any client may ask for; a cluster member
        // runs no statement at all.
        super::access::may_run_statements(caller)?;
        return Ok((refresh_table(core, &table)?, true));
    }
    let started = Instant::now();
    let plan = core.ctx.state().create_logical_plan(sql).await?;
    tracing::debug!(query = %id, logical_ms = started.elapsed().as_secs_f64() * 1e3, "logical plan created");
    super::access::check(caller, &plan, &core.config.allowed_paths)?;
    let plan = match parameters {
        Some(values) => plan.with_param_values(values)?,
        None => plan,
    };
    let plan = prepared_plan(core, caller, plan).await?;
    let done = matches!(plan, LogicalPlan::Ddl(_) | LogicalPlan::Dml(_) | LogicalPlan::Copy(_));
    Ok((dispatch(core, id, sql, plan).await?, done))
}

/// What an `EXECUTE` runs: the plan its `PREPARE` stored, with its values and its tables as
/// they are now (`catalog::bind_current_tables`), checked and then
/// run as the statement itself would be (a prepared INSERT as a distributed, committed write;
/// DataFusion would run it as its own insert, writing into the table's directory outside the
/// catalog). Any other plan as it is.
async fn prepared_plan(core: &Arc<Core>, caller: &Caller, plan: LogicalPlan) -> Result<LogicalPlan> {
    if !matches!(plan, LogicalPlan::Statement(Statement::Execute(_))) {
        return Ok(plan);
    }
    let (_, prepared) = core.ctx.execute_logical_plan(plan).await?.into_parts();
    let prepared = super::catalog::bind_current_tables(&core.ctx, prepared).await?;
    super::access::check(caller, &prepared, &core.config.allowed_paths)?;
    Ok(prepared)
}

/// The table of a `REFRESH TABLE name` statement (Spark's and Hive's words; DataFusion's parser
/// does not know them), taken as written or as one quoted identifier.
fn refresh_target(sql: &str) -> Option<String> {
    let words = sql.trim().trim_end_matches(';').trim();
    let mut parts = words.splitn(3, char::is_whitespace);
    let (refresh, table, name) = (parts.next()?, parts.next()?, parts.next()?.trim());
    if !refresh.eq_ignore_ascii_case("REFRESH") || !table.eq_ignore_ascii_case("TABLE") || name.is_empty() {
        return None;
    }
    Some(match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => name.to_ascii_lowercase(),
    })
}

/// Forgets a table's cached file listing: its next scan lists its files again.
fn refresh_table(core: &Arc<Core>, table: &str) -> Result<SendableRecordBatchStream> {
    if !core.ctx.table_exist(TableReference::bare(table))? {
        return plan_err!("table '{table}' not found");
    }
    if let Some(cache) = core.ctx.runtime_env().cache_manager.get_list_files_cache() {
        let keys = cache.list_entries().into_keys();
        for key in keys.filter(|k| k.table.as_ref().is_some_and(|t| t.table() == table)) {
            cache.remove(&key);
        }
    }
    Ok(empty_stream())
}

async fn dispatch(core: &Arc<Core>, id: &str, sql: &str, plan: LogicalPlan) -> Result<SendableRecordBatchStream> {
    match plan {
        LogicalPlan::Ddl(DdlStatement::CreateExternalTable(mut c)) => {
            let opened = core.stores.open_for(&core.ctx, &mut c)?;
            let (name, skip, locations) = (c.name.table().to_string(), c.if_not_exists, c.locations.join(", "));
            let defined = define(core, name, skip, LogicalPlan::Ddl(DdlStatement::CreateExternalTable(c)), |name| {
                TableDef::External { name, sql: sql.to_string() }
            })
            .await;
            if defined.is_ok() {
                opened.keep();
            }
            defined.map_err(|e| unreadable_location(e, &locations))
        }
        LogicalPlan::Ddl(DdlStatement::CreateView(v)) => {
            let name = v.name.table().to_string();
            define(core, name, false, LogicalPlan::Ddl(DdlStatement::CreateView(v)), |name| TableDef::View {
                name,
                sql: sql.to_string(),
            })
            .await
        }
        LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(c)) => {
            let name = c.name.table().to_string();
            let keys = KeyDef::from_constraints(&c.constraints);
            let defaults = defaults_to_sql(&c.column_defaults)?;
            create_table(core, id, &name, c.input, (keys, defaults), c.if_not_exists, c.or_replace).await
        }
        LogicalPlan::Ddl(DdlStatement::DropTable(d)) => drop_table(core, id, d.name.table(), d.if_exists, false).await,
        LogicalPlan::Ddl(DdlStatement::DropView(d)) => drop_table(core, id, d.name.table(), d.if_exists, true).await,
        LogicalPlan::Dml(DmlStatement { op: WriteOp::Insert(_), table_name, input, .. }) => {
            let rows = insert(core, id, table_name.table(), &input).await?;
            Ok(count_stream(rows))
        }
        copy @ LogicalPlan::Copy(_) => Ok(count_stream(super::copy::copy(core, id, &copy).await?)),
        LogicalPlan::Dml(dml) => not_impl_err!("{} is not supported yet; Quiver tables are append-only", dml.op),
        LogicalPlan::Ddl(other) => not_impl_err!("{} is not supported", other.name()),
        LogicalPlan::Explain(explain) => super::explain::explain(core, id, &explain.plan).await,
        LogicalPlan::Analyze(analyze) => super::explain::analyze(core, id, &analyze.input).await,
        plan => {
            let started = Instant::now();
            let (state, plan) = core.ctx.execute_logical_plan(plan).await?.into_parts();
            let physical = state.create_physical_plan(&plan).await?;
            tracing::debug!(query = %id, physical_ms = started.elapsed().as_secs_f64() * 1e3, "physical plan created");
            Ok(deferred(core, id, physical, Snapshot::of(&state)))
        }
    }
}

/// An I/O error creating an external table (a store that refuses, a bucket or directory that
/// is not there) names the location it could not read.
fn unreadable_location(error: DataFusionError, locations: &str) -> DataFusionError {
    let typed = classify(&error);
    match typed.kind {
        ErrorKind::Io => {
            let hint = crate::storage::credentials_hint(&typed.message);
            quiver_error(ErrorKind::Io, format!("cannot read the table location '{locations}': {}{hint}", typed.message))
        }
        _ => error,
    }
}

/// A query's result that queues its Stages when first read: a client that asks for a result
/// and never fetches it (a cursor closed unread) costs the cluster nothing while it expires.
fn deferred(core: &Arc<Core>, id: &str, physical: Arc<dyn ExecutionPlan>, settings: Snapshot) -> SendableRecordBatchStream {
    let schema = physical.schema();
    let (core, id) = (Arc::clone(core), id.to_string());
    let stream = futures::stream::once(async move { Ok::<_, DataFusionError>(start_physical(&core, &id, physical, None, &settings).await?.1) }).try_flatten();
    Box::pin(RecordBatchStreamAdapter::new(schema, stream))
}

/// Executes a catalog definition with DataFusion, then persists it.
async fn define(
    core: &Arc<Core>,
    name: String,
    if_not_exists: bool,
    plan: LogicalPlan,
    def: impl FnOnce(String) -> TableDef,
) -> Result<SendableRecordBatchStream> {
    let _catalog = core.catalog_lock.lock().await;
    let existed = core.ctx.table_exist(TableReference::bare(name.as_str()))?;
    core.ctx.execute_logical_plan(plan).await?;
    if !(existed && if_not_exists) {
        core.catalog.put(def(name))?;
    }
    core.catalog.replan_views(&core.ctx).await;
    Ok(empty_stream())
}

async fn create_table(
    core: &Arc<Core>,
    id: &str,
    name: &str,
    input: Arc<LogicalPlan>,
    (keys, defaults): (Vec<KeyDef>, Vec<(String, String)>),
    if_not_exists: bool,
    or_replace: bool,
) -> Result<SendableRecordBatchStream> {
    if if_not_exists && or_replace {
        return exec_err!("'IF NOT EXISTS' cannot coexist with 'REPLACE'");
    }
    // As DataFusion's own CREATE TABLE AS: a table stores unqualified names only.
    DFSchema::from_unqualified_fields(input.schema().fields().clone(), Default::default())?;
    let _catalog = core.catalog_lock.lock().await;
    let old = core.catalog.get(name)?;
    // The catalog counts too: a table it holds that failed to register at start (logged then)
    // is not in the context, yet its files are still its own, and replacing it deletes them.
    if old.is_some() || core.ctx.table_exist(TableReference::bare(name))? {
        if if_not_exists {
            return Ok(empty_stream());
        }
        if !or_replace {
            return exec_err!("Table '{name}' already exists");
        }
    }
    let schema: Schema = input.schema().as_arrow().clone();
    let has_rows = !matches!(input.as_ref(), LogicalPlan::EmptyRelation(e) if !e.produce_one_row);
    let location = core.config.warehouse.as_deref().map(|w| store_table_location(w, name));
    let (mut segments, mut files) = (vec![], vec![]);
    let mut rows = 0;
    if has_rows {
        let written = write_segment(core, id, name, location.as_deref(), &input, not_null(&schema)).await?;
        rows = written.rows;
        commit(core, id, name, written, (&mut segments, &mut files)).await?;
    }
    let def = TableDef::Managed {
        name: name.to_string(),
        schema,
        segments: segments.clone(),
        location,
        files: files.clone(),
        keys,
        defaults,
    };
    core.catalog.put(def.clone())?;
    core.catalog.register(&core.ctx, &core.stores, &def).await?;
    core.catalog.replan_views(&core.ctx).await;
    if let Some(TableDef::Managed { segments: old_segments, location: old_location, files: old_files, .. }) = old {
        match old_location {
            Some(old_location) => {
                let replaced: Vec<String> = old_files.into_iter().filter(|f| !files.contains(f)).collect();
                let ctx = core.ctx.clone();
                core.retire(id, move || store_writes::remove_files(&ctx, &old_location, replaced));
            }
            None => {
                let dir = core.catalog.table_dir(name);
                let replaced: Vec<PathBuf> = old_segments.iter().filter(|s| !segments.contains(s)).map(|s| dir.join(s)).collect();
                core.retire(id, move || remove_paths(&replaced));
            }
        }
    }
    Ok(count_stream(rows))
}

async fn insert(core: &Arc<Core>, id: &str, table: &str, input: &LogicalPlan) -> Result<u64> {
    let _catalog = core.catalog_lock.lock().await;
    let Some(TableDef::Managed { name, schema, mut segments, location, mut files, keys, defaults }) = core.catalog.get(table)? else {
        return plan_err!("cannot INSERT INTO '{table}': only tables created by Quiver (CREATE TABLE) accept writes");
    };
    let written = write_segment(core, id, table, location.as_deref(), input, not_null(&schema)).await?;
    let rows = written.rows;
    commit(core, id, table, written, (&mut segments, &mut files)).await?;
    let def = TableDef::Managed { name, schema, segments, location, files, keys, defaults };
    core.catalog.put(def.clone())?;
    core.catalog.register(&core.ctx, &core.stores, &def).await?;
    core.catalog.replan_views(&core.ctx).await;
    Ok(rows)
}

/// Makes a finished write's files part of its table: a segment directory in the data
/// directory, or objects in the table's store (named relative to the table's location).
async fn commit(core: &Core, id: &str, table: &str, mut written: Written, (segments, files): (&mut Vec<String>, &mut Vec<String>)) -> Result<()> {
    match written.store.0.take() {
        None => segments.extend(commit_segment(core, id, table, &written)?),
        Some(prefix) => {
            let mut failed = SweepOnDrop(Some(prefix.clone()));
            let kept = prefix.commit(&written.files).await?;
            failed.0 = None;
            prefix.sweep(kept.clone());
            files.extend(kept.iter().map(|f| format!("{id}/{f}")));
        }
    }
    Ok(())
}

/// The columns of a table's schema that are NOT NULL.
fn not_null(schema: &Schema) -> Vec<usize> {
    schema.fields().iter().enumerate().filter(|(_, f)| !f.is_nullable()).map(|(i, _)| i).collect()
}

/// Runs `input` as a distributed write into `table`'s staging directory, or under its prefix
/// in the table's store (`location`); returns the rows written and the files to commit. On
/// failure, or when the statement is dropped half-way, the staging directory is removed, or
/// the prefix swept: nothing of a failed write remains.
async fn write_segment(
    core: &Arc<Core>,
    id: &str,
    table: &str,
    location: Option<&str>,
    input: &LogicalPlan,
    not_null: Vec<usize>,
) -> Result<Written> {
    // A local write stages in a directory that its commit renames; a write to a store puts
    // its objects under a prefix of its own that a failure sweeps.
    let (staging, mut local, store) = match location {
        None => {
            let staging = staging_dir(core, id, table);
            // Once more if the table's directory went between its creation and the staging
            // directory's: a dropped table of this name is removed while its readers end.
            std::fs::create_dir_all(&staging).or_else(|_| std::fs::create_dir_all(&staging))?;
            (staging.clone(), RemoveOnDrop(Some(staging)), SweepOnDrop(None))
        }
        Some(location) => {
            let prefix = format!("{location}{id}");
            let opened = WritePrefix::open(&core.ctx, &prefix)?;
            (PathBuf::from(prefix), RemoveOnDrop(None), SweepOnDrop(Some(opened)))
        }
    };
    let state = core.ctx.state();
    let physical = state.create_physical_plan(input).await?;
    let target = WriteTarget { dir: staging.clone(), kind: WriteKind::Table { row_group_rows: core.config.write_row_group_rows, not_null } };
    let (plan, stream) = start_physical(core, id, physical, Some(target), &Snapshot::of(&state)).await?;
    let batches: Vec<RecordBatch> = stream.try_collect().await?;
    let rows = batches.iter().flat_map(|b| b.column(0).as_primitive::<UInt64Type>().iter().flatten()).sum();
    // An Attempt that lost its Task may still be writing; the commit's sweep must come after it.
    core.stop_attempts(id).await;
    // Of each write Task, exactly the file of the Attempt whose count was returned.
    let files = match plan.write_stage {
        Some(stage) => {
            let counted = core.cluster.counted_attempts(id, stage as u32);
            counted.iter().map(|k| file_name(&attempt_file(&task_file(&staging, stage, k.task as usize), k.attempt))).collect()
        }
        None => vec![file_name(&staging.join(COORDINATOR_FILE))],
    };
    local.0 = None;
    Ok(Written { rows, files, store })
}

/// What a write produced: its row count, the names of the files it committed, and (for a
/// table in a store) its prefix, swept unless the commit takes it.
struct Written {
    rows: u64,
    files: Vec<String>,
    store: SweepOnDrop,
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Removes each file or directory (with its contents), as far as it can.
fn remove_paths(paths: &[PathBuf]) {
    for path in paths {
        let removed = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
        match removed {
            Err(e) if path.exists() => tracing::warn!("cannot remove {}: {e}", path.display()),
            _ => {}
        }
    }
}

/// Removes a file or a directory (with its contents) when dropped, unless emptied first.
pub(super) struct RemoveOnDrop(pub(super) Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            remove_paths(&[path]);
        }
    }
}

fn staging_dir(core: &Core, id: &str, table: &str) -> PathBuf {
    core.catalog.table_dir(table).join(format!(".staging-{id}"))
}

/// Moves a finished write's files to their segment directory; None when it wrote no file.
/// Files of other Attempts (failed, superseded, or still running when the write ended) are
/// removed after the move: an Attempt that creates its file late creates it in the staging
/// directory, which is gone, and one that wrote into the directory before it moved is removed.
fn commit_segment(core: &Core, id: &str, table: &str, written: &Written) -> Result<Option<String>> {
    let staging = staging_dir(core, id, table);
    let segment = core.catalog.table_dir(table).join(id);
    std::fs::rename(&staging, &segment)?;
    for entry in std::fs::read_dir(&segment)? {
        let path = entry?.path();
        if !written.files.contains(&file_name(&path)) {
            std::fs::remove_file(&path)?;
        }
    }
    if !has_files(&segment) {
        let _ = std::fs::remove_dir_all(&segment);
        return Ok(None);
    }
    // The rename and the removals reach the disk before the catalog lists the segment.
    crate::coordinator::catalog::sync_dir(&segment)?;
    crate::coordinator::catalog::sync_dir(&core.catalog.table_dir(table))?;
    Ok(Some(id.to_string()))
}

fn has_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false)
}

/// Drops a table (`view` false) or a view: each statement drops only its own kind. Its files
/// go once the Queries running now, which may read them, have ended (`Core::retire`).
async fn drop_table(core: &Arc<Core>, id: &str, name: &str, if_exists: bool, view: bool) -> Result<SendableRecordBatchStream> {
    let _catalog = core.catalog_lock.lock().await;
    let def = core.catalog.get(name)?;
    let is_view = matches!(def, Some(TableDef::View { .. }));
    // A table of the catalog that failed to register at start can be dropped all the same.
    if !(def.is_some() || core.ctx.table_exist(TableReference::bare(name))?) || is_view != view {
        if if_exists {
            return Ok(empty_stream());
        }
        let kind = if view { "View" } else { "Table" };
        return exec_err!("{kind} '{name}' doesn't exist.");
    }
    let removed = core.catalog.remove(name)?;
    core.ctx.deregister_table(TableReference::bare(name))?;
    core.catalog.replan_views(&core.ctx).await;
    match removed {
        Some(TableDef::Managed { location: Some(location), files, .. }) => {
            let ctx = core.ctx.clone();
            core.retire(id, move || store_writes::remove_files(&ctx, &location, files));
        }
        Some(TableDef::Managed { .. }) => {
            // What the directory holds now: a table created under the same name later writes
            // segments of its own beside them, which stay.
            let dir = core.catalog.table_dir(name);
            let entries: Vec<PathBuf> = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
            core.retire(id, move || {
                remove_paths(&entries);
                let _ = std::fs::remove_dir(&dir); // only when nothing else came
            });
        }
        _ => {}
    }
    Ok(empty_stream())
}

/// Distributes a physical plan for a Query: readers read the Query's Task outputs. `prune`:
/// a plan small after row-group pruning runs on the coordinator.
async fn plan_query(
    core: &Arc<Core>,
    id: &str,
    physical: Arc<dyn ExecutionPlan>,
    write: Option<WriteTarget>,
    prune: bool,
    settings: &Snapshot,
) -> Result<DistributedPlan> {
    let source = Arc::new(QueryTasks { query_id: id.to_string(), cluster: Arc::clone(&core.cluster) });
    let join_key_filters = settings.quiver.join_key_filters;
    let pruned_input_bytes = if prune { pruned_input_bytes(core, &physical).await } else { None };
    // A plan small enough for the coordinator alone is not cut into Tasks.
    let row_group_starts = match pruned_input_bytes {
        Some(_) => Default::default(),
        None => crate::storage::pruning::row_group_starts(&physical, core.ctx.runtime_env().as_ref()).await,
    };
    let mut opts = DistributeOptions {
        config: &core.config.planner,
        total_slots: core.cluster.total_slots(),
        source,
        write_dir: write,
        join_key_filters,
        pruned_input_bytes,
        row_group_starts,
    };
    let plan = planner::distribute(Arc::clone(&physical), &opts)?;
    if !plan.is_distributed() || opts.total_slots > 0 {
        return Ok(plan);
    }
    opts.total_slots = core.cluster.wait_for_slots(Duration::from_millis(WORKER_WAIT_MS)).await;
    if opts.total_slots == 0 {
        return Err(DataFusionError::Execution(format!(
            "no live workers after waiting {WORKER_WAIT_MS} ms: start one with `quiver worker --coordinator <url>`"
        )));
    }
    planner::distribute(physical, &opts)
}

/// What `plan`'s scans read after row-group pruning, when that is few enough bytes for the plan
/// to run on the coordinator alone.
pub(super) async fn pruned_input_bytes(core: &Core, plan: &Arc<dyn ExecutionPlan>) -> Option<u64> {
    match core.config.planner.small_query_max_bytes {
        0 => None,
        max => crate::storage::pruning::small_scan_bytes(plan, core.ctx.runtime_env().as_ref(), max).await,
    }
}

/// Plans, queues the Stages' Tasks and starts the final Stage, all under `settings` (those
/// the physical plan was made with); returns the plan as executed. Its scalar subqueries run
/// first, or beside it (see `subquery`): then its Stages that read their values, and the final
/// Stage, start once they are in.
pub(super) async fn start_physical(
    core: &Arc<Core>,
    id: &str,
    physical: Arc<dyn ExecutionPlan>,
    write: Option<WriteTarget>,
    settings: &Snapshot,
) -> Result<(DistributedPlan, SendableRecordBatchStream)> {
    let started = Instant::now();
    let mut detached = super::subquery::Detached::default();
    let physical = match settings.quiver.overlap_subqueries {
        true => super::subquery::detach(physical, &mut detached)?,
        false => super::subquery::resolve(core, id, physical, settings).await?,
    };
    let (mut plan, held) = match detached.is_empty() {
        true => submit_physical(core, id, physical, write, &detached, settings).await?,
        false => beside_subqueries(core, id, physical, write, &detached, settings).await?,
    };
    for stage in held {
        let plans = encode_tasks(&plan.stages[stage].tasks)?.ok_or_else(|| DataFusionError::Internal(format!("stage {stage} reads a subquery value still unknown")))?;
        core.cluster.release(id, stage as u32, plans)?;
    }
    tracing::debug!(query = %id, subqueries = !detached.is_empty(), ms = started.elapsed().as_secs_f64() * 1e3, "query started");
    if plan.root.output_partitioning().partition_count() > 1 {
        plan.root = Arc::new(CoalescePartitionsExec::new(Arc::clone(&plan.root)));
    }
    let stream = plan.root.execute(0, Arc::clone(&settings.task_ctx))?;
    Ok((plan, stream))
}

/// Runs `detached`'s subqueries while `physical` is distributed and its Stages are queued (the
/// Tasks of both share the slots, fair shares between Queries); sets their values once the
/// plan no longer reads placeholders in their place. A Query that fails meanwhile (a Stage that
/// does not wait for the values failed for good) fails at once, cancelling its subqueries.
async fn beside_subqueries(
    core: &Arc<Core>,
    id: &str,
    physical: Arc<dyn ExecutionPlan>,
    write: Option<WriteTarget>,
    detached: &super::subquery::Detached,
    settings: &Snapshot,
) -> Result<(DistributedPlan, Vec<usize>)> {
    let mut runs = std::pin::pin!(detached.run(core, id, settings));
    let submit = std::pin::pin!(submit_physical(core, id, physical, write, detached, settings));
    let (values, submitted) = match futures::future::select(runs.as_mut(), submit).await {
        Either::Left((values, submit)) => (values?, submit.await?),
        Either::Right((submitted, _)) => {
            let submitted = submitted?;
            let failed = std::pin::pin!(query_failed(core, id, submitted.0.stages.len()));
            match futures::future::select(runs, failed).await {
                Either::Left((values, _)) => (values?, submitted),
                Either::Right((error, _)) => return Err(error),
            }
        }
    };
    detached.set(values)?;
    Ok(submitted)
}

/// Resolves with the error of Query `id` (of `stages` Stages) once its run has failed or
/// ended; never for a plan without Stages. Every Task's outcome turns to that error then: the
/// last Stage's first Task stands for all.
async fn query_failed(core: &Arc<Core>, id: &str, stages: usize) -> DataFusionError {
    let watched = stages.checked_sub(1).and_then(|stage| core.cluster.subscribe(id, stage as u32, 0).ok());
    let Some(mut outcome) = watched else { return futures::future::pending().await };
    loop {
        if let Some(TaskOutcome::Failed(error)) = &*outcome.borrow_and_update() {
            return error.clone().into_datafusion();
        }
        if outcome.changed().await.is_err() {
            return cancelled_error(format!("query {id} ended while its scalar subqueries ran"));
        }
    }
}

/// Distributes `physical` and queues its Stages' Tasks; returns the plan and the Stages held
/// until `detached`'s values are in (the plan reads placeholders for them while it is
/// distributed, see `subquery::detach`).
async fn submit_physical(
    core: &Arc<Core>,
    id: &str,
    physical: Arc<dyn ExecutionPlan>,
    write: Option<WriteTarget>,
    detached: &super::subquery::Detached,
    settings: &Snapshot,
) -> Result<(DistributedPlan, Vec<usize>)> {
    let started = Instant::now();
    let physical = crate::storage::cache_page_indexes(physical, core.ctx.runtime_env().as_ref())?;
    let mut stores = core.stores.for_plan(&physical);
    // A write to a table in a store: its Tasks open that store too.
    stores.extend(write.as_ref().and_then(|w| core.stores.for_location(&w.dir.to_string_lossy())));
    // Row-group pruning would read the placeholders as values (and prune every row group):
    // a plan with subqueries beside it is judged small by its files' sizes alone.
    let plan = plan_query(core, id, physical, write, detached.is_empty(), settings).await;
    detached.unset();
    let plan = plan?;
    let distributed = started.elapsed();
    if plan.small_input_bytes.is_some() {
        core.cluster.ran_small(id);
    }
    let mut held = Vec::new();
    if plan.is_distributed() {
        core.cluster.set_query_context(id, stores, settings.execution.clone());
        let stages;
        (stages, held) = encode_stages(&plan)?;
        core.cluster.submit(id, stages, settings.adaptive())?;
    }
    // Where a Query's time goes before its first Task runs.
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    tracing::debug!(query = %id, distribute_ms = ms(distributed), submit_ms = ms(started.elapsed() - distributed), "query planned");
    Ok((plan, held))
}


/// The Stages as the cluster queues them, and those held because their Tasks read scalar
/// subquery values not known yet (their plans are encoded once they are).
fn encode_stages(plan: &DistributedPlan) -> Result<(Vec<NewStage>, Vec<usize>)> {
    let mut stages = Vec::with_capacity(plan.stages.len());
    let mut held = Vec::new();
    for (index, stage) in plan.stages.iter().enumerate() {
        let plans = encode_tasks(&stage.tasks)?;
        let awaits_values = plans.is_none();
        let plans = plans.unwrap_or_else(|| vec![Vec::new(); stage.tasks.len()]);
        let tasks = stage
            .tasks
            .iter()
            .zip(plans)
            .map(|(t, plan)| NewTask { stage: t.stage as u32, task: t.task as u32, partition: t.partition as u32, summary: t.summary.clone(), plan, slice_bytes: t.slice_bytes })
            .collect();
        let inputs = stage.inputs.iter().map(|&i| i as u32).collect();
        let (shuffle, parts) = match stage.exchange {
            Exchange::Shuffle { partitions } => (true, partitions as u32),
            Exchange::Gather => (false, 1),
        };
        let adaptive = match &stage.adaptive {
            Some(a) => Some(StageReads {
                inputs: a.inputs.iter().map(|&i| i as u32).collect(),
                splittable: a.splittable.iter().map(|&i| i as u32).collect(),
                ordered: a.ordered,
                merge: encode_merge(a.merge.as_ref())?,
            }),
            None => None,
        };
        let key_summary = stage.key_summary.iter().flatten().map(|&k| k as u32).collect();
        let key_filter = stage.key_filter.as_ref().map(|l| (l.build as u32, l.probe_keys.iter().map(|&k| k as u32).collect()));
        if awaits_values {
            held.push(index);
        }
        stages.push(NewStage { inputs, shuffle, parts, tasks, adaptive, key_summary, key_filter, held: awaits_values });
    }
    Ok((stages, held))
}

/// The input whose split partitions are merged, with the plan of their pieces; None when the
/// pieces would read a scalar subquery value not known yet (such a Stage is held, and not split).
fn encode_merge(merge: Option<&MergeRead>) -> Result<Option<(u32, Arc<Vec<u8>>)>> {
    let Some(merge) = merge else { return Ok(None) };
    Ok(encode_plan_when_resolved(Arc::clone(&merge.piece))?.map(|plan| (merge.input as u32, Arc::new(plan))))
}

/// The plans of a Stage's Tasks, or None when they read a scalar subquery value not known yet.
/// Tasks of one Stage often share one plan (they compute different partitions of it): it is
/// encoded once.
pub(super) fn encode_tasks(tasks: &[TaskSpec]) -> Result<Option<Vec<Vec<u8>>>> {
    let mut plans: Vec<Vec<u8>> = Vec::with_capacity(tasks.len());
    for (n, t) in tasks.iter().enumerate() {
        let bytes = match n.checked_sub(1).map(|p| &tasks[p]) {
            Some(previous) if Arc::ptr_eq(&previous.plan, &t.plan) => plans[n - 1].clone(),
            _ => match encode_plan_when_resolved(Arc::clone(&t.plan))? {
                Some(bytes) => bytes,
                None => return Ok(None),
            },
        };
        plans.push(bytes);
    }
    Ok(Some(plans))
}

fn empty_stream() -> SendableRecordBatchStream {
    Box::pin(EmptyRecordBatchStream::new(Arc::new(Schema::empty())))
}

fn count_stream(rows: u64) -> SendableRecordBatchStream {
    let batch = RecordBatch::try_new(count_schema(), vec![Arc::new(UInt64Array::from(vec![rows]))]);
    let schema: SchemaRef = count_schema();
    Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::iter([batch.map_err(Into::into)])))
}

/// The client's result stream. Records the Query's end when exhausted, failed or dropped.
struct QueryStream {
    inner: SendableRecordBatchStream,
    rows: u64,
    core: Option<Arc<Core>>,
    id: String,
}

impl QueryStream {
    /// The Query was cancelled while its result streamed (`CancelFlightInfo`).
    fn cancelled_from_outside(&self) -> bool {
        self.core.as_ref().and_then(|core| core.cluster.query(&self.id)).is_some_and(|q| q.state == "cancelled")
    }

    fn end(&mut self, error: Option<&DataFusionError>, cancelled: bool) {
        if let Some(core) = self.core.take() {
            core.finish(&self.id, self.rows, error, cancelled);
        }
    }
}

impl Stream for QueryStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // A panic while the result is computed (the coordinator's part of the plan, or a
        // DataFusion task it re-raises) is this Query's error, not a dropped connection.
        let polled = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inner.poll_next_unpin(cx))) {
            Ok(polled) => polled,
            Err(panic) => {
                // What the plan holds after a panic is unknown: it is never polled again.
                let schema = self.inner.schema();
                self.inner = Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::empty()));
                Poll::Ready(Some(Err(panicked(panic.as_ref()))))
            }
        };
        match &polled {
            Poll::Ready(Some(Ok(batch))) => self.rows += batch.num_rows() as u64,
            Poll::Ready(Some(Err(_))) if self.cancelled_from_outside() => {
                // Its stopped Tasks fail the reader in their own ways (an output freed under
                // it, say); the client asked for the cancel, so that is what it is told.
                let error = cancelled_error(format!("query {} was cancelled", self.id));
                self.end(Some(&error), false);
                return Poll::Ready(Some(Err(error)));
            }
            Poll::Ready(Some(Err(e))) => self.end(Some(e), false),
            Poll::Ready(None) => self.end(None, false),
            Poll::Pending => {}
        }
        polled
    }
}

impl RecordBatchStream for QueryStream {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
}

impl Drop for QueryStream {
    fn drop(&mut self) {
        self.end(None, true);
    }
}
