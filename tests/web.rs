//! The coordinator's HTTP server on a real loopback port: the JSON API's documents after real
//! queries, its errors, Prometheus `/metrics`, and the web UI as headless Chromium renders it.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use quiver::config::WorkerConfig;
use serde_json::Value;

/// Generous bound for anything the tests poll for.
const POLL_DEADLINE: Duration = Duration::from_secs(60);

async fn http_cluster(workers: usize, slots: usize) -> (TestCluster, SocketAddr) {
    let t = TestCluster::start_with_http(workers, WorkerConfig { slots, memory_limit_bytes: 1 << 30, ..WorkerConfig::default() }).await;
    let addr = t.cluster.http_addr().expect("the cluster serves HTTP");
    (t, addr)
}

/// The listed query whose SQL is `sql` (the newest, if several).
async fn listed_query(addr: SocketAddr, sql: &str) -> Option<Value> {
    let (status, json) = get_json(addr, "/api/queries").await;
    assert_eq!(status, 200, "{json}");
    json["queries"].as_array().unwrap().iter().find(|q| q["sql"] == sql).cloned()
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("'{key}' is not a non-negative integer in {v}"))
}

fn assert_worker_shape(w: &Value) {
    for key in ["id", "url"] {
        assert!(w[key].is_string(), "worker '{key}' in {w}");
    }
    assert_eq!(u64_of(w, "slots"), 2, "{w}");
    assert_eq!(u64_of(w, "memory_limit_bytes"), 1 << 30, "{w}");
    assert!(u64_of(w, "running_tasks") <= 2, "{w}");
    assert_eq!(u64_of(w, "express_slots"), 1, "{w}");
    assert!(u64_of(w, "express_running") <= 1, "{w}");
    u64_of(w, "memory_used_bytes");
    u64_of(w, "heartbeat_age_ms");
    assert!(u64_of(w, "last_heartbeat_ms") > 0, "{w}");
    assert_eq!(w["alive"], true, "{w}");
    assert!(w["pace"].as_f64().is_some_and(|p| p > 0.0), "pace in {w}");
    assert!(w["stalled_pct"].as_f64().is_some_and(|p| (0.0..=100.0).contains(&p)), "stalled_pct in {w}");
}

fn assert_query_shape(q: &Value) {
    for key in ["id", "sql", "state", "mode"] {
        assert!(q[key].is_string(), "query '{key}' in {q}");
    }
    for key in ["stages", "tasks", "tasks_done", "workers_used", "rows", "started_ms", "duration_ms", "bytes_shuffled", "bytes_gathered"] {
        u64_of(q, key);
    }
    assert!(q["error"].is_null() || q["error"].is_string(), "{q}");
}

/// Stages reference earlier Stages only, and their Task counts add up to the query's.
fn assert_stage_dag(detail: &Value) {
    let stages = detail["stages"].as_array().unwrap();
    assert!(stages.len() >= 2, "a GROUP BY should have a shuffle Stage and the Stage reading it: {detail}");
    for (i, s) in stages.iter().enumerate() {
        assert_eq!(u64_of(s, "id"), i as u64, "{s}");
        assert!(["shuffle", "gather"].contains(&s["output"].as_str().unwrap()), "{s}");
        assert!(s["inputs"].as_array().unwrap().iter().all(|input| input.as_u64().unwrap() < i as u64), "{s}");
        assert_eq!(u64_of(s, "tasks"), u64_of(s, "tasks_done"), "every Task succeeded: {s}");
        for key in ["rows", "bytes", "elapsed_ms"] {
            u64_of(s, key);
        }
    }
    assert!(stages.iter().any(|s| s["output"] == "shuffle"), "{detail}");
    assert!(stages.iter().any(|s| !s["inputs"].as_array().unwrap().is_empty()), "{detail}");
    let tasks: u64 = stages.iter().map(|s| u64_of(s, "tasks")).sum();
    assert_eq!(tasks, u64_of(&detail["query"], "tasks"), "{detail}");
}

/// Every Task succeeded on a known worker, between the query's start and end.
fn assert_tasks(detail: &Value, worker_ids: &[&str]) {
    let tasks = detail["tasks"].as_array().unwrap();
    let query = &detail["query"];
    assert_eq!(tasks.len() as u64, u64_of(query, "tasks"), "{detail}");
    // started_ms and duration_ms are each cut to whole milliseconds, so the query's end as
    // their sum may be up to 2 ms early (seen: a task ending 1 ms "after" its query).
    const ROUNDING_MS: u64 = 2;
    let (start, end) = (u64_of(query, "started_ms"), u64_of(query, "started_ms") + u64_of(query, "duration_ms") + ROUNDING_MS);
    for t in tasks {
        assert_eq!(t["state"], "succeeded", "{t}");
        assert!(worker_ids.contains(&t["worker_id"].as_str().unwrap()), "{t}");
        assert!(!t["plan"].as_str().unwrap().is_empty(), "{t}");
        assert!(t["error"].is_null(), "{t}");
        let (started, ended) = (u64_of(t, "started_ms"), u64_of(t, "ended_ms"));
        assert!(start <= started && started <= ended && ended <= end, "task times {started}..{ended} outside the query's {start}..{end}: {t}");
        for key in ["stage", "task", "attempt", "rows", "bytes", "elapsed_ms"] {
            u64_of(t, key);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_json_api_describes_workers_queries_stages_and_tasks() {
    let (t, addr) = http_cluster(2, 2).await;
    // Without speculation, every listed Attempt is its Task's one succeeded Attempt.
    t.run_all(&["CREATE TABLE api_t AS SELECT value AS v, value % 7 AS k FROM generate_series(1, 5000)", "SET quiver.speculation = false"]).await;
    let sql = "SELECT k, count(*), sum(v) FROM api_t GROUP BY k";
    assert_eq!(t.cluster_rows(sql).await.len(), 7);

    let (status, workers) = get_json(addr, "/api/workers").await;
    assert_eq!(status, 200);
    let workers = workers["workers"].as_array().unwrap().clone();
    assert_eq!(workers.len(), 2, "{workers:?}");
    workers.iter().for_each(assert_worker_shape);
    let worker_ids: Vec<&str> = workers.iter().map(|w| w["id"].as_str().unwrap()).collect();

    let listed = listed_query(addr, sql).await.expect("the query is listed");
    assert_query_shape(&listed);
    assert_eq!((listed["state"].as_str(), listed["mode"].as_str(), u64_of(&listed, "rows")), (Some("succeeded"), Some("distributed"), 7));
    assert!(u64_of(&listed, "bytes_shuffled") > 0, "{listed}");

    let id = listed["id"].as_str().unwrap();
    let (status, detail) = get_json(addr, &format!("/api/queries/{id}")).await;
    assert_eq!(status, 200, "{detail}");
    assert_query_shape(&detail["query"]);
    assert_eq!(detail["query"]["id"], id);
    assert_eq!(u64_of(&detail["query"], "tasks"), u64_of(&detail["query"], "tasks_done"), "{detail}");
    assert_stage_dag(&detail);
    assert_tasks(&detail, &worker_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_errors_are_json_with_their_status() {
    let (_t, addr) = http_cluster(1, 2).await;
    let (status, json) = get_json(addr, "/api/queries/q-nosuchquery").await;
    assert_eq!(status, 404);
    assert!(json["error"].as_str().unwrap().contains("q-nosuchquery"), "{json}");
    let (status, json) = get_json(addr, "/api/nothing-here").await;
    assert_eq!((status, json["error"].is_string()), (404, true), "{json}");
    let (status, json) = get_json(addr, "/api/queries?limit=many").await;
    assert_eq!((status, json["error"].is_string()), (400, true), "{json}");
    let (status, json) = get_json(addr, "/assets/nothing.js").await;
    assert_eq!((status, json["error"].is_string()), (404, true), "{json}");
    let post = http_request(addr, "POST", "/api/workers").await;
    assert_eq!(post.status, 405, "{post:?}");
    assert!(serde_json::from_str::<Value>(&post.body).unwrap()["error"].is_string(), "{post:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ui_and_its_assets_are_served_from_the_binary() {
    let (_t, addr) = http_cluster(1, 2).await;
    let page = http_request(addr, "GET", "/").await;
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"), "{page:?}");
    assert!(page.body.contains("/assets/app.js") && page.body.contains("/assets/style.css"), "{}", page.body);
    for (path, kind) in [("/assets/app.js", "text/javascript"), ("/assets/style.css", "text/css")] {
        let asset = http_request(addr, "GET", path).await;
        assert_eq!(asset.status, 200, "{path}");
        assert!(asset.content_type.starts_with(kind), "{path}: {}", asset.content_type);
        assert!(!asset.body.is_empty(), "{path}");
    }
}

async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let response = http_request(addr, "GET", "/metrics").await;
    assert_eq!(response.status, 200);
    assert!(response.content_type.starts_with("application/openmetrics-text"), "{}", response.content_type);
    assert!(response.body.trim_end().ends_with("# EOF"), "{}", response.body);
    parse_metrics(&response.body)
}

fn sample(metrics: &HashMap<String, f64>, name: &str) -> f64 {
    metrics.get(name).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_queries_attempts_rows_and_bytes_and_gauge_the_workers() {
    let (t, addr) = http_cluster(2, 2).await;
    t.run_all(&["CREATE TABLE m_t AS SELECT value AS v, value % 5 AS k FROM generate_series(1, 5000)"]).await;
    let before = scrape(addr).await;
    let sql = "SELECT k, count(*) FROM m_t GROUP BY k";
    assert_eq!(t.cluster_rows(sql).await.len(), 5);
    let err = t.client.collect("SELECT sum(v / k) FROM m_t").await.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("divide by zero"), "{err}");
    let after = scrape(addr).await;

    let delta = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(delta(r#"quiver_queries_total{state="succeeded"}"#), 1.0);
    assert_eq!(delta(r#"quiver_queries_total{state="failed"}"#), 1.0);
    assert_eq!(sample(&after, "quiver_queries_running"), 0.0);
    let succeeded = listed_query(addr, sql).await.expect("listed");
    assert!(delta(r#"quiver_task_attempts_total{state="succeeded"}"#) >= u64_of(&succeeded, "tasks") as f64);
    assert!(delta(r#"quiver_task_attempts_total{state="failed"}"#) >= 1.0);
    let attempts: f64 = ["succeeded", "failed", "cancelled"].iter().map(|s| delta(&format!("quiver_task_attempts_total{{state=\"{s}\"}}"))).sum();
    assert_eq!(delta("quiver_task_duration_seconds_count"), attempts, "one duration per ended Attempt");
    assert!(delta("quiver_rows_processed_total") > 0.0 && delta("quiver_bytes_processed_total") > 0.0);
    assert!(delta("quiver_bytes_shuffled_total") >= u64_of(&succeeded, "bytes_shuffled") as f64);
    let totals = before.keys().filter(|k| k.contains("_total"));
    totals.for_each(|k| assert!(after[k] >= before[k], "counter {k} went down"));

    assert_eq!(sample(&after, "quiver_workers"), 2.0);
    for worker in ["w1", "w2"] {
        assert_eq!(sample(&after, &format!("quiver_worker_slots{{worker=\"{worker}\"}}")), 2.0, "{after:?}");
        assert_eq!(sample(&after, &format!("quiver_worker_memory_limit_bytes{{worker=\"{worker}\"}}")), (1u64 << 30) as f64);
        assert!(after.contains_key(&format!("quiver_worker_slots_in_use{{worker=\"{worker}\"}}")), "{after:?}");
        assert!(after.contains_key(&format!("quiver_worker_memory_used_bytes{{worker=\"{worker}\"}}")), "{after:?}");
    }
}

/// The states a timeline bar may show: an Attempt on a worker has started.
const STARTED_STATES: [&str; 4] = ["running", "succeeded", "failed", "cancelled"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ui_renders_workers_queries_the_stage_dag_and_a_task_timeline_in_chromium() {
    // One slot per worker: the scan Tasks queue for the slots, each worker's timeline is one lane,
    // and the cross join keeps the query running until the test cancels it.
    let (t, addr) = http_cluster(2, 1).await;
    // Without speculation, the Tasks the page lists are the ones the API listed a moment before.
    t.run_all(&["CREATE TABLE ui_t AS SELECT value AS v FROM generate_series(1, 100000)", "SET quiver.speculation = false"]).await;
    let sql = "SELECT count(*) FROM ui_t a CROSS JOIN ui_t b WHERE (a.v * 7 + b.v) % 1000003 = 1";
    let client = t.client.clone();
    let running = tokio::spawn(async move { client.collect(sql).await });
    let query = wait_for("the query to start a Task", POLL_DEADLINE, || async move {
        let q = listed_query(addr, sql).await?;
        let (_, detail) = get_json(addr, &format!("/api/queries/{}", q["id"].as_str()?)).await;
        detail["tasks"].as_array()?.iter().any(|t| t["started_ms"].is_u64()).then_some(detail)
    })
    .await;
    let id = query["query"]["id"].as_str().unwrap().to_string();

    let overview = tokio::task::spawn_blocking(move || rendered_dom(&format!("http://{addr}/"), 3_000)).await.unwrap();
    let workers: Vec<&str> = opening_tags(&overview, "tr").into_iter().filter_map(|tag| attribute(tag, "data-worker-id")).collect();
    assert_eq!(workers, ["w1", "w2"], "worker rows in:\n{overview}");
    assert!(overview.contains(">Pace</th>") && overview.contains("×</td>"), "each worker's pace in:\n{overview}");
    let listed = opening_tags(&overview, "tr").into_iter().find(|tag| attribute(tag, "data-query-id") == Some(id.as_str()));
    assert!(listed.is_some(), "query {id} is not listed in:\n{overview}");
    assert!(overview.contains(r#"id="cluster-summary""#), "{overview}");

    let url = format!("http://{addr}/#/queries/{id}");
    let page = tokio::task::spawn_blocking(move || rendered_dom(&url, 3_000)).await.unwrap();
    running.abort();
    let stage_ids: Vec<&str> = opening_tags(&page, "g").into_iter().filter_map(|tag| attribute(tag, "data-stage-id")).collect();
    let expected: Vec<String> = (0..query["stages"].as_array().unwrap().len()).map(|i| i.to_string()).chain(["final".to_string()]).collect();
    assert_eq!(stage_ids, expected, "DAG nodes in:\n{page}");
    assert!(opening_tags(&page, "path").iter().any(|tag| tag.contains(r#"class="edge"#)), "no DAG edge in:\n{page}");
    let bars: Vec<&str> = opening_tags(&page, "rect").into_iter().filter(|tag| tag.contains(r#"class="bar "#)).collect();
    assert!(!bars.is_empty(), "no timeline bar in:\n{page}");
    for bar in &bars {
        assert!(STARTED_STATES.contains(&attribute(bar, "data-task-state").unwrap_or("")), "{bar}");
        assert!(["w1", "w2"].contains(&attribute(bar, "data-worker-id").unwrap_or("")), "{bar}");
        assert_eq!(attribute(bar, "data-lane"), Some("0"), "one slot per worker, so one lane each: {bar}");
    }
    let task_rows = opening_tags(&page, "tr").into_iter().filter(|tag| attribute(tag, "data-task-state").is_some()).count();
    assert_eq!(task_rows, query["tasks"].as_array().unwrap().len(), "one table row per Task in:\n{page}");

    let ended = wait_for("the aborted query to end", POLL_DEADLINE, || async move {
        listed_query(addr, sql).await.filter(|q| q["state"] != "running")
    })
    .await;
    assert!(["cancelled", "succeeded"].contains(&ended["state"].as_str().unwrap()), "{ended}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiver_coordinator_with_http_prints_its_url_and_serves_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(quiver_binary())
        .args(["coordinator", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("quiver starts");
    let mut coordinator = KillOnDrop(child);
    let url = stderr_line_after(&mut coordinator.0, "web UI at ");
    let addr: SocketAddr = url.trim_start_matches("http://").trim_end_matches('/').parse().unwrap_or_else(|e| panic!("{url}: {e}"));
    let (status, json) = get_json(addr, "/api/workers").await;
    assert_eq!((status, json["workers"].as_array().map(Vec::len)), (200, Some(0)), "{json}");
    assert_eq!(http_request(addr, "GET", "/metrics").await.status, 200);
}

/// A worker dies under a running query: the API lists the failed Attempt with its cause and
/// the one that replaced it, and the timeline in Chromium draws the retried Attempt apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_timeline_shows_attempts_retried_after_a_worker_was_lost() {
    let (mut t, addr) = http_cluster(3, 1).await;
    // Without speculation: a speculative Attempt already running elsewhere would take over
    // the lost one's Task instead of a retry.
    t.run_all(&["CREATE TABLE retry_t AS SELECT value AS v FROM generate_series(1, 100000)", "SET quiver.speculation = false"]).await;
    let sql = "SELECT count(*) FROM retry_t a CROSS JOIN retry_t b WHERE (a.v * 7 + b.v) % 1000003 = 1";
    let client = t.client.clone();
    let running = tokio::spawn(async move { client.collect(sql).await });
    let (id, worker) = wait_for("an Attempt to run", POLL_DEADLINE, || async move {
        let q = listed_query(addr, sql).await?;
        let id = q["id"].as_str()?.to_string();
        let (_, detail) = get_json(addr, &format!("/api/queries/{id}")).await;
        let task = detail["tasks"].as_array()?.iter().find(|t| t["state"] == "running")?.clone();
        Some((id, task["worker_id"].as_str()?.to_string()))
    })
    .await;
    let index = t.cluster.workers.iter().position(|w| w.as_ref().and_then(|w| w.id()).as_deref() == Some(worker.as_str())).unwrap();
    t.cluster.kill_worker(index);
    let detail = wait_for("a retried Attempt to run", POLL_DEADLINE, || {
        let id = id.clone();
        async move {
            let (_, detail) = get_json(addr, &format!("/api/queries/{id}")).await;
            let tasks = detail["tasks"].as_array()?;
            tasks.iter().any(|t| t["started_as"] == "retry" && t["state"] == "running").then_some(detail)
        }
    })
    .await;
    let lost: Vec<&Value> = detail["tasks"].as_array().unwrap().iter().filter(|t| t["cause"] == "worker_lost").collect();
    assert!(!lost.is_empty() && lost.iter().all(|t| t["worker_id"] == worker.as_str() && t["state"] == "failed"), "{detail}");
    assert!(u64_of(&detail["query"], "attempts_retried") >= 1, "{detail}");

    let url = format!("http://{addr}/#/queries/{id}");
    let page = tokio::task::spawn_blocking(move || rendered_dom(&url, 3_000)).await.unwrap();
    running.abort();
    let bars: Vec<&str> = opening_tags(&page, "rect").into_iter().filter(|tag| tag.contains(r#"class="bar "#)).collect();
    let retried = bars.iter().filter(|bar| attribute(bar, "data-started-as") == Some("retry")).count();
    assert!(retried >= 1, "no retried Attempt drawn in:\n{page}");
    assert!(bars.iter().any(|bar| attribute(bar, "data-cause") == Some("worker_lost")), "no lost Attempt drawn in:\n{page}");
}
