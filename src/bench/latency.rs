//! `quiver bench latency`: how long a small query takes through the whole cluster. One
//! persistent Flight SQL connection to a local cluster, one query after another: a one-row
//! aggregate and a point lookup over a 3-row table, p50 and p99. Side by side: small queries run
//! on the coordinator alone (the default) and distributed to the workers
//! (`--small-query-max-bytes 0`), each on a fresh cluster.

use std::time::Instant;

use datafusion::common::Result;

use super::{local_options, percentile};
use crate::client::Client;
use crate::cluster::LocalCluster;
use crate::config::PlannerConfig;

#[derive(Debug, Clone)]
pub struct LatencyBench {
    pub workers: usize,
    /// Timed runs of each query per placement.
    pub samples: usize,
}

/// The small queries, by name.
const QUERIES: [(&str, &str); 2] = [("aggregate", "SELECT sum(k) FROM tiny"), ("lookup", "SELECT v FROM tiny WHERE k = 2")];
/// Untimed runs first: connections, caches and the file's metadata warm up.
const WARMUP_RUNS: usize = 10;

pub async fn run_latency(bench: &LatencyBench) -> Result<()> {
    println!("latency: local cluster of {} workers | one Flight SQL connection | {} runs per query", bench.workers, bench.samples);
    println!("{:>12} {:>10} {:>8} {:>8} {:>8}", "placement", "query", "p50_ms", "p99_ms", "max_ms");
    let placements = [("coordinator", PlannerConfig::default().small_query_max_bytes), ("workers", 0)];
    for (placement, small_query_max_bytes) in placements {
        let mut opts = local_options(bench.workers)?;
        opts.coordinator.planner.small_query_max_bytes = small_query_max_bytes;
        let cluster = LocalCluster::start(opts).await?;
        let client = Client::connect(&cluster.url()).await?;
        client.collect("CREATE TABLE tiny AS SELECT * FROM (VALUES (1, 'a'), (2, 'b'), (3, 'c')) AS t(k, v)").await?;
        for (name, sql) in QUERIES {
            for _ in 0..WARMUP_RUNS {
                client.collect(sql).await?;
            }
            let mut times = Vec::with_capacity(bench.samples);
            for _ in 0..bench.samples.max(1) {
                let started = Instant::now();
                client.collect(sql).await?;
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
            let (p50, p99, max) = (percentile(&times, 0.5), percentile(&times, 0.99), percentile(&times, 1.0));
            println!("{placement:>12} {name:>10} {p50:>8.2} {p99:>8.2} {max:>8.2}");
        }
        cluster.shutdown().await;
    }
    Ok(())
}
