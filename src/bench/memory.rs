//! `quiver bench memory`: TPC-H on data larger than each worker's memory limit (SF 10 against
//! 4 GiB, say). Every query must finish on the cluster, spilling where it must; the benchmark
//! reports each process's peak resident memory against its limit, and single-node DataFusion's
//! time under the same limit beside the cluster's.
//!
//! The coordinator and the workers are processes of this binary, so that each one's peak
//! memory (`VmHWM`) is its own. Single-node DataFusion runs in the benchmark's process, with a
//! memory pool of the same limit and DataFusion's spilling to the temporary directory.

use std::path::PathBuf;
use std::time::Instant;

use datafusion::arrow::array::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;

use super::procs::{spawn, speculated, start_coordinator, wait_for_workers, Proc};
use crate::config::{default_parallelism, session_config};
use crate::tpch;

#[derive(Debug, Clone)]
pub struct MemoryBench {
    pub sf: f64,
    pub workers: usize,
    pub queries: Vec<usize>,
    pub data_dir: PathBuf,
    /// Files per table (tpchgen's parts).
    pub files: usize,
    /// Each worker's `--memory-limit`, and single-node DataFusion's memory pool.
    pub memory_limit_bytes: u64,
    /// Session settings (`name=value`) the cluster's queries run with.
    pub settings: Vec<String>,
}

/// One query's outcome on one engine: its time and rows, or why it failed.
type Outcome = std::result::Result<(f64, usize), String>;

pub async fn run_memory(bench: &MemoryBench) -> Result<()> {
    // A malformed setting is refused before any data is generated or process started.
    let sets = bench.settings.iter().map(|setting| set_statement(setting)).collect::<Result<Vec<_>>>()?;
    let files = bench.files.max(1);
    let dir = tpch::generate(&bench.data_dir, bench.sf, tpch::Layout { files, ..tpch::Layout::for_scale(bench.sf) })?;
    let (exe, url, coordinator, client) = start_coordinator().await?;
    let slots = default_parallelism().div_ceil(bench.workers.max(1)).max(1).to_string();
    let limit = bench.memory_limit_bytes.to_string();
    let worker_args = ["worker", "--coordinator", &url, "--slots", &slots, "--memory-limit", &limit].map(String::from);
    let workers = (0..bench.workers).map(|_| spawn(&exe, &worker_args)).collect::<Result<Vec<_>>>()?;
    wait_for_workers(&client, bench.workers).await?;
    for sql in tpch::create_tables_sql(&dir) {
        client.collect(&sql).await?;
    }
    for sql in &sets {
        client.collect(sql).await?;
    }
    let single = single_node(bench.memory_limit_bytes)?;
    for sql in tpch::create_tables_sql(&dir) {
        single.sql(&sql).await?;
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "TPC-H SF {} ({} files per table) | {} workers x {slots} slots, each limited to {:.1} GiB | single node limited to the same{}",
        bench.sf,
        files,
        bench.workers,
        gib(bench.memory_limit_bytes),
        if bench.settings.is_empty() { String::new() } else { format!(" | cluster with {}", bench.settings.join(", ")) }
    );
    println!("{:>5} {:>12} {:>12} {:>7} {:>10} {:>11}", "query", "single_ms", "cluster_ms", "ratio", "rows", "speculated");
    let (mut single_total, mut cluster_total, mut failed, mut speculated_total) = (0.0, 0.0, 0, 0);
    for &q in &bench.queries {
        let sql = tpch::query_sql(q)?;
        let one = run_single(&single, &sql).await;
        let started = Instant::now();
        let cluster: Outcome = match client.collect(&sql).await {
            Ok((_, batches)) => Ok((started.elapsed().as_secs_f64() * 1e3, batches.iter().map(RecordBatch::num_rows).sum())),
            Err(e) => Err(e.to_string()),
        };
        if let (Ok((_, a)), Ok((_, b))) = (&one, &cluster) {
            if a != b {
                return Err(DataFusionError::Execution(format!("q{q}: single node returned {a} rows, the cluster {b}")));
            }
        }
        failed += usize::from(cluster.is_err());
        if let (Ok((s, _)), Ok((c, _))) = (&one, &cluster) {
            single_total += s;
            cluster_total += c;
        }
        // What speculation cost where nothing is slow but the data is large.
        let speculated = speculated(&client, &sql).await?;
        speculated_total += speculated;
        print_outcomes(q, &one, &cluster, speculated);
    }
    println!("{:>5} {:>12.1} {:>12.1} {:>6.2}x  (queries both finished)", "total", single_total, cluster_total, cluster_total / single_total);
    println!("cluster: {} of {} queries finished, {speculated_total} speculative Attempts", bench.queries.len() - failed, bench.queries.len());
    report_peaks(bench, &coordinator, &workers);
    Ok(())
}

/// `SET name = value` for a `--set name=value`.
fn set_statement(setting: &str) -> Result<String> {
    match setting.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => Ok(format!("SET {} = {}", name.trim(), value.trim())),
        _ => Err(DataFusionError::Configuration(format!("--set {setting}: expected NAME=VALUE"))),
    }
}

/// Single-node DataFusion with a memory pool of `limit` bytes; what does not fit spills.
fn single_node(limit: u64) -> Result<SessionContext> {
    let runtime = RuntimeEnvBuilder::new().with_memory_limit(limit as usize, 1.0).build_arc()?;
    Ok(SessionContext::new_with_config_rt(session_config(default_parallelism()), runtime))
}

async fn run_single(ctx: &SessionContext, sql: &str) -> Outcome {
    let started = Instant::now();
    let run = async { ctx.sql(sql).await?.execute_stream().await?.try_collect::<Vec<RecordBatch>>().await };
    match run.await {
        Ok(batches) => Ok((started.elapsed().as_secs_f64() * 1e3, batches.iter().map(RecordBatch::num_rows).sum())),
        Err(e) => Err(e.to_string()),
    }
}

fn print_outcomes(q: usize, single: &Outcome, cluster: &Outcome, speculated: u32) {
    let ms = |o: &Outcome| o.as_ref().map_or("failed".to_string(), |(ms, _)| format!("{ms:.1}"));
    let ratio = match (single, cluster) {
        (Ok((s, _)), Ok((c, _))) => format!("{:.2}x", c / s),
        _ => "-".into(),
    };
    let rows = cluster.as_ref().or(single.as_ref()).map_or(0, |(_, r)| *r);
    println!("{:>5} {:>12} {:>12} {:>7} {:>10} {:>11}", format!("q{q:02}"), ms(single), ms(cluster), ratio, rows, speculated);
    for (engine, outcome) in [("single node", single), ("cluster", cluster)] {
        if let Err(e) = outcome {
            println!("      {engine}: {}", e.lines().next().unwrap_or_default());
        }
    }
}

/// Each process's peak resident memory, from `/proc/PID/status`.
fn report_peaks(bench: &MemoryBench, coordinator: &Proc, workers: &[Proc]) {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let peak = |pid: &str| peak_rss_bytes(pid).map_or("unknown".to_string(), |b| format!("{:.2} GiB", gib(b)));
    println!("peak resident memory (VmHWM):");
    println!("  coordinator        {}", peak(&coordinator.0.id().to_string()));
    for (i, worker) in workers.iter().enumerate() {
        println!("  worker {i}           {} (limit {:.2} GiB)", peak(&worker.0.id().to_string()), gib(bench.memory_limit_bytes));
    }
    println!("  bench (single node) {} (pool limit {:.2} GiB)", peak("self"), gib(bench.memory_limit_bytes));
}

fn peak_rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
