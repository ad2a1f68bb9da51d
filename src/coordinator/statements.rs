//! What Flight SQL clients hold on the coordinator: results of started statements waiting for
//! their `DoGet`, results being streamed (so that a cancel can end them), and prepared
//! statements with their bound parameters. Everything here is bounded in count and in time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{DataFusionError, ParamValues, Result, ScalarValue};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::{LogicalPlan, TableType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::future::{AbortHandle, Abortable};
use futures::StreamExt;

use super::{session, Core};
use crate::config::{PREPARED_STATEMENTS_MAX, PREPARED_STATEMENT_IDLE_MS, RESULTS_WAITING_MAX, RESULT_CLAIM_TIMEOUT_MS};
use crate::auth::Caller;
use crate::protocol::cancelled_error;
use crate::transport::{Cancelled, Prepared, Started, TableEntry};

#[derive(Default)]
pub(super) struct Statements {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// By Query id: results whose client has not asked for them yet.
    waiting: HashMap<String, Waiting>,
    /// Statements being started: they hold a place among the waiting results.
    starting: usize,
    /// By Query id: results being streamed to their client.
    fetching: HashMap<String, AbortHandle>,
    prepared: HashMap<String, PreparedEntry>,
}

struct Waiting {
    stream: SendableRecordBatchStream,
    since: Instant,
    /// The caller that started the statement: the only one that may fetch its result.
    owner: String,
}

struct PreparedEntry {
    owner: String,
    sql: String,
    parameters: Option<ParamValues>,
    used: Instant,
}

impl Statements {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("statements lock")
    }

    /// Starts a statement; its result waits for [`Statements::take_result`].
    pub async fn start(&self, core: &Arc<Core>, caller: &Caller, sql: &str, parameters: Option<ParamValues>) -> Result<Started> {
        {
            let mut inner = self.lock();
            if inner.waiting.len() + inner.starting >= RESULTS_WAITING_MAX {
                return Err(DataFusionError::ResourcesExhausted(format!(
                    "{RESULTS_WAITING_MAX} results are already waiting to be fetched"
                )));
            }
            inner.starting += 1;
        }
        let slot = Starting(self);
        let (id, stream) = session::start(core, caller, sql, parameters).await?;
        let schema = stream.schema();
        let mut inner = self.lock();
        inner.waiting.insert(id.clone(), Waiting { stream, since: Instant::now(), owner: caller.name.clone() });
        drop(inner);
        drop(slot);
        Ok(Started { handle: id, schema })
    }

    pub async fn start_prepared(&self, core: &Arc<Core>, caller: &Caller, handle: &str) -> Result<Started> {
        let (sql, parameters) = {
            let mut inner = self.lock();
            let entry = inner.prepared.get_mut(handle).filter(|p| caller.owns(&p.owner)).ok_or_else(|| unknown_prepared(handle))?;
            entry.used = Instant::now();
            (entry.sql.clone(), entry.parameters.clone())
        };
        self.start(core, caller, &sql, parameters).await
    }

    /// The result of a started statement, once. A cancel ends it with an error, never early; a
    /// result read to its end stays complete even if a cancel arrives just after.
    pub fn take_result(self: &Arc<Self>, caller: &Caller, id: &str) -> Option<SendableRecordBatchStream> {
        let mut inner = self.lock();
        // Another caller's result is as good as absent: its handle tells them nothing.
        if !caller.owns(&inner.waiting.get(id)?.owner) {
            return None;
        }
        let waiting = inner.waiting.remove(id)?;
        let (abort, registration) = AbortHandle::new_pair();
        inner.fetching.insert(id.to_string(), abort.clone());
        drop(inner);
        let schema = waiting.stream.schema();
        let complete = Arc::new(AtomicBool::new(false));
        let marker = Arc::clone(&complete);
        let end = futures::stream::once(async move {
            marker.store(true, Ordering::SeqCst);
            None
        });
        let guard = Fetching { statements: Arc::clone(self), id: id.to_string() };
        let tail = futures::stream::once(async move {
            let cut_short = abort.is_aborted() && !complete.load(Ordering::SeqCst);
            cut_short.then(|| Err(cancelled_error(format!("query {} was cancelled", guard.id))))
        });
        let inner = waiting.stream.map(Some).chain(end).filter_map(futures::future::ready);
        let stream = Abortable::new(inner, registration).chain(tail.filter_map(futures::future::ready));
        Some(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }

    /// Cancels a Query: its waiting result is dropped, its streaming result ends with an error,
    /// and its Tasks are stopped on every worker now, whatever its client is doing.
    pub fn cancel(&self, core: &Core, caller: &Caller, id: &str) -> Cancelled {
        let may = core.cluster.query(id).is_some_and(|q| caller.owns(&q.user) || caller.sees_all_queries());
        if !may {
            return Cancelled::Unknown;
        }
        let (waiting, fetching) = {
            let mut inner = self.lock();
            (inner.waiting.remove(id), inner.fetching.get(id).cloned())
        };
        if let Some(abort) = fetching {
            abort.abort();
        }
        let (outcome, running) = match core.cluster.query(id).map(|r| r.state) {
            Some("running") => (Cancelled::Yes, true),
            // Cancelling is idempotent: the client may have closed its stream first.
            Some("cancelled") => (Cancelled::Yes, false),
            Some(_) => (Cancelled::AlreadyEnded, false),
            None => (Cancelled::Unknown, false),
        };
        if running {
            tracing::info!(query = %id, "query cancelled by its client");
            core.finish(id, 0, None, true);
        }
        drop(waiting);
        outcome
    }

    pub async fn prepare(&self, core: &Core, caller: &Caller, sql: &str) -> Result<Prepared> {
        super::access::may_run_statements(caller)?;
        let plan = core.ctx.state().create_logical_plan(sql).await?;
        super::access::check(caller, &plan, &core.config.allowed_paths)?;
        let prepared = Prepared {
            handle: format!("p-{}", uuid::Uuid::new_v4().simple()),
            dataset_schema: result_schema(&plan),
            parameter_schema: parameter_schema(&plan)?,
        };
        let mut inner = self.lock();
        if inner.prepared.len() >= PREPARED_STATEMENTS_MAX {
            // Clients that never close (a pool that prepares every statement) lose their
            // oldest statements instead of locking every client out.
            let oldest = inner.prepared.iter().min_by_key(|(_, p)| p.used).map(|(h, _)| h.clone());
            if let Some(handle) = oldest {
                tracing::warn!(%handle, "{PREPARED_STATEMENTS_MAX} prepared statements open: closing the least recently used");
                inner.prepared.remove(&handle);
            }
        }
        let entry = PreparedEntry { owner: caller.name.clone(), sql: sql.to_string(), parameters: None, used: Instant::now() };
        inner.prepared.insert(prepared.handle.clone(), entry);
        Ok(prepared)
    }

    pub fn bind(&self, caller: &Caller, handle: &str, parameters: RecordBatch) -> Result<()> {
        let values = parameter_values(&parameters)?;
        let mut inner = self.lock();
        let entry = inner.prepared.get_mut(handle).filter(|p| caller.owns(&p.owner)).ok_or_else(|| unknown_prepared(handle))?;
        entry.parameters = values;
        entry.used = Instant::now();
        Ok(())
    }

    pub fn close_prepared(&self, caller: &Caller, handle: &str) {
        let mut inner = self.lock();
        if inner.prepared.get(handle).is_some_and(|p| caller.owns(&p.owner)) {
            inner.prepared.remove(handle);
        }
    }

    /// Cancels results nobody came for and closes prepared statements nobody uses.
    pub fn expire(&self) {
        let (claim, idle) = (Duration::from_millis(RESULT_CLAIM_TIMEOUT_MS), Duration::from_millis(PREPARED_STATEMENT_IDLE_MS));
        let expired: Vec<Waiting> = {
            let mut inner = self.lock();
            inner.prepared.retain(|_, p| p.used.elapsed() < idle);
            let old: Vec<String> =
                inner.waiting.iter().filter(|(_, w)| w.since.elapsed() >= claim).map(|(id, _)| id.clone()).collect();
            old.iter().filter_map(|id| inner.waiting.remove(id)).collect()
        };
        if !expired.is_empty() {
            tracing::warn!("{} results not fetched within {RESULT_CLAIM_TIMEOUT_MS} ms: their queries are cancelled", expired.len());
        }
        // Dropped outside the lock: dropping a result ends its Query.
        drop(expired);
    }
}

/// A place among the waiting results, held while a statement starts.
struct Starting<'a>(&'a Statements);

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.0.lock().starting -= 1;
    }
}

/// Removes a streamed result from `fetching` when its stream ends or is dropped.
struct Fetching {
    statements: Arc<Statements>,
    id: String,
}

impl Drop for Fetching {
    fn drop(&mut self) {
        self.statements.lock().fetching.remove(&self.id);
    }
}

fn unknown_prepared(handle: &str) -> DataFusionError {
    DataFusionError::Plan(format!("no prepared statement has handle '{handle}': it was closed or expired"))
}

/// The schema of the result set a statement returns. Writes and DDL have none: Flight SQL
/// clients (the JDBC driver among them) treat a statement with an empty dataset schema as an
/// update and read its count from `DoPut`; run as a query, a write still answers with `count`.
fn result_schema(plan: &LogicalPlan) -> SchemaRef {
    match plan {
        LogicalPlan::Ddl(_) | LogicalPlan::Dml(_) | LogicalPlan::Copy(_) => Arc::new(Schema::empty()),
        plan => Arc::new(plan.schema().as_arrow().clone()),
    }
}

/// The placeholders `$1`, `$2`, … a statement takes, in order, with the types DataFusion
/// inferred for them (Null where it could not).
fn parameter_schema(plan: &LogicalPlan) -> Result<SchemaRef> {
    let mut parameters: Vec<(String, Option<DataType>)> = plan.get_parameter_types()?.into_iter().collect();
    parameters.sort_by_key(|(id, _)| (id.trim_start_matches('$').parse::<u64>().unwrap_or(u64::MAX), id.clone()));
    let fields: Vec<Field> =
        parameters.into_iter().map(|(id, t)| Field::new(id, t.unwrap_or(DataType::Null), true)).collect();
    Ok(Arc::new(Schema::new(fields)))
}

/// One row of bound parameters, positional; no row means no parameters.
fn parameter_values(batch: &RecordBatch) -> Result<Option<ParamValues>> {
    match batch.num_rows() {
        0 => Ok(None),
        1 => {
            let values: Result<Vec<ScalarValue>> = batch.columns().iter().map(|c| ScalarValue::try_from_array(c, 0)).collect();
            Ok(Some(ParamValues::from(values?)))
        }
        n => Err(DataFusionError::NotImplemented(format!(
            "a prepared query takes one row of parameters, not {n}: execute it once per row"
        ))),
    }
}

/// Every table of every catalog and schema, as the metadata calls list them.
pub(super) async fn tables(core: &Core) -> Result<Vec<TableEntry>> {
    let mut entries = vec![];
    for catalog_name in core.ctx.catalog_names() {
        let Some(catalog) = core.ctx.catalog(&catalog_name) else { continue };
        for schema_name in catalog.schema_names() {
            let Some(schema) = catalog.schema(&schema_name) else { continue };
            for name in schema.table_names() {
                let Some(table) = schema.table(&name).await? else { continue };
                let table_type = match table.table_type() {
                    TableType::Base => "TABLE",
                    TableType::View => "VIEW",
                    TableType::Temporary => "LOCAL TEMPORARY",
                };
                let (catalog, db_schema) = (catalog_name.clone(), schema_name.clone());
                entries.push(TableEntry { catalog, db_schema, name, table_type, schema: table.schema() });
            }
        }
    }
    entries.sort_by(|a, b| (&a.catalog, &a.db_schema, &a.name).cmp(&(&b.catalog, &b.db_schema, &b.name)));
    Ok(entries)
}
