//! Benchmarks, each comparing side by side in one run so that ratios mean something on a noisy
//! machine:
//! - `quiver bench tpch`: the same TPC-H queries on a local cluster and on single-node
//!   DataFusion, same data, same process, and on DuckDB when it is installed ([`duckdb`]);
//! - `quiver bench recovery`: each TPC-H query on a healthy local cluster, then again with one
//!   worker killed (as a crash would: no goodbye) part-way through and a new one started;
//! - `quiver bench straggler`: TPC-H on 2 worker processes, then with a third one throttled by
//!   `cpulimit`, speculation on and off ([`straggler`]);
//! - `quiver bench skew`: a shuffle join on Zipf-distributed keys against uniform keys, skew
//!   splitting on and off ([`skew`]);
//! - `quiver bench mixed`: small queries on an idle cluster and while a large one runs, with fair
//!   shares between Queries and first queued first ([`mixed`]);
//! - `quiver bench memory`: TPC-H on worker processes whose memory limits are well below the
//!   data, peak memory per process, single-node DataFusion under the same limit ([`memory`]);
//! - `quiver bench latency`: a small query's p50 and p99 over one connection, run on the
//!   coordinator and on the workers ([`latency`]).

mod duckdb;
mod latency;
mod memory;
mod mixed;
mod procs;
mod recovery;
mod skew;
mod straggler;
mod tpch;

use std::path::PathBuf;
use std::time::SystemTime;

use datafusion::arrow::array::RecordBatch;
use datafusion::common::Result;

use crate::client::Client;
use crate::cluster::{LocalCluster, LocalOptions};
use crate::config::{default_parallelism, CoordinatorConfig, WorkerConfig};

pub use latency::{run_latency, LatencyBench};
pub use memory::{run_memory, MemoryBench};
pub use mixed::{run_mixed, MixedBench};
pub use recovery::{run_recovery, RecoveryBench};
pub use skew::{run_skew, SkewBench};
pub use straggler::{run_straggler, StragglerBench};
pub use tpch::{run_tpch, Comparison, Row, TpchBench};

/// A local cluster of `workers` workers sharing the cores, with the TPC-H tables in `dir`.
pub(crate) async fn tpch_cluster(opts: LocalOptions, dir: &std::path::Path) -> Result<(LocalCluster, Client)> {
    let cluster = LocalCluster::start(opts).await?;
    let client = Client::connect(&cluster.url()).await?;
    for sql in crate::tpch::create_tables_sql(dir) {
        client.collect(&sql).await?;
    }
    Ok((cluster, client))
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
pub(crate) fn moved_bytes(cluster: &LocalCluster, sql: &str) -> (u64, u64) {
    let queries = cluster.coordinator.core.cluster.queries();
    let Some(last) = queries.iter().rev().find(|q| q.sql == sql) else { return (0, 0) };
    let family = |q: &&crate::coordinator::QueryRecord| q.id == last.id || q.id.starts_with(&format!("{}.", last.id));
    queries.iter().filter(family).fold((0, 0), |(s, g), q| (s + q.bytes_shuffled, g + q.bytes_gathered))
}

/// Slot time the last run of `sql` (with its scalar subqueries) left idle, and the slot time it
/// spanned, in ms: from its first Attempt's start to its last one's end, `slots` regular slots
/// minus what its Attempts in them ran. Idle slot time between Stages is what streaming from
/// Stage to Stage (pipelining) could at best put to use.
pub(crate) fn idle_slot_ms(cluster: &LocalCluster, sql: &str, slots: usize) -> (f64, f64) {
    let queries = cluster.coordinator.core.cluster.queries();
    let Some(last) = queries.iter().rev().find(|q| q.sql == sql) else { return (0.0, 0.0) };
    let family = |id: &str| id == last.id || id.starts_with(&format!("{}.", last.id));
    let tasks = cluster.coordinator.core.cluster.tasks();
    let ran: Vec<(SystemTime, SystemTime)> = tasks
        .iter()
        .filter(|t| family(&t.key.query_id) && t.lane == Some("regular"))
        .filter_map(|t| Some((t.started?, t.ended?)))
        .collect();
    let (Some(first), Some(last)) = (ran.iter().map(|r| r.0).min(), ran.iter().map(|r| r.1).max()) else { return (0.0, 0.0) };
    let ms = |from: SystemTime, to: SystemTime| to.duration_since(from).map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let busy: f64 = ran.iter().map(|&(from, to)| ms(from, to)).sum();
    let spanned = slots as f64 * ms(first, last);
    ((spanned - busy).max(0.0), spanned)
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

/// The rows of a result as sorted text lines, for comparing two runs.
pub(crate) fn sorted_rows(batches: &[RecordBatch]) -> Result<Vec<String>> {
    let text = datafusion::arrow::util::pretty::pretty_format_batches(batches)?.to_string();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    Ok(lines)
}
