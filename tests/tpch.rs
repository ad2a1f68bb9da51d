//! TPC-H on a 3-worker cluster cut into many small Tasks: every query must return the official
//! answer and the same rows as single-node DataFusion, must run distributed, and its EXPLAIN
//! must show data moving between worker Stages. Joins are checked twice: as DataFusion plans
//! them at this size (broadcast of small build sides) and with every join forced to be a
//! partitioned (shuffle) join.

mod common;

use common::*;
use quiver::tpch::{self, Layout};

async fn tpch_cluster(sf: f64, settings: &[&str]) -> TestCluster {
    let t = TestCluster::start(3).await;
    // Small row groups: many Tasks per scan, each a byte range of a file.
    let dir = tpch::generate(t.dir.path(), sf, Layout { files: 1, row_group_rows: 2000 }).unwrap();
    // Settings first: some (Parquet schema and reading options) are taken when a table is made.
    for sql in settings.iter().copied().chain(tpch::create_tables_sql(&dir).iter().map(String::as_str)) {
        t.both(sql).await;
    }
    t
}

/// The official answer check for one query; a failure is described, not panicked, so that one
/// run reports every query that is wrong.
async fn check_answer(t: &TestCluster, sf: &str, q: usize, sql: &str) -> Option<String> {
    tpch_mismatch(sf, q, &t.cluster_rows(sql).await)
}

/// Asserts from EXPLAIN that the query moves data between worker Stages: at least one Stage
/// that runs on workers reads another Stage. Returns the plan text.
async fn assert_exchange_between_workers(t: &TestCluster, q: usize, sql: &str) -> String {
    let rows = t.cluster_rows(&format!("EXPLAIN {sql}")).await;
    let plan = rows.iter().find(|r| r[0] == "distributed_plan").map(|r| r[1].clone()).unwrap_or_default();
    let exchanges = plan.lines().filter(|l| l.starts_with("Stage ") && l.contains("reads stage")).count();
    assert!(exchanges > 0, "q{q} has no exchange between worker stages:\n{plan}");
    plan
}

async fn check_all_queries(t: &TestCluster, sf: &str, differential: bool) -> Vec<String> {
    let mut failures = Vec::new();
    let mut plans = Vec::new();
    for q in 1..=22 {
        let sql = tpch::query_sql(q).unwrap();
        plans.push(assert_exchange_between_workers(t, q, &sql).await);
        if differential {
            t.check_same(&sql).await;
        }
        failures.extend(check_answer(t, sf, q, &sql).await);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let modes = t.cluster_rows("SELECT sql, mode, tasks FROM quiver.queries WHERE sql LIKE '%lineitem%' AND sql NOT LIKE 'CREATE%' AND sql NOT LIKE '%quiver.%' AND sql NOT LIKE 'EXPLAIN%'").await;
    let local: Vec<_> = modes.iter().filter(|r| r[1] != "distributed").collect();
    assert!(local.is_empty(), "queries that did not distribute: {local:?}");
    plans
}

/// The queries compiled into the binary are the ones the official answers answer.
#[test]
fn the_built_in_queries_are_the_shared_ones() {
    for q in 1..=22 {
        let shared = std::fs::read_to_string(tpch_dir().join(format!("queries/q{q:02}.sql"))).unwrap();
        assert_eq!(tpch::query_sql(q).unwrap(), shared, "q{q}");
    }
    assert!(tpch::query_sql(0).is_err() && tpch::query_sql(23).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_sf001_with_broadcast_joins_matches_official_answers_and_single_node() {
    let t = tpch_cluster(0.01, &[]).await;
    let plans = check_all_queries(&t, "0.01", true).await;
    // Small build sides are broadcast: joined inside the Tasks of the probe side's scan.
    let joins = t.cluster_rows("SELECT count(*) FROM quiver.tasks WHERE plan LIKE 'HashJoinExec%' AND state = 'succeeded'").await;
    assert_ne!(joins[0][0], "0", "no hash join ran inside the Tasks of a scan");
    assert!(plans.iter().any(|p| p.contains("output shuffle")), "no query shuffled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_sf001_with_shuffle_joins_matches_official_answers_and_single_node() {
    let t = tpch_cluster(0.01, &SHUFFLE_JOINS).await;
    let plans = check_all_queries(&t, "0.01", true).await;
    let partitioned = plans.iter().filter(|p| p.contains("HashJoinExec: mode=Partitioned")).count();
    assert!(partitioned >= 15, "only {partitioned} queries ran partitioned joins on workers");
    let shuffled = t.cluster_rows("SELECT count(*) FROM quiver.tasks WHERE output = 'shuffle' AND state = 'succeeded' AND bytes > 0").await;
    assert_ne!(shuffled[0][0], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_sf01_with_shuffle_joins_matches_official_answers() {
    let t = tpch_cluster(0.1, &SHUFFLE_JOINS).await;
    check_all_queries(&t, "0.1", false).await;
}

/// Adaptive scheduling must never change an answer: with thresholds so low that partitions are
/// split and coalesced in every Stage that allows it, Tasks are speculated everywhere and the
/// last slices of scans are cut into pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_sf001_with_every_adaptive_mechanism_forced_on_matches_official_answers_and_single_node() {
    let settings: Vec<&str> = SHUFFLE_JOINS.iter().chain(&ADAPTIVE_EVERYWHERE).copied().collect();
    let t = tpch_cluster(0.01, &settings).await;
    check_all_queries(&t, "0.01", true).await;
    let totals = t
        .cluster_rows("SELECT sum(partitions_split), sum(partitions_coalesced), sum(attempts_speculated), sum(slices_cut) FROM quiver.queries")
        .await;
    let [split, coalesced, speculated, cut] = [0, 1, 2, 3].map(|i| totals[0][i].parse::<u64>().unwrap());
    eprintln!("adaptive forced on: {split} partitions split, {coalesced} coalesced, {speculated} attempts speculated, {cut} slices cut");
    assert!(split > 0 && coalesced > 0 && speculated > 0 && cut > 0, "split {split}, coalesced {coalesced}, speculated {speculated}, cut {cut}");
    // Final aggregates had partitions merged from pieces' partial states, not only joins split.
    let merges = t.cluster_rows("SELECT count(*) FROM quiver.tasks WHERE reads LIKE '%merging the partial states%' AND state = 'succeeded'").await;
    eprintln!("adaptive forced on: {} merges of partial states", merges[0][0]);
    assert_ne!(merges[0][0], "0");
}

/// A session's DataFusion settings change how a plan is shaped (the planning ones) and how its
/// Tasks run on the workers (the execution ones, sent with every Task): the answers must not
/// change. Each test sets a group of non-default settings on both engines.
async fn check_all_queries_with(settings: &[&str]) -> Vec<String> {
    let t = tpch_cluster(0.01, settings).await;
    check_all_queries(&t, "0.01", true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_sf001_under_sort_merge_joins_in_written_order() {
    let mut settings = SHUFFLE_JOINS.to_vec();
    settings.extend(["SET datafusion.optimizer.prefer_hash_join = false", "SET datafusion.optimizer.join_reordering = false"]);
    settings.push("SET datafusion.optimizer.enable_piecewise_merge_join = true");
    let plans = check_all_queries_with(&settings).await;
    let merged = plans.iter().filter(|p| p.lines().any(|l| l.trim_start().starts_with("SortMergeJoin"))).count();
    assert!(merged >= 10, "only {merged} queries ran sort-merge joins");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_sf001_under_scan_settings_filters_pushed_into_the_reader_and_file_partitions_kept() {
    check_all_queries_with(&[
        "SET datafusion.execution.parquet.pushdown_filters = true",
        "SET datafusion.execution.parquet.reorder_filters = true",
        "SET datafusion.optimizer.preserve_file_partitions = 1",
        "SET datafusion.execution.split_file_groups_by_statistics = true",
        "SET datafusion.optimizer.prefer_existing_sort = true",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_sf001_under_execution_settings_sent_to_the_workers() {
    check_all_queries_with(&[
        "SET datafusion.execution.batch_size = 37",
        "SET datafusion.execution.sort_spill_reservation_bytes = 1024",
        "SET datafusion.execution.sort_in_place_threshold_bytes = 16",
        "SET datafusion.execution.skip_partial_aggregation_probe_rows_threshold = 10",
        "SET datafusion.optimizer.enable_dynamic_filter_pushdown = false",
        "SET datafusion.optimizer.enable_window_limits = false",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_sf001_under_other_partitioning_and_no_statistics() {
    check_all_queries_with(&[
        "SET datafusion.execution.target_partitions = 5",
        "SET datafusion.execution.collect_statistics = false",
        "SET datafusion.execution.parquet.schema_force_view_types = false",
    ])
    .await;
}

/// Regression guard for DataFusion's file-stream work stealing: with it on, a partition run in
/// one process can read files of sibling partitions that other processes also read, so rows
/// come back more than once. Many files, many Tasks, and exact counts catch it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_duplicated_rows_across_tasks_from_file_stream_work_stealing() {
    let t = tpch_cluster(0.01, &[]).await;
    let sql = "SELECT count(*), sum(l_orderkey), count(DISTINCT l_orderkey || '-' || l_linenumber) FROM lineitem WHERE l_quantity >= 0";
    let rows = t.cluster_rows(sql).await;
    assert_eq!(rows, vec![vec!["60175".to_string(), rows[0][1].clone(), "60175".to_string()]]);
    t.check_same(sql).await;
    let tasks = t.cluster_rows("SELECT count(*) FROM quiver.tasks t JOIN quiver.queries q USING (query_id) WHERE q.sql LIKE '%l_quantity >= 0%'").await;
    let tasks: usize = tasks[0][0].parse().unwrap();
    assert!(tasks >= 6, "the scan should have been cut into many Tasks, got {tasks}");
}
