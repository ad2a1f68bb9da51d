//! Shared test helpers: an in-process cluster on loopback that cuts work into many small Tasks,
//! a single-node DataFusion reference, and one `check` per kind of comparison.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use quiver::client::Client;
use quiver::cluster::{LocalCluster, LocalOptions};
use quiver::config::{session_config, CoordinatorConfig, PlannerConfig, WorkerConfig};

pub struct TestCluster {
    pub cluster: LocalCluster,
    pub client: Client,
    pub single: SessionContext,
    pub dir: tempfile::TempDir,
}

/// Makes every hash join a partitioned one: both sides are shuffled by the join keys.
pub const SHUFFLE_JOINS: [&str; 2] = [
    "SET datafusion.optimizer.hash_join_single_partition_threshold = 0",
    "SET datafusion.optimizer.hash_join_single_partition_threshold_rows = 0",
];

/// Settings that force many small Tasks: the merge path runs on every query.
pub fn many_tasks_config() -> CoordinatorConfig {
    CoordinatorConfig { planner: PlannerConfig::many_small_tasks(), write_row_group_rows: 7, target_partitions: 3 }
}

impl TestCluster {
    pub async fn start(workers: usize) -> Self {
        Self::start_with(workers, WorkerConfig { slots: 2, memory_limit_bytes: 1 << 30 }).await
    }

    pub async fn start_with(workers: usize, worker: WorkerConfig) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let opts = LocalOptions {
            workers,
            worker,
            coordinator: many_tasks_config(),
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".parse().unwrap(),
        };
        let cluster = LocalCluster::start(opts).await.expect("cluster starts");
        let client = Client::connect(&cluster.url()).await.expect("client connects");
        let single = SessionContext::new_with_config(session_config(3));
        Self { cluster, client, single, dir }
    }

    /// Runs statements on the cluster, in order.
    pub async fn run_all(&self, statements: &[&str]) {
        for sql in statements {
            self.client.collect(sql).await.unwrap_or_else(|e| panic!("cluster failed {sql}: {e}"));
        }
    }

    /// Runs `sql` on both engines (e.g. DDL over shared files).
    pub async fn both(&self, sql: &str) {
        self.client.collect(sql).await.unwrap_or_else(|e| panic!("cluster failed {sql}: {e}"));
        self.single.sql(sql).await.and_then(|df| Ok(df)).unwrap_or_else(|e| panic!("single failed {sql}: {e}"));
    }

    pub async fn cluster_rows(&self, sql: &str) -> Vec<Vec<String>> {
        let (_, batches) = self.client.collect(sql).await.unwrap_or_else(|e| panic!("cluster failed {sql}: {e}"));
        rows(&batches)
    }

    pub async fn single_rows(&self, sql: &str) -> Vec<Vec<String>> {
        let batches: Vec<RecordBatch> = self
            .single
            .sql(sql)
            .await
            .unwrap_or_else(|e| panic!("single failed {sql}: {e}"))
            .execute_stream()
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("single failed {sql}: {e}"));
        rows(&batches)
    }

    /// The differential check: same rows on the cluster and on single-node DataFusion.
    pub async fn check_same(&self, sql: &str) {
        let (mut cluster, mut single) = (self.cluster_rows(sql).await, self.single_rows(sql).await);
        if !has_total_order(sql) {
            cluster.sort();
            single.sort();
        }
        assert_rows_match(sql, &cluster, &single);
    }
}

impl TestCluster {
    /// Runs `sql` on single-node DataFusion after copying `table` from the cluster into it.
    pub async fn single_rows_after_copy(&self, sql: &str, table: &str) -> Vec<Vec<String>> {
        if !self.single.table_exist(table).unwrap() {
            let (schema, batches) = self.client.collect(&format!("SELECT * FROM {table}")).await.unwrap();
            let mem = datafusion::datasource::MemTable::try_new(schema, vec![batches]).unwrap();
            self.single.register_table(table, Arc::new(mem)).unwrap();
        }
        self.single_rows(sql).await
    }

    /// Asserts the single row a query returns on the cluster.
    pub async fn check_same_count(&self, sql: &str, expected: Vec<&str>) {
        let rows = self.cluster_rows(sql).await;
        assert_eq!(rows, vec![expected.into_iter().map(str::to_string).collect::<Vec<_>>()], "{sql}");
    }
}

fn has_total_order(sql: &str) -> bool {
    sql.to_ascii_lowercase().contains("order by")
}

/// Formats every cell as text: NULL as "NULL".
pub fn rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for batch in batches {
        let formatters: Vec<_> =
            batch.columns().iter().map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap()).collect();
        for row in 0..batch.num_rows() {
            out.push(formatters.iter().map(|f| f.value(row).to_string()).collect());
        }
    }
    out
}

/// Cells equal as text, or as numbers within a relative 1e-9 (floating sums in another order).
pub fn cells_match(a: &str, b: &str, rel: f64) -> bool {
    if a == b {
        return true;
    }
    match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() <= rel * x.abs().max(y.abs()).max(1.0),
        _ => a.trim() == b.trim(),
    }
}

pub fn assert_rows_match(sql: &str, actual: &[Vec<String>], expected: &[Vec<String>]) {
    assert_eq!(actual.len(), expected.len(), "row count differs for {sql}\nactual: {actual:?}\nexpected: {expected:?}");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let same = a.len() == e.len() && a.iter().zip(e).all(|(x, y)| cells_match(x, y, 1e-9));
        assert!(same, "row {i} differs for {sql}\nactual:   {a:?}\nexpected: {e:?}");
    }
}

pub fn tpch_dir() -> PathBuf {
    quiver::tpch::shared_dir()
}

/// The official answer of a TPC-H query at a scale factor: its header and its rows.
pub fn tpch_answer(sf: &str, q: usize) -> (Vec<String>, Vec<Vec<String>>) {
    let path = tpch_dir().join(format!("answers/sf{sf}/q{q:02}.csv"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines().map(|l| l.split('|').map(str::to_string).collect::<Vec<_>>());
    let header = lines.next().unwrap_or_default();
    (header, lines.collect())
}

pub fn quiver_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_quiver"))
}

/// Waits until no worker runs a Task or holds an output part, a spill file or memory; panics
/// after 5 s.
pub async fn assert_workers_idle(t: &TestCluster, after: &str) {
    let mut held = (0, 0, 0, 0);
    for _ in 0..250 {
        let workers = t.cluster.workers.iter().flatten();
        held = workers.fold((0, 0, 0, 0), |(r, p, f, m), w| {
            (r + w.running_tasks(), p + w.stored_outputs(), f + w.spill_files(), m + w.memory_used_bytes())
        });
        if held == (0, 0, 0, 0) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (running, parts, files, bytes) = held;
    panic!("after {after}, workers still run {running} tasks and hold {parts} output parts, {files} spill files, {bytes} bytes");
}
