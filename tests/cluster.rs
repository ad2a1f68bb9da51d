//! Behaviour of an in-process cluster over loopback: errors are answers, writes are atomic,
//! the catalog persists, and regressions stay fixed.

mod common;

use common::*;
use quiver::client::Client;
use quiver::config::WorkerConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_sql_and_unknown_tables_are_clear_errors_and_the_cluster_keeps_serving() {
    let t = TestCluster::start(2).await;
    let err = t.client.collect("SELEC 1").await.unwrap_err().to_string();
    assert!(err.contains("SELEC"), "{err}");
    let err = t.client.collect("SELECT * FROM no_such_table").await.unwrap_err().to_string();
    assert!(err.contains("no_such_table") && err.contains("not found"), "{err}");
    assert_eq!(t.cluster_rows("SELECT 1 + 1").await, vec![vec!["2".to_string()]]);
    let failed = t.cluster_rows("SELECT count(*) FROM quiver.queries WHERE state = 'failed'").await;
    assert_eq!(failed, vec![vec!["2".to_string()]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_insert_leaves_the_table_as_it_was() {
    let t = TestCluster::start(2).await;
    for sql in [
        "CREATE TABLE src (id INT, d INT)",
        "INSERT INTO src SELECT value, value % 5 FROM generate_series(1, 200)",
        "CREATE TABLE dst AS SELECT id FROM src WHERE id <= 10",
    ] {
        t.client.collect(sql).await.unwrap();
    }
    // Tasks on the workers fail part-way (division by zero where d = 0).
    let err = t.client.collect("INSERT INTO dst SELECT id / d FROM src").await.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("divide by zero"), "{err}");
    assert_eq!(t.cluster_rows("SELECT count(*), sum(id) FROM dst").await, vec![vec!["10".to_string(), "55".to_string()]]);
    let table_dir = t.dir.path().join("data/tables/dst");
    let leftovers: Vec<_> = std::fs::read_dir(&table_dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).filter(|n| n.to_string_lossy().starts_with(".staging")).collect();
    assert!(leftovers.is_empty(), "staging files left behind: {leftovers:?}");
    let err = t.client.collect("CREATE TABLE bad AS SELECT id / d FROM src").await.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("divide by zero"), "{err}");
    assert!(t.client.collect("SELECT * FROM bad").await.is_err(), "a failed CTAS must not create its table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_run_as_tasks_that_each_write_one_file() {
    let t = TestCluster::start(3).await;
    t.client.collect("CREATE TABLE a AS SELECT value AS v FROM generate_series(1, 5000)").await.unwrap();
    let rows = t.cluster_rows("INSERT INTO a SELECT v + 5000 FROM a").await;
    assert_eq!(rows, vec![vec!["5000".to_string()]]);
    let tasks = t.cluster_rows("SELECT count(*) FROM quiver.tasks t JOIN quiver.queries q USING (query_id) WHERE q.sql LIKE 'INSERT INTO a%' AND t.state = 'succeeded'").await;
    let tasks: usize = tasks[0][0].parse().unwrap();
    assert!(tasks > 1, "the INSERT should have run as several write Tasks, got {tasks}");
    t.check_same_count("SELECT count(DISTINCT v), min(v), max(v) FROM a", vec!["10000", "1", "10000"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prepared_insert_runs_and_commits_as_an_insert_does() {
    // Regression: EXECUTE of an INSERT prepared in SQL ran DataFusion's own insert on the
    // coordinator, which wrote into the table's directory outside the catalog's commit.
    let t = TestCluster::start(2).await;
    t.client.collect("CREATE TABLE pa AS SELECT value AS v FROM generate_series(1, 5000)").await.unwrap();
    t.client.collect("PREPARE grow(BIGINT) AS INSERT INTO pa SELECT v + $1 FROM pa").await.unwrap();
    assert_eq!(t.cluster_rows("EXECUTE grow(5000)").await, vec![vec!["5000".to_string()]]);
    let table_dir = t.dir.path().join("data/tables/pa");
    let segments = std::fs::read_dir(&table_dir).unwrap().filter_map(|e| e.ok()).filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count();
    assert_eq!(segments, 2, "the INSERT committed a segment of its own");
    t.check_same_count("SELECT count(DISTINCT v), min(v), max(v) FROM pa", vec!["10000", "1", "10000"]).await;
    t.client.collect("PREPARE few(BIGINT) AS SELECT count(*) FROM pa WHERE v <= $1").await.unwrap();
    assert_eq!(t.cluster_rows("EXECUTE few(10)").await, vec![vec!["10".to_string()]]);
}

/// Regression: a scan limited as a single partition, then spread by round-robin, was cut into
/// Tasks that each applied the limit; the merge did not apply it again (returned 8, not 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limit_in_single_partition_scan_is_applied_after_merging_tasks() {
    let t = TestCluster::start(2).await;
    for s in ["CREATE TABLE ol_t (id INT)", "INSERT INTO ol_t SELECT value FROM generate_series(1, 40)", "INSERT INTO ol_t SELECT value FROM generate_series(41, 70)"] {
        t.client.collect(s).await.unwrap();
    }
    assert_eq!(t.cluster_rows("SELECT count(*) FROM (SELECT id FROM ol_t LIMIT 7)").await, vec![vec!["7".to_string()]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shuffle_outputs_are_freed_after_success_failure_and_cancellation() {
    // 4 MiB per worker: 2 MiB for outputs, so the shuffled probe side spills to disk.
    let t = TestCluster::start_with(3, quiver::config::WorkerConfig { slots: 2, memory_limit_bytes: 4 << 20, ..Default::default() }).await;
    t.run_all(&[
        "CREATE TABLE wide AS SELECT value AS id, concat(CAST(value AS VARCHAR), repeat('x', 100)) AS s FROM generate_series(1, 150000)",
        "CREATE TABLE small AS SELECT value AS k FROM generate_series(0, 9)",
    ])
    .await;
    t.run_all(&SHUFFLE_JOINS).await;
    // The wide strings travel through the shuffle (max(s) needs them after the join).
    let join = "SELECT count(*), max(w.s) FROM wide w JOIN small ON w.id % 10 = small.k";
    let largest = format!("9{}", "x".repeat(100));
    assert_eq!(t.cluster_rows(join).await, vec![vec!["150000".to_string(), largest]]);
    let spilled: u64 = t.cluster.workers.iter().flatten().map(|w| w.spilled_parts_total()).sum();
    assert!(spilled > 0, "the shuffle should have spilled beyond the output budget");
    assert_workers_idle(&t, "success").await;

    // Fails in the Stage after the shuffle, when the producers' outputs exist.
    let failing = "SELECT count(*), sum(1 / (small.k - small.k)) FROM wide w JOIN small ON w.id % 10 = small.k";
    let err = t.client.collect(failing).await.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("divide by zero"), "{err}");
    assert_workers_idle(&t, "failure").await;

    let stream = t.client.query(join).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    drop(stream);
    assert_workers_idle(&t, "cancellation").await;
    let states = t.cluster_rows(&format!("SELECT state FROM quiver.queries WHERE sql = '{}' ORDER BY started", join.replace('\'', "''"))).await;
    assert_eq!(states.last().map(|r| r[0].as_str()), Some("cancelled"), "{states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_queries_run_at_once_and_each_gets_its_own_answer() {
    let t = TestCluster::start(3).await;
    t.client.collect("CREATE TABLE c AS SELECT value AS v, value % 13 AS k FROM generate_series(1, 20000)").await.unwrap();
    let queries: Vec<String> = (0..6).map(|i| format!("SELECT count(*), sum(v) FROM c WHERE k = {i}")).collect();
    let results = futures::future::join_all(queries.iter().map(|q| t.cluster_rows(q))).await;
    for (q, rows) in queries.iter().zip(results) {
        assert_eq!(rows, t.single_rows_after_copy(q, "c").await, "{q}");
    }
    // Every Attempt a worker took says which kind of slot it ran in.
    let lanes = t.cluster_rows("SELECT lane, count(*) FROM quiver.tasks WHERE state = 'succeeded' GROUP BY lane ORDER BY lane").await;
    assert!(!lanes.is_empty() && lanes.iter().all(|r| r[0] == "regular" || r[0] == "express"), "{lanes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_messages_are_rejected_and_the_coordinator_keeps_serving() {
    use arrow_flight::sql::{ProstMessageExt, TicketStatementQuery};
    use arrow_flight::{Action, FlightClient, Ticket};
    use prost::Message;
    let t = TestCluster::start(1).await;
    let channel = tonic::transport::Endpoint::from_shared(t.cluster.url()).unwrap().connect().await.unwrap();
    let mut raw = FlightClient::new(channel);
    // A member of the cluster, so that what is checked is the message, not who sent it.
    let member = t.cluster.member_security("raw").credentials.header().unwrap();
    raw.add_header("authorization", &member).unwrap();
    let err = raw.do_get(Ticket::new(vec![0xff, 0xff, 0xff, 0x01])).await.err().expect("garbage ticket must fail");
    assert!(err.to_string().contains("invalid argument") && err.to_string().contains("DecodeError"), "{err}");
    // A well-formed Flight SQL ticket whose Query does not exist.
    let unknown = TicketStatementQuery { statement_handle: "q-nonexistent".into() };
    let err = raw.do_get(Ticket::new(unknown.as_any().encode_to_vec())).await.err().expect("unknown handle must fail");
    assert!(err.to_string().contains("no result waits for handle 'q-nonexistent'"), "{err}");
    let err = raw.do_action(Action::new("poll_task", vec![0x0a, 0xff])).await.err().expect("garbage action must fail");
    assert!(err.to_string().contains("malformed"), "{err}");
    let err = raw.do_action(Action::new("no_such_action", vec![])).await.err().expect("unknown action must fail");
    assert!(err.to_string().contains("unknown action"), "{err}");
    assert_eq!(t.cluster_rows("SELECT 7 AS x").await, vec![vec!["7".to_string()]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_cancels_its_query() {
    let t = TestCluster::start(2).await;
    t.client.collect("CREATE TABLE big AS SELECT value AS v FROM generate_series(1, 50000)").await.unwrap();
    let stream = t.client.query("SELECT v FROM big").await.unwrap();
    drop(stream);
    for _ in 0..100 {
        let rows = t.cluster_rows("SELECT state FROM quiver.queries WHERE sql = 'SELECT v FROM big'").await;
        if rows == vec![vec!["cancelled".to_string()]] {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the query was not recorded as cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_shows_the_stage_dag_and_explain_analyze_what_each_stage_did() {
    let t = TestCluster::start(2).await;
    t.run_all(&[
        "CREATE TABLE ea AS SELECT value AS id, value % 10 AS g FROM generate_series(1, 2000)",
        "INSERT INTO ea SELECT value AS id, value % 10 AS g FROM generate_series(2001, 5000)",
        "CREATE TABLE eb AS SELECT value AS id FROM generate_series(1, 2000, 2)",
        "INSERT INTO eb SELECT value AS id FROM generate_series(2001, 5000, 2)",
    ])
    .await;
    t.run_all(&SHUFFLE_JOINS).await;
    let sql = "SELECT ea.g, count(*) FROM ea JOIN eb ON ea.id = eb.id GROUP BY ea.g";
    let explain = t.cluster_rows(&format!("EXPLAIN {sql}")).await;
    let kinds: Vec<&str> = explain.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(kinds, ["logical_plan", "physical_plan", "distributed_plan"]);
    let dag = &explain[2][1];
    for expected in ["output shuffle into 3 partitions", "HashJoinExec: mode=Partitioned", "StageReaderExec", "Final stage [coordinator]"] {
        assert!(dag.contains(expected), "EXPLAIN lacks '{expected}':\n{dag}");
    }
    let analyze = t.cluster_rows(&format!("EXPLAIN ANALYZE {sql}")).await;
    let dag = &analyze[0][1];
    let stages: Vec<&str> = dag.lines().filter(|l| l.starts_with("Stage ")).collect();
    assert!(stages.len() >= 3, "{dag}");
    assert!(stages.iter().all(|l| l.contains("rows=") && l.contains("bytes_out=") && l.contains("elapsed_ms=")), "{dag}");
    // Odd ids join: groups 1, 3, 5, 7 and 9.
    assert!(analyze[1][1].starts_with("rows=5,"), "{:?}", analyze[1]);
    let moved = t.cluster_rows("SELECT bytes_shuffled, bytes_gathered FROM quiver.queries WHERE sql LIKE 'EXPLAIN ANALYZE%'").await;
    assert!(moved[0][0].parse::<u64>().unwrap() > 0 && moved[0][1].parse::<u64>().unwrap() > 0, "{moved:?}");
}

/// A worker of another build is refused at registration, with an error that names both builds:
/// it would decode the coordinator's Task plans wrongly or not at all. The cluster keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_of_another_build_is_refused_at_registration() {
    use quiver::protocol::{action, build_version, classify, error_text, ErrorKind, RegisterWorker, RegisterWorkerResponse};
    use quiver::transport::{call, connect};
    let t = TestCluster::start(1).await;
    let coordinator = connect(&t.cluster.url(), &t.cluster.member_security("old-worker")).await.unwrap();
    for version in ["quiver 0.0.9 (DataFusion 54.0.0)", ""] {
        let register = RegisterWorker { address: t.cluster.url(), slots: 1, memory_limit_bytes: 1 << 30, express_slots: 0, version: version.into() };
        let error = call::<_, RegisterWorkerResponse>(&coordinator, action::REGISTER_WORKER, &register).await.expect_err("another build");
        assert_eq!(classify(&error).kind, ErrorKind::Configuration, "{error}");
        let text = error_text(&error);
        assert!(text.contains(&build_version()) && text.contains("same build"), "{text}");
    }
    assert_eq!(t.cluster_rows("SELECT count(*) FROM quiver.workers").await, [["1"]]);
    t.both("CREATE TABLE after_refusal AS SELECT value AS v FROM generate_series(1, 100)").await;
    t.check_same("SELECT sum(v) FROM after_refusal").await;
}

/// A worker that takes a Task and then never hears of it again (the poll reply was lost on the
/// way) while it keeps heartbeating: the Attempt is declared unacknowledged and runs again on
/// another worker, and the Query neither waits forever nor loses the Task's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_whose_assignment_was_lost_runs_again_elsewhere() {
    use quiver::protocol::{action, build_version, Heartbeat, HeartbeatResponse, PollTask, PollTaskResponse, RegisterWorker, RegisterWorkerResponse};
    use quiver::transport::{call, connect};
    let mut t = TestCluster::start(0).await;
    t.client.collect("CREATE TABLE lost AS SELECT value AS v FROM generate_series(1, 1000)").await.unwrap();
    // Speculation would run the Task elsewhere before the assignment is found lost.
    t.client.collect("SET quiver.speculation = false").await.unwrap();
    let coordinator = connect(&t.cluster.url(), &t.cluster.member_security("fake-worker")).await.unwrap();
    // The coordinator dials a worker's address before accepting it: the fake one gives the
    // coordinator's own, which answers, and is never asked for an output.
    let register = RegisterWorker { address: t.cluster.url(), slots: 1, memory_limit_bytes: 1 << 30, express_slots: 0, version: build_version() };
    let worker: RegisterWorkerResponse = call(&coordinator, action::REGISTER_WORKER, &register).await.unwrap();
    let client = t.client.clone();
    let query = tokio::spawn(async move { client.collect("SELECT sum(v) FROM lost WHERE v % 3 = 0").await });
    let beat = Heartbeat { worker_id: worker.worker_id.clone(), session: worker.session, ..Default::default() };
    let poll = PollTask { worker_id: worker.worker_id.clone(), session: worker.session, max_tasks: 1, express_tasks: 0 };
    let taken = loop {
        let reply: PollTaskResponse = call(&coordinator, action::POLL_TASK, &poll).await.unwrap();
        if let Some(task) = reply.task {
            break task;
        }
    };
    // A real worker joins; the fake one stays alive but holds nothing: the assignment never arrived.
    t.cluster.add_worker().await.unwrap();
    let started = std::time::Instant::now();
    while !query.is_finished() && started.elapsed() < std::time::Duration::from_secs(30) {
        let _: HeartbeatResponse = call(&coordinator, action::HEARTBEAT, &beat).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let rows = common::rows(&query.await.unwrap().expect("the query succeeds").1);
    assert_eq!(rows, vec![vec!["166833".to_string()]]);
    let key = taken.key.unwrap();
    let attempts = t
        .cluster_rows(&format!(
            "SELECT attempt, worker_id, state, started_as, cause FROM quiver.tasks WHERE query_id = '{}' AND stage = {} AND task = {} ORDER BY attempt",
            key.query_id, key.stage, key.task
        ))
        .await;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0][1..], [worker.worker_id.clone(), "failed".into(), "first".into(), "unacknowledged".into()]);
    assert_eq!(attempts[1][2..4], ["succeeded".to_string(), "retry".to_string()]);
    assert_ne!(attempts[1][1], worker.worker_id, "the retry runs on another worker");
}

/// A worker that missed a Query's release (unreachable when the Query ended) lists the Query in
/// its heartbeats, and the coordinator names it as ended, so that its outputs are freed; a
/// Query still running is not named.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_heartbeat_names_the_held_queries_that_have_ended() {
    use quiver::protocol::{action, build_version, Heartbeat, HeartbeatResponse, RegisterWorker, RegisterWorkerResponse};
    use quiver::transport::{call, connect};
    let t = TestCluster::start(1).await;
    t.client.collect("CREATE TABLE held AS SELECT value AS v FROM generate_series(1, 1000)").await.unwrap();
    t.client.collect("SELECT sum(v) FROM held").await.unwrap();
    let ended = t.cluster_rows("SELECT query_id FROM quiver.queries WHERE sql = 'SELECT sum(v) FROM held'").await[0][0].clone();
    let running = t.client.start("SELECT count(*) FROM held").await.unwrap();
    let coordinator = connect(&t.cluster.url(), &t.cluster.member_security("forgetful")).await.unwrap();
    let register = RegisterWorker { address: t.cluster.url(), slots: 1, memory_limit_bytes: 1 << 30, express_slots: 0, version: build_version() };
    let worker: RegisterWorkerResponse = call(&coordinator, action::REGISTER_WORKER, &register).await.unwrap();
    let held_queries = vec![ended.clone(), running.handle.clone(), "q-long-forgotten".to_string()];
    let beat = Heartbeat { worker_id: worker.worker_id, session: worker.session, held_queries, ..Default::default() };
    let reply: HeartbeatResponse = call(&coordinator, action::HEARTBEAT, &beat).await.unwrap();
    assert!(reply.known);
    assert_eq!(reply.ended_queries, vec![ended, "q-long-forgotten".to_string()]);
    let stream = t.client.fetch(&running).await.unwrap();
    let batches: Vec<_> = futures::TryStreamExt::try_collect(stream).await.unwrap();
    assert_eq!(common::rows(&batches), vec![vec!["1000".to_string()]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registering_tpch_at_another_scale_replaces_the_tables_of_the_first() {
    // Regression: `quiver local --tpch 0.1` on a data directory first used at 0.01 kept the
    // 0.01 tables (CREATE ... IF NOT EXISTS), silently.
    let t = TestCluster::start(1).await;
    for (sf, lineitems) in [(0.001, "6005"), (0.002, "11957")] {
        let dir = quiver::tpch::generate(t.dir.path(), sf, quiver::tpch::Layout::for_scale(sf)).unwrap();
        t.run_all(&quiver::tpch::create_tables_sql(&dir).iter().map(String::as_str).collect::<Vec<_>>()).await;
        assert_eq!(t.cluster_rows("SELECT count(*) FROM lineitem").await, vec![vec![lineitems.to_string()]], "sf {sf}");
    }
}

/// Regression (DataFusion's window.slt, pwmj.slt): an error longer than HTTP/2 lets a header be
/// (an internal error that prints a plan) broke the response, and the client's next statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_very_long_error_reaches_the_client_cut_short_and_the_connection_keeps_working() {
    let t = TestCluster::start(1).await;
    let name = "f".repeat(20_000);
    let err = t.client.collect(&format!("SELECT {name}(1)")).await.unwrap_err().to_string();
    assert!(err.contains("Invalid function") && err.contains("more bytes)") && err.len() < 8_192, "{}", &err[..200.min(err.len())]);
    assert_eq!(t.cluster_rows("SELECT 7 AS x").await, vec![vec!["7".to_string()]]);
}

/// A quoted table name may hold `/` and `..`: the table's files stay under the data directory,
/// and dropping it removes nothing outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_name_cannot_reach_outside_the_data_directory() {
    let t = TestCluster::start(1).await;
    let outside = t.dir.path().join("outside");
    std::fs::create_dir_all(outside.join("keep")).unwrap();
    t.run_all(&[r#"CREATE TABLE "../../outside" AS SELECT 1 AS x"#]).await;
    assert_eq!(t.cluster_rows(r#"SELECT x FROM "../../outside""#).await, vec![vec!["1".to_string()]]);
    assert!(std::fs::read_dir(&outside).unwrap().count() == 1, "a table wrote beside the data directory");
    t.run_all(&[r#"DROP TABLE "../../outside""#]).await;
    assert!(outside.join("keep").exists(), "DROP TABLE removed a directory outside the data directory");
}

/// A query whose table files hold a few KiB is not worth a round trip to a worker: it runs on the
/// coordinator alone, says so in `quiver.queries` and EXPLAIN, and answers exactly the same. A
/// larger one is still distributed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_query_over_small_files_runs_on_the_coordinator_and_says_so() {
    let mut config = many_tasks_config();
    config.planner.small_query_max_bytes = 64 * 1024;
    let t = TestCluster::start_configured(2, quiver::config::WorkerConfig { slots: 2, memory_limit_bytes: 1 << 30, ..Default::default() }, config, None).await;
    t.both("CREATE TABLE tiny AS SELECT value AS k, value * 2 AS v FROM generate_series(1, 100)").await;
    t.both("CREATE TABLE big AS SELECT value AS k, value * 2 AS v FROM generate_series(1, 200000)").await;
    let small = "SELECT k, v FROM tiny WHERE k = 42";
    let joined = "SELECT count(*), sum(b.v) FROM big b JOIN tiny t ON b.k = t.k";
    for sql in [small, joined] {
        t.check_same(sql).await;
    }
    let modes = t.cluster_rows(&format!("SELECT sql, mode, tasks FROM quiver.queries WHERE sql IN ('{small}', '{joined}') ORDER BY sql")).await;
    assert_eq!(modes[0][..2], [joined.to_string(), "distributed".into()]);
    assert_ne!(modes[0][2], "0", "the join runs as Tasks");
    assert_eq!(modes[1], [small.to_string(), "small".into(), "0".into()]);
    let explain = t.cluster_rows(&format!("EXPLAIN {small}")).await;
    let dag = &explain.iter().find(|r| r[0] == "distributed_plan").expect("a distributed_plan row")[1];
    assert!(dag.starts_with("Runs on the coordinator alone"), "{dag}");
}

/// A lookup that row-group statistics narrow to a few KiB is small too, however large its
/// table: the coordinator reads the footers, prunes as the scan will, and runs it alone, where
/// it does not queue behind other Queries' Tasks. What the predicate does not narrow, and what a
/// join's build side filters only at run time, stays distributed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lookup_that_row_group_statistics_narrow_runs_on_the_coordinator() {
    let mut config = many_tasks_config();
    config.planner.small_query_max_bytes = 512 * 1024; // the table's file holds about 7 MB
    config.write_row_group_rows = 4096;
    let t = TestCluster::start_configured(2, quiver::config::WorkerConfig { slots: 2, memory_limit_bytes: 1 << 30, ..Default::default() }, config, None).await;
    t.both("CREATE TABLE wide AS SELECT value AS k, value * 2 AS v, concat('row ', CAST(value AS VARCHAR)) AS s FROM generate_series(1, 300000)").await;
    t.both("CREATE TABLE keys AS SELECT value * 1000 AS k FROM generate_series(1, 3)").await;
    let lookup = "SELECT k, v, s FROM wide WHERE k = 4242";
    let range = "SELECT count(*), sum(v) FROM wide WHERE k BETWEEN 100 AND 4200";
    let broad = "SELECT count(*), sum(v) FROM wide WHERE k > 10";
    let joined = "SELECT count(*), sum(w.v) FROM wide w JOIN keys USING (k)";
    for sql in [lookup, range, broad, joined] {
        t.check_same(sql).await;
    }
    let rows = t.cluster_rows(&format!("SELECT sql, mode FROM quiver.queries WHERE sql IN ('{lookup}', '{range}', '{broad}', '{joined}')")).await;
    let mode = |sql: &str| rows.iter().find(|r| r[0] == sql).map(|r| r[1].clone()).unwrap_or_else(|| panic!("{sql} not in quiver.queries: {rows:?}"));
    assert_eq!(mode(lookup), "small");
    assert_eq!(mode(range), "small");
    assert_eq!(mode(broad), "distributed");
    assert_eq!(mode(joined), "distributed");
    let explain = t.cluster_rows(&format!("EXPLAIN {lookup}")).await;
    let dag = &explain.iter().find(|r| r[0] == "distributed_plan").expect("a distributed_plan row")[1];
    assert!(dag.starts_with("Runs on the coordinator alone: its scans read"), "{dag}");
}

/// Parquet's magic at both ends of `body`, and a footer claiming `metadata_len` bytes of
/// metadata: a file that is Parquet by its name and its first and last bytes only.
fn corrupt_parquet(body: usize, metadata_len: u32) -> Vec<u8> {
    let mut bytes = b"PAR1".to_vec();
    bytes.extend(std::iter::repeat_n(7u8, body));
    bytes.extend(metadata_len.to_le_bytes());
    bytes.extend(b"PAR1");
    bytes
}

/// `file_row_index()` adds a virtual column to its Parquet scan, which DataFusion 55's plan
/// encoding drops: a worker's Task failed with "Column index 1 out of bounds for projected
/// expressions of length 1". Such a scan is not sent to the workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scan_with_file_row_index_stays_on_the_coordinator() {
    let t = TestCluster::start(2).await;
    let dir = t.dir.path().join("indexed");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = format!("COPY (SELECT value AS v FROM generate_series(1, 5000)) TO '{}/data.parquet'", dir.display());
    t.single.sql(&copy).await.unwrap().collect().await.unwrap();
    t.both(&format!("CREATE EXTERNAL TABLE indexed (v BIGINT) STORED AS PARQUET LOCATION '{}/'", dir.display())).await;
    t.check_same("SELECT file_row_index() AS i, v FROM indexed WHERE file_row_index() % 7 = 3 ORDER BY v").await;
    t.check_same("SELECT count(*), sum(file_row_index()) FROM indexed").await;
    let explain = t.cluster_rows("EXPLAIN SELECT file_row_index() AS i, v FROM indexed").await;
    let dag = &explain.iter().find(|r| r[0] == "distributed_plan").expect("a distributed plan")[1];
    assert!(dag.contains("keeps file scans because DataFusion's plan encoding would lose a file scan's virtual columns"), "{dag}");
    t.check_same("SELECT count(*), sum(v) FROM indexed").await;
    let modes = t.cluster_rows("SELECT mode FROM quiver.queries WHERE sql LIKE 'SELECT count(*), sum(v)%'").await;
    assert_eq!(modes, [["distributed"]], "a scan without the virtual column is still distributed");
}

/// A footer the small-query estimate cannot read (a corrupt Parquet file appears beside a good
/// one) makes the Query "not small", never wrong: it is distributed, its scan meets the same file
/// and the client gets the Parquet error naming it. A file whose footer makes the Parquet reader
/// panic (its metadata would start before the file: a subtraction that overflows in a debug
/// build) fails its statement with an error too, and the cluster goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_parquet_file_fails_its_statement_with_an_error() {
    let mut config = many_tasks_config();
    config.planner.small_query_max_bytes = 64 * 1024; // the good file alone is over this
    let t = TestCluster::start_configured(2, quiver::config::WorkerConfig { slots: 2, memory_limit_bytes: 1 << 30, ..Default::default() }, config, None).await;
    let dir = t.dir.path().join("corrupt");
    std::fs::create_dir_all(&dir).unwrap();
    let rows = "SELECT value AS k, concat('row ', CAST(value AS VARCHAR)) AS s FROM generate_series(1, 100000)";
    let copy = format!("COPY ({rows}) TO '{}/good.parquet'", dir.display());
    t.single.sql(&copy).await.unwrap().collect().await.unwrap();
    std::fs::write(dir.join("torn.parquet"), corrupt_parquet(2048, 100)).unwrap();
    // With its schema given and no statistics to gather, creating the table reads no footer.
    t.run_all(&[
        "SET datafusion.execution.collect_statistics = false",
        &format!("CREATE EXTERNAL TABLE torn (k BIGINT, s VARCHAR) STORED AS PARQUET LOCATION '{}/'", dir.display()),
    ])
    .await;
    let lookup = "SELECT k, s FROM torn WHERE k = 4242";
    let error = t.client.collect(lookup).await.expect_err("a corrupt file cannot be read").to_string();
    assert!(error.to_lowercase().contains("parquet") && error.contains("torn.parquet"), "{error}");
    let mode = t.cluster_rows(&format!("SELECT mode, state FROM quiver.queries WHERE sql = '{lookup}'")).await;
    assert_eq!(mode, [["distributed", "failed"]], "the estimate fell back to distributing");

    let overflowing = t.dir.path().join("overflowing");
    std::fs::create_dir_all(&overflowing).unwrap();
    std::fs::write(overflowing.join("x.parquet"), corrupt_parquet(16, u32::MAX)).unwrap();
    let create = format!("CREATE EXTERNAL TABLE overflowing STORED AS PARQUET LOCATION '{}/'", overflowing.display());
    let error = t.client.collect(&create).await.expect_err("the file's metadata cannot be read").to_string();
    assert!(!error.contains("h2 protocol error"), "the statement's own error, not a dropped stream: {error}");
    t.both("CREATE TABLE after_corrupt AS SELECT value AS v FROM generate_series(1, 1000)").await;
    t.check_same("SELECT count(*), sum(v) FROM after_corrupt").await;
}

/// A panic while a result is computed is the statement's error, and the cluster goes on:
/// on the coordinator (a plan that reads no files runs there) and in a worker's Task. DataFusion
/// 55's `lpad` to a width past `isize::MAX` panics (capacity overflow); should a later
/// DataFusion answer with an error instead, this still holds. Regression: on the coordinator,
/// the client saw only `h2 protocol error: error reading a body from connection (Cancelled)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panic_while_the_result_streams_fails_its_statement_with_an_error() {
    let t = TestCluster::start(2).await;
    t.both("CREATE TABLE streams_t AS SELECT value AS v FROM generate_series(1, 1000)").await;
    let huge = "SELECT lpad('x', c * 4611686018427387904) FROM (SELECT count(*) AS c FROM";
    for (sql, mode) in [(format!("{huge} generate_series(1, 2))"), "coordinator"), (format!("{huge} streams_t WHERE v < 3)"), "distributed")] {
        let error = t.client.collect(&sql).await.expect_err("no string is that long").to_string();
        assert!(!error.contains("h2 protocol error"), "the statement's own error, not a dropped stream: {error}");
        let state = t.cluster_rows(&format!("SELECT mode, state FROM quiver.queries WHERE sql = '{}'", sql.replace('\'', "''"))).await;
        assert_eq!(state, [[mode, "failed"]], "{sql}");
    }
    t.check_same("SELECT count(*), sum(v) FROM streams_t").await;
}

/// The scalar subqueries of a query run at once, each as a Query of its own, and the answer is
/// single node's. Concurrent: the second began before the first ended (each is recorded with
/// its start and duration in whole milliseconds; run one after the other, the second would
/// start no earlier than the first's start plus its duration).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scalar_subqueries_run_at_once_and_answer_as_single_node() {
    let t = TestCluster::start(2).await;
    t.both("CREATE TABLE sq_t AS SELECT value AS v, value % 7 AS k FROM generate_series(1, 20000)").await;
    let sql = "SELECT k, count(*) FROM sq_t WHERE v > (SELECT avg(v) FROM sq_t WHERE k = 3) AND v < (SELECT max(v) - 100 FROM sq_t WHERE k = 5) GROUP BY k";
    t.check_same(sql).await;
    let outer = format!("(SELECT query_id FROM quiver.queries WHERE sql = '{}' ORDER BY started DESC LIMIT 1)", sql.replace('\'', "''"));
    let rows = t
        .cluster_rows(&format!(
            "SELECT query_id, mode, state, CAST(started AS BIGINT), duration_ms FROM quiver.queries \
             WHERE query_id LIKE {outer} || '.sq%' ORDER BY query_id"
        ))
        .await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in &rows {
        assert_eq!(row[1..3], ["distributed", "succeeded"], "{rows:?}");
    }
    let ms = |row: usize, col: usize| rows[row][col].parse::<i64>().unwrap();
    assert!(ms(1, 3) < ms(0, 3) + ms(0, 4), "the second subquery started after the first ended: {rows:?}");
    // One that fails fails the query with its error, and none is left running.
    let failing = "SELECT count(*) FROM sq_t WHERE v > (SELECT v FROM sq_t WHERE k = 1) AND v < (SELECT max(v) FROM sq_t WHERE k = 5)";
    let error = t.client.collect(failing).await.expect_err("the first subquery returns many rows").to_string();
    assert!(error.contains("more than one row"), "{error}");
    let running = t.cluster_rows("SELECT query_id FROM quiver.queries WHERE state = 'running' AND query_id LIKE '%.sq%'").await;
    assert!(running.is_empty(), "{running:?}");
    t.check_same(sql).await;
}

/// Scalar subqueries read at every kind of place: in a scan's filter, a HAVING, a projection,
/// one side of a join, a nested subquery, two operators at once, and a plan small enough to
/// run on the coordinator. A Query runs beside its subqueries and holds the Stages that read a
/// value until it is in; the answers are single node's, with that on and off.
const SUBQUERY_READERS: [&str; 7] = [
    "SELECT k, count(*) FROM ov_t WHERE v > (SELECT avg(v) FROM ov_t WHERE k = 3) GROUP BY k",
    "SELECT k, sum(v) AS s FROM ov_t GROUP BY k HAVING sum(v) > (SELECT sum(v) / 8 FROM ov_t)",
    "SELECT k, max(v) - (SELECT min(v) FROM ov_t WHERE k = 2) FROM ov_t GROUP BY k",
    "SELECT a.k, count(*) FROM ov_t a JOIN ov_u b ON a.v = b.id WHERE b.w < (SELECT avg(w) FROM ov_u) GROUP BY a.k",
    "SELECT count(*) FROM ov_t WHERE v > (SELECT max(id) FROM ov_u WHERE w < (SELECT avg(w) FROM ov_u))",
    "SELECT a.k, count(*) FROM ov_t a JOIN ov_u b ON a.v = b.id WHERE a.v > (SELECT min(id) + 10 FROM ov_u) GROUP BY a.k HAVING count(*) > (SELECT count(*) / 100 FROM ov_u WHERE w = 1)",
    "SELECT count(*) FROM ov_u WHERE id = (SELECT max(id) FROM ov_u WHERE w = 2)",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_query_runs_beside_its_scalar_subqueries_and_answers_as_single_node() {
    let t = TestCluster::start(2).await;
    t.both("CREATE TABLE ov_t AS SELECT value AS v, value % 7 AS k FROM generate_series(1, 40000)").await;
    t.both("CREATE TABLE ov_u AS SELECT value * 3 AS id, value % 5 AS w FROM generate_series(1, 10000)").await;
    for overlap in [true, false] {
        t.run_all(&[&format!("SET quiver.overlap_subqueries = {overlap}")]).await;
        for sql in SUBQUERY_READERS {
            t.check_same(sql).await;
        }
    }
    t.run_all(&["SET quiver.overlap_subqueries = true"]).await;
    // Beside: the Query's Attempts began before its (heavier) subquery ended. Its partial
    // aggregation reads no value; only its last Stage, with the HAVING, waits for it. Off,
    // nothing of the Query starts before the subquery ends.
    let sql = "SELECT k, sum(v) FROM ov_t GROUP BY k \
               HAVING sum(v) > (SELECT count(*) FROM ov_t x JOIN ov_t y ON x.k = y.k WHERE x.v < 2000 AND y.v < 2000) * 200";
    let dag = &t.cluster_rows(&format!("EXPLAIN {sql}")).await[2][1];
    let main = dag.split("Main query:").nth(1).expect("the main query's Stages follow its subquery's");
    let last = main.lines().filter(|l| l.starts_with("Stage ")).count() - 1;
    assert!(main.ends_with(&format!("Held until the scalar subquery values are in: stage {last}\n")), "{dag}");
    for overlap in [true, false] {
        t.run_all(&[&format!("SET quiver.overlap_subqueries = {overlap}")]).await;
        t.check_same(sql).await;
        let (first, having, ended) = subquery_timeline(&t, sql).await;
        // Whole milliseconds: an end rounds down by up to one.
        assert!(having >= ended - 1, "the HAVING Stage began ({having}) before its subquery ended ({ended})");
        assert_eq!(first < ended - 1, overlap, "overlap {overlap}: first Attempt at {first}, subquery ended at {ended}");
    }
    t.run_all(&["SET quiver.overlap_subqueries = true"]).await;
    // A Query that fails while its subquery runs fails at once, cancelling the subquery.
    let divides = "SELECT k, sum(v / (v - v)) FROM ov_t GROUP BY k \
                   HAVING sum(v) > (SELECT count(*) FROM ov_t x JOIN ov_t y ON x.k = y.k WHERE x.v < 6000 AND y.v < 6000)";
    let error = t.client.collect(divides).await.expect_err("v - v is 0").to_string();
    assert!(error.to_lowercase().contains("divide by zero"), "{error}");
    let states = t
        .cluster_rows(&format!(
            "SELECT state FROM quiver.queries WHERE query_id LIKE (SELECT query_id FROM quiver.queries WHERE sql = '{}') || '%' ORDER BY query_id",
            divides.replace('\'', "''")
        ))
        .await;
    assert_eq!(states, [["failed"], ["cancelled"]]);
    // A subquery that fails fails its Query, which was already running: nothing stays running.
    let failing = "SELECT a.k, count(*) FROM ov_t a JOIN ov_u b ON a.v = b.id WHERE a.v > (SELECT v FROM ov_t WHERE k = 1) GROUP BY a.k";
    let error = t.client.collect(failing).await.expect_err("the subquery returns many rows").to_string();
    assert!(error.contains("more than one row"), "{error}");
    let running = t.cluster_rows("SELECT query_id, sql FROM quiver.queries WHERE state = 'running' AND sql NOT LIKE '%quiver.queries%'").await;
    assert!(running.is_empty(), "{running:?}");
    let failed = t.cluster_rows(&format!("SELECT state FROM quiver.queries WHERE sql = '{}'", failing.replace('\'', "''"))).await;
    assert_eq!(failed, [["failed"]]);
    t.check_same(SUBQUERY_READERS[0]).await;
}

/// When the last run of `sql` began its first Attempt, when its last Stage began, and when its
/// subquery ended, in milliseconds.
async fn subquery_timeline(t: &TestCluster, sql: &str) -> (i64, i64, i64) {
    let outer = format!("(SELECT query_id FROM quiver.queries WHERE sql = '{}' ORDER BY started DESC LIMIT 1)", sql.replace('\'', "''"));
    let ended = format!("SELECT CAST(started AS BIGINT) + duration_ms FROM quiver.queries WHERE query_id = {outer} || '.sq0'");
    let first = format!("SELECT CAST(min(started) AS BIGINT) FROM quiver.tasks WHERE query_id = {outer}");
    let last = format!(
        "SELECT CAST(min(started) AS BIGINT) FROM quiver.tasks WHERE query_id = {outer} \
         AND stage = (SELECT max(stage) FROM quiver.tasks WHERE query_id = {outer})"
    );
    let mut ms = Vec::new();
    for query in [first, last, ended] {
        ms.push(t.cluster_rows(&query).await[0][0].parse::<i64>().unwrap_or_else(|e| panic!("{query}: {e}")));
    }
    (ms[0], ms[1], ms[2])
}

/// Workers that compress the Task outputs they serve (LZ4, Zstandard) give the answers of
/// workers that do not, through shuffles and gathers: readers decompress what they are sent.
/// In-process reads are off, so that every output crosses Flight (with them on, and no
/// compression: the default of every other test).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_task_outputs_give_the_same_answers() {
    use quiver::config::ShuffleCompression;
    let join = "SELECT count(*), sum(a.id), max(b.s) FROM cz a JOIN cz b ON a.id = b.id + 1";
    let groups = "SELECT k, count(*) FROM cz GROUP BY k ORDER BY k LIMIT 2";
    for compression in [ShuffleCompression::None, ShuffleCompression::Lz4, ShuffleCompression::Zstd] {
        let worker = quiver::config::WorkerConfig { slots: 2, shuffle_compression: compression, in_process_reads: false, ..Default::default() };
        let t = TestCluster::start_with(2, worker).await;
        t.run_all(&["CREATE TABLE cz AS SELECT value AS id, value % 97 AS k, concat('row ', CAST(value AS VARCHAR)) AS s FROM generate_series(1, 50000)"]).await;
        t.run_all(&SHUFFLE_JOINS).await;
        let expected = vec![vec!["49999".to_string(), "1250024999".to_string(), "row 9999".to_string()]];
        assert_eq!(t.cluster_rows(join).await, expected, "{compression:?}");
        assert_eq!(t.cluster_rows(groups).await, vec![vec!["0".to_string(), "515".to_string()], vec!["1".to_string(), "516".to_string()]], "{compression:?}");
    }
}

/// In one process (`quiver local`, these tests) readers take Task outputs straight from the
/// worker holding them; with `in_process_reads` off they cross Flight. Answers are the same,
/// and only the first way skips the network.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn task_outputs_are_read_in_process_when_the_worker_is_in_this_process() {
    use quiver::transport::in_process_reads_total;
    let join = "SELECT count(*), sum(a.id), max(b.s) FROM ip a JOIN ip b ON a.id = b.id + 1";
    let expected = vec![vec!["29999".to_string(), "450014999".to_string(), "row 9999".to_string()]];
    for in_process in [true, false] {
        let worker = quiver::config::WorkerConfig { slots: 2, in_process_reads: in_process, ..Default::default() };
        let t = TestCluster::start_with(2, worker).await;
        t.run_all(&["CREATE TABLE ip AS SELECT value AS id, concat('row ', CAST(value AS VARCHAR)) AS s FROM generate_series(1, 30000)"]).await;
        t.run_all(&SHUFFLE_JOINS).await;
        let before = in_process_reads_total();
        assert_eq!(t.cluster_rows(join).await, expected, "in_process_reads={in_process}");
        let read_here = in_process_reads_total() - before;
        match in_process {
            true => assert!(read_here > 0, "no output was read in-process"),
            false => assert_eq!(read_here, 0, "outputs were read in-process with in_process_reads off"),
        }
    }
}

/// The rows the first Stage of `sql` wrote, from EXPLAIN ANALYZE.
async fn first_stage_rows(t: &TestCluster, sql: &str) -> u64 {
    let analyze = t.cluster_rows(&format!("EXPLAIN ANALYZE {sql}")).await;
    let dag = &analyze[0][1];
    let stage = dag.lines().find(|l| l.starts_with("Stage 0 ")).unwrap_or_else(|| panic!("{dag}"));
    let rows = stage.split("rows=").nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()).unwrap_or_else(|| panic!("{stage}"));
    rows.parse().unwrap()
}

/// A session's execution settings govern its Tasks on the workers, as on one node: with partial
/// aggregation skipped after the first batch (and batches of 16 rows), the partial aggregate
/// Stage writes nearly a row per input row instead of a row per group and Task. Settings a
/// worker must keep are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_execution_settings_reach_the_workers() {
    let t = TestCluster::start(2).await;
    t.both("CREATE TABLE g AS SELECT value % 10 AS k, value AS v FROM generate_series(1, 6000)").await;
    let sql = "SELECT k, count(*), sum(v) FROM g GROUP BY k ORDER BY k";
    t.check_same(sql).await;
    let aggregated = first_stage_rows(&t, sql).await;
    assert!(aggregated < 1000, "{aggregated} rows: the partial aggregate should reduce");
    for setting in [
        "SET datafusion.execution.batch_size = 16",
        "SET datafusion.execution.skip_partial_aggregation_probe_rows_threshold = 0",
        "SET datafusion.execution.skip_partial_aggregation_probe_ratio_threshold = 0",
    ] {
        t.both(setting).await;
    }
    t.check_same(sql).await;
    let skipped = first_stage_rows(&t, sql).await;
    assert!(skipped > 5000, "{skipped} rows: the workers did not skip partial aggregation");
}

/// The session's time zone reaches the workers' functions: `to_timestamp` takes the zone when
/// it is built, and a worker that decoded its Task's plan with its own zone computed timestamps
/// the plan did not declare ("column types must match schema types, expected Timestamp(ns,
/// "+05:00") but found Timestamp(ns)"). A view defined before the SET keeps its own zone, as on
/// one node. DataFusion 55 fails on one node too for string
/// arguments under a session zone, and for named zones: the test converts epoch seconds under
/// fixed offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_session_time_zone_reaches_the_workers_functions() {
    let t = TestCluster::start(2).await;
    t.both("CREATE TABLE stamps AS SELECT value AS id, 1700000000 + value * 4567 AS secs FROM generate_series(1, 3000)").await;
    // A view keeps the functions it was defined with, zone and all, on one node.
    t.both("CREATE VIEW stamps_then AS SELECT id, to_timestamp(secs) AS ts FROM stamps").await;
    let sql = "SELECT id, to_timestamp(secs) AS ts, arrow_typeof(to_timestamp(secs)) AS ty, \
               CAST(to_timestamp(secs) AS VARCHAR) AS txt, date_part('hour', to_timestamp(secs)) AS h FROM stamps ORDER BY id";
    let view = "SELECT id, ts, arrow_typeof(ts) AS ty, CAST(ts AS VARCHAR) AS txt FROM stamps_then ORDER BY id";
    for zone in ["+05:00", "-03:30"] {
        t.both(&format!("SET datafusion.execution.time_zone = '{zone}'")).await;
        t.check_same(sql).await;
        assert_eq!(first_stage_rows(&t, sql).await, 3000, "the projection should run in a worker's Task");
        t.check_same(view).await;
        assert_eq!(first_stage_rows(&t, view).await, 3000, "the view's projection should run in a worker's Task");
    }
}

/// A statement runs under the settings its plan was made with: a `SET` between asking for a
/// result and fetching it (another admin's: settings are coordinator-wide) changes only later
/// statements. Before, the Tasks took the time zone at the first fetch and computed
/// timestamps the plan did not declare.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_statement_runs_under_the_settings_it_was_planned_with() {
    let t = TestCluster::start(2).await;
    t.both("CREATE TABLE stamps AS SELECT value AS id, 1700000000 + value * 4567 AS secs FROM generate_series(1, 3000)").await;
    let sql = "SELECT id, to_timestamp(secs) AS ts, CAST(to_timestamp(secs) AS VARCHAR) AS txt FROM stamps ORDER BY id";
    t.both("SET datafusion.execution.time_zone = '+05:00'").await;
    let statement = t.client.start(sql).await.unwrap();
    t.client.collect("SET datafusion.execution.time_zone = '-03:30'").await.unwrap();
    let fetched = t.client.fetch(&statement).await.unwrap();
    let batches: Vec<datafusion::arrow::array::RecordBatch> =
        futures::TryStreamExt::try_collect(fetched).await.unwrap_or_else(|e| panic!("fetching the result planned at +05:00: {e}"));
    assert_eq!(common::rows(&batches), t.single_rows(sql).await, "the answer under +05:00");
    assert_eq!(first_stage_rows(&t, sql).await, 3000, "the projection should run in a worker's Task");
}

#[test]
fn a_task_may_not_set_what_its_worker_keeps() {
    use std::collections::BTreeMap;
    let mut config = quiver::config::session_config(2);
    for key in ["datafusion.execution.enable_file_stream_work_stealing", "datafusion.execution.target_partitions", "datafusion.optimizer.prefer_hash_join"] {
        let options = BTreeMap::from([(key.to_string(), "true".to_string())]);
        assert!(quiver::config::apply_execution_options(&mut config, &options).is_err(), "{key}");
    }
    assert!(!config.options().execution.enable_file_stream_work_stealing);
    let session = {
        let mut c = quiver::config::session_config(2);
        c.options_mut().set("datafusion.execution.batch_size", "16").unwrap();
        c.options_mut().set("datafusion.execution.target_partitions", "7").unwrap();
        c
    };
    let sent = quiver::config::execution_options(session.options());
    assert_eq!(sent, BTreeMap::from([("datafusion.execution.batch_size".to_string(), "16".to_string())]));
}

/// Waits until the Query running `sql` has been planned into Tasks.
async fn wait_until_planned(t: &TestCluster, sql: &str) {
    let escaped = sql.replace('\'', "''");
    let planned = format!("SELECT tasks FROM quiver.queries WHERE sql = '{escaped}' AND state = 'running' AND tasks > 0");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while t.cluster_rows(&planned).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "{sql} was never planned");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Runs `change` (a DROP or REPLACE of table `name`) while a Query reads the table, whose
/// Tasks wait on the workers first: the Query still answers from the files it planned over,
/// which stay until it ends and go after.
async fn check_a_reader_outlives(t: &TestCluster, name: &str, change: &str) {
    let table_dir = t.dir.path().join("data").join("tables").join(name);
    let old: Vec<std::path::PathBuf> = std::fs::read_dir(&table_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!old.is_empty());
    let sql = format!("SELECT count(*), sum(v) FROM {name}");
    let reader = Client::connect(&t.cluster.url()).await.unwrap();
    let reading = tokio::spawn({
        let sql = sql.clone();
        async move { reader.collect(&sql).await.map(|(_, batches)| rows(&batches)) }
    });
    wait_until_planned(t, &sql).await;
    t.run_all(&[change]).await;
    assert!(old.iter().all(|p| p.exists()), "{change} removed files a running Query reads");
    let answer = reading.await.unwrap().unwrap_or_else(|e| panic!("the Query reading {name} failed: {e}"));
    assert_eq!(answer, vec![vec!["1000".to_string(), "500500".to_string()]]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while old.iter().any(|p| p.exists()) {
        assert!(std::time::Instant::now() < deadline, "the files of {name} outlived the last Query reading them");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Regression: DROP TABLE and CREATE OR REPLACE TABLE removed the table's files at once, so a
/// Query planned over them failed half-way with files not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_query_reading_a_dropped_or_replaced_table_answers_and_its_files_go_after() {
    let worker = WorkerConfig { slots: 2, memory_limit_bytes: 1 << 30, task_delay_ms: 1000, ..WorkerConfig::default() };
    let t = TestCluster::start_with(2, worker).await;
    for name in ["dropped", "replaced"] {
        t.run_all(&[&format!("CREATE TABLE {name} AS SELECT value AS v FROM generate_series(1, 1000)")]).await;
    }
    check_a_reader_outlives(&t, "dropped", "DROP TABLE dropped").await;
    assert!(t.client.collect("SELECT * FROM dropped").await.is_err(), "a dropped table is gone for new Queries");
    check_a_reader_outlives(&t, "replaced", "CREATE OR REPLACE TABLE replaced AS SELECT value AS v FROM generate_series(1, 10)").await;
    assert_eq!(t.cluster_rows("SELECT count(*), sum(v) FROM replaced").await, vec![vec!["10".to_string(), "55".to_string()]]);
}

/// Regression: a view kept the plan it was created with, its table's sources included, so it
/// missed rows inserted since, read a replaced table's old rows, and a dropped table's files.
/// Views (of views too) are planned again over the tables as they are after each change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_view_reads_its_tables_as_they_are_now() {
    let t = TestCluster::start(2).await;
    let row = |a: &str, b: &str| vec![vec![a.to_string(), b.to_string()]];
    t.run_all(&[
        "CREATE TABLE t AS SELECT value AS v FROM generate_series(1, 1000)",
        "CREATE VIEW w AS SELECT v FROM t",
        "CREATE VIEW ww AS SELECT count(*) AS n, sum(v) AS s FROM w",
        "INSERT INTO t SELECT value FROM generate_series(1, 10)",
    ])
    .await;
    assert_eq!(t.cluster_rows("SELECT count(*), sum(v) FROM w").await, row("1010", "500555"));
    assert_eq!(t.cluster_rows("SELECT n, s FROM ww").await, row("1010", "500555"));
    // `w` replaced is listed after `ww`, which reads it: it must be planned again first.
    t.run_all(&["CREATE OR REPLACE VIEW w AS SELECT v FROM t WHERE v > 0", "INSERT INTO t SELECT 1"]).await;
    assert_eq!(t.cluster_rows("SELECT n, s FROM ww").await, row("1011", "500556"));
    t.run_all(&["CREATE OR REPLACE TABLE t AS SELECT value AS v FROM generate_series(1, 10)"]).await;
    assert_eq!(t.cluster_rows("SELECT count(*), sum(v) FROM w").await, row("10", "55"));
    assert_eq!(t.cluster_rows("SELECT n, s FROM ww").await, row("10", "55"));
    t.run_all(&["DROP TABLE t"]).await;
    for view in ["w", "ww"] {
        let error = t.client.collect(&format!("SELECT * FROM {view}")).await.expect_err("a view over a dropped table has no rows to give");
        assert!(error.to_string().contains("not found"), "{error}");
    }
    t.run_all(&["CREATE TABLE t AS SELECT value AS v FROM generate_series(1, 3)"]).await;
    assert_eq!(t.cluster_rows("SELECT n, s FROM ww").await, row("3", "6"));
}

/// Regression: `EXECUTE` ran the plan its `PREPARE` stored with the table sources of PREPARE
/// time: it missed rows inserted since. It now reads each table as it is, and a table whose
/// columns changed or that is gone fails it with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prepared_statement_reads_its_tables_as_they_are_now() {
    let t = TestCluster::start(2).await;
    t.run_all(&[
        "CREATE TABLE t AS SELECT value AS v FROM generate_series(1, 1000)",
        "PREPARE p(BIGINT) AS SELECT count(*), sum(v) FROM t WHERE v > $1",
        "INSERT INTO t SELECT value FROM generate_series(1, 10)",
    ])
    .await;
    assert_eq!(t.cluster_rows("EXECUTE p(0)").await, vec![vec!["1010".to_string(), "500555".to_string()]]);
    t.run_all(&["CREATE OR REPLACE TABLE t AS SELECT value AS v FROM generate_series(1, 10)"]).await;
    assert_eq!(t.cluster_rows("EXECUTE p(5)").await, vec![vec!["5".to_string(), "40".to_string()]]);
    t.run_all(&["CREATE OR REPLACE TABLE t AS SELECT value AS v, value AS w FROM generate_series(1, 10)"]).await;
    let changed = t.client.collect("EXECUTE p(0)").await.expect_err("the table's columns changed");
    assert!(changed.to_string().contains("prepare it again"), "{changed}");
    // Nor does a prepared INSERT write the old columns into the new table.
    t.run_all(&["CREATE TABLE u AS SELECT value AS v FROM generate_series(1, 3)", "PREPARE ins(BIGINT) AS INSERT INTO u VALUES ($1)"]).await;
    t.run_all(&["EXECUTE ins(4)", "CREATE OR REPLACE TABLE u AS SELECT 'a' AS v, 1 AS w"]).await;
    let target = t.client.collect("EXECUTE ins(5)").await.expect_err("the INSERT's table changed");
    assert!(target.to_string().contains("prepare it again"), "{target}");
    // Scans that are not tables of the catalog stay as they were prepared: a table function,
    // and a recursive CTE's work table even where a table has the CTE's name and columns.
    t.run_all(&[
        "PREPARE series(BIGINT) AS SELECT count(*) FROM generate_series(1, 100) WHERE value > $1",
        "CREATE TABLE r AS SELECT 7 AS n",
        "PREPARE walk(BIGINT) AS WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < $1) SELECT count(*), sum(n) FROM r",
    ])
    .await;
    assert_eq!(t.cluster_rows("EXECUTE series(90)").await, vec![vec!["10".to_string()]]);
    assert_eq!(t.cluster_rows("EXECUTE walk(4)").await, vec![vec!["4".to_string(), "10".to_string()]]);
    // Both in one plan: the table `r` is bound, the CTE's work table of the same name is not.
    t.run_all(&["PREPARE both(BIGINT) AS SELECT (SELECT count(*) FROM r), (WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < $1) SELECT sum(n) FROM r)"]).await;
    t.run_all(&["INSERT INTO r SELECT 8"]).await;
    assert_eq!(t.cluster_rows("EXECUTE both(3)").await, vec![vec!["2".to_string(), "6".to_string()]]);
    t.run_all(&["DROP TABLE t"]).await;
    let gone = t.client.collect("EXECUTE p(0)").await.expect_err("the table is gone");
    assert!(gone.to_string().contains("No table named 't'"), "{gone}");
}
