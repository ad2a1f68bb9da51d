//! The coordinator's view of the cluster: registered Workers, the Task queue they pull from,
//! every Query with its Task Attempts, and the outcomes the final Stage waits on.
//!
//! One mutex guards it all: every operation is short and never awaits while holding it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use datafusion::common::{DataFusionError, Result};
use tokio::sync::{watch, Notify};

use crate::config::{QUERY_HISTORY_MAX, TASK_POLL_WAIT_MS, TASK_QUEUE_MAX, WORKER_TIMEOUT_MS};
use crate::protocol::{error_from_remote, RemoteError, TaskAssignment, TaskKey, TaskReport, TaskState};

/// What the final Stage learns about a Task: where its output is, or why there is none.
#[derive(Debug, Clone)]
pub enum TaskOutcome {
    Succeeded { key: TaskKey, worker_url: String },
    Failed(RemoteError),
}

#[derive(Debug, Clone)]
pub struct WorkerRecord {
    pub id: String,
    pub url: String,
    pub slots: u32,
    pub memory_limit_bytes: u64,
    pub memory_used_bytes: u64,
    pub alive: bool,
    pub last_heartbeat: SystemTime,
    pub running_tasks: u32,
    last_seen: Instant,
}

#[derive(Debug, Clone)]
pub struct QueryRecord {
    pub id: String,
    pub sql: String,
    pub state: &'static str,
    pub mode: &'static str,
    pub stages: u32,
    pub tasks: u32,
    pub workers_used: u32,
    pub rows: u64,
    pub started: SystemTime,
    pub duration_ms: u64,
    pub error: Option<String>,
    pub bytes_from_workers: u64,
}

#[derive(Debug, Clone)]
pub struct TaskRecord {
    pub key: TaskKey,
    pub worker_id: Option<String>,
    pub plan: String,
    pub state: TaskState,
    pub rows: u64,
    pub bytes: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
}

struct TaskEntry {
    record: TaskRecord,
    outcome: watch::Sender<Option<TaskOutcome>>,
    consumed: bool,
}

struct QueryEntry {
    record: QueryRecord,
    started: Instant,
    tasks: BTreeMap<(u32, u32), TaskEntry>,
}

struct QueuedTask {
    key: TaskKey,
    plan: Arc<Vec<u8>>,
}

/// A Task ready to be queued: its Stage and index, summary and encoded plan.
pub struct NewTask {
    pub stage: u32,
    pub task: u32,
    pub summary: String,
    pub plan: Vec<u8>,
}

#[derive(Default)]
struct Inner {
    workers: BTreeMap<String, WorkerRecord>,
    next_worker: u64,
    queue: VecDeque<QueuedTask>,
    queries: HashMap<String, QueryEntry>,
    finished: VecDeque<String>,
}

#[derive(Default)]
pub struct Cluster {
    inner: Mutex<Inner>,
    task_ready: Notify,
    worker_joined: Notify,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cluster")
    }
}

impl Cluster {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn register_worker(&self, url: String, slots: u32, memory_limit_bytes: u64) -> String {
        let mut inner = self.lock();
        inner.next_worker += 1;
        let id = format!("w{}", inner.next_worker);
        let record = WorkerRecord {
            id: id.clone(),
            url,
            slots: slots.max(1),
            memory_limit_bytes,
            memory_used_bytes: 0,
            alive: true,
            last_heartbeat: SystemTime::now(),
            running_tasks: 0,
            last_seen: Instant::now(),
        };
        tracing::info!(worker = %id, url = %record.url, slots, "worker registered");
        inner.workers.insert(id.clone(), record);
        drop(inner);
        self.worker_joined.notify_waiters();
        id
    }

    /// Records a heartbeat; false when the worker is unknown or was declared lost.
    pub fn heartbeat(&self, worker_id: &str, memory_used_bytes: u64) -> bool {
        let mut inner = self.lock();
        match inner.workers.get_mut(worker_id) {
            Some(w) if w.alive => {
                w.last_seen = Instant::now();
                w.last_heartbeat = SystemTime::now();
                w.memory_used_bytes = memory_used_bytes;
                true
            }
            _ => false,
        }
    }

    pub fn total_slots(&self) -> usize {
        self.lock().workers.values().filter(|w| w.alive).map(|w| w.slots as usize).sum()
    }

    /// Waits up to `wait` for at least one live worker; returns the total slots then.
    pub async fn wait_for_slots(&self, wait: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let joined = self.worker_joined.notified();
            let slots = self.total_slots();
            if slots > 0 || tokio::time::timeout_at(deadline, joined).await.is_err() {
                return self.total_slots();
            }
        }
    }

    pub fn begin_query(&self, id: &str, sql: &str) {
        let record = QueryRecord {
            id: id.to_string(),
            sql: sql.to_string(),
            state: "running",
            mode: "coordinator",
            stages: 0,
            tasks: 0,
            workers_used: 0,
            rows: 0,
            started: SystemTime::now(),
            duration_ms: 0,
            error: None,
            bytes_from_workers: 0,
        };
        let entry = QueryEntry { record, started: Instant::now(), tasks: BTreeMap::new() };
        self.lock().queries.insert(id.to_string(), entry);
    }

    /// Queues a distributed Query's Tasks (attempt 0 of each).
    pub fn submit(&self, query_id: &str, stages: u32, tasks: Vec<NewTask>) -> Result<()> {
        let mut inner = self.lock();
        if inner.queue.len() + tasks.len() > TASK_QUEUE_MAX {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "task queue full: {} queued, {} more would exceed {TASK_QUEUE_MAX}",
                inner.queue.len(),
                tasks.len()
            )));
        }
        let Inner { queries, queue, .. } = &mut *inner;
        let Some(query) = queries.get_mut(query_id) else {
            return Err(DataFusionError::Internal(format!("unknown query {query_id}")));
        };
        query.record.mode = "distributed";
        query.record.stages = stages;
        query.record.tasks = tasks.len() as u32;
        for t in tasks {
            let key = TaskKey { query_id: query_id.to_string(), stage: t.stage, task: t.task, attempt: 0 };
            let record = TaskRecord {
                key: key.clone(),
                worker_id: None,
                plan: t.summary,
                state: TaskState::Queued,
                rows: 0,
                bytes: 0,
                elapsed_ms: 0,
                error: None,
            };
            let entry = TaskEntry { record, outcome: watch::channel(None).0, consumed: false };
            query.tasks.insert((t.stage, t.task), entry);
            queue.push_back(QueuedTask { key, plan: Arc::new(t.plan) });
        }
        drop(inner);
        self.task_ready.notify_waiters();
        Ok(())
    }

    /// A worker's long poll: the next queued Task, waiting up to [`TASK_POLL_WAIT_MS`].
    /// `Err(())` means the worker is unknown and must register again.
    pub async fn poll(&self, worker_id: &str) -> std::result::Result<Option<TaskAssignment>, ()> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(TASK_POLL_WAIT_MS);
        loop {
            let ready = self.task_ready.notified();
            if let Some(found) = self.try_assign(worker_id)? {
                return Ok(Some(found));
            }
            if tokio::time::timeout_at(deadline, ready).await.is_err() {
                return Ok(None);
            }
        }
    }

    fn try_assign(&self, worker_id: &str) -> std::result::Result<Option<TaskAssignment>, ()> {
        let mut inner = self.lock();
        match inner.workers.get(worker_id) {
            Some(w) if w.alive => {}
            _ => return Err(()),
        }
        while let Some(queued) = inner.queue.pop_front() {
            let slot = (queued.key.stage, queued.key.task);
            let Some(task) = inner.queries.get_mut(&queued.key.query_id).and_then(|q| q.tasks.get_mut(&slot)) else {
                continue; // the Query ended while the Task waited
            };
            if task.record.state != TaskState::Queued {
                continue;
            }
            task.record.state = TaskState::Running;
            task.record.worker_id = Some(worker_id.to_string());
            if let Some(w) = inner.workers.get_mut(worker_id) {
                w.running_tasks += 1;
            }
            tracing::debug!(task = %queued.key, worker = worker_id, "task assigned");
            let plan = Arc::try_unwrap(queued.plan).unwrap_or_else(|shared| (*shared).clone());
            return Ok(Some(TaskAssignment { key: Some(queued.key), plan }));
        }
        Ok(None)
    }

    /// Applies a worker's report on one Attempt.
    pub fn report(&self, report: TaskReport) {
        let Some(key) = report.key else { return };
        let state = TaskState::try_from(report.state).unwrap_or(TaskState::Failed);
        let mut inner = self.lock();
        let Inner { queries, workers, .. } = &mut *inner;
        let Some(task) = queries.get_mut(&key.query_id).and_then(|q| q.tasks.get_mut(&(key.stage, key.task))) else {
            return; // a report for a Query that already ended
        };
        if task.record.state.is_final() || task.record.key.attempt != key.attempt {
            return;
        }
        tracing::debug!(task = %key, state = state.as_str(), elapsed_ms = report.elapsed_ms, "task reported");
        task.record.state = state;
        task.record.rows = report.rows;
        task.record.bytes = report.bytes;
        task.record.elapsed_ms = report.elapsed_ms;
        if state.is_final() {
            if let Some(w) = workers.get_mut(&report.worker_id) {
                w.running_tasks = w.running_tasks.saturating_sub(1);
            }
        }
        let worker_url = workers.get(&report.worker_id).map(|w| w.url.clone()).unwrap_or_default();
        let outcome = match state {
            TaskState::Succeeded => Some(TaskOutcome::Succeeded { key, worker_url }),
            TaskState::Failed | TaskState::Cancelled => {
                let error = report.error.unwrap_or(RemoteError {
                    kind: "execution".into(),
                    message: format!("task {key} {} without an error", state.as_str()),
                });
                task.record.error = Some(error.message.clone());
                Some(TaskOutcome::Failed(error))
            }
            _ => None,
        };
        if let Some(outcome) = outcome {
            task.outcome.send_replace(Some(outcome));
        }
    }

    /// Waits for the outcome of a Task of a running Query.
    pub fn subscribe(&self, query_id: &str, stage: u32, task: u32) -> Result<watch::Receiver<Option<TaskOutcome>>> {
        let inner = self.lock();
        inner
            .queries
            .get(query_id)
            .and_then(|q| q.tasks.get(&(stage, task)))
            .map(|t| t.outcome.subscribe())
            .ok_or_else(|| DataFusionError::Internal(format!("no task {stage}/{task} in query {query_id}")))
    }

    /// The final Stage has read all of a Task's output: losing its worker no longer matters.
    pub fn mark_consumed(&self, query_id: &str, stage: u32, task: u32, bytes: u64) {
        let mut inner = self.lock();
        if let Some(query) = inner.queries.get_mut(query_id) {
            query.record.bytes_from_workers += bytes;
            if let Some(t) = query.tasks.get_mut(&(stage, task)) {
                t.consumed = true;
            }
        }
    }

    /// Ends a Query: drops its queued Tasks, cancels the unfinished ones and returns the URLs of
    /// the workers that ran any of its Tasks (they hold outputs to free).
    pub fn finish_query(&self, id: &str, rows: u64, error: Option<&DataFusionError>, cancelled: bool) -> Vec<String> {
        let mut inner = self.lock();
        let Inner { queries, workers, finished, queue, .. } = &mut *inner;
        let Some(query) = queries.get_mut(id) else { return vec![] };
        if query.record.state != "running" {
            return vec![];
        }
        queue.retain(|t| t.key.query_id != id);
        let mut used = std::collections::BTreeSet::new();
        for task in query.tasks.values_mut() {
            if let Some(worker) = &task.record.worker_id {
                used.insert(worker.clone());
            }
            if !task.record.state.is_final() {
                if task.record.state == TaskState::Running {
                    if let Some(w) = task.record.worker_id.as_ref().and_then(|id| workers.get_mut(id)) {
                        w.running_tasks = w.running_tasks.saturating_sub(1);
                    }
                }
                task.record.state = TaskState::Cancelled;
            }
        }
        let record = &mut query.record;
        record.rows = rows;
        record.duration_ms = query.started.elapsed().as_millis() as u64;
        record.workers_used = used.len() as u32;
        record.state = match (error, cancelled) {
            (Some(_), _) => "failed",
            (None, true) => "cancelled",
            (None, false) => "succeeded",
        };
        record.error = error.map(|e| e.to_string());
        finished.push_back(id.to_string());
        while finished.len() > QUERY_HISTORY_MAX {
            if let Some(old) = finished.pop_front() {
                queries.remove(&old);
            }
        }
        used.iter().filter_map(|w| workers.get(w)).map(|w| w.url.clone()).collect()
    }

    /// Declares silent workers lost and fails the Tasks whose outputs died with them.
    pub fn detect_lost_workers(&self) {
        let mut inner = self.lock();
        let Inner { workers, queries, .. } = &mut *inner;
        let timeout = Duration::from_millis(WORKER_TIMEOUT_MS);
        let mut lost_any = false;
        for worker in workers.values_mut().filter(|w| w.alive && w.last_seen.elapsed() > timeout) {
            worker.alive = false;
            worker.running_tasks = 0;
            tracing::warn!(worker = %worker.id, url = %worker.url, "worker lost: no heartbeat for {WORKER_TIMEOUT_MS} ms");
            lost_any = true;
            let message = format!(
                "worker {} at {} was lost (no heartbeat for {WORKER_TIMEOUT_MS} ms)",
                worker.id, worker.url
            );
            for query in queries.values_mut().filter(|q| q.record.state == "running") {
                for task in query.tasks.values_mut() {
                    let on_worker = task.record.worker_id.as_deref() == Some(worker.id.as_str());
                    let needed = task.record.state == TaskState::Running
                        || (task.record.state == TaskState::Succeeded && !task.consumed);
                    if on_worker && needed {
                        task.record.state = TaskState::Failed;
                        task.record.error = Some(message.clone());
                        let error = RemoteError { kind: "execution".into(), message: format!("task {}: {message}", task.record.key) };
                        task.outcome.send_replace(Some(TaskOutcome::Failed(error)));
                    }
                }
            }
        }
        drop(inner);
        if lost_any {
            self.fail_queued_without_workers();
        }
    }

    /// With no live worker left, queued Tasks would wait forever: fail their Queries instead.
    pub fn fail_queued_without_workers(&self) {
        let mut inner = self.lock();
        if inner.workers.values().any(|w| w.alive) {
            return;
        }
        let Inner { queries, .. } = &mut *inner;
        for query in queries.values_mut().filter(|q| q.record.state == "running") {
            for task in query.tasks.values_mut().filter(|t| t.record.state == TaskState::Queued) {
                let message = "no live workers: every worker was lost or none registered".to_string();
                task.record.state = TaskState::Failed;
                task.record.error = Some(message.clone());
                task.outcome.send_replace(Some(TaskOutcome::Failed(RemoteError { kind: "execution".into(), message })));
            }
        }
    }

    pub fn workers(&self) -> Vec<WorkerRecord> {
        self.lock().workers.values().cloned().collect()
    }

    pub fn queries(&self) -> Vec<QueryRecord> {
        let inner = self.lock();
        let mut records: Vec<_> = inner.queries.values().map(|q| {
            let mut r = q.record.clone();
            if r.state == "running" {
                r.duration_ms = q.started.elapsed().as_millis() as u64;
            }
            r
        }).collect();
        records.sort_by_key(|r| r.started);
        records
    }

    pub fn tasks(&self) -> Vec<TaskRecord> {
        let inner = self.lock();
        let mut records: Vec<_> = inner.queries.values().flat_map(|q| q.tasks.values().map(|t| t.record.clone())).collect();
        records.sort_by(|a, b| a.key.cmp(&b.key));
        records
    }

    pub fn query(&self, id: &str) -> Option<QueryRecord> {
        self.lock().queries.get(id).map(|q| q.record.clone())
    }
}

/// The error a Task outcome stands for.
pub fn outcome_error(error: RemoteError) -> DataFusionError {
    error_from_remote(error)
}
