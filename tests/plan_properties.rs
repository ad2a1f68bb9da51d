//! Regressions for Stage readers that did not stand for the subtree they replaced: a reader must
//! report the partitioning, orderings, constants and equivalences of what it replaced, on the
//! coordinator and on the worker that decodes it, or DataFusion's own invariants break when the
//! plan is rebuilt around it.

mod common;

use common::*;
use quiver::tpch::{self, Layout};

async fn tpch_cluster() -> TestCluster {
    let t = TestCluster::start(2).await;
    let dir = tpch::generate(t.dir.path(), 0.01, Layout { files: 2, row_group_rows: 2000 }).unwrap();
    for sql in tpch::create_tables_sql(&dir) {
        t.both(&sql).await;
    }
    t
}

/// Caught: "Can not create InterleaveExec: new children can not be interleaved". DataFusion
/// interleaves the hash-partitioned outputs of both branches of the UNION ALL; with readers that
/// reported an unknown partitioning in their place, rebuilding the interleave failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn union_all_of_hash_partitioned_aggregates_keeps_its_interleave() {
    let t = tpch_cluster().await;
    let sql = "SELECT k, sum(s) FROM (
        SELECT l_suppkey AS k, sum(l_quantity) AS s FROM lineitem GROUP BY l_suppkey
        UNION ALL
        SELECT ps_suppkey AS k, sum(ps_availqty) AS s FROM partsupp GROUP BY ps_suppkey) t
      GROUP BY k ORDER BY k LIMIT 3";
    t.check_same(sql).await;
    let sql = "SELECT k, count(*), sum(s) FROM (
        SELECT o_custkey AS k, sum(o_totalprice) AS s FROM orders GROUP BY o_custkey
        UNION ALL
        SELECT c_custkey AS k, sum(c_acctbal) AS s FROM customer GROUP BY c_custkey
        UNION ALL
        SELECT o_custkey AS k, max(o_totalprice) AS s FROM orders GROUP BY o_custkey) t
      GROUP BY k ORDER BY 3 DESC, k LIMIT 5";
    t.check_same(sql).await;
}

/// Caught: "Assertion failed: window_expr[0].partition_by().len() ==
/// ordered_partition_by_indices.len() (left: 5, right: 4)". A window over a sort whose input
/// was a Stage reader: the worker decoded the reader without the constants and equivalences
/// the coordinator had planned with, so it found fewer ordered partition columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn windows_over_an_aggregate_keep_their_input_order_mode() {
    let t = tpch_cluster().await;
    let sql = "WITH v1 AS (
        SELECT l_returnflag, l_linestatus, l_shipmode, l_shipinstruct,
               date_part('year', l_shipdate) AS y, date_part('month', l_shipdate) AS m,
               sum(l_extendedprice) AS sum_sales,
               avg(sum(l_extendedprice)) OVER (PARTITION BY l_returnflag, l_linestatus, l_shipmode, l_shipinstruct, date_part('year', l_shipdate)) AS avg_sales,
               rank() OVER (PARTITION BY l_returnflag, l_linestatus, l_shipmode, l_shipinstruct ORDER BY date_part('year', l_shipdate), date_part('month', l_shipdate)) AS rn
        FROM lineitem
        WHERE date_part('year', l_shipdate) = 1995 OR (date_part('year', l_shipdate) = 1994 AND date_part('month', l_shipdate) = 12)
        GROUP BY l_returnflag, l_linestatus, l_shipmode, l_shipinstruct, date_part('year', l_shipdate), date_part('month', l_shipdate))
      SELECT v1.l_shipmode, v1.l_shipinstruct, v1.y, v1.m, v1.sum_sales, v1.avg_sales, lag.sum_sales AS prev, lead.sum_sales AS next
      FROM v1
      JOIN v1 lag ON v1.l_returnflag = lag.l_returnflag AND v1.l_linestatus = lag.l_linestatus
        AND v1.l_shipmode = lag.l_shipmode AND v1.l_shipinstruct = lag.l_shipinstruct AND v1.rn = lag.rn + 1
      JOIN v1 lead ON v1.l_returnflag = lead.l_returnflag AND v1.l_linestatus = lead.l_linestatus
        AND v1.l_shipmode = lead.l_shipmode AND v1.l_shipinstruct = lead.l_shipinstruct AND v1.rn = lead.rn - 1
      WHERE v1.y = 1995 AND v1.avg_sales > 0
      ORDER BY v1.sum_sales - v1.avg_sales, v1.l_shipmode, v1.l_shipinstruct, v1.m
      LIMIT 20";
    t.check_same(sql).await;
    t.run_all(&SHUFFLE_JOINS).await;
    t.check_same(sql).await;
}
