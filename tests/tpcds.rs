//! TPC-DS, all 99 queries, distributed against single-node DataFusion on the same files: data
//! and queries come from DuckDB's tpcds extension as shipped on PyPI (tests/python/tpcds_gen.py),
//! cut into many small Tasks so that every exchange runs. Single-node DataFusion runs all 99;
//! the cluster must give the same rows for each.

mod common;

use common::*;

/// Scale factor of the suite in CI; `QUIVER_TPCDS_SF` runs it larger.
const TPCDS_SF: &str = "0.01";

fn generate(root: &std::path::Path) -> std::path::PathBuf {
    let sf = std::env::var("QUIVER_TPCDS_SF").unwrap_or_else(|_| TPCDS_SF.to_string());
    let dir = root.join(format!("tpcds-sf{sf}"));
    if !dir.join("_SUCCESS").exists() {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/tpcds_gen.py");
        let out = std::process::Command::new("python3").arg(&script).arg(&sf).arg(&dir).output().expect("python3 runs");
        assert!(
            out.status.success(),
            "TPC-DS generation failed (pip install duckdb==1.5.5 duckdb-extension-tpcds==1.5.5): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

fn tables(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("part-1.parquet").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn single_rows(t: &TestCluster, sql: &str) -> Result<Vec<Vec<String>>, String> {
    let df = t.single.sql(sql).await.map_err(|e| e.to_string())?;
    let batches = futures::TryStreamExt::try_collect::<Vec<_>>(df.execute_stream().await.map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows(&batches))
}

fn same_rows(mut a: Vec<Vec<String>>, mut b: Vec<Vec<String>>) -> bool {
    let equal = |a: &[Vec<String>], b: &[Vec<String>]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.len() == y.len() && x.iter().zip(y).all(|(p, q)| cells_match(p, q, 1e-9)))
    };
    if equal(&a, &b) {
        return true;
    }
    // Ties under ORDER BY may come in another order.
    a.sort();
    b.sort();
    equal(&a, &b)
}

/// Runs queries `queries` on both engines and compares them.
async fn check_queries(queries: std::ops::RangeInclusive<usize>) {
    let t = TestCluster::start(3).await;
    let dir = generate(t.dir.path());
    for table in tables(&dir) {
        t.both(&format!("CREATE EXTERNAL TABLE {table} STORED AS PARQUET LOCATION '{}/{table}/'", dir.display())).await;
    }
    let (mut compared, mut skipped, mut failures) = (0, Vec::new(), Vec::new());
    let count = queries.clone().count();
    for q in queries {
        let sql = std::fs::read_to_string(dir.join(format!("queries/q{q:02}.sql"))).unwrap();
        let expected = match single_rows(&t, &sql).await {
            Ok(rows) => rows,
            Err(e) => {
                skipped.push(format!("q{q}: {}", e.lines().next().unwrap_or("")));
                continue;
            }
        };
        compared += 1;
        match t.client.collect(&sql).await {
            Ok((_, batches)) if same_rows(rows(&batches), expected.clone()) => {}
            Ok((_, batches)) => failures.push(format!("q{q}: {} rows, single node {}\n  got  {:?}\n  want {:?}", batches.iter().map(|b| b.num_rows()).sum::<usize>(), expected.len(), rows(&batches).iter().take(3).collect::<Vec<_>>(), expected.iter().take(3).collect::<Vec<_>>())),
            Err(e) => failures.push(format!("q{q}: {e}")),
        }
    }
    eprintln!("TPC-DS {count} queries: {compared} compared, {} mismatched or failed, {} single-node DataFusion cannot run:\n{}", failures.len(), skipped.len(), skipped.join("\n"));
    assert!(failures.is_empty(), "{} of {compared} queries differ from single-node DataFusion:\n{}", failures.len(), failures.join("\n"));
    assert!(skipped.is_empty(), "single-node DataFusion ran only {compared} of {count} queries:\n{}", skipped.join("\n"));
}

// Six parts, so that each stays well within a test's time budget and they run in parallel.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpcds_queries_1_to_17_match_single_node_datafusion() {
    check_queries(1..=17).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpcds_queries_18_to_33_match_single_node_datafusion() {
    check_queries(18..=33).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpcds_queries_34_to_50_match_single_node_datafusion() {
    check_queries(34..=50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpcds_queries_51_to_66_match_single_node_datafusion() {
    check_queries(51..=66).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpcds_queries_67_to_83_match_single_node_datafusion() {
    check_queries(67..=83).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpcds_queries_84_to_99_match_single_node_datafusion() {
    check_queries(84..=99).await;
}
