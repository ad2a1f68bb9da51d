//! The two engines as sqllogictest databases: single-node DataFusion with Quiver's settings, and
//! a Quiver cluster reached through its Flight SQL client. Both answer the way DataFusion's own
//! runner does (engine name `DataFusion`, errors written `DataFusion error: …`, results
//! normalised by `normalize`), so that one file's expectations hold for either.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::DataFusionError;
use datafusion::physical_plan::{collect, ExecutionPlan};
use datafusion::prelude::SessionContext;
use quiver::client::Client;
use sqllogictest::DBOutput;

use super::normalize::{self, ColumnKind};

/// Label DataFusion's runner adds: `onlyif`/`skipif` records name it.
pub const LABEL: &str = "Datafusion";
/// Engine name DataFusion's runner reports (sqllogictest also matches conditions against it).
pub const ENGINE_NAME: &str = "DataFusion";

#[derive(Clone)]
pub enum Engine {
    Single(SessionContext),
    Cluster(Client),
}

/// An engine as a sqllogictest database; `workspace_root` is the path written `WORKSPACE_ROOT`.
#[derive(Clone)]
pub struct Db {
    pub engine: Engine,
    pub workspace_root: String,
    /// The Arrow schema of the last statement's result (none after an error): the column types
    /// behind the letters, to tell which columns were dictionary-encoded.
    pub last_schema: Arc<Mutex<Option<SchemaRef>>>,
}

impl Db {
    pub fn new(engine: Engine, workspace_root: &str) -> Self {
        Self { engine, workspace_root: workspace_root.to_string(), last_schema: Arc::default() }
    }

    pub fn take_schema(&self) -> Option<SchemaRef> {
        self.last_schema.lock().unwrap().take()
    }
}

/// An error as DataFusion's runner prints it. The cluster's is the error a Quiver client reads:
/// the root cause's own words, without DataFusion's context chain or the transport's wrapping.
#[derive(Debug)]
pub struct EngineError(String);

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataFusion error: {}", self.0)
    }
}

impl std::error::Error for EngineError {}

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for Db {
    type Error = EngineError;
    type ColumnType = ColumnKind;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<ColumnKind>, EngineError> {
        *self.last_schema.lock().unwrap() = None;
        let (schema, batches) = match &self.engine {
            Engine::Single(ctx) => single(ctx, sql).await.map_err(|e| EngineError(e.strip_backtrace()))?,
            Engine::Cluster(client) => client.collect(sql).await.map_err(|e| EngineError(quiver::protocol::error_text(&e)))?,
        };
        let types = normalize::column_kinds(&schema);
        let rows = normalize::rows(&batches, &self.workspace_root).map_err(|e| EngineError(format!("Arrow error: {e}")))?;
        *self.last_schema.lock().unwrap() = Some(schema);
        if rows.is_empty() && types.is_empty() {
            return Ok(DBOutput::StatementComplete(0));
        }
        Ok(DBOutput::Rows { types, rows })
    }

    fn engine_name(&self) -> &str {
        ENGINE_NAME
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await;
    }

    async fn shutdown(&mut self) {}
}

/// Runs `sql` as DataFusion's runner does: the physical plan's schema, every partition collected.
async fn single(ctx: &SessionContext, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>), DataFusionError> {
    let df = ctx.sql(sql).await?;
    let task_ctx = Arc::new(df.task_ctx());
    let plan: Arc<dyn ExecutionPlan> = df.create_physical_plan().await?;
    let schema = plan.schema();
    Ok((schema, collect(plan, task_ctx).await?))
}
