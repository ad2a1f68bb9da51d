//! SQL semantics as data: every `.slt` file under `tests/slt/` runs against single-node
//! DataFusion and against a 3-worker cluster cut into many small Tasks; both must produce the
//! results written in the file. `QUIVER_SLT_COMPLETE=1` rewrites the expected results from
//! single-node DataFusion (review the diff before committing it).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::DataFusionError;
use datafusion::prelude::SessionContext;
use quiver::client::Client;
use sqllogictest::{DBOutput, DefaultColumnType};

#[derive(Clone)]
enum Engine {
    Single(SessionContext),
    Cluster(Client),
}

struct Db(Engine);

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for Db {
    type Error = DataFusionError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DataFusionError> {
        let (schema, batches): (Schema, Vec<RecordBatch>) = match &self.0 {
            Engine::Single(ctx) => {
                let df = ctx.sql(sql).await?;
                let schema = df.schema().as_arrow().clone();
                (schema, df.collect().await?)
            }
            Engine::Cluster(client) => {
                let (schema, batches) = client.collect(sql).await?;
                (schema.as_ref().clone(), batches)
            }
        };
        if schema.fields().is_empty() || is_write(sql) {
            return Ok(DBOutput::StatementComplete(0));
        }
        let types = schema.fields().iter().map(|f| column_type(f.data_type())).collect();
        let rows = common::rows(&batches)
            .into_iter()
            .map(|row| row.into_iter().map(|c| if c.is_empty() { "(empty)".to_string() } else { c }).collect())
            .collect();
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await;
    }
}

/// DDL and DML answer with a row count in Quiver and with nothing in DataFusion: both are
/// statements to sqllogictest.
fn is_write(sql: &str) -> bool {
    let head = sql.trim_start().to_ascii_uppercase();
    ["CREATE", "INSERT", "DROP"].iter().any(|k| head.starts_with(k))
}

fn column_type(t: &DataType) -> DefaultColumnType {
    if t.is_integer() {
        DefaultColumnType::Integer
    } else if t.is_floating() || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..)) {
        DefaultColumnType::FloatingPoint
    } else {
        DefaultColumnType::Text
    }
}

fn slt_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/slt").join(format!("{name}.slt"))
}

async fn run_file(name: &str) {
    run_file_with(name, &[]).await
}

/// Runs an .slt file on both engines after applying `settings` to each.
async fn run_file_with(name: &str, settings: &[&str]) {
    let path = slt_path(name);
    let single = SessionContext::new_with_config(quiver::config::session_config(3));
    for sql in settings {
        single.sql(sql).await.unwrap();
    }
    if std::env::var_os("QUIVER_SLT_COMPLETE").is_some() {
        let mut runner = sqllogictest::Runner::new(move || {
            let ctx = single.clone();
            async move { Ok(Db(Engine::Single(ctx))) }
        });
        runner
            .update_test_file(&path, " ", sqllogictest::default_validator, sqllogictest::default_normalizer, sqllogictest::default_column_validator)
            .await
            .unwrap();
        return;
    }
    let mut runner = sqllogictest::Runner::new(move || {
        let ctx = single.clone();
        async move { Ok(Db(Engine::Single(ctx))) }
    });
    runner.run_file_async(&path).await.unwrap_or_else(|e| panic!("single-node DataFusion: {e}"));
    let t = common::TestCluster::start(3).await;
    for sql in settings {
        t.client.collect(sql).await.unwrap();
    }
    let client = t.client.clone();
    let mut runner = sqllogictest::Runner::new(move || {
        let client = client.clone();
        async move { Ok(Db(Engine::Cluster(client))) }
    });
    runner.run_file_async(&path).await.unwrap_or_else(|e| panic!("Quiver cluster: {e}"));
}

macro_rules! slt {
    ($($name:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            run_file(stringify!($name)).await;
        }
    )*};
}

slt!(aggregates, ddl, exchange_types, filters_projections, joins, nulls, order_limit_distinct, types);

/// Adaptive scheduling never changes an answer: every file again with every join shuffled and
/// partitions split, coalesced and speculated wherever they may be.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_file_with_every_adaptive_mechanism_forced_on() {
    let settings: Vec<&str> = common::SHUFFLE_JOINS.iter().chain(&common::ADAPTIVE_EVERYWHERE).copied().collect();
    for name in ["aggregates", "ddl", "exchange_types", "filters_projections", "joins", "nulls", "order_limit_distinct", "types"] {
        run_file_with(name, &settings).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joins_with_every_join_shuffled() {
    run_file_with("joins", &common::SHUFFLE_JOINS).await;
}
