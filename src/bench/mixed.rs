//! `quiver bench mixed`: small queries while a large one runs. Each small query's latency is
//! measured on an idle cluster, then while a large TPC-H query runs over and over, with the
//! coordinator's queue handing Tasks out by fair shares between Queries and then first queued
//! first. The large query keeps every slot busy; what a small query waits for is a slot.
//!
//! Small queries arrive at a fixed rate whatever the previous ones did (an open loop): one run
//! after another would start most of them right after the large query let go of the slots, and
//! hide how long the others wait.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use datafusion::common::{DataFusionError, Result};

use super::{local_options, percentile as pct};
use crate::client::Client;
use crate::cluster::LocalCluster;
use crate::tpch;

#[derive(Debug, Clone)]
pub struct MixedBench {
    pub sf: f64,
    pub workers: usize,
    /// The TPC-H query that loads the cluster.
    pub large: usize,
    /// Runs of each small query per measurement.
    pub samples: usize,
    pub data_dir: std::path::PathBuf,
}

/// The small queries: a one-row aggregate and a point lookup.
const SMALL: [&str; 2] =
    ["SELECT count(*) FROM nation", "SELECT o_orderstatus, o_totalprice FROM orders WHERE o_orderkey = 4242"];

pub async fn run_mixed(bench: &MixedBench) -> Result<()> {
    let dir = tpch::generate(&bench.data_dir, bench.sf, tpch::Layout::for_scale(bench.sf))?;
    let large = tpch::query_sql(bench.large)?;
    println!(
        "mixed load: TPC-H SF {} | {} workers | q{:02} running over and over | {} samples per small query",
        bench.sf, bench.workers, bench.large, bench.samples
    );
    println!("{:>10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8} {:>11}", "queue", "query", "idle_p50", "idle_p95", "busy_p50", "busy_p95", "p95_x", "large_runs");
    for fair_share in [true, false] {
        let mut opts = local_options(bench.workers)?;
        opts.coordinator.fair_share = fair_share;
        let cluster = LocalCluster::start(opts).await?;
        let client = Client::connect(&cluster.url()).await?;
        for sql in tpch::create_tables_sql(&dir) {
            client.collect(&sql).await?;
        }
        client.collect(&large).await?; // warm the file cache
        for (n, small) in SMALL.iter().enumerate() {
            let idle = latencies(&client, small, bench.samples).await?;
            let (busy, large_runs) = under_load(&cluster, &client, &large, small, bench.samples).await?;
            let (i50, i95, b50, b95) = (pct(&idle, 0.5), pct(&idle, 0.95), pct(&busy, 0.5), pct(&busy, 0.95));
            let queue = if fair_share { "fair" } else { "fifo" };
            println!("{queue:>10} {:>8} {i50:>10.1} {i95:>10.1} {b50:>10.1} {b95:>10.1} {:>7.1}x {large_runs:>11}", format!("small{}", n + 1), b95 / i95);
        }
        cluster.shutdown().await;
    }
    Ok(())
}

/// Latencies in ms of `samples` runs of `sql`, started every [`ARRIVAL_INTERVAL_MS`].
async fn latencies(client: &Client, sql: &str, samples: usize) -> Result<Vec<f64>> {
    let start = tokio::time::Instant::now();
    let runs: Vec<_> = (0..samples.max(1))
        .map(|i| {
            let (client, sql) = (client.clone(), sql.to_string());
            let at = start + std::time::Duration::from_millis(ARRIVAL_INTERVAL_MS * i as u64);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let started = Instant::now();
                client.collect(&sql).await?;
                Ok::<_, DataFusionError>(started.elapsed().as_secs_f64() * 1e3)
            })
        })
        .collect();
    let mut times = Vec::with_capacity(runs.len());
    for run in runs {
        times.push(run.await.map_err(|e| DataFusionError::Execution(e.to_string()))??);
    }
    Ok(times)
}

/// Small queries arrive this often, whether the previous ones have finished or not.
const ARRIVAL_INTERVAL_MS: u64 = 50;

/// The small query's latencies while the large one runs in a loop on a connection of its own,
/// and how many times the large one finished meanwhile.
async fn under_load(cluster: &LocalCluster, client: &Client, large: &str, small: &str, samples: usize) -> Result<(Vec<f64>, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU64::new(0));
    let loader = {
        let (client, large) = (Client::connect(&cluster.url()).await?, large.to_string());
        let (stop, runs) = (Arc::clone(&stop), Arc::clone(&runs));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                client.collect(&large).await?;
                runs.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, DataFusionError>(())
        })
    };
    // Let the large query fill the slots first.
    tokio::time::sleep(std::time::Duration::from_millis(LOAD_SETTLE_MS)).await;
    let times = latencies(client, small, samples).await;
    stop.store(true, Ordering::Relaxed);
    loader.await.map_err(|e| DataFusionError::Execution(e.to_string()))??;
    Ok((times?, runs.load(Ordering::Relaxed)))
}

/// How long the large query runs before the small ones start.
const LOAD_SETTLE_MS: u64 = 300;

