//! Quiver processes of this binary for the benchmarks that need real processes (a throttled
//! worker, each process's own peak memory): started, waited for, and killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;
use datafusion::common::{DataFusionError, Result};

use super::tempdir;
use crate::client::Client;

/// How long the cluster may take to come up or to see a new worker.
const STARTUP_DEADLINE_MS: u64 = 30_000;
const STARTUP_POLL_MS: u64 = 100;

/// A child process killed when dropped.
pub(super) struct Proc(pub(super) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn spawn(program: &Path, args: &[String]) -> Result<Proc> {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| DataFusionError::Execution(format!("cannot start {} {}: {e}", program.display(), args.join(" "))))?;
    Ok(Proc(child))
}

/// The one `count(*)` a query returns.
pub(super) async fn count(client: &Client, sql: &str) -> Result<i64> {
    let (_, batches) = client.collect(sql).await?;
    let value = batches.first().and_then(|b| b.column(0).as_primitive_opt::<Int64Type>().map(|a| a.value(0)));
    value.ok_or_else(|| DataFusionError::Execution(format!("no count from {sql}")))
}

/// Speculative Attempts of the last run of `sql`, its scalar subqueries' included.
pub(super) async fn speculated(client: &Client, sql: &str) -> Result<u32> {
    let escaped = sql.replace('\'', "''");
    let last = format!("(SELECT query_id FROM quiver.queries WHERE sql = '{escaped}' ORDER BY started DESC LIMIT 1)");
    let sql = format!("SELECT count(*) FROM quiver.tasks WHERE started_as = 'speculative' AND query_id LIKE {last} || '%'");
    Ok(count(client, &sql).await? as u32)
}

pub(super) async fn connect(url: &str) -> Result<Client> {
    let deadline = Instant::now() + Duration::from_millis(STARTUP_DEADLINE_MS);
    loop {
        match Client::connect(url).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(STARTUP_POLL_MS)).await,
        }
    }
}

pub(super) async fn wait_for_workers(client: &Client, n: usize) -> Result<()> {
    wait_for_live(client, |live| live >= n, &format!("{n} workers did not register")).await
}

/// Waits until no more than `n` workers are alive: one killed was seen to be lost.
pub(super) async fn wait_for_workers_at_most(client: &Client, n: usize) -> Result<()> {
    wait_for_live(client, |live| live <= n, "a killed worker was not lost").await
}

/// Waits until the count of live workers satisfies `done`; else fails with `failure`.
async fn wait_for_live(client: &Client, done: impl Fn(usize) -> bool, failure: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_millis(STARTUP_DEADLINE_MS);
    loop {
        if done(count(client, "SELECT count(*) FROM quiver.workers WHERE alive").await?.max(0) as usize) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DataFusionError::Execution(format!("{failure} within {STARTUP_DEADLINE_MS} ms")));
        }
        tokio::time::sleep(Duration::from_millis(STARTUP_POLL_MS)).await;
    }
}

/// A coordinator process of this binary on a free loopback port, with a fresh data directory,
/// and a client connected to it. Returns the binary (for the workers), its URL, the process and
/// the client.
pub(super) async fn start_coordinator() -> Result<(PathBuf, String, Proc, Client)> {
    let exe = std::env::current_exe()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}");
    let data = tempdir()?;
    let args = ["coordinator", "--listen", &format!("127.0.0.1:{port}"), "--data-dir", &data.display().to_string()];
    let coordinator = spawn(&exe, &args.map(String::from))?;
    let client = connect(&url).await?;
    Ok((exe, url, coordinator, client))
}
