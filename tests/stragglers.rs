//! A slow worker does not hold Queries back: real `quiver coordinator` and `quiver worker`
//! processes, one worker throttled with `cpulimit`. Its Tasks get speculative Attempts on the
//! other workers, the first Attempt to succeed wins, and the answers stay exact; the coordinator
//! learns the worker is slow (its pace; that test slows the worker with `--task-delay-ms`
//! instead, so its pace does not depend on the machine's load), and learns it too of a worker
//! whose process is stopped most of the time. A worker that stalls longer
//! than the test has its superseded Attempts stopped and its slots back. With
//! `SET quiver.speculation = false` nothing is speculated.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::procs::ProcCluster;
use common::*;
use quiver::client::Client;
use quiver::tpch::{self, Layout};

const WORKER_ARGS: [&str; 4] = ["--slots", "2", "--memory-limit", "1GiB"];
const SMALL_TASKS: [&str; 4] = ["--task-min-bytes", "1", "--tasks-per-slot", "2"];
/// The slow worker's share of one core, in percent.
const THROTTLE_PERCENT: &str = "5";
/// How long the slow worker of the pace test waits before each Attempt: many times any Task's
/// run time here, even on a loaded machine.
const SLOW_WORKER_DELAY_MS: &str = "1000";
/// How long the stalled worker of the stop test waits before each Attempt: longer than the
/// test may take, so that only stopping its Attempts frees its slots in time.
const STALLED_WORKER_DELAY_MS: u64 = 600_000;
/// How soon a stopped Attempt's slot is free again on its worker, heartbeats included.
const STOP_DEADLINE: Duration = Duration::from_secs(20);
/// Queries run while a worker stalls: after the first, only stopped Attempts free its slots.
const QUERIES_ON_STALLED_WORKER: usize = 2;
const QUERY_DEADLINE: Duration = Duration::from_secs(180);
/// Passes over [`QUERIES`] the throttled worker's test runs, at most, until one speculates.
const SPECULATION_PASSES_MAX: usize = 3;
/// Queries with scans, shuffles, joins and a final sort.
const QUERIES: [usize; 3] = [1, 3, 18];

async fn collect(client: &Client, sql: &str) -> Vec<Vec<String>> {
    let result = tokio::time::timeout(QUERY_DEADLINE, client.collect(sql)).await;
    let (_, batches) = result.unwrap_or_else(|_| panic!("hung: {sql}")).unwrap_or_else(|e| panic!("failed: {sql}: {e}"));
    rows(&batches)
}

/// `cpulimit` holding a process to a share of a core until dropped.
struct Throttle(Child);

impl Throttle {
    fn start(pid: u32) -> Self {
        let child = Command::new("cpulimit")
            .args(["--limit", THROTTLE_PERCENT, "--pid", &pid.to_string(), "--lazy"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("cpulimit runs (Debian package cpulimit; .ci/run installs it)");
        Self(child)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn throttled_cluster() -> (ProcCluster, Client, Throttle) {
    let cluster = ProcCluster::start(3, &SMALL_TASKS, &WORKER_ARGS);
    let client = tpch_tables(&cluster).await;
    let throttle = Throttle::start(cluster.workers[2].pid().expect("worker 2 runs"));
    (cluster, client, throttle)
}

/// A client of `cluster`, once its workers are alive and TPC-H SF 0.1 is its tables.
async fn tpch_tables(cluster: &ProcCluster) -> Client {
    let client = cluster.client().await;
    cluster.wait_alive(&client, cluster.workers.len()).await;
    for sql in tpch::create_tables_sql(&tpch_data(cluster)) {
        collect(&client, &sql).await;
    }
    client
}

fn tpch_data(cluster: &ProcCluster) -> std::path::PathBuf {
    tpch::generate(cluster.dir.path(), 0.1, Layout { files: 1, row_group_rows: 20_000 }).unwrap()
}

/// 2 healthy workers and a third (`workers[2]`) that waits `delay_ms` before each Attempt, with
/// the TPC-H tables, and speculation and slow-worker placement off: every Attempt runs to its
/// end on the worker that took it, so that each counts whole towards that worker's pace.
async fn cluster_with_a_delayed_worker(delay_ms: &str) -> (ProcCluster, Client) {
    let mut cluster = ProcCluster::start(2, &SMALL_TASKS, &WORKER_ARGS);
    cluster.add_worker_with(&["--task-delay-ms", delay_ms]);
    let client = tpch_tables(&cluster).await;
    collect(&client, "SET quiver.speculation = false").await;
    collect(&client, "SET quiver.slow_worker_placement = false").await;
    (cluster, client)
}

/// `sql`'s rows from single-node DataFusion over the same files, sorted.
async fn single_node_rows(cluster: &ProcCluster, sql: &str) -> Vec<Vec<String>> {
    let ctx = datafusion::prelude::SessionContext::new();
    for ddl in tpch::create_tables_sql(&tpch_data(cluster)) {
        ctx.sql(&ddl).await.unwrap().collect().await.unwrap();
    }
    let mut rows = rows(&ctx.sql(sql).await.unwrap().collect().await.unwrap());
    rows.sort();
    rows
}

/// Runs each query, checks its answer, and returns (speculative Attempts, of them winners,
/// Attempts superseded) over all of them.
async fn run_queries(client: &Client) -> (u64, u64, u64) {
    let mut failures = Vec::new();
    for q in QUERIES {
        let rows = collect(client, &tpch::query_sql(q).unwrap()).await;
        failures.extend(tpch_mismatch("0.1", q, &rows));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let totals = collect(
        client,
        "SELECT sum(attempts_speculated), sum(speculation_wins), \
         (SELECT count(*) FROM quiver.tasks WHERE cause = 'superseded') FROM quiver.queries",
    )
    .await;
    let n = |i: usize| totals[0][i].parse::<u64>().unwrap_or(0);
    (n(0), n(1), n(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttled_workers_tasks_are_speculated_and_answers_stay_exact() {
    let (_cluster, client, _throttle) = throttled_cluster().await;
    // Tasks here take tens of milliseconds: let speculation act on them. Slow-worker placement
    // would soon leave the throttled worker without Tasks (once its pace is known), and then
    // there would be nothing left to speculate on: this test is about speculation.
    collect(&client, "SET quiver.speculation_min_runtime_ms = 50").await;
    collect(&client, "SET quiver.slow_worker_placement = false").await;
    // cpulimit clamps a process only once it has seen it busy for a while (it keeps a moving
    // average of its CPU use): a pass of short queries after an idle spell can end before it
    // does (this test found nothing to speculate in some CI runs). Passes repeat until one
    // speculates, as the kill tests repeat their kills.
    let (mut speculated, mut won, mut superseded) = (0, 0, 0);
    for _ in 0..SPECULATION_PASSES_MAX {
        (speculated, won, superseded) = run_queries(&client).await;
        if won > 0 {
            break;
        }
    }
    assert!(speculated > 0, "no Attempt of the throttled worker was speculated in {SPECULATION_PASSES_MAX} passes");
    assert!(won > 0, "no speculative Attempt beat a worker running at {THROTTLE_PERCENT}% of a core");
    assert!(superseded >= won, "each win supersedes its straggler: {superseded} < {won}");
    let speculative = collect(&client, "SELECT count(*) FROM quiver.tasks WHERE started_as = 'speculative'").await;
    assert_eq!(speculative[0][0].parse::<u64>().unwrap(), speculated, "quiver.tasks shows each speculative Attempt");
}

/// The coordinator learns which worker is slow. The slow worker waits before each Attempt
/// (`--task-delay-ms`), which makes it slow the same way on any machine and under any load:
/// cpulimit's 5% of a core gave it a pace anywhere between 0.6 and 9 on this 2-core machine, as
/// the other tests' load came and went. (A pace also counts how long a worker's process was
/// held off the CPU; a healthy worker's stays far below the limit unless the host starves it
/// half the time.) Speculation is off so that each of its Attempts runs to its end and counts
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delayed_worker_is_learned_to_be_slow() {
    let (cluster, client) = cluster_with_a_delayed_worker(SLOW_WORKER_DELAY_MS).await;
    run_queries(&client).await;
    let paces = collect(&client, "SELECT address, pace FROM quiver.workers WHERE alive ORDER BY pace DESC").await;
    assert_eq!(paces[0][0], cluster.workers[2].url(), "the delayed worker is the slowest: {paces:?}");
    assert!(paces[0][1].parse::<f64>().unwrap() > 2.0, "the delayed worker counts as slow: {paces:?}");
    assert!(paces[1][1].parse::<f64>().unwrap() < 2.0, "the healthy workers do not: {paces:?}");
}

/// A worker whose process is stopped three quarters of the time, as `cpulimit` or a cgroup's CPU
/// quota does, runs short Attempts at full speed between stops, so their times hide it; but
/// every Task reading its outputs waits out its stops. Its heartbeats carry how long it was
/// held off the CPU while busy, and the coordinator counts it slow by that. The stops here come
/// in a fixed cycle, not from `cpulimit`, so the share is the same under any load. Its Attempts
/// wait `HELD_WORKER_DELAY_MS` first, so that each spans stops: Attempts short enough to fit
/// between two stops (as CI's load made them, one run in two) never stall while running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_held_off_the_cpu_is_learned_to_be_slow() {
    let (cluster, client) = cluster_with_a_delayed_worker(HELD_WORKER_DELAY_MS).await;
    let held = StopCycle::start(cluster.workers[2].pid().expect("worker 2 runs"));
    run_queries(&client).await;
    drop(held);
    let sql = "SELECT address, pace, stalled_pct FROM quiver.workers WHERE alive ORDER BY stalled_pct DESC";
    let workers = collect(&client, sql).await;
    let number = |row: usize, column: usize| workers[row][column].parse::<f64>().unwrap();
    assert_eq!(workers[0][0], cluster.workers[2].url(), "the stopped worker stalled most: {workers:?}");
    assert!(number(0, 2) > 40.0 && number(0, 1) > 2.0, "stopped {STOPPED_MS} ms of every {} it counts as slow: {workers:?}", STOPPED_MS + RUNNING_MS);
    assert!(number(1, 2) < 50.0 && number(1, 1) < 2.0, "the other workers do not count as slow: {workers:?}");
}

/// How long the held worker waits before each Attempt: longer than a whole stop cycle.
const HELD_WORKER_DELAY_MS: &str = "500";
/// The stop cycle of the held worker: stopped this long...
const STOPPED_MS: u64 = 300;
/// ...then running this long.
const RUNNING_MS: u64 = 100;

/// Stops and continues a process in a fixed cycle until dropped; leaves it running.
struct StopCycle {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StopCycle {
    fn start(pid: u32) -> Self {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let signal = move |name: &str| {
            let status = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().expect("kill runs");
            assert!(status.success(), "kill -{name} {pid}");
        };
        let thread = std::thread::spawn({
            let done = std::sync::Arc::clone(&done);
            move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    signal("STOP");
                    std::thread::sleep(Duration::from_millis(STOPPED_MS));
                    signal("CONT");
                    std::thread::sleep(Duration::from_millis(RUNNING_MS));
                }
            }
        });
        Self { done, thread: Some(thread) }
    }
}

impl Drop for StopCycle {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A worker that stalls before every Attempt (`--task-delay-ms`, far longer than the test)
/// holds no Query back: each Attempt it takes gets a speculative copy on a healthy worker, the
/// copy wins, and the stalled Attempt is stopped on its worker. Its slots come back at once,
/// long before its stall would have ended: it takes Attempts of the next Query too (a worker
/// polls only for free slots) and ends up running none. Answers equal single-node DataFusion's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_workers_attempts_are_superseded_and_stopped() {
    let mut cluster = ProcCluster::start(2, &SMALL_TASKS, &WORKER_ARGS);
    let stalled = cluster.add_worker_with(&["--task-delay-ms", &STALLED_WORKER_DELAY_MS.to_string()]);
    let client = tpch_tables(&cluster).await;
    collect(&client, "SET quiver.speculation_min_runtime_ms = 50").await;
    // Left to slow-worker placement, the stalled worker would soon get no Task at all.
    collect(&client, "SET quiver.slow_worker_placement = false").await;
    // One Stage of many Tasks, gathered by the coordinator: whatever the stalled worker takes,
    // enough of its Stage's Tasks finish elsewhere to show that it lags. (Its comments make it
    // read too much to run on the coordinator alone.)
    let sql = "SELECT l_orderkey, l_linenumber, l_comment FROM lineitem WHERE l_quantity > 48";
    let expected = single_node_rows(&cluster, sql).await;
    for _ in 0..QUERIES_ON_STALLED_WORKER {
        let mut got = collect(&client, sql).await;
        got.sort();
        assert_rows_match(sql, &got, &expected);
    }
    let url = cluster.workers[stalled].url();
    let taken = collect(
        &client,
        &format!(
            "SELECT count(DISTINCT t.query_id), count(*) FILTER (WHERE t.state = 'succeeded') FROM quiver.tasks t \
             JOIN quiver.workers w ON t.worker_id = w.worker_id WHERE w.address = '{url}'"
        ),
    )
    .await;
    assert_eq!(taken[0][0], QUERIES_ON_STALLED_WORKER.to_string(), "the stalled worker took Attempts of every Query (its slots came back)");
    assert_eq!(taken[0][1], "0", "an Attempt of the stalled worker counted");
    let running = format!("SELECT running_tasks FROM quiver.workers WHERE address = '{url}' AND alive");
    wait_for("the stalled worker's stopped Attempts to end", STOP_DEADLINE, || async {
        (collect(&client, &running).await == [["0"]]).then_some(())
    })
    .await;
}

/// A Stage of one Task has no finished Task to measure it by. When its only Attempt landed on a
/// stalled worker, it gets a speculative copy once it has run `quiver.speculation_lone_task_ms`
/// (here on a worker that joined since), the copy wins, and the Query ends long before the
/// stall would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_task_on_a_stalled_worker_is_speculated() {
    // Default Task sizes: a small table is one Task.
    let mut cluster = ProcCluster::start(0, &[], &WORKER_ARGS);
    cluster.add_worker_with(&["--task-delay-ms", &STALLED_WORKER_DELAY_MS.to_string()]);
    let client = tpch_tables(&cluster).await;
    collect(&client, "SET quiver.speculation_lone_task_ms = 300").await;
    let sql = "SELECT n_nationkey, n_name, n_regionkey FROM nation";
    let expected = single_node_rows(&cluster, sql).await;
    let query = tokio::spawn({
        let client = cluster.client().await;
        async move { collect(&client, sql).await }
    });
    let stalled = "SELECT count(*) FROM quiver.tasks WHERE state = 'running'";
    wait_for("the stalled worker to take the Task", QUERY_DEADLINE, || async { (collect(&client, stalled).await == [["1"]]).then_some(()) }).await;
    cluster.add_worker();
    let mut got = query.await.unwrap();
    got.sort();
    assert_rows_match(sql, &got, &expected);
    let speculated = collect(&client, "SELECT attempts_speculated, speculation_wins, tasks FROM quiver.queries WHERE sql LIKE '%FROM nation'").await;
    assert_eq!(speculated, [["1", "1", "1"]], "one Task, speculated once, and the copy won");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_speculation_switched_off_nothing_is_speculated() {
    let (_cluster, client, _throttle) = throttled_cluster().await;
    collect(&client, "SET quiver.speculation_min_runtime_ms = 50").await;
    collect(&client, "SET quiver.speculation = false").await;
    let (speculated, _, _) = run_queries(&client).await;
    assert_eq!(speculated, 0);
}
