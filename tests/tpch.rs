//! TPC-H on a 3-worker cluster cut into many small Tasks: every query must return the official
//! answer and the same rows as single-node DataFusion, and must run distributed.

mod common;

use common::*;
use quiver::tpch::{self, Layout};

async fn tpch_cluster() -> TestCluster {
    let t = TestCluster::start(3).await;
    // Small row groups: many Tasks per scan, each a byte range of a file.
    let dir = tpch::generate(t.dir.path(), 0.01, Layout { files: 1, row_group_rows: 2000 }).unwrap();
    for sql in tpch::create_tables_sql(&dir) {
        t.both(&sql).await;
    }
    t
}

/// The shared answers' free-text columns (addresses, comments) were generated with a text
/// pool other than tpchgen's (checked: tpchgen 1.1 to 4.0 all produce dbgen's text), so those
/// columns are not compared, and q13, whose counts filter on o_comment, is checked against
/// single-node DataFusion only.
const TEXT_GENERATED_ELSEWHERE: [&str; 2] = ["address", "comment"];
const ANSWER_DEPENDS_ON_TEXT: [usize; 1] = [13];

fn compared_columns(header: &[String]) -> Vec<usize> {
    (0..header.len()).filter(|&i| !TEXT_GENERATED_ELSEWHERE.iter().any(|t| header[i].contains(t))).collect()
}

fn project(rows: &[Vec<String>], columns: &[usize]) -> Vec<Vec<String>> {
    rows.iter().map(|r| columns.iter().map(|&c| r.get(c).cloned().unwrap_or_default()).collect()).collect()
}

fn matches_answer(actual: &[Vec<String>], expected: &[Vec<String>]) -> bool {
    // A single all-NULL row (e.g. q17's SUM over no rows) is written as an empty file.
    let null_row = |rows: &[Vec<String>]| rows.len() == 1 && rows[0].iter().all(|c| c == "NULL");
    if expected.is_empty() && null_row(actual) {
        return true;
    }
    actual.len() == expected.len()
        && actual.iter().zip(expected).all(|(a, e)| a.len() == e.len() && a.iter().zip(e).all(|(x, y)| cells_match(x, y, 1e-6)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_sf001_matches_official_answers_and_single_node() {
    let t = tpch_cluster().await;
    let mut failures = Vec::new();
    for q in 1..=22 {
        let sql = tpch::query_sql(q).unwrap();
        t.check_same(&sql).await;
        if ANSWER_DEPENDS_ON_TEXT.contains(&q) {
            continue;
        }
        let (header, expected) = tpch_answer("0.01", q);
        let columns = compared_columns(&header);
        let mut actual = project(&t.cluster_rows(&sql).await, &columns);
        let mut expected = project(&expected, &columns);
        if !matches_answer(&actual, &expected) {
            // Ties under ORDER BY may come in another order: compare as multisets then.
            actual.sort();
            expected.sort();
            if !matches_answer(&actual, &expected) {
                failures.push(format!("q{q}: got {actual:?}\nwant {expected:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let modes = t.cluster_rows("SELECT sql, mode, tasks FROM quiver.queries WHERE sql LIKE '%lineitem%' AND sql NOT LIKE 'CREATE%' AND sql NOT LIKE '%quiver.%'").await;
    let local: Vec<_> = modes.iter().filter(|r| r[1] != "distributed").collect();
    assert!(local.is_empty(), "queries that did not distribute: {local:?}");
    // Filtered small build sides are joined inside the probe side's Tasks (q5, q8, q9, ...).
    let joins = t.cluster_rows("SELECT count(*) FROM quiver.tasks WHERE plan LIKE 'HashJoinExec%' AND state = 'succeeded'").await;
    assert_ne!(joins[0][0], "0", "no hash join ran inside Tasks");
}

/// Regression guard for DataFusion's file-stream work stealing: with it on, a partition run in
/// one process can read files of sibling partitions that other processes also read, so rows
/// come back more than once. Many files, many Tasks, and exact counts catch it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_duplicated_rows_across_tasks_from_file_stream_work_stealing() {
    let t = tpch_cluster().await;
    let sql = "SELECT count(*), sum(l_orderkey), count(DISTINCT l_orderkey || '-' || l_linenumber) FROM lineitem WHERE l_quantity >= 0";
    let rows = t.cluster_rows(sql).await;
    assert_eq!(rows, vec![vec!["60175".to_string(), rows[0][1].clone(), "60175".to_string()]]);
    t.check_same(sql).await;
    let tasks = t.cluster_rows("SELECT count(*) FROM quiver.tasks t JOIN quiver.queries q USING (query_id) WHERE q.sql LIKE '%l_quantity >= 0%'").await;
    let tasks: usize = tasks[0][0].parse().unwrap();
    assert!(tasks >= 6, "the scan should have been cut into many Tasks, got {tasks}");
}
