//! Adaptive shuffle reads on a real cluster: skewed partitions are split only where the join
//! type allows it, small partitions are coalesced, the last scan slices of a Stage are cut into
//! pieces, and every answer equals single-node DataFusion's.

mod common;

use common::*;

/// `skewed` holds key 7 in 90% of its rows; `uniform` spreads its keys evenly. Each table is
/// written as one file of many row groups, so its scan is cut into many Tasks (producers).
async fn skew_cluster() -> TestCluster {
    let t = TestCluster::start(3).await;
    t.both("CREATE TABLE skewed AS SELECT CASE WHEN value % 10 < 9 THEN 7 ELSE value % 1000 END AS k, value AS v FROM generate_series(1, 6000)").await;
    t.both("CREATE TABLE uniform AS SELECT value % 1000 AS k, value AS w FROM generate_series(1, 6000)").await;
    // Small batches make DataFusion find hash repartitioning worthwhile even for these few
    // rows, so joins read shuffles.
    let settings = ["SET datafusion.execution.batch_size = 512", "SET quiver.skew_min_bytes = 0", "SET quiver.coalesce_partitions = false"];
    for sql in SHUFFLE_JOINS.iter().chain(&settings) {
        t.both(sql).await;
    }
    t
}

/// Runs `sql` on both engines and returns what `quiver.queries` counted in `column` for it.
async fn counted(t: &TestCluster, column: &str, sql: &str) -> u64 {
    t.check_same(sql).await;
    let escaped = sql.replace('\'', "''");
    let rows = t.cluster_rows(&format!("SELECT {column} FROM quiver.queries WHERE sql = '{escaped}'")).await;
    rows[0][0].parse().unwrap()
}

/// The partitions the cluster split for `sql`.
async fn splits(t: &TestCluster, sql: &str) -> u64 {
    counted(t, "partitions_split", sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_skewed_side_is_split_only_where_the_join_type_allows_it() {
    let t = skew_cluster().await;
    // The skewed side may be cut: its rows are joined with the whole matching partition.
    for join in ["JOIN", "LEFT JOIN", "LEFT SEMI JOIN", "LEFT ANTI JOIN"] {
        let columns = if join.contains("SEMI") || join.contains("ANTI") { "count(*), sum(s.v)" } else { "count(*), sum(s.v), sum(u.w)" };
        let sql = format!("SELECT {columns} FROM skewed s {join} uniform u ON s.k = u.k");
        assert!(splits(&t, &sql).await > 0, "{sql} was not split");
    }
    // The skewed side is the one whose unmatched rows the join emits from the other side's
    // point of view, or a full join: never split.
    for join in ["RIGHT JOIN", "FULL JOIN", "RIGHT SEMI JOIN", "RIGHT ANTI JOIN"] {
        let columns = if join.contains("SEMI") || join.contains("ANTI") { "count(*), sum(u.w)" } else { "count(*), sum(s.v), sum(u.w)" };
        let sql = format!("SELECT {columns} FROM skewed s {join} uniform u ON s.k = u.k");
        assert_eq!(splits(&t, &sql).await, 0, "{sql} was split");
    }
    // An aggregate over the join key sees whole partitions: the join below it is not split.
    assert_eq!(splits(&t, "SELECT s.k, count(*) FROM skewed s JOIN uniform u ON s.k = u.k GROUP BY s.k ORDER BY s.k").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_partition_shows_its_pieces_in_quiver_tasks() {
    let t = skew_cluster().await;
    let sql = "SELECT u.k % 10 AS g, count(*), sum(s.v) FROM skewed s JOIN uniform u ON s.k = u.k GROUP BY g ORDER BY g";
    assert!(splits(&t, sql).await > 0);
    let pieces = t.cluster_rows("SELECT reads FROM quiver.tasks WHERE reads LIKE '%piece%' AND state = 'succeeded' ORDER BY stage, task").await;
    assert!(pieces.len() >= 2, "{pieces:?}");
    assert!(pieces.iter().all(|r| r[0].starts_with("partition ") && r[0].contains("producers")), "{pieces:?}");
    // EXPLAIN ANALYZE says which Stage was split and how many Tasks it ran.
    let analyze = t.cluster_rows(&format!("EXPLAIN ANALYZE {sql}")).await;
    let dag = &analyze[0][1];
    let split = dag.lines().find(|l| l.starts_with("Stage ") && l.contains("tasks_run=") && !l.contains("split=0"));
    assert!(split.is_some(), "{dag}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_partitions_are_coalesced_into_fewer_tasks() {
    let t = skew_cluster().await;
    t.both("SET quiver.coalesce_partitions = true").await;
    t.both("SET quiver.skew_split = false").await;
    let sql = "SELECT u.k % 10 AS g, count(*) FROM uniform u JOIN uniform v ON u.k = v.k GROUP BY g ORDER BY g";
    t.check_same(sql).await;
    let rows = t.cluster_rows(&format!("SELECT partitions_coalesced FROM quiver.queries WHERE sql = '{sql}'")).await;
    assert_ne!(rows[0][0], "0", "tiny partitions should share a Task");
    let coalesced = t.cluster_rows("SELECT reads FROM quiver.tasks WHERE reads LIKE 'partitions %'").await;
    assert!(!coalesced.is_empty());
    // Switched off, every partition is a Task of its own.
    t.both("SET quiver.coalesce_partitions = false").await;
    let off = format!("{sql} -- off");
    t.check_same(&off).await;
    let rows = t.cluster_rows(&format!("SELECT partitions_coalesced FROM quiver.queries WHERE sql = '{off}'")).await;
    assert_eq!(rows[0][0], "0");
}

/// Regression: a Stage gathered by a coordinator-side operator that pairs partition `p` with
/// partition `p` of another input (a partitioned join against an in-memory table, which runs on
/// the coordinator) was coalesced like any other: its Task 0 held every group, the others
/// nothing, and the join lost the matches of every other partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stage_whose_partitions_the_coordinator_pairs_is_never_coalesced() {
    let t = TestCluster::start(2).await;
    t.both("CREATE TABLE grouped AS SELECT value % 20 AS k, value AS v FROM generate_series(1, 600)").await;
    for sql in SHUFFLE_JOINS.iter().chain(&["SET datafusion.execution.batch_size = 64", "SET quiver.coalesce_partitions = true"]) {
        t.both(sql).await;
    }
    let values = "(VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd'), (5, 'e'), (6, 'f'), (7, 'g'), (8, 'h')) AS n(k, name)";
    for join in ["JOIN", "LEFT JOIN", "RIGHT JOIN", "FULL JOIN"] {
        let sql = format!("SELECT a.k, a.c, n.name FROM (SELECT k, count(*) AS c FROM grouped GROUP BY k) a {join} {values} ON a.k = n.k");
        t.check_same(&sql).await;
    }
}

/// A final aggregate's partition above the median (`quiver.skew_factor = 1`: the partial
/// aggregates of many producers, as when DataFusion skips partial aggregation on a hot key) is
/// cut into pieces that reduce it to partial states, and its own Task merges them: whether the
/// aggregate's output is shuffled on, gathered, joined or filtered by a HAVING, each group
/// appears once, with the values single-node DataFusion computes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_skewed_partition_under_a_final_aggregate_is_merged_from_partial_states() {
    let t = skew_cluster().await;
    t.both("SET quiver.skew_factor = 1").await;
    for sql in [
        "SELECT k, count(*), sum(v), min(v), max(v), avg(v) FROM skewed GROUP BY k ORDER BY k",
        "SELECT k, count(*) AS n FROM skewed GROUP BY k HAVING count(*) > 5",
        "SELECT n, count(*) FROM (SELECT k, count(*) AS n FROM skewed GROUP BY k) GROUP BY n ORDER BY n",
        "SELECT s.k, s.n, u.w FROM (SELECT k, count(*) AS n FROM skewed GROUP BY k) s JOIN uniform u ON s.k = u.k ORDER BY u.w",
    ] {
        assert!(splits(&t, sql).await > 0, "{sql} was not split");
    }
    let merges = t.cluster_rows("SELECT reads FROM quiver.tasks WHERE reads LIKE '%merging the partial states%' AND state = 'succeeded'").await;
    let pieces = t.cluster_rows("SELECT reads FROM quiver.tasks WHERE reads LIKE '%, partial states' AND state = 'succeeded'").await;
    assert!(!merges.is_empty() && pieces.len() >= 2 * merges.len(), "{merges:?} {pieces:?}");
    // Switched off, the aggregate reads its partitions as planned.
    t.both("SET quiver.skew_split = false").await;
    assert_eq!(splits(&t, "SELECT k, count(*), sum(v) FROM skewed GROUP BY k ORDER BY k").await, 0);
}

/// A skewed partition left whole (here a right join's skewed side, which may never be cut)
/// is read by a Task weighed by its bytes: `quiver.tasks.work` shows it doing several typical
/// Tasks' work, which is what its straggler threshold and its worker's pace are scaled by.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_skewed_partition_left_whole_is_weighed_by_its_bytes() {
    let t = TestCluster::start(2).await;
    // Key 7 holds 90% of 150 000 rows of about 80 bytes (10 MB of the shuffle); the rest are
    // spread thin. (The test cluster writes row groups of 7 rows, at most 32 767 per file.)
    let heavy = "SELECT CASE WHEN value % 10 < 9 THEN 7 ELSE value % 1000 END AS k, value AS v, repeat('x', 64) AS pad FROM generate_series(1, 150000)";
    t.both(&format!("CREATE TABLE heavy AS {heavy}")).await;
    t.both("CREATE TABLE keys AS SELECT value AS k, value * 2 AS w FROM generate_series(0, 999)").await;
    for sql in SHUFFLE_JOINS.iter().chain(&["SET quiver.coalesce_partitions = false"]) {
        t.both(sql).await;
    }
    let sql = "SELECT count(*), sum(h.v), sum(length(h.pad)), sum(k.w) FROM heavy h RIGHT JOIN keys k ON h.k = k.k";
    assert_eq!(splits(&t, sql).await, 0, "a right join's left side is never split");
    let escaped = sql.replace('\'', "''");
    let work = t.cluster_rows(&format!(
        "SELECT t.work FROM quiver.tasks t JOIN quiver.queries q ON t.query_id = q.query_id WHERE q.sql = '{escaped}' AND t.plan LIKE '%HashJoinExec%' ORDER BY t.work"
    ))
    .await;
    let work: Vec<f64> = work.iter().map(|r| r[0].parse().unwrap()).collect();
    assert!(work.len() >= 2 && work[0] == 1.0, "the join's typical Tasks count one Task's work: {work:?}");
    assert!(*work.last().unwrap() > 3.0, "the Task of key 7's partition does several: {work:?}");
}

/// The scan slices the cluster cut for `sql`.
async fn slices_cut(t: &TestCluster, sql: &str) -> u64 {
    counted(t, "slices_cut", sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_scan_slices_are_cut_into_pieces_that_read_every_row_once() {
    let t = skew_cluster().await;
    t.both("SET quiver.slice_piece_min_bytes = 1").await;
    // Gathered by the final Stage (pieces read one after the other), shuffled (pieces are
    // producers like the others), and joined: each row counted once.
    for sql in [
        "SELECT count(*), sum(v), min(v), max(v) FROM skewed",
        "SELECT k % 7 AS g, count(*), sum(v) FROM skewed GROUP BY g ORDER BY g",
        "SELECT count(*), sum(s.v), sum(u.w) FROM skewed s JOIN uniform u ON s.k = u.k",
    ] {
        assert!(slices_cut(&t, sql).await > 0, "{sql} cut no slice");
    }
    let pieces = t.cluster_rows("SELECT reads FROM quiver.tasks WHERE reads LIKE 'piece % of task %' AND state = 'succeeded'").await;
    assert!(!pieces.is_empty());
    // A Task that sorts its rows makes a sorted run for a merge: its slice is never cut.
    assert_eq!(slices_cut(&t, "SELECT v FROM skewed WHERE v % 97 = 0 ORDER BY v").await, 0);
    // Switched off, no slice is cut.
    t.both("SET quiver.dynamic_granularity = false").await;
    assert_eq!(slices_cut(&t, "SELECT count(*), sum(v) FROM skewed WHERE v > 0").await, 0);
}
