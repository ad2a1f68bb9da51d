//! Queries survive the loss of workers: real `quiver coordinator` and `quiver worker` processes,
//! real `kill -9`, real network cuts. Attempts are retried, lost outputs recomputed, and the
//! answers stay exact.

mod common;

use std::time::{Duration, Instant};

use common::procs::{Netns, ProcCluster};
use common::*;
use quiver::client::Client;
use quiver::tpch::{self, Layout};

/// Two slots per worker, and scans cut into many small Tasks: every Stage spreads over every
/// worker, so that killing one always hits the Query.
const WORKER_ARGS: [&str; 4] = ["--slots", "2", "--memory-limit", "1GiB"];
const SMALL_TASKS: [&str; 4] = ["--task-min-bytes", "1", "--tasks-per-slot", "2"];
/// Every scan planned as one slice (no table here reaches the minimum bytes of a second Task).
/// The slot that takes it cuts it into pieces, whatever the timing: a Stage of many slices cuts
/// only a tail slice taken while the other slots are about to go idle, which depends on the
/// machine's load (the test of cut slices found none in about half its runs beside other tests).
const ONE_SLICE_PER_SCAN: [&str; 2] = ["--task-min-bytes", "1073741824"];
/// Kills tried per query until one lands on work the Query still needed.
const KILL_TRIES_MAX: usize = 3;
/// How long a Query may take here, kills and recoveries included.
const QUERY_DEADLINE: Duration = Duration::from_secs(120);

async fn collect(client: &Client, sql: &str) -> Vec<Vec<String>> {
    let result = tokio::time::timeout(QUERY_DEADLINE, client.collect(sql)).await;
    let (_, batches) = result.unwrap_or_else(|_| panic!("hung: {sql}")).unwrap_or_else(|e| panic!("failed: {sql}: {e}"));
    rows(&batches)
}

/// Between two looks at the system tables while a Query runs.
const POLL_PAUSE: Duration = Duration::from_millis(10);

/// Waits until `sql` runs, failing if it ended first.
async fn wait_until_running<T>(client: &Client, sql: &str, query: &tokio::task::JoinHandle<T>) {
    while running_query_id(client, sql).await.is_none() {
        assert!(!query.is_finished(), "the query ended before it was seen running: {sql}");
        tokio::time::sleep(POLL_PAUSE).await;
    }
}

async fn one(client: &Client, sql: &str) -> String {
    collect(client, sql).await[0][0].clone()
}

/// The id of the running Query whose SQL is `sql`, once it has one.
async fn running_query_id(client: &Client, sql: &str) -> Option<String> {
    let escaped = sql.replace('\'', "''");
    let found = collect(client, &format!("SELECT query_id FROM quiver.queries WHERE sql = '{escaped}' AND state = 'running'")).await;
    found.first().map(|r| r[0].clone())
}

/// Attempts of a Query (its scalar subqueries' included) with their worker and state.
async fn attempts(client: &Client, query_id: &str) -> Vec<Vec<String>> {
    let sql = format!(
        "SELECT worker_id, state, started_as, cause, stage, task, attempt FROM quiver.tasks \
         WHERE query_id LIKE '{query_id}%' AND worker_id IS NOT NULL ORDER BY query_id, stage, task, attempt"
    );
    collect(client, &sql).await
}

async fn tpch_cluster(workers: usize, coordinator: &[&str]) -> (ProcCluster, Client) {
    let cluster = ProcCluster::start(workers, coordinator, &WORKER_ARGS);
    let client = cluster.client().await;
    cluster.wait_alive(&client, workers).await;
    let dir = tpch::generate(cluster.dir.path(), 0.1, Layout { files: 1, row_group_rows: 20_000 }).unwrap();
    for sql in tpch::create_tables_sql(&dir) {
        collect(&client, &sql).await;
    }
    (cluster, client)
}

/// How a worker was taken out of a running Query.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kill {
    /// `kill -9` as soon as the worker has an Attempt of the Query.
    WhileRunning,
    /// `kill -STOP` before the Query starts, `kill -9` once the frozen worker was given an
    /// Attempt: it surely dies holding work.
    FrozenFirst,
}

/// Runs TPC-H query `q`, kills one worker during it and starts a replacement; returns the
/// rows and the Query's id.
async fn run_killing_one(cluster: &mut ProcCluster, client: &Client, q: usize, how: Kill) -> (Vec<Vec<String>>, String) {
    let sql = tpch::query_sql(q).unwrap();
    let live: Vec<usize> = (0..cluster.workers.len()).filter(|&i| cluster.workers[i].process.is_some()).collect();
    let frozen = live[q % live.len()];
    if how == Kill::FrozenFirst {
        cluster.signal_worker(frozen, "STOP");
    }
    let runner = client.clone();
    let run_sql = sql.clone();
    let query = tokio::spawn(async move { runner.collect(&run_sql).await });
    let started = Instant::now();
    let mut victim = None;
    let mut id = None;
    while victim.is_none() && !query.is_finished() && started.elapsed() < QUERY_DEADLINE {
        tokio::time::sleep(POLL_PAUSE).await;
        if id.is_none() {
            id = running_query_id(client, &sql).await;
        }
        if let Some(id) = &id {
            for attempt in attempts(client, id).await {
                let Some(index) = cluster.worker_index(client, &attempt[0]).await else { continue };
                if how == Kill::WhileRunning || index == frozen {
                    victim = Some(index);
                    break;
                }
            }
        }
    }
    let victim = victim.unwrap_or(frozen);
    cluster.kill_worker(victim);
    if how == Kill::FrozenFirst && victim != frozen {
        cluster.signal_worker(frozen, "CONT");
    }
    cluster.add_worker();
    let result = tokio::time::timeout(QUERY_DEADLINE, query).await.unwrap_or_else(|_| panic!("q{q} hung after the kill"));
    let (_, batches) = result.unwrap().unwrap_or_else(|e| panic!("q{q} failed after worker {victim} was killed: {e}"));
    let id = match id {
        Some(id) => id,
        None => collect(client, &format!("SELECT query_id FROM quiver.queries WHERE sql = '{}' ORDER BY started DESC LIMIT 1", sql.replace('\'', "''"))).await[0][0].clone(),
    };
    (rows(&batches), id)
}

async fn retried_attempts(client: &Client, id: &str) -> usize {
    attempts(client, id).await.iter().filter(|a| a[2] != "first").count()
}

/// Each TPC-H query with one worker killed during it: the answer is exact, and the Query shows
/// the Attempts it ran again. A kill that lands after the Query no longer needed the worker is
/// repeated with the worker frozen first, so that every query really loses work.
async fn tpch_with_a_worker_killed_in_each_query(queries: impl Iterator<Item = usize>, coordinator: &[&str], settings: &[&str]) -> (ProcCluster, Client) {
    let (mut cluster, client) = tpch_cluster(3, coordinator).await;
    for sql in settings {
        collect(&client, sql).await;
    }
    let mut failures = Vec::new();
    for q in queries {
        let mut how = Kill::WhileRunning;
        for _ in 0..KILL_TRIES_MAX {
            let (rows, id) = run_killing_one(&mut cluster, &client, q, how).await;
            failures.extend(tpch_mismatch("0.1", q, &rows));
            cluster.wait_alive(&client, 3).await;
            if retried_attempts(&client, &id).await > 0 {
                break;
            }
            how = Kill::FrozenFirst;
        }
        let sql = tpch::query_sql(q).unwrap().replace('\'', "''");
        let runs = collect(&client, &format!("SELECT query_id FROM quiver.queries WHERE sql = '{sql}' ORDER BY started")).await;
        let mut retried = 0;
        for run in runs {
            retried = retried.max(retried_attempts(&client, &run[0]).await);
        }
        assert!(retried > 0, "q{q} never ran an Attempt again after {KILL_TRIES_MAX} kills of a worker");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    (cluster, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_queries_1_to_11_survive_a_worker_killed_during_each() {
    tpch_with_a_worker_killed_in_each_query(1..=11, &SMALL_TASKS, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_queries_12_to_22_survive_a_worker_killed_during_each() {
    tpch_with_a_worker_killed_in_each_query(12..=22, &SMALL_TASKS, &[]).await;
}

/// Shuffle joins and final aggregates with partitions split and coalesced wherever they may be:
/// a worker killed during each query loses pieces of split partitions (and merges of partial
/// states), which run again reading what they read before, and every answer stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_joins_with_split_partitions_survive_a_worker_killed_during_each() {
    let settings: Vec<&str> = SHUFFLE_JOINS.iter().chain(&["SET quiver.skew_factor = 1", "SET quiver.skew_min_bytes = 0"]).copied().collect();
    let (_cluster, client) = tpch_with_a_worker_killed_in_each_query([3, 5, 9, 18].into_iter(), &SMALL_TASKS, &settings).await;
    let split = collect(&client, "SELECT CAST(sum(partitions_split) AS BIGINT) FROM quiver.queries").await;
    assert_ne!(split[0][0], "0", "no partition was split");
    // Final aggregates' split partitions too: their pieces and merges died with the worker.
    let merges = collect(&client, "SELECT count(*) FROM quiver.tasks WHERE reads LIKE '%merging the partial states%'").await;
    assert_ne!(merges[0][0], "0", "no partition was merged from partial states");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_scans_cut_into_pieces_survive_a_worker_killed_during_each() {
    // Every scan is planned as one slice, which the first slot to take it cuts into pieces for
    // the others: pieces die with the worker and run again.
    let settings = ["SET quiver.slice_piece_min_bytes = 1"];
    let (_cluster, client) = tpch_with_a_worker_killed_in_each_query([1, 6, 12].into_iter(), &ONE_SLICE_PER_SCAN, &settings).await;
    let cut = collect(&client, "SELECT CAST(sum(slices_cut) AS BIGINT) FROM quiver.queries").await;
    assert_ne!(cut[0][0], "0", "no scan slice was cut");
}

/// Two shuffled inputs of a join: while the big side still runs, the worker holding outputs of
/// finished Tasks is frozen and killed. Exactly the Tasks that succeeded there are recomputed,
/// and the Prometheus counters say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_outputs_a_killed_worker_held_are_recomputed() {
    let http = format!("127.0.0.1:{}", free_port());
    let args: Vec<&str> = SMALL_TASKS.iter().copied().chain(["--http", http.as_str()]).collect();
    let mut cluster = ProcCluster::start(3, &args, &WORKER_ARGS);
    let client = cluster.client().await;
    cluster.wait_alive(&client, 3).await;
    for sql in [
        "CREATE TABLE big AS SELECT value AS k, value * 7 % 1000 AS v FROM generate_series(1, 3000000)",
        "CREATE TABLE small AS SELECT value AS k FROM generate_series(1, 3000000, 100)",
        SHUFFLE_JOINS[0],
        SHUFFLE_JOINS[1],
    ] {
        collect(&client, sql).await;
    }
    let sql = "SELECT count(*), sum(b.v) FROM big b JOIN small s ON b.k = s.k";
    let expected = collect(&client, sql).await;
    let runner = client.clone();
    let query = tokio::spawn(async move { runner.collect(sql).await });
    // Wait for a worker holding a succeeded Attempt while the Query still runs Attempts.
    let (id, worker) = loop {
        assert!(!query.is_finished(), "the query ended before a worker held finished outputs");
        tokio::time::sleep(POLL_PAUSE).await;
        let Some(id) = running_query_id(&client, sql).await else { continue };
        let all = attempts(&client, &id).await;
        let busy = all.iter().any(|a| a[1] == "running");
        if let Some(done) = all.iter().find(|a| a[1] == "succeeded").filter(|_| busy) {
            break (id, done[0].clone());
        }
    };
    let victim = cluster.worker_index(&client, &worker).await.expect("the worker is ours");
    cluster.signal_worker(victim, "STOP");
    tokio::time::sleep(Duration::from_millis(300)).await; // reports already sent are applied
    let held = attempts(&client, &id).await.iter().filter(|a| a[0] == worker && a[1] == "succeeded").count();
    cluster.kill_worker(victim);
    let result = tokio::time::timeout(QUERY_DEADLINE, query).await.expect("the query ends").unwrap();
    assert_eq!(rows(&result.expect("the query survives the kill").1), expected);
    let counts = collect(&client, &format!("SELECT tasks_recomputed, attempts_retried FROM quiver.queries WHERE query_id = '{id}'")).await;
    assert_eq!(counts[0][0], held.to_string(), "recomputed exactly the {held} outputs {worker} held: {:?}", attempts(&client, &id).await);
    let recomputed = attempts(&client, &id).await.into_iter().filter(|a| a[2] == "recompute").count();
    assert_eq!(recomputed, held);

    let metrics = parse_metrics(&http_request(http.parse().unwrap(), "GET", "/metrics").await.body);
    let recomputes = metrics.get("quiver_task_retries_total{kind=\"recompute\",cause=\"output_lost\"}").copied().unwrap_or(0.0);
    assert!(recomputes >= held as f64, "{metrics:?}");
}

/// Every worker dies: the Query fails with a clear error within seconds instead of waiting,
/// and a worker that starts afterwards serves the next Query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_every_worker_fails_the_query_within_seconds_and_a_new_worker_serves_the_next() {
    let mut cluster = ProcCluster::start(2, &SMALL_TASKS, &WORKER_ARGS);
    let client = cluster.client().await;
    cluster.wait_alive(&client, 2).await;
    collect(&client, "CREATE TABLE t AS SELECT value AS v FROM generate_series(1, 2000000)").await;
    let sql = "SELECT count(*) FROM t a JOIN t b ON a.v = b.v + 1 WHERE a.v % 7 = 1";
    let runner = client.clone();
    let query = tokio::spawn(async move { runner.collect(sql).await });
    wait_until_running(&client, sql, &query).await;
    cluster.kill_worker(0);
    cluster.kill_worker(1);
    let killed = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), query).await.expect("no hang").unwrap();
    let waited = killed.elapsed();
    let error = result.expect_err("no worker is left to run it").to_string();
    assert!(waited < Duration::from_secs(10), "the failure took {waited:?}");
    assert!(error.contains("no live workers") || error.contains("was lost"), "{error}");
    cluster.add_worker();
    cluster.wait_alive(&client, 1).await;
    assert_eq!(one(&client, "SELECT count(*) FROM t WHERE v % 2 = 0").await, "1000000");
}

/// A poison Task (it runs out of memory on every worker) fails its Query after the Attempt
/// limit, with its own error, and is never tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_task_fails_its_query_after_the_attempt_limit_with_its_own_error() {
    let worker = ["--slots", "2", "--memory-limit", "8MiB"];
    let cluster = ProcCluster::start(2, &[], &worker);
    let client = cluster.client().await;
    cluster.wait_alive(&client, 2).await;
    collect(&client, "CREATE TABLE wide AS SELECT value AS k, repeat('x', 200) AS s FROM generate_series(1, 400000)").await;
    collect(&client, SHUFFLE_JOINS[0]).await;
    collect(&client, SHUFFLE_JOINS[1]).await;
    // Each join Task builds a hash table far larger than the workers' memory.
    let sql = "SELECT count(*), max(a.s) FROM wide a JOIN wide b ON a.k = b.k";
    let error = tokio::time::timeout(QUERY_DEADLINE, client.collect(sql)).await.expect("no loop").expect_err("out of memory").to_string();
    assert!(error.contains("Resources exhausted") && error.contains("failed 4 attempts"), "{error}");
    let id = collect(&client, &format!("SELECT query_id FROM quiver.queries WHERE sql = '{sql}'")).await[0][0].clone();
    let most = one(&client, &format!("SELECT max(attempt) FROM quiver.tasks WHERE query_id = '{id}'")).await;
    assert_eq!(most, "3", "at most 4 Attempts of a Task");
    let causes = collect(&client, &format!("SELECT DISTINCT cause FROM quiver.tasks WHERE query_id = '{id}' AND state = 'failed'")).await;
    assert!(causes.contains(&vec!["resources_exhausted".to_string()]), "{causes:?}");
}

/// `kill -9` of the coordinator: the Query it ran fails with a clear error, the workers rejoin
/// the restarted coordinator by themselves, drop what they held for the old one, and the next
/// Query succeeds on the catalog that survived.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_coordinator_restart_workers_rejoin_by_themselves() {
    let mut cluster = ProcCluster::start(2, &SMALL_TASKS, &WORKER_ARGS);
    let client = cluster.client().await;
    cluster.wait_alive(&client, 2).await;
    collect(&client, "CREATE TABLE t AS SELECT value AS v FROM generate_series(1, 2000000)").await;
    let sql = "SELECT count(*) FROM t a JOIN t b ON a.v = b.v + 1";
    let runner = client.clone();
    let query = tokio::spawn(async move { runner.collect(sql).await });
    wait_until_running(&client, sql, &query).await;
    cluster.kill_coordinator();
    let error = tokio::time::timeout(Duration::from_secs(30), query).await.expect("no hang").unwrap().expect_err("its coordinator died");
    assert!(!error.to_string().is_empty());
    cluster.start_coordinator();
    let client = cluster.client().await;
    cluster.wait_alive(&client, 2).await;
    assert_eq!(one(&client, "SELECT count(*) FROM t WHERE v > 1000000").await, "1000000");
    // What the workers held for the old coordinator's Query is gone.
    let held = wait_for("the workers to free the old query's outputs", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let used = one(&client, "SELECT sum(memory_used_bytes) FROM quiver.workers WHERE alive").await;
            (used == "0").then_some(used)
        }
    })
    .await;
    assert_eq!(held, "0");
}

/// An INSERT whose write Task is retried after its worker died: the table holds every row
/// exactly once, and only the files of the Attempts that counted are committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_whose_task_is_retried_holds_each_row_exactly_once() {
    let (mut cluster, client) = tpch_cluster(3, &SMALL_TASKS).await;
    collect(&client, "CREATE TABLE dst (o BIGINT, l INT)").await;
    cluster.signal_worker(0, "STOP");
    // Many write Tasks: lineitem has many row groups.
    let sql = "INSERT INTO dst SELECT l_orderkey, l_linenumber FROM lineitem WHERE l_linenumber <> 3";
    let runner = client.clone();
    let write = tokio::spawn(async move { runner.collect(sql).await });
    let id = loop {
        if let Some(id) = running_query_id(&client, sql).await {
            let frozen = cluster.workers[0].url();
            let held = collect(&client, &format!(
                "SELECT count(*) FROM quiver.tasks t JOIN quiver.workers w USING (worker_id) WHERE t.query_id = '{id}' AND w.address = '{frozen}'"
            ))
            .await;
            if held[0][0] != "0" {
                break id;
            }
        }
        assert!(!write.is_finished(), "the write ended before the frozen worker took a Task");
        tokio::time::sleep(POLL_PAUSE).await;
    };
    cluster.kill_worker(0);
    let result = tokio::time::timeout(QUERY_DEADLINE, write).await.expect("the write ends").unwrap();
    let expected = collect(&client, "SELECT count(*), sum(l_orderkey) FROM lineitem WHERE l_linenumber <> 3").await;
    assert_eq!(rows(&result.expect("the write survives").1)[0][0], expected[0][0]);
    assert!(retried_attempts(&client, &id).await > 0);
    let counts = collect(&client, "SELECT count(*), sum(o) FROM dst").await;
    assert_eq!(counts, expected, "every row written once");
    let distinct = one(&client, "SELECT count(*) FROM (SELECT DISTINCT o, l FROM dst)").await;
    assert_eq!(distinct, expected[0][0], "no row written twice");
    let table = cluster.dir.path().join("data/tables/dst");
    let files: Vec<String> = walk(&table).into_iter().filter(|f| f.ends_with(".parquet")).collect();
    let tasks = one(&client, &format!("SELECT count(DISTINCT task) FROM quiver.tasks WHERE query_id = '{id}' AND stage = (SELECT max(stage) FROM quiver.tasks WHERE query_id = '{id}')")).await;
    assert!(files.len() <= tasks.parse().unwrap(), "at most one file per write Task: {files:?}");
    assert!(walk(&table).iter().all(|f| !f.contains(".staging")), "nothing left staged");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path.display().to_string());
        }
    }
    found
}

/// A worker on a host of its own loses its network mid-query (the link is cut; the process
/// runs on). The Query finishes correctly on the others. When the link comes back the worker
/// rejoins under a new registration, and nothing it computed while cut off is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_cut_off_by_the_network_is_replaced_and_rejoins_without_changing_answers() {
    let net = Netns::create(3);
    let port = free_port();
    let coordinator = format!("http://{}:{port}", net.coordinator_address());
    let mut cluster = ProcCluster::start_listening(&format!("0.0.0.0:{port}"), &coordinator, 0, &SMALL_TASKS, &WORKER_ARGS);
    for host in 0..3 {
        cluster.add_worker_at(format!("{}:{}", net.host(host), 4100), Some(net.name(host)));
    }
    let client = cluster.client().await;
    cluster.wait_alive(&client, 3).await;
    let dir = tpch::generate(cluster.dir.path(), 0.1, Layout { files: 1, row_group_rows: 20_000 }).unwrap();
    for sql in tpch::create_tables_sql(&dir) {
        collect(&client, &sql).await;
    }
    let sql = tpch::query_sql(9).unwrap();
    let runner = client.clone();
    let run_sql = sql.clone();
    let query = tokio::spawn(async move { runner.collect(&run_sql).await });
    let id = loop {
        if let Some(id) = running_query_id(&client, &sql).await {
            if !attempts(&client, &id).await.is_empty() {
                break id;
            }
        }
        assert!(!query.is_finished(), "q9 ended before it ran an Attempt");
        tokio::time::sleep(POLL_PAUSE).await;
    };
    let cut_worker = attempts(&client, &id).await[0][0].clone();
    let cut = cluster.worker_index(&client, &cut_worker).await.expect("a worker of ours");
    net.set_link(cut, false);
    let result = tokio::time::timeout(QUERY_DEADLINE, query).await.expect("the query ends").unwrap();
    let rows = rows(&result.expect("the query survives the cut").1);
    assert_eq!(tpch_mismatch("0.1", 9, &rows), None);
    let state = one(&client, &format!("SELECT state FROM quiver.workers WHERE worker_id = '{cut_worker}'")).await;
    assert_eq!(state, "lost");
    assert!(retried_attempts(&client, &id).await > 0);

    net.set_link(cut, true);
    let rejoined = wait_for("the cut-off worker to rejoin", Duration::from_secs(30), || {
        let (client, address) = (client.clone(), cluster.workers[cut].url());
        async move {
            let sql = format!("SELECT worker_id FROM quiver.workers WHERE alive AND address = '{address}'");
            collect(&client, &sql).await.first().map(|r| r[0].clone())
        }
    })
    .await;
    assert_ne!(rejoined, cut_worker, "it rejoins under a new registration");
    // Its stale Attempts changed nothing: the Query's record stands, and new Queries use it.
    assert_eq!(one(&client, &format!("SELECT state FROM quiver.queries WHERE query_id = '{id}'")).await, "succeeded");
    for q in [3, 9, 18] {
        let rows = collect(&client, &tpch::query_sql(q).unwrap()).await;
        assert_eq!(tpch_mismatch("0.1", q, &rows), None);
    }
    let used = one(&client, &format!("SELECT count(*) FROM quiver.tasks WHERE worker_id = '{rejoined}'")).await;
    assert_ne!(used, "0", "the rejoined worker takes Tasks again");
}
