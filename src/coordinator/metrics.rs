//! The coordinator's Prometheus metrics: counters of what happened (queries and Task Attempts
//! by how they ended, rows and bytes produced, bytes shuffled, Task durations) and gauges of what
//! is (running queries, live workers, each worker's slots and memory).
//!
//! Counters are counted by `Cluster` at the events themselves, never recomputed from its query
//! history: that history is bounded, and a counter must never go down. Gauges of the workers are
//! read from the worker table at scrape time, so a lost worker simply stops being reported.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use super::cluster::WorkerRecord;

/// Upper bound of the smallest Task duration bucket.
const TASK_DURATION_FIRST_BUCKET_SECONDS: f64 = 0.001;
/// Each bucket's bound is twice the previous one: 1 ms … about 9 hours with 25 buckets.
const TASK_DURATION_BUCKET_FACTOR: f64 = 2.0;
const TASK_DURATION_BUCKETS: u16 = 25;

/// The content type of the OpenMetrics text format, which Prometheus scrapes.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabel {
    kind: &'static str,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

pub struct Metrics {
    registry: Registry,
    queries: Family<StateLabel, Counter>,
    queries_running: Gauge,
    task_attempts: Family<StateLabel, Counter>,
    task_retries: Family<RetryLabel, Counter>,
    speculative_attempts: Counter,
    speculative_wins: Counter,
    partitions_coalesced: Counter,
    partitions_split: Counter,
    slices_cut: Counter,
    slice_pieces: Counter,
    task_duration: Histogram,
    rows_processed: Counter,
    bytes_processed: Counter,
    bytes_shuffled: Counter,
    workers: Gauge,
    worker_slots: Family<WorkerLabel, Gauge>,
    worker_slots_in_use: Family<WorkerLabel, Gauge>,
    worker_memory_used: Family<WorkerLabel, Gauge>,
    worker_memory_limit: Family<WorkerLabel, Gauge>,
    /// Serialises scrapes: each one clears and refills the per-worker gauges.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let buckets = exponential_buckets(TASK_DURATION_FIRST_BUCKET_SECONDS, TASK_DURATION_BUCKET_FACTOR, TASK_DURATION_BUCKETS);
        let metrics = Self {
            registry: Registry::with_prefix("quiver"),
            queries: Family::default(),
            queries_running: Gauge::default(),
            task_attempts: Family::default(),
            task_retries: Family::default(),
            speculative_attempts: Counter::default(),
            speculative_wins: Counter::default(),
            partitions_coalesced: Counter::default(),
            partitions_split: Counter::default(),
            slices_cut: Counter::default(),
            slice_pieces: Counter::default(),
            task_duration: Histogram::new(buckets),
            rows_processed: Counter::default(),
            bytes_processed: Counter::default(),
            bytes_shuffled: Counter::default(),
            workers: Gauge::default(),
            worker_slots: Family::default(),
            worker_slots_in_use: Family::default(),
            worker_memory_used: Family::default(),
            worker_memory_limit: Family::default(),
            scrape: Mutex::new(()),
        };
        metrics.registered()
    }
}

impl Metrics {
    /// Registers every metric under the `quiver_` prefix (counters get their `_total` suffix
    /// from the encoder).
    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        r.register("queries", "Queries that ended, by final state", self.queries.clone());
        r.register("queries_running", "Queries running now", self.queries_running.clone());
        r.register("task_attempts", "Task Attempts that ran on a worker and ended, by final state", self.task_attempts.clone());
        r.register(
            "task_retries",
            "Task Attempts started again, by kind (retry or recompute) and by the cause that ended the Attempt before",
            self.task_retries.clone(),
        );
        r.register("speculative_attempts", "Speculative Attempts started beside a straggler", self.speculative_attempts.clone());
        r.register("speculative_wins", "Speculative Attempts that succeeded before their straggler", self.speculative_wins.clone());
        r.register("partitions_coalesced", "Shuffle partitions read by a neighbour's Task", self.partitions_coalesced.clone());
        r.register("partitions_split", "Skewed shuffle partitions read by several Tasks", self.partitions_split.clone());
        r.register("slices_cut", "Queued scan slices cut into pieces at dispatch", self.slices_cut.clone());
        r.register("slice_pieces", "Tasks that queued scan slices were cut into", self.slice_pieces.clone());
        r.register_with_unit(
            "task_duration",
            "Time from a Task Attempt's assignment to its end, as the coordinator saw it",
            Unit::Seconds,
            self.task_duration.clone(),
        );
        r.register("rows_processed", "Rows output by succeeded Task Attempts", self.rows_processed.clone());
        r.register("bytes_processed", "Bytes output by succeeded Task Attempts", self.bytes_processed.clone());
        r.register("bytes_shuffled", "Bytes output by succeeded Task Attempts into shuffles", self.bytes_shuffled.clone());
        r.register("workers", "Live workers", self.workers.clone());
        r.register("worker_slots", "Tasks a live worker runs at once", self.worker_slots.clone());
        r.register("worker_slots_in_use", "Tasks running on a live worker", self.worker_slots_in_use.clone());
        r.register("worker_memory_used_bytes", "Memory a live worker reported in use", self.worker_memory_used.clone());
        r.register("worker_memory_limit_bytes", "Memory budget of a live worker", self.worker_memory_limit.clone());
        self
    }

    pub(super) fn query_started(&self) {
        self.queries_running.inc();
    }

    pub(super) fn query_ended(&self, state: &'static str) {
        self.queries_running.dec();
        self.queries.get_or_create(&StateLabel { state }).inc();
    }

    /// An Attempt that ran on a worker ended after `ran` (assignment to end).
    /// Attempts that never reached a worker are not counted.
    pub(super) fn attempt_ended(&self, state: &'static str, ran: Option<Duration>) {
        let Some(ran) = ran else { return };
        self.task_attempts.get_or_create(&StateLabel { state }).inc();
        self.task_duration.observe(ran.as_secs_f64());
    }

    /// An Attempt beyond its Task's first was started: a `retry` (after a failure, a lost
    /// worker or a lost input) or a `recompute` (after a lost output), with the cause.
    pub(super) fn attempt_restarted(&self, kind: &'static str, cause: &'static str) {
        self.task_retries.get_or_create(&RetryLabel { kind, cause }).inc();
    }

    /// A speculative Attempt was started beside a straggler.
    pub(super) fn speculated(&self) {
        self.speculative_attempts.inc();
    }

    /// A Stage's shuffle reads were adapted.
    pub(super) fn adapted(&self, coalesced: u32, split: u32) {
        self.partitions_coalesced.inc_by(coalesced as u64);
        self.partitions_split.inc_by(split as u64);
    }

    /// A queued scan slice was cut into `pieces` Tasks.
    pub(super) fn slice_cut(&self, pieces: u32) {
        self.slices_cut.inc();
        self.slice_pieces.inc_by(pieces as u64);
    }

    /// A speculative Attempt's output won its Task.
    pub(super) fn speculation_won(&self) {
        self.speculative_wins.inc();
    }

    /// A succeeded Attempt's output.
    pub(super) fn attempt_output(&self, rows: u64, bytes: u64, shuffled: bool) {
        self.rows_processed.inc_by(rows);
        self.bytes_processed.inc_by(bytes);
        if shuffled {
            self.bytes_shuffled.inc_by(bytes);
        }
    }

    /// The text exposition of every metric, the worker gauges taken from `workers`.
    pub fn encode(&self, workers: &[WorkerRecord]) -> String {
        let _scrape = self.scrape.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.set_worker_gauges(workers);
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    fn set_worker_gauges(&self, workers: &[WorkerRecord]) {
        let families = [&self.worker_slots, &self.worker_slots_in_use, &self.worker_memory_used, &self.worker_memory_limit];
        families.iter().for_each(|f| f.clear());
        let alive: Vec<&WorkerRecord> = workers.iter().filter(|w| w.alive).collect();
        self.workers.set(alive.len() as i64);
        for w in alive {
            let label = WorkerLabel { worker: w.id.clone() };
            self.worker_slots.get_or_create(&label).set(i64::from(w.slots));
            self.worker_slots_in_use.get_or_create(&label).set(i64::from(w.running_tasks));
            self.worker_memory_used.get_or_create(&label).set(saturating_i64(w.memory_used_bytes));
            self.worker_memory_limit.get_or_create(&label).set(saturating_i64(w.memory_limit_bytes));
        }
    }
}

fn saturating_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}
