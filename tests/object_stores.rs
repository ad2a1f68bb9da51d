//! Tables in an S3-compatible object store: moto's server (`python3 -m moto.server`, from PyPI
//! `moto[server]`; `.ci/run` installs it), started by each test. The data lives only in the store: the local copy it was
//! uploaded from is removed before any query, so no process can read a table from local disk.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::procs::{Netns, ProcCluster};
use common::*;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use quiver::client::Client;
use quiver::tpch::{self, Layout};

const BUCKET: &str = "tables";
/// The secret the tests' tables are opened with: it must never show in a log or a system table.
const SECRET: &str = "s3cr3t-Value-that-must-not-leak";

/// A moto S3 server, stopped when dropped.
struct S3Server {
    _process: KillOnDrop,
    /// Where every process reaches it, e.g. `http://10.101.0.1:4566`.
    endpoint: String,
}

impl S3Server {
    /// Starts moto listening on `host` (and every address when `host` is not loopback), on a
    /// free port, with the test bucket.
    async fn start(host: &str) -> Self {
        let server = Self::spawn(host, false).await;
        let addr: SocketAddr = server.endpoint.trim_start_matches("http://").parse().unwrap();
        let created = http_request(addr, "PUT", &format!("/{BUCKET}")).await;
        assert_eq!(created.status, 200, "creating the bucket: {created:?}");
        server
    }

    /// A server that checks access keys (moto's IAM): it knows none, so every request is
    /// refused as a wrong key would be.
    async fn start_checking_keys() -> Self {
        Self::spawn("127.0.0.1", true).await
    }

    async fn spawn(host: &str, check_keys: bool) -> Self {
        let port = free_port();
        let listen = if host.starts_with("127.") { host } else { "0.0.0.0" };
        let mut command = Command::new("python3");
        command.args(["-m", "moto.server"]);
        if check_keys {
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
        }
        let process = command
            .args(["-H", listen, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3 -m moto.server (pip install 'moto[server]'; .ci/run does): {e}"));
        let server = Self { _process: KillOnDrop(process), endpoint: format!("http://{host}:{port}") };
        let addr: SocketAddr = format!("{host}:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start on {addr}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }

    fn store(&self) -> impl ObjectStore {
        AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_bucket_name(BUCKET)
            .with_access_key_id("quiver-test")
            .with_secret_access_key(SECRET)
            .build()
            .unwrap()
    }

    /// Copies every file under `dir` to `prefix/…` in the bucket, then removes `dir`.
    async fn move_into(&self, dir: &std::path::Path, prefix: &str) {
        let store = self.store();
        for path in files_under(dir) {
            let relative = path.strip_prefix(dir).unwrap().display().to_string();
            let bytes = std::fs::read(&path).unwrap();
            store.put(&StorePath::from(format!("{prefix}/{relative}")), PutPayload::from(bytes)).await.unwrap();
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// `OPTIONS (…)` of a table in this store.
    fn options(&self) -> String {
        format!(
            "OPTIONS ('aws.endpoint' '{}', 'aws.allow_http' 'true', 'aws.region' 'us-east-1', \
             'aws.access_key_id' 'quiver-test', 'aws.secret_access_key' '{SECRET}')",
            self.endpoint
        )
    }
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else if path.extension().is_some_and(|e| e == "parquet") {
            found.push(path);
        }
    }
    found
}

/// The statements that register TPC-H's tables from `s3://BUCKET/prefix/`.
fn create_tpch_sql(s3: &S3Server, prefix: &str) -> Vec<String> {
    tpch::TABLES
        .iter()
        .map(|t| format!("CREATE EXTERNAL TABLE {t} STORED AS PARQUET LOCATION 's3://{BUCKET}/{prefix}/{t}/' {}", s3.options()))
        .collect()
}

async fn collect(client: &Client, sql: &str) -> Vec<Vec<String>> {
    rows(&client.collect(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")).1)
}

async fn error_of(client: &Client, sql: &str) -> String {
    match client.collect(sql).await {
        Ok(_) => panic!("{sql} succeeded"),
        Err(e) => e.to_string(),
    }
}

/// Nothing a process wrote, and nothing a system table shows, holds the secret.
async fn assert_secret_kept(cluster: &ProcCluster, client: &Client) {
    let shown = collect(client, "SELECT sql FROM quiver.queries").await;
    assert!(shown.iter().any(|r| r[0].contains("'aws.secret_access_key' '***'")), "no redacted statement in {shown:?}");
    assert!(!shown.iter().any(|r| r[0].contains(SECRET)), "quiver.queries shows the secret");
    for entry in std::fs::read_dir(cluster.dir.path()).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            let log = std::fs::read_to_string(entry.path()).unwrap();
            assert!(!log.contains(SECRET), "{} holds the secret", entry.path().display());
        }
    }
}

/// TPC-H SF 0.1 from S3, on a coordinator and workers that are hosts of their own (network
/// namespaces): every process reads the tables from the store alone, and all 22 queries match
/// the answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_from_s3_on_hosts_of_their_own_matches_the_answers() {
    // SAFETY: nextest runs each test in a process of its own; the variable is read by the
    // processes this test starts.
    unsafe { std::env::set_var("QUIVER_TEST_LOG", "debug") };
    // Host 0 runs the coordinator, hosts 1 and 2 a worker each; the store is outside them all.
    let net = Netns::create(3);
    let s3 = S3Server::start(&net.coordinator_address()).await;
    // Tables the cluster writes go to the store too, opened with the coordinator's environment.
    // SAFETY: as above.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "quiver-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
    }
    let (warehouse, endpoint) = (format!("s3://{BUCKET}/warehouse"), format!("aws.endpoint={}", s3.endpoint));
    let args = [
        "--task-min-bytes", "1MiB", "--warehouse", &warehouse, "--store-option", &endpoint,
        "--store-option", "aws.allow_http=true", "--store-option", "aws.region=us-east-1",
    ];
    let mut cluster = ProcCluster::start_on_host(&net, 0, &args, &[]);
    for host in 1..3 {
        cluster.add_worker_at(format!("{}:{}", net.host(host), 4100), Some(net.name(host)));
    }
    let client = cluster.client().await;
    cluster.wait_alive(&client, 2).await;
    let local = tpch::generate(cluster.dir.path(), 0.1, Layout { files: 1, row_group_rows: 20_000 }).unwrap();
    s3.move_into(&local, "sf0.1").await;
    for sql in create_tpch_sql(&s3, "sf0.1") {
        collect(&client, &sql).await;
    }
    let mut failures = Vec::new();
    for q in 1..=22 {
        let sql = tpch::query_sql(q).unwrap();
        failures.extend(tpch_mismatch("0.1", q, &collect(&client, &sql).await));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let tasks = collect(&client, "SELECT count(DISTINCT worker_id) FROM quiver.tasks WHERE plan LIKE '%DataSourceExec%'").await;
    assert_eq!(tasks[0][0], "2", "both workers scanned the store");

    // Workers on other hosts write a table into the store (its one Stage scans and writes),
    // and read it back.
    collect(&client, "CREATE TABLE orders_copy AS SELECT * FROM orders").await;
    let summary = "SELECT count(*), sum(o_totalprice), min(o_comment), max(o_orderdate) FROM";
    assert_eq!(collect(&client, &format!("{summary} orders_copy")).await, collect(&client, &format!("{summary} orders")).await);
    let writers = "SELECT count(DISTINCT t.worker_id) FROM quiver.tasks t JOIN quiver.queries q ON t.query_id = q.query_id \
                   WHERE q.sql LIKE 'CREATE TABLE orders_copy%' AND t.state = 'succeeded'";
    assert_eq!(collect(&client, writers).await[0][0], "2", "both workers wrote to the store");
    assert!(!objects(&s3, "warehouse/orders_copy").await.is_empty());
    assert_secret_kept(&cluster, &client).await;
}

/// An S3 table survives a coordinator restart (its store is opened again from the catalog);
/// a missing bucket, an unreachable endpoint and a missing region are clear errors that name
/// the location, in seconds, and the cluster keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_tables_survive_a_restart_and_store_errors_are_clear() {
    let s3 = S3Server::start("127.0.0.1").await;
    let mut cluster = ProcCluster::start(2, &[], &[]);
    let client = cluster.client().await;
    cluster.wait_alive(&client, 2).await;
    let local = tpch::generate(cluster.dir.path(), 0.01, Layout { files: 2, row_group_rows: 5_000 }).unwrap();
    s3.move_into(&local, "sf0.01").await;
    for sql in create_tpch_sql(&s3, "sf0.01") {
        collect(&client, &sql).await;
    }
    let q3 = tpch::query_sql(3).unwrap();
    assert_eq!(tpch_mismatch("0.01", 3, &collect(&client, &q3).await), None);

    cluster.kill_coordinator();
    cluster.start_coordinator();
    let client = cluster.client().await;
    cluster.wait_alive(&client, 2).await;
    assert_eq!(tpch_mismatch("0.01", 3, &collect(&client, &q3).await), None, "after a restart");

    // A file added to a table's prefix shows after REFRESH TABLE (listings are cached).
    let store = s3.store();
    let nation = store.get(&StorePath::from("sf0.01/nation/part-1.parquet")).await.unwrap().bytes().await.unwrap();
    store.put(&StorePath::from("grow/a.parquet"), PutPayload::from(nation.clone())).await.unwrap();
    let create = format!("CREATE EXTERNAL TABLE grow STORED AS PARQUET LOCATION 's3://{BUCKET}/grow/' {}", s3.options());
    collect(&client, &create).await;
    assert_eq!(collect(&client, "SELECT count(*) FROM grow").await[0][0], "25");
    store.put(&StorePath::from("grow/b.parquet"), PutPayload::from(nation)).await.unwrap();
    collect(&client, "REFRESH TABLE grow").await;
    assert_eq!(collect(&client, "SELECT count(*) FROM grow").await[0][0], "50");
    assert!(error_of(&client, "REFRESH TABLE nowhere").await.contains("'nowhere' not found"));

    let options = s3.options();
    let started = Instant::now();
    let missing = error_of(&client, &format!("CREATE EXTERNAL TABLE m STORED AS PARQUET LOCATION 's3://no-such-bucket/t/' {options}")).await;
    assert!(missing.contains("cannot read the table location 's3://no-such-bucket/t/'"), "{missing}");
    let closed = format!("http://127.0.0.1:{}", free_port());
    let unreachable = options.replace(&s3.endpoint, &closed);
    let refused = error_of(&client, &format!("CREATE EXTERNAL TABLE u STORED AS PARQUET LOCATION 's3://{BUCKET}/t/' {unreachable}")).await;
    assert!(refused.contains(&format!("cannot read the table location 's3://{BUCKET}/t/'")), "{refused}");
    let strict = S3Server::start_checking_keys().await;
    let denied = error_of(&client, &format!("CREATE EXTERNAL TABLE d STORED AS PARQUET LOCATION 's3://{BUCKET}/t/' {}", strict.options())).await;
    assert!(denied.contains("403") && denied.contains(&format!("'s3://{BUCKET}/t/'")), "{denied}");
    // A warehouse whose store refuses the keys is said at start, and a write to it fails
    // naming the object, leaving no table.
    let strict_endpoint = format!("aws.endpoint={}", strict.endpoint);
    let strict_args = [
        "--warehouse", "s3://tables/w", "--store-option", &strict_endpoint, "--store-option", "aws.allow_http=true",
        "--store-option", "aws.region=us-east-1", "--store-option", "aws.access_key_id=nobody", "--store-option", "aws.secret_access_key=wrong",
    ];
    let refusing = ProcCluster::start(1, &strict_args, &[]);
    wait_for("the unreadable warehouse in the coordinator's log", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(refusing.log("coordinator")).unwrap_or_default();
        async move { log.contains("the warehouse 's3://tables/w' cannot be read").then_some(()) }
    })
    .await;
    let refused_client = refusing.client().await;
    let write = error_of(&refused_client, "CREATE TABLE w AS SELECT * FROM (VALUES (1), (2)) AS v(x)").await;
    assert!(write.contains("cannot write s3://tables/w/w/") && write.contains("403"), "{write}");
    assert_eq!(collect(&refused_client, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'w'").await[0][0], "0");
    // No keys anywhere: object_store asks the EC2 instance metadata service, and the error says
    // that this is why.
    let keyless = format!("OPTIONS ('aws.endpoint' '{}', 'aws.allow_http' 'true', 'aws.region' 'us-east-1')", s3.endpoint);
    let no_keys = error_of(&client, &format!("CREATE EXTERNAL TABLE n STORED AS PARQUET LOCATION 's3://{BUCKET}/sf0.01/nation/' {keyless}")).await;
    assert!(no_keys.contains("no keys were given"), "{no_keys}");
    assert!(started.elapsed() < Duration::from_secs(60), "store errors took {:?}", started.elapsed());
    let no_region = error_of(&client, &format!("CREATE EXTERNAL TABLE r STORED AS PARQUET LOCATION 's3://{BUCKET}/t/'")).await;
    assert!(no_region.contains("no region"), "{no_region}");
    let unknown = error_of(&client, &format!("CREATE EXTERNAL TABLE k STORED AS PARQUET LOCATION 's3://{BUCKET}/t/' OPTIONS ('aws.regoin' 'x')")).await;
    assert!(unknown.contains("unknown option 'aws.regoin'"), "{unknown}");
    for table in ["m", "u", "d", "r", "k", "n"] {
        let listed = collect(&client, &format!("SELECT count(*) FROM information_schema.tables WHERE table_name = '{table}'")).await;
        assert_eq!(listed[0][0], "0", "a failed CREATE left table {table}");
    }
    assert_eq!(tpch_mismatch("0.01", 3, &collect(&client, &q3).await), None, "the cluster still serves");
    collect(&client, "DROP TABLE lineitem").await;
    assert_secret_kept(&cluster, &client).await;
    use std::os::unix::fs::PermissionsExt;
    let catalog = std::fs::metadata(cluster.dir.path().join("data/catalog.json")).unwrap();
    assert_eq!(catalog.permissions().mode() & 0o077, 0, "the catalog holds store keys: only its owner may read it");
}

/// The objects under `prefix/` in the test bucket, sorted.
async fn objects(s3: &S3Server, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let listed: Vec<_> = s3.store().list(Some(&StorePath::from(prefix))).try_collect().await.unwrap();
    let mut names: Vec<String> = listed.into_iter().map(|m| m.location.to_string()).collect();
    names.sort();
    names
}

/// Waits (at most 30 s: a write's sweeps start at once) until the objects under `prefix/` are
/// exactly `expected`.
async fn wait_for_objects(s3: &S3Server, prefix: &str, expected: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = objects(s3, prefix).await;
        if found == expected {
            return;
        }
        assert!(Instant::now() < deadline, "objects under {prefix}/: {found:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// With `--warehouse s3://…`, CREATE TABLE AS and INSERT are written by the workers' Tasks
/// straight into the store, one object per Task, and committed by the catalog listing them. A
/// write that fails after some of its Tasks wrote their objects leaves no row and, once its
/// sweeps ran, no object; DROP and CREATE OR REPLACE remove the objects they retire; a
/// restarted coordinator reads the tables on. The keys come from the coordinator's environment
/// and show in no log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tables_written_to_an_s3_warehouse_commit_whole_and_failed_writes_leave_nothing() {
    let s3 = S3Server::start("127.0.0.1").await;
    // SAFETY: nextest runs each test in a process of its own; the processes it starts read them.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "quiver-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
    }
    let warehouse = format!("s3://{BUCKET}/warehouse");
    let endpoint = format!("aws.endpoint={}", s3.endpoint);
    let args = [
        "--warehouse", &warehouse, "--store-option", &endpoint, "--store-option", "aws.allow_http=true",
        "--store-option", "aws.region=us-east-1", "--task-min-bytes", "64KiB",
    ];
    // One slot per worker and no express slot (which takes small Queries' Tasks, as these are):
    // a write's Tasks run two at a time, in order, so the last one starts after others ended.
    let mut cluster = ProcCluster::start(2, &args, &["--slots", "1", "--express-slots", "0"]);
    let client = cluster.client().await;
    cluster.wait_alive(&client, 2).await;
    let local = tpch::generate(cluster.dir.path(), 0.01, Layout { files: 2, row_group_rows: 2_000 }).unwrap();
    collect(&client, &format!("CREATE EXTERNAL TABLE lineitem STORED AS PARQUET LOCATION '{}/lineitem/'", local.display())).await;

    assert_eq!(collect(&client, "CREATE TABLE li AS SELECT * FROM lineitem").await[0][0], "60175");
    let summary = "SELECT count(*), sum(l_quantity), min(l_comment), max(l_shipdate), count(DISTINCT l_orderkey) FROM";
    let expected = collect(&client, &format!("{summary} lineitem")).await;
    assert_eq!(collect(&client, &format!("{summary} li")).await, expected);
    let written = objects(&s3, "warehouse/li").await;
    assert!(written.len() >= 2, "one object per write Task: {written:?}");
    let inserted = collect(&client, "INSERT INTO li SELECT * FROM lineitem WHERE l_orderkey <= 1000").await[0][0].clone();
    let lines: u64 = inserted.parse().unwrap();
    assert!(lines > 0);
    assert_eq!(collect(&client, "SELECT count(*) FROM li").await[0][0], (60175 + lines).to_string());

    // The last Task of the write fails, after the others wrote and committed their Attempts.
    collect(&client, "CREATE TABLE keys AS SELECT l_orderkey AS k, l_comment AS c FROM lineitem").await;
    let committed = objects(&s3, "warehouse/keys").await;
    let max = collect(&client, "SELECT max(l_orderkey) FROM lineitem").await[0][0].clone();
    let failing = format!(
        "INSERT INTO keys SELECT CAST(CASE WHEN l_orderkey = {max} THEN 'x' ELSE CAST(l_orderkey AS VARCHAR) END AS BIGINT), l_comment FROM lineitem"
    );
    assert!(error_of(&client, &failing).await.contains("Cannot cast string 'x'"));
    let wrote = "SELECT count(*) FROM quiver.tasks t JOIN quiver.queries q ON t.query_id = q.query_id \
                 WHERE q.sql LIKE 'INSERT INTO keys%' AND t.state = 'succeeded' AND t.rows > 0";
    assert_ne!(collect(&client, wrote).await[0][0], "0", "no Task of the failed write wrote its object first");
    wait_for_objects(&s3, "warehouse/keys", &committed).await;
    assert_eq!(collect(&client, "SELECT count(*) FROM keys").await[0][0], "60175");

    cluster.kill_coordinator();
    cluster.start_coordinator();
    let client = cluster.client().await;
    cluster.wait_alive(&client, 2).await;
    assert_eq!(collect(&client, "SELECT count(*) FROM li").await[0][0], (60175 + lines).to_string(), "after a restart");

    collect(&client, "DROP TABLE li").await;
    wait_for_objects(&s3, "warehouse/li", &[]).await;
    assert_eq!(collect(&client, "CREATE OR REPLACE TABLE keys AS SELECT 1 AS k").await[0][0], "1");
    let replaced = objects(&s3, "warehouse/keys").await;
    assert!(replaced.len() == 1 && !committed.contains(&replaced[0]), "{replaced:?}");
    assert_eq!(collect(&client, "SELECT k FROM keys").await, vec![vec!["1".to_string()]]);
    for entry in std::fs::read_dir(cluster.dir.path()).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            assert!(!std::fs::read_to_string(entry.path()).unwrap().contains(SECRET), "{} holds the secret", entry.path().display());
        }
    }
}
