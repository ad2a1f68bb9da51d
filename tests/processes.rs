//! Real `quiver coordinator`, `quiver worker` and `quiver sql` processes on 127.0.0.1.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, quiver_binary, KillOnDrop};

fn spawn(args: &[&str]) -> KillOnDrop {
    let child = Command::new(quiver_binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("quiver starts");
    KillOnDrop(child)
}

fn coordinator(port: u16, dir: &Path) -> KillOnDrop {
    // Its small tables are distributed all the same: these tests are about the workers.
    spawn(&["coordinator", "--listen", &format!("127.0.0.1:{port}"), "--small-query-max-bytes", "0", "--data-dir", dir.to_str().unwrap()])
}

fn worker(port: u16) -> KillOnDrop {
    spawn(&["worker", "--coordinator", &format!("http://127.0.0.1:{port}"), "--slots", "2", "--memory-limit", "512MiB"])
}

fn sql(port: u16, sql: &str) -> Output {
    Command::new(quiver_binary())
        .args(["sql", "--coordinator", &format!("http://127.0.0.1:{port}"), "--format", "csv", "-c", sql])
        .output()
        .expect("quiver sql runs")
}

fn sql_ok(port: u16, statement: &str) -> String {
    let out = sql(port, statement);
    assert!(out.status.success(), "{statement} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Retries until `statement` prints `expected` (servers start and register asynchronously).
fn eventually(port: u16, statement: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = sql(port, statement);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && stdout.trim() == expected.trim() {
            return;
        }
        assert!(Instant::now() < deadline, "{statement}: last output {stdout:?} {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(100));
    }
}

const ALIVE: &str = "SELECT count(*) AS n FROM quiver.workers WHERE alive";

/// A coordinator and one worker, killed when dropped, with the data directory they use.
struct Servers {
    _coordinator: KillOnDrop,
    worker: Option<KillOnDrop>,
    _dir: tempfile::TempDir,
}

/// Starts a coordinator and one worker on a free port and waits until the worker registered.
fn coordinator_and_worker() -> (u16, Servers) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _coordinator = coordinator(port, dir.path());
    let worker = Some(worker(port));
    eventually(port, ALIVE, "n\n1");
    (port, Servers { _coordinator, worker, _dir: dir })
}

#[test]
fn workers_register_join_late_and_the_catalog_survives_a_coordinator_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The worker starts first and keeps retrying until the coordinator is up.
    let _w1 = worker(port);
    std::thread::sleep(Duration::from_millis(300));
    let mut coord = coordinator(port, dir.path());
    eventually(port, ALIVE, "n\n1");
    sql_ok(port, "CREATE TABLE t AS SELECT value AS v, value % 3 AS k FROM generate_series(1, 1000)");
    assert_eq!(sql_ok(port, "SELECT k, count(*) AS c FROM t GROUP BY k ORDER BY k"), "k,c\n0,333\n1,334\n2,333\n");

    let _w2 = worker(port);
    eventually(port, ALIVE, "n\n2");
    assert_eq!(sql_ok(port, "SELECT sum(v) AS s FROM t"), "s\n500500\n");

    // A view over a view replaced since: the catalog lists the inner one last.
    sql_ok(port, "CREATE VIEW w AS SELECT v FROM t");
    sql_ok(port, "CREATE VIEW ww AS SELECT sum(v) AS s FROM w");
    sql_ok(port, "CREATE OR REPLACE VIEW w AS SELECT v FROM t WHERE v > 500");

    // Restart the coordinator on the same data directory: tables and views come back, workers
    // rejoin.
    drop(coord);
    coord = coordinator(port, dir.path());
    eventually(port, ALIVE, "n\n2");
    assert_eq!(sql_ok(port, "SELECT count(*) AS c FROM t WHERE v > 500"), "c\n500\n");
    assert_eq!(sql_ok(port, "SELECT s FROM ww"), "s\n375250\n");
    drop(coord);
}

/// Regression: a managed table that failed to register at start (here a DEFAULT that no longer
/// parses) was invisible, so CREATE TABLE IF NOT EXISTS went ahead and deleted its files. The
/// catalog's tables count as existing; DROP TABLE removes such a table.
#[test]
fn a_table_that_failed_to_restore_is_neither_overwritten_nor_undroppable() {
    let (port, servers) = coordinator_and_worker();
    let dir = servers._dir.path().to_path_buf();
    let mut coord = servers._coordinator;
    sql_ok(port, "CREATE TABLE kept (a INT DEFAULT 7, b INT)");
    sql_ok(port, "INSERT INTO kept (b) VALUES (1), (2)");
    let segments = || -> Vec<_> { std::fs::read_dir(dir.join("tables/kept")).unwrap().map(|e| e.unwrap().file_name()).collect() };
    let written = segments();
    assert_eq!(written.len(), 1);
    drop(coord);
    let catalog = dir.join("catalog.json");
    let text = std::fs::read_to_string(&catalog).unwrap();
    assert!(text.contains("\"7\""), "{text}");
    std::fs::write(&catalog, text.replace("\"7\"", "\"(((\"")).unwrap();
    coord = coordinator(port, &dir);
    eventually(port, ALIVE, "n\n1");
    assert!(!sql(port, "SELECT * FROM kept").status.success(), "the table did not register");
    sql_ok(port, "CREATE TABLE IF NOT EXISTS kept AS SELECT 1 AS a");
    assert_eq!(segments(), written, "its files are still there, and no others");
    let out = sql(port, "CREATE TABLE kept AS SELECT 1 AS a");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already exists"));
    sql_ok(port, "DROP TABLE kept");
    assert!(!dir.join("tables/kept").exists());
    sql_ok(port, "CREATE TABLE kept AS SELECT 1 AS a");
    assert_eq!(sql_ok(port, "SELECT a FROM kept"), "a\n1\n");
    drop(coord);
}

#[test]
fn bad_sql_exits_non_zero_with_the_engines_message() {
    let (port, _servers) = coordinator_and_worker();
    let out = sql(port, "SELECT * FROM missing_table");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing_table"), "{stderr}");
    assert_eq!(sql_ok(port, "SELECT 40 + 2 AS x"), "x\n42\n");
}

#[test]
fn a_killed_worker_fails_the_query_with_a_clear_error_and_the_coordinator_survives() {
    let (port, mut servers) = coordinator_and_worker();
    sql_ok(port, "CREATE TABLE t AS SELECT value AS v FROM generate_series(1, 100)");
    drop(servers.worker.take()); // SIGKILL: no goodbye
    let out = sql(port, "SELECT v % 10, count(*) FROM t GROUP BY 1");
    assert!(!out.status.success(), "a query with no live worker must fail, not hang or return partial rows");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lost") || stderr.contains("no live workers") || stderr.contains("unreachable"), "{stderr}");
    assert_eq!(sql_ok(port, "SELECT count(*) AS n FROM quiver.workers WHERE NOT alive"), "n\n1\n");
}

#[test]
fn ctrl_c_in_quiver_sql_cancels_the_running_query_on_the_workers() {
    let (port, _servers) = coordinator_and_worker();
    sql_ok(port, "CREATE TABLE pairs AS SELECT value AS v FROM generate_series(1, 20000)");
    // 400M pairs through a nested-loop join: minutes, unless cancelled.
    let slow = "SELECT count(*) AS n FROM pairs a, pairs b WHERE a.v + b.v < 0";
    let client = Command::new(quiver_binary())
        .args(["sql", "--coordinator", &format!("http://127.0.0.1:{port}"), "-c", slow])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("quiver sql starts");
    let running = format!("SELECT count(*) > 0 AS busy FROM quiver.tasks t JOIN quiver.queries q ON t.query_id = q.query_id WHERE q.sql = '{slow}' AND t.state = 'running'");
    eventually(port, &running, "busy\ntrue");

    let pid = client.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = client.wait_with_output().unwrap();
    assert!(!out.status.success(), "a cancelled statement exits non-zero");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cancelled"), "{stderr}");
    eventually(port, &format!("SELECT state FROM quiver.queries WHERE sql = '{slow}'"), "state\ncancelled");
    eventually(port, &running, "busy\nfalse");
}

/// The JSON log lines of a process, parsed (stderr also has the lines printed for people, such
/// as the address a server listens on).
fn json_logs(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))).collect()
}

#[test]
fn the_coordinator_logs_one_json_line_per_query_start_and_end() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("coordinator.log");
    let child = Command::new(quiver_binary())
        .args(["--log-format", "json", "coordinator", "--listen", &format!("127.0.0.1:{port}"), "--small-query-max-bytes", "0"])
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("quiver starts");
    let _coord = KillOnDrop(child);
    let _w = worker(port);
    eventually(port, ALIVE, "n\n1");
    sql_ok(port, "CREATE TABLE logged AS SELECT value AS v FROM generate_series(1, 1000)");
    let query = "SELECT v % 10 AS k, count(*) FROM logged GROUP BY 1";
    assert_eq!(sql_ok(port, query).lines().count(), 11);
    let id = sql_ok(port, &format!("SELECT query_id FROM quiver.queries WHERE sql = '{query}'"));
    let id = id.lines().nth(1).expect("the query is recorded").to_string();

    let lines = json_logs(&log);
    let of_query: Vec<&serde_json::Value> = lines.iter().filter(|l| l["fields"]["query"] == id.as_str()).collect();
    let messages: Vec<&str> = of_query.iter().map(|l| l["fields"]["message"].as_str().unwrap()).collect();
    assert_eq!(messages.len(), 2, "one start and one end line: {of_query:?}");
    assert!(messages[0].starts_with("query started: SELECT v % 10"), "{messages:?}");
    let end = &of_query[1]["fields"];
    assert_eq!((end["message"].as_str(), end["state"].as_str(), end["rows"].as_u64()), (Some("query ended"), Some("succeeded"), Some(10)));
    assert!(end["duration_ms"].is_u64() && end["tasks"].as_u64().unwrap() >= 1, "{end}");
}

#[test]
fn a_worker_busy_with_cpu_bound_tasks_keeps_heartbeating() {
    // Regression: Tasks ran on the runtime that also sends heartbeats; a join holding both
    // threads for longer than WORKER_TIMEOUT_MS got its worker declared lost and its Query failed.
    let (port, _servers) = coordinator_and_worker();
    sql_ok(port, "CREATE TABLE busy AS SELECT value AS v, value % 4 AS k FROM generate_series(1, 40000)");
    // Two at once: both slots, so both of the worker's threads, stay busy for seconds.
    let heavy = "SELECT count(*) AS n FROM busy a JOIN busy b ON a.k = b.k WHERE a.v < b.v";
    let runs: Vec<_> = (0..2).map(|_| std::thread::spawn(move || sql_ok(port, heavy))).collect();
    for run in runs {
        assert_eq!(run.join().unwrap(), "n\n199980000\n");
    }
    assert_eq!(sql_ok(port, "SELECT count(*) AS lost FROM quiver.workers WHERE NOT alive"), "lost\n0\n");
}

/// Regression: `quiver sql` re-rendered each statement from its parse, which printed COPY's
/// target without its quotes ("Expected: literal string, found: /"). Statements now go as
/// written, and files are queried by path as in datafusion-cli.
#[test]
fn copy_to_files_and_queries_over_file_paths_work_through_quiver_sql() {
    let (port, servers) = coordinator_and_worker();
    let out = servers._dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (parquet, csv) = (out.join("n.parquet"), out.join("n.csv"));
    sql_ok(port, "CREATE TABLE nums AS SELECT value AS v, value % 7 AS k FROM generate_series(1, 1000)");
    let script = format!(
        "COPY (SELECT k, count(*) AS c FROM nums GROUP BY k) TO '{}' STORED AS PARQUET; COPY nums TO '{}' STORED AS CSV",
        parquet.display(),
        csv.display()
    );
    sql_ok(port, &script);
    let grouped = format!("SELECT sum(c) AS total, count(*) AS groups FROM '{}'", parquet.display());
    assert_eq!(sql_ok(port, &grouped), "total,groups\n1000,7\n");
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 1001, "a header and 1000 rows");
    let mode = sql_ok(port, &format!("SELECT mode FROM quiver.queries WHERE sql = '{}'", grouped.replace('\'', "''")));
    assert_eq!(mode, "mode\ndistributed\n", "a query over a file path runs on the workers");
}

/// The README's demo works from an install alone: the queries are built in, and nothing is read
/// from beside the checkout (the process runs in an empty directory, without QUIVER_TPCH_DIR).
#[test]
fn the_demo_runs_a_built_in_tpch_query_from_any_directory() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let out = Command::new(quiver_binary())
        .args(["local", "--workers", "2", "--tpch", "0.01", "--tpch-query", "1", "--format", "csv"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .env_remove("QUIVER_TPCH_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("l_returnflag,l_linestatus,sum_qty"), "{stdout}");
    assert_eq!(lines.len(), 5, "a header and TPC-H q1's 4 groups: {stdout}");
    let bad = Command::new(quiver_binary()).args(["local", "--tpch-query", "23", "--listen", "127.0.0.1:0"]).current_dir(dir.path()).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("1 to 22"));
}

/// A worker listening on every address says which one others reach it at (`--advertise`); one
/// that cannot be dialled is told so at registration, and one with no address to give refuses
/// to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_advertise_an_address_the_coordinator_checks_at_registration() {
    let port = free_port();
    let mut cluster = common::procs::ProcCluster::start(0, &[], &["--advertise", &format!("127.0.0.1:{port}")]);
    cluster.add_worker_at(format!("0.0.0.0:{port}"), None);
    let client = cluster.client().await;
    cluster.wait_alive(&client, 1).await;
    let address = common::rows(&client.collect("SELECT address FROM quiver.workers WHERE alive").await.unwrap().1);
    assert_eq!(address[0][0], format!("http://127.0.0.1:{port}"));
    client.collect("CREATE TABLE t AS SELECT * FROM (VALUES (1), (2)) AS v(x)").await.unwrap();
    let sum = common::rows(&client.collect("SELECT sum(x) FROM t").await.unwrap().1);
    assert_eq!(sum[0][0], "3");

    let nowhere = free_port();
    let mut wrong = common::procs::ProcCluster::start(0, &[], &["--advertise", &format!("127.0.0.1:{nowhere}")]);
    wrong.add_worker_at(format!("127.0.0.1:{}", free_port()), None);
    let log = common::wait_for("the refused registration in the worker's log", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(wrong.log("worker-0")).unwrap_or_default();
        async move { log.contains("cannot reach this worker").then_some(log) }
    })
    .await;
    assert!(log.contains(&format!("http://127.0.0.1:{nowhere}")) && log.contains("--advertise"), "{log}");
    let client = wrong.client().await;
    let alive = common::rows(&client.collect(ALIVE).await.unwrap().1);
    assert_eq!(alive[0][0], "0", "an unreachable worker is not registered");

    let secret = cluster.dir.path().join("cluster-secret");
    let out = Command::new(quiver_binary())
        .args(["worker", "--listen", "0.0.0.0:0", "--coordinator", &cluster.url(), "--cluster-secret-file", secret.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--advertise"), "{stderr}");
}

/// A worker that cannot connect to another worker (host 1 may not open connections to host 0,
/// though the coordinator reaches both) says so in its log, and `quiver.workers` shows it, soon
/// after it joins instead of when a Task of a Query fails; once the path opens the column clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_reach_a_peer_says_so_when_it_joins() {
    let net = common::procs::Netns::create(2);
    let port = free_port();
    let coordinator = format!("http://{}:{port}", net.coordinator_address());
    let mut cluster = common::procs::ProcCluster::start_listening(&format!("0.0.0.0:{port}"), &coordinator, 0, &[], &[]);
    net.block(1, 0, true);
    for host in 0..2 {
        cluster.add_worker_at(format!("{}:{}", net.host(host), 4100), Some(net.name(host)));
    }
    let client = cluster.client().await;
    cluster.wait_alive(&client, 2).await;
    let (cut_off, reached) = (format!("http://{}:4100", net.host(0)), format!("http://{}:4100", net.host(1)));
    let sql = "SELECT address, unreachable_peers FROM quiver.workers WHERE alive ORDER BY address";
    let shown = common::wait_for("the unreachable peer in quiver.workers", Duration::from_secs(30), || {
        let (client, cut_off) = (&client, &cut_off);
        async move {
            let rows = common::rows(&client.collect(sql).await.ok()?.1);
            rows.iter().any(|r| r[1] == *cut_off).then_some(rows)
        }
    })
    .await;
    assert_eq!(shown, vec![vec![cut_off.clone(), "NULL".to_string()], vec![reached, cut_off.clone()]], "only host 1 is cut off from host 0");
    let log = std::fs::read_to_string(cluster.log("worker-1")).unwrap();
    assert!(log.contains(&format!("cannot reach the worker at {cut_off}")) && log.contains("--advertise"), "{log}");
    net.block(1, 0, false);
    common::wait_for("the column to clear once host 1 reaches host 0", Duration::from_secs(30), || {
        let client = &client;
        async move {
            let rows = common::rows(&client.collect(sql).await.ok()?.1);
            rows.iter().all(|r| r[1] == "NULL").then_some(())
        }
    })
    .await;
}

/// Flags come from the command line, then `QUIVER_*` variables, then `quiver.toml`: a
/// deployment's processes start with no flags at all, and a typo in the file is an error.
#[test]
fn flags_come_from_the_command_line_then_the_environment_then_quiver_toml() {
    let dir = tempfile::tempdir().unwrap();
    let (port, wrong) = (free_port(), free_port());
    let file = dir.path().join("quiver.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &file,
        format!(
            "[coordinator]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nsmall_query_max_bytes = 0\n\
             store_option = [\"aws.region=eu-west-1\"]\n\n[worker]\ncoordinator = \"http://127.0.0.1:{wrong}\"\nslots = 3\n\
             memory_limit = \"512MiB\"\n",
            data.display()
        ),
    )
    .unwrap();
    let start = |args: &[&str], cwd: &Path, env: &[(&str, String)]| {
        let mut command = Command::new(quiver_binary());
        command.args(args).current_dir(cwd).env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::null());
        command.envs(env.iter().map(|(k, v)| (k, v)));
        KillOnDrop(command.spawn().unwrap())
    };
    let elsewhere = tempfile::tempdir().unwrap();
    let _coordinator = start(&["coordinator", "--config", file.to_str().unwrap()], elsewhere.path(), &[]);
    // The worker reads ./quiver.toml; the environment corrects the file's coordinator.
    let _worker = start(&["worker"], dir.path(), &[("QUIVER_COORDINATOR", format!("http://127.0.0.1:{port}"))]);
    eventually(port, "SELECT slots FROM quiver.workers WHERE alive", "slots\n3");
    assert!(data.join("catalog.json").exists() || data.is_dir(), "the coordinator uses the file's data directory");
    // The command line wins over the environment.
    let out = Command::new(quiver_binary())
        .args(["sql", "--coordinator", &format!("http://127.0.0.1:{port}"), "--format", "csv", "-c", "SELECT 1 AS one"])
        .env("QUIVER_COORDINATOR", format!("http://127.0.0.1:{wrong}"))
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\n1\n", "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&file, "[worker]\nslot = 3\n").unwrap();
    let out = Command::new(quiver_binary()).args(["worker", "--config", file.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("unknown setting 'slot'"), "{stderr}");
}
