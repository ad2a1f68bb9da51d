//! `quiver bench recovery`: each TPC-H query on a healthy local cluster, then again with one
//! worker killed (as a crash would: no goodbye) part-way through and a new one started.

use std::path::PathBuf;
use std::time::Instant;

use datafusion::common::{DataFusionError, Result};

use super::{local_options, sorted_rows, tpch_cluster};
use crate::tpch;

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
    let opts = local_options(bench.workers)?;
    let (mut cluster, client) = tpch_cluster(opts.clone(), &dir).await?;
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
