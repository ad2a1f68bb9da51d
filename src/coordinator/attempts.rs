//! The life of one Query's Task Attempts, as a pure state machine.
//!
//! Events come in — an Attempt was assigned, its worker reported on it, its worker was lost or
//! never acknowledged it, an output could not be read, the final Stage read a part, the Query
//! ended — and [`QueryRun`] answers with [`Action`]s for its caller to carry out: queue an
//! Attempt, stop one on its worker, tell the final Stage what to read, fail the Query. It holds
//! no lock, does no I/O and reads no clock (callers pass `now`), so every path is unit-tested
//! without a network. Retry decisions come from [`super::policy`].
//!
//! Every Attempt is kept, superseded and failed ones included. A Task has at most one *output*:
//! the succeeded Attempt whose output consumers read, for as long as its worker holds it.
//! Consumers are told which Attempt to read, so a late, duplicate or stale Attempt never adds
//! or drops rows. After each event, [`QueryRun::schedule`] starts an Attempt for every Task
//! that is *needed*, has no output and no live Attempt, and whose input Stages all have
//! outputs. A Task is needed while the final Stage has not read all of its parts, or while a
//! Task of a Stage that reads it needs to run: so a lost output is recomputed only if someone
//! still has to read it, and its producers in turn only if they are lost too.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::policy::SlowPace;
use super::{granularity, layout, policy};
use crate::planner::{KeyFilter, SummaryForm};
use crate::protocol::{ErrorKind, KeyFilterSpec, OutputLocation, QuiverError, ShuffleRead, SlicePiece, TaskKey, TaskState};

mod adapt;
mod slices;
mod weights;
pub use adapt::StageReads;

/// A Task by (Stage, index).
pub type TaskId = (u32, u32);

/// What the final Stage should read for a Task.
#[derive(Debug, Clone)]
pub enum TaskOutcome {
    Succeeded { key: TaskKey, worker_url: String },
    /// The Task never runs: its partitions were coalesced into another Task's read.
    Empty,
    /// The Task never runs: its skewed partition is read by these Tasks (of its Stage), whose
    /// outputs together are its output.
    Pieces(Vec<TaskId>),
    Failed(QuiverError),
}

/// Why an Attempt was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartedAs {
    /// The Task's first Attempt.
    First,
    /// After an Attempt of the Task failed, was lost with its worker or read a lost input.
    Retry,
    /// After the output of a succeeded Attempt was lost and is still needed.
    Recompute,
    /// Beside a live Attempt that runs much longer than its Stage's finished Tasks took.
    Speculative,
}

impl StartedAs {
    pub fn as_str(self) -> &'static str {
        match self {
            StartedAs::First => "first",
            StartedAs::Retry => "retry",
            StartedAs::Recompute => "recompute",
            StartedAs::Speculative => "speculative",
        }
    }
}

/// Why an Attempt ended without success, or why its output stopped being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// It failed with an error of this kind.
    Error(ErrorKind),
    /// Its worker was lost while it ran.
    WorkerLost,
    /// Its worker never listed it as held: the assignment or the final report was lost.
    Unacknowledged,
    /// An output it reads was lost; it runs again once that output is recomputed.
    InputLost,
    /// It succeeded, then its output was lost (its worker died, or it could not be read).
    OutputLost,
    /// Another Attempt of the same Task succeeded first.
    Superseded,
    /// Its Query ended (succeeded, failed or cancelled) before it did.
    QueryEnded,
    /// A speculative Attempt still queued when the Attempt it raced ended without an output:
    /// the Task runs again as a retry instead.
    RaceEnded,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Error(kind) => kind.as_str(),
            Cause::WorkerLost => "worker_lost",
            Cause::Unacknowledged => "unacknowledged",
            Cause::InputLost => "input_lost",
            Cause::OutputLost => "output_lost",
            Cause::Superseded => "superseded",
            Cause::QueryEnded => "query_ended",
            Cause::RaceEnded => "race_ended",
        }
    }
}

/// One Attempt as `quiver.tasks`, the web UI and the API show it.
#[derive(Debug, Clone)]
pub struct TaskRecord {
    pub key: TaskKey,
    pub worker_id: Option<String>,
    pub plan: String,
    /// How the Task's output is read: "shuffle" or "gather".
    pub output: &'static str,
    pub state: TaskState,
    pub started_as: StartedAs,
    /// Why it ended without success or why its output is no longer read; None otherwise.
    pub cause: Option<Cause>,
    pub rows: u64,
    pub bytes: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
    /// When the coordinator assigned the Attempt to its worker.
    pub started: Option<SystemTime>,
    /// When the Attempt ended.
    pub ended: Option<SystemTime>,
    /// What it reads when its shuffle reads were adapted, e.g. "partitions 0-3" or
    /// "partition 5 of stage 1, producers 0-3 (piece 1 of 3)"; None when read as planned.
    pub reads: Option<String>,
    /// The kind of slot it ran in, "regular" or "express" (a small Query's lane); None before
    /// a worker took it.
    pub lane: Option<&'static str>,
    /// Rows its join key filter saw and kept, as last reported; None when its Stage has none.
    pub key_filter_rows: Option<(u64, u64)>,
    /// Its Task's work in units of a typical Task of its Stage (see `TaskRun::work`): what
    /// speculation and worker paces measure its time against.
    pub work: f64,
}

impl TaskRecord {
    /// An Attempt no worker has taken yet.
    fn unassigned(key: TaskKey, plan: &str, shuffle: bool, state: TaskState, started_as: StartedAs, cause: Option<Cause>) -> Self {
        Self {
            key,
            worker_id: None,
            plan: plan.to_string(),
            output: if shuffle { "shuffle" } else { "gather" },
            state,
            started_as,
            cause,
            rows: 0,
            bytes: 0,
            elapsed_ms: 0,
            error: None,
            started: None,
            ended: None,
            reads: None,
            lane: None,
            key_filter_rows: None,
            work: 1.0,
        }
    }
}

/// An Attempt waiting for a worker.
#[derive(Debug, Clone)]
pub struct QueuedAttempt {
    pub key: TaskKey,
    pub plan: Arc<Vec<u8>>,
    pub partition: u32,
    /// Where the outputs it reads are: one entry per producer Task.
    pub inputs: Arc<Vec<OutputLocation>>,
    /// Not before this instant (a retry's backoff).
    pub ready_at: Instant,
    /// Workers where its Task failed before: another takes it when one can.
    pub avoid: Vec<String>,
    /// A speculative Attempt: never runs on a worker it avoids, and waits behind other Attempts.
    pub speculative: bool,
    /// A worker slower than this pace takes it only when the faster ones have no free slot for
    /// it (see `policy::leave_to_faster_workers`); None: any worker takes it.
    pub slow_pace: Option<SlowPace>,
    /// Adapted shuffle reads (coalesced or split partitions); empty: read as planned.
    pub reads: Arc<Vec<ShuffleRead>>,
    /// The piece of its plan's scan slice it reads; None: the whole slice.
    pub slice: Option<SlicePiece>,
}

/// What the caller must do after an event.
#[derive(Debug)]
pub enum Action {
    Queue(QueuedAttempt),
    /// Stop the Attempt on its worker if it runs, and free its outputs there.
    Stop { key: TaskKey, worker_url: String },
    /// What the final Stage should read for a Task now: an output, or nothing yet.
    Publish { task: TaskId, outcome: Option<TaskOutcome> },
    /// The Query failed with this error.
    Fail(QuiverError),
    /// An Attempt ended; `ran` is the time from its assignment, and `worker` the worker it
    /// was assigned to, when it was assigned; `express` when it ran on an express slot.
    Ended { state: TaskState, ran: Option<Duration>, worker: Option<String>, express: bool },
    /// An Attempt on `worker` took `ratio` times the median time of its Stage's finished
    /// Tasks: how fast that worker is. `at_least`: it was beaten and stopped after running
    /// that long, so it would have taken longer. `read_from`: the other workers whose outputs
    /// it read (it may have spent its time waiting on them).
    Paced { worker: String, ratio: f64, at_least: bool, read_from: Vec<String> },
    /// An Attempt succeeded with this output.
    Output { rows: u64, bytes: u64, shuffle: bool },
    /// An Attempt beyond its Task's first was started, after an Attempt that ended for `cause`.
    Restarted { started_as: StartedAs, cause: Cause },
    /// A speculative Attempt was queued beside a straggler.
    Speculated,
    /// A speculative Attempt succeeded before the Attempt it was started beside.
    SpeculationWon,
    /// A Stage's shuffle reads were adapted: `coalesced` partitions were read by a neighbour's
    /// Task, and `split` skewed partitions were cut over several Tasks.
    Adapted { coalesced: u32, split: u32 },
    /// A queued scan slice was cut into `pieces` Tasks (dynamic granularity).
    SliceCut { pieces: u32 },
    /// Stage `stage`'s key filter was decided while Attempts of it ran on these workers: they
    /// apply it to the rest of their output.
    KeyFilter { stage: u32, filter: Arc<KeyFilterSpec>, worker_urls: Vec<String> },
}

/// A Task to be run: its Stage and index, the partition it computes, summary and plan.
pub struct NewTask {
    pub stage: u32,
    pub task: u32,
    pub partition: u32,
    pub summary: String,
    pub plan: Vec<u8>,
    /// The bytes of its scan slice when it may be cut into pieces at dispatch; None: never.
    pub slice_bytes: Option<u64>,
}

/// A Stage to be run: the Stages it reads (they run first) and its Tasks.
#[derive(Default)]
pub struct NewStage {
    pub inputs: Vec<u32>,
    pub shuffle: bool,
    /// Parts each Task's output has: the shuffle's partitions, or 1.
    pub parts: u32,
    pub tasks: Vec<NewTask>,
    /// The shuffle reads its Tasks may adapt once its inputs have finished; None: as planned.
    pub adaptive: Option<StageReads>,
    /// The output columns its Tasks summarize: the build side of a join key filter.
    pub key_summary: Vec<u32>,
    /// The build Stage whose join keys filter its output (it runs first), and its key columns.
    pub key_filter: Option<(u32, Vec<u32>)>,
    /// Its Tasks read scalar subquery values still being computed: their plans (empty here)
    /// come with [`QueryRun::release`], and none of them runs before.
    pub held: bool,
}

/// A worker's report on an Attempt.
pub struct Report {
    pub key: TaskKey,
    pub worker_id: String,
    pub state: TaskState,
    pub rows: u64,
    pub bytes: u64,
    pub elapsed_ms: u64,
    pub error: Option<QuiverError>,
    /// Rows and bytes of each output part of a succeeded Attempt.
    pub part_rows: Vec<u64>,
    pub part_bytes: Vec<u64>,
    /// The join keys of a build Task's output.
    pub key_summary: Option<SummaryForm>,
    /// Rows its key filter saw and kept.
    pub filter_rows: (u64, u64),
}

/// What one Stage did, for EXPLAIN ANALYZE and the web UI.
#[derive(Debug, Clone)]
pub struct StageMetrics {
    pub stage: u32,
    /// The Stages whose outputs it reads.
    pub inputs: Vec<u32>,
    /// How its output is read: "shuffle" or "gather".
    pub output: &'static str,
    pub tasks: usize,
    /// Tasks with a succeeded Attempt.
    pub tasks_done: usize,
    /// Rows and bytes of each Task's counted Attempt (the one read, or the last to succeed).
    pub rows: u64,
    pub bytes: u64,
    /// From the first Attempt's assignment to the last one's end.
    pub elapsed_ms: u64,
    /// A shuffle's output per partition, summed over the counted Attempts (empty for a
    /// gather): how evenly the consumer Stage's Tasks are loaded.
    pub partition_rows: Vec<u64>,
    pub partition_bytes: Vec<u64>,
    /// Adaptive scheduling in this Stage: partitions read by a neighbour's Task, skewed
    /// partitions split, speculative Attempts started.
    pub coalesced: u32,
    pub split: u32,
    pub speculated: u32,
    /// Scan slices cut into pieces at dispatch, and the pieces they became.
    pub slices_cut: u32,
    pub slice_pieces: u32,
    /// Rows its counted Attempts' join key filters saw and kept; None without a filter.
    pub key_filter_rows: Option<(u64, u64)>,
}

struct Attempt {
    record: TaskRecord,
    /// Rows and bytes of each output part, once succeeded.
    part_rows: Vec<u64>,
    part_bytes: Vec<u64>,
    worker_url: Option<String>,
    inputs: Arc<Vec<OutputLocation>>,
    assigned_at: Option<Instant>,
    ended_at: Option<Instant>,
    /// It runs on one of its worker's express slots.
    express: bool,
}

impl Attempt {
    fn is_live(&self) -> bool {
        !self.record.state.is_final()
    }

    /// Ends the Attempt (only the first end counts); returns the metrics event.
    fn end(&mut self, state: TaskState, cause: Option<Cause>, error: Option<&str>, now: Instant) -> Option<Action> {
        if !self.is_live() {
            return None;
        }
        self.record.state = state;
        self.record.cause = cause;
        if let Some(error) = error {
            self.record.error = Some(error.to_string());
        }
        self.record.ended = Some(SystemTime::now());
        self.ended_at = Some(now);
        let ran = self.assigned_at.map(|at| now.saturating_duration_since(at));
        let worker = ran.and(self.record.worker_id.clone());
        Some(Action::Ended { state, ran, worker, express: self.express })
    }

    /// The worker of an assigned Attempt, how long it has run by `now`, and the other workers
    /// it read outputs from.
    fn pace_sample(&self, now: Instant, at_least: bool) -> Option<PaceSample> {
        let own = self.worker_url.as_deref();
        let mut read_from: Vec<String> = self.inputs.iter().map(|l| &l.worker_url).filter(|url| Some(url.as_str()) != own && !url.is_empty()).cloned().collect();
        read_from.sort();
        read_from.dedup();
        let ran = now.saturating_duration_since(self.assigned_at?);
        Some(PaceSample { worker: self.record.worker_id.clone()?, ran, at_least, read_from })
    }

    fn reads(&self, output: &TaskKey) -> bool {
        self.inputs.iter().any(|l| l.key.as_ref() == Some(output))
    }
}

/// How long an Attempt ran, for its worker's pace (see `Action::Paced`).
struct PaceSample {
    worker: String,
    ran: Duration,
    at_least: bool,
    read_from: Vec<String>,
}

struct TaskRun {
    plan: Arc<Vec<u8>>,
    partition: u32,
    summary: String,
    attempts: Vec<Attempt>,
    /// The Attempt whose output consumers read, while its worker holds it.
    output: Option<u32>,
    /// Attempts that failed, were lost with their worker or lost their output: the retry limit
    /// counts these (not Attempts stopped because an input was lost, nor superseded ones).
    failures: u32,
    last_error: Option<QuiverError>,
    /// Parts the final Stage has read whole, and from which Attempt.
    parts_read: BTreeMap<u32, u32>,
    avoid: BTreeSet<String>,
    /// Its adapted shuffle reads, and how `quiver.tasks` describes them.
    reads: Arc<Vec<ShuffleRead>>,
    reads_text: Option<String>,
    /// Never runs: its partitions are read by another Task of its Stage, or by `pieces`.
    absorbed: bool,
    /// The Tasks of its Stage whose outputs together are its output (its partition was split,
    /// or its scan slice cut).
    pieces: Vec<u32>,
    /// The Tasks of its Stage whose partial aggregate states it merges: it runs once they
    /// have their outputs (its partition was split under a final aggregate).
    merges: Vec<u32>,
    /// The Task that merges its output: it is one of those pieces, and no other Stage, nor the
    /// Stage's output statistics, sees it.
    merged_into: Option<u32>,
    /// The bytes of its scan slice, while it may still be cut into pieces.
    slice_bytes: Option<u64>,
    /// The piece of its plan's scan slice it reads.
    slice: Option<SlicePiece>,
    /// How many times its Stage's median Task's bytes it reads, at least 1; set when its
    /// Stage's inputs have finished (see `weights`).
    weight: f64,
    /// The join keys of its output, from its first succeeded Attempt, when its Stage is a
    /// key filter's build side. Kept when the output is lost: the keys are the same.
    key_summary: Option<Arc<SummaryForm>>,
}

impl TaskRun {
    /// Its work in units of a typical Task of its Stage: a piece of a slice cut in `of` does
    /// `1/of` (the cut aims at equal pieces), and a Task reading several times its Stage's
    /// median bytes does that many times more ([`TaskRun::weight`]). Speculation and worker
    /// paces compare Attempts by their time per unit of work.
    fn work(&self) -> f64 {
        self.slice.map_or(1.0, |piece| 1.0 / piece.of.max(1) as f64) * self.weight
    }

    fn new(plan: Arc<Vec<u8>>, partition: u32, summary: String) -> Self {
        Self {
            plan,
            partition,
            summary,
            attempts: Vec::new(),
            output: None,
            failures: 0,
            last_error: None,
            parts_read: BTreeMap::new(),
            avoid: BTreeSet::new(),
            reads: Arc::new(Vec::new()),
            reads_text: None,
            absorbed: false,
            pieces: Vec::new(),
            merges: Vec::new(),
            merged_into: None,
            slice_bytes: None,
            slice: None,
            weight: 1.0,
            key_summary: None,
        }
    }

    /// Its output is there to read (or is empty by construction).
    fn is_done(&self) -> bool {
        self.output.is_some() || self.absorbed
    }

    fn has_live_attempt(&self) -> bool {
        self.attempts.iter().any(Attempt::is_live)
    }

    fn counted(&self) -> Option<&Attempt> {
        let read = self.parts_read.values().next().copied();
        let last_success = self.attempts.iter().rev().find(|a| a.record.state == TaskState::Succeeded);
        read.or(self.output).map(|n| &self.attempts[n as usize]).or(last_success)
    }

    fn fail(&mut self, worker: &str, error: QuiverError) {
        self.failures += 1;
        self.avoid.insert(worker.to_string());
        self.last_error = Some(error);
    }

    /// Ends the queued speculative Attempts of a Task none of whose Attempts runs any more:
    /// the straggler they raced ended without an output. Left queued, one would stand in for
    /// the Task's retry (skipping its backoff), yet never run on the worker it avoids, even
    /// when no other is left: the Task would wait forever.
    fn end_orphaned_speculation(&mut self, now: Instant) -> Vec<Action> {
        if self.attempts.iter().any(|a| a.record.state == TaskState::Running) {
            return Vec::new();
        }
        let orphans = self.attempts.iter_mut().filter(|a| a.record.state == TaskState::Queued && a.record.started_as == StartedAs::Speculative);
        orphans.filter_map(|a| a.end(TaskState::Cancelled, Some(Cause::RaceEnded), None, now)).collect()
    }
}

struct StageRun {
    inputs: Vec<u32>,
    /// Stages that read this one; none when the final Stage does.
    consumers: Vec<u32>,
    shuffle: bool,
    parts: u32,
    adaptive: Option<StageReads>,
    /// Its reads were laid out (adapted or not) when its inputs finished.
    adapted: bool,
    /// Its Tasks were weighed by the bytes they read, once its inputs finished.
    weighed: bool,
    /// Partitions coalesced into a neighbour's Task, and skewed partitions split.
    coalesced: u32,
    split: u32,
    /// Scan slices cut into pieces at dispatch, and the pieces they became.
    slices_cut: u32,
    slice_pieces: u32,
    /// Stages on the longest path from it to the result, itself included.
    height: u32,
    key_summary: Vec<u32>,
    key_filter: Option<(u32, Vec<u32>)>,
    /// The filter its Attempts assigned from now on get, decided once every build Task has its
    /// keys in; None inside when it gets none (a filter that would keep nearly every row).
    filter: Option<Option<Arc<KeyFilterSpec>>>,
    /// Its Task plans wait for scalar subquery values (see [`NewStage::held`]).
    held: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    Failed,
    Ended,
}

/// The Attempts of one distributed Query.
pub struct QueryRun {
    query_id: String,
    stages: Vec<StageRun>,
    tasks: BTreeMap<TaskId, TaskRun>,
    state: RunState,
    /// Attempts started beyond each Task's first.
    extra_attempts: u32,
    retried: u32,
    recomputed: u32,
    /// When stragglers get speculative Attempts; None when speculation is off.
    speculation: Option<policy::Speculation>,
    /// Workers slower than this pace are left the Tasks faster ones cannot take; None: off.
    slow_pace: Option<SlowPace>,
    speculated: u32,
    speculation_wins: u32,
    /// How Stages adapt their shuffle reads.
    read_policy: layout::ReadPolicy,
    /// When queued scan slices are cut into pieces; None: never.
    granularity: Option<granularity::Granularity>,
    /// A key filter's probe Stage waits until its filter is decided.
    key_filter_wait: bool,
}

impl QueryRun {
    pub fn new(query_id: &str, stages: Vec<NewStage>) -> Self {
        let mut runs: Vec<StageRun> = Vec::with_capacity(stages.len());
        let mut tasks = BTreeMap::new();
        for (index, stage) in stages.into_iter().enumerate() {
            for &input in &stage.inputs {
                if let Some(producer) = runs.get_mut(input as usize) {
                    producer.consumers.push(index as u32);
                }
            }
            for t in stage.tasks {
                let mut run = TaskRun::new(Arc::new(t.plan), t.partition, t.summary);
                run.slice_bytes = t.slice_bytes;
                tasks.insert((t.stage, t.task), run);
            }
            runs.push(StageRun {
                inputs: stage.inputs,
                consumers: Vec::new(),
                shuffle: stage.shuffle,
                parts: stage.parts.max(1),
                adaptive: stage.adaptive,
                adapted: false,
                weighed: false,
                coalesced: 0,
                split: 0,
                slices_cut: 0,
                slice_pieces: 0,
                height: 1,
                key_summary: stage.key_summary,
                key_filter: stage.key_filter,
                filter: None,
                held: stage.held,
            });
        }
        // Consumers are numbered after their inputs: walking backwards sees them first. A key
        // filter's build Stage goes before its probe Stage too, so that more probe Attempts
        // start with the filter (the planner cuts the build side first, so the probe Stage
        // also comes later in this walk).
        for index in (0..runs.len()).rev() {
            let waiting = runs.iter().enumerate().filter(|(_, r)| r.key_filter.as_ref().is_some_and(|(b, _)| *b as usize == index)).map(|(i, _)| i as u32);
            let below = runs[index].consumers.iter().copied().chain(waiting).map(|c| runs[c as usize].height).max().unwrap_or(0);
            runs[index].height = 1 + below;
        }
        Self {
            query_id: query_id.to_string(),
            stages: runs,
            tasks,
            state: RunState::Running,
            extra_attempts: 0,
            retried: 0,
            recomputed: 0,
            speculation: None,
            slow_pace: None,
            speculated: 0,
            speculation_wins: 0,
            read_policy: layout::ReadPolicy::default(),
            granularity: None,
            key_filter_wait: true,
        }
    }

    /// Lets Stages coalesce and split their shuffle reads under `policy`.
    pub fn with_read_policy(mut self, policy: layout::ReadPolicy) -> Self {
        self.read_policy = policy;
        self
    }

    /// Partitions coalesced into a neighbour's Task, and skewed partitions split.
    pub fn adapted(&self) -> (u32, u32) {
        self.stages.iter().fold((0, 0), |(c, s), stage| (c + stage.coalesced, s + stage.split))
    }

    /// Makes a key filter's probe Stage wait for its build Stage (or not).
    pub fn with_key_filter_wait(mut self, wait: bool) -> Self {
        self.key_filter_wait = wait;
        self
    }

    /// Lets [`QueryRun::cut_slice`] cut queued scan slices into pieces under `policy`.
    pub fn with_granularity(mut self, policy: Option<granularity::Granularity>) -> Self {
        self.granularity = policy;
        self
    }

    /// Scan slices cut into pieces at dispatch.
    pub fn slices_cut(&self) -> u32 {
        self.stages.iter().map(|stage| stage.slices_cut).sum()
    }

    /// Lets [`QueryRun::speculate`] start speculative Attempts under `policy`.
    pub fn with_speculation(mut self, policy: Option<policy::Speculation>) -> Self {
        self.speculation = policy;
        self
    }

    /// Leaves the Tasks faster workers can take to them when `slow_pace` is set.
    pub fn with_slow_pace(mut self, slow_pace: Option<SlowPace>) -> Self {
        self.slow_pace = slow_pace;
        self
    }

    /// Speculative Attempts started, and how many of them won their Task.
    pub fn speculated(&self) -> (u32, u32) {
        (self.speculated, self.speculation_wins)
    }

    pub fn task_ids(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.tasks.keys().copied()
    }

    /// Attempts started again after a failure or a lost input.
    pub fn retried(&self) -> u32 {
        self.retried
    }

    /// Tasks run again because a succeeded Attempt's output was lost.
    pub fn recomputed(&self) -> u32 {
        self.recomputed
    }

    pub fn is_running(&self) -> bool {
        self.state == RunState::Running
    }

    /// True while some needed Task has no output: the Query cannot finish without a worker.
    pub fn needs_workers(&self) -> bool {
        let needed = self.needed();
        self.is_running() && self.tasks.iter().any(|(id, t)| needed.contains(id) && !t.is_done())
    }

    /// Queues the first Attempts of the Tasks whose inputs are ready.
    pub fn start(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.schedule(now, out);
    }

    /// Gives held Stage `stage` its Task plans, in Task order, now that the scalar subquery
    /// values they read are known; its Tasks then run like any other's.
    pub fn release(&mut self, stage: u32, plans: Vec<Vec<u8>>, now: Instant, out: &mut Vec<Action>) -> Result<(), QuiverError> {
        let held = self.stages.get(stage as usize).is_some_and(|s| s.held);
        let tasks: Vec<&mut TaskRun> = self.tasks.range_mut((stage, 0)..(stage + 1, 0)).map(|(_, t)| t).collect();
        if !held || tasks.len() != plans.len() {
            return Err(QuiverError::new(ErrorKind::Internal, format!("stage {stage} is not held, or not with {} Tasks", plans.len())));
        }
        for (task, plan) in tasks.into_iter().zip(plans) {
            task.plan = Arc::new(plan);
        }
        self.stages[stage as usize].held = false;
        self.schedule(now, out);
        Ok(())
    }

    /// True when the Attempt is still waiting for a worker.
    pub fn is_queued(&self, key: &TaskKey) -> bool {
        self.attempt(key).is_some_and(|a| a.record.state == TaskState::Queued)
    }

    /// A queued Attempt was given to a worker (on an express slot when `express`); false when it
    /// is no longer queued.
    pub fn assigned(&mut self, key: &TaskKey, worker_id: &str, worker_url: &str, express: bool, now: Instant) -> bool {
        let Some(attempt) = self.attempt_mut(key) else { return false };
        if attempt.record.state != TaskState::Queued {
            return false;
        }
        attempt.record.state = TaskState::Running;
        attempt.record.worker_id = Some(worker_id.to_string());
        attempt.record.started = Some(SystemTime::now());
        attempt.record.lane = Some(if express { "express" } else { "regular" });
        attempt.worker_url = Some(worker_url.to_string());
        attempt.assigned_at = Some(now);
        attempt.express = express;
        true
    }

    /// Applies a worker's report on one of its Attempts.
    pub fn reported(&mut self, report: Report, now: Instant, out: &mut Vec<Action>) {
        let Report { key, worker_id, state, rows, bytes, elapsed_ms, error, part_rows, part_bytes, key_summary, filter_rows } = report;
        let parts = self.stages.get(key.stage as usize).map_or(0, |s| s.parts as usize);
        let Some(attempt) = self.attempt_mut(&key) else { return };
        let from_its_worker = attempt.record.worker_id.as_deref() == Some(worker_id.as_str());
        if !from_its_worker || !attempt.is_live() {
            // A stale Attempt (its worker was declared lost, or another Attempt won): an output
            // it still holds is read by no one.
            if from_its_worker && state == TaskState::Succeeded {
                out.extend(attempt.worker_url.clone().map(|worker_url| Action::Stop { key, worker_url }));
            }
            return;
        }
        attempt.record.rows = rows;
        attempt.record.bytes = bytes;
        // As many parts as the Stage has, whatever a worker sends.
        attempt.part_rows = part_rows.into_iter().take(parts).collect();
        attempt.part_bytes = part_bytes.into_iter().take(parts).collect();
        attempt.record.elapsed_ms = elapsed_ms;
        if attempt.record.key_filter_rows.is_some() {
            attempt.record.key_filter_rows = Some(filter_rows);
        }
        match state {
            TaskState::Queued | TaskState::Running => attempt.record.state = TaskState::Running,
            TaskState::Succeeded => {
                if let Some(summary) = key_summary {
                    let task = self.tasks.get_mut(&(key.stage, key.task)).expect("reported Attempt has a Task");
                    task.key_summary.get_or_insert(Arc::new(summary));
                }
                self.succeeded(key, now, out)
            }
            TaskState::Failed | TaskState::Cancelled => {
                let error = error.unwrap_or_else(|| {
                    QuiverError::new(ErrorKind::Execution, format!("task {key} {} without an error", state.as_str()))
                });
                // An Attempt its worker stopped on its own (it was shutting down) did not fail
                // for a reason of the Task's: it runs again.
                let retryable = state == TaskState::Cancelled || policy::is_retryable(&error);
                self.failed(key, &worker_id, error, retryable, now, out);
            }
        }
        self.schedule(now, out);
    }

    fn succeeded(&mut self, key: TaskKey, now: Instant, out: &mut Vec<Action>) {
        let id = (key.stage, key.task);
        let (shuffle, final_input) = self.stage_kind(key.stage);
        let task = self.tasks.get_mut(&id).expect("reported Attempt has a Task");
        let attempt = &mut task.attempts[key.attempt as usize];
        out.extend(attempt.end(TaskState::Succeeded, None, None, now));
        out.push(Action::Output { rows: attempt.record.rows, bytes: attempt.record.bytes, shuffle });
        let worker_url = attempt.worker_url.clone().unwrap_or_default();
        if task.output.is_some() {
            // Another Attempt won the race; consumers read that one.
            attempt.record.cause = Some(Cause::Superseded);
            out.push(Action::Stop { key, worker_url });
            return;
        }
        task.output = Some(key.attempt);
        if attempt.record.started_as == StartedAs::Speculative {
            self.speculation_wins += 1;
            out.push(Action::SpeculationWon);
        }
        let mut paces: Vec<PaceSample> = attempt.pace_sample(now, false).into_iter().collect();
        for other in task.attempts.iter_mut().filter(|a| a.is_live()) {
            paces.extend(other.pace_sample(now, true));
            out.extend(other.end(TaskState::Cancelled, Some(Cause::Superseded), None, now));
            if let Some(url) = other.worker_url.clone() {
                out.push(Action::Stop { key: other.record.key.clone(), worker_url: url });
            }
        }
        if final_input && task.merged_into.is_none() {
            out.push(Action::Publish { task: id, outcome: Some(TaskOutcome::Succeeded { key, worker_url }) });
        }
        let work = task.work();
        self.pace(id.0, work, paces, out);
    }

    /// How fast the workers of `samples`, Attempts of a Task doing `work` typical Tasks' work,
    /// ran against the median of `stage`'s finished Tasks.
    fn pace(&self, stage: u32, work: f64, samples: Vec<PaceSample>, out: &mut Vec<Action>) {
        let mut finished = self.finished_per_task(stage);
        if let Some(median) = policy::median_if_enough(&mut finished) {
            for PaceSample { worker, ran, at_least, read_from } in samples {
                let ratio = ran.as_secs_f64() / work / median.as_secs_f64().max(1e-3);
                out.push(Action::Paced { worker, ratio, at_least, read_from });
            }
        }
    }

    /// How long each finished Task of `stage` took, scaled to a whole Task: a piece of a cut
    /// slice does a fraction of a planned Task's work, and measured as it is, would make its
    /// worker look fast and a whole Task beside it look slow.
    fn finished_per_task(&self, stage: u32) -> Vec<Duration> {
        // A merge Task only combines its pieces' states: a fraction of a Task's work.
        self.tasks
            .range((stage, 0)..(stage + 1, 0))
            .filter(|(_, t)| t.merges.is_empty())
            .filter_map(|(_, t)| t.output.map(|n| (t.work(), &t.attempts[n as usize])))
            .filter_map(|(work, a)| Some(a.ended_at?.saturating_duration_since(a.assigned_at?).div_f64(work)))
            .collect()
    }

    fn failed(&mut self, key: TaskKey, worker_id: &str, error: QuiverError, retryable: bool, now: Instant, out: &mut Vec<Action>) {
        let id = (key.stage, key.task);
        let task = self.tasks.get_mut(&id).expect("reported Attempt has a Task");
        let attempt = &mut task.attempts[key.attempt as usize];
        if let (ErrorKind::FetchFailed, Some(lost)) = (error.kind, error.output.clone()) {
            // Not this Task's fault: the producer's output is recomputed, then this runs again.
            out.extend(attempt.end(TaskState::Failed, Some(Cause::InputLost), Some(&error.message), now));
            self.lose_output(&lost, &error, now, out);
            return;
        }
        out.extend(attempt.end(TaskState::Failed, Some(Cause::Error(error.kind)), Some(&error.message), now));
        if retryable {
            task.fail(worker_id, error);
            out.extend(task.end_orphaned_speculation(now));
        } else {
            self.fail(error, now, out);
        }
    }

    /// The worker `worker_id` was lost: its running Attempts failed and its outputs are gone.
    /// Once the run has ended or failed, nothing it held matters any more (and the final
    /// Stage's readers must keep the outcome they were told).
    pub fn worker_lost(&mut self, worker_id: &str, message: &str, now: Instant, out: &mut Vec<Action>) {
        if self.state != RunState::Running {
            return;
        }
        let mut lost_outputs = Vec::new();
        for task in self.tasks.values_mut() {
            for (n, attempt) in task.attempts.iter_mut().enumerate() {
                if attempt.record.worker_id.as_deref() != Some(worker_id) {
                    continue;
                }
                if attempt.is_live() {
                    let text = format!("task {}: {message}", attempt.record.key);
                    out.extend(attempt.end(TaskState::Failed, Some(Cause::WorkerLost), Some(&text), now));
                    task.failures += 1;
                    task.avoid.insert(worker_id.to_string());
                    task.last_error = Some(QuiverError::new(ErrorKind::WorkerLost, text));
                } else if task.output == Some(n as u32) {
                    lost_outputs.push(attempt.record.key.clone());
                }
            }
            out.extend(task.end_orphaned_speculation(now));
        }
        let error = QuiverError::new(ErrorKind::WorkerLost, message);
        for key in lost_outputs {
            self.lose_output(&key, &error, now, out);
        }
        self.schedule(now, out);
    }

    /// Running Attempts assigned to `worker_id` more than `timeout` ago that its heartbeat does
    /// not list (`held`): their assignment or their final report was lost on the way.
    pub fn unacknowledged(&mut self, worker_id: &str, held: &[TaskKey], timeout: Duration, now: Instant, out: &mut Vec<Action>) {
        let mut changed = false;
        for task in self.tasks.values_mut() {
            let mut ended = false;
            for attempt in task.attempts.iter_mut() {
                let silent = attempt.record.state == TaskState::Running
                    && attempt.record.worker_id.as_deref() == Some(worker_id)
                    && attempt.assigned_at.is_some_and(|at| now.saturating_duration_since(at) > timeout)
                    && !held.contains(&attempt.record.key);
                if !silent {
                    continue;
                }
                let message = format!(
                    "task {} was assigned to worker {worker_id}, which does not know it after {} ms: its assignment or its report was lost",
                    attempt.record.key,
                    timeout.as_millis()
                );
                out.extend(attempt.end(TaskState::Failed, Some(Cause::Unacknowledged), Some(&message), now));
                task.failures += 1;
                task.avoid.insert(worker_id.to_string());
                task.last_error = Some(QuiverError::new(ErrorKind::Unreachable, message));
                ended = true;
            }
            if ended {
                out.extend(task.end_orphaned_speculation(now));
                changed = true;
            }
        }
        if changed {
            self.schedule(now, out);
        }
    }

    /// The final Stage could not read the output of Attempt `key`.
    pub fn output_unreadable(&mut self, key: &TaskKey, error: &QuiverError, now: Instant, out: &mut Vec<Action>) {
        if self.state != RunState::Running {
            return;
        }
        self.lose_output(key, error, now, out);
        self.schedule(now, out);
    }

    /// The final Stage has read part `part` of Attempt `key`'s output whole.
    pub fn part_read(&mut self, key: &TaskKey, part: u32) {
        if let Some(task) = self.tasks.get_mut(&(key.stage, key.task)) {
            task.parts_read.insert(part, key.attempt);
        }
    }

    /// The Attempt each Task of `stage` is counted by: the one the final Stage read, else its
    /// output. A write commits exactly the files of these Attempts.
    pub fn counted_attempts(&self, stage: u32) -> Vec<TaskKey> {
        self.tasks
            .range((stage, 0)..(stage + 1, 0))
            .filter_map(|(_, t)| t.counted().map(|a| a.record.key.clone()))
            .collect()
    }

    /// Fails the Query: its live Attempts are cancelled and stopped.
    pub fn fail(&mut self, error: QuiverError, now: Instant, out: &mut Vec<Action>) {
        if self.state != RunState::Running {
            return;
        }
        self.state = RunState::Failed;
        self.stop_live(now, out);
        out.push(Action::Fail(error));
    }

    /// The Query ended: Attempts still live are cancelled (their workers free them when the
    /// Query is released).
    pub fn end(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.state == RunState::Running {
            self.state = RunState::Ended;
        }
        for task in self.tasks.values_mut() {
            for attempt in task.attempts.iter_mut() {
                out.extend(attempt.end(TaskState::Cancelled, Some(Cause::QueryEnded), None, now));
            }
        }
        self.shed();
    }

    /// Drops what only running the Query needed: Task plans, join key summaries (up to a MiB
    /// per build Task) and filters, input locations. The history keeps `QUERY_HISTORY_MAX`
    /// ended Queries for what they show (Attempt records, Stage statistics), not for these.
    fn shed(&mut self) {
        let no_plan = Arc::new(Vec::new());
        for task in self.tasks.values_mut() {
            task.plan = Arc::clone(&no_plan);
            task.key_summary = None;
            for attempt in &mut task.attempts {
                attempt.inputs = Arc::new(Vec::new());
            }
        }
        for stage in &mut self.stages {
            stage.filter = stage.filter.take().map(|_| None);
        }
    }

    fn stop_live(&mut self, now: Instant, out: &mut Vec<Action>) {
        for task in self.tasks.values_mut() {
            for attempt in task.attempts.iter_mut().filter(|a| a.is_live()) {
                if let (TaskState::Running, Some(url)) = (attempt.record.state, attempt.worker_url.clone()) {
                    out.push(Action::Stop { key: attempt.record.key.clone(), worker_url: url });
                }
                out.extend(attempt.end(TaskState::Cancelled, Some(Cause::QueryEnded), None, now));
            }
        }
    }

    /// The output of Attempt `key` is gone. If it was its Task's output, the Task no longer
    /// has one, and the consumers that were told to read it stop: they run again once it is
    /// recomputed (if it is still needed).
    fn lose_output(&mut self, key: &TaskKey, error: &QuiverError, now: Instant, out: &mut Vec<Action>) {
        let id = (key.stage, key.task);
        let (_, final_input) = self.stage_kind(key.stage);
        let Some(task) = self.tasks.get_mut(&id) else { return };
        if task.output != Some(key.attempt) {
            return;
        }
        task.output = None;
        let attempt = &mut task.attempts[key.attempt as usize];
        attempt.record.cause = Some(Cause::OutputLost);
        attempt.record.error = Some(error.message.clone());
        let worker = attempt.record.worker_id.clone().unwrap_or_default();
        task.fail(&worker, error.clone());
        if final_input && task.merged_into.is_none() {
            out.push(Action::Publish { task: id, outcome: None });
        }
        // A piece's reader is the merge Task of its own Stage.
        let consumers = self.stages[key.stage as usize].consumers.clone();
        for consumer in consumers.into_iter().chain([key.stage]) {
            for (_, task) in self.tasks.range_mut((consumer, 0)..(consumer + 1, 0)) {
                for attempt in task.attempts.iter_mut().filter(|a| a.is_live() && a.reads(key)) {
                    if let (TaskState::Running, Some(url)) = (attempt.record.state, attempt.worker_url.clone()) {
                        out.push(Action::Stop { key: attempt.record.key.clone(), worker_url: url });
                    }
                    let text = format!("its input {key} was lost: {}", error.message);
                    out.extend(attempt.end(TaskState::Cancelled, Some(Cause::InputLost), Some(&text), now));
                }
            }
        }
    }

    /// Starts an Attempt for every needed Task without an output or a live Attempt whose inputs
    /// are all available; fails the Query when a Task or the Query reached its retry limit.
    fn schedule(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.state != RunState::Running {
            return;
        }
        self.adapt_ready_stages(out);
        self.weigh_ready_stages();
        self.decide_key_filters(out);
        let needed = self.needed();
        let ready: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(id, t)| needed.contains(id) && !t.is_done() && !t.has_live_attempt())
            .map(|(id, _)| *id)
            .filter(|id| !self.stages[id.0 as usize].held && self.task_inputs_available(*id) && self.filter_ready(id.0) && self.pieces_merged(*id))
            .collect();
        for id in ready {
            if let Err(error) = self.start_attempt(id, now, out) {
                self.fail(error, now, out);
                return;
            }
        }
    }

    fn start_attempt(&mut self, id: TaskId, now: Instant, out: &mut Vec<Action>) -> Result<(), QuiverError> {
        let inputs = Arc::new(self.input_locations(id));
        let task = self.tasks.get_mut(&id).expect("scheduled Task exists");
        // The last Attempt that ran (or was lost) for the Task; a speculative one that never
        // started tells nothing.
        let previous = task.attempts.iter().rev().find(|a| a.record.cause != Some(Cause::RaceEnded)).map(|a| (a.record.state, a.record.cause));
        // An Attempt that failed for a cause of its own is retried after a backoff, a recompute
        // of a lost output included; an output lost is recomputed at once.
        let failed_itself = matches!(previous, Some((TaskState::Failed, Some(Cause::Error(_) | Cause::WorkerLost | Cause::Unacknowledged))));
        let started_as = match previous {
            None => StartedAs::First,
            Some(_) if !failed_itself && task.attempts.iter().any(|a| a.record.state == TaskState::Succeeded) => StartedAs::Recompute,
            Some(_) => StartedAs::Retry,
        };
        if let Some(error) = policy::task_exhausted(task.failures, task.last_error.as_ref(), id) {
            return Err(error);
        }
        if started_as != StartedAs::First {
            self.extra_attempts += 1;
            if let Some(error) = policy::query_exhausted(self.extra_attempts, task.last_error.as_ref()) {
                return Err(error);
            }
            match started_as {
                StartedAs::Recompute => self.recomputed += 1,
                _ => self.retried += 1,
            }
            let cause = previous.and_then(|(_, cause)| cause).unwrap_or(Cause::OutputLost);
            out.push(Action::Restarted { started_as, cause });
        }
        let backoff = match started_as {
            StartedAs::Retry => policy::backoff(task.failures),
            _ => Duration::ZERO,
        };
        let avoid = task.avoid.iter().cloned().collect();
        out.push(Action::Queue(self.push_attempt(id, started_as, inputs, now + backoff, avoid)));
        Ok(())
    }

    /// Adds a queued Attempt to Task `id`; returns it as the queue takes it.
    fn push_attempt(
        &mut self,
        id: TaskId,
        started_as: StartedAs,
        inputs: Arc<Vec<OutputLocation>>,
        ready_at: Instant,
        avoid: Vec<String>,
    ) -> QueuedAttempt {
        let stage = &self.stages[id.0 as usize];
        let (shuffle, key_filter_rows) = (stage.shuffle, stage.key_filter.as_ref().map(|_| (0, 0)));
        let task = self.tasks.get_mut(&id).expect("Task exists");
        let key = TaskKey { query_id: self.query_id.clone(), stage: id.0, task: id.1, attempt: task.attempts.len() as u32 };
        let unassigned = TaskRecord::unassigned(key.clone(), &task.summary, shuffle, TaskState::Queued, started_as, None);
        task.attempts.push(Attempt {
            record: TaskRecord { reads: task.reads_text.clone(), key_filter_rows, work: task.work(), ..unassigned },
            part_rows: Vec::new(),
            part_bytes: Vec::new(),
            worker_url: None,
            inputs: Arc::clone(&inputs),
            assigned_at: None,
            ended_at: None,
            express: false,
        });
        let speculative = started_as == StartedAs::Speculative;
        let slow_pace = self.slow_pace;
        let reads = Arc::clone(&task.reads);
        let slice = task.slice;
        QueuedAttempt { key, plan: Arc::clone(&task.plan), partition: task.partition, inputs, ready_at, avoid, speculative, slow_pace, reads, slice }
    }

    /// Starts a speculative Attempt, on another worker, for each straggler: a Task whose only
    /// live Attempt has run longer than its Stage's policy threshold, within the Stage's budget.
    /// Called on a clock tick and after reports.
    pub fn speculate(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(policy) = self.speculation.filter(|_| self.state == RunState::Running) else { return };
        for stage in 0..self.stages.len() as u32 {
            for (id, worker) in self.stragglers(stage, &policy, now) {
                let inputs = Arc::new(self.input_locations(id));
                out.push(Action::Queue(self.push_attempt(id, StartedAs::Speculative, inputs, now, vec![worker])));
                out.push(Action::Speculated);
                self.speculated += 1;
            }
        }
    }

    /// The Tasks of `stage` that get a speculative Attempt now, with the worker their running
    /// Attempt is on; longest-running first, within what the Stage's budget has left.
    fn stragglers(&self, stage: u32, policy: &policy::Speculation, now: Instant) -> Vec<(TaskId, String)> {
        let tasks: Vec<(&TaskId, &TaskRun)> = self.tasks.range((stage, 0)..(stage + 1, 0)).filter(|(_, t)| !t.absorbed).collect();
        let mut finished = self.finished_per_task(stage);
        let all_running = tasks.iter().all(|(_, t)| t.output.is_some() || t.attempts.iter().any(|a| a.record.state == TaskState::Running));
        let Some(threshold) = policy.threshold(&mut finished, tasks.len(), all_running) else { return vec![] };
        let speculative = |t: &TaskRun| t.attempts.iter().any(|a| a.record.started_as == StartedAs::Speculative);
        let spent = tasks.iter().filter(|(_, t)| speculative(t)).count();
        let mut slow: Vec<(Duration, TaskId, String)> = tasks
            .iter()
            .filter(|(_, t)| t.output.is_none() && !speculative(t) && t.attempts.iter().filter(|a| a.is_live()).count() == 1)
            .filter_map(|(id, t)| {
                let live = t.attempts.iter().find(|a| a.is_live())?;
                let ran = now.saturating_duration_since(live.assigned_at?);
                (ran > threshold.for_work(t.work())).then(|| (ran, **id, live.record.worker_id.clone().unwrap_or_default()))
            })
            .collect();
        slow.sort_by(|a, b| b.0.cmp(&a.0));
        slow.into_iter().take(policy.budget(tasks.len()).saturating_sub(spent)).map(|(_, id, w)| (id, w)).collect()
    }

    /// Tasks whose output someone still has to read: the final Stage (parts it has not read
    /// whole) or a Task of a consuming Stage that must run. Stages are numbered inputs first,
    /// so walking them backwards sees every consumer before its producers.
    fn needed(&self) -> BTreeSet<TaskId> {
        let mut needed = BTreeSet::new();
        let mut active = vec![false; self.stages.len()];
        for (index, stage) in self.stages.iter().enumerate().rev() {
            let s = index as u32;
            let consumer_active = stage.consumers.iter().any(|&c| active[c as usize]);
            for (&id, task) in self.tasks.range((s, 0)..(s + 1, 0)).filter(|(_, t)| !t.absorbed) {
                // A piece is needed while its merge Task is and has no output (numbered after
                // the planned Tasks, pieces come after their merge Task in this walk).
                if let Some(merge) = task.merged_into {
                    if needed.contains(&(s, merge)) && self.tasks.get(&(s, merge)).is_some_and(|m| m.output.is_none()) {
                        needed.insert(id);
                    }
                    continue;
                }
                let unread = stage.consumers.is_empty() && (task.parts_read.len() as u32) < stage.parts;
                if consumer_active || unread {
                    needed.insert(id);
                    active[index] |= task.output.is_none();
                }
            }
        }
        needed
    }

    /// Decides the key filter of every Stage whose build Stage now has the keys of all its
    /// Tasks: none at all when a Task succeeded without reporting them. Attempts of the Stage
    /// that already run (it did not wait for its filter) get it where they run.
    fn decide_key_filters(&mut self, out: &mut Vec<Action>) {
        for s in 0..self.stages.len() {
            let Some((build, keys)) = self.stages[s].key_filter.clone().filter(|_| self.stages[s].filter.is_none()) else { continue };
            let tasks: Vec<&TaskRun> = self.tasks.range((build, 0)..(build + 1, 0)).map(|(_, t)| t).filter(|t| !t.absorbed).collect();
            if !tasks.iter().all(|t| t.key_summary.is_some() || t.is_done()) {
                continue;
            }
            let summaries: Option<Vec<&SummaryForm>> = tasks.iter().map(|t| t.key_summary.as_deref()).collect();
            let filter = summaries.and_then(KeyFilter::combine).map(|f| Arc::new(KeyFilterSpec { keys: keys.clone(), bits: f.to_bytes() }));
            self.stages[s].filter = Some(filter.clone());
            let stage = s as u32;
            let worker_urls: BTreeSet<String> = self
                .tasks
                .range((stage, 0)..(stage + 1, 0))
                .flat_map(|(_, t)| t.attempts.iter().filter(|a| a.is_live()).filter_map(|a| a.worker_url.clone()))
                .collect();
            if let (Some(filter), false) = (filter, worker_urls.is_empty()) {
                out.push(Action::KeyFilter { stage, filter, worker_urls: worker_urls.into_iter().collect() });
            }
        }
    }

    /// The output columns an Attempt of `stage` assigned now filters once its Stage's key
    /// filter arrives: those of a probe Stage whose filter is not decided yet.
    pub fn late_filter_keys(&self, stage: u32) -> Vec<u32> {
        match self.stages.get(stage as usize) {
            Some(StageRun { key_filter: Some((_, keys)), filter: None, .. }) => keys.clone(),
            _ => Vec::new(),
        }
    }

    /// The Tasks of `stage` may start as far as its key filter goes: it has none, it is
    /// decided, or the Stage does not wait for it. Nor does it wait for a build side that
    /// waits for scalar subquery values: that can take as long as the subqueries do, while
    /// the probe Tasks could run beside them (they then filter what they output after the
    /// filter reaches them, if it does in time).
    fn filter_ready(&self, stage: u32) -> bool {
        let run = &self.stages[stage as usize];
        let Some((build, _)) = run.key_filter else { return true };
        !self.key_filter_wait || run.filter.is_some() || self.awaits_subqueries(build)
    }

    /// Stage `stage`, or a Stage it reads, is held for scalar subquery values.
    fn awaits_subqueries(&self, stage: u32) -> bool {
        let run = &self.stages[stage as usize];
        run.held || run.inputs.iter().any(|&input| self.awaits_subqueries(input))
    }

    /// What the Tasks of `stage` do with join keys: the output columns to summarize, and the
    /// filter to apply.
    pub fn key_work(&self, stage: u32) -> (Vec<u32>, Option<KeyFilterSpec>) {
        let Some(run) = self.stages.get(stage as usize) else { return (Vec::new(), None) };
        let filter = run.filter.clone().flatten().map(|f| (*f).clone());
        (run.key_summary.clone(), filter)
    }

    fn inputs_available(&self, stage: u32) -> bool {
        self.stages[stage as usize]
            .inputs
            .iter()
            .all(|&input| self.stage_done(input))
    }

    /// Every Task of `stage` its consumers read has its output (pieces are read by their merge).
    fn stage_done(&self, stage: u32) -> bool {
        self.tasks.range((stage, 0)..(stage + 1, 0)).all(|(_, t)| t.is_done() || t.merged_into.is_some())
    }

    /// The inputs Task `id` reads have all finished (see [`QueryRun::inputs_of`]).
    fn task_inputs_available(&self, id: TaskId) -> bool {
        self.inputs_of(id).into_iter().all(|input| self.stage_done(input))
    }

    /// The Stages Task `id` reads: its Stage's inputs, less the one a merge Task reads through
    /// its pieces; a piece reads only the input it reduces. Neither waits for, nor is stopped
    /// by the loss of, an output it does not read.
    fn inputs_of(&self, id: TaskId) -> Vec<u32> {
        let inputs = &self.stages[id.0 as usize].inputs;
        let Some(task) = self.tasks.get(&id) else { return inputs.clone() };
        if task.merged_into.is_some() {
            return task.reads.iter().map(|read| read.stage).collect();
        }
        let merged: Vec<u32> = task.reads.iter().filter(|read| read.merged_from.is_some()).map(|read| read.stage).collect();
        inputs.iter().copied().filter(|input| !merged.contains(input)).collect()
    }

    /// A merge Task's pieces all have their outputs (true for any other Task).
    fn pieces_merged(&self, (stage, task): TaskId) -> bool {
        let pieces = self.tasks.get(&(stage, task)).map(|t| t.merges.as_slice()).unwrap_or_default();
        pieces.iter().all(|&piece| self.tasks.get(&(stage, piece)).is_some_and(|p| p.output.is_some()))
    }

    /// Where the outputs Task `id` reads are: those of its Stage's inputs, and those of the
    /// pieces it merges.
    fn input_locations(&self, id: TaskId) -> Vec<OutputLocation> {
        let inputs = self.inputs_of(id).into_iter().flat_map(|input| self.tasks.range((input, 0)..(input + 1, 0)));
        let producers = inputs.filter(|(_, t)| t.merged_into.is_none());
        let merges = self.tasks.get(&id).map(|t| t.merges.as_slice()).unwrap_or_default();
        let pieces = merges.iter().filter_map(|&piece| self.tasks.get_key_value(&(id.0, piece)));
        producers.chain(pieces).filter_map(|(&(stage, index), task)| self.output_location(stage, index, task)).collect()
    }

    /// Where Task `index` of `stage` left its output; None while it has none.
    fn output_location(&self, stage: u32, index: u32, task: &TaskRun) -> Option<OutputLocation> {
        if task.absorbed {
            let key = TaskKey { query_id: self.query_id.clone(), stage, task: index, attempt: 0 };
            return Some(OutputLocation { key: Some(key), worker_url: String::new(), empty: true, pieces: task.pieces.clone() });
        }
        let attempt = task.output.map(|n| &task.attempts[n as usize])?;
        Some(OutputLocation {
            key: Some(attempt.record.key.clone()),
            worker_url: attempt.worker_url.clone().unwrap_or_default(),
            empty: false,
            pieces: Vec::new(),
        })
    }

    /// (shuffle, read by the final Stage)
    fn stage_kind(&self, stage: u32) -> (bool, bool) {
        self.stages.get(stage as usize).map_or((false, false), |s| (s.shuffle, s.consumers.is_empty()))
    }

    fn attempt(&self, key: &TaskKey) -> Option<&Attempt> {
        self.tasks.get(&(key.stage, key.task))?.attempts.get(key.attempt as usize)
    }

    fn attempt_mut(&mut self, key: &TaskKey) -> Option<&mut Attempt> {
        self.tasks.get_mut(&(key.stage, key.task))?.attempts.get_mut(key.attempt as usize)
    }

    /// Every Attempt, in Task order; a Task still waiting for its inputs shows as its first
    /// Attempt, queued (cancelled, once the Query has ended without running it).
    pub fn records(&self) -> impl Iterator<Item = TaskRecord> + '_ {
        let (state, cause) = match self.state {
            RunState::Running => (TaskState::Queued, None),
            _ => (TaskState::Cancelled, Some(Cause::QueryEnded)),
        };
        self.tasks.iter().filter(|(_, t)| !t.absorbed).flat_map(move |(&(stage, task), t)| {
            let waiting = t.attempts.is_empty().then(|| {
                let key = TaskKey { query_id: self.query_id.clone(), stage, task, attempt: 0 };
                let shuffle = self.stages[stage as usize].shuffle;
                TaskRecord { reads: t.reads_text.clone(), work: t.work(), ..TaskRecord::unassigned(key, &t.summary, shuffle, state, StartedAs::First, cause) }
            });
            t.attempts.iter().map(|a| a.record.clone()).chain(waiting)
        })
    }

    /// The URLs of the workers that ran any Attempt: they may hold outputs to free.
    pub fn worker_urls(&self) -> BTreeSet<String> {
        self.tasks.values().flat_map(|t| t.attempts.iter().filter_map(|a| a.worker_url.clone())).collect()
    }

    /// The ids of the workers that ran any Attempt.
    pub fn workers_used(&self) -> BTreeSet<String> {
        self.tasks.values().flat_map(|t| t.attempts.iter().filter_map(|a| a.record.worker_id.clone())).collect()
    }

    /// The Tasks that run: those planned, less those absorbed by a neighbour, plus the pieces
    /// of split partitions.
    pub fn task_total(&self) -> usize {
        self.tasks.values().filter(|t| !t.absorbed).count()
    }

    /// Stages between `stage` and the end of the Query, itself included: the longest chain of
    /// consumers its output still has to pass through. A Task of a higher Stage is on a longer
    /// path to the result, so it goes first (critical-path priority).
    pub fn stage_height(&self, stage: u32) -> u32 {
        self.stages.get(stage as usize).map_or(0, |run| run.height)
    }

    /// Tasks that have yet to succeed: how much of the Query is left.
    pub fn remaining(&self) -> usize {
        self.tasks.values().filter(|t| !t.absorbed && t.counted().is_none()).count()
    }

    /// (Tasks with a succeeded Attempt, Attempts running now)
    pub fn progress(&self) -> (usize, usize) {
        let done = self.tasks.values().filter(|t| t.counted().is_some()).count();
        let attempts = self.tasks.values().flat_map(|t| t.attempts.iter());
        let running = attempts.filter(|a| a.record.state == TaskState::Running).count();
        (done, running)
    }

    pub fn stage_metrics(&self) -> Vec<StageMetrics> {
        self.stages
            .iter()
            .enumerate()
            .map(|(index, stage)| {
                let s = index as u32;
                let tasks: Vec<&TaskRun> = self.tasks.range((s, 0)..(s + 1, 0)).map(|(_, t)| t).filter(|t| !t.absorbed).collect();
                let attempts = || tasks.iter().flat_map(|t| t.attempts.iter());
                let first = attempts().filter_map(|a| a.assigned_at).min();
                let last = attempts().filter_map(|a| a.ended_at).max();
                let done = tasks.iter().filter(|t| t.counted().is_some()).count();
                // The Stage's output is what its Tasks other than merged pieces wrote.
                let counted: Vec<&Attempt> = tasks.iter().filter(|t| t.merged_into.is_none()).filter_map(|t| t.counted()).collect();
                StageMetrics {
                    stage: s,
                    inputs: stage.inputs.clone(),
                    output: if stage.shuffle { "shuffle" } else { "gather" },
                    tasks: tasks.len(),
                    tasks_done: done,
                    rows: counted.iter().map(|a| a.record.rows).sum(),
                    bytes: counted.iter().map(|a| a.record.bytes).sum(),
                    elapsed_ms: match (first, last) {
                        (Some(a), Some(b)) => b.saturating_duration_since(a).as_millis() as u64,
                        _ => 0,
                    },
                    partition_rows: per_partition(stage, &counted, |a| &a.part_rows),
                    partition_bytes: per_partition(stage, &counted, |a| &a.part_bytes),
                    coalesced: stage.coalesced,
                    split: stage.split,
                    speculated: attempts().filter(|a| a.record.started_as == StartedAs::Speculative).count() as u32,
                    slices_cut: stage.slices_cut,
                    slice_pieces: stage.slice_pieces,
                    key_filter_rows: stage.key_filter.as_ref().map(|_| {
                        let rows = counted.iter().filter_map(|a| a.record.key_filter_rows);
                        rows.fold((0, 0), |(i, k), (seen, kept)| (i + seen, k + kept))
                    }),
                }
            })
            .collect()
    }
}

/// A shuffle Stage's output per partition: the sum over `attempts` of what `parts` gives.
fn per_partition(stage: &StageRun, attempts: &[&Attempt], parts: impl Fn(&Attempt) -> &Vec<u64>) -> Vec<u64> {
    if !stage.shuffle {
        return Vec::new();
    }
    let mut sums = vec![0u64; stage.parts as usize];
    for attempt in attempts {
        for (sum, n) in sums.iter_mut().zip(parts(attempt)) {
            *sum += n;
        }
    }
    sums
}

#[cfg(test)]
mod tests;
