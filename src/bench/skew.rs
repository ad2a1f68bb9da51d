//! `quiver bench skew`: a shuffle join whose key follows a Zipf law, against the same join on
//! uniform keys of the same size, with skew splitting on and off.
//!
//! `facts` holds `rows` rows whose key is drawn from a (continuous) Zipf law of exponent `zipf`
//! over `keys` keys, so that one key holds a large share of the rows; `uniform` holds as many
//! rows with evenly spread keys; `dims` holds one row per key. The query joins facts with dims
//! on the key and aggregates by a column of dims. Joins are forced to be partitioned (a
//! broadcast of dims would make skew irrelevant), with `partitions` shuffle partitions. The data
//! is generated once, deterministically, by single-node DataFusion, and kept in `data_dir`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Int64Type, UInt64Type};
use datafusion::common::{DataFusionError, Result};
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;

use super::{local_options, sorted_rows};
use crate::client::Client;
use crate::cluster::LocalCluster;
use crate::config::{default_parallelism, session_config};

#[derive(Debug, Clone)]
pub struct SkewBench {
    pub rows: u64,
    pub keys: u64,
    pub zipf: f64,
    pub workers: usize,
    /// Shuffle partitions (`datafusion.execution.target_partitions` of the session).
    pub partitions: usize,
    pub data_dir: PathBuf,
    /// Runs per variant; the fastest counts.
    pub iterations: usize,
}

/// Files per table: each scan is cut into several Tasks, the producers a split divides.
const FILES_PER_TABLE: u64 = 4;

/// The query: every fact row finds its key in dims.
const QUERY: &str = "SELECT d.g, count(*) AS n, sum(f.v) AS s FROM {facts} f JOIN dims d ON f.k = d.k GROUP BY d.g ORDER BY d.g";

/// One variant's result.
struct Outcome {
    ms: f64,
    rows: Vec<String>,
    /// Elapsed time of the join Stage's slowest and median Task, in the fastest run.
    slowest_task_ms: u64,
    median_task_ms: u64,
    split: u32,
    /// Speculative Attempts started, in the fastest run: a skewed Task left whole is weighed by
    /// its bytes and should not count as a straggler.
    speculated: u32,
}

pub async fn run_skew(bench: &SkewBench) -> Result<()> {
    let dir = generate(bench).await?;
    let opts = local_options(bench.workers)?;
    let cluster = LocalCluster::start(opts.clone()).await?;
    let client = Client::connect(&cluster.url()).await?;
    let settings = session_settings(bench.partitions);
    for sql in tables_sql(&dir).iter().chain(&settings) {
        client.collect(sql).await?;
    }
    let hot = hot_share(&client).await?;
    println!(
        "skew: {} fact rows over {} keys, Zipf {} (hottest key {:.0}% of rows) | {} workers x {} slots | {} partitions | best of {}",
        bench.rows, bench.keys, bench.zipf, hot * 100.0, bench.workers, opts.worker.slots, bench.partitions, bench.iterations
    );
    let variants: [(&str, &str, &[&str]); 3] = [
        ("uniform", "uniform", &["SET quiver.skew_split = true"]),
        ("skewed", "facts", &["SET quiver.skew_split = true"]),
        ("skewed_no_split", "facts", &["SET quiver.skew_split = false"]),
    ];
    let mut outcomes = Vec::new();
    for (_, table, set) in variants {
        for sql in set.iter() {
            client.collect(sql).await?;
        }
        outcomes.push(run_variant(&client, &QUERY.replace("{facts}", table), bench.iterations).await?);
    }
    if outcomes[1].rows != outcomes[2].rows {
        return Err(DataFusionError::Execution("skew splitting changed the answer".into()));
    }
    let single_ms = single_node(&dir, bench, &QUERY.replace("{facts}", "facts"), &outcomes[1].rows).await?;
    println!("{:>16} {:>10} {:>10} {:>16} {:>15} {:>6} {:>11}", "variant", "ms", "ratio", "slowest_task_ms", "median_task_ms", "split", "speculated");
    for ((name, _, _), o) in variants.iter().zip(&outcomes) {
        let ratio = o.ms / outcomes[0].ms;
        println!("{name:>16} {:>10.1} {ratio:>9.2}x {:>16} {:>15} {:>6} {:>11}", o.ms, o.slowest_task_ms, o.median_task_ms, o.split, o.speculated);
    }
    println!("{:>16} {:>10.1} {:>9.2}x   (single-node DataFusion, skewed)", "single_node", single_ms, single_ms / outcomes[0].ms);
    println!("skew handling: {:.2}x faster than without it", outcomes[2].ms / outcomes[1].ms);
    cluster.shutdown().await;
    Ok(())
}

/// Settings every variant runs under.
fn session_settings(partitions: usize) -> Vec<String> {
    vec![
        "SET datafusion.optimizer.hash_join_single_partition_threshold = 0".into(),
        "SET datafusion.optimizer.hash_join_single_partition_threshold_rows = 0".into(),
        format!("SET datafusion.execution.target_partitions = {partitions}"),
    ]
}

fn tables_sql(dir: &Path) -> Vec<String> {
    ["facts", "uniform", "dims"]
        .iter()
        .map(|t| format!("CREATE EXTERNAL TABLE IF NOT EXISTS {t} STORED AS PARQUET LOCATION '{}/'", dir.join(t).display()))
        .collect()
}

async fn run_variant(client: &Client, sql: &str, iterations: usize) -> Result<Outcome> {
    let mut best: Option<Outcome> = None;
    for _ in 0..iterations.max(1) {
        let started = Instant::now();
        let (_, batches) = client.collect(sql).await?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if best.as_ref().is_some_and(|b| b.ms <= ms) {
            continue;
        }
        let (slowest_task_ms, median_task_ms, split, speculated) = join_tasks(client, sql).await?;
        best = Some(Outcome { ms, rows: sorted_rows(&batches)?, slowest_task_ms, median_task_ms, split, speculated });
    }
    best.ok_or_else(|| DataFusionError::Execution("no run".into()))
}

/// The slowest and median Task of the last run's join Stage, the partitions it split, and the
/// Query's speculative Attempts.
async fn join_tasks(client: &Client, sql: &str) -> Result<(u64, u64, u32, u32)> {
    let escaped = sql.replace('\'', "''");
    let last = format!("(SELECT query_id FROM quiver.queries WHERE sql = '{escaped}' ORDER BY started DESC LIMIT 1)");
    let tasks = format!(
        "SELECT elapsed_ms FROM quiver.tasks WHERE query_id = {last} AND plan LIKE '%HashJoinExec%' AND state = 'succeeded' ORDER BY elapsed_ms"
    );
    let (_, batches) = client.collect(&tasks).await?;
    let times: Vec<u64> = batches.iter().flat_map(|b| b.column(0).as_primitive::<UInt64Type>().values().to_vec()).collect();
    let counts = format!("SELECT CAST(partitions_split AS BIGINT), CAST(attempts_speculated AS BIGINT) FROM quiver.queries WHERE query_id = {last}");
    let (_, batches) = client.collect(&counts).await?;
    let count = |column: usize| batches.first().map_or(0, |b| b.column(column).as_primitive::<Int64Type>().value(0)) as u32;
    let (split, speculated) = (count(0), count(1));
    let slowest = times.last().copied().unwrap_or(0);
    let median = times.get(times.len().saturating_sub(1) / 2).copied().unwrap_or(0);
    Ok((slowest, median, split, speculated))
}

/// The hottest key's share of the fact rows.
async fn hot_share(client: &Client) -> Result<f64> {
    let sql = "SELECT CAST(max(n) AS DOUBLE) / CAST(sum(n) AS DOUBLE) FROM (SELECT count(*) AS n FROM facts GROUP BY k)";
    let (_, batches) = client.collect(sql).await?;
    let share = batches.first().map(|b| b.column(0).as_primitive::<datafusion::arrow::datatypes::Float64Type>().value(0));
    share.ok_or_else(|| DataFusionError::Execution("no share".into()))
}

/// The skewed query on single-node DataFusion with the same settings: its time, and a check
/// that it agrees with the cluster.
async fn single_node(dir: &Path, bench: &SkewBench, sql: &str, expected: &[String]) -> Result<f64> {
    let ctx = SessionContext::new_with_config(session_config(default_parallelism()));
    for sql in tables_sql(dir).iter().chain(&session_settings(bench.partitions)) {
        ctx.sql(sql).await?.collect().await?;
    }
    let mut best = f64::MAX;
    for _ in 0..bench.iterations.max(1) {
        let started = Instant::now();
        let batches: Vec<RecordBatch> = ctx.sql(sql).await?.execute_stream().await?.try_collect().await?;
        best = best.min(started.elapsed().as_secs_f64() * 1e3);
        if sorted_rows(&batches)? != expected {
            return Err(DataFusionError::Execution("single-node DataFusion returned other rows than the cluster".into()));
        }
    }
    Ok(best)
}

/// Writes the three tables once and returns their directory.
async fn generate(bench: &SkewBench) -> Result<PathBuf> {
    let dir = bench.data_dir.join(format!("skew-{}-{}-{}", bench.rows, bench.keys, bench.zipf));
    if dir.join("done").exists() {
        return Ok(dir);
    }
    let ctx = SessionContext::new_with_config(session_config(4));
    // A deterministic uniform number in [0, 1) per row, from a multiplicative hash.
    let u = "(CAST((value * 2654435761) % 4294967296 AS DOUBLE) / 4294967296.0)";
    // Inverse of the continuous Zipf (power-law) CDF over [1, keys + 1), minus one.
    let (s, keys) = (bench.zipf, bench.keys as f64);
    let zipf_key = format!("CAST(floor(power(1.0 + {u} * (power({keys} + 1.0, 1.0 - {s}) - 1.0), 1.0 / (1.0 - {s}))) AS BIGINT) - 1");
    let uniform_key = format!("CAST(floor({u} * {keys}) AS BIGINT)");
    let tables = [
        ("facts", zipf_key.as_str(), bench.rows),
        ("uniform", uniform_key.as_str(), bench.rows),
        ("dims", "value", bench.keys),
    ];
    for (name, key, rows) in tables {
        let path = dir.join(name);
        std::fs::create_dir_all(&path)?;
        let value = if name == "dims" { "value % 100 AS g" } else { "value AS v" };
        for file in 0..FILES_PER_TABLE {
            let (from, to) = (rows * file / FILES_PER_TABLE, rows * (file + 1) / FILES_PER_TABLE);
            let select = format!("SELECT {key} AS k, {value} FROM generate_series({from}, {to} - 1)");
            let copy = format!("COPY ({select}) TO '{}/part-{file}.parquet' STORED AS PARQUET", path.display());
            ctx.sql(&copy).await?.collect().await?;
        }
    }
    std::fs::write(dir.join("done"), b"")?;
    Ok(dir)
}
