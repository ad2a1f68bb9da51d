//! Every limit Quiver enforces, in one place: message sizes, queue depths, timeouts, memory.
//! Units are part of the names so that a reader never has to guess.

use std::collections::BTreeMap;

use datafusion::common::config::{ConfigExtension, ConfigOptions};
use datafusion::common::extensions_options;
use datafusion::prelude::SessionConfig;

/// Where a coordinator listens unless told otherwise. Port 7050 is outside Linux's ephemeral
/// range (32768–60999): a default in that range was once held by a socket in TIME_WAIT, and
/// `quiver local` could not start.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7050";
/// Where clients and workers look for the coordinator unless told otherwise.
pub const DEFAULT_COORDINATOR_URL: &str = "http://127.0.0.1:7050";

/// Largest gRPC message either side accepts or sends (plans, batches, control messages).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Longest error message a gRPC status carries: it goes in HTTP/2 headers twice (as text and
/// in the typed details, base64), and peers refuse header lists much over 16 KiB.
pub const STATUS_MESSAGE_BYTES_MAX: usize = 4 * 1024;
/// Join key filters across Stages (`planner::key_filter`): a build Task summarizes its join
/// keys as a Bloom filter of this many bits (1 MiB)…
pub const KEY_SUMMARY_BITS: usize = 1 << 23;
/// …or, while it has at most this many distinct keys, as their hashes (at most 1 MiB).
pub const KEY_SUMMARY_HASHES_MAX: usize = 1 << 17;
/// The filter a probe Stage gets has this many bits per build key (about 3% false positives
/// with its three hash functions), at least `KEY_FILTER_BITS_MIN` and at most `KEY_SUMMARY_BITS`.
pub const KEY_FILTER_BITS_PER_KEY: usize = 8;
pub const KEY_FILTER_BITS_MIN: usize = 1 << 10;
/// A filter with more of its bits set than this lets most absent keys through: it is not sent.
pub const KEY_FILTER_DENSITY_MAX: f64 = 0.75;
/// A probe Task stops applying a filter that kept more than this fraction of the first
/// `KEY_FILTER_SAMPLE_ROWS` rows it saw.
pub const KEY_FILTER_KEEP_FRACTION_MAX: f64 = 0.9;
pub const KEY_FILTER_SAMPLE_ROWS: u64 = 1 << 17;
/// Bytes of key filters a worker keeps for Stages none of its Attempts waits on yet (one that
/// arrived just before the Attempt it is for started); beyond it such a filter is dropped and
/// that Attempt filters nothing.
pub const LATE_FILTER_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How many producer outputs a shuffle reader fetches at once.
pub const EXCHANGE_FETCHES_MAX: usize = 8;
/// HTTP/2 receive windows: how much of a batch stream may be in flight unread.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
/// Connection window of the connections that fetch Task outputs: HTTP/2's maximum, so that only
/// per-stream windows ever hold a sender back (unread outputs must not block read ones).
pub const HTTP2_DATA_CONNECTION_WINDOW_BYTES: u32 = (1 << 31) - 1;
/// Workers a process keeps a connection to; beyond it the pool starts over.
pub const WORKER_CONNECTIONS_MAX: usize = 1024;
/// How long a worker's task poll waits at the coordinator for a Task before answering "none".
pub const TASK_POLL_WAIT_MS: u64 = 500;
/// A Query of at most this many Tasks is small: its Attempts may run on workers' express slots
/// (`WorkerConfig::express_slots`), beside a large Query's Tasks instead of behind them.
pub const EXPRESS_QUERY_TASKS_MAX: usize = 4;
/// Most Tasks one poll takes (batched dispatch: one per free slot of the polling worker).
pub const POLL_TASKS_MAX: usize = 64;
/// How often a worker tells the coordinator it is alive.
pub const HEARTBEAT_INTERVAL_MS: u64 = 500;
/// A worker watches for its process being held off the CPU (see `worker::stalls`) by sleeping
/// ticks of this length...
pub const STALL_TICK_MS: u64 = 10;
/// ...and counts a tick as stalled when it woke more than this late: scheduling jitter on a
/// busy host stays under it, a stopped or CPU-throttled process does not.
pub const STALL_LATE_MS: u64 = 20;
/// A heartbeat's stalls count towards its worker's stall pace only when Attempts ran for at least this
/// much of its interval: an idle worker's stalls say nothing of how it runs Tasks.
pub const STALL_SAMPLE_BUSY_MIN_MS: u64 = HEARTBEAT_INTERVAL_MS / 2;
/// A Task the coordinator assigned must show up in its worker's heartbeats within this time;
/// otherwise the assignment (or the Task's report) was lost, and it runs again elsewhere.
pub const ASSIGNMENT_ACK_TIMEOUT_MS: u64 = 5_000;
/// A worker whose heartbeat is this late is probed: if its port refuses connections, its
/// process is gone and it is declared lost at once, without waiting for `WORKER_TIMEOUT_MS`.
pub const HEARTBEAT_OVERDUE_MS: u64 = 2 * HEARTBEAT_INTERVAL_MS;
/// A worker silent for this long is declared lost: its running Attempts are retried elsewhere
/// and its outputs that are still needed are recomputed.
pub const WORKER_TIMEOUT_MS: u64 = 3_000;
/// Attempts of one Task that may fail (or lose their output) before its Query fails with the
/// last one's error. Retried causes: a lost or unreachable worker, an unreadable input, I/O,
/// memory. A failure that running again cannot fix fails the Query at once.
pub const TASK_ATTEMPTS_MAX: u32 = 4;
/// Attempts one Query may start beyond each Task's first (retries and recomputations).
pub const QUERY_RETRIES_MAX: u32 = 1_000;
/// Pause before a failed Task's next Attempt; doubles with each failure of the Task.
pub const RETRY_BACKOFF_MS: u64 = 100;
pub const RETRY_BACKOFF_MAX_MS: u64 = 2_000;
/// Bytes of Task output parts the final Stage holds back until each part is read whole, over
/// all Queries: a part lost half-way through is then read again from a recomputed Attempt
/// without a row reaching the client twice. A part that finds the budget spent streams through,
/// and its loss half-way fails the Query.
pub const FINAL_HOLD_BYTES: u64 = 256 * 1024 * 1024;
/// Attempts a worker remembers having been told to stop, so that one whose assignment crossed
/// the stop on the wire leaves no output behind.
pub const RELEASED_ATTEMPTS_MAX: usize = 16_384;
/// Pause between a worker's attempts to reach a coordinator that is not up yet.
pub const REGISTER_RETRY_MS: u64 = 250;
/// How many times a worker retries a Task report the coordinator did not acknowledge (with
/// doubling pauses from `REGISTER_RETRY_MS`).
pub const REPORT_RETRIES_MAX: u32 = 4;
/// HTTP/2 keepalive pings on every connection, so that a peer that stops answering without
/// closing its socket is noticed instead of waited on forever.
pub const HTTP2_KEEPALIVE_INTERVAL_MS: u64 = 10_000;
pub const HTTP2_KEEPALIVE_TIMEOUT_MS: u64 = 20_000;
/// Longest wait for the answer to a control call between cluster members (a heartbeat, a poll,
/// a report, a release, the start of an output fetch): a peer cut off the network is given up
/// on after this, not after TCP's own timeouts.
pub const CONTROL_CALL_TIMEOUT_MS: u64 = 10_000;
/// Timeout for connecting to a peer (worker → coordinator, coordinator → worker).
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Lost workers `quiver.workers` keeps listing; older ones are forgotten.
pub const LOST_WORKERS_MAX: usize = 256;
/// How many released Query ids a worker remembers, to drop outputs of Tasks that finish late.
pub const RELEASED_QUERIES_MAX: usize = 4096;
/// How many Queries a worker lists in a heartbeat as holding outputs or Attempts of, so the
/// coordinator can name those that ended while their release could not reach it.
pub const HELD_QUERIES_REPORTED_MAX: usize = 256;
/// How long a worker's answer to a Query's release waits for the Query's Attempts to stop: a
/// write's commit waits for that answer, so that no Attempt writes behind it.
pub const RELEASE_WAIT_MS: u64 = 2_000;
/// How often that wait looks again.
pub const RELEASE_POLL_MS: u64 = 2;
/// How long a committing write waits for the answers to its Query's release.
pub const STOP_ATTEMPTS_WAIT_MS: u64 = 3_000;

/// Removals of files a DROP or REPLACE took out of the catalog that may wait for the Queries
/// still reading them (`coordinator::retired`); past it, files are removed at once.
pub const RETIRED_REMOVALS_MAX: usize = 1024;
/// How long the coordinator trusts a table's file listing: files added to a table's directory
/// or object-store prefix show within this time, or at once after `REFRESH TABLE t`.
pub const LIST_FILES_CACHE_TTL_MS: u64 = 30_000;
/// How many finished queries `quiver.queries` / `quiver.tasks` remember.
pub const QUERY_HISTORY_MAX: usize = 1_000;
/// Finished queries `GET /api/queries` lists when the request sets no `limit` (running queries
/// are always listed).
pub const WEB_RECENT_QUERIES_DEFAULT: usize = 100;
/// How long stopping the web server waits for requests in flight before dropping them.
pub const WEB_SHUTDOWN_WAIT_MS: u64 = 2_000;
/// How many Tasks the coordinator's queue may hold when a Query is submitted, counting every
/// Task of the new Query's Stages (a Query larger than this is refused even on an idle
/// cluster). It bounds admission, not the queue itself: the later Stages of Queries already
/// admitted, their retries, speculative Attempts and slice pieces are queued beyond it.
pub const TASK_QUEUE_MAX: usize = 100_000;
/// How long a started statement's result waits for its client's `DoGet` before the Query is
/// cancelled (a client that asked for a `FlightInfo` and went away).
pub const RESULT_CLAIM_TIMEOUT_MS: u64 = 60_000;
/// How many started results may wait for their `DoGet` at once.
pub const RESULTS_WAITING_MAX: usize = 256;
/// How many prepared statements the coordinator holds at once, over all clients.
pub const PREPARED_STATEMENTS_MAX: usize = 1_024;
/// A prepared statement unused this long is closed for its client.
pub const PREPARED_STATEMENT_IDLE_MS: u64 = 3_600_000;

/// Coalescing never makes a Task's target smaller than this, however many slots share the data:
/// below it, a Task's fixed cost outweighs what one more slot would save.
pub const COALESCE_TASK_MIN_BYTES: u64 = 1024 * 1024;

/// A worker whose reported memory use is over this fraction of its limit takes no new Task while
/// another live worker has a free slot and memory to spare.
pub const MEMORY_NEARLY_FULL_FRACTION: f64 = 0.9;

/// A scan slice cut at dispatch (dynamic granularity) becomes at most this many pieces.
pub const SLICE_PIECES_MAX: u32 = 8;

/// How often the coordinator looks for stragglers to speculate on, besides on every report.
pub const SPECULATION_CHECK_INTERVAL_MS: u64 = 50;

extensions_options! {
    /// Quiver's own settings, switchable with `SET quiver.<name> = <value>` like DataFusion's.
    pub struct QuiverOptions {
        /// Speculation: a Task running much longer than the finished Tasks of its Stage gets a
        /// second Attempt on another worker; the first to succeed wins.
        pub speculation: bool, default = true
        /// Speculate only once this fraction of a Stage's Tasks has finished.
        pub speculation_quantile: f64, default = 0.75
        /// A Task is slow when it has run this many times the median finished Task of its Stage…
        pub speculation_multiplier: f64, default = 1.5
        /// …and at least this long: short Stages are never worth a second Attempt.
        pub speculation_min_runtime_ms: u64, default = 100
        /// At most this fraction of a Stage's Tasks (and at least one) get a speculative Attempt.
        pub speculation_max_fraction: f64, default = 0.25
        /// A Stage with too few finished Tasks to measure a Task by, and none left waiting for
        /// a slot (one of a single Task, say), has little to compare with: a Task of it is slow
        /// once it has run this long (and `speculation_multiplier` times what did finish), after
        /// Spark's `spark.speculation.task.duration.threshold`. 0: never.
        pub speculation_lone_task_ms: u64, default = 10_000
        /// Slow-worker placement: a worker whose Attempts take longer than their Stages' medians
        /// by more than `slow_worker_pace` (an average over its recent Attempts) takes a Task
        /// only when there are more ready than the faster workers' slots would clear in the
        /// time it runs one (slots × pace, after LATE).
        pub slow_worker_placement: bool, default = true
        pub slow_worker_pace: f64, default = 2.0
        /// Slow-worker placement counts how much of a worker's busy time its process was held
        /// off the CPU (`cpulimit`, a cgroup quota; `quiver.workers.stalled_pct`) when that is
        /// slower than what its Attempts' times say. (Only placement: `quiver.workers.pace`
        /// always counts the stalls.) Off by default: in `quiver bench straggler` it gained
        /// nothing measurable over Attempt paces (1.02–1.09x of two healthy workers either way).
        pub slow_worker_stalls: bool, default = false
        /// Coalescing: once a Stage's shuffled inputs have finished, neighbouring small
        /// partitions are read by one Task, up to `coalesce_target_bytes` (lowered to the
        /// data's share of one slot, so no slot the planned Tasks would use goes idle).
        pub coalesce_partitions: bool, default = true
        pub coalesce_target_bytes: u64, default = 64 * 1024 * 1024
        /// Skew splitting: a partition over `skew_factor` times its side's median and over
        /// `skew_min_bytes` is read by several Tasks, each over a range of its producers, where
        /// the join above lets that side be cut, or (under a final aggregate) each piece reduces
        /// its range to partial states that the partition's own Task merges.
        pub skew_split: bool, default = true
        pub skew_factor: f64, default = 5.0
        pub skew_min_bytes: u64, default = 32 * 1024 * 1024
        /// Dynamic granularity: a slot that takes a scan slice over twice its fair share of
        /// what the Stage still has to read (queued, and left to its running slices) takes a
        /// piece of it, the other pieces stay queued;
        /// no piece is cut below `slice_piece_min_bytes`.
        pub dynamic_granularity: bool, default = true
        pub slice_piece_min_bytes: u64, default = 8 * 1024 * 1024
        /// Join key filters: the probe Stage of a join between two Stages starts after the
        /// build Stage and drops the rows whose keys the build side does not hold.
        pub join_key_filters: bool, default = true
        /// The probe Stage waits for the build Stage, so that all its Tasks filter; off, a
        /// slot with nothing else to do takes probe Tasks early, and they filter only the rows
        /// they output after the filter reaches them. On a single host the two measured even
        /// (TPC-H SF1); off shuffles more bytes (q03: 46.6 MB against 4.8).
        pub join_key_filter_wait: bool, default = true
        /// Scalar subqueries run beside the Query that reads them: its Stages that read no
        /// value start at once, the others once the values are in. Off: they run before it.
        /// (Beside, whether the Query is small enough to run on the coordinator is judged by
        /// its files' sizes: row-group pruning would need the values.)
        pub overlap_subqueries: bool, default = true
    }
}

impl ConfigExtension for QuiverOptions {
    const PREFIX: &'static str = "quiver";
}

/// How the distributed planner cuts leaf Stages into Tasks.
#[derive(Debug, Clone)]
pub struct PlannerConfig {
    /// Tasks per worker slot a leaf Stage aims for (over-subscription lets fast workers take more).
    pub tasks_per_slot: usize,
    /// A Task reads at least this many bytes of input, unless a file is smaller.
    pub task_min_bytes: u64,
    /// Upper bound on Tasks in one Stage.
    pub tasks_per_stage_max: usize,
    /// A plan whose scans read at most this many bytes (its table files' sizes, or the caller's
    /// count after row-group pruning) runs on the coordinator alone: distributing it would cost
    /// more in round trips than its few Tasks could save. 0: never.
    pub small_query_max_bytes: u64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self { tasks_per_slot: 2, task_min_bytes: 16 * 1024 * 1024, tasks_per_stage_max: 4096, small_query_max_bytes: 4 * 1024 * 1024 }
    }
}

impl PlannerConfig {
    /// Settings that cut even tiny tables into many Tasks; tests use them to exercise the merge.
    pub fn many_small_tasks() -> Self {
        Self { tasks_per_slot: 8, task_min_bytes: 1, tasks_per_stage_max: 4096, small_query_max_bytes: 0 }
    }
}

/// Settings a coordinator starts with.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub planner: PlannerConfig,
    /// Row-group size of Parquet files written by CREATE TABLE AS / INSERT.
    pub write_row_group_rows: usize,
    /// DataFusion's partition count for the parts of a query that run on the coordinator.
    pub target_partitions: usize,
    /// Queued Attempts go to the Query with the fewest running; off: first queued first.
    pub fair_share: bool,
    /// Most Tasks one worker poll takes (batched dispatch); 1: one per poll.
    pub poll_tasks_max: usize,
    /// Where table files may be read and written (every path on an open coordinator).
    pub allowed_paths: crate::auth::AllowedPaths,
    /// Options every object store takes unless a table's `OPTIONS` say otherwise.
    pub store_defaults: crate::storage::StoreDefaults,
    /// The object store prefix (`s3://bucket/warehouse`) tables Quiver writes (CREATE TABLE,
    /// INSERT) keep their files under; None: the data directory.
    pub warehouse: Option<String>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            planner: PlannerConfig::default(),
            write_row_group_rows: 1024 * 1024,
            target_partitions: default_parallelism(),
            fair_share: true,
            poll_tasks_max: POLL_TASKS_MAX,
            allowed_paths: crate::auth::AllowedPaths::any(),
            store_defaults: crate::storage::StoreDefaults::default(),
            warehouse: None,
        }
    }
}

/// How a worker compresses the Task outputs it sends to other workers and to the coordinator
/// (Arrow IPC buffer compression; the reader decompresses whatever it is sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ShuffleCompression {
    /// Buffers go as they are: on one host, or a fast network, compressing only costs CPU.
    #[default]
    None,
    /// LZ4 frames: cheap to compress and decompress.
    Lz4,
    /// Zstandard: smaller, at more CPU.
    Zstd,
}

/// Settings a worker starts with.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Tasks this worker runs at once.
    pub slots: usize,
    /// Slots beyond `slots` for the Tasks of small Queries only (the express lane): a small
    /// Query's latency does not depend on how long a large one's Tasks take. 0: none.
    pub express_slots: usize,
    /// Memory budget for executing Tasks and holding their outputs; outputs beyond it spill.
    pub memory_limit_bytes: u64,
    /// `HOST:PORT` the coordinator and the other workers reach this worker at, when that is not
    /// the address it listens on (it listens on 0.0.0.0, behind NAT, in a container).
    pub advertise: Option<String>,
    /// Compression of the Task outputs it serves.
    pub shuffle_compression: ShuffleCompression,
    /// Whether readers in its own process (`quiver local`'s coordinator and other workers)
    /// read its Task outputs directly instead of over Flight. Off only to measure the gain or
    /// to test the network path in one process.
    pub in_process_reads: bool,
    /// Each Attempt waits this long before it starts: a worker made slow on purpose, the same
    /// on any machine and under any load (unlike `cpulimit`), for tests and benchmarks of
    /// stragglers. The wait can be cancelled like the Attempt. 0 (the default): none.
    pub task_delay_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            slots: default_parallelism(),
            express_slots: 1,
            memory_limit_bytes: 2 * 1024 * 1024 * 1024,
            advertise: None,
            shuffle_compression: ShuffleCompression::None,
            in_process_reads: true,
            task_delay_ms: 0,
        }
    }
}

pub fn default_parallelism() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

/// DataFusion settings shared by the coordinator, the workers and the single-node reference, so
/// that distributed and single-node results are computed by the same rules.
pub fn session_config(target_partitions: usize) -> SessionConfig {
    let mut config = SessionConfig::new()
        .with_target_partitions(target_partitions.max(1))
        .with_information_schema(true)
        .with_option_extension(QuiverOptions::default());
    let options = config.options_mut();
    // Partitions of one scan run in different processes: a partition must read exactly its own
    // files, never steal a sibling's (that duplicates rows across workers).
    options.execution.enable_file_stream_work_stealing = false;
    config
}

/// Execution settings that are the worker's own, whatever a session says: the scan partitions a
/// Task was planned with, and no file-stream work stealing (see [`session_config`]).
const WORKER_EXECUTION_OPTIONS: [&str; 2] = ["datafusion.execution.target_partitions", "datafusion.execution.enable_file_stream_work_stealing"];

/// The session's `datafusion.execution.*` settings that differ from [`session_config`]'s: what
/// a worker must apply for a Task to execute as it would on one node (batch size, partial
/// aggregation skipping, spilling, Parquet reading, time zone). Planning settings are not sent:
/// the coordinator has already planned.
pub fn execution_options(session: &ConfigOptions) -> BTreeMap<String, String> {
    let defaults: BTreeMap<String, Option<String>> = session_config(1).options().entries().into_iter().map(|e| (e.key, e.value)).collect();
    session
        .entries()
        .into_iter()
        .filter(|e| e.key.starts_with("datafusion.execution.") && !WORKER_EXECUTION_OPTIONS.contains(&e.key.as_str()))
        .filter(|e| defaults.get(&e.key) != Some(&e.value))
        .filter_map(|e| Some((e.key, e.value?)))
        .collect()
}

/// `config` with a Task's [`execution_options`] applied; an option outside
/// `datafusion.execution.`, one of the worker's own, or a bad value is an error.
pub fn apply_execution_options(config: &mut SessionConfig, options: &BTreeMap<String, String>) -> datafusion::common::Result<()> {
    for (key, value) in options {
        if !key.starts_with("datafusion.execution.") || WORKER_EXECUTION_OPTIONS.contains(&key.as_str()) {
            return datafusion::common::plan_err!("a task may not set {key}");
        }
        config.options_mut().set(key, value)?;
    }
    Ok(())
}

/// Parses sizes such as `2GiB`, `512MiB`, `100MB`, `1024`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid size '{text}'"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => return Err(format!("unknown size unit '{other}' in '{text}'")),
    };
    Ok((value * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_with_units() {
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert_eq!(parse_bytes("1.5kib").unwrap(), 1536);
        assert!(parse_bytes("12 parsecs").is_err());
    }

    #[test]
    fn session_config_disables_file_stream_work_stealing() {
        let config = session_config(4);
        assert!(!config.options().execution.enable_file_stream_work_stealing);
    }
}
