//! The JSON API and `/metrics`: the cluster's records as JSON documents. Times are milliseconds
//! since the Unix epoch on the coordinator's clock, and every answer carries that clock's `now_ms`,
//! so that a client computes ages and running durations without trusting its own clock.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::config::WEB_RECENT_QUERIES_DEFAULT;
use crate::coordinator::{Cluster, QueryDetail, QueryRecord, StageMetrics, TaskRecord, WorkerRecord, METRICS_CONTENT_TYPE};

/// An error answer: its status and `{"error": message}`.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

#[derive(Serialize)]
pub struct WorkerJson {
    id: String,
    url: String,
    slots: u32,
    /// Tasks running on it: the slots in use.
    running_tasks: u32,
    memory_used_bytes: u64,
    memory_limit_bytes: u64,
    alive: bool,
    last_heartbeat_ms: u64,
    heartbeat_age_ms: u64,
    /// Slots for small Queries' Tasks only, and those of them in use.
    express_slots: u32,
    express_running: u32,
    /// Other workers it could not connect to at their advertised addresses.
    unreachable_peers: Vec<String>,
    /// How slow it runs Tasks (1 typical, 4 four times slower), and the share of its busy time
    /// its process was held off the CPU lately, in percent.
    pace: f64,
    stalled_pct: f64,
}

#[derive(Serialize)]
pub struct WorkersJson {
    now_ms: u64,
    workers: Vec<WorkerJson>,
}

#[derive(Serialize)]
pub struct QueryJson {
    id: String,
    sql: String,
    user: String,
    state: &'static str,
    mode: &'static str,
    stages: u32,
    tasks: u32,
    tasks_done: u32,
    workers_used: u32,
    rows: u64,
    started_ms: u64,
    duration_ms: u64,
    error: Option<String>,
    bytes_shuffled: u64,
    bytes_gathered: u64,
    attempts_retried: u32,
    tasks_recomputed: u32,
    attempts_speculated: u32,
    speculation_wins: u32,
}

#[derive(Serialize)]
pub struct QueriesJson {
    now_ms: u64,
    queries: Vec<QueryJson>,
}

#[derive(Serialize)]
pub struct StageJson {
    id: u32,
    /// The Stages whose outputs this one reads.
    inputs: Vec<u32>,
    output: &'static str,
    tasks: usize,
    tasks_done: usize,
    rows: u64,
    bytes: u64,
    elapsed_ms: u64,
    /// A shuffle's output per partition (empty for a gather).
    partition_rows: Vec<u64>,
    partition_bytes: Vec<u64>,
    /// Adaptive scheduling: partitions coalesced into a neighbour's Task, skewed partitions
    /// split, speculative Attempts.
    partitions_coalesced: u32,
    partitions_split: u32,
    attempts_speculated: u32,
    /// Scan slices cut into pieces at dispatch (dynamic granularity).
    slices_cut: u32,
}

#[derive(Serialize)]
pub struct TaskJson {
    stage: u32,
    task: u32,
    attempt: u32,
    worker_id: Option<String>,
    state: &'static str,
    rows: u64,
    bytes: u64,
    elapsed_ms: u64,
    started_ms: Option<u64>,
    ended_ms: Option<u64>,
    error: Option<String>,
    plan: String,
    /// "first", "retry" or "recompute".
    started_as: &'static str,
    /// Why the Attempt ended without success, or why its output is no longer read.
    cause: Option<&'static str>,
    /// What it read when its Stage's shuffle reads were adapted (coalesced or split).
    reads: Option<String>,
    /// The kind of slot it ran in: "regular" or "express".
    lane: Option<&'static str>,
    /// Rows its join key filter saw and kept; null when its Stage has none.
    key_filter_rows_seen: Option<u64>,
    key_filter_rows_kept: Option<u64>,
    /// Its work in units of a typical Task of its Stage: above 1 for a Task reading more than
    /// its Stage's median bytes, below 1 for a piece of a cut scan slice.
    work: f64,
}

/// A query's record (as `/api/queries` lists it) with its Stage DAG and its Tasks.
#[derive(Serialize)]
pub struct QueryDetailJson {
    now_ms: u64,
    query: QueryJson,
    stages: Vec<StageJson>,
    tasks: Vec<TaskJson>,
}

#[derive(Deserialize)]
pub struct ListParams {
    /// How many finished queries to list, newest first.
    limit: Option<usize>,
}

/// `/healthz`: the process serves HTTP.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// `/readyz`: the coordinator takes statements (its catalog is restored and its Flight SQL port
/// bound before the web server starts). Workers are not required: a Query waits for them.
pub async fn readyz() -> &'static str {
    "ok\n"
}

pub async fn workers(State(cluster): State<Arc<Cluster>>) -> Json<WorkersJson> {
    let now = SystemTime::now();
    let workers = cluster.workers().iter().map(|w| worker_json(w, now)).collect();
    Json(WorkersJson { now_ms: epoch_ms(now), workers })
}

/// Running queries, then up to `limit` finished ones; each group newest first.
/// Readers see their own Queries; admins see all.
pub async fn queries(
    State(cluster): State<Arc<Cluster>>,
    Extension(caller): Extension<Caller>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<QueriesJson>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = params.limit.unwrap_or(WEB_RECENT_QUERIES_DEFAULT);
    let mut all = cluster.queries();
    all.retain(|q| caller.sees_all_queries() || caller.owns(&q.user));
    all.reverse();
    let (running, finished): (Vec<_>, Vec<_>) = all.into_iter().partition(|q| q.state == "running");
    let queries = running.iter().chain(finished.iter().take(limit)).map(query_json).collect();
    Ok(Json(QueriesJson { now_ms: epoch_ms(SystemTime::now()), queries }))
}

pub async fn query(
    State(cluster): State<Arc<Cluster>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<QueryDetailJson>, ApiError> {
    let detail = cluster.query_detail(&id).filter(|d| caller.sees_all_queries() || caller.owns(&d.query.user));
    let detail = detail.ok_or_else(|| ApiError::not_found(format!("no query '{id}'")))?;
    Ok(Json(detail_json(&detail)))
}

pub async fn metrics(State(cluster): State<Arc<Cluster>>) -> Response {
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], cluster.metrics_text()).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such page or API endpoint")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here")
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn worker_json(w: &WorkerRecord, now: SystemTime) -> WorkerJson {
    WorkerJson {
        id: w.id.clone(),
        url: w.url.clone(),
        slots: w.slots,
        running_tasks: w.running_tasks,
        memory_used_bytes: w.memory_used_bytes,
        memory_limit_bytes: w.memory_limit_bytes,
        alive: w.alive,
        last_heartbeat_ms: epoch_ms(w.last_heartbeat),
        heartbeat_age_ms: now.duration_since(w.last_heartbeat).map_or(0, |d| d.as_millis() as u64),
        express_slots: w.express_slots,
        express_running: w.express_assigned,
        unreachable_peers: w.unreachable_peers.clone(),
        pace: w.pace_now(),
        stalled_pct: w.stalled_pct(),
    }
}

fn query_json(q: &QueryRecord) -> QueryJson {
    QueryJson {
        id: q.id.clone(),
        sql: q.sql.clone(),
        user: q.user.clone(),
        state: q.state,
        mode: q.mode,
        stages: q.stages,
        tasks: q.tasks,
        tasks_done: q.tasks_done,
        workers_used: q.workers_used,
        rows: q.rows,
        started_ms: epoch_ms(q.started),
        duration_ms: q.duration_ms,
        error: q.error.clone(),
        bytes_shuffled: q.bytes_shuffled,
        bytes_gathered: q.bytes_gathered,
        attempts_retried: q.attempts_retried,
        tasks_recomputed: q.tasks_recomputed,
        attempts_speculated: q.attempts_speculated,
        speculation_wins: q.speculation_wins,
    }
}

fn detail_json(detail: &QueryDetail) -> QueryDetailJson {
    QueryDetailJson {
        now_ms: epoch_ms(SystemTime::now()),
        query: query_json(&detail.query),
        stages: detail.stages.iter().map(stage_json).collect(),
        tasks: detail.tasks.iter().map(task_json).collect(),
    }
}

fn stage_json(s: &StageMetrics) -> StageJson {
    StageJson {
        id: s.stage,
        inputs: s.inputs.clone(),
        output: s.output,
        tasks: s.tasks,
        tasks_done: s.tasks_done,
        rows: s.rows,
        bytes: s.bytes,
        elapsed_ms: s.elapsed_ms,
        partition_rows: s.partition_rows.clone(),
        partition_bytes: s.partition_bytes.clone(),
        partitions_coalesced: s.coalesced,
        partitions_split: s.split,
        attempts_speculated: s.speculated,
        slices_cut: s.slices_cut,
    }
}

fn task_json(t: &TaskRecord) -> TaskJson {
    TaskJson {
        stage: t.key.stage,
        task: t.key.task,
        attempt: t.key.attempt,
        worker_id: t.worker_id.clone(),
        state: t.state.as_str(),
        rows: t.rows,
        bytes: t.bytes,
        elapsed_ms: t.elapsed_ms,
        started_ms: t.started.map(epoch_ms),
        ended_ms: t.ended.map(epoch_ms),
        error: t.error.clone(),
        plan: t.plan.clone(),
        started_as: t.started_as.as_str(),
        cause: t.cause.map(|c| c.as_str()),
        reads: t.reads.clone(),
        lane: t.lane,
        key_filter_rows_seen: t.key_filter_rows.map(|(seen, _)| seen),
        key_filter_rows_kept: t.key_filter_rows.map(|(_, kept)| kept),
        work: t.work,
    }
}
