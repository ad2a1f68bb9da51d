//! Shared test helpers: an in-process cluster on loopback that cuts work into many small Tasks,
//! a single-node DataFusion reference, and one `check` per kind of comparison.
#![allow(dead_code)]

pub mod procs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use quiver::client::Client;
use quiver::cluster::{LocalCluster, LocalOptions};
use quiver::config::{session_config, CoordinatorConfig, PlannerConfig, WorkerConfig};

pub struct TestCluster {
    pub cluster: LocalCluster,
    pub client: Client,
    pub single: SessionContext,
    pub dir: tempfile::TempDir,
}

/// Makes every hash join a partitioned one: both sides are shuffled by the join keys.
pub const SHUFFLE_JOINS: [&str; 2] = [
    "SET datafusion.optimizer.hash_join_single_partition_threshold = 0",
    "SET datafusion.optimizer.hash_join_single_partition_threshold_rows = 0",
];

/// Every adaptive mechanism on with thresholds so low that it acts everywhere: partitions above
/// the median are split, the rest coalesced, any Task slower than the median finished one (or,
/// with none finished, running over 1 ms) gets a speculative Attempt, and the last scan slices
/// of a Stage are cut into pieces.
pub const ADAPTIVE_EVERYWHERE: [&str; 10] = [
    "SET quiver.skew_factor = 1",
    "SET quiver.skew_min_bytes = 0",
    "SET quiver.coalesce_target_bytes = 67108864",
    "SET quiver.speculation_quantile = 0",
    "SET quiver.speculation_multiplier = 1",
    "SET quiver.speculation_min_runtime_ms = 0",
    "SET quiver.speculation_max_fraction = 1",
    "SET quiver.speculation_lone_task_ms = 1",
    "SET quiver.slow_worker_pace = 1",
    "SET quiver.slice_piece_min_bytes = 1",
];

/// Settings that force many small Tasks: the merge path runs on every query.
pub fn many_tasks_config() -> CoordinatorConfig {
    CoordinatorConfig { planner: PlannerConfig::many_small_tasks(), write_row_group_rows: 7, target_partitions: 3, ..CoordinatorConfig::default() }
}

impl TestCluster {
    pub async fn start(workers: usize) -> Self {
        Self::start_with(workers, WorkerConfig { slots: 2, memory_limit_bytes: 1 << 30, ..WorkerConfig::default() }).await
    }

    pub async fn start_with(workers: usize, worker: WorkerConfig) -> Self {
        Self::start_serving(workers, worker, None).await
    }

    /// A cluster whose coordinator also serves its web UI, API and metrics on an ephemeral port
    /// (`cluster.http_addr()`).
    pub async fn start_with_http(workers: usize, worker: WorkerConfig) -> Self {
        Self::start_serving(workers, worker, Some("127.0.0.1:0".parse().unwrap())).await
    }

    async fn start_serving(workers: usize, worker: WorkerConfig, http: Option<std::net::SocketAddr>) -> Self {
        Self::start_configured(workers, worker, many_tasks_config(), http).await
    }

    /// A cluster whose coordinator runs with `coordinator`.
    pub async fn start_configured(workers: usize, worker: WorkerConfig, coordinator: CoordinatorConfig, http: Option<std::net::SocketAddr>) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let opts = LocalOptions {
            workers,
            worker,
            coordinator,
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".parse().unwrap(),
            http,
        };
        let cluster = LocalCluster::start(opts).await.expect("cluster starts");
        let client = Client::connect(&cluster.url()).await.expect("client connects");
        let single = SessionContext::new_with_config(session_config(3));
        Self { cluster, client, single, dir }
    }

    /// Runs statements on the cluster, in order.
    pub async fn run_all(&self, statements: &[&str]) {
        for sql in statements {
            self.client.collect(sql).await.unwrap_or_else(|e| panic!("cluster failed {sql}: {e}"));
        }
    }

    /// Runs `sql` on both engines (e.g. DDL over shared files).
    pub async fn both(&self, sql: &str) {
        self.client.collect(sql).await.unwrap_or_else(|e| panic!("cluster failed {sql}: {e}"));
        self.single.sql(sql).await.and_then(|df| Ok(df)).unwrap_or_else(|e| panic!("single failed {sql}: {e}"));
    }

    pub async fn cluster_rows(&self, sql: &str) -> Vec<Vec<String>> {
        let (_, batches) = self.client.collect(sql).await.unwrap_or_else(|e| panic!("cluster failed {sql}: {e}"));
        rows(&batches)
    }

    pub async fn single_rows(&self, sql: &str) -> Vec<Vec<String>> {
        let batches: Vec<RecordBatch> = self
            .single
            .sql(sql)
            .await
            .unwrap_or_else(|e| panic!("single failed {sql}: {e}"))
            .execute_stream()
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("single failed {sql}: {e}"));
        rows(&batches)
    }

    /// The differential check: same rows on the cluster and on single-node DataFusion.
    pub async fn check_same(&self, sql: &str) {
        let (mut cluster, mut single) = (self.cluster_rows(sql).await, self.single_rows(sql).await);
        if !has_total_order(sql) {
            cluster.sort();
            single.sort();
        }
        assert_rows_match(sql, &cluster, &single);
    }
}

impl TestCluster {
    /// Runs `sql` on single-node DataFusion after copying `table` from the cluster into it.
    /// Polls `sql` until it returns one column with these values; panics after a minute.
    pub async fn wait_for_rows(&self, sql: &str, expected: &[&str]) {
        let want: Vec<Vec<String>> = expected.iter().map(|v| vec![v.to_string()]).collect();
        let want = &want;
        let deadline = std::time::Duration::from_secs(60);
        wait_for(sql, deadline, move || async move { (self.cluster_rows(sql).await == *want).then_some(()) }).await
    }

    pub async fn single_rows_after_copy(&self, sql: &str, table: &str) -> Vec<Vec<String>> {
        if !self.single.table_exist(table).unwrap() {
            let (schema, batches) = self.client.collect(&format!("SELECT * FROM {table}")).await.unwrap();
            let mem = datafusion::datasource::MemTable::try_new(schema, vec![batches]).unwrap();
            self.single.register_table(table, Arc::new(mem)).unwrap();
        }
        self.single_rows(sql).await
    }

    /// Asserts the single row a query returns on the cluster.
    pub async fn check_same_count(&self, sql: &str, expected: Vec<&str>) {
        let rows = self.cluster_rows(sql).await;
        assert_eq!(rows, vec![expected.into_iter().map(str::to_string).collect::<Vec<_>>()], "{sql}");
    }
}

fn has_total_order(sql: &str) -> bool {
    sql.to_ascii_lowercase().contains("order by")
}

/// Formats every cell as text: NULL as "NULL".
pub fn rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for batch in batches {
        let formatters: Vec<_> =
            batch.columns().iter().map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap()).collect();
        for row in 0..batch.num_rows() {
            out.push(formatters.iter().map(|f| f.value(row).to_string()).collect());
        }
    }
    out
}

/// Cells equal as text, or as numbers within a relative 1e-9 (floating sums in another order).
pub fn cells_match(a: &str, b: &str, rel: f64) -> bool {
    if a == b {
        return true;
    }
    match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() <= rel * x.abs().max(y.abs()).max(1.0),
        _ => a.trim() == b.trim(),
    }
}

pub fn assert_rows_match(sql: &str, actual: &[Vec<String>], expected: &[Vec<String>]) {
    assert_eq!(actual.len(), expected.len(), "row count differs for {sql}\nactual: {actual:?}\nexpected: {expected:?}");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let same = a.len() == e.len() && a.iter().zip(e).all(|(x, y)| cells_match(x, y, 1e-9));
        assert!(same, "row {i} differs for {sql}\nactual:   {a:?}\nexpected: {e:?}");
    }
}

/// Where the official TPC-H answers (and the queries they answer) live: `$QUIVER_TPCH_DIR`,
/// else `../shared/tpch` beside this checkout.
pub fn tpch_dir() -> PathBuf {
    match std::env::var_os("QUIVER_TPCH_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tpch"),
    }
}

/// The official answer of a TPC-H query at a scale factor: its header and its rows.
pub fn tpch_answer(sf: &str, q: usize) -> (Vec<String>, Vec<Vec<String>>) {
    let path = tpch_dir().join(format!("answers/sf{sf}/q{q:02}.csv"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines().map(|l| l.split('|').map(str::to_string).collect::<Vec<_>>());
    let header = lines.next().unwrap_or_default();
    (header, lines.collect())
}

/// Every column of a TPC-H answer, text included, compared with the official one: numbers
/// within a relative 1e-6 (decimals summed in another order). Ties under ORDER BY may come in
/// another order, so a second try compares the rows as multisets. None when they match.
pub fn tpch_mismatch(sf: &str, q: usize, actual: &[Vec<String>]) -> Option<String> {
    let (_, expected) = tpch_answer(sf, q);
    if matches_answer(actual, &expected) {
        return None;
    }
    let (mut actual, mut expected) = (actual.to_vec(), expected);
    actual.sort();
    expected.sort();
    (!matches_answer(&actual, &expected)).then(|| format!("q{q}: got {actual:?}\nwant {expected:?}"))
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

pub fn quiver_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_quiver"))
}

/// Waits until no worker runs a Task or holds an output part, a spill file or memory; panics
/// after 5 s.
pub async fn assert_workers_idle(t: &TestCluster, after: &str) {
    let mut held = (0, 0, 0, 0);
    for _ in 0..250 {
        let workers = t.cluster.workers.iter().flatten();
        held = workers.fold((0, 0, 0, 0), |(r, p, f, m), w| {
            (r + w.running_tasks(), p + w.stored_outputs(), f + w.spill_files(), m + w.memory_used_bytes())
        });
        if held == (0, 0, 0, 0) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (running, parts, files, bytes) = held;
    panic!("after {after}, workers still run {running} tasks and hold {parts} output parts, {files} spill files, {bytes} bytes");
}

/// An HTTP answer: status, content type and body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: String,
    /// The status line and headers, as sent.
    pub head: String,
    pub body: String,
}

/// Sends one HTTP/1.0 request: the server closes the connection after its answer, so the body
/// is everything read until then.
pub async fn http_request(addr: std::net::SocketAddr, method: &str, path: &str) -> HttpResponse {
    http_request_with(addr, method, path, &[]).await
}

/// As [`http_request`], with extra request headers.
pub async fn http_request_with(addr: std::net::SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let extra: String = headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
    let request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}Content-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {text:?}"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let content_type = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.trim().to_string())
        .unwrap_or_default();
    HttpResponse { status, content_type, head: head.to_string(), body: body.to_string() }
}

/// GETs `path` and parses its JSON body, whatever the status.
pub async fn get_json(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let response = http_request(addr, "GET", path).await;
    assert!(response.content_type.starts_with("application/json"), "{path}: {response:?}");
    let json = serde_json::from_str(&response.body).unwrap_or_else(|e| panic!("{path}: {e} in {}", response.body));
    (response.status, json)
}

/// The samples of a Prometheus text exposition: `name{labels}` → value.
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("malformed sample {l:?}"));
            (name.to_string(), value.parse().unwrap_or_else(|_| panic!("malformed value in {l:?}")))
        })
        .collect()
}

/// Polls `probe` until it returns Some, panicking with `what` after `deadline`.
pub async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(what: &str, deadline: std::time::Duration, mut probe: impl FnMut() -> F) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(start.elapsed() < deadline, "gave up after {deadline:?} waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Where the Debian package puts headless Chromium; CI installs it (`.ci/run`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// How long one Chromium run may take before the test fails.
const CHROMIUM_DEADLINE_S: u64 = 120;

/// Loads `url` in headless Chromium with a fresh profile, lets its scripts run for `budget_ms` of
/// virtual time (network waits do not count) and returns the rendered DOM.
pub fn rendered_dom(url: &str, budget_ms: u64) -> String {
    assert!(Path::new(CHROMIUM).exists(), "the browser test needs headless Chromium at {CHROMIUM}: apt-get install -y chromium");
    let profile = tempfile::tempdir().expect("temp dir");
    let mut child = std::process::Command::new(CHROMIUM)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .args(["--dump-dom", url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));
    // Read both pipes while Chromium runs: a full pipe would stall it.
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            pipe.map(|mut p| p.read_to_string(&mut text));
            text
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(CHROMIUM_DEADLINE_S);
    let status = loop {
        if let Some(status) = child.try_wait().expect("chromium status") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not render {url} within {CHROMIUM_DEADLINE_S} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let (dom, stderr) = (stdout.join().expect("stdout reader"), stderr.join().expect("stderr reader"));
    assert!(status.success(), "chromium failed on {url}: {stderr}");
    dom
}

/// The opening tags (`<tag …>`) of every `tag` element in serialized HTML.
pub fn opening_tags<'a>(html: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag} ");
    html.match_indices(&open).map(|(start, _)| &html[start..start + html[start..].find('>').unwrap_or(0) + 1]).collect()
}

/// The value of attribute `name` in an opening tag.
pub fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    Some(&tag[start..start + tag[start..].find('"')?])
}

/// A port free now on every address (a server started right after can take it), drawn at
/// random below Linux's ephemeral range (32768–60999). A port the OS hands out for `:0` is an
/// ephemeral one, which any outgoing connection of the many processes tests run at once may
/// take as its source port before the server binds it (regression: a coordinator's port taken
/// so, and a client talking to another test's worker). Never the same port twice in a process.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    const FIRST: u16 = 12_000;
    const COUNT: u128 = 20_000;
    loop {
        let port = FIRST + (uuid::Uuid::new_v4().as_u128() % COUNT) as u16;
        let mut given = GIVEN.lock().unwrap();
        if given.contains(&port) || std::net::TcpListener::bind(("0.0.0.0", port)).is_err() {
            continue;
        }
        given.push(port);
        return port;
    }
}

/// A child process killed when dropped, so a failing test leaves nothing running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a child's stderr until a line starts with `prefix`; returns the rest of that line.
pub fn stderr_line_after(child: &mut std::process::Child, prefix: &str) -> String {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.expect("stderr line");
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.trim().to_string();
        }
        seen.push(line);
    }
    panic!("the process ended without printing '{prefix}'; it printed:\n{}", seen.join("\n"));
}

/// A small deterministic generator (xorshift64*): the same seed makes the same query, the same
/// fuzz input.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}
