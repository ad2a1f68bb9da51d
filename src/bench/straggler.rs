//! `quiver bench straggler`: does a slow worker make the cluster slower than not having it?
//!
//! Real processes (a coordinator and worker processes of this binary), so that one worker can be
//! throttled with `cpulimit` (Debian package `cpulimit`), or, with `--delay-ms`, slowed by a wait
//! before each Attempt, which does not depend on the machine's load. Each round runs every
//! TPC-H query, in one session: on 2 healthy workers; then with a third worker held to a share
//! of one core, with the default adaptive mechanisms, with its stalls counted in its pace, with
//! dynamic granularity off, with speculation off, and with slow-worker placement off too; the
//! third worker leaves at the round's end. The fastest of the rounds counts. Answers must agree
//! across all of them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Float64Type;
use datafusion::common::{DataFusionError, Result};

use super::procs::{speculated, spawn, start_coordinator, wait_for_workers, wait_for_workers_at_most, Proc};
use super::sorted_rows;
use crate::client::Client;
use crate::config::default_parallelism;
use crate::tpch;

#[derive(Debug, Clone)]
pub struct StragglerBench {
    pub sf: f64,
    pub queries: Vec<usize>,
    pub data_dir: PathBuf,
    /// The slow worker's share of one core, in percent.
    pub throttle_percent: u32,
    /// When set, the slow worker waits this long before each Attempt (`--task-delay-ms`)
    /// instead of being throttled.
    pub delay_ms: Option<u64>,
    /// Rounds, each running every query once in every configuration; the fastest counts.
    pub iterations: usize,
}

/// The configurations with the slow worker: a name and the settings that make it.
const THROTTLED: [(&str, &[&str]); 5] = [
    ("adaptive", &[]),
    ("stalls", &["SET quiver.slow_worker_stalls = true"]),
    ("no_cuts", &["SET quiver.dynamic_granularity = false"]),
    ("no_spec", &["SET quiver.speculation = false"]),
    ("neither", &["SET quiver.speculation = false", "SET quiver.slow_worker_placement = false"]),
];

pub async fn run_straggler(bench: &StragglerBench) -> Result<()> {
    let dir = tpch::generate(&bench.data_dir, bench.sf, tpch::Layout::for_scale(bench.sf))?;
    let (exe, url, _coordinator, client) = start_coordinator().await?;
    let slots = default_parallelism().div_ceil(2).max(1).to_string();
    let worker_args = ["worker", "--coordinator", &url, "--slots", &slots].map(String::from);
    let _healthy = [spawn(&exe, &worker_args)?, spawn(&exe, &worker_args)?];
    wait_for_workers(&client, 2).await?;
    for sql in tpch::create_tables_sql(&dir) {
        client.collect(&sql).await?;
    }
    let slow = match bench.delay_ms {
        Some(ms) => format!("waiting {ms} ms before each Attempt"),
        None => format!("at {}% of a core", bench.throttle_percent),
    };
    println!("TPC-H SF {} | workers x {slots} slots | third worker {slow} | best of {} rounds", bench.sf, bench.iterations);
    let delay = bench.delay_ms.map(|ms| ["--task-delay-ms".to_string(), ms.to_string()]);
    let slow_args: Vec<String> = worker_args.iter().cloned().chain(delay.into_iter().flatten()).collect();
    let mut best: Vec<Vec<Run>> = Vec::new();
    for _ in 0..bench.iterations.max(1) {
        let round = run_round(&exe, &slow_args, &client, bench).await?;
        best = keep_fastest(best, round)?;
    }
    report(bench, &best)
}

/// One round: every query on the 2 healthy workers, then, with the slow worker added, in each
/// configuration of [`THROTTLED`]; the slow worker is taken out again at its end. Rounds, not
/// configurations, repeat, so that the machine's drift over a run (it moved the two-worker
/// times by up to 40% here) spreads over every configuration instead of favouring the first.
async fn run_round(exe: &Path, slow_args: &[String], client: &Client, bench: &StragglerBench) -> Result<Vec<Vec<Run>>> {
    set_all(client, &[]).await?;
    let mut runs = vec![run_all(client, bench).await?];
    let mut slow = spawn(exe, slow_args)?;
    wait_for_workers(client, 3).await?;
    let throttle = match bench.delay_ms {
        Some(_) => None,
        None => Some(throttle(slow.0.id(), bench.throttle_percent)?),
    };
    for (_, settings) in THROTTLED {
        set_all(client, settings).await?;
        runs.push(run_all(client, bench).await?);
    }
    drop(throttle);
    let _ = slow.0.kill();
    wait_for_workers_at_most(client, 2).await?;
    Ok(runs)
}

/// Every mechanism a configuration may switch back to its default, then `settings`: the session keeps
/// what the previous configuration (or round) set.
async fn set_all(client: &Client, settings: &[&str]) -> Result<()> {
    let defaults = [
        "SET quiver.speculation = true",
        "SET quiver.slow_worker_placement = true",
        "SET quiver.slow_worker_stalls = false",
        "SET quiver.dynamic_granularity = true",
    ];
    for sql in defaults.iter().chain(settings) {
        client.collect(sql).await?;
    }
    Ok(())
}

/// Per configuration and query, the faster of two rounds' runs; their answers must agree.
fn keep_fastest(best: Vec<Vec<Run>>, round: Vec<Vec<Run>>) -> Result<Vec<Vec<Run>>> {
    if best.is_empty() {
        return Ok(round);
    }
    let mut kept = Vec::with_capacity(round.len());
    for (old, new) in best.into_iter().zip(round) {
        let mut config = Vec::with_capacity(new.len());
        for (old, new) in old.into_iter().zip(new) {
            if old.rows != new.rows {
                return Err(DataFusionError::Execution("two rounds of one query returned other rows".into()));
            }
            config.push(if new.ms < old.ms { new } else { old });
        }
        kept.push(config);
    }
    Ok(kept)
}

/// One configuration's result for one query: its time, rows as text, speculative Attempts,
/// and the slowest worker's pace after it (what slow-worker placement knew).
struct Run {
    ms: f64,
    rows: Vec<String>,
    speculated: u32,
    pace: f64,
}

async fn run_all(client: &Client, bench: &StragglerBench) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for &q in &bench.queries {
        let sql = tpch::query_sql(q)?;
        let started = Instant::now();
        let (_, batches) = client.collect(&sql).await?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let rows = sorted_rows(&batches)?;
        let speculated = speculated(client, &sql).await?;
        let pace = slowest_pace(client).await?;
        runs.push(Run { ms, rows, speculated, pace });
    }
    Ok(runs)
}

/// The pace of the slowest live worker (1: typical).
async fn slowest_pace(client: &Client) -> Result<f64> {
    let (_, batches) = client.collect("SELECT max(pace) FROM quiver.workers WHERE alive").await?;
    let value = batches.first().and_then(|b| b.column(0).as_primitive_opt::<Float64Type>().map(|a| a.value(0)));
    value.ok_or_else(|| DataFusionError::Execution("no pace in quiver.workers".into()))
}

/// Times per query and configuration, each as a ratio to 2 healthy workers.
fn report(bench: &StragglerBench, runs: &[Vec<Run>]) -> Result<()> {
    let names: Vec<&str> = THROTTLED.iter().map(|(name, _)| *name).collect();
    print!("{:>5} {:>10}", "query", "two_ms");
    for name in &names {
        print!(" {:>12} {:>7}", format!("{name}_ms"), "ratio");
    }
    println!(" {:>11} {:>8} {:>8}", "speculated", "pace_on", "pace_off");
    // Without speculation every Attempt runs to its end: the slow worker's pace counts them whole.
    let no_spec = 1 + THROTTLED.iter().position(|(name, _)| *name == "no_spec").expect("a configuration without speculation");
    let mut totals = vec![0.0; runs.len()];
    for (i, q) in bench.queries.iter().enumerate() {
        let two = &runs[0][i];
        print!("{:>5} {:>10.1}", format!("q{q:02}"), two.ms);
        for (n, config) in runs.iter().enumerate().skip(1) {
            let run = &config[i];
            if run.rows != two.rows {
                return Err(DataFusionError::Execution(format!("q{q}: '{}' returned other rows than 2 workers", names[n - 1])));
            }
            print!(" {:>12.1} {:>6.2}x", run.ms, run.ms / two.ms);
        }
        println!(" {:>11} {:>8.2} {:>8.2}", runs[1][i].speculated, runs[1][i].pace, runs[no_spec][i].pace);
        for (total, config) in totals.iter_mut().zip(runs) {
            *total += config[i].ms;
        }
    }
    print!("{:>5} {:>10.1}", "total", totals[0]);
    for total in &totals[1..] {
        print!(" {:>12.1} {:>6.2}x", total, total / totals[0]);
    }
    println!();
    Ok(())
}

fn throttle(pid: u32, percent: u32) -> Result<Proc> {
    let args = ["--limit".to_string(), percent.to_string(), "--pid".into(), pid.to_string(), "--lazy".into()];
    spawn(Path::new("cpulimit"), &args)
        .map_err(|e| DataFusionError::Execution(format!("{e}: install cpulimit (Debian package cpulimit)")))
}
