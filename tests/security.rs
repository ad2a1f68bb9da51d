//! A closed cluster on real loopback ports: a coordinator whose data directory holds users,
//! workers that prove the cluster secret on every call. Strangers, readers, other users and
//! clients posing as workers are refused with a clear error; nothing they ask for happens.

mod common;

use common::{http_request_with, many_tasks_config, rows, TestCluster};
use datafusion::common::DataFusionError;
use prost::Message;
use quiver::auth::{basic_header, AllowedPaths, ClusterKey, Credentials, Role, UserStore};
use quiver::client::Client;
use quiver::cluster::{LocalCluster, LocalOptions};
use quiver::config::{CoordinatorConfig, WorkerConfig};
use quiver::protocol::{action, classify, error_text, ErrorKind, Empty, OutputTicket, RegisterWorker, RegisterWorkerResponse, ReleaseQuery, TaskKey};
use quiver::transport::{call, connect, fetch_batches, ClientSecurity};

const ADMIN: (&str, &str) = ("ada", "admin password");
const READER: (&str, &str) = ("rex", "reader password");

struct Closed {
    cluster: LocalCluster,
    store: UserStore,
    admin: Client,
    reader: Client,
    dir: tempfile::TempDir,
}

async fn closed_cluster() -> Closed {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = UserStore::open(&data).unwrap();
    store.add_user(ADMIN.0, Role::Admin, ADMIN.1).unwrap();
    store.add_user(READER.0, Role::Reader, READER.1).unwrap();
    let opts = LocalOptions {
        workers: 2,
        worker: WorkerConfig { slots: 2, memory_limit_bytes: 1 << 30, ..WorkerConfig::default() },
        coordinator: many_tasks_config(),
        data_dir: data,
        listen: "127.0.0.1:0".parse().unwrap(),
        http: Some("127.0.0.1:0".parse().unwrap()),
    };
    let cluster = LocalCluster::start(opts).await.expect("cluster starts");
    let admin = Client::login(&cluster.url(), ADMIN.0, ADMIN.1, None).await.expect("the admin logs in");
    let reader = Client::login(&cluster.url(), READER.0, READER.1, None).await.expect("the reader logs in");
    Closed { cluster, store, admin, reader, dir }
}

/// The error `sql` fails with; panics if it succeeds.
async fn refused(client: &Client, sql: &str) -> String {
    match client.collect(sql).await {
        Ok(_) => panic!("{sql} should have been refused"),
        Err(e) => error_text(&e),
    }
}

/// The call was refused for who made it, not for anything else.
fn assert_denied<T>(result: Result<T, DataFusionError>, what: &str) {
    let Err(error) = result else { panic!("{what}: should have been refused") };
    assert_eq!(classify(&error).kind, ErrorKind::Denied, "{what}: {}", error_text(&error));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_are_refused_and_users_log_in_with_passwords_or_tokens() {
    let t = closed_cluster().await;
    let url = t.cluster.url();
    let stranger = Client::connect(&url).await.unwrap();
    let error = refused(&stranger, "SELECT 1").await;
    assert!(error.contains("authentication required"), "{error}");
    let wrong = Client::login(&url, ADMIN.0, "not the password", None).await;
    assert!(error_text(&wrong.expect_err("a wrong password is refused")).contains("wrong user name or password"));

    let (_, batches) = t.admin.collect("SELECT 40 + 2 AS answer").await.unwrap();
    assert_eq!(rows(&batches), vec![vec!["42".to_string()]]);

    let (token, info) = t.store.create_token(READER.0, None).unwrap();
    let with_token = Client::connect_with(&url, &ClientSecurity { credentials: Credentials::Bearer(token), tls_ca: None }).await.unwrap();
    with_token.collect("SELECT 1").await.expect("a valid token is accepted");
    t.store.revoke_token(&info.id).unwrap();
    let error = refused(&with_token, "SELECT 1").await;
    assert!(error.contains("revoked"), "{error}");
    let forged = Client::connect_with(&url, &ClientSecurity { credentials: Credentials::Bearer("qvt_forged".into()), tls_ca: None }).await;
    refused(&forged.unwrap(), "SELECT 1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_query_and_only_admins_change_the_catalog_or_the_session() {
    let t = closed_cluster().await;
    t.admin.collect("CREATE TABLE t AS SELECT value AS v FROM generate_series(1, 5000)").await.unwrap();
    // A distributed query: the workers take its Tasks and read each other's outputs as members.
    let (_, batches) = t.reader.collect("SELECT v % 7 AS k, count(*) FROM t GROUP BY k ORDER BY k").await.unwrap();
    assert_eq!(rows(&batches).len(), 7);
    t.reader.collect("EXPLAIN SELECT count(*) FROM t").await.expect("readers may EXPLAIN");
    let (_, batches) = t.reader.collect("SELECT slots, express_slots, express_running FROM quiver.workers").await.unwrap();
    assert_eq!(rows(&batches), vec![vec!["2", "1", "0"].iter().map(|s| s.to_string()).collect::<Vec<_>>(); 2], "express slots are shown");
    for sql in [
        "INSERT INTO t VALUES (1)",
        "CREATE TABLE u AS SELECT 1 AS x",
        "DROP TABLE t",
        "SET datafusion.execution.batch_size = 10",
        "EXPLAIN ANALYZE INSERT INTO t VALUES (2)",
        "COPY (SELECT 1) TO 'x.parquet'",
    ] {
        let error = refused(&t.reader, sql).await;
        assert!(error.contains("is a reader"), "{sql}: {error}");
    }
    let (_, batches) = t.admin.collect("SELECT count(*) FROM t").await.unwrap();
    assert_eq!(rows(&batches), vec![vec!["5000".to_string()]], "nothing a reader tried happened");
    let (_, batches) = t.admin.collect("SELECT DISTINCT \"user\" FROM quiver.queries WHERE sql LIKE 'SELECT v %' ").await.unwrap();
    assert_eq!(rows(&batches), vec![vec![READER.0.to_string()]], "quiver.queries says who ran what");
    // A reader sees their own Queries and their Tasks, never another user's SQL.
    let (_, batches) = t.reader.collect("SELECT DISTINCT \"user\" FROM quiver.queries").await.unwrap();
    assert_eq!(rows(&batches), vec![vec![READER.0.to_string()]]);
    let sql = "SELECT count(*) FROM quiver.tasks k JOIN quiver.queries q ON k.query_id = q.query_id WHERE q.\"user\" <> 'rex'";
    let (_, batches) = t.reader.collect(sql).await.unwrap();
    assert_eq!(rows(&batches), vec![vec!["0".to_string()]]);
    let (_, batches) = t.admin.collect("SELECT count(*) > 0 FROM quiver.tasks k JOIN quiver.queries q ON k.query_id = q.query_id WHERE q.\"user\" = 'rex'").await.unwrap();
    assert_eq!(rows(&batches), vec![vec!["true".to_string()]], "an admin sees every Query's Tasks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn table_files_stay_under_the_allowed_roots() {
    let t = closed_cluster().await;
    let outside = t.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let single = datafusion::prelude::SessionContext::new();
    let file = outside.join("secret.parquet");
    single.sql(&format!("COPY (SELECT 1 AS a) TO '{}'", file.display())).await.unwrap().collect().await.unwrap();
    let leaked = outside.join("leak.parquet");
    for sql in [
        format!("CREATE EXTERNAL TABLE e STORED AS PARQUET LOCATION '{}'", file.display()),
        "CREATE EXTERNAL TABLE etc STORED AS CSV LOCATION '/etc/'".to_string(),
        format!("COPY (SELECT 1 AS a) TO '{}'", leaked.display()),
        format!("COPY (SELECT 1 AS a) TO '{}/../outside/leak.parquet'", t.dir.path().join("data").display()),
    ] {
        let error = refused(&t.admin, &sql).await;
        assert!(error.contains("outside the directories tables may use"), "{sql}: {error}");
    }
    assert!(!leaked.exists(), "a refused COPY wrote nothing");
    // Reading a file by its path would open it while planning, before any check: where paths
    // are restricted, files are read through tables only.
    let error = refused(&t.reader, &format!("SELECT * FROM '{}'", file.display())).await;
    assert!(error.contains("not found"), "{error}");
    for sneaky in ["FILE:///etc/", "file:///%2e%2e/etc/"] {
        let error = refused(&t.admin, &format!("CREATE EXTERNAL TABLE s STORED AS CSV LOCATION '{sneaky}'")).await;
        assert!(error.contains("outside the directories tables may use"), "{sneaky}: {error}");
    }
    let inside = t.dir.path().join("data").join("exports").join("ok.parquet");
    t.admin.collect(&format!("COPY (SELECT 1 AS a) TO '{}'", inside.display())).await.expect("under the data directory");
    t.admin.collect(&format!("CREATE EXTERNAL TABLE ok STORED AS PARQUET LOCATION '{}'", inside.display())).await.unwrap();
    let (_, batches) = t.reader.collect("SELECT a FROM ok").await.unwrap();
    assert_eq!(rows(&batches), vec![vec!["1".to_string()]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_allowed_store_prefix_cannot_be_pointed_elsewhere_by_table_options() {
    // Regression: the location was checked, but `aws.endpoint` (and the like) in its OPTIONS
    // sent the allowed s3://ok/data to another bucket or host, signed with the coordinator's
    // credentials.
    let config = CoordinatorConfig { allowed_paths: AllowedPaths::under(&["s3://ok/data".into()]), ..many_tasks_config() };
    let t = TestCluster::start_configured(1, WorkerConfig::default(), config, None).await;
    for option in [
        "'aws.endpoint' 'https://elsewhere.s3.us-east-1.amazonaws.com'",
        "'aws.virtual_hosted_style_request' 'true'",
        "'aws.proxy_url' 'http://127.0.0.1:9'",
        "'aws.web_identity_token_file' '/etc/hostname'",
    ] {
        let sql = format!("CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION 's3://ok/data/' OPTIONS ('aws.region' 'us-east-1', {option})");
        assert_denied(t.client.collect(&sql).await, &sql);
    }
    let outside = "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION 's3://other/data/' OPTIONS ('aws.region' 'us-east-1')";
    assert_denied(t.client.collect(outside).await, outside);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_users_query_can_be_neither_read_nor_followed_nor_cancelled() {
    let t = closed_cluster().await;
    t.admin.collect("CREATE TABLE mine AS SELECT value AS v FROM generate_series(1, 100)").await.unwrap();
    let other = Client::login(&t.cluster.url(), ADMIN.0, ADMIN.1, None).await.unwrap();
    let statement = t.reader.start("SELECT sum(v) FROM mine").await.unwrap();
    assert!(t.admin.fetch(&statement).await.is_err(), "an admin may not read a reader's result");
    assert!(other.progress(&statement).await.is_ok(), "admins may follow every Query");
    let stream = t.reader.fetch(&statement).await.expect("its owner reads it");
    let batches: Vec<_> = futures::TryStreamExt::try_collect(stream).await.unwrap();
    assert_eq!(rows(&batches), vec![vec!["5050".to_string()]]);

    let mine = t.admin.start("SELECT count(*) FROM mine").await.unwrap();
    assert!(t.reader.progress(&mine).await.is_err(), "a reader may not follow another's Query");
    assert!(t.reader.cancel(&mine).await.is_err(), "nor cancel it");
    let stream = t.admin.fetch(&mine).await.expect("the Query was not cancelled");
    let batches: Vec<_> = futures::TryStreamExt::try_collect(stream).await.unwrap();
    assert_eq!(rows(&batches), vec![vec!["100".to_string()]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_cluster_members_reach_the_control_plane_and_the_workers() {
    let t = closed_cluster().await;
    let url = t.cluster.url();
    let (token, _) = t.store.create_token(ADMIN.0, None).unwrap();
    let register = RegisterWorker { address: "http://127.0.0.1:9".into(), slots: 1, memory_limit_bytes: 1 << 30, express_slots: 0, version: quiver::protocol::build_version() };
    let strangers = [
        ("nothing", Credentials::None),
        ("an admin's token", Credentials::Bearer(token.clone())),
        ("another cluster's secret", Credentials::Node { key: ClusterKey::random(), name: "w9".into() }),
    ];
    for (who, credentials) in &strangers {
        let peer = connect(&url, &ClientSecurity { credentials: credentials.clone(), tls_ca: None }).await.unwrap();
        assert_denied(call::<_, RegisterWorkerResponse>(&peer, action::REGISTER_WORKER, &register).await, who);
    }
    assert_eq!(t.cluster.coordinator.core.cluster.workers().len(), 2, "no stranger registered");

    let worker_url = t.cluster.workers[0].as_ref().unwrap().url().to_string();
    let ticket = OutputTicket { key: Some(TaskKey { query_id: "q".into(), stage: 0, task: 0, attempt: 0 }), partition: 0 };
    let release = ReleaseQuery { query_id: "q".into() };
    for (who, credentials) in &strangers {
        let peer = connect(&worker_url, &ClientSecurity { credentials: credentials.clone(), tls_ca: None }).await.unwrap();
        assert_denied(fetch_batches(&peer, ticket.encode_to_vec(), None).await.map(|_| ()), who);
        assert_denied(call::<_, Empty>(&peer, action::RELEASE_QUERY, &release).await, who);
    }
    let member = connect(&worker_url, &t.cluster.member_security("a-member")).await.unwrap();
    call::<_, Empty>(&member, action::RELEASE_QUERY, &release).await.expect("a member may release");

    // And a member is not a client: it runs no statement, not even one Quiver reads itself.
    let member = Client::connect_with(&url, &t.cluster.member_security("a-member")).await.unwrap();
    for sql in ["SELECT 1", "REFRESH TABLE anything"] {
        assert_denied(member.collect(sql).await, sql);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scalar_subquery_belongs_to_whoever_started_its_query() {
    // Regression: sub-Queries were recorded as "anonymous": their owner could not see them, and
    // a user of that name could have seen and cancelled them.
    let t = closed_cluster().await;
    let taken = t.store.add_user("anonymous", Role::Reader, "a password");
    assert!(taken.is_err(), "the name of unauthenticated callers is not a user's");
    t.admin.collect("CREATE TABLE nums AS SELECT value AS v FROM generate_series(1, 100)").await.unwrap();
    let (_, batches) = t.reader.collect("SELECT count(*) FROM nums WHERE v > (SELECT avg(v) FROM nums)").await.unwrap();
    assert_eq!(rows(&batches), vec![vec!["50".to_string()]]);
    let mine = "SELECT \"user\", state FROM quiver.queries WHERE query_id LIKE '%.sq0'";
    let (_, batches) = t.reader.collect(mine).await.unwrap();
    assert_eq!(rows(&batches), vec![vec![READER.0.to_string(), "succeeded".to_string()]], "the reader sees his sub-Query");
    let (_, batches) = t.admin.collect(mine).await.unwrap();
    assert_eq!(rows(&batches), vec![vec![READER.0.to_string(), "succeeded".to_string()]], "as his");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_port_asks_for_the_same_credentials() {
    let t = closed_cluster().await;
    let addr = t.cluster.http_addr().unwrap();
    for path in ["/api/queries", "/api/workers", "/metrics", "/"] {
        let response = http_request_with(addr, "GET", path, &[]).await;
        assert_eq!(response.status, 401, "{path}: {response:?}");
        assert!(response.head.to_lowercase().contains("www-authenticate: basic"), "{path}: browsers ask for a login: {response:?}");
    }
    let (token, _) = t.store.create_token(READER.0, Some(3_600_000)).unwrap();
    let bearer = format!("Bearer {token}");
    let response = http_request_with(addr, "GET", "/api/workers", &[("Authorization", &bearer)]).await;
    assert_eq!(response.status, 200, "{response:?}");
    let basic = basic_header(ADMIN.0, ADMIN.1);
    let response = http_request_with(addr, "GET", "/metrics", &[("Authorization", &basic)]).await;
    assert_eq!(response.status, 200, "{response:?}");
    let wrong = basic_header(ADMIN.0, "guess");
    let response = http_request_with(addr, "GET", "/api/queries", &[("Authorization", &wrong)]).await;
    assert_eq!(response.status, 401, "{response:?}");
    // Probes (Kubernetes, load balancers) carry no credentials, and learn nothing but "ok".
    for path in ["/healthz", "/readyz"] {
        let response = http_request_with(addr, "GET", path, &[]).await;
        assert_eq!((response.status, response.body.as_str()), (200, "ok\n"), "{path}: {response:?}");
    }
}
