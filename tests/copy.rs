//! `COPY … TO`: what the cluster writes reads back as exactly the query's rows, to a single
//! file or to a directory (then written by the workers, one set of files per Task), in every
//! format, partitioned or not; and a copy that fails leaves nothing behind.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::TestCluster;

const QUERY: &str = "SELECT v, k, concat('s', CAST(v AS VARCHAR)) AS s FROM t WHERE v % 3 <> 0";

async fn cluster_with_files() -> TestCluster {
    let t = TestCluster::start(3).await;
    let src = t.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // A multi-file Parquet table, so that the copy's input is sliced over many Tasks.
    t.single
        .sql("CREATE TABLE g AS SELECT value AS v, value % 5 AS k FROM generate_series(1, 30000)")
        .await
        .unwrap();
    for part in 0..4 {
        let sql = format!("COPY (SELECT * FROM g WHERE v % 4 = {part}) TO '{}/p{part}.parquet'", src.display());
        t.single.sql(&sql).await.unwrap().collect().await.unwrap();
    }
    t.both(&format!("CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/'", src.display())).await;
    t
}

/// Every file under `dir`, recursively, by path relative to it.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path).into_iter().map(|p| Path::new(path.file_name().unwrap()).join(p)));
        } else {
            out.push(PathBuf::from(path.file_name().unwrap()));
        }
    }
    out
}

/// Every file and directory under `dir`, recursively.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).into_iter().flatten() {
        let path = entry.unwrap().path();
        out.extend(entries(&path));
        out.push(path);
    }
    out
}

/// The rows `location` holds, read back by single-node DataFusion, against the query's.
async fn check_copied(t: &TestCluster, format: &str, location: &str, partitioned: bool) {
    let name = format!("back_{}", rand_suffix());
    let partition = if partitioned { " PARTITIONED BY (k)" } else { "" };
    let options = if format == "CSV" { " OPTIONS ('format.has_header' 'true')" } else { "" };
    let ddl = format!("CREATE EXTERNAL TABLE {name} STORED AS {format}{partition} LOCATION '{location}'{options}");
    t.single.sql(&ddl).await.unwrap();
    let back = format!("SELECT CAST(v AS BIGINT), CAST(k AS BIGINT), s FROM {name}");
    let mut copied = t.single_rows(&back).await;
    let mut expected = t.single_rows("SELECT v, k, concat('s', CAST(v AS VARCHAR)) FROM t WHERE v % 3 <> 0").await;
    copied.sort();
    expected.sort();
    assert_eq!(copied.len(), 20000, "{location}");
    assert!(copied == expected, "{format} copy to {location} reads back other rows");
}

fn rand_suffix() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Files whose names carry distinct sink write ids were written by distinct Tasks.
fn writers(files: &[PathBuf]) -> usize {
    let ids: BTreeSet<String> =
        files.iter().map(|f| f.file_name().unwrap().to_string_lossy().split('_').next().unwrap().to_string()).collect();
    ids.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_to_a_directory_is_written_by_the_workers_in_every_format() {
    let t = cluster_with_files().await;
    for (format, ext) in [("PARQUET", "parquet"), ("CSV", "csv"), ("JSON", "json")] {
        let dir = t.dir.path().join(format!("out-{ext}"));
        let sql = format!("COPY ({QUERY}) TO '{}/' STORED AS {format}", dir.display());
        assert_eq!(t.cluster_rows(&sql).await, vec![vec!["20000".to_string()]], "{sql}");
        let written = files(&dir);
        assert!(written.iter().all(|f| f.extension().is_some_and(|e| e == ext)), "{written:?}");
        assert!(writers(&written) > 1, "one Task wrote everything: {written:?}");
        check_copied(&t, format, &format!("{}/", dir.display()), false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_copy_writes_one_directory_per_value() {
    let t = cluster_with_files().await;
    let dir = t.dir.path().join("by-k");
    let sql = format!("COPY ({QUERY}) TO '{}' STORED AS PARQUET PARTITIONED BY (k)", dir.display());
    assert_eq!(t.cluster_rows(&sql).await, vec![vec!["20000".to_string()]]);
    let mut parts: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    parts.sort();
    assert_eq!(parts, ["k=0", "k=1", "k=2", "k=3", "k=4"]);
    check_copied(&t, "PARQUET", &format!("{}/", dir.display()), true).await;
}

/// Regression (CI, stop 26): an Attempt that lost its Task (a speculative one, say) still wrote
/// when the copy committed, and DataFusion's sink re-created the staging directory inside the
/// target after the commit removed it. With speculation everywhere, no copy leaves anything but
/// its partition directories, and each holds exactly the query's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_whose_tasks_are_speculated_leaves_only_its_own_files() {
    let t = cluster_with_files().await;
    t.run_all(&common::ADAPTIVE_EVERYWHERE).await;
    let dirs: Vec<PathBuf> = (0..6).map(|i| t.dir.path().join(format!("spec-{i}"))).collect();
    for dir in &dirs {
        let sql = format!("COPY ({QUERY}) TO '{}' STORED AS PARQUET PARTITIONED BY (k)", dir.display());
        assert_eq!(t.cluster_rows(&sql).await, vec![vec!["20000".to_string()]]);
    }
    let speculated = t.cluster_rows("SELECT sum(attempts_speculated) FROM quiver.queries WHERE sql LIKE 'COPY%'").await;
    assert!(speculated[0][0].parse::<u64>().unwrap() > 0, "no copy Task was speculated: {speculated:?}");
    for dir in &dirs {
        check_copied(&t, "PARQUET", &format!("{}/", dir.display()), true).await;
    }
    for dir in &dirs {
        let hidden: Vec<_> = entries(dir).into_iter().filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.')).collect();
        assert!(hidden.is_empty(), "a committed copy left {hidden:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_to_a_file_writes_exactly_that_file() {
    let t = cluster_with_files().await;
    let out = t.dir.path().join("single");
    for (format, ext) in [("PARQUET", "parquet"), ("CSV", "csv"), ("JSON", "json")] {
        let path = out.join(format!("all.{ext}"));
        let sql = format!("COPY ({QUERY} ORDER BY v) TO '{}' STORED AS {format}", path.display());
        assert_eq!(t.cluster_rows(&sql).await, vec![vec!["20000".to_string()]], "{sql}");
        check_copied(&t, format, &path.display().to_string(), false).await;
    }
    let mut written = files(&out);
    written.sort();
    assert_eq!(written, [PathBuf::from("all.csv"), "all.json".into(), "all.parquet".into()], "no partial file stays");
    // The ORDER BY survives into the single file.
    let csv = std::fs::read_to_string(out.join("all.csv")).unwrap();
    assert_eq!(csv.lines().take(4).collect::<Vec<_>>(), ["v,k,s", "1,1,s1", "2,2,s2", "4,4,s4"]);
}

/// A copy whose Tasks fail part-way (division by zero in some rows) returns the error and
/// leaves neither a target nor a staging or partial file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_copy_leaves_nothing_behind() {
    let t = cluster_with_files().await;
    let failing = "SELECT v, 10 / (v - 29999) AS x FROM t";
    let dir = t.dir.path().join("failed-dir");
    let file = t.dir.path().join("failed.parquet");
    for target in [format!("{}/", dir.display()), file.display().to_string()] {
        let err = t.client.collect(&format!("COPY ({failing}) TO '{target}' STORED AS PARQUET")).await.unwrap_err();
        assert!(err.to_string().to_lowercase().contains("divide by zero"), "{err}");
    }
    assert!(!dir.exists(), "a failed copy to a directory left {:?}", entries(&dir));
    let left: Vec<_> = std::fs::read_dir(t.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().contains("failed")), "a failed copy left {left:?}");
    // The cluster still copies.
    let ok = t.dir.path().join("ok/");
    let sql = format!("COPY (SELECT * FROM t WHERE v < 10) TO '{}/' STORED AS CSV", ok.display());
    assert_eq!(t.cluster_rows(&sql).await, vec![vec!["9".to_string()]]);
}

/// Regression: a commit that failed half-way (here a partition's directory cannot be made: a
/// file of that name is in the target) left the partitions moved before it in the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_whose_commit_fails_half_way_leaves_the_target_as_it_was() {
    let t = cluster_with_files().await;
    let dir = t.dir.path().join("taken");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("k=3"), b"not a directory").unwrap();
    let sql = format!("COPY ({QUERY}) TO '{}' STORED AS PARQUET PARTITIONED BY (k)", dir.display());
    let err = t.client.collect(&sql).await.unwrap_err();
    assert!(err.to_string().contains("k=3"), "{err}");
    assert_eq!(entries(&dir), vec![dir.join("k=3")], "only what was there before");
    assert_eq!(std::fs::read(dir.join("k=3")).unwrap(), b"not a directory");
}

/// Regression (DataFusion's copy.slt): COPY to Arrow IPC, whose sink DataFusion keeps private,
/// failed with "not supported"; it is written by DataFusion's sink on the coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_to_arrow_ipc_is_written_as_datafusion_writes_it() {
    let t = cluster_with_files().await;
    let path = t.dir.path().join("all.arrow");
    let sql = format!("COPY ({QUERY}) TO '{}' STORED AS ARROW", path.display());
    assert_eq!(t.cluster_rows(&sql).await, vec![vec!["20000".to_string()]]);
    check_copied(&t, "ARROW", &path.display().to_string(), false).await;
}
