//! Control-plane messages. Field tags are the wire contract: never reuse or renumber one.

use std::fmt;

/// Names of the Flight actions the coordinator serves.
pub mod action {
    pub const REGISTER_WORKER: &str = "register_worker";
    pub const HEARTBEAT: &str = "heartbeat";
    pub const POLL_TASK: &str = "poll_task";
    pub const REPORT_TASK: &str = "report_task";
    /// Asked by clients: how far a Query has got.
    pub const QUERY_PROGRESS: &str = "query_progress";
    /// Served by workers: drop a Query's outputs and stop its running Tasks.
    pub const RELEASE_QUERY: &str = "release_query";
    /// Served by workers: stop one Attempt if it runs and drop its outputs.
    pub const RELEASE_ATTEMPT: &str = "release_attempt";
    /// Served by workers: the key filter of a Stage whose Attempts started before it was
    /// decided; they apply it from then on.
    pub const STAGE_KEY_FILTER: &str = "stage_key_filter";
}

/// Identifies one Attempt of one Task: the unit a worker runs and stores output for.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Message)]
pub struct TaskKey {
    #[prost(string, tag = "1")]
    pub query_id: String,
    #[prost(uint32, tag = "2")]
    pub stage: u32,
    #[prost(uint32, tag = "3")]
    pub task: u32,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/stage-{}/task-{}/attempt-{}", self.query_id, self.stage, self.task, self.attempt)
    }
}

/// The version of what a worker and its coordinator exchange: these messages, the plan
/// encoding and the settings a Task may carry. **Bump it with every change to any of them**,
/// so that a worker built before the change is refused instead of misreading.
pub const PROTOCOL_VERSION: u32 = 2;

/// The build a worker and its coordinator must share: Task plans are encoded by one version of
/// Quiver and DataFusion for that same version to decode, and a Task's settings are named as
/// that DataFusion names them.
pub fn build_version() -> String {
    format!("quiver {} protocol {PROTOCOL_VERSION} (DataFusion {})", env!("CARGO_PKG_VERSION"), datafusion::DATAFUSION_VERSION)
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RegisterWorker {
    /// Address other processes reach this worker's Flight service at, e.g. `http://127.0.0.1:4100`.
    #[prost(string, tag = "1")]
    pub address: String,
    #[prost(uint32, tag = "2")]
    pub slots: u32,
    #[prost(uint64, tag = "3")]
    pub memory_limit_bytes: u64,
    /// Slots beyond `slots` that run only the Tasks of small Queries (the express lane), so
    /// that a small Query does not wait for a large one's Tasks to end.
    #[prost(uint32, tag = "4")]
    pub express_slots: u32,
    /// The worker's [`build_version`]; a coordinator of another build refuses it.
    #[prost(string, tag = "5")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RegisterWorkerResponse {
    #[prost(string, tag = "1")]
    pub worker_id: String,
    /// Names this registration: a worker that registered with an earlier coordinator (one that
    /// restarted and gave its id to another worker) is told apart by it.
    #[prost(uint64, tag = "2")]
    pub session: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Heartbeat {
    #[prost(string, tag = "1")]
    pub worker_id: String,
    #[prost(uint32, tag = "2")]
    pub running_tasks: u32,
    #[prost(uint64, tag = "3")]
    pub memory_used_bytes: u64,
    /// Attempts the worker holds: running, or finished and not yet reported.
    #[prost(message, repeated, tag = "4")]
    pub tasks: Vec<TaskKey>,
    #[prost(uint64, tag = "5")]
    pub session: u64,
    /// Peers (addresses from `HeartbeatResponse::peers`) the worker could not connect to.
    #[prost(string, repeated, tag = "6")]
    pub unreachable_peers: Vec<String>,
    /// The Queries the worker holds outputs or Attempts of (at most
    /// `HELD_QUERIES_REPORTED_MAX`): the coordinator names those that have ended.
    #[prost(string, repeated, tag = "7")]
    pub held_queries: Vec<String>,
    /// Since the last heartbeat: wall time while at least one Attempt ran on the worker (in whole
    /// stall-clock ticks), and how much of it its process was held off the CPU (see
    /// `worker::stalls`).
    #[prost(uint64, tag = "8")]
    pub busy_ms: u64,
    #[prost(uint64, tag = "9")]
    pub stalled_ms: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeartbeatResponse {
    /// False when the coordinator does not know the worker (it restarted, or declared the
    /// worker lost): the worker registers again.
    #[prost(bool, tag = "1")]
    pub known: bool,
    /// The addresses of the other live workers, which this one must reach to read their
    /// Task outputs: it checks each once, and those it failed to reach again.
    #[prost(string, repeated, tag = "2")]
    pub peers: Vec<String>,
    /// Of the `held_queries`, those that have ended: their release did not reach the worker
    /// (it was unreachable then), which frees them now.
    #[prost(string, repeated, tag = "3")]
    pub ended_queries: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PollTask {
    #[prost(string, tag = "1")]
    pub worker_id: String,
    #[prost(uint64, tag = "2")]
    pub session: u64,
    /// Free slots the worker polls for: the coordinator may answer with up to this many Tasks
    /// (batched dispatch); 0 counts as 1 when `express_tasks` is 0 too.
    #[prost(uint32, tag = "3")]
    pub max_tasks: u32,
    /// Free express slots it polls for (see `RegisterWorker::express_slots`) when `max_tasks`
    /// is 0: a poll is for one lane of slots.
    #[prost(uint32, tag = "4")]
    pub express_tasks: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PollTaskResponse {
    #[prost(message, optional, tag = "1")]
    pub task: Option<TaskAssignment>,
    /// False when the coordinator does not know the worker.
    #[prost(bool, tag = "2")]
    pub known: bool,
    /// Tasks beyond the first, for the worker's other free slots (never more than it asked).
    #[prost(message, repeated, tag = "3")]
    pub more: Vec<TaskAssignment>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskAssignment {
    #[prost(message, optional, tag = "1")]
    pub key: Option<TaskKey>,
    /// The Task's physical plan, encoded by [`super::encode_plan`].
    #[prost(bytes = "vec", tag = "2")]
    pub plan: Vec<u8>,
    /// The partition of the plan the Task computes.
    #[prost(uint32, tag = "3")]
    pub partition: u32,
    /// Where the outputs of the Stages the plan reads are: one entry per producer Task.
    #[prost(message, repeated, tag = "4")]
    pub inputs: Vec<OutputLocation>,
    /// Shuffle reads the coordinator adapted to the data (coalesced or split partitions); a
    /// Stage not named here is read as planned: part `partition` of every producer.
    #[prost(message, repeated, tag = "5")]
    pub reads: Vec<ShuffleRead>,
    /// The Task is one piece of a scan slice the coordinator cut finer at dispatch: the worker
    /// reads only this piece of the plan's files. None: the plan's files as they are.
    #[prost(message, optional, tag = "6")]
    pub slice: Option<SlicePiece>,
    /// It runs on one of the worker's express slots (a small Query's Task).
    #[prost(bool, tag = "7")]
    pub express: bool,
    /// The object stores the plan reads, with what opens them (credentials included: a
    /// worker reads a table exactly as the coordinator resolved it).
    #[prost(message, repeated, tag = "8")]
    pub stores: Vec<StoreConfig>,
    /// Its output is the build side of a join whose probe Stage filters by its join keys:
    /// these columns of it are summarized in the report (`TaskReport::key_summary`).
    #[prost(uint32, repeated, tag = "9")]
    pub summarize_keys: Vec<u32>,
    /// Its output keeps only the rows whose join keys this filter holds.
    #[prost(message, optional, tag = "10")]
    pub key_filter: Option<KeyFilterSpec>,
    /// Its Stage filters by join keys, but the filter was not decided when it was assigned:
    /// these columns of its output are filtered once the filter arrives (`StageKeyFilter`).
    #[prost(uint32, repeated, tag = "11")]
    pub late_filter_keys: Vec<u32>,
    /// The Query's session settings that govern execution (`datafusion.execution.*`) where
    /// they differ from the cluster's defaults: the worker runs the Task under them, as one
    /// node would (see `config::execution_options`).
    #[prost(btree_map = "string, string", tag = "12")]
    pub options: std::collections::BTreeMap<String, String>,
}

/// A Bloom filter of a build Stage's join keys (`planner::KeyFilter`) and the columns of the
/// probe Task's output it applies to.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyFilterSpec {
    #[prost(uint32, repeated, tag = "1")]
    pub keys: Vec<u32>,
    #[prost(bytes = "vec", tag = "2")]
    pub bits: Vec<u8>,
}

/// The join keys of a build Task's output (`planner::SummaryForm`): Bloom filter bits when
/// `bits` is not empty, else the distinct key hashes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeySummaryMessage {
    #[prost(fixed64, repeated, tag = "1")]
    pub hashes: Vec<u64>,
    #[prost(bytes = "vec", tag = "2")]
    pub bits: Vec<u8>,
}

impl From<crate::planner::SummaryForm> for KeySummaryMessage {
    fn from(form: crate::planner::SummaryForm) -> Self {
        match form {
            crate::planner::SummaryForm::Hashes(hashes) => Self { hashes, bits: Vec::new() },
            crate::planner::SummaryForm::Bits(bits) => Self { hashes: Vec::new(), bits },
        }
    }
}

impl From<KeySummaryMessage> for crate::planner::SummaryForm {
    fn from(message: KeySummaryMessage) -> Self {
        match message.bits.is_empty() {
            true => Self::Hashes(message.hashes),
            false => Self::Bits(message.bits),
        }
    }
}

/// One object store: its URL (`s3://bucket`) and its options by canonical name. Its debug
/// output hides secret values, so that an assignment may be logged.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct StoreConfig {
    #[prost(string, tag = "1")]
    pub url: String,
    #[prost(btree_map = "string, string", tag = "2")]
    pub options: std::collections::BTreeMap<String, String>,
}

impl From<&crate::storage::StoreSpec> for StoreConfig {
    fn from(spec: &crate::storage::StoreSpec) -> Self {
        Self { url: spec.url.clone(), options: spec.options.clone() }
    }
}

impl From<StoreConfig> for crate::storage::StoreSpec {
    fn from(config: StoreConfig) -> Self {
        Self { url: config.url, options: config.options }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&crate::storage::StoreSpec::from(self.clone()), f)
    }
}

/// Piece `index` of `of` equal, contiguous byte ranges of a Task plan's scan slice.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct SlicePiece {
    #[prost(uint32, tag = "1")]
    pub index: u32,
    #[prost(uint32, tag = "2")]
    pub of: u32,
}

/// What a Task reads of one shuffled Stage: these parts of the outputs of these producer Tasks.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ShuffleRead {
    #[prost(uint32, tag = "1")]
    pub stage: u32,
    /// The partitions the Task reads (several when neighbours were coalesced).
    #[prost(uint32, repeated, tag = "2")]
    pub parts: Vec<u32>,
    /// The producer Tasks it reads them from; empty for every producer (a skewed partition
    /// split over several Tasks gives each a range of producers).
    #[prost(uint32, repeated, tag = "3")]
    pub tasks: Vec<u32>,
    /// The `tasks` are Tasks of this Stage (the reading Task's own), not of `stage`: the pieces
    /// of a split partition, each of which reduced its range of `stage`'s producers to partial
    /// aggregate states, which the reading Task merges into the partition's aggregate.
    #[prost(uint32, optional, tag = "4")]
    pub merged_from: Option<u32>,
}

/// The worker that holds the output of one Attempt.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OutputLocation {
    #[prost(message, optional, tag = "1")]
    pub key: Option<TaskKey>,
    #[prost(string, tag = "2")]
    pub worker_url: String,
    /// The Task never ran: its partitions were coalesced into a neighbour's, so its output is
    /// empty and there is nothing to fetch.
    #[prost(bool, tag = "3")]
    pub empty: bool,
    /// With `empty`: the Task's partition was split, and the outputs of these Tasks of its
    /// Stage, read one after the other, are its output.
    #[prost(uint32, repeated, tag = "4")]
    pub pieces: Vec<u32>,
}

/// Where an Attempt is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum TaskState {
    Queued = 0,
    Running = 1,
    Succeeded = 2,
    Failed = 3,
    Cancelled = 4,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled)
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskReport {
    #[prost(message, optional, tag = "1")]
    pub key: Option<TaskKey>,
    #[prost(string, tag = "2")]
    pub worker_id: String,
    #[prost(enumeration = "TaskState", tag = "3")]
    pub state: i32,
    #[prost(uint64, tag = "4")]
    pub rows: u64,
    #[prost(uint64, tag = "5")]
    pub bytes: u64,
    #[prost(uint64, tag = "6")]
    pub elapsed_ms: u64,
    #[prost(message, optional, tag = "7")]
    pub error: Option<RemoteError>,
    #[prost(uint64, tag = "8")]
    pub session: u64,
    /// Rows and bytes of each part of a succeeded Attempt's output (each shuffle partition).
    #[prost(uint64, repeated, tag = "9")]
    pub part_rows: Vec<u64>,
    #[prost(uint64, repeated, tag = "10")]
    pub part_bytes: Vec<u64>,
    /// The join keys of a succeeded build Task's output, when it was asked to summarize them.
    #[prost(message, optional, tag = "11")]
    pub key_summary: Option<KeySummaryMessage>,
    /// Rows its key filter saw and kept, when it had one.
    #[prost(uint64, tag = "12")]
    pub filter_rows_in: u64,
    #[prost(uint64, tag = "13")]
    pub filter_rows_kept: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

/// An error carried across the network with its kind (see [`super::ErrorKind`]): the receiver
/// decides by it whether running again can help.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RemoteError {
    #[prost(string, tag = "1")]
    pub kind: String,
    /// What a user reads, with its one prefix.
    #[prost(string, tag = "2")]
    pub message: String,
    /// For a failed fetch: the Attempt whose output could not be read.
    #[prost(message, optional, tag = "3")]
    pub output: Option<TaskKey>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReleaseQuery {
    #[prost(string, tag = "1")]
    pub query_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReleaseAttempt {
    #[prost(message, optional, tag = "1")]
    pub key: Option<TaskKey>,
}

/// The key filter of one Stage of a Query, for its Attempts already running.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StageKeyFilter {
    #[prost(string, tag = "1")]
    pub query_id: String,
    #[prost(uint32, tag = "2")]
    pub stage: u32,
    #[prost(message, optional, tag = "3")]
    pub filter: Option<KeyFilterSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct QueryProgressRequest {
    #[prost(string, tag = "1")]
    pub query_id: String,
}

/// How far a Query has got, counted in Tasks: what drives a client's progress bar.
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueryProgress {
    /// `running`, `succeeded`, `failed` or `cancelled`.
    #[prost(string, tag = "1")]
    pub state: String,
    #[prost(uint32, tag = "2")]
    pub tasks_total: u32,
    /// Tasks that have ended, whatever their end.
    #[prost(uint32, tag = "3")]
    pub tasks_done: u32,
    #[prost(uint32, tag = "4")]
    pub tasks_running: u32,
}

/// Ticket of a Task output, as served by the worker that produced it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OutputTicket {
    #[prost(message, optional, tag = "1")]
    pub key: Option<TaskKey>,
    /// The hash partition of a shuffle output; 0 for a gathered output.
    #[prost(uint32, tag = "2")]
    pub partition: u32,
}
