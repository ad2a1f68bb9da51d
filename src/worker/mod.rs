//! The Worker: registers with the coordinator, heartbeats, and runs one poll loop per slot.
//! Each loop pulls a Task when its slot is free, executes the Task's plan with DataFusion,
//! keeps the output (hash-partitioned for a shuffle) for the consuming Stage to fetch, and
//! reports the Attempt's state as it goes.

mod inputs;
mod key_filters;
mod outputs;
mod peers;
mod stalls;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::metrics::Time;
use datafusion::physical_plan::repartition::BatchPartitioner;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use datafusion::prelude::SessionContext;

use crate::storage::StoreSpec;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::arrow::ipc::CompressionType;
use crate::config::{
    session_config, ShuffleCompression, WorkerConfig, HEARTBEAT_INTERVAL_MS, HELD_QUERIES_REPORTED_MAX, REGISTER_RETRY_MS, RELEASED_ATTEMPTS_MAX, RELEASED_QUERIES_MAX, RELEASE_POLL_MS, RELEASE_WAIT_MS,
    REPORT_RETRIES_MAX,
};
use crate::planner::{shuffle_partitioning, AttemptNumber};
use crate::protocol::{
    action, build_version, classify, decode_plan, error_text, StoreConfig, error_to_remote, quiver_error, Empty, ErrorKind, Heartbeat, HeartbeatResponse, OutputTicket,
    PollTask, PollTaskResponse, RegisterWorker, RegisterWorkerResponse, ReleaseAttempt, ReleaseQuery, StageKeyFilter, TaskAssignment,
    TaskKey, TaskReport, TaskState,
};
use crate::auth::Caller;
use crate::transport::{call, connect_lazy, serve, ClientSecurity, FlightHandler, NodeSecurity, Peer, ServerHandle};
use outputs::{OutputStore, Router};

/// Tasks execute on a runtime of their own. CPU-bound operators (a join building or probing, a
/// sort) may hold a thread for long between yields; on the runtime that also runs heartbeats,
/// task polls and output serving they starved all three, and a worker busy for longer than
/// `WORKER_TIMEOUT_MS` was declared lost, failing its Query. One per process: the workers of
/// `quiver local` share it, as they share the cores.
static TASK_RUNTIME: std::sync::LazyLock<tokio::runtime::Runtime> = std::sync::LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::config::default_parallelism())
        .thread_name("quiver-task")
        .enable_all()
        .build()
        .expect("the task runtime starts")
});

/// This worker's registration with the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Registration {
    id: String,
    session: u64,
}

struct State {
    config: WorkerConfig,
    url: String,
    coordinator: Peer,
    /// What this worker presents when it calls another (the coordinator, a worker).
    security: ClientSecurity,
    ctx: SessionContext,
    outputs: OutputStore,
    /// None until registered, or after the coordinator forgot this worker (it restarted, or
    /// declared the worker lost) and before registering again.
    registration: RwLock<Option<Registration>>,
    running: Mutex<HashMap<TaskKey, AbortHandle>>,
    /// Attempts from assignment until their final report is acknowledged; told to the
    /// coordinator in every heartbeat, so that it notices an assignment or report that was lost.
    held: Mutex<HashSet<TaskKey>>,
    /// Queries and Attempts released recently: one whose assignment crossed its release on the
    /// wire, or that finishes late, must not leave an output behind.
    released_queries: Mutex<Recent<String>>,
    released_attempts: Mutex<Recent<TaskKey>>,
    /// Object stores opened for Tasks, by DataFusion's name for each (`s3://bucket/`).
    stores: Mutex<HashMap<String, StoreSpec>>,
    /// Which peers this worker reached at their advertised addresses.
    peers: Mutex<peers::PeerChecks>,
    /// How the Task outputs it serves are written (`WorkerConfig::shuffle_compression`).
    ipc: IpcWriteOptions,
    /// Key filters for probe Attempts that started before their filter was decided.
    late_filters: key_filters::LateFilters,
    /// How long the process was held off the CPU while Attempts ran, for the heartbeats.
    stalls: Arc<stalls::StallClock>,
}

/// The last `capacity` values seen, for membership tests.
struct Recent<T> {
    order: VecDeque<T>,
    members: HashSet<T>,
    capacity: usize,
}

impl<T: Clone + Eq + std::hash::Hash> Recent<T> {
    fn new(capacity: usize) -> Self {
        Self { order: VecDeque::new(), members: HashSet::new(), capacity }
    }

    fn insert(&mut self, value: T) {
        if self.members.insert(value.clone()) {
            self.order.push_back(value);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.members.remove(&old);
            }
        }
    }

    fn contains(&self, value: &T) -> bool {
        self.members.contains(value)
    }
}

/// A running worker.
pub struct Worker {
    state: Arc<State>,
    server: ServerHandle,
    loops: Vec<JoinHandle<()>>,
}

impl Worker {
    /// Serves outputs on `listener` and starts pulling Tasks from `coordinator_url`. Returns at
    /// once: registration keeps retrying in the background until the coordinator answers.
    pub async fn start(config: WorkerConfig, coordinator_url: &str, listener: TcpListener, security: NodeSecurity) -> Result<Self> {
        let url = format!("{}://{}", security.server.scheme(), advertised(&config, listener.local_addr()?)?);
        let security = security.named(&url);
        let half = (config.memory_limit_bytes / 2) as usize;
        let runtime = RuntimeEnvBuilder::new().with_memory_limit(half.max(1 << 20), 1.0).build_arc()?;
        let ctx = SessionContext::new_with_config_rt(session_config(config.slots), runtime);
        let spill_dir = std::env::temp_dir().join(format!("quiver-worker-{}", uuid::Uuid::new_v4().simple()));
        let ipc = ipc_options(config.shuffle_compression)?;
        let state = Arc::new(State {
            outputs: OutputStore::new(config.memory_limit_bytes / 2, spill_dir),
            config,
            url,
            coordinator: connect_lazy(coordinator_url, &security.client)?,
            security: security.client.clone(),
            ctx,
            registration: RwLock::new(None),
            running: Mutex::default(),
            held: Mutex::default(),
            released_queries: Mutex::new(Recent::new(RELEASED_QUERIES_MAX)),
            released_attempts: Mutex::new(Recent::new(RELEASED_ATTEMPTS_MAX)),
            stores: Mutex::default(),
            peers: Mutex::default(),
            ipc,
            late_filters: key_filters::LateFilters::default(),
            stalls: stalls::StallClock::start()?,
        });
        let service = Arc::new(Service(Arc::clone(&state)));
        let mut server = serve(Arc::clone(&service), listener, &security.server)?;
        if state.config.in_process_reads {
            server.serve_in_process(&state.url, service);
        }
        let mut loops = vec![tokio::spawn(membership_loop(Arc::clone(&state))), tokio::spawn(dispatch_loop(Arc::clone(&state), false))];
        if state.config.express_slots > 0 {
            loops.push(tokio::spawn(dispatch_loop(Arc::clone(&state), true)));
        }
        tracing::info!(url = %state.url, coordinator = coordinator_url, slots = state.config.slots, "worker started");
        Ok(Self { state, server, loops })
    }

    pub fn url(&self) -> &str {
        &self.state.url
    }

    pub fn id(&self) -> Option<String> {
        self.state.registration().map(|r| r.id)
    }

    /// Number of Task output parts this worker holds.
    pub fn stored_outputs(&self) -> usize {
        self.state.outputs.len()
    }

    /// Number of output spill files this worker has on disk.
    pub fn spill_files(&self) -> usize {
        self.state.outputs.spill_files()
    }

    /// Output parts that went to disk since the worker started.
    pub fn spilled_parts_total(&self) -> u64 {
        self.state.outputs.spilled_parts_total()
    }

    /// Attempts executing on this worker now.
    pub fn running_tasks(&self) -> usize {
        self.state.running.lock().expect("running lock").len()
    }

    /// Memory held by Task outputs and by running Tasks' operators.
    pub fn memory_used_bytes(&self) -> u64 {
        self.state.memory_used()
    }

    pub async fn shutdown(self) {
        for l in &self.loops {
            l.abort();
        }
        self.state.abort_all();
        self.server.shutdown().await;
    }

    /// Stops at once, as a crash would: no goodbye to the coordinator, and no report of the
    /// Attempts it stops (without a registration nothing is reported: an Attempt aborted here
    /// must not reach the coordinator as "cancelled" before the worker is found lost).
    pub fn kill(self) {
        *self.state.registration.write().expect("registration lock") = None;
        for l in &self.loops {
            l.abort();
        }
        self.state.abort_all();
        self.server.abort();
    }
}

impl State {
    fn registration(&self) -> Option<Registration> {
        self.registration.read().expect("registration lock").clone()
    }

    /// The coordinator no longer knows this registration: everything it ran here is stale (the
    /// coordinator restarted, or declared this worker lost and ran its Tasks elsewhere), so it
    /// is stopped and freed before registering again.
    fn forget(&self, registration: &Registration) {
        let mut current = self.registration.write().expect("registration lock");
        if current.as_ref() != Some(registration) {
            return;
        }
        *current = None;
        drop(current);
        tracing::warn!(worker = %registration.id, "the coordinator no longer knows this worker: dropping its tasks and outputs");
        self.abort_all();
        self.outputs.clear();
        self.late_filters.clear();
    }

    fn memory_used(&self) -> u64 {
        self.outputs.memory_used() + self.ctx.runtime_env().memory_pool.reserved() as u64
    }

    fn abort_all(&self) {
        for (_, handle) in self.running.lock().expect("running lock").drain() {
            handle.abort();
        }
    }

    /// An Attempt whose output nobody will read: its Query or itself was released, or it was
    /// given under a registration the coordinator has forgotten.
    fn is_stale(&self, key: &TaskKey, registration: &Registration) -> bool {
        self.is_released(key) || self.registration().as_ref() != Some(registration)
    }

    fn is_released(&self, key: &TaskKey) -> bool {
        self.released_queries.lock().expect("released lock").contains(&key.query_id)
            || self.released_attempts.lock().expect("released lock").contains(key)
    }

    /// The Queries this worker holds outputs or Attempts of, as a heartbeat lists them.
    fn held_queries(&self) -> Vec<String> {
        let mut queries = self.outputs.query_ids();
        queries.extend(self.held.lock().expect("held lock").iter().map(|key| key.query_id.clone()));
        queries.into_iter().take(HELD_QUERIES_REPORTED_MAX).collect()
    }

    fn release_query(&self, query_id: &str) {
        self.released_queries.lock().expect("released lock").insert(query_id.to_string());
        self.running.lock().expect("running lock").retain(|key, handle| {
            if key.query_id == query_id {
                handle.abort();
            }
            key.query_id != query_id
        });
        self.outputs.release_query(query_id);
        self.late_filters.release_query(query_id);
    }

    /// Drops a released Query's late key filters: a filter that crossed the release on the
    /// wire, or a slot an Attempt took after it, came after the release swept them. Checked
    /// after adding, so that a release running meanwhile cannot miss one.
    fn sweep_late_filters_if_released(&self, query_id: &str) {
        if self.released_queries.lock().expect("released lock").contains(&query_id.to_string()) {
            self.late_filters.release_query(query_id);
        }
    }

    /// Returns once no Attempt of a released Query is left running here (its Tasks were
    /// aborted, and an abort ends a Task at its next await), or after `RELEASE_WAIT_MS`.
    async fn stopped(&self, query_id: &str) {
        let deadline = Instant::now() + Duration::from_millis(RELEASE_WAIT_MS);
        while self.held.lock().expect("held lock").iter().any(|k| k.query_id == query_id) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(RELEASE_POLL_MS)).await;
        }
    }

    /// Stops one Attempt if it runs and frees its outputs.
    fn release_attempt(&self, key: &TaskKey) {
        self.released_attempts.lock().expect("released lock").insert(key.clone());
        if let Some(handle) = self.running.lock().expect("running lock").remove(key) {
            handle.abort();
        }
        self.outputs.release_attempt(key);
    }
}

/// Arrow IPC options that compress buffers as `compression` says.
fn ipc_options(compression: ShuffleCompression) -> Result<IpcWriteOptions> {
    let codec = match compression {
        ShuffleCompression::None => None,
        ShuffleCompression::Lz4 => Some(CompressionType::LZ4_FRAME),
        ShuffleCompression::Zstd => Some(CompressionType::ZSTD),
    };
    Ok(IpcWriteOptions::default().try_with_compression(codec)?)
}

/// Dials, in the background, the peers that are due a check (see [`peers`]).
fn check_peers(state: &Arc<State>, named: &[String]) {
    let due = state.peers.lock().expect("peers lock").due(named, Instant::now());
    if due.is_empty() {
        return;
    }
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let results = peers::dial(due, &state.url, &state.security).await;
        state.peers.lock().expect("peers lock").record(results);
    });
}

/// Registers (retrying until the coordinator answers), then heartbeats; registers again when
/// the coordinator no longer knows this worker.
async fn membership_loop(state: Arc<State>) {
    // A coordinator that refuses this worker (no or another cluster secret) is said once, loud.
    let mut told_refused = false;
    loop {
        let Some(registration) = state.registration() else {
            let request = RegisterWorker {
                address: state.url.clone(),
                slots: state.config.slots as u32,
                memory_limit_bytes: state.config.memory_limit_bytes,
                express_slots: state.config.express_slots as u32,
                version: build_version(),
            };
            match call::<_, RegisterWorkerResponse>(&state.coordinator, action::REGISTER_WORKER, &request).await {
                Ok(reply) => {
                    tracing::info!(worker = %reply.worker_id, "registered with {}", state.coordinator.url);
                    let registration = Registration { id: reply.worker_id, session: reply.session };
                    *state.registration.write().expect("registration lock") = Some(registration);
                }
                Err(e) if matches!(classify(&e).kind, ErrorKind::Denied | ErrorKind::Configuration) => {
                    if !std::mem::replace(&mut told_refused, true) {
                        let hint = match classify(&e).kind {
                            ErrorKind::Denied => " (is --cluster-secret-file the same on both?)",
                            _ => "",
                        };
                        tracing::error!("the coordinator refuses this worker{hint}: {}", error_text(&e));
                    }
                    tokio::time::sleep(Duration::from_millis(REGISTER_RETRY_MS)).await;
                }
                Err(e) => {
                    tracing::debug!("coordinator not reachable yet: {e}");
                    tokio::time::sleep(Duration::from_millis(REGISTER_RETRY_MS)).await;
                }
            }
            continue;
        };
        // Taken before the message: its fields' lock guards live to the end of the statement.
        let held_queries = state.held_queries();
        let (busy_ms, stalled_ms) = state.stalls.take();
        let beat = Heartbeat {
            worker_id: registration.id.clone(),
            running_tasks: state.running.lock().expect("running lock").len() as u32,
            memory_used_bytes: state.memory_used(),
            tasks: state.held.lock().expect("held lock").iter().cloned().collect(),
            session: registration.session,
            unreachable_peers: state.peers.lock().expect("peers lock").unreachable(),
            held_queries,
            busy_ms,
            stalled_ms,
        };
        match call::<_, HeartbeatResponse>(&state.coordinator, action::HEARTBEAT, &beat).await {
            Ok(reply) if !reply.known => state.forget(&registration),
            Ok(reply) => {
                for query in &reply.ended_queries {
                    tracing::info!(query = %query, "freeing an ended query's outputs: its release did not reach this worker");
                    state.release_query(query);
                }
                check_peers(&state, &reply.peers);
            }
            Err(e) => tracing::debug!("heartbeat failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(HEARTBEAT_INTERVAL_MS)).await;
    }
}

/// Pulls Tasks for one lane of slots (the regular ones, or the express ones that take only
/// small Queries' Tasks): once one of its slots is free, one long poll asks for a Task for each
/// free one (the coordinator may batch several into one answer), and each Task runs on a slot
/// of its own, reported as it goes. Each lane polls on its own, so a regular slot that frees up
/// never waits for an express poll to return. The Tasks belong to this loop: stopping it stops
/// them.
async fn dispatch_loop(state: Arc<State>, express: bool) {
    let count = if express { state.config.express_slots } else { state.config.slots.max(1) };
    let slots = Arc::new(Semaphore::new(count));
    let mut running = JoinSet::new();
    loop {
        while running.try_join_next().is_some() {}
        let Some(registration) = state.registration() else {
            tokio::time::sleep(Duration::from_millis(REGISTER_RETRY_MS)).await;
            continue;
        };
        let Ok(first) = Arc::clone(&slots).acquire_owned().await else { return };
        let mut free = vec![first];
        while let Ok(permit) = Arc::clone(&slots).try_acquire_owned() {
            free.push(permit);
        }
        let n = free.len() as u32;
        let (max_tasks, express_tasks) = if express { (0, n) } else { (n, 0) };
        let poll = PollTask { worker_id: registration.id.clone(), session: registration.session, max_tasks, express_tasks };
        match call::<_, PollTaskResponse>(&state.coordinator, action::POLL_TASK, &poll).await {
            Ok(PollTaskResponse { known: false, .. }) => state.forget(&registration),
            Ok(PollTaskResponse { task, more, .. }) => {
                for task in task.into_iter().chain(more) {
                    // Never more than asked for; should a coordinator send more, they still run
                    // (beyond the slots) rather than be lost.
                    let permit = free.pop();
                    let (state, registration) = (Arc::clone(&state), registration.clone());
                    running.spawn(async move {
                        run_task(&state, &registration, task).await;
                        drop(permit);
                    });
                }
            }
            Err(e) => {
                tracing::debug!("task poll failed: {e}");
                tokio::time::sleep(Duration::from_millis(REGISTER_RETRY_MS)).await;
            }
        }
    }
}

async fn run_task(state: &Arc<State>, registration: &Registration, task: TaskAssignment) {
    let Some(key) = task.key.clone() else { return };
    let _busy = state.stalls.busy();
    state.held.lock().expect("held lock").insert(key.clone());
    run_attempt(state, registration, key.clone(), task).await;
    state.held.lock().expect("held lock").remove(&key);
}

/// Runs one Attempt and reports it, up to its final report. An Attempt released while it ran
/// (its Query ended, or the coordinator stopped it) leaves no output and is not reported.
async fn run_attempt(state: &Arc<State>, registration: &Registration, key: TaskKey, task: TaskAssignment) {
    let started = Instant::now();
    if state.is_stale(&key, registration) {
        return;
    }
    report(state, registration, &key, TaskState::Running, None, None, started).await;
    let job = TASK_RUNTIME.spawn({
        let (state, key) = (Arc::clone(state), key.clone());
        async move {
            if state.config.task_delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(state.config.task_delay_ms)).await;
            }
            open_stores(&state, task.stores)?;
            let inputs = Arc::new(inputs::TaskInputs::new(Arc::clone(&state), task.inputs, task.reads));
            let context = task_context(&state.ctx, &key, &task.options)?;
            let mut plan = decode_plan(&task.plan, &context, Some(inputs))?;
            plan = crate::storage::cache_page_indexes(plan, state.ctx.runtime_env().as_ref())?;
            if let Some(piece) = task.slice {
                plan = crate::planner::narrow_task_plan(plan, piece.index, piece.of)?;
            }
            let late = (!task.late_filter_keys.is_empty()).then(|| (task.late_filter_keys, state.late_filters.slot(&key.query_id, key.stage)));
            let (plan, counts) = key_filters::filter_plan(plan, task.key_filter, late)?;
            let (stream, router) = execute_task(&plan, task.partition as usize, context)?;
            let (stream, keys) = key_filters::summarize(stream, counts, task.summarize_keys);
            let stored = state.outputs.store(&key, stream, router).await?;
            Ok::<_, DataFusionError>((stored, keys))
        }
    });
    {
        // Checked under the lock `release_query` and `forget` take after marking the Query
        // released or dropping the registration: a release, or a coordinator that forgot this
        // worker (and ran the Attempt elsewhere), while the Attempt was starting (its Running
        // report can take a while on a bad network) stops it either way.
        let mut running = state.running.lock().expect("running lock");
        running.insert(key.clone(), job.abort_handle());
        if state.is_stale(&key, registration) {
            job.abort();
        }
    }
    let outcome = job.await;
    state.running.lock().expect("running lock").remove(&key);
    if state.is_stale(&key, registration) {
        state.outputs.release_attempt(&key);
        state.sweep_late_filters_if_released(&key.query_id);
        return;
    }
    match outcome {
        Ok(Ok((stored, keys))) => {
            let done = Done { stored, keys: keys.finish() };
            report(state, registration, &key, TaskState::Succeeded, Some(&done), None, started).await
        }
        Ok(Err(e)) => report(state, registration, &key, TaskState::Failed, None, Some(&e), started).await,
        Err(join) if join.is_cancelled() => {
            state.outputs.release_attempt(&key);
            let e = quiver_error(ErrorKind::Cancelled, format!("task {key} was cancelled on its worker"));
            report(state, registration, &key, TaskState::Cancelled, None, Some(&e), started).await;
        }
        Err(join) => {
            let e = quiver_error(ErrorKind::Internal, format!("task {key} panicked: {join}"));
            report(state, registration, &key, TaskState::Failed, None, Some(&e), started).await;
        }
    }
}

/// The address other processes reach this worker at: `--advertise`, else the address it
/// listens on, which must then be one they can dial.
fn advertised(config: &WorkerConfig, listening: std::net::SocketAddr) -> Result<String> {
    match &config.advertise {
        Some(addr) => {
            let port = addr.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
            match port.map(str::parse::<u16>) {
                Some(Ok(_)) => Ok(addr.clone()),
                _ => Err(DataFusionError::Configuration(format!("--advertise {addr}: expected HOST:PORT"))),
            }
        }
        None if listening.ip().is_unspecified() => Err(DataFusionError::Configuration(format!(
            "the worker listens on {listening}, which no other host can dial: give --advertise HOST:PORT, the address the coordinator and the other workers reach it at"
        ))),
        None => Ok(listening.to_string()),
    }
}

/// Opens the object stores an assignment names, unless this worker has opened each with the
/// same options already (a store whose options changed is opened again).
fn open_stores(state: &State, stores: Vec<StoreConfig>) -> Result<()> {
    let mut opened = state.stores.lock().expect("stores lock");
    for config in stores {
        let spec = StoreSpec::from(config);
        let url = spec.object_store_url()?;
        if opened.get(url.as_str()) != Some(&spec) {
            state.ctx.runtime_env().register_object_store(url.as_ref(), spec.build()?);
            opened.insert(url.as_str().to_string(), spec);
        }
    }
    Ok(())
}

/// Starts a Task's plan: the partition it was given, split into output parts when the plan's
/// root is a shuffle's repartition.
fn execute_task(plan: &Arc<dyn ExecutionPlan>, partition: usize, context: TaskContext) -> Result<(SendableRecordBatchStream, Router)> {
    if let Some(partitioning) = shuffle_partitioning(plan) {
        let input = plan.children()[0];
        let inputs = input.output_partitioning().partition_count();
        let parts = partitioning.partition_count();
        let partitioner = BatchPartitioner::try_new(partitioning, Time::new(), partition, inputs)?;
        let stream = input.execute(partition, executing(context, input.as_ref()))?;
        return Ok((stream, Router::Partition { partitioner, parts }));
    }
    Ok((plan.execute(partition, executing(context, plan.as_ref()))?, Router::Whole))
}

/// The context a Task's plan is decoded and run in: the worker's session under the Task's
/// execution settings, with its Attempt's number (a write Task names its file after its
/// Attempt, so that two Attempts of one Task never write the same file). Functions that take a
/// setting when built are decoded as the plan declares them (`protocol::decode_plan`).
fn task_context(ctx: &SessionContext, key: &TaskKey, options: &BTreeMap<String, String>) -> Result<TaskContext> {
    let task = TaskContext::from(ctx);
    let mut config = task.session_config().clone().with_extension(Arc::new(AttemptNumber(key.attempt)));
    crate::config::apply_execution_options(&mut config, options)?;
    Ok(task.with_session_config(config))
}

/// `context` for running `executed`. A hash join's dynamic filter waits until every partition
/// of the join has built (or probed) before any probes: that holds only when this process runs
/// all of them, i.e. when the Task computes the plan's only partition. A Task that computes one
/// of several partitions (the others run in other processes) runs without join dynamic filters.
fn executing(context: TaskContext, executed: &dyn ExecutionPlan) -> Arc<TaskContext> {
    let mut config = context.session_config().clone();
    if executed.output_partitioning().partition_count() > 1 {
        config.options_mut().optimizer.enable_join_dynamic_filter_pushdown = false;
    }
    Arc::new(context.with_session_config(config))
}

/// What a succeeded Attempt reports: its stored output and what it did with join keys.
struct Done {
    stored: outputs::Stored,
    keys: key_filters::KeysDone,
}

async fn report(
    state: &State,
    registration: &Registration,
    key: &TaskKey,
    task_state: TaskState,
    done: Option<&Done>,
    error: Option<&DataFusionError>,
    started: Instant,
) {
    let stored = done.map(|d| &d.stored);
    let keys = done.map(|d| &d.keys);
    let report = TaskReport {
        key: Some(key.clone()),
        worker_id: registration.id.clone(),
        session: registration.session,
        state: task_state as i32,
        rows: stored.map_or(0, |s| s.rows),
        bytes: stored.map_or(0, |s| s.bytes),
        part_rows: stored.map_or_else(Vec::new, |s| s.part_rows.clone()),
        part_bytes: stored.map_or_else(Vec::new, |s| s.part_bytes.clone()),
        key_summary: keys.and_then(|k| k.summary.clone()).map(Into::into),
        filter_rows_in: keys.map_or(0, |k| k.filter_rows.0),
        filter_rows_kept: keys.map_or(0, |k| k.filter_rows.1),
        elapsed_ms: started.elapsed().as_millis() as u64,
        error: error.map(error_to_remote),
    };
    // A lost final report would leave the Query waiting on this Task: retry it.
    for attempt in 0..=REPORT_RETRIES_MAX {
        match call::<_, Empty>(&state.coordinator, action::REPORT_TASK, &report).await {
            Ok(_) => return,
            Err(e) if attempt == REPORT_RETRIES_MAX => {
                tracing::warn!(task = %key, "cannot report {} to the coordinator: {e}", task_state.as_str());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(REGISTER_RETRY_MS << attempt)).await,
        }
    }
}

/// The worker's Flight service: Task outputs by ticket, Query and Attempt release. Only
/// cluster members may call it: a client's token never reads an output or stops a Task.
struct Service(Arc<State>);

fn only_nodes(caller: &Caller) -> Result<()> {
    if caller.is_node() {
        return Ok(());
    }
    Err(quiver_error(ErrorKind::Denied, format!("'{}' is not a member of this cluster: workers serve only the coordinator and other workers", caller.name)))
}

fn decode<M: Message + Default>(body: Bytes) -> Result<M> {
    M::decode(body).map_err(|e| quiver_error(ErrorKind::Plan, format!("malformed message: {e}")))
}

#[async_trait::async_trait]
impl FlightHandler for Service {
    fn ipc_options(&self) -> IpcWriteOptions {
        self.0.ipc.clone()
    }

    async fn do_get(&self, caller: &Caller, ticket: Bytes) -> Result<SendableRecordBatchStream> {
        only_nodes(caller)?;
        let ticket: OutputTicket = decode(ticket)?;
        let key = ticket.key.ok_or_else(|| quiver_error(ErrorKind::Plan, "ticket without a task key"))?;
        self.0.outputs.open(&key, ticket.partition)
    }

    async fn do_action(&self, caller: &Caller, name: &str, body: Bytes) -> Result<Bytes> {
        only_nodes(caller)?;
        match name {
            action::RELEASE_QUERY => {
                let release: ReleaseQuery = decode(body)?;
                self.0.release_query(&release.query_id);
                self.0.stopped(&release.query_id).await;
            }
            action::STAGE_KEY_FILTER => {
                let filter: StageKeyFilter = decode(body)?;
                let query_id = filter.query_id.clone();
                self.0.late_filters.arrived(filter)?;
                self.0.sweep_late_filters_if_released(&query_id);
            }
            action::RELEASE_ATTEMPT => {
                let release: ReleaseAttempt = decode(body)?;
                let key = release.key.ok_or_else(|| quiver_error(ErrorKind::Plan, "release without a task key"))?;
                self.0.release_attempt(&key);
            }
            other => return Err(quiver_error(ErrorKind::Plan, format!("unknown action '{other}'"))),
        }
        Ok(Empty {}.encode_to_vec().into())
    }
}
