//! The coordinator's view of the cluster: the worker [`Registry`], the queue of Attempts workers
//! pull from, and every Query with its [`QueryRun`]. Events from the network (a report, a
//! heartbeat, a lost worker, an unreadable output) go to the Query's state machine; the actions
//! it answers with are carried out here: queue an Attempt, stop one on its worker, tell the
//! final Stage what to read, fail the Query. History and metrics are fed by the same actions.
//!
//! One mutex guards it all: every operation is short and never awaits while holding it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use datafusion::common::{DataFusionError, Result};
use tokio::sync::{watch, Notify};

use super::attempts::{Action, QueryRun, QueuedAttempt, Report, TaskId};
use super::layout;
use super::policy::{self, Adaptive};
use super::metrics::Metrics;
use super::registry::Registry;
pub use super::attempts::{NewStage, NewTask, StageMetrics, StageReads, TaskOutcome, TaskRecord};
pub use super::registry::{Beat, WorkerRecord};
use crate::config::{
    ASSIGNMENT_ACK_TIMEOUT_MS, EXPRESS_QUERY_TASKS_MAX, HEARTBEAT_OVERDUE_MS, POLL_TASKS_MAX, QUERY_HISTORY_MAX, TASK_POLL_WAIT_MS, TASK_QUEUE_MAX, WORKER_TIMEOUT_MS,
};
use crate::protocol::{
    error_text, remote_to_quiver, ErrorKind, QueryProgress, QuiverError, StageKeyFilter, StoreConfig, TaskAssignment, TaskKey, TaskReport,
    TaskState,
};
use crate::transport::{release_attempt, send_key_filter, ClientSecurity};

/// Slices one poll may cut before it takes an Attempt: each cut absorbs a queued slice, so the
/// bound only keeps one poll's work under the lock short.
const SLICE_CUTS_PER_POLL_MAX: u32 = 4;

/// The coordinator's answer to a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct BeatReply {
    /// The addresses of the worker's live peers.
    pub peers: Vec<String>,
    /// The Queries the worker said it holds that have ended: it frees them.
    pub ended_queries: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct QueryRecord {
    pub id: String,
    pub sql: String,
    /// The user who started it (`anonymous` on an open coordinator).
    pub user: String,
    pub state: &'static str,
    pub mode: &'static str,
    pub stages: u32,
    pub tasks: u32,
    /// Tasks with a succeeded Attempt.
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
    /// Attempts started again after a failure, a lost worker or a lost input.
    pub attempts_retried: u32,
    /// Tasks run again because the output of a succeeded Attempt was lost.
    pub tasks_recomputed: u32,
    /// Speculative Attempts started beside stragglers, and how many of them won their Task.
    pub attempts_speculated: u32,
    pub speculation_wins: u32,
    /// Shuffle partitions read by a neighbour's Task, and skewed partitions split.
    pub partitions_coalesced: u32,
    pub partitions_split: u32,
    /// Scan slices cut into pieces at dispatch (dynamic granularity).
    pub slices_cut: u32,
}

struct QueryEntry {
    record: QueryRecord,
    started: Instant,
    /// The Attempts of a distributed Query; None while it is planned, or if it runs on the
    /// coordinator alone.
    run: Option<QueryRun>,
    /// What the final Stage reads for each Task, as the Query's run decides it.
    outcomes: HashMap<TaskId, watch::Sender<Option<TaskOutcome>>>,
    /// Its Attempts assigned to a worker and not ended: its share of the cluster now.
    running: u32,
    /// The object stores its plan reads, named in each of its assignments.
    stores: Arc<Vec<StoreConfig>>,
    /// Its session's execution settings, sent with each of its assignments.
    options: Arc<BTreeMap<String, String>>,
}

#[derive(Default)]
struct Inner {
    /// Queued Attempts go to the Query with the fewest running (else first queued first).
    fifo: bool,
    /// Most Attempts one poll takes (batched dispatch); 1: one per poll.
    poll_tasks_max: usize,
    workers: Registry,
    queue: VecDeque<QueuedAttempt>,
    queries: HashMap<String, QueryEntry>,
    finished: VecDeque<String>,
}

#[derive(Default)]
pub struct Cluster {
    inner: Mutex<Inner>,
    task_ready: Notify,
    worker_joined: Notify,
    metrics: Metrics,
    /// What the coordinator presents when it calls a worker (to stop an Attempt, to read an
    /// output for the final Stage).
    security: ClientSecurity,
}

/// One Query as a whole: its record, its Stages and every Attempt.
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
    /// A cluster whose queue hands out Attempts by fair shares between Queries, or, with
    /// `fair_share` off, first queued first.
    pub fn new(fair_share: bool) -> Self {
        let cluster = Self::default();
        let mut inner = cluster.lock();
        inner.fifo = !fair_share;
        inner.poll_tasks_max = POLL_TASKS_MAX;
        drop(inner);
        cluster
    }

    /// Lets one poll take at most `max` Attempts (1 turns batched dispatch off).
    pub fn with_poll_tasks_max(self, max: usize) -> Self {
        self.lock().poll_tasks_max = max.max(1);
        self
    }

    pub fn with_security(mut self, security: ClientSecurity) -> Self {
        self.security = security;
        self
    }

    /// What the coordinator presents when it calls a worker.
    pub fn security(&self) -> &ClientSecurity {
        &self.security
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a worker with `slots` slots and `express_slots` slots for small Queries only;
    /// returns its id and the session it must present.
    pub fn register_worker(&self, url: String, slots: u32, express_slots: u32, memory_limit_bytes: u64) -> (String, u64) {
        let registered = self.lock().workers.register(url, slots, express_slots, memory_limit_bytes, Instant::now());
        self.worker_joined.notify_waiters();
        registered
    }

    /// Records a heartbeat; None when the worker is unknown (it registers again). `held` are
    /// the Attempts the worker knows of: one assigned to it long ago that it does not list was
    /// lost on the way (or its report was), and runs again. `held_queries` are the Queries it
    /// holds anything of: the reply names those that have ended, whose release it missed.
    pub fn heartbeat(&self, worker_id: &str, session: u64, beat: Beat, held: &[TaskKey], held_queries: &[String]) -> Option<BeatReply> {
        let mut inner = self.lock();
        let now = Instant::now();
        if !inner.workers.heartbeat(worker_id, session, beat, now) {
            return None;
        }
        let timeout = Duration::from_millis(ASSIGNMENT_ACK_TIMEOUT_MS);
        self.for_each_run(&mut inner, |run, out| run.unacknowledged(worker_id, held, timeout, now, out));
        // A Query the history no longer holds ended long ago.
        let running = |id: &String| inner.queries.get(id).is_some_and(|q| q.record.state == "running");
        let ended_queries = held_queries.iter().filter(|id| !running(id)).cloned().collect();
        Some(BeatReply { peers: inner.workers.peers_of(worker_id), ended_queries })
    }

    pub fn total_slots(&self) -> usize {
        self.lock().workers.total_slots()
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

    /// The Queries begun and not yet ended (planned or not).
    pub fn running_query_ids(&self) -> std::collections::BTreeSet<String> {
        self.lock().queries.iter().filter(|(_, q)| q.record.state == "running").map(|(id, _)| id.clone()).collect()
    }

    /// Records a Query as started by `user`, who alone (or an admin) may fetch, follow or
    /// cancel it, from its first moment. Its text is kept with the values of secret options (an
    /// object store's keys) hidden: `quiver.queries` and the web UI show it.
    pub fn begin_query(&self, id: &str, sql: &str, user: &str) {
        let record = QueryRecord {
            id: id.to_string(),
            sql: crate::storage::redact_sql(sql),
            user: user.to_string(),
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
            attempts_retried: 0,
            tasks_recomputed: 0,
            attempts_speculated: 0,
            speculation_wins: 0,
            partitions_coalesced: 0,
            partitions_split: 0,
            slices_cut: 0,
        };
        let entry =
            QueryEntry { record, started: Instant::now(), run: None, outcomes: HashMap::new(), running: 0, stores: Arc::default(), options: Arc::default() };
        self.lock().queries.insert(id.to_string(), entry);
        self.metrics.query_started();
    }

    /// Records a Query that `parent` runs for its own sake (a scalar subquery): it belongs to
    /// whoever started `parent`, who alone (or an admin) may see, follow or cancel it. A parent
    /// already gone leaves it to admins: no user has an empty name.
    pub fn begin_subquery(&self, id: &str, parent: &str, sql: &str) {
        let user = self.lock().queries.get(parent).map(|q| q.record.user.clone()).unwrap_or_default();
        self.begin_query(id, sql, &user);
    }

    /// The object stores the Query's plan reads and its session's execution settings: its
    /// assignments name them to the workers.
    pub fn set_query_context(&self, id: &str, stores: Vec<StoreConfig>, options: BTreeMap<String, String>) {
        if let Some(query) = self.lock().queries.get_mut(id) {
            query.stores = Arc::new(stores);
            query.options = Arc::new(options);
        }
    }

    /// The Query runs on the coordinator alone because its input is small (`quiver.queries`
    /// shows mode `small`).
    pub fn ran_small(&self, id: &str) {
        if let Some(query) = self.lock().queries.get_mut(id) {
            query.record.mode = "small";
        }
    }

    /// Takes a distributed Query's Stages (inputs first) and queues the first Attempts of the
    /// Tasks whose inputs are ready; the others follow as their inputs get outputs.
    /// Stragglers get speculative Attempts and slow workers leave Tasks to faster ones as
    /// `adaptive` says.
    pub fn submit(&self, query_id: &str, stages: Vec<NewStage>, adaptive: Adaptive) -> Result<()> {
        let task_count: usize = stages.iter().map(|s| s.tasks.len()).sum();
        let mut inner = self.lock();
        if inner.queue.len() + task_count > TASK_QUEUE_MAX {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "task queue full: {} queued, {task_count} more would exceed {TASK_QUEUE_MAX}",
                inner.queue.len(),
            )));
        }
        let Inner { queries, queue, workers, .. } = &mut *inner;
        let Some(query) = queries.get_mut(query_id) else {
            return Err(DataFusionError::Execution(format!("unknown query {query_id}")));
        };
        if query.record.state != "running" {
            // Cancelled while it was being planned: its Tasks must never be queued.
            return Err(DataFusionError::Execution(format!("query {query_id} {} before its Tasks were queued", query.record.state)));
        }
        query.record.mode = "distributed";
        query.record.stages = stages.len() as u32;
        query.record.tasks = task_count as u32;
        let read_policy = layout::ReadPolicy { slots: workers.total_slots().max(1), ..adaptive.reads };
        let mut run = QueryRun::new(query_id, stages)
            .with_speculation(adaptive.speculation)
            .with_slow_pace(adaptive.slow_pace)
            .with_read_policy(read_policy)
            .with_granularity(adaptive.granularity)
            .with_key_filter_wait(adaptive.key_filter_wait);
        query.outcomes = run.task_ids().map(|id| (id, watch::channel(None).0)).collect();
        let mut out = Vec::new();
        run.start(Instant::now(), &mut out);
        if workers.live().next().is_none() {
            run.fail(no_live_workers(), Instant::now(), &mut out);
        }
        query.run = Some(run);
        self.apply(query, queue, workers, out);
        Ok(())
    }

    /// Gives a held Stage of a running Query its Task plans (see `NewStage::held`) and queues
    /// those Tasks whose inputs are ready.
    pub fn release(&self, query_id: &str, stage: u32, plans: Vec<Vec<u8>>) -> Result<()> {
        let mut inner = self.lock();
        let mut released = Err(QuiverError::new(ErrorKind::Cancelled, format!("query {query_id} ended before its scalar subqueries did")));
        self.with_run(&mut inner, query_id, |run, out| released = run.release(stage, plans, Instant::now(), out));
        released.map_err(QuiverError::into_datafusion)
    }

    /// A worker's long poll for one lane of its slots: its `max_tasks` free slots or, when it
    /// names none, its `express_tasks` free express slots (a poll that names neither is for one
    /// slot). The next Attempt it may take, waiting up to [`TASK_POLL_WAIT_MS`], then more for
    /// its other free slots of that lane: regular ones while the queue holds more ready Attempts
    /// than the other workers have free slots (batched dispatch, up to the coordinator's
    /// `poll_tasks_max`), express ones while small Queries' Attempts wait. Empty: nothing came
    /// in time. `Err(())` means the worker is unknown and must register again.
    pub async fn poll(&self, worker_id: &str, session: u64, max_tasks: u32, express_tasks: u32) -> std::result::Result<Vec<TaskAssignment>, ()> {
        let (lane, free) = match (max_tasks, express_tasks) {
            (0, 0) => (Lane::Regular, 1),
            (0, n) => (Lane::Express, n as usize),
            (n, _) => (Lane::Regular, (n as usize).min(self.lock().poll_tasks_max)),
        };
        // A poll is dropped before it answers only when the worker's connection went away.
        let mut guard = PollGuard { cluster: self, worker_id, session, answered: false };
        let first = self.wait_for_task(worker_id, session, lane).await;
        guard.answered = true;
        let mut tasks: Vec<TaskAssignment> = first?.into_iter().collect();
        while !tasks.is_empty() && tasks.len() < free && (lane == Lane::Express || self.batch_more(worker_id)) {
            match self.try_assign(worker_id, session, lane) {
                Ok(Assigned::Task(task)) => tasks.push(task),
                _ => break,
            }
        }
        Ok(tasks)
    }

    /// Whether a poll of `worker_id` that already got a Task takes another: only while the
    /// ready queue holds more than the other workers' free slots would take.
    fn batch_more(&self, worker_id: &str) -> bool {
        let inner = self.lock();
        let now = Instant::now();
        let ready = inner.queue.iter().filter(|q| q.ready_at <= now).count();
        policy::batch_more(ready, inner.workers.free_slots_elsewhere(worker_id))
    }

    async fn wait_for_task(&self, worker_id: &str, session: u64, lane: Lane) -> std::result::Result<Option<TaskAssignment>, ()> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(TASK_POLL_WAIT_MS);
        loop {
            let ready = self.task_ready.notified();
            let next_ready = match self.try_assign(worker_id, session, lane)? {
                Assigned::Task(task) => return Ok(Some(task)),
                Assigned::NotBefore(at) => at.map(tokio::time::Instant::from_std),
            };
            let wake = next_ready.map_or(deadline, |at| at.min(deadline));
            if tokio::time::timeout_at(wake, ready).await.is_err() && wake >= deadline {
                return Ok(None);
            }
        }
    }

    fn try_assign(&self, worker_id: &str, session: u64, lane: Lane) -> std::result::Result<Assigned, ()> {
        let mut inner = self.lock();
        if !inner.workers.is_live(worker_id, session) {
            return Err(());
        }
        let Inner { queue, queries, workers, fifo, .. } = &mut *inner;
        let now = Instant::now();
        let mut cuts = 0;
        let queued = loop {
            let (chosen, next_ready) = choose(queue, queries, workers, worker_id, now, *fifo, lane);
            let Some(index) = chosen else { return Ok(Assigned::NotBefore(next_ready)) };
            let queued = queue.remove(index).expect("index is in the queue");
            let query = queries.get_mut(&queued.key.query_id).expect("a queued Attempt's Query is known");
            let run = query.run.as_mut().expect("a queued Attempt's Query runs");
            // A scan slice too large for what is left of its Stage is cut, and the poll takes
            // one of its pieces (or whatever else is first now).
            let mut out = Vec::new();
            if cuts < SLICE_CUTS_PER_POLL_MAX && run.cut_slice(&queued.key, workers.total_slots(), now, &mut out) {
                cuts += 1;
                self.apply(query, queue, workers, out);
                continue;
            }
            break queued;
        };
        let query = queries.get_mut(&queued.key.query_id).expect("a queued Attempt's Query is known");
        let run = query.run.as_mut().expect("a queued Attempt's Query runs");
        let url = workers.url(worker_id).unwrap_or_default().to_string();
        let express = lane == Lane::Express;
        run.assigned(&queued.key, worker_id, &url, express, now);
        query.running += 1;
        workers.attempt_assigned(worker_id, express);
        tracing::debug!(task = %queued.key, worker = worker_id, "task assigned");
        let plan = Arc::try_unwrap(queued.plan).unwrap_or_else(|shared| (*shared).clone());
        let inputs = (*queued.inputs).clone();
        let reads = (*queued.reads).clone();
        let slice = queued.slice;
        let stores = (*query.stores).clone();
        let options = (*query.options).clone();
        let (summarize_keys, key_filter) = run.key_work(queued.key.stage);
        let late_filter_keys = run.late_filter_keys(queued.key.stage);
        Ok(Assigned::Task(TaskAssignment {
            key: Some(queued.key),
            plan,
            partition: queued.partition,
            inputs,
            reads,
            slice,
            express,
            stores,
            summarize_keys,
            key_filter,
            late_filter_keys,
            options,
        }))
    }

    /// Applies a worker's report on one Attempt.
    pub fn report(&self, report: TaskReport) {
        let Some(key) = report.key else { return };
        let state = TaskState::try_from(report.state).unwrap_or(TaskState::Failed);
        tracing::debug!(task = %key, state = state.as_str(), elapsed_ms = report.elapsed_ms, "task reported");
        let mut inner = self.lock();
        if !inner.workers.is_live(&report.worker_id, report.session) && state != TaskState::Succeeded {
            return; // a stale worker's failure changes nothing; its stale success is freed below
        }
        let query_id = key.query_id.clone();
        let report = Report {
            key,
            worker_id: report.worker_id,
            state,
            rows: report.rows,
            bytes: report.bytes,
            elapsed_ms: report.elapsed_ms,
            error: report.error.map(remote_to_quiver),
            part_rows: report.part_rows,
            part_bytes: report.part_bytes,
            key_summary: report.key_summary.map(Into::into),
            filter_rows: (report.filter_rows_in, report.filter_rows_kept),
        };
        self.with_run(&mut inner, &query_id, |run, out| {
            let now = Instant::now();
            run.reported(report, now, out);
            run.speculate(now, out);
        });
    }

    /// Starts speculative Attempts for the stragglers of every running Query (a clock tick).
    pub fn speculate(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        self.for_each_run(&mut inner, |run, out| run.speculate(now, out));
    }

    /// The final Stage could not read the output of Attempt `key`: it is treated as lost. False
    /// when the Query no longer runs, so that nothing will be recomputed.
    pub fn output_unreadable(&self, key: &TaskKey, error: &QuiverError) -> bool {
        let mut inner = self.lock();
        let mut running = false;
        self.with_run(&mut inner, &key.query_id, |run, out| {
            running = run.is_running();
            run.output_unreadable(key, error, Instant::now(), out);
        });
        running
    }

    /// What the final Stage should read for a Task of a running Query, as it changes.
    pub fn subscribe(&self, query_id: &str, stage: u32, task: u32) -> Result<watch::Receiver<Option<TaskOutcome>>> {
        let inner = self.lock();
        inner
            .queries
            .get(query_id)
            .and_then(|q| q.outcomes.get(&(stage, task)))
            .map(|t| t.subscribe())
            .ok_or_else(|| DataFusionError::Execution(format!("no task {stage}/{task} in query {query_id}")))
    }

    /// The final Stage has read part `part` of Attempt `key`'s output whole: losing it no
    /// longer matters.
    pub fn mark_part_read(&self, key: &TaskKey, part: u32) {
        if let Some(run) = self.lock().queries.get_mut(&key.query_id).and_then(|q| q.run.as_mut()) {
            run.part_read(key, part);
        }
    }

    /// The Attempts whose outputs count for each Task of a Stage (the ones the final Stage read).
    pub fn counted_attempts(&self, query_id: &str, stage: u32) -> Vec<TaskKey> {
        let inner = self.lock();
        inner.queries.get(query_id).and_then(|q| q.run.as_ref()).map(|r| r.counted_attempts(stage)).unwrap_or_default()
    }

    /// Ends a Query: drops its queued Attempts, cancels the unfinished ones and returns the URLs
    /// of the workers that ran any of its Attempts (they hold outputs to free); None when the
    /// Query had already ended, so that only one caller acts on its end.
    pub fn finish_query(&self, id: &str, rows: u64, error: Option<&DataFusionError>, cancelled: bool) -> Option<Vec<String>> {
        let mut inner = self.lock();
        let Inner { queries, finished, queue, workers, .. } = &mut *inner;
        let query = queries.get_mut(id)?;
        if query.record.state != "running" {
            return None;
        }
        queue.retain(|t| t.key.query_id != id);
        let mut out = Vec::new();
        if let Some(run) = query.run.as_mut() {
            run.end(Instant::now(), &mut out);
        }
        self.apply(query, queue, workers, out);
        // Whoever still waits on a Task (a reader of a Query cancelled from outside its stream)
        // learns that the Query ended instead of waiting forever.
        let ended = QuiverError::new(ErrorKind::Cancelled, format!("query {id} ended before this task finished"));
        for outcome in query.outcomes.values() {
            outcome.send_if_modified(|o| o.is_none().then(|| *o = Some(TaskOutcome::Failed(ended.clone()))).is_some());
        }
        let urls = query.run.as_ref().map(QueryRun::worker_urls).unwrap_or_default();
        let record = &mut query.record;
        record.rows = rows;
        record.duration_ms = query.started.elapsed().as_millis() as u64;
        record.state = match (error, cancelled) {
            (Some(_), _) => "failed",
            (None, true) => "cancelled",
            (None, false) => "succeeded",
        };
        record.error = error.map(error_text);
        if let Some(run) = &query.run {
            fill_from_run(record, run);
        }
        self.metrics.query_ended(record.state);
        finished.push_back(id.to_string());
        while finished.len() > QUERY_HISTORY_MAX {
            if let Some(old) = finished.pop_front() {
                queries.remove(&old);
            }
        }
        Some(urls.into_iter().collect())
    }

    /// Declares silent workers lost: their running Attempts run again elsewhere and their
    /// outputs that are still needed are recomputed. With no live worker left, every Query that
    /// still needs one fails instead of waiting.
    pub fn detect_lost_workers(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        let lost = inner.workers.take_lost(Duration::from_millis(WORKER_TIMEOUT_MS), now);
        let reasons = lost.into_iter().map(|w| (w, format!("no heartbeat for {WORKER_TIMEOUT_MS} ms"))).collect();
        self.workers_lost(&mut inner, reasons, now);
    }

    /// Workers that may have died, to be probed: (id, URL). See [`Registry::take_suspects`].
    pub fn take_suspects(&self) -> Vec<(String, String)> {
        self.lock().workers.take_suspects(Duration::from_millis(HEARTBEAT_OVERDUE_MS), Instant::now())
    }

    /// A worker found gone before its heartbeats were missed (its port refuses connections).
    pub fn worker_gone(&self, worker_id: &str, reason: &str) {
        let mut inner = self.lock();
        if let Some(worker) = inner.workers.declare_lost(worker_id, reason) {
            self.workers_lost(&mut inner, vec![(worker, reason.to_string())], Instant::now());
        }
    }

    fn workers_lost(&self, inner: &mut Inner, lost: Vec<(WorkerRecord, String)>, now: Instant) {
        for (worker, reason) in &lost {
            let message = format!("worker {} at {} was lost ({reason})", worker.id, worker.url);
            self.for_each_run(inner, |run, out| run.worker_lost(&worker.id, &message, now, out));
        }
        if !lost.is_empty() && inner.workers.live().next().is_none() {
            self.for_each_run(inner, |run, out| {
                if run.needs_workers() {
                    run.fail(no_live_workers(), now, out);
                }
            });
        }
    }

    /// Runs `event` on the run of one Query and carries out its actions.
    fn with_run(&self, inner: &mut Inner, query_id: &str, event: impl FnOnce(&mut QueryRun, &mut Vec<Action>)) {
        let Inner { queries, queue, workers, .. } = inner;
        let Some(query) = queries.get_mut(query_id) else { return };
        let Some(run) = query.run.as_mut() else { return };
        let mut out = Vec::new();
        event(run, &mut out);
        self.apply(query, queue, workers, out);
    }

    /// Runs `event` on the run of every running Query.
    fn for_each_run(&self, inner: &mut Inner, mut event: impl FnMut(&mut QueryRun, &mut Vec<Action>)) {
        let Inner { queries, queue, workers, .. } = inner;
        for query in queries.values_mut().filter(|q| q.record.state == "running") {
            let Some(run) = query.run.as_mut() else { continue };
            let mut out = Vec::new();
            event(run, &mut out);
            self.apply(query, queue, workers, out);
        }
    }

    /// Carries out what a Query's run asked for.
    fn apply(&self, query: &mut QueryEntry, queue: &mut VecDeque<QueuedAttempt>, workers: &mut Registry, actions: Vec<Action>) {
        let mut queued = false;
        for action in actions {
            match action {
                Action::Queue(attempt) => {
                    queue.push_back(attempt);
                    queued = true;
                }
                Action::Stop { key, worker_url } => stop_attempt(self.security.clone(), worker_url, key),
                Action::KeyFilter { stage, filter, worker_urls } => {
                    let message = StageKeyFilter { query_id: query.record.id.clone(), stage, filter: Some((*filter).clone()) };
                    send_stage_key_filter(self.security.clone(), worker_urls, message);
                }
                Action::Publish { task, outcome } => {
                    // The pieces of a split Task are read through channels of their own.
                    if let Some(TaskOutcome::Pieces(pieces)) = &outcome {
                        for piece in pieces {
                            query.outcomes.entry(*piece).or_insert_with(|| watch::channel(None).0);
                        }
                    }
                    if let Some(sender) = query.outcomes.get(&task) {
                        sender.send_replace(outcome);
                    }
                }
                Action::Fail(error) => {
                    tracing::warn!(query = %query.record.id, "query failed: {}", error.message);
                    for sender in query.outcomes.values() {
                        sender.send_replace(Some(TaskOutcome::Failed(error.clone())));
                    }
                }
                Action::Ended { state, ran, worker, express } => {
                    if ran.is_some() {
                        query.running = query.running.saturating_sub(1);
                    }
                    self.metrics.attempt_ended(state.as_str(), ran);
                    if let Some(worker) = worker {
                        workers.attempt_ended(&worker, express);
                    }
                }
                Action::Paced { worker, ratio, at_least, read_from } => workers.paced(&worker, ratio, at_least, &read_from),
                Action::Output { rows, bytes, shuffle } => {
                    self.metrics.attempt_output(rows, bytes, shuffle);
                    match shuffle {
                        true => query.record.bytes_shuffled += bytes,
                        false => query.record.bytes_gathered += bytes,
                    }
                }
                Action::Restarted { started_as, cause } => self.metrics.attempt_restarted(started_as.as_str(), cause.as_str()),
                Action::Speculated => self.metrics.speculated(),
                Action::SpeculationWon => self.metrics.speculation_won(),
                Action::Adapted { coalesced, split } => self.metrics.adapted(coalesced, split),
                Action::SliceCut { pieces } => self.metrics.slice_cut(pieces),
            }
        }
        if queued {
            self.task_ready.notify_waiters();
        }
    }

    pub fn workers(&self) -> Vec<WorkerRecord> {
        self.lock().workers.records()
    }

    pub fn queries(&self) -> Vec<QueryRecord> {
        let inner = self.lock();
        let mut records: Vec<_> = inner.queries.values().map(QueryEntry::snapshot).collect();
        records.sort_by_key(|r| r.started);
        records
    }

    /// Every Attempt of every Query the coordinator remembers.
    pub fn tasks(&self) -> Vec<TaskRecord> {
        let inner = self.lock();
        let runs = inner.queries.values().filter_map(|q| q.run.as_ref());
        let mut records: Vec<_> = runs.flat_map(QueryRun::records).collect();
        records.sort_by(|a, b| a.key.cmp(&b.key));
        records
    }

    /// The URLs of the workers that ran an Attempt of a Query.
    pub fn query_worker_urls(&self, id: &str) -> Vec<String> {
        let inner = self.lock();
        let run = inner.queries.get(id).and_then(|q| q.run.as_ref());
        run.map(|r| r.worker_urls().into_iter().collect()).unwrap_or_default()
    }

    pub fn query(&self, id: &str) -> Option<QueryRecord> {
        self.lock().queries.get(id).map(QueryEntry::snapshot)
    }

    /// How far a Query has got, in Tasks; None for a Query this coordinator does not know.
    pub fn progress(&self, query_id: &str) -> Option<QueryProgress> {
        let inner = self.lock();
        let query = inner.queries.get(query_id)?;
        let (done, running) = query.run.as_ref().map(QueryRun::progress).unwrap_or_default();
        Some(QueryProgress {
            state: query.record.state.to_string(),
            tasks_total: query.record.tasks,
            tasks_done: done as u32,
            tasks_running: running as u32,
        })
    }

    /// Rows, bytes and time of each Stage of a Query, from its Attempts' reports.
    pub fn stage_metrics(&self, query_id: &str) -> Vec<StageMetrics> {
        let inner = self.lock();
        inner.queries.get(query_id).and_then(|q| q.run.as_ref()).map(QueryRun::stage_metrics).unwrap_or_default()
    }

    /// A Query with its Stages and Attempts, taken at one instant.
    pub fn query_detail(&self, id: &str) -> Option<QueryDetail> {
        let inner = self.lock();
        let query = inner.queries.get(id)?;
        let tasks = query.run.as_ref().map(|r| r.records().collect()).unwrap_or_default();
        let stages = query.run.as_ref().map(QueryRun::stage_metrics).unwrap_or_default();
        Some(QueryDetail { query: query.snapshot(), stages, tasks })
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode(&self.workers())
    }
}

/// Marks a worker suspect when its poll is dropped before it answered.
struct PollGuard<'a> {
    cluster: &'a Cluster,
    worker_id: &'a str,
    session: u64,
    answered: bool,
}

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        if !self.answered && !std::thread::panicking() {
            self.cluster.lock().workers.suspect(self.worker_id, self.session);
        }
    }
}

/// Which of a worker's slots a poll fills: a regular one, or an express one, which takes only
/// Attempts of small Queries (at most [`EXPRESS_QUERY_TASKS_MAX`] Tasks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    Regular,
    Express,
}

/// What a worker's poll found.
enum Assigned {
    Task(TaskAssignment),
    /// Nothing it may take now; the earliest queued Attempt whose backoff has not ended.
    NotBefore(Option<Instant>),
}

impl QueryEntry {
    /// The record, with what the run knows so far while the Query runs.
    fn snapshot(&self) -> QueryRecord {
        let mut record = self.record.clone();
        if record.state == "running" {
            record.duration_ms = self.started.elapsed().as_millis() as u64;
            if let Some(run) = &self.run {
                fill_from_run(&mut record, run);
            }
        }
        record
    }
}

fn fill_from_run(record: &mut QueryRecord, run: &QueryRun) {
    record.tasks_done = run.progress().0 as u32;
    record.workers_used = run.workers_used().len() as u32;
    record.attempts_retried = run.retried();
    record.tasks_recomputed = run.recomputed();
    (record.attempts_speculated, record.speculation_wins) = run.speculated();
    (record.partitions_coalesced, record.partitions_split) = run.adapted();
    record.slices_cut = run.slices_cut();
    record.tasks = run.task_total() as u32;
}

/// The queued Attempt worker `worker_id` takes now, if any, and the earliest instant a queued
/// Attempt's backoff ends. Drops Attempts no longer queued (their Query ended or was cancelled).
///
/// Fair shares: of the Attempts this worker may take, the one whose Query has the fewest
/// running, so that a small Query is not left behind every Task a large one queued before it;
/// among equals, the Query with the fewest Tasks left, then the Attempt whose Stage is on the
/// longest path to its Query's result, then the one with most inputs on this worker, then the
/// first queued. With `fifo`,
/// the first it may take. A worker nearly out of memory takes nothing while another has room.
fn choose(
    queue: &mut VecDeque<QueuedAttempt>,
    queries: &HashMap<String, QueryEntry>,
    workers: &Registry,
    worker_id: &str,
    now: Instant,
    fifo: bool,
    lane: Lane,
) -> (Option<usize>, Option<Instant>) {
    let mut next_ready: Option<Instant> = None;
    if workers.full_while_others_have_room(worker_id) {
        return (None, next_ready);
    }
    // This worker's pace without and with its stalls (`SlowPace::stalls`).
    let paces = [false, true].map(|stalls| workers.pace_counting(worker_id, stalls));
    let url = workers.url(worker_id).unwrap_or_default();
    let ready = queue.iter().filter(|q| q.ready_at <= now).count();
    // Per Query, computed once per poll: Tasks left, and whether it is small (express lane).
    let mut remaining: HashMap<String, usize> = HashMap::new();
    let mut small: HashMap<String, bool> = HashMap::new();
    let mut best: Option<((u32, usize, Reverse<u32>, Reverse<usize>), usize)> = None;
    let mut index = 0;
    while index < queue.len() {
        let queued = &queue[index];
        let query = queries.get(&queued.key.query_id);
        let Some(query) = query.filter(|q| q.run.as_ref().is_some_and(|run| run.is_queued(&queued.key))) else {
            queue.remove(index);
            continue;
        };
        index += 1;
        if queued.ready_at > now {
            next_ready = Some(next_ready.map_or(queued.ready_at, |t| t.min(queued.ready_at)));
            continue;
        }
        // A Task that failed on this worker goes to another one when there is one; a
        // speculative Attempt never runs beside its straggler.
        let elsewhere = || workers.live().any(|w| !queued.avoid.contains(&w.id));
        if queued.avoid.iter().any(|w| w == worker_id) && (queued.speculative || elsewhere()) {
            continue;
        }
        // An express slot is for small Queries: they do not wait behind a large one's Tasks.
        if lane == Lane::Express {
            let is_small = *small
                .entry(queued.key.query_id.clone())
                .or_insert_with(|| query.run.as_ref().is_some_and(|run| run.task_total() <= EXPRESS_QUERY_TASKS_MAX));
            if queued.speculative || !is_small {
                continue;
            }
        }
        // A slow worker leaves what the faster ones have room for to them.
        let slow = queued.slow_pace.map(|slow| (slow, paces[slow.stalls as usize])).filter(|&(slow, pace)| pace > slow.limit);
        if slow.is_some_and(|(slow, pace)| policy::leave_to_faster_workers(ready, pace, workers.slots_at_pace(slow.limit, slow.stalls))) {
            continue;
        }
        // Among equal shares, the Query with the fewest Tasks left (a small Query finishes
        // instead of waiting behind a large one's queue), then the Attempt on the longest path
        // to its Query's result (critical path first), then the one with most of its inputs on
        // this worker (read from its own store, they cross no network).
        let left = match remaining.get(&queued.key.query_id) {
            Some(&left) => left,
            None => *remaining.entry(queued.key.query_id.clone()).or_insert(query.run.as_ref().map_or(0, QueryRun::remaining)),
        };
        let local = queued.inputs.iter().filter(|l| l.worker_url == url).count();
        let height = query.run.as_ref().map_or(0, |run| run.stage_height(queued.key.stage));
        let rank = (query.running, left, Reverse(height), Reverse(local));
        if best.as_ref().is_none_or(|(least, _)| rank < *least) {
            best = Some((rank, index - 1));
        }
        if fifo {
            break;
        }
    }
    (best.map(|(_, index)| index), next_ready)
}

fn no_live_workers() -> QuiverError {
    QuiverError::new(ErrorKind::WorkerLost, "no live workers: every worker was lost or none registered")
}

/// Tells a worker to stop an Attempt and free its outputs, in the background: the worker may be
/// gone, and then there is nothing to free.
fn stop_attempt(security: ClientSecurity, worker_url: String, key: TaskKey) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        if let Err(e) = release_attempt(&security, &worker_url, key.clone()).await {
            tracing::debug!(task = %key, url = %worker_url, "stopping the attempt failed: {e}");
        }
    });
}

/// Sends a Stage's key filter to the workers running its Attempts; one that misses it only
/// filters less.
fn send_stage_key_filter(security: ClientSecurity, worker_urls: Vec<String>, message: StageKeyFilter) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    for url in worker_urls {
        let (security, message) = (security.clone(), message.clone());
        runtime.spawn(async move {
            if let Err(e) = send_key_filter(&security, &url, message).await {
                tracing::debug!(%url, "sending a key filter failed: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(tasks: u32) -> Vec<NewStage> {
        let tasks = (0..tasks).map(|task| NewTask { stage: 0, task, partition: task, summary: String::new(), plan: vec![], slice_bytes: None }).collect();
        vec![NewStage { inputs: vec![], shuffle: false, parts: 1, tasks, adaptive: None, ..Default::default() }]
    }

    /// The Query whose Attempt a poll of `worker` gets.
    async fn next_query(cluster: &Cluster, worker: &(String, u64)) -> String {
        let task = cluster.poll(&worker.0, worker.1, 1, 0).await.unwrap().pop().expect("an Attempt is queued");
        task.key.unwrap().query_id
    }

    async fn small_query_behind_a_large_one(fair_share: bool) -> Vec<String> {
        let cluster = Cluster::new(fair_share);
        let worker = cluster.register_worker("http://w".into(), 4, 0, 1 << 30);
        cluster.begin_query("large", "large", "anonymous");
        cluster.submit("large", stage(4), Adaptive::default()).unwrap();
        let mut order = vec![next_query(&cluster, &worker).await];
        cluster.begin_query("small", "small", "anonymous");
        cluster.submit("small", stage(1), Adaptive::default()).unwrap();
        for _ in 0..2 {
            order.push(next_query(&cluster, &worker).await);
        }
        order
    }

    #[tokio::test]
    async fn a_small_query_is_not_queued_behind_every_task_of_a_large_one() {
        assert_eq!(small_query_behind_a_large_one(true).await, ["large", "small", "large"]);
        assert_eq!(small_query_behind_a_large_one(false).await, ["large", "large", "large"], "first queued first");
    }

    #[tokio::test]
    async fn one_poll_takes_several_tasks_only_while_other_workers_have_enough() {
        let cluster = Cluster::new(true);
        let big = cluster.register_worker("http://big".into(), 4, 0, 1 << 30);
        let _other = cluster.register_worker("http://other".into(), 2, 0, 1 << 30);
        cluster.begin_query("q", "q", "anonymous");
        cluster.submit("q", stage(8), Adaptive::default()).unwrap();
        // 8 ready, 2 free slots elsewhere: the big worker fills its 4 slots in one round trip.
        assert_eq!(cluster.poll(&big.0, big.1, 4, 0).await.unwrap().len(), 4);
        // 4 left: it takes 2, leaving 2 for the other worker's 2 free slots.
        assert_eq!(cluster.poll(&big.0, big.1, 4, 0).await.unwrap().len(), 2);
        // A poll naming no slot is for one.
        assert_eq!(cluster.poll(&big.0, big.1, 0, 0).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_express_slot_takes_only_a_small_querys_tasks() {
        let cluster = Cluster::new(true);
        let worker = cluster.register_worker("http://w".into(), 1, 1, 1 << 30);
        cluster.begin_query("large", "large", "anonymous");
        cluster.submit("large", stage(8), Adaptive::default()).unwrap();
        let taken = cluster.poll(&worker.0, worker.1, 1, 1).await.unwrap();
        assert_eq!(taken.iter().map(|t| t.express).collect::<Vec<_>>(), [false], "the large Query fills the regular slot only");
        // The regular slot is busy: only the express slot polls, and the large Query's Tasks wait.
        assert!(matches!(cluster.try_assign(&worker.0, worker.1, Lane::Express), Ok(Assigned::NotBefore(_))));
        cluster.begin_query("small", "small", "anonymous");
        cluster.submit("small", stage(1), Adaptive::default()).unwrap();
        let express = cluster.poll(&worker.0, worker.1, 0, 1).await.unwrap();
        assert_eq!(express.len(), 1);
        assert!(express[0].express);
        assert_eq!(express[0].key.as_ref().unwrap().query_id, "small");
        let used = |c: &Cluster| c.workers().iter().map(|w| (w.assigned, w.express_assigned)).next().unwrap();
        assert_eq!(used(&cluster), (1, 1));
        let key = express[0].key.clone();
        let report = TaskReport { key, worker_id: worker.0.clone(), session: worker.1, state: TaskState::Succeeded as i32, ..Default::default() };
        cluster.report(report);
        assert_eq!(used(&cluster), (1, 0), "the express slot is free again");
    }

    #[tokio::test]
    async fn the_stage_on_the_longest_path_to_the_result_goes_first() {
        // Stage 0 feeds stage 2, which feeds the final Stage; stage 1 feeds the final Stage
        // directly. Queued in the order 1, 0: stage 0 is on the critical path.
        let task = |stage| NewTask { stage, task: 0, partition: 0, summary: String::new(), plan: vec![], slice_bytes: None };
        let stages = vec![
            NewStage { inputs: vec![], shuffle: false, parts: 1, tasks: vec![task(0)], adaptive: None, ..Default::default() },
            NewStage { inputs: vec![], shuffle: false, parts: 1, tasks: vec![task(1)], adaptive: None, ..Default::default() },
            NewStage { inputs: vec![0], shuffle: false, parts: 1, tasks: vec![task(2)], adaptive: None, ..Default::default() },
        ];
        let cluster = Cluster::new(true);
        let worker = cluster.register_worker("http://w".into(), 2, 0, 1 << 30);
        cluster.begin_query("q", "q", "anonymous");
        cluster.submit("q", stages, Adaptive::default()).unwrap();
        {
            let mut inner = cluster.lock();
            let (first, second) = (inner.queue[0].clone(), inner.queue[1].clone());
            inner.queue = [second, first].into();
            assert_eq!(inner.queue[0].key.stage, 1);
        }
        let task = cluster.poll(&worker.0, worker.1, 1, 0).await.unwrap().pop().expect("an Attempt is queued");
        assert_eq!(task.key.unwrap().stage, 0);
    }

    #[test]
    fn a_worker_nearly_out_of_memory_leaves_tasks_to_one_with_room() {
        let cluster = Cluster::new(true);
        let full = cluster.register_worker("http://full".into(), 2, 0, 1000);
        let roomy = cluster.register_worker("http://roomy".into(), 2, 0, 1000);
        cluster.begin_query("q", "q", "anonymous");
        cluster.submit("q", stage(2), Adaptive::default()).unwrap();
        let beat = Beat { running_tasks: 0, memory_used_bytes: 950, unreachable_peers: Vec::new(), busy_ms: 0, stalled_ms: 0 };
        assert!(cluster.heartbeat(&full.0, full.1, beat, &[], &[]).is_some());
        assert!(matches!(cluster.try_assign(&full.0, full.1, Lane::Regular), Ok(Assigned::NotBefore(_))), "the full worker waits");
        assert!(matches!(cluster.try_assign(&roomy.0, roomy.1, Lane::Regular), Ok(Assigned::Task(_))));
        // Once the roomy worker has no free slot, the full one still helps.
        assert!(matches!(cluster.try_assign(&roomy.0, roomy.1, Lane::Regular), Ok(Assigned::Task(_))));
        cluster.begin_query("r", "r", "anonymous");
        cluster.submit("r", stage(1), Adaptive::default()).unwrap();
        assert!(matches!(cluster.try_assign(&full.0, full.1, Lane::Regular), Ok(Assigned::Task(_))));
    }
}
