//! Benchmarks, each comparing side by side in one run so that ratios mean something on a noisy
//! machine:
//! - `quiver bench tpch`: the same TPC-H queries on a local cluster and on single-node
//!   DataFusion, same data, same process;
//! - `quiver bench recovery`: each TPC-H query on a healthy local cluster, then again with one
//!   worker killed (as a crash would: no goodbye) part-way through and a new one started;
//! - `quiver bench straggler`: TPC-H on 2 worker processes, then with a third one throttled by
//!   `cpulimit`, speculation on and off ([`straggler`]);
//! - `quiver bench skew`: a shuffle join on Zipf-distributed keys against uniform keys, skew
//!   splitting on and off ([`skew`]);
//! - `quiver bench mixed`: small queries on an idle cluster and while a large one runs, with fair
//!   shares between Queries and first queued first ([`mixed`]);
//! - `quiver bench latency`: a small query's p50 and p99 over one connection, run on the
//!   coordinator and on the workers ([`latency`]).

mod latency;
mod mixed;
mod skew;
mod straggler;

use std::path::PathBuf;
use std::time::Instant;

use datafusion::arrow::array::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;

use crate::client::Client;
use crate::cluster::{LocalCluster, LocalOptions};
use crate::config::{default_parallelism, session_config, CoordinatorConfig, WorkerConfig};
use crate::tpch;

pub use latency::{run_latency, LatencyBench};
pub use mixed::{run_mixed, MixedBench};
pub use skew::{run_skew, SkewBench};
pub use straggler::{run_straggler, StragglerBench};

#[derive(Debug, Clone)]
pub struct TpchBench {
    pub sf: f64,
    pub workers: usize,
    pub queries: Vec<usize>,
    pub data_dir: PathBuf,
    /// Runs per query and engine; the fastest counts.
    pub iterations: usize,
}

pub struct Row {
    pub query: usize,
    pub single_ms: f64,
    pub cluster_ms: f64,
    pub rows: usize,
    /// Bytes of Task outputs moved worker to worker (shuffles) and read whole (broadcasts and
    /// the final gather), in the last run; subqueries' Queries included.
    pub shuffled_bytes: u64,
    pub gathered_bytes: u64,
}

pub async fn run_tpch(bench: &TpchBench) -> Result<Vec<Row>> {
    let dir = tpch::generate(&bench.data_dir, bench.sf, tpch::Layout::for_scale(bench.sf))?;
    let cores = default_parallelism();
    let single = SessionContext::new_with_config(session_config(cores));
    for sql in tpch::create_tables_sql(&dir) {
        single.sql(&sql).await?;
    }
    let (cluster, client, opts) = tpch_cluster(bench.workers, &dir).await?;
    println!("TPC-H SF {} | {} workers x {} slots | {} cores | best of {}", bench.sf, bench.workers, opts.worker.slots, cores, bench.iterations);
    println!("{:>5} {:>12} {:>12} {:>7} {:>8} {:>12} {:>12}", "query", "single_ms", "cluster_ms", "ratio", "rows", "shuffled_MB", "gathered_MB");
    let mut rows = Vec::new();
    for &q in &bench.queries {
        let sql = tpch::query_sql(q)?;
        let (mut single_ms, mut cluster_ms) = (f64::MAX, f64::MAX);
        let mut counts = (0, 0);
        for _ in 0..bench.iterations.max(1) {
            let started = Instant::now();
            let batches: Vec<RecordBatch> = single.sql(&sql).await?.execute_stream().await?.try_collect().await?;
            single_ms = single_ms.min(started.elapsed().as_secs_f64() * 1e3);
            counts.0 = batches.iter().map(|b| b.num_rows()).sum();
            let started = Instant::now();
            let (_, batches) = client.collect(&sql).await?;
            cluster_ms = cluster_ms.min(started.elapsed().as_secs_f64() * 1e3);
            counts.1 = batches.iter().map(|b| b.num_rows()).sum();
        }
        if counts.0 != counts.1 {
            return Err(DataFusionError::Execution(format!("q{q}: single node returned {} rows, cluster {}", counts.0, counts.1)));
        }
        let (shuffled_bytes, gathered_bytes) = moved_bytes(&cluster, &sql);
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "{:>5} {:>12.1} {:>12.1} {:>6.2}x {:>8} {:>12.1} {:>12.1}",
            format!("q{q:02}"),
            single_ms,
            cluster_ms,
            cluster_ms / single_ms,
            counts.0,
            mb(shuffled_bytes),
            mb(gathered_bytes)
        );
        rows.push(Row { query: q, single_ms, cluster_ms, rows: counts.0, shuffled_bytes, gathered_bytes });
    }
    let single_total: f64 = rows.iter().map(|r| r.single_ms).sum();
    let cluster_total: f64 = rows.iter().map(|r| r.cluster_ms).sum();
    println!("{:>5} {:>12.1} {:>12.1} {:>6.2}x", "total", single_total, cluster_total, cluster_total / single_total);
    cluster.shutdown().await;
    Ok(rows)
}

/// A local cluster of `workers` workers sharing the cores, with the TPC-H tables in `dir`.
async fn tpch_cluster(workers: usize, dir: &std::path::Path) -> Result<(LocalCluster, Client, LocalOptions)> {
    let opts = local_options(workers)?;
    let cluster = LocalCluster::start(opts.clone()).await?;
    let client = Client::connect(&cluster.url()).await?;
    for sql in tpch::create_tables_sql(dir) {
        client.collect(&sql).await?;
    }
    Ok((cluster, client, opts))
}

/// A local cluster of `workers` workers that share this machine's cores, in a fresh directory.
pub(crate) fn local_options(workers: usize) -> Result<LocalOptions> {
    Ok(LocalOptions {
        workers,
        worker: WorkerConfig { slots: default_parallelism().div_ceil(workers.max(1)).max(1), ..WorkerConfig::default() },
        coordinator: CoordinatorConfig::default(),
        data_dir: tempdir()?,
        listen: "127.0.0.1:0".parse().expect("valid address"),
        http: None,
    })
}

/// Bytes shuffled and gathered by the last run of `sql` and by the scalar subqueries it ran.
fn moved_bytes(cluster: &LocalCluster, sql: &str) -> (u64, u64) {
    let queries = cluster.coordinator.core.cluster.queries();
    let Some(last) = queries.iter().rev().find(|q| q.sql == sql) else { return (0, 0) };
    let family = |q: &&crate::coordinator::QueryRecord| q.id == last.id || q.id.starts_with(&format!("{}.", last.id));
    queries.iter().filter(family).fold((0, 0), |(s, g), q| (s + q.bytes_shuffled, g + q.bytes_gathered))
}

/// The `q` quantile of `times` (nearest rank).
pub(crate) fn percentile(times: &[f64], q: f64) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or(0.0)
}

pub(crate) fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("quiver-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[derive(Debug, Clone)]
pub struct RecoveryBench {
    pub sf: f64,
    pub workers: usize,
    pub queries: Vec<usize>,
    pub data_dir: PathBuf,
    /// When to kill a worker, as a fraction of the query's healthy time.
    pub kill_at: f64,
}

/// Runs each query healthy, then with a worker killed at `kill_at` of its healthy time and a
/// replacement started; checks that both return the same rows and prints the times.
pub async fn run_recovery(bench: &RecoveryBench) -> Result<()> {
    let dir = tpch::generate(&bench.data_dir, bench.sf, tpch::Layout::for_scale(bench.sf))?;
    let (mut cluster, client, opts) = tpch_cluster(bench.workers, &dir).await?;
    println!("TPC-H SF {} | {} workers x {} slots | one killed at {:.0}% of each query's healthy time", bench.sf, bench.workers, opts.worker.slots, bench.kill_at * 100.0);
    println!("{:>5} {:>12} {:>12} {:>7} {:>8} {:>8} {:>10}", "query", "healthy_ms", "killed_ms", "ratio", "rows", "retried", "recomputed");
    let (mut healthy_total, mut killed_total) = (0.0, 0.0);
    for (n, &q) in bench.queries.iter().enumerate() {
        let sql = tpch::query_sql(q)?;
        client.collect(&sql).await?; // warm the file cache
        let started = Instant::now();
        let (_, healthy) = client.collect(&sql).await?;
        let healthy_ms = started.elapsed().as_secs_f64() * 1e3;
        let live: Vec<usize> = (0..cluster.workers.len()).filter(|&i| cluster.workers[i].is_some()).collect();
        let victim = live[n % live.len()];
        let started = Instant::now();
        let running = {
            let (client, sql) = (client.clone(), sql.clone());
            tokio::spawn(async move { client.collect(&sql).await })
        };
        tokio::time::sleep(std::time::Duration::from_secs_f64(healthy_ms * bench.kill_at / 1e3)).await;
        cluster.kill_worker(victim);
        cluster.add_worker().await?;
        let (_, killed) = running.await.map_err(|e| DataFusionError::Execution(e.to_string()))??;
        let killed_ms = started.elapsed().as_secs_f64() * 1e3;
        if sorted_rows(&healthy)? != sorted_rows(&killed)? {
            return Err(DataFusionError::Execution(format!("q{q}: the run with a killed worker returned other rows")));
        }
        let last = cluster.coordinator.core.cluster.queries().into_iter().rev().find(|r| r.sql == sql);
        let (retried, recomputed) = last.map_or((0, 0), |r| (r.attempts_retried, r.tasks_recomputed));
        println!(
            "{:>5} {:>12.1} {:>12.1} {:>6.2}x {:>8} {:>8} {:>10}",
            format!("q{q:02}"),
            healthy_ms,
            killed_ms,
            killed_ms / healthy_ms,
            healthy.iter().map(|b| b.num_rows()).sum::<usize>(),
            retried,
            recomputed
        );
        healthy_total += healthy_ms;
        killed_total += killed_ms;
        cluster.wait_for_workers(bench.workers).await?;
    }
    println!("{:>5} {:>12.1} {:>12.1} {:>6.2}x", "total", healthy_total, killed_total, killed_total / healthy_total);
    cluster.shutdown().await;
    Ok(())
}

/// The rows of a result as sorted text lines, for comparing two runs.
pub(crate) fn sorted_rows(batches: &[RecordBatch]) -> Result<Vec<String>> {
    let text = datafusion::arrow::util::pretty::pretty_format_batches(batches)?.to_string();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    Ok(lines)
}
