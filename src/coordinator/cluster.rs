//! The coordinator's view of the cluster: registered Workers, the Task queue they pull from,
//! every Query with its Task Attempts, and the outcomes the final Stage waits on.
//!
//! One mutex guards it all: every operation is short and never awaits while holding it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use datafusion::common::{DataFusionError, Result};
use tokio::sync::{watch, Notify};

use super::metrics::Metrics;
use crate::config::{ASSIGNMENT_ACK_TIMEOUT_MS, QUERY_HISTORY_MAX, TASK_POLL_WAIT_MS, TASK_QUEUE_MAX, WORKER_TIMEOUT_MS};
use crate::protocol::{
    error_from_remote, error_to_remote, OutputLocation, QueryProgress, RemoteError, TaskAssignment, TaskKey, TaskReport, TaskState,
};

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
    /// Tasks whose Attempt succeeded.
    pub tasks_done: u32,
    pub workers_used: u32,
    pub rows: u64,
    pub started: SystemTime,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// Bytes of Task outputs that went through shuffles (worker to worker).
    pub bytes_shuffled: u64,
    /// Bytes of Task outputs read whole: broadcasts and the final Stage's gathers.
    pub bytes_gathered: u64,
}

#[derive(Debug, Clone)]
pub struct TaskRecord {
    pub key: TaskKey,
    pub worker_id: Option<String>,
    pub plan: String,
    /// How the Task's output is read: "shuffle" or "gather".
    pub output: &'static str,
    pub state: TaskState,
    pub rows: u64,
    pub bytes: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
    /// When the coordinator assigned the Attempt to its worker.
    pub started: Option<SystemTime>,
    /// When the Attempt ended: its final report, its Query's failure or end, or its worker's loss.
    pub ended: Option<SystemTime>,
}

struct TaskEntry {
    record: TaskRecord,
    outcome: watch::Sender<Option<TaskOutcome>>,
    consumed: bool,
    /// Output parts the final Stage has read whole.
    parts_read: u32,
    /// The worker that holds the output, once the Task succeeded.
    output_url: Option<String>,
    started: Option<Instant>,
    finished: Option<Instant>,
}

struct StageEntry {
    inputs: Vec<u32>,
    shuffle: bool,
    /// Parts each Task's output has: the shuffle's partitions, or 1.
    parts: u32,
    /// Tasks held back until every input Stage has finished.
    waiting: Vec<QueuedTask>,
    /// Tasks that have not succeeded yet.
    unfinished: usize,
}

struct QueryEntry {
    record: QueryRecord,
    started: Instant,
    tasks: BTreeMap<(u32, u32), TaskEntry>,
    stages: Vec<StageEntry>,
}

struct QueuedTask {
    key: TaskKey,
    plan: Arc<Vec<u8>>,
    partition: u32,
    inputs: Arc<Vec<OutputLocation>>,
}

/// A Task to be queued: its Stage and index, the partition it computes, summary and plan.
pub struct NewTask {
    pub stage: u32,
    pub task: u32,
    pub partition: u32,
    pub summary: String,
    pub plan: Vec<u8>,
}

/// A Stage to be run: the Stages it reads (they run first) and its Tasks.
pub struct NewStage {
    pub inputs: Vec<u32>,
    pub shuffle: bool,
    /// Parts each Task's output has: the shuffle's partitions, or 1.
    pub parts: u32,
    pub tasks: Vec<NewTask>,
}

/// What one Stage of a Query did, for EXPLAIN ANALYZE.
#[derive(Debug, Clone)]
pub struct StageMetrics {
    pub stage: u32,
    /// The Stages whose outputs it reads.
    pub inputs: Vec<u32>,
    /// How its output is read: "shuffle" or "gather".
    pub output: &'static str,
    pub tasks: usize,
    pub rows: u64,
    pub bytes: u64,
    /// From the first Task's start to the last Task's end.
    pub elapsed_ms: u64,
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
    metrics: Metrics,
}

/// One Query as a whole: its record, its Stages and every Task's latest Attempt.
#[derive(Debug, Clone)]
pub struct QueryDetail {
    pub query: QueryRecord,
    pub stages: Vec<StageMetrics>,
    pub tasks: Vec<TaskRecord>,
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

    /// Records a heartbeat; false when the worker is unknown or was declared lost. `held` are the
    /// Attempts the worker knows of: one assigned to it long ago that it does not know was lost
    /// on the way (or its report was), and fails its Query instead of leaving it waiting.
    pub fn heartbeat(&self, worker_id: &str, memory_used_bytes: u64, held: &[TaskKey]) -> bool {
        let mut inner = self.lock();
        match inner.workers.get_mut(worker_id) {
            Some(w) if w.alive => {
                w.last_seen = Instant::now();
                w.last_heartbeat = SystemTime::now();
                w.memory_used_bytes = memory_used_bytes;
            }
            _ => return false,
        }
        let Inner { queries, workers, .. } = &mut *inner;
        let timeout = Duration::from_millis(ASSIGNMENT_ACK_TIMEOUT_MS);
        let mut lost = Vec::new();
        for query in queries.values_mut().filter(|q| q.record.state == "running") {
            for task in query.tasks.values_mut() {
                let unknown = task.record.state == TaskState::Running
                    && task.record.worker_id.as_deref() == Some(worker_id)
                    && task.started.is_some_and(|s| s.elapsed() > timeout)
                    && !held.contains(&task.record.key);
                if unknown {
                    let message = format!(
                        "task {} was assigned to worker {worker_id}, which does not know it after \
                         {ASSIGNMENT_ACK_TIMEOUT_MS} ms: its assignment or its report was lost",
                        task.record.key
                    );
                    let error = RemoteError { kind: "execution".into(), message: message.clone() };
                    task.end(TaskState::Failed, &self.metrics);
                    task.record.error = Some(message);
                    task.outcome.send_replace(Some(TaskOutcome::Failed(error.clone())));
                    if let Some(w) = workers.get_mut(worker_id) {
                        w.running_tasks = w.running_tasks.saturating_sub(1);
                    }
                    lost.push((query.record.id.clone(), error));
                }
            }
        }
        for (query_id, error) in lost {
            if let Some(query) = queries.get_mut(&query_id) {
                tracing::warn!(query = %query_id, "{}", error.message);
                query.fail(&error, workers, &self.metrics);
            }
        }
        true
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
            tasks_done: 0,
            workers_used: 0,
            rows: 0,
            started: SystemTime::now(),
            duration_ms: 0,
            error: None,
            bytes_shuffled: 0,
            bytes_gathered: 0,
        };
        let entry = QueryEntry { record, started: Instant::now(), tasks: BTreeMap::new(), stages: Vec::new() };
        self.lock().queries.insert(id.to_string(), entry);
        self.metrics.query_started();
    }

    /// Takes a distributed Query's Stages (inputs first) and queues the Tasks of those whose
    /// inputs are ready (attempt 0 of each); the others wait for their inputs to finish.
    pub fn submit(&self, query_id: &str, stages: Vec<NewStage>) -> Result<()> {
        let task_count: usize = stages.iter().map(|s| s.tasks.len()).sum();
        let mut inner = self.lock();
        if inner.queue.len() + task_count > TASK_QUEUE_MAX {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "task queue full: {} queued, {task_count} more would exceed {TASK_QUEUE_MAX}",
                inner.queue.len(),
            )));
        }
        let Inner { queries, queue, .. } = &mut *inner;
        let Some(query) = queries.get_mut(query_id) else {
            return Err(DataFusionError::Internal(format!("unknown query {query_id}")));
        };
        if query.record.state != "running" {
            // Cancelled while it was being planned: its Tasks must never be queued.
            return Err(DataFusionError::Execution(format!("query {query_id} {} before its Tasks were queued", query.record.state)));
        }
        query.record.mode = "distributed";
        query.record.stages = stages.len() as u32;
        query.record.tasks = task_count as u32;
        for stage in stages {
            let mut waiting = Vec::with_capacity(stage.tasks.len());
            for t in stage.tasks {
                let key = TaskKey { query_id: query_id.to_string(), stage: t.stage, task: t.task, attempt: 0 };
                let record = TaskRecord {
                    key: key.clone(),
                    worker_id: None,
                    plan: t.summary,
                    output: if stage.shuffle { "shuffle" } else { "gather" },
                    state: TaskState::Queued,
                    rows: 0,
                    bytes: 0,
                    elapsed_ms: 0,
                    error: None,
                    started: None,
                    ended: None,
                };
                let entry = TaskEntry {
                    record,
                    outcome: watch::channel(None).0,
                    consumed: false,
                    parts_read: 0,
                    output_url: None,
                    started: None,
                    finished: None,
                };
                query.tasks.insert((t.stage, t.task), entry);
                waiting.push(QueuedTask { key, plan: Arc::new(t.plan), partition: t.partition, inputs: Arc::default() });
            }
            let unfinished = waiting.len();
            query.stages.push(StageEntry { inputs: stage.inputs, shuffle: stage.shuffle, parts: stage.parts, waiting, unfinished });
        }
        query.queue_ready_stages(queue);
        drop(inner);
        self.task_ready.notify_waiters();
        // The last worker may have been lost since the Query was planned.
        self.fail_queued_without_workers();
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
            task.started = Some(Instant::now());
            task.record.started = Some(SystemTime::now());
            if let Some(w) = inner.workers.get_mut(worker_id) {
                w.running_tasks += 1;
            }
            tracing::debug!(task = %queued.key, worker = worker_id, "task assigned");
            let plan = Arc::try_unwrap(queued.plan).unwrap_or_else(|shared| (*shared).clone());
            let inputs = (*queued.inputs).clone();
            return Ok(Some(TaskAssignment { key: Some(queued.key), plan, partition: queued.partition, inputs }));
        }
        Ok(None)
    }

    /// Applies a worker's report on one Attempt.
    pub fn report(&self, report: TaskReport) {
        let Some(key) = report.key else { return };
        let state = TaskState::try_from(report.state).unwrap_or(TaskState::Failed);
        let mut inner = self.lock();
        let Inner { queries, workers, queue, .. } = &mut *inner;
        let Some(query) = queries.get_mut(&key.query_id) else {
            return; // a report for a Query that already ended
        };
        let Some(task) = query.tasks.get_mut(&(key.stage, key.task)) else { return };
        if task.record.state.is_final() || task.record.key.attempt != key.attempt {
            return;
        }
        tracing::debug!(task = %key, state = state.as_str(), elapsed_ms = report.elapsed_ms, "task reported");
        task.record.rows = report.rows;
        task.record.bytes = report.bytes;
        task.record.elapsed_ms = report.elapsed_ms;
        if !state.is_final() {
            task.record.state = state;
            return;
        }
        task.end(state, &self.metrics);
        task.finished = Some(Instant::now());
        if let Some(w) = workers.get_mut(&report.worker_id) {
            w.running_tasks = w.running_tasks.saturating_sub(1);
        }
        if state == TaskState::Succeeded {
            let worker_url = workers.get(&report.worker_id).map(|w| w.url.clone()).unwrap_or_default();
            task.output_url = Some(worker_url.clone());
            self.metrics.attempt_output(report.rows, report.bytes, task.record.output == "shuffle");
            task.outcome.send_replace(Some(TaskOutcome::Succeeded { key: key.clone(), worker_url }));
            query.task_succeeded(key.stage, report.bytes, queue);
            drop(inner);
            self.task_ready.notify_waiters();
            return;
        }
        let error = report.error.unwrap_or(RemoteError {
            kind: "execution".into(),
            message: format!("task {key} {} without an error", state.as_str()),
        });
        task.record.error = Some(error.message.clone());
        task.outcome.send_replace(Some(TaskOutcome::Failed(error.clone())));
        query.fail(&error, workers, &self.metrics);
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

    /// The final Stage has read one part of a Task's output whole. Once it has read every part,
    /// losing the Task's worker no longer matters.
    pub fn mark_part_read(&self, query_id: &str, stage: u32, task: u32) {
        let mut inner = self.lock();
        let Some(query) = inner.queries.get_mut(query_id) else { return };
        let parts = query.stages.get(stage as usize).map_or(1, |s| s.parts);
        if let Some(t) = query.tasks.get_mut(&(stage, task)) {
            t.parts_read += 1;
            t.consumed |= t.parts_read >= parts;
        }
    }

    /// Ends a Query: drops its queued Tasks, cancels the unfinished ones and returns the URLs of
    /// the workers that ran any of its Tasks (they hold outputs to free); None when the Query had
    /// already ended, so that only one caller acts on its end.
    pub fn finish_query(&self, id: &str, rows: u64, error: Option<&DataFusionError>, cancelled: bool) -> Option<Vec<String>> {
        let mut inner = self.lock();
        let Inner { queries, workers, finished, queue, .. } = &mut *inner;
        let query = queries.get_mut(id)?;
        if query.record.state != "running" {
            return None;
        }
        queue.retain(|t| t.key.query_id != id);
        // Whoever still waits on a Task (a reader of a Query cancelled from outside its stream)
        // learns that the Query ended instead of waiting forever.
        let ended = error_to_remote(&DataFusionError::Execution(format!("query {id} ended before this task finished")));
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
                task.end(TaskState::Cancelled, &self.metrics);
                task.outcome.send_replace(Some(TaskOutcome::Failed(ended.clone())));
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
        self.metrics.query_ended(record.state);
        finished.push_back(id.to_string());
        while finished.len() > QUERY_HISTORY_MAX {
            if let Some(old) = finished.pop_front() {
                queries.remove(&old);
            }
        }
        Some(used.iter().filter_map(|w| workers.get(w)).map(|w| w.url.clone()).collect())
    }

    /// Declares silent workers lost and fails the Tasks whose outputs died with them.
    pub fn detect_lost_workers(&self) {
        let mut inner = self.lock();
        let Inner { workers, queries, .. } = &mut *inner;
        let timeout = Duration::from_millis(WORKER_TIMEOUT_MS);
        let mut lost_any = false;
        let mut lost = Vec::new();
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
                        task.end(TaskState::Failed, &self.metrics);
                        task.record.error = Some(message.clone());
                        let error = RemoteError { kind: "execution".into(), message: format!("task {}: {message}", task.record.key) };
                        task.outcome.send_replace(Some(TaskOutcome::Failed(error.clone())));
                        lost.push((query.record.id.clone(), error));
                    }
                }
            }
        }
        for (query_id, error) in lost {
            if let Some(query) = queries.get_mut(&query_id) {
                query.fail(&error, workers, &self.metrics);
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
        let Inner { queries, workers, .. } = &mut *inner;
        let message = "no live workers: every worker was lost or none registered".to_string();
        let error = RemoteError { kind: "execution".into(), message };
        for query in queries.values_mut().filter(|q| q.record.state == "running") {
            if query.tasks.values().any(|t| !t.record.state.is_final()) {
                query.fail(&error, workers, &self.metrics);
            }
        }
    }

    pub fn workers(&self) -> Vec<WorkerRecord> {
        self.lock().workers.values().cloned().collect()
    }

    pub fn queries(&self) -> Vec<QueryRecord> {
        let inner = self.lock();
        let mut records: Vec<_> = inner.queries.values().map(QueryEntry::snapshot).collect();
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

    /// How far a Query has got, in Tasks; None for a Query this coordinator does not know.
    pub fn progress(&self, query_id: &str) -> Option<QueryProgress> {
        let inner = self.lock();
        let query = inner.queries.get(query_id)?;
        let states = || query.tasks.values().map(|t| t.record.state);
        Some(QueryProgress {
            state: query.record.state.to_string(),
            tasks_total: query.record.tasks,
            tasks_done: states().filter(|s| s.is_final()).count() as u32,
            tasks_running: states().filter(|s| *s == TaskState::Running).count() as u32,
        })
    }

    /// Rows, bytes and time of each Stage of a Query, from its Tasks' reports.
    pub fn stage_metrics(&self, query_id: &str) -> Vec<StageMetrics> {
        self.lock().queries.get(query_id).map(QueryEntry::stage_metrics).unwrap_or_default()
    }

    /// A Query with its Stages and Tasks, taken at one instant.
    pub fn query_detail(&self, id: &str) -> Option<QueryDetail> {
        let inner = self.lock();
        let query = inner.queries.get(id)?;
        let tasks = query.tasks.values().map(|t| t.record.clone()).collect();
        Some(QueryDetail { query: query.snapshot(), stages: query.stage_metrics(), tasks })
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode(&self.workers())
    }
}

impl TaskEntry {
    /// Sets the Attempt's state; the first final state is its end, timed and counted.
    fn end(&mut self, state: TaskState, metrics: &Metrics) {
        let ending = !self.record.state.is_final() && state.is_final();
        self.record.state = state;
        if !ending {
            return;
        }
        self.record.ended = Some(SystemTime::now());
        if let Some(started) = self.started {
            metrics.attempt_ended(state.as_str(), started.elapsed());
        }
    }
}

impl QueryEntry {
    /// The record, with the duration so far while the Query runs.
    fn snapshot(&self) -> QueryRecord {
        let mut record = self.record.clone();
        if record.state == "running" {
            record.duration_ms = self.started.elapsed().as_millis() as u64;
        }
        record
    }

    /// Rows, bytes and time of each Stage, from its Tasks' reports.
    fn stage_metrics(&self) -> Vec<StageMetrics> {
        self.stages.iter().enumerate().map(|(index, entry)| {
            let stage = index as u32;
            let tasks: Vec<&TaskEntry> = self.tasks.range((stage, 0)..(stage + 1, 0)).map(|(_, t)| t).collect();
            let first = tasks.iter().filter_map(|t| t.started).min();
            let last = tasks.iter().filter_map(|t| t.finished).max();
            let elapsed_ms = match (first, last) {
                (Some(a), Some(b)) => b.saturating_duration_since(a).as_millis() as u64,
                _ => 0,
            };
            StageMetrics {
                stage,
                inputs: entry.inputs.clone(),
                output: if entry.shuffle { "shuffle" } else { "gather" },
                tasks: tasks.len(),
                rows: tasks.iter().map(|t| t.record.rows).sum(),
                bytes: tasks.iter().map(|t| t.record.bytes).sum(),
                elapsed_ms,
            }
        })
        .collect()
    }

    /// Queues the waiting Tasks of every Stage whose inputs have all finished, telling each
    /// where its inputs' outputs are.
    fn queue_ready_stages(&mut self, queue: &mut VecDeque<QueuedTask>) {
        for index in 0..self.stages.len() {
            let stage = &self.stages[index];
            if stage.waiting.is_empty() || stage.inputs.iter().any(|&i| self.stages[i as usize].unfinished > 0) {
                continue;
            }
            let locations: Vec<OutputLocation> = stage
                .inputs
                .iter()
                .flat_map(|&input| self.tasks.range((input, 0)..(input + 1, 0)))
                .map(|(_, t)| OutputLocation { key: Some(t.record.key.clone()), worker_url: t.output_url.clone().unwrap_or_default() })
                .collect();
            let locations = Arc::new(locations);
            for mut task in std::mem::take(&mut self.stages[index].waiting) {
                task.inputs = Arc::clone(&locations);
                queue.push_back(task);
            }
        }
    }

    /// Counts a Task's success; when its Stage is complete, its inputs are consumed and the
    /// Stages that read it may start.
    fn task_succeeded(&mut self, stage: u32, bytes: u64, queue: &mut VecDeque<QueuedTask>) {
        let Some(entry) = self.stages.get_mut(stage as usize) else { return };
        if entry.shuffle {
            self.record.bytes_shuffled += bytes;
        } else {
            self.record.bytes_gathered += bytes;
        }
        entry.unfinished = entry.unfinished.saturating_sub(1);
        self.record.tasks_done += 1;
        if entry.unfinished > 0 {
            return;
        }
        for input in entry.inputs.clone() {
            for (_, task) in self.tasks.range_mut((input, 0)..(input + 1, 0)) {
                task.consumed = true;
            }
        }
        self.queue_ready_stages(queue);
    }

    /// One Task failed, so the Query fails: every Task that has not ended is cancelled, and
    /// whoever waits on one learns the error that ended the Query.
    fn fail(&mut self, error: &RemoteError, workers: &mut BTreeMap<String, WorkerRecord>, metrics: &Metrics) {
        for stage in &mut self.stages {
            stage.waiting.clear();
        }
        for task in self.tasks.values_mut().filter(|t| !t.record.state.is_final()) {
            if task.record.state == TaskState::Running {
                if let Some(w) = task.record.worker_id.as_ref().and_then(|id| workers.get_mut(id)) {
                    w.running_tasks = w.running_tasks.saturating_sub(1);
                }
            }
            task.end(TaskState::Cancelled, metrics);
            task.outcome.send_replace(Some(TaskOutcome::Failed(error.clone())));
        }
    }
}

/// The error a Task outcome stands for.
pub fn outcome_error(error: RemoteError) -> DataFusionError {
    error_from_remote(error)
}
