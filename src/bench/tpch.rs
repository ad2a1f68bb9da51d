//! `quiver bench tpch`: the 22 TPC-H queries on a local cluster, on single-node DataFusion in
//! the same process over the same files, and on DuckDB when it is installed ([`super::duckdb`]),
//! each query on each engine in turn, so that the ratios are measured side by side.

use std::path::PathBuf;
use std::time::Instant;

use datafusion::arrow::array::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;

use super::{duckdb, idle_slot_ms, local_options, moved_bytes, tpch_cluster};
use crate::client::Client;
use crate::cluster::LocalCluster;
use crate::config::{default_parallelism, session_config};
use crate::tpch;

#[derive(Debug, Clone)]
pub struct TpchBench {
    pub sf: f64,
    pub workers: usize,
    pub queries: Vec<usize>,
    pub data_dir: PathBuf,
    /// Runs per query and engine; the fastest counts.
    pub iterations: usize,
    /// Task outputs go over Flight on loopback even within the process.
    pub over_network: bool,
    /// A setting the cluster also runs each query with at another value.
    pub compare: Option<Comparison>,
}

/// A setting timed at two values side by side: `cluster_ms` with `base`, `other_ms` with
/// `other`.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub name: String,
    pub base: String,
    pub other: String,
}

impl Comparison {
    /// `NAME=A,B`.
    pub fn parse(text: &str) -> Result<Self> {
        let parsed = text.split_once('=').and_then(|(name, values)| Some((name, values.split_once(',')?)));
        match parsed {
            Some((name, (base, other))) if !name.is_empty() => Ok(Self { name: name.into(), base: base.into(), other: other.into() }),
            _ => Err(DataFusionError::Configuration(format!("--compare {text}: expected NAME=A,B"))),
        }
    }

    fn set(&self, value: &str) -> String {
        format!("SET {} = {value}", self.name)
    }
}

pub struct Row {
    pub query: usize,
    pub single_ms: f64,
    pub cluster_ms: f64,
    /// DuckDB's time on the same files, when its Python package is installed.
    pub duckdb_ms: Option<f64>,
    /// The cluster's time with the compared setting at its other value.
    pub other_ms: Option<f64>,
    pub rows: usize,
    /// Bytes of Task outputs moved worker to worker (shuffles) and read whole (broadcasts and
    /// the final gather), in the last run; subqueries' Queries included.
    pub shuffled_bytes: u64,
    pub gathered_bytes: u64,
    /// Bytes shuffled in the last run with the compared setting at its other value.
    pub other_shuffled_bytes: Option<u64>,
    /// Slot time the cluster's last run left idle and the slot time it spanned, in ms
    /// ([`super::idle_slot_ms`]).
    pub idle_slot_ms: (f64, f64),
}

pub async fn run_tpch(bench: &TpchBench) -> Result<Vec<Row>> {
    let dir = tpch::generate(&bench.data_dir, bench.sf, tpch::Layout::for_scale(bench.sf))?;
    let cores = default_parallelism();
    let single = SessionContext::new_with_config(session_config(cores));
    for sql in tpch::create_tables_sql(&dir) {
        single.sql(&sql).await?;
    }
    let mut opts = local_options(bench.workers)?;
    opts.worker.in_process_reads = !bench.over_network;
    let (cluster, client) = tpch_cluster(opts.clone(), &dir).await?;
    let reads = if bench.over_network { "outputs over Flight" } else { "outputs read in-process" };
    println!("TPC-H SF {} | {} workers x {} slots | {} cores | best of {} | {reads}", bench.sf, bench.workers, opts.worker.slots, cores, bench.iterations);
    if let Some(c) = &bench.compare {
        println!("cluster_ms with {} = {}, other_ms with {} = {}", c.name, c.base, c.name, c.other);
        client.collect(&c.set(&c.base)).await?;
    }
    let mut duckdb = match duckdb::DuckDb::start(&dir).await {
        Ok(duckdb) => {
            println!("beside {}", duckdb.description);
            Some(duckdb)
        }
        Err(why) => {
            println!("without DuckDB: {why}");
            None
        }
    };
    println!(
        "{:>5} {:>12} {:>12} {:>7} {:>12} {:>7} {:>12} {:>7} {:>8} {:>12} {:>12} {:>17} {:>10}",
        "query", "single_ms", "cluster_ms", "ratio", "duckdb_ms", "ratio", "other_ms", "ratio", "rows", "shuffled_MB", "gathered_MB", "other_shuffled_MB", "idle_slot%"
    );
    let mut rows = Vec::new();
    let slots = bench.workers * opts.worker.slots;
    for &q in &bench.queries {
        let row = time_query(bench, q, &single, &client, duckdb.as_mut(), &cluster, slots).await?;
        print_row(&row);
        rows.push(row);
    }
    print_total(&rows);
    cluster.shutdown().await;
    Ok(rows)
}

/// Runs query `q` `iterations` times on each engine, alternating, and keeps each one's best.
async fn time_query(
    bench: &TpchBench,
    q: usize,
    single: &SessionContext,
    client: &Client,
    mut duckdb: Option<&mut duckdb::DuckDb>,
    cluster: &LocalCluster,
    slots: usize,
) -> Result<Row> {
    let sql = tpch::query_sql(q)?;
    let (mut single_ms, mut cluster_ms, mut duckdb_ms, mut other_ms) = (f64::MAX, f64::MAX, None::<f64>, None::<f64>);
    let mut counts = (0, 0);
    let (mut moved, mut other_shuffled_bytes, mut idle) = ((0, 0), None, (0.0, 0.0));
    for _ in 0..bench.iterations.max(1) {
        let started = Instant::now();
        let batches: Vec<RecordBatch> = single.sql(&sql).await?.execute_stream().await?.try_collect().await?;
        single_ms = single_ms.min(started.elapsed().as_secs_f64() * 1e3);
        counts.0 = batches.iter().map(|b| b.num_rows()).sum();
        let started = Instant::now();
        let (_, batches) = client.collect(&sql).await?;
        cluster_ms = cluster_ms.min(started.elapsed().as_secs_f64() * 1e3);
        counts.1 = batches.iter().map(|b| b.num_rows()).sum();
        moved = moved_bytes(cluster, &sql);
        idle = idle_slot_ms(cluster, &sql, slots);
        if let Some(c) = &bench.compare {
            client.collect(&c.set(&c.other)).await?;
            let started = Instant::now();
            let outcome = client.collect(&sql).await;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            client.collect(&c.set(&c.base)).await?;
            let rows: usize = outcome?.1.iter().map(|b| b.num_rows()).sum();
            if rows != counts.1 {
                return Err(DataFusionError::Execution(format!("q{q}: the cluster returned {} rows, and {rows} with {} = {}", counts.1, c.name, c.other)));
            }
            other_ms = Some(other_ms.map_or(ms, |best| best.min(ms)));
            other_shuffled_bytes = Some(moved_bytes(cluster, &sql).0);
        }
        if let Some(duckdb) = duckdb.as_deref_mut() {
            let (ms, rows) = duckdb.run(&sql).await?;
            if rows != counts.0 {
                return Err(DataFusionError::Execution(format!("q{q}: single node returned {} rows, DuckDB {rows}", counts.0)));
            }
            duckdb_ms = Some(duckdb_ms.map_or(ms, |best| best.min(ms)));
        }
    }
    if counts.0 != counts.1 {
        return Err(DataFusionError::Execution(format!("q{q}: single node returned {} rows, cluster {}", counts.0, counts.1)));
    }
    let (shuffled_bytes, gathered_bytes) = moved;
    Ok(Row { query: q, single_ms, cluster_ms, duckdb_ms, other_ms, rows: counts.0, shuffled_bytes, gathered_bytes, other_shuffled_bytes, idle_slot_ms: idle })
}

fn print_row(row: &Row) {
    let mb = |b: u64| b as f64 / 1e6;
    let (duckdb_ms, duckdb_ratio) = beside(row.duckdb_ms, row.cluster_ms);
    let (other_ms, other_ratio) = beside(row.other_ms, row.cluster_ms);
    println!(
        "{:>5} {:>12.1} {:>12.1} {:>6.2}x {:>12} {:>7} {:>12} {:>7} {:>8} {:>12.1} {:>12.1} {:>17} {:>10}",
        format!("q{:02}", row.query),
        row.single_ms,
        row.cluster_ms,
        row.cluster_ms / row.single_ms,
        duckdb_ms,
        duckdb_ratio,
        other_ms,
        other_ratio,
        row.rows,
        mb(row.shuffled_bytes),
        mb(row.gathered_bytes),
        row.other_shuffled_bytes.map_or("-".into(), |b| format!("{:.1}", mb(b))),
        idle_percent(&[row.idle_slot_ms])
    );
}

/// Idle slot time as a share of the slot time spanned, over one or more runs.
fn idle_percent(runs: &[(f64, f64)]) -> String {
    let (idle, spanned) = runs.iter().fold((0.0, 0.0), |(i, s), r| (i + r.0, s + r.1));
    if spanned > 0.0 { format!("{:.1}", 100.0 * idle / spanned) } else { "-".into() }
}

/// Totals, and the cluster's ratio to each engine (`cluster/duckdb`: how much slower the
/// cluster is than DuckDB).
fn print_total(rows: &[Row]) {
    let single: f64 = rows.iter().map(|r| r.single_ms).sum();
    let cluster: f64 = rows.iter().map(|r| r.cluster_ms).sum();
    let (duckdb_ms, duckdb_ratio) = beside(rows.iter().map(|r| r.duckdb_ms).sum(), cluster);
    let (other_ms, other_ratio) = beside(rows.iter().map(|r| r.other_ms).sum(), cluster);
    let idle = idle_percent(&rows.iter().map(|r| r.idle_slot_ms).collect::<Vec<_>>());
    println!(
        "{:>5} {:>12.1} {:>12.1} {:>6.2}x {:>12} {:>7} {:>12} {:>7} {:>8} {:>12} {:>12} {:>17} {:>10}",
        "total", single, cluster, cluster / single, duckdb_ms, duckdb_ratio, other_ms, other_ratio, "", "", "", "", idle
    );
}

/// Another time beside the cluster's, and the cluster's ratio to it; dashes without one.
fn beside(ms: Option<f64>, cluster_ms: f64) -> (String, String) {
    match ms {
        Some(ms) => (format!("{ms:.1}"), format!("{:.2}x", cluster_ms / ms)),
        None => ("-".into(), "-".into()),
    }
}
