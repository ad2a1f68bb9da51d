//! DataFusion's own sqllogictest files, run differentially through a Quiver cluster. The files
//! are those of the DataFusion release Quiver builds on, from the `datafusion-sqllogictest`
//! crate on crates.io (`upstream_slt/fetch.rs`). Each file runs, record by record in file order,
//! on single-node DataFusion with Quiver's settings and then on a fresh 3-worker cluster whose
//! leaf Stages are cut into several Tasks; results are normalised as DataFusion's own runner
//! does (`upstream_slt/normalize.rs`). A record single-node DataFusion answers as the file
//! expects is *supported*, and the cluster must answer it the same way. A record single-node
//! fails uses something Quiver's trimmed DataFusion lacks (a function, a feature, test data the
//! crate does not ship, a table or UDF DataFusion's runner registers in Rust) and is counted as
//! unsupported, by reason. Differences that are not differences are accepted only by rules
//! checked on the two answers (`upstream_slt/report.rs`: rows in another order without ORDER
//! BY, the same error without DataFusion's context lines, dictionary columns decoded for Flight
//! SQL clients, CREATE TABLE's row count). `upstream_slt/skip.txt` lists, each with its reason,
//! the files that cannot work through Quiver by design, the records whose answer differs by
//! design and the known Quiver bugs (with a reproduction); records that fail only because a
//! listed one left a table out are counted with it (`upstream_slt/cascade.rs`).
//!
//! The files are cut into `SHARDS` tests so that each stays within a test's time budget. Each
//! prints a line per file and its totals, and fails on any mismatch, on a known bug that no
//! longer shows (unless marked intermittent), on an entry that names no record, and when it
//! checked suspiciously little (`SHARD_FILES_MIN`, `SHARD_SUPPORTED_MIN`).
//! `QUIVER_UPSTREAM_SLT_FILTER` runs only the files whose path contains a text, and
//! `QUIVER_UPSTREAM_SLT_VERBOSE` prints why each record was unsupported or listed.

mod common;

#[path = "upstream_slt/cascade.rs"]
mod cascade;
#[path = "upstream_slt/engines.rs"]
mod engines;
#[path = "upstream_slt/fetch.rs"]
mod fetch;
#[path = "upstream_slt/normalize.rs"]
mod normalize;
#[path = "upstream_slt/report.rs"]
mod report;
#[path = "upstream_slt/skips.rs"]
mod skips;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::prelude::SessionContext;
use futures::FutureExt;
use quiver::client::Client;
use quiver::cluster::{LocalCluster, LocalOptions};
use quiver::config::{CoordinatorConfig, PlannerConfig, WorkerConfig};
use sqllogictest::{ColumnType, Condition, QueryExpect, Record, RecordOutput, TestErrorKind};

use engines::{Db, Engine, ENGINE_NAME, LABEL};
use normalize::ColumnKind;
use report::{FileReport, ShardReport, Verdict};
use skips::{Listed, SkipList};

/// Tests the files are cut into: file `i` (in path order) runs in shard `i % SHARDS`.
const SHARDS: usize = 6;
/// Workers of each file's cluster, their slots and memory.
const WORKERS: usize = 3;
const WORKER_SLOTS: usize = 2;
const WORKER_MEMORY_BYTES: u64 = 1 << 30;
/// Tasks per worker slot a leaf Stage is cut into (`PlannerConfig::many_small_tasks` has 8): a
/// scan of even a tiny table runs as several Tasks whose outputs are shuffled or merged, at a
/// quarter of the cost, so that the 250 files fit in CI's time.
const TASKS_PER_SLOT: usize = 2;
/// DataFusion partitions of the single-node reference: the coordinator's (`many_tasks_config`).
const SINGLE_TARGET_PARTITIONS: usize = 3;
/// Longest a record may run on one engine; a record that hangs fails as a mismatch.
const RECORD_TIMEOUT_S: u64 = 30;
/// A shard that runs fewer files, or fewer supported records, checked too little to pass.
const SHARD_FILES_MIN: usize = 30;
const SHARD_SUPPORTED_MIN: usize = 1_500;

/// Runs only the files whose path contains this text (to look at one file); the shard's
/// minimum counts are then not enforced.
const FILTER_ENV: &str = "QUIVER_UPSTREAM_SLT_FILTER";

/// Serialises shards that share a process (`cargo test`): each sets the process's directory.
static ONE_SHARD_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What the suite does with one parsed record.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Runner state (`control`, `hash-threshold`, comments): given to both runners, not counted.
    Control,
    /// An `onlyif`/`skipif` condition says DataFusion does not run it.
    NotForDataFusion,
    /// Not compared, by a rule that holds for every record like it.
    Rule(&'static str),
    Run,
}

/// How one engine did on one record.
#[derive(Debug, Clone)]
enum Run {
    /// As the file expects; with the error the engine gave where the file expects one, and
    /// the Arrow schema of a query's result.
    Passed { error: Option<String>, schema: Option<SchemaRef> },
    /// The same as the file expects by a rule of `report`, checked on this run.
    PassedAs(&'static str),
    Failed(TestErrorKind),
    TimedOut,
    Panicked(String),
}

fn shard(index: usize) {
    let _alone = ONE_SHARD_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let source = fetch::crate_dir();
    let ws = fetch::Workspace::new(&source);
    std::env::set_current_dir(ws.crate_dir()).expect("cd into the crate copy");
    let skips = SkipList::load();
    let filter = std::env::var(FILTER_ENV).ok();
    let files: Vec<String> = slt_files(&ws.test_files())
        .into_iter()
        .enumerate()
        .filter(|(i, f)| i % SHARDS == index && filter.as_ref().is_none_or(|text| f.contains(text.as_str())))
        .map(|(_, f)| f)
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let report = runtime.block_on(run_files(&ws, &files, &skips));
    println!("{}", report.totals(index, SHARDS));
    let (files_min, supported_min) = if filter.is_some() { (0, 0) } else { (SHARD_FILES_MIN, SHARD_SUPPORTED_MIN) };
    let problems = report.problems(files_min, supported_min);
    assert!(problems.is_empty(), "shard {index} of {SHARDS}:\n{}", problems.join("\n\n"));
}

async fn run_files(ws: &fetch::Workspace, files: &[String], skips: &SkipList) -> ShardReport {
    let mut report = ShardReport::default();
    for relative in files {
        let file = match skips.file_reason(relative) {
            Some(reason) => FileReport::skipped(relative, reason),
            None => run_file(ws, relative, skips).await,
        };
        println!("{}", file.line());
        report.add(file);
    }
    report
}

/// Every `.slt` file under `test_files/` (not the `.slt.part` files they include), by path.
fn slt_files(dir: &Path) -> Vec<String> {
    let mut found = vec![];
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())).flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "slt") {
                found.push(path.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}

/// One file's records and how each engine ran them.
struct FileRuns {
    records: Vec<Record<ColumnKind>>,
    steps: Vec<Step>,
    single: Vec<Option<Run>>,
    cluster: Vec<Option<Run>>,
}

async fn run_file(ws: &fetch::Workspace, relative: &str, skips: &SkipList) -> FileReport {
    let records = match sqllogictest::parse_file::<ColumnKind>(&ws.test_files().join(relative)) {
        Ok(records) => records,
        Err(e) => return FileReport::unparsable(relative, &e.to_string()),
    };
    let records: Vec<_> = records.into_iter().take_while(|r| !matches!(r, Record::Halt { .. })).collect();
    let mut file = FileReport::new(relative);
    let runs = run_both(ws, relative, records, &mut file).await;
    judge(ws, &runs, skips, &mut file);
    file.check_listed(skips);
    file
}

/// Runs the file on single-node DataFusion, then on a fresh cluster, each from an empty scratch
/// directory as DataFusion's runner starts a file.
async fn run_both(ws: &fetch::Workspace, relative: &str, records: Vec<Record<ColumnKind>>, file: &mut FileReport) -> FileRuns {
    let steps: Vec<Step> = records.iter().map(step).collect();
    // As DataFusion prints object store paths: without the leading slash.
    let root = ws.root.path().to_string_lossy().trim_start_matches('/').to_string();

    let started = Instant::now();
    ws.reset_scratch(Path::new(relative));
    let single = Db::new(Engine::Single(single_context(relative)), &root);
    let single = run_engine(single, &records, &steps, None).await;
    file.single_elapsed = started.elapsed();

    let started = Instant::now();
    ws.reset_scratch(Path::new(relative));
    let (cluster, client, dir) = start_cluster().await;
    let db = Db::new(Engine::Cluster(client), &root);
    let cluster_runs = run_engine(db, &records, &steps, Some(&single)).await;
    cluster.shutdown().await;
    drop(dir);
    file.cluster_elapsed = started.elapsed();
    FileRuns { records, steps, single, cluster: cluster_runs }
}

/// Gives each record its verdict, in file order, following what listed failures left out.
fn judge(ws: &fetch::Workspace, runs: &FileRuns, skips: &SkipList, file: &mut FileReport) {
    let missing = tables_without_data(&runs.records);
    let mut broken = cascade::Broken::default();
    for (i, record) in runs.records.iter().enumerate() {
        let Some(id) = record_id(ws, &file.file, record) else { continue };
        let sql = record_sql(record);
        let (single, cluster) = (runs.single[i].as_ref(), runs.cluster[i].as_ref());
        let Some(verdict) = verdict(&runs.steps[i], single, cluster, reads_any(&sql, &missing)) else { continue };
        let verdict = listed(verdict, skips.record(&id), broken.cause_of(&sql));
        // Only a statement that succeeded makes its table whole (an expected error makes nothing).
        let made = verdict.ran_as_expected() && matches!(cluster, Some(Run::Passed { error: None, .. }));
        if let Some(listing) = verdict.listing() {
            broken.update(&sql, Some(listing));
        } else if made {
            broken.update(&sql, None);
        }
        file.add(id, sql, verdict);
    }
}

/// A fresh cluster for one file (files create tables and change settings): `WORKERS` workers
/// whose leaf Stages are cut into `TASKS_PER_SLOT` Tasks per slot however small their input.
async fn start_cluster() -> (LocalCluster, Client, tempfile::TempDir) {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let dir = tempfile::tempdir().expect("temp dir");
    let planner = PlannerConfig { tasks_per_slot: TASKS_PER_SLOT, ..PlannerConfig::many_small_tasks() };
    let opts = LocalOptions {
        workers: WORKERS,
        worker: WorkerConfig { slots: WORKER_SLOTS, memory_limit_bytes: WORKER_MEMORY_BYTES, ..WorkerConfig::default() },
        coordinator: CoordinatorConfig { planner, ..common::many_tasks_config() },
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: None,
    };
    let cluster = LocalCluster::start(opts).await.expect("cluster starts");
    let client = Client::connect(&cluster.url()).await.expect("client connects");
    (cluster, client, dir)
}

/// The reference engine: Quiver's settings, plus what DataFusion's runner sets up for a file
/// that Quiver's coordinator also has (reading files named in FROM).
fn single_context(relative: &str) -> SessionContext {
    let ctx = SessionContext::new_with_config(quiver::config::session_config(SINGLE_TARGET_PARTITIONS));
    if relative == "dynamic_file.slt" { ctx.enable_url_table() } else { ctx }
}

fn step(record: &Record<ColumnKind>) -> Step {
    let (conditions, sql) = match record {
        Record::Statement { conditions, sql, .. } | Record::Query { conditions, sql, .. } => (conditions, Some(sql)),
        Record::System { conditions, .. } => (conditions, None),
        _ => return Step::Control,
    };
    if conditions.iter().any(skips_datafusion) {
        return Step::NotForDataFusion;
    }
    match sql {
        Some(sql) if first_word(sql).eq_ignore_ascii_case("explain") => {
            Step::Rule("EXPLAIN: Quiver's EXPLAIN shows its Stage plan, not DataFusion's")
        }
        Some(_) => Step::Run,
        None => Step::Rule("system command: not SQL"),
    }
}

/// Whether a condition keeps a record from DataFusion's runner (label `Datafusion`, engine
/// `DataFusion`).
fn skips_datafusion(condition: &Condition) -> bool {
    let ours = |label: &str| label == LABEL || label == ENGINE_NAME;
    match condition {
        Condition::OnlyIf { label } => !ours(label),
        Condition::SkipIf { label } => ours(label),
    }
}

/// The first word of a statement, past comments.
fn first_word(sql: &str) -> &str {
    let code = sql.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with("--")).unwrap_or("");
    code.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').next().unwrap_or("")
}

/// Tables the file defines over files outside the crate that it does not ship (DataFusion
/// creates such a table, empty), and tables and files made from them: a record reading one is
/// unsupported for want of data.
fn tables_without_data(records: &[Record<ColumnKind>]) -> Vec<String> {
    let (mut tables, mut files): (Vec<String>, Vec<String>) = (vec![], vec![]);
    for record in records {
        let sql = record_sql(record).split_whitespace().collect::<Vec<_>>().join(" ").to_ascii_lowercase();
        let location = cascade::quoted_after(&sql, "location");
        let missing = location.is_some_and(|l| (l.starts_with("../") && !Path::new(l).exists()) || files.iter().any(|f| l.starts_with(f.as_str())));
        match (cascade::defined_table(&sql), cascade::quoted_after(&sql, " to ")) {
            (Some(table), _) if missing || reads_any(&sql, &tables) => tables.push(table.to_string()),
            (None, Some(file)) if sql.starts_with("copy") && reads_any(&sql, &tables) => files.push(file.to_string()),
            _ => {}
        }
    }
    tables
}

/// Whether `sql` names one of `tables` as a word.
fn reads_any(sql: &str, tables: &[String]) -> bool {
    let sql = sql.to_ascii_lowercase();
    sql.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').any(|w| tables.iter().any(|t| t == w))
}

fn record_sql(record: &Record<ColumnKind>) -> String {
    match record {
        Record::Statement { sql, .. } | Record::Query { sql, .. } => sql.clone(),
        Record::System { command, .. } => command.clone(),
        _ => String::new(),
    }
}

/// `file.slt:line`, or `file.slt>part.slt.part:line` for a record of an included file; none for
/// a record that is not a statement, query or command.
fn record_id(ws: &fetch::Workspace, relative: &str, record: &Record<ColumnKind>) -> Option<String> {
    let loc = match record {
        Record::Statement { loc, .. } | Record::Query { loc, .. } | Record::System { loc, .. } => loc,
        _ => return None,
    };
    let own = normal_relative(&ws.test_files(), Path::new(loc.file()));
    Some(if own == relative { format!("{relative}:{}", loc.line()) } else { format!("{relative}>{own}:{}", loc.line()) })
}

/// `file` relative to `base`, without `.` components.
fn normal_relative(base: &Path, file: &Path) -> String {
    let file: PathBuf = file.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect();
    file.strip_prefix(base).unwrap_or(&file).to_string_lossy().into_owned()
}

/// Runs the records in order on one engine; the result of each record that `steps` runs. The
/// cluster's run is given the single-node runs, to check a result whose column types differ
/// only by dictionary encoding (`retyped_for_decoded_dictionaries`).
async fn run_engine(db: Db, records: &[Record<ColumnKind>], steps: &[Step], reference: Option<&[Option<Run>]>) -> Vec<Option<Run>> {
    let schemas = db.clone();
    let mut runner = sqllogictest::Runner::new(move || {
        let db = db.clone();
        async move { Ok(db) }
    });
    runner.add_label(LABEL);
    runner.with_column_validator(sqllogictest::strict_column_validator);
    runner.with_normalizer(trim_end);
    runner.with_validator(validate);
    let mut runs = Vec::with_capacity(records.len());
    for (i, (record, step)) in records.iter().zip(steps).enumerate() {
        runs.push(match step {
            Step::Control => {
                let _ = runner.run_async(record.clone()).await;
                None
            }
            Step::Run => {
                let run = run_record(&mut runner, &schemas, record.clone()).await;
                let single = reference.and_then(|r| r[i].as_ref());
                Some(match single.and_then(|single| retyped_for_decoded_dictionaries(single, &run, record)) {
                    // A failure of the retyped run is about the rows, and is judged as such.
                    Some(retyped) => match run_record(&mut runner, &schemas, retyped).await {
                        Run::Passed { .. } => Run::PassedAs(report::DECODED_DICTIONARIES),
                        failed => failed,
                    },
                    None => run,
                })
            }
            Step::NotForDataFusion | Step::Rule(_) => None,
        });
    }
    runs
}

async fn run_record<M>(runner: &mut sqllogictest::Runner<Db, M>, db: &Db, record: Record<ColumnKind>) -> Run
where
    M: sqllogictest::MakeConnection<Conn = Db>,
{
    let run = AssertUnwindSafe(runner.run_async(record)).catch_unwind();
    match tokio::time::timeout(Duration::from_secs(RECORD_TIMEOUT_S), run).await {
        Err(_) => Run::TimedOut,
        Ok(Err(panic)) => Run::Panicked(panic_text(panic.as_ref())),
        Ok(Ok(Err(e))) => Run::Failed(e.kind()),
        Ok(Ok(Ok(output))) => Run::Passed { error: output_error(&output), schema: db.take_schema() },
    }
}

/// Quiver's Flight SQL service sends dictionary-encoded columns as their values (its wire
/// schema says so), so a query's column letters can differ from the file's where single-node
/// DataFusion answered with a dictionary. Such a query is run again expecting the cluster's
/// letters; its rows must still be the file's.
fn retyped_for_decoded_dictionaries(single: &Run, cluster: &Run, record: &Record<ColumnKind>) -> Option<Record<ColumnKind>> {
    let (Run::Passed { schema: Some(schema), .. }, Run::Failed(TestErrorKind::QueryResultColumnsMismatch { expected, actual, .. })) = (single, cluster) else {
        return None;
    };
    let (expected, actual): (Vec<char>, Vec<char>) = (expected.chars().collect(), actual.chars().collect());
    let decoded = |i: usize| match schema.fields().get(i).map(|f| f.data_type()) {
        Some(t @ DataType::Dictionary(..)) => normalize::column_kind(dictionary_values(t)).to_char() == actual[i],
        _ => false,
    };
    let explained = expected.len() == actual.len() && (0..actual.len()).all(|i| expected[i] == actual[i] || decoded(i));
    let rerunnable = ["select", "with", "values"].iter().any(|w| first_word(&record_sql(record)).eq_ignore_ascii_case(w));
    if !explained || !rerunnable {
        return None;
    }
    let mut record = record.clone();
    if let Record::Query { expected: QueryExpect::Results { types, .. }, .. } = &mut record {
        *types = actual.iter().filter_map(|c| ColumnKind::from_char(*c)).collect();
    }
    Some(record)
}

/// The type a (possibly nested) dictionary type decodes to.
fn dictionary_values(t: &DataType) -> &DataType {
    match t {
        DataType::Dictionary(_, value) => dictionary_values(value),
        other => other,
    }
}

fn output_error(output: &RecordOutput<ColumnKind>) -> Option<String> {
    match output {
        RecordOutput::Query { error, .. } | RecordOutput::Statement { error, .. } => error.as_ref().map(|e| e.to_string()),
        _ => None,
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Trailing whitespace is not compared (DataFusion's runner's normalizer).
#[allow(clippy::ptr_arg)]
fn trim_end(s: &String) -> String {
    s.trim_end().to_string()
}

/// DataFusion's runner's comparison: rows joined by spaces, trailing whitespace ignored;
/// `<slt:ignore>` in the expected text matches anything, the first fragment only at the start.
fn validate(normalizer: sqllogictest::Normalizer, actual: &[Vec<String>], expected: &[String]) -> bool {
    const IGNORE: &str = "<slt:ignore>";
    let expected: Vec<String> = expected.iter().map(normalizer).collect();
    let actual: Vec<String> = actual.iter().map(|row| row.join(" ").trim_end().to_string()).collect();
    if !expected.iter().any(|l| l.contains(IGNORE)) {
        return actual == expected;
    }
    let (expected, actual) = (expected.join("\n"), actual.join("\n"));
    let mut at = 0;
    for (i, fragment) in expected.split(IGNORE).enumerate().filter(|(_, f)| !f.is_empty()) {
        match actual[at..].find(fragment) {
            Some(found) if i > 0 || found == 0 => at += found + fragment.len(),
            _ => return false,
        }
    }
    true
}

/// What a record's two runs mean; none for a record that is only runner state.
fn verdict(step: &Step, single: Option<&Run>, cluster: Option<&Run>, reads_missing_data: bool) -> Option<Verdict> {
    match step {
        Step::Control => return None,
        Step::NotForDataFusion => return Some(Verdict::NotForDataFusion),
        Step::Rule(reason) => return Some(Verdict::Rule(reason)),
        Step::Run => {}
    }
    let (single, cluster) = (single?, cluster?);
    let Run::Passed { error: single_error, .. } = single else {
        let text = single_text(single);
        return Some(Verdict::Unsupported(report::unsupported_reason(&text, reads_missing_data), text));
    };
    Some(match cluster {
        Run::Passed { .. } => Verdict::Passed,
        Run::PassedAs(why) => Verdict::PassedAs(why),
        failed => match report::tolerated(single_error.as_deref(), failed_kind(failed)) {
            Some(why) => Verdict::PassedAs(why),
            None => Verdict::Mismatch(single_text(failed)),
        },
    })
}

/// A verdict in the light of skip.txt (`listed`) and of the listed failures before it (`cause`).
fn listed(verdict: Verdict, listed: Option<(Listed, &str)>, cause: Option<Listed>) -> Verdict {
    match (verdict, listed, cause) {
        (Verdict::Mismatch(text), Some((listed, _)), _) => Verdict::Listed(listed, text),
        (Verdict::Mismatch(text), None, Some(cause)) => Verdict::Consequence(cause, text),
        (_, Some((listed, reason)), _) => Verdict::ListedButPassed(listed, reason.contains(skips::INTERMITTENT)),
        (verdict, None, _) => verdict,
    }
}

fn failed_kind(run: &Run) -> Option<&TestErrorKind> {
    match run {
        Run::Failed(kind) => Some(kind),
        _ => None,
    }
}

/// What went wrong in a run, in words.
fn single_text(run: &Run) -> String {
    match run {
        Run::Passed { .. } | Run::PassedAs(_) => "passed".to_string(),
        Run::Failed(kind) => kind.to_string(),
        Run::TimedOut => format!("timed out after {RECORD_TIMEOUT_S} s"),
        Run::Panicked(text) => format!("panicked: {text}"),
    }
}

macro_rules! shards {
    ($($name:ident = $index:expr),*) => {$(
        #[test]
        fn $name() {
            shard($index);
        }
    )*};
}

shards!(shard_0 = 0, shard_1 = 1, shard_2 = 2, shard_3 = 3, shard_4 = 4, shard_5 = 5);
