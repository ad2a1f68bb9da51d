//! The Attempt state machine without a network: each test drives a small Query through events
//! and checks the actions that come out.

use super::*;
use crate::config::TASK_ATTEMPTS_MAX;

/// Stage 0: `producers` Tasks shuffling into 2 parts; stage 1: 2 Tasks read by the final Stage.
fn two_stages(producers: u32) -> QueryRun {
    let task = |stage, task| NewTask { stage, task, partition: task, summary: format!("s{stage}t{task}"), plan: vec![stage as u8], slice_bytes: None };
    QueryRun::new(
        "q",
        vec![
            NewStage { inputs: vec![], shuffle: true, parts: 2, tasks: (0..producers).map(|t| task(0, t)).collect(), adaptive: None, ..Default::default() },
            NewStage { inputs: vec![0], shuffle: false, parts: 1, tasks: (0..2).map(|t| task(1, t)).collect(), adaptive: None, ..Default::default() },
        ],
    )
}

fn key(stage: u32, task: u32, attempt: u32) -> TaskKey {
    TaskKey { query_id: "q".into(), stage, task, attempt }
}

fn url(worker: &str) -> String {
    format!("http://{worker}")
}

/// Drives a QueryRun, keeping what it asked for.
struct Driver {
    run: QueryRun,
    now: Instant,
    queued: Vec<QueuedAttempt>,
    stopped: Vec<TaskKey>,
    published: Vec<(TaskId, Option<TaskOutcome>)>,
    failed: Option<QuiverError>,
    restarted: Vec<(StartedAs, Cause)>,
    paces: Vec<(String, f64)>,
    /// Key filters sent to running Attempts: the Stage and the workers.
    filters_sent: Vec<(u32, Vec<String>)>,
}

impl Driver {
    fn new(run: QueryRun) -> Self {
        let mut d = Self { run, now: Instant::now(), queued: vec![], stopped: vec![], published: vec![], failed: None, restarted: vec![], paces: vec![], filters_sent: vec![] };
        let mut out = Vec::new();
        d.run.start(d.now, &mut out);
        d.take(out);
        d
    }

    fn take(&mut self, out: Vec<Action>) {
        for action in out {
            match action {
                Action::Queue(q) => self.queued.push(q),
                Action::Stop { key, .. } => self.stopped.push(key),
                Action::Publish { task, outcome } => self.published.push((task, outcome)),
                Action::Fail(e) => self.failed = Some(e),
                Action::Restarted { started_as, cause } => self.restarted.push((started_as, cause)),
                Action::Paced { worker, ratio, .. } => self.paces.push((worker, ratio)),
                Action::KeyFilter { stage, worker_urls, .. } => self.filters_sent.push((stage, worker_urls)),
                Action::Ended { .. }
                | Action::Output { .. }
                | Action::Speculated
                | Action::SpeculationWon
                | Action::Adapted { .. }
                | Action::SliceCut { .. } => {}
            }
        }
    }

    /// The keys queued and not yet assigned, in order.
    fn waiting(&self) -> Vec<TaskKey> {
        self.queued.iter().filter(|q| self.run.is_queued(&q.key)).map(|q| q.key.clone()).collect()
    }

    fn assign(&mut self, key: &TaskKey, worker: &str) {
        assert!(self.run.assigned(key, worker, &url(worker), false, self.now), "{key} is not queued");
    }

    fn report(&mut self, key: &TaskKey, worker: &str, state: TaskState, error: Option<QuiverError>) {
        let mut out = Vec::new();
        let (part_rows, part_bytes) = (vec![4, 6], vec![40, 60]);
        let report = Report { key: key.clone(), worker_id: worker.into(), state, rows: 10, bytes: 100, elapsed_ms: 1, error, part_rows, part_bytes, key_summary: None, filter_rows: (0, 0) };
        self.run.reported(report, self.now, &mut out);
        self.take(out);
    }

    /// Succeeds an Attempt whose output parts hold `part_bytes`.
    fn succeed_with(&mut self, key: &TaskKey, worker: &str, part_bytes: Vec<u64>) {
        self.assign(key, worker);
        let mut out = Vec::new();
        let part_rows = part_bytes.iter().map(|b| b / 10).collect();
        let report = Report { key: key.clone(), worker_id: worker.into(), state: TaskState::Succeeded, rows: 10, bytes: 100, elapsed_ms: 1, error: None, part_rows, part_bytes, key_summary: None, filter_rows: (0, 0) };
        self.run.reported(report, self.now, &mut out);
        self.take(out);
    }

    fn succeed(&mut self, key: &TaskKey, worker: &str) {
        self.assign(key, worker);
        self.report(key, worker, TaskState::Succeeded, None);
    }

    fn lose(&mut self, worker: &str) {
        let mut out = Vec::new();
        self.run.worker_lost(worker, &format!("worker {worker} was lost"), self.now, &mut out);
        self.take(out);
    }

    fn read(&mut self, key: &TaskKey) {
        self.run.part_read(key, 0);
    }

    fn state(&self, key: &TaskKey) -> TaskState {
        self.run.records().find(|r| &r.key == key).map(|r| r.state).expect("attempt exists")
    }
}

fn io_error() -> QuiverError {
    QuiverError::new(ErrorKind::Io, "IO error: disk went away")
}

#[test]
fn a_stage_starts_when_every_task_of_its_inputs_has_an_output() {
    let mut d = Driver::new(two_stages(2));
    assert_eq!(d.waiting(), vec![key(0, 0, 0), key(0, 1, 0)]);
    d.succeed(&key(0, 0, 0), "w1");
    assert_eq!(d.waiting(), vec![key(0, 1, 0)], "stage 1 waits for all of stage 0");
    d.succeed(&key(0, 1, 0), "w2");
    assert_eq!(d.waiting(), vec![key(1, 0, 0), key(1, 1, 0)]);
    let inputs = &d.queued.last().unwrap().inputs;
    assert_eq!(inputs.iter().map(|l| l.key.clone().unwrap()).collect::<Vec<_>>(), vec![key(0, 0, 0), key(0, 1, 0)]);
    d.succeed(&key(1, 0, 0), "w1");
    assert!(matches!(&d.published[..], [((1, 0), Some(TaskOutcome::Succeeded { key: k, .. }))] if *k == key(1, 0, 0)));
}

/// A Stage whose Tasks read scalar subquery values waits for their plans, even once its
/// inputs are done; released, its Tasks queue with the plans they were given.
#[test]
fn a_held_stage_runs_only_once_released_with_its_plans() {
    let task = |stage, task| NewTask { stage, task, partition: task, summary: String::new(), plan: vec![], slice_bytes: None };
    let mut d = Driver::new(QueryRun::new(
        "q",
        vec![
            NewStage { shuffle: true, parts: 2, tasks: vec![task(0, 0)], ..Default::default() },
            NewStage { inputs: vec![0], parts: 1, tasks: (0..2).map(|t| task(1, t)).collect(), held: true, ..Default::default() },
        ],
    ));
    d.succeed(&key(0, 0, 0), "w1");
    assert!(d.waiting().is_empty(), "stage 1 is held");
    let mut out = Vec::new();
    let error = d.run.release(1, vec![vec![7]], d.now, &mut out).expect_err("stage 1 has 2 Tasks");
    assert_eq!(error.kind, ErrorKind::Internal);
    assert!(d.run.release(0, vec![vec![7]], d.now, &mut out).is_err(), "stage 0 is not held");
    assert!(out.is_empty() && d.waiting().is_empty());
    d.run.release(1, vec![vec![7], vec![8]], d.now, &mut out).unwrap();
    d.take(out);
    assert_eq!(d.waiting(), vec![key(1, 0, 0), key(1, 1, 0)]);
    let plans: Vec<&[u8]> = d.queued.iter().filter(|q| q.key.stage == 1).map(|q| q.plan.as_slice()).collect();
    assert_eq!(plans, [[7], [8]]);
    assert!(d.run.release(1, vec![vec![7], vec![8]], d.now, &mut Vec::new()).is_err(), "released once");
}

#[test]
fn a_retryable_failure_runs_again_elsewhere_after_a_backoff() {
    let mut d = Driver::new(two_stages(1));
    d.assign(&key(0, 0, 0), "w1");
    d.report(&key(0, 0, 0), "w1", TaskState::Failed, Some(io_error()));
    assert_eq!(d.waiting(), vec![key(0, 0, 1)]);
    let retry = d.queued.last().unwrap();
    assert!(retry.ready_at > d.now, "a retry waits for its backoff");
    assert_eq!(retry.avoid, vec!["w1".to_string()]);
    assert_eq!(d.restarted, vec![(StartedAs::Retry, Cause::Error(ErrorKind::Io))]);
    assert!(d.failed.is_none());
}

#[test]
fn a_recompute_that_fails_is_retried_after_a_backoff() {
    // Regression: a Task that had ever succeeded was queued again at once after any failure,
    // so a recompute could spend every Attempt on a passing fault within milliseconds.
    let mut d = Driver::new(two_stages(1));
    d.succeed(&key(0, 0, 0), "w1");
    d.lose("w1");
    assert_eq!(d.waiting(), vec![key(0, 0, 1)]);
    assert_eq!(d.queued.last().unwrap().ready_at, d.now, "a lost output is recomputed at once");
    d.assign(&key(0, 0, 1), "w2");
    d.report(&key(0, 0, 1), "w2", TaskState::Failed, Some(io_error()));
    assert_eq!(d.waiting(), vec![key(0, 0, 2)]);
    assert!(d.queued.last().unwrap().ready_at > d.now, "its failure waits for a backoff");
    assert_eq!(d.restarted.last(), Some(&(StartedAs::Retry, Cause::Error(ErrorKind::Io))));
}

#[test]
fn a_worker_lost_after_the_query_failed_changes_no_outcome() {
    // Regression: the loss published "no output yet" over the failure the final Stage's
    // readers had been told, and a reader waiting on it then waited forever.
    let mut d = Driver::new(two_stages(1));
    d.succeed(&key(0, 0, 0), "w2");
    d.succeed(&key(1, 0, 0), "w1");
    d.assign(&key(1, 1, 0), "w2");
    d.report(&key(1, 1, 0), "w2", TaskState::Failed, Some(QuiverError::new(ErrorKind::Execution, "Divide by zero error")));
    assert!(d.failed.is_some());
    d.published.clear();
    d.queued.clear();
    d.lose("w1");
    assert!(d.published.is_empty(), "{:?}", d.published);
    assert!(d.waiting().is_empty());
}

#[test]
fn a_failure_that_running_again_cannot_fix_fails_the_query_at_once() {
    let mut d = Driver::new(two_stages(2));
    d.assign(&key(0, 0, 0), "w1");
    d.assign(&key(0, 1, 0), "w2");
    let error = QuiverError::new(ErrorKind::Execution, "Arrow error: Divide by zero error");
    d.report(&key(0, 0, 0), "w1", TaskState::Failed, Some(error.clone()));
    assert_eq!(d.failed, Some(error));
    assert!(d.waiting().is_empty());
    assert_eq!(d.stopped, vec![key(0, 1, 0)], "the other running Attempt is stopped");
    assert_eq!(d.state(&key(0, 1, 0)), TaskState::Cancelled);
}

#[test]
fn a_poison_task_fails_its_query_after_the_limit_with_its_own_error() {
    let mut d = Driver::new(two_stages(1));
    let oom = QuiverError::new(ErrorKind::ResourcesExhausted, "Resources exhausted: Failed to allocate 1 MB");
    for attempt in 0..TASK_ATTEMPTS_MAX {
        assert!(d.failed.is_none(), "failed early, after {attempt} attempts");
        let k = key(0, 0, attempt);
        d.assign(&k, &format!("w{attempt}"));
        d.report(&k, &format!("w{attempt}"), TaskState::Failed, Some(oom.clone()));
    }
    let error = d.failed.expect("the query fails");
    assert_eq!(error.kind, ErrorKind::ResourcesExhausted);
    assert!(error.message.starts_with("Resources exhausted: Failed to allocate 1 MB"), "{}", error.message);
    assert_eq!(d.run.records().filter(|r| r.key.stage == 0).count(), TASK_ATTEMPTS_MAX as usize, "no Attempt after the limit");
}

#[test]
fn a_lost_worker_retries_its_running_attempts_and_recomputes_only_its_needed_outputs() {
    let mut d = Driver::new(two_stages(4));
    d.succeed(&key(0, 0, 0), "w1");
    d.succeed(&key(0, 1, 0), "w2");
    d.succeed(&key(0, 2, 0), "w1");
    d.succeed(&key(0, 3, 0), "w2");
    d.assign(&key(1, 0, 0), "w2");
    d.assign(&key(1, 1, 0), "w1");
    d.lose("w1");
    // Stage 1 still has to read stage 0: w1's two outputs are recomputed, w2's are kept.
    assert_eq!(d.waiting(), vec![key(0, 0, 1), key(0, 2, 1)]);
    assert_eq!(d.run.recomputed(), 2);
    // The consumer on w2 read w1's outputs: it is stopped and runs again later.
    assert_eq!(d.stopped, vec![key(1, 0, 0)]);
    assert_eq!(d.state(&key(1, 1, 0)), TaskState::Failed, "the consumer on w1 was lost with it");
    d.succeed(&key(0, 0, 1), "w2");
    d.succeed(&key(0, 2, 1), "w3");
    assert_eq!(d.waiting(), vec![key(1, 0, 1), key(1, 1, 1)]);
    let inputs = &d.queued.last().unwrap().inputs;
    let read: Vec<TaskKey> = inputs.iter().map(|l| l.key.clone().unwrap()).collect();
    assert_eq!(read, vec![key(0, 0, 1), key(0, 1, 0), key(0, 2, 1), key(0, 3, 0)], "exactly one Attempt of each producer");
}

#[test]
fn outputs_nobody_needs_any_more_are_not_recomputed() {
    let mut d = Driver::new(two_stages(2));
    d.succeed(&key(0, 0, 0), "w1");
    d.succeed(&key(0, 1, 0), "w2");
    d.succeed(&key(1, 0, 0), "w2");
    d.succeed(&key(1, 1, 0), "w1");
    d.read(&key(1, 0, 0));
    d.read(&key(1, 1, 0));
    d.lose("w1");
    assert!(d.waiting().is_empty(), "the final Stage has read everything: {:?}", d.waiting());
    assert!(!d.run.needs_workers());
}

#[test]
fn a_lost_output_of_a_later_stage_recomputes_its_lost_producers_first() {
    let mut d = Driver::new(two_stages(2));
    d.succeed(&key(0, 0, 0), "w1");
    d.succeed(&key(0, 1, 0), "w2");
    d.succeed(&key(1, 0, 0), "w1");
    d.succeed(&key(1, 1, 0), "w2");
    d.read(&key(1, 1, 0));
    d.lose("w1");
    // Stage 1 task 0 was not read yet: to run it again, stage 0 task 0 runs again first.
    assert_eq!(d.waiting(), vec![key(0, 0, 1)]);
    assert!(matches!(d.published.last(), Some(((1, 0), None))), "the final Stage waits for the new output");
    d.succeed(&key(0, 0, 1), "w2");
    assert_eq!(d.waiting(), vec![key(1, 0, 1)]);
    d.succeed(&key(1, 0, 1), "w2");
    assert!(matches!(d.published.last(), Some(((1, 0), Some(TaskOutcome::Succeeded { key: k, .. }))) if *k == key(1, 0, 1)));
}

#[test]
fn a_fetch_failure_recomputes_the_producer_without_counting_against_the_consumer() {
    let mut d = Driver::new(two_stages(2));
    d.succeed(&key(0, 0, 0), "w1");
    d.succeed(&key(0, 1, 0), "w2");
    d.assign(&key(1, 0, 0), "w2");
    let fetch = QuiverError { kind: ErrorKind::FetchFailed, message: "cannot read".into(), output: Some(key(0, 0, 0)) };
    d.report(&key(1, 0, 0), "w2", TaskState::Failed, Some(fetch));
    assert_eq!(d.waiting(), vec![key(0, 0, 1)], "the queued consumer that reads it waits too");
    let cause = d.run.records().find(|r| r.key == key(1, 0, 0)).unwrap().cause;
    assert_eq!(cause, Some(Cause::InputLost));
    d.succeed(&key(0, 0, 1), "w3");
    assert_eq!(d.waiting(), vec![key(1, 0, 1), key(1, 1, 1)]);
}

#[test]
fn a_stale_attempt_changes_nothing_and_its_output_is_freed() {
    let mut d = Driver::new(two_stages(1));
    d.assign(&key(0, 0, 0), "w1");
    d.lose("w1");
    d.succeed(&key(0, 0, 1), "w2");
    // w1 was cut off, not dead: its report arrives late.
    d.report(&key(0, 0, 0), "w1", TaskState::Succeeded, None);
    assert_eq!(d.stopped, vec![key(0, 0, 0)]);
    assert_eq!(d.state(&key(0, 0, 0)), TaskState::Failed);
    assert_eq!(d.waiting(), vec![key(1, 0, 0), key(1, 1, 0)]);
    let inputs = &d.queued.last().unwrap().inputs;
    assert_eq!(inputs[0].key, Some(key(0, 0, 1)));
}

#[test]
fn of_two_attempts_of_one_task_the_first_to_succeed_wins() {
    let mut d = Driver::new(two_stages(1));
    d.assign(&key(0, 0, 0), "w1");
    d.report(&key(0, 0, 0), "w1", TaskState::Failed, Some(io_error()));
    d.assign(&key(0, 0, 1), "w2");
    // A report of the failed Attempt's success cannot revive it...
    d.report(&key(0, 0, 0), "w1", TaskState::Succeeded, None);
    assert_eq!(d.state(&key(0, 0, 0)), TaskState::Failed);
    d.report(&key(0, 0, 1), "w2", TaskState::Succeeded, None);
    // ...and the winner's consumers read it alone.
    assert_eq!(d.queued.last().unwrap().inputs[0].key, Some(key(0, 0, 1)));
}

#[test]
fn an_unacknowledged_assignment_is_retried() {
    let mut d = Driver::new(two_stages(1));
    d.assign(&key(0, 0, 0), "w1");
    let mut out = Vec::new();
    let later = d.now + Duration::from_secs(10);
    d.run.unacknowledged("w1", &[], Duration::from_secs(5), later, &mut out);
    d.take(out);
    assert_eq!(d.waiting(), vec![key(0, 0, 1)]);
    assert_eq!(d.run.records().next().unwrap().cause, Some(Cause::Unacknowledged));
}

#[test]
fn a_write_commits_the_attempts_the_final_stage_read() {
    let mut d = Driver::new(two_stages(1));
    d.succeed(&key(0, 0, 0), "w1");
    d.succeed(&key(1, 0, 0), "w1");
    d.succeed(&key(1, 1, 0), "w2");
    d.read(&key(1, 0, 0));
    d.lose("w2");
    assert_eq!(d.waiting(), vec![key(1, 1, 1)], "its input on w1 is still there");
    d.succeed(&key(1, 1, 1), "w3");
    d.read(&key(1, 1, 1));
    // w1 is lost after its output was read: what was read still counts.
    d.lose("w1");
    assert_eq!(d.run.counted_attempts(1), vec![key(1, 0, 0), key(1, 1, 1)]);
}

fn speculating(producers: u32) -> Driver {
    let policy = policy::Speculation { quantile: 0.75, multiplier: 1.5, min_runtime: Duration::from_millis(100), max_fraction: 0.25, lone_runtime: None };
    Driver::new(two_stages(producers).with_speculation(Some(policy)))
}

impl Driver {
    fn at_ms(&mut self, start: Instant, ms: u64) {
        self.now = start + Duration::from_millis(ms);
    }

    fn speculate(&mut self) {
        let mut out = Vec::new();
        self.run.speculate(self.now, &mut out);
        self.take(out);
    }
}

/// Stage 0 of 4 Tasks: three finish in 200 ms on w1..w3, the fourth runs on the slow w4.
fn with_a_straggler() -> (Driver, Instant) {
    let mut d = speculating(4);
    let start = d.now;
    for (t, w) in [(0, "w1"), (1, "w2"), (2, "w3"), (3, "w4")] {
        d.assign(&key(0, t, 0), w);
    }
    d.at_ms(start, 200);
    for (t, w) in [(0, "w1"), (1, "w2"), (2, "w3")] {
        d.report(&key(0, t, 0), w, TaskState::Succeeded, None);
    }
    (d, start)
}

#[test]
fn a_straggler_gets_one_speculative_attempt_elsewhere_once_it_runs_past_the_threshold() {
    let (mut d, start) = with_a_straggler();
    d.at_ms(start, 250);
    d.speculate();
    assert!(d.waiting().is_empty(), "250 ms is within 1.5 × the 200 ms median");
    d.at_ms(start, 400);
    d.speculate();
    d.speculate();
    assert_eq!(d.waiting(), vec![key(0, 3, 1)], "one speculative Attempt, however often asked");
    let speculative = d.queued.last().unwrap();
    assert!(speculative.speculative && speculative.avoid == vec!["w4".to_string()]);
    assert_eq!(d.run.records().find(|r| r.key == key(0, 3, 1)).unwrap().started_as, StartedAs::Speculative);
    assert!(d.restarted.is_empty(), "speculation is not a retry");
}

#[test]
fn a_speculative_attempt_that_wins_stops_its_straggler_and_consumers_read_it_alone() {
    let (mut d, start) = with_a_straggler();
    d.at_ms(start, 400);
    d.speculate();
    d.succeed(&key(0, 3, 1), "w1");
    assert_eq!(d.state(&key(0, 3, 0)), TaskState::Cancelled);
    assert!(d.stopped.contains(&key(0, 3, 0)), "the straggler is stopped and its output freed");
    assert_eq!(d.run.speculated(), (1, 1));
    // The speculative Attempt took no time at all here; the straggler had run twice the median.
    let paces: Vec<(&str, f64)> = d.paces.iter().map(|(w, r)| (w.as_str(), *r)).collect();
    assert!(paces.contains(&("w4", 2.0)), "{paces:?}");
    // The straggler finishes anyway: its output is freed, not read.
    d.stopped.clear();
    d.report(&key(0, 3, 0), "w4", TaskState::Succeeded, None);
    assert_eq!(d.stopped, vec![key(0, 3, 0)]);
    let inputs: Vec<_> = d.queued.last().unwrap().inputs.iter().map(|l| l.key.clone().unwrap()).collect();
    assert_eq!(inputs, vec![key(0, 0, 0), key(0, 1, 0), key(0, 2, 0), key(0, 3, 1)]);
}

#[test]
fn a_straggler_that_finishes_first_stops_its_speculative_attempt() {
    let (mut d, start) = with_a_straggler();
    d.at_ms(start, 400);
    d.speculate();
    d.assign(&key(0, 3, 1), "w1");
    d.report(&key(0, 3, 0), "w4", TaskState::Succeeded, None);
    assert!(d.stopped.contains(&key(0, 3, 1)));
    d.report(&key(0, 3, 1), "w1", TaskState::Succeeded, None);
    assert_eq!(d.run.speculated(), (1, 0));
    assert_eq!(d.queued.last().unwrap().inputs[3].key, Some(key(0, 3, 0)), "consumers read the straggler's output");
}

#[test]
fn a_straggler_that_fails_before_its_speculative_attempt_starts_is_retried_as_a_failure() {
    // Regression: the queued speculative Attempt stood in for the retry, and never ran on the
    // straggler's worker even when it was the only one left: the Query waited forever.
    let (mut d, start) = with_a_straggler();
    d.at_ms(start, 400);
    d.speculate();
    d.report(&key(0, 3, 0), "w4", TaskState::Failed, Some(io_error()));
    assert_eq!(d.state(&key(0, 3, 1)), TaskState::Cancelled, "the race it was queued for is over");
    assert_eq!(d.run.records().find(|r| r.key == key(0, 3, 1)).unwrap().cause, Some(Cause::RaceEnded));
    assert_eq!(d.waiting(), vec![key(0, 3, 2)]);
    let retry = d.queued.last().unwrap();
    assert!(!retry.speculative && retry.ready_at > d.now, "an ordinary retry, after its backoff");
    assert_eq!(retry.avoid, vec!["w4".to_string()], "which may still run on w4 when no other worker is left");
    assert_eq!(d.restarted, vec![(StartedAs::Retry, Cause::Error(ErrorKind::Io))]);
}

#[test]
fn a_running_speculative_attempt_outlives_its_failed_straggler() {
    let (mut d, start) = with_a_straggler();
    d.at_ms(start, 400);
    d.speculate();
    d.assign(&key(0, 3, 1), "w1");
    d.report(&key(0, 3, 0), "w4", TaskState::Failed, Some(io_error()));
    assert_eq!(d.state(&key(0, 3, 1)), TaskState::Running);
    assert!(d.waiting().is_empty(), "no retry beside a running Attempt");
    d.report(&key(0, 3, 1), "w1", TaskState::Succeeded, None);
    assert_eq!(d.waiting(), vec![key(1, 0, 0), key(1, 1, 0)]);
}

#[test]
fn without_a_policy_nothing_is_speculated() {
    let mut d = Driver::new(two_stages(4));
    let start = d.now;
    for t in 0..4 {
        d.assign(&key(0, t, 0), "w1");
    }
    d.at_ms(start, 200);
    for t in 0..3 {
        d.report(&key(0, t, 0), "w1", TaskState::Succeeded, None);
    }
    d.at_ms(start, 60_000);
    d.speculate();
    assert!(d.waiting().is_empty());
}

#[test]
fn a_shuffle_stage_reports_its_output_per_partition_over_the_counted_attempts() {
    let mut d = Driver::new(two_stages(2));
    d.succeed(&key(0, 0, 0), "w1");
    d.assign(&key(0, 1, 0), "w2");
    d.report(&key(0, 1, 0), "w2", TaskState::Failed, Some(io_error()));
    d.now += Duration::from_secs(5);
    d.succeed(&key(0, 1, 1), "w1");
    let metrics = d.run.stage_metrics();
    // Each report carries parts [4, 6] rows and [40, 60] bytes; the failed Attempt adds none.
    assert_eq!(metrics[0].partition_rows, vec![8, 12]);
    assert_eq!(metrics[0].partition_bytes, vec![80, 120]);
    assert!(metrics[1].partition_rows.is_empty(), "a gather has no partitions");
}

/// Stage 0: 4 producers shuffling into 4 parts; stage 1 reads them (an adaptable inner join
/// side) and shuffles into 2 parts for stage 2, which the final Stage gathers.
fn three_stages(policy: layout::ReadPolicy) -> QueryRun {
    let task = |stage, task| NewTask { stage, task, partition: task, summary: format!("s{stage}t{task}"), plan: vec![stage as u8], slice_bytes: None };
    let reads = StageReads { inputs: vec![0], splittable: vec![0], ordered: false, merge: None };
    QueryRun::new(
        "q",
        vec![
            NewStage { inputs: vec![], shuffle: true, parts: 4, tasks: (0..4).map(|t| task(0, t)).collect(), adaptive: None, ..Default::default() },
            NewStage { inputs: vec![0], shuffle: true, parts: 2, tasks: (0..4).map(|t| task(1, t)).collect(), adaptive: Some(reads), ..Default::default() },
            NewStage { inputs: vec![1], shuffle: false, parts: 1, tasks: (0..2).map(|t| task(2, t)).collect(), adaptive: None, ..Default::default() },
        ],
    )
    .with_read_policy(policy)
}

const MIB: u64 = 1024 * 1024;

#[test]
fn small_partitions_are_read_by_one_task_and_the_others_never_run() {
    let policy = layout::ReadPolicy { coalesce_target_bytes: Some(64 * MIB), skew: None, slots: 2 };
    let mut d = Driver::new(three_stages(policy));
    for t in 0..4 {
        d.succeed_with(&key(0, t, 0), "w1", vec![10, 10, 10, 10]);
    }
    assert_eq!(d.waiting(), vec![key(1, 0, 0)], "one Task reads all four small partitions");
    let reads = &d.queued.last().unwrap().reads;
    assert_eq!(reads.as_slice(), &[ShuffleRead { stage: 0, parts: vec![0, 1, 2, 3], tasks: vec![], merged_from: None }]);
    assert_eq!(d.run.adapted(), (3, 0));
    assert_eq!(d.run.task_total(), 4 + 1 + 2);
    d.succeed_with(&key(1, 0, 0), "w1", vec![5, 5]);
    // Its consumers are told the absorbed Tasks' outputs are empty.
    let inputs = &d.queued.last().unwrap().inputs;
    let empty: Vec<u32> = inputs.iter().filter(|l| l.empty).map(|l| l.key.as_ref().unwrap().task).collect();
    assert_eq!(empty, vec![1, 2, 3]);
    assert!(d.run.records().all(|r| r.key.stage != 1 || r.key.task == 0), "absorbed Tasks are not listed");
}

#[test]
fn a_skewed_partition_is_read_by_one_task_per_range_of_producers() {
    let skew = Some(layout::Skew { factor: 5.0, min_bytes: MIB });
    let policy = layout::ReadPolicy { coalesce_target_bytes: None, skew, slots: 4 };
    let mut d = Driver::new(three_stages(policy));
    for t in 0..4 {
        d.succeed_with(&key(0, t, 0), "w1", vec![MIB, MIB, 50 * MIB, MIB]);
    }
    let waiting = d.waiting();
    assert_eq!(waiting.len(), 4 + 3, "partition 2 is cut into 4 pieces, its planned Task stands for them");
    let pieces: Vec<Vec<u32>> = d.queued.iter().filter(|q| q.key.stage == 1 && !q.reads.is_empty()).map(|q| q.reads[0].tasks.clone()).collect();
    assert_eq!(pieces, vec![vec![0], vec![1], vec![2], vec![3]]);
    assert_eq!(d.run.adapted(), (0, 1));
    for key in waiting {
        d.succeed_with(&key, "w2", vec![MIB, MIB]);
    }
    // The consumer reads every piece's output.
    let inputs = &d.queued.last().unwrap().inputs;
    assert_eq!(inputs.iter().filter(|l| l.key.as_ref().unwrap().stage == 1 && !l.empty).count(), 7);
    let record = d.run.records().find(|r| r.key == key(1, 5, 0)).unwrap();
    assert_eq!(record.reads.as_deref(), Some("partition 2, producers 1 of stage 0 (piece 2 of 4)"));
}

#[test]
fn a_stage_the_final_stage_gathers_is_split_into_new_tasks_unless_it_merges_sorted_runs() {
    let skew = Some(layout::Skew { factor: 5.0, min_bytes: MIB });
    let policy = layout::ReadPolicy { coalesce_target_bytes: Some(64 * MIB), skew, slots: 1 };
    let producers = |d: &mut Driver| {
        for t in 0..2 {
            d.succeed_with(&key(0, t, 0), "w1", vec![10, 100 * MIB]);
        }
    };
    let mut d = Driver::new(two_stage_reads(policy, vec![0], true));
    producers(&mut d);
    assert_eq!(d.run.adapted().1, 0, "sorted runs are merged, not read one after the other");
    assert_eq!(d.waiting(), vec![key(1, 0, 0), key(1, 1, 0)]);

    let mut d = Driver::new(two_stage_reads(policy, vec![0], false));
    producers(&mut d);
    assert_eq!(d.run.adapted().1, 1);
    assert_eq!(d.waiting(), vec![key(1, 0, 0), key(1, 2, 0), key(1, 3, 0)], "partition 1's Task stands for its pieces");
    assert!(matches!(&d.published[..], [((1, 1), Some(TaskOutcome::Pieces(p)))] if *p == vec![(1, 2), (1, 3)]), "{:?}", d.published);
    d.succeed_with(&key(1, 2, 0), "w1", vec![1]);
    assert!(matches!(&d.published[1], ((1, 2), Some(TaskOutcome::Succeeded { .. }))));
}

#[test]
fn coalesced_tasks_the_final_stage_reads_are_published_empty() {
    let policy = layout::ReadPolicy { coalesce_target_bytes: Some(64 * MIB), skew: None, slots: 1 };
    let mut d = Driver::new(two_stage_reads(policy, vec![], false));
    d.succeed_with(&key(0, 0, 0), "w1", vec![10, 10]);
    d.succeed_with(&key(0, 1, 0), "w1", vec![10, 10]);
    assert_eq!(d.waiting(), vec![key(1, 0, 0)]);
    assert!(matches!(&d.published[..], [((1, 1), Some(TaskOutcome::Empty))]), "{:?}", d.published);
}

/// Stage 0 shuffles into 2 partitions for stage 1, which the final Stage gathers.
fn two_stage_reads(policy: layout::ReadPolicy, splittable: Vec<u32>, ordered: bool) -> QueryRun {
    let task = |stage, task| NewTask { stage, task, partition: task, summary: String::new(), plan: vec![], slice_bytes: None };
    let reads = StageReads { inputs: vec![0], splittable, ordered, merge: None };
    QueryRun::new(
        "q",
        vec![
            NewStage { inputs: vec![], shuffle: true, parts: 2, tasks: (0..2).map(|t| task(0, t)).collect(), adaptive: None, ..Default::default() },
            NewStage { inputs: vec![0], shuffle: false, parts: 1, tasks: (0..2).map(|t| task(1, t)).collect(), adaptive: Some(reads), ..Default::default() },
        ],
    )
    .with_read_policy(policy)
}

#[test]
fn a_lost_piece_is_recomputed_with_the_same_read() {
    let skew = Some(layout::Skew { factor: 5.0, min_bytes: MIB });
    let policy = layout::ReadPolicy { coalesce_target_bytes: None, skew, slots: 4 };
    let mut d = Driver::new(three_stages(policy));
    for t in 0..4 {
        d.succeed_with(&key(0, t, 0), "w1", vec![MIB, MIB, 50 * MIB, MIB]);
    }
    let pieces: Vec<QueuedAttempt> = d.queued.iter().filter(|q| q.key.stage == 1 && !q.reads.is_empty()).cloned().collect();
    for q in &pieces {
        d.succeed_with(&q.key, "w2", vec![MIB, MIB]);
    }
    let (piece, reads) = (pieces[1].key.clone(), pieces[1].reads.clone());
    d.succeed_with(&key(1, 0, 0), "w3", vec![MIB, MIB]);
    d.succeed_with(&key(1, 1, 0), "w3", vec![MIB, MIB]);
    d.succeed_with(&key(1, 3, 0), "w3", vec![MIB, MIB]);
    d.lose("w2");
    // Stage 2 has not run: every piece on w2 runs again, reading what it read before.
    let again: Vec<&QueuedAttempt> = d.queued.iter().filter(|q| q.key.stage == 1 && q.key.attempt == 1).collect();
    assert_eq!(again.len(), 4, "{:?}", d.waiting());
    let rerun = again.iter().find(|q| q.key.task == piece.task).unwrap();
    assert_eq!(rerun.reads, reads);
    assert_eq!(d.run.adapted(), (0, 1), "the layout is decided once");
}

/// Stage 0: 4 producers shuffling into 4 parts; stage 1, a final aggregate over them (its plan
/// `[1]`, its pieces' `[9]`), shuffling into 2 parts for stage 2, gathered by the final Stage
/// (or, without `consumer`, stage 1 is gathered by the final Stage).
fn aggregate_stages(consumer: bool) -> QueryRun {
    let task = |stage, task| NewTask { stage, task, partition: task, summary: format!("s{stage}t{task}"), plan: vec![stage as u8], slice_bytes: None };
    let reads = StageReads { inputs: vec![0], splittable: vec![], ordered: false, merge: Some((0, Arc::new(vec![9]))) };
    let mut stages = vec![
        NewStage { inputs: vec![], shuffle: true, parts: 4, tasks: (0..4).map(|t| task(0, t)).collect(), adaptive: None, ..Default::default() },
        NewStage { inputs: vec![0], shuffle: consumer, parts: if consumer { 2 } else { 1 }, tasks: (0..4).map(|t| task(1, t)).collect(), adaptive: Some(reads), ..Default::default() },
    ];
    if consumer {
        stages.push(NewStage { inputs: vec![1], shuffle: false, parts: 1, tasks: (0..2).map(|t| task(2, t)).collect(), adaptive: None, ..Default::default() });
    }
    let skew = Some(layout::Skew { factor: 5.0, min_bytes: MIB });
    QueryRun::new("q", stages).with_read_policy(layout::ReadPolicy { coalesce_target_bytes: None, skew, slots: 4 })
}

/// Runs stage 0 of [`aggregate_stages`] with partition 2 skewed; returns the pieces queued.
fn skew_aggregate_input(d: &mut Driver) -> Vec<QueuedAttempt> {
    for t in 0..4 {
        d.succeed_with(&key(0, t, 0), "w1", vec![MIB, MIB, 50 * MIB, MIB]);
    }
    d.queued.iter().filter(|q| q.key.stage == 1 && q.key.task >= 4).cloned().collect()
}

#[test]
fn a_skewed_partition_under_a_final_aggregate_is_merged_from_its_pieces() {
    let mut d = Driver::new(aggregate_stages(true));
    let pieces = skew_aggregate_input(&mut d);
    assert_eq!(pieces.len(), 4);
    assert!(pieces.iter().all(|q| *q.plan == vec![9] && q.partition == 2), "pieces run the partial-states plan over partition 2");
    let ranges: Vec<Vec<u32>> = pieces.iter().map(|q| q.reads[0].tasks.clone()).collect();
    assert_eq!(ranges, vec![vec![0], vec![1], vec![2], vec![3]]);
    assert!(!d.waiting().contains(&key(1, 2, 0)), "the merge waits for its pieces");
    assert_eq!(d.run.adapted(), (0, 1));
    for (n, q) in pieces.iter().enumerate() {
        assert!(!d.waiting().contains(&key(1, 2, 0)), "queued after {n} pieces");
        d.succeed_with(&q.key, "w2", vec![MIB]);
    }
    let merge = d.queued.iter().find(|q| q.key == key(1, 2, 0)).expect("the merge is queued once its pieces are done").clone();
    assert_eq!(merge.reads.as_slice(), &[ShuffleRead { stage: 0, parts: vec![0], tasks: vec![4, 5, 6, 7], merged_from: Some(1) }]);
    let read: Vec<(u32, u32)> = merge.inputs.iter().map(|l| l.key.as_ref().map(|k| (k.stage, k.task)).unwrap()).filter(|(s, _)| *s == 1).collect();
    assert_eq!(read, vec![(1, 4), (1, 5), (1, 6), (1, 7)], "it is told where its pieces are");
    assert!(merge.inputs.iter().all(|l| l.key.as_ref().unwrap().stage == 1), "and not of the producers it reads through them");
    for t in 0..4 {
        d.succeed_with(&key(1, t, 0), "w1", vec![MIB, MIB]);
    }
    // The consumer reads the four planned Tasks, never the pieces.
    let consumer = d.queued.iter().find(|q| q.key.stage == 2).expect("stage 2 runs");
    let from_stage_1: Vec<u32> = consumer.inputs.iter().filter_map(|l| l.key.as_ref()).filter(|k| k.stage == 1).map(|k| k.task).collect();
    assert_eq!(from_stage_1, vec![0, 1, 2, 3]);
    let metrics = &d.run.stage_metrics()[1];
    assert_eq!((metrics.tasks, metrics.tasks_done, metrics.split), (8, 8, 1));
    assert_eq!(metrics.partition_bytes, vec![4 * MIB, 4 * MIB], "pieces' partial states are not the Stage's output");
}

/// [`skew_aggregate_input`] with every piece done on w2 and the merge Task running on w3
/// (producers on w1).
fn merge_running_on_w3() -> Driver {
    let mut d = Driver::new(aggregate_stages(false));
    let pieces = skew_aggregate_input(&mut d);
    for q in &pieces {
        d.succeed_with(&q.key, "w2", vec![MIB]);
    }
    d.assign(&key(1, 2, 0), "w3");
    d
}

#[test]
fn a_merge_is_not_stopped_by_the_loss_of_producers_its_pieces_already_reduced() {
    let mut d = merge_running_on_w3();
    d.lose("w1");
    assert_eq!(d.state(&key(1, 2, 0)), TaskState::Running);
    d.report(&key(1, 2, 0), "w3", TaskState::Succeeded, None);
    assert!(d.published.iter().any(|(id, o)| *id == (1, 2) && o.is_some()));
}

#[test]
fn a_lost_piece_stops_its_merge_and_runs_again_before_it() {
    let mut d = merge_running_on_w3();
    d.lose("w2");
    assert_eq!(d.state(&key(1, 2, 0)), TaskState::Cancelled, "the merge read outputs that are gone");
    let again: Vec<TaskKey> = d.waiting().into_iter().filter(|k| k.stage == 1 && k.attempt == 1).collect();
    assert_eq!(again.iter().map(|k| k.task).collect::<Vec<_>>(), vec![4, 5, 6, 7], "only the pieces run again first");
    for k in &again {
        d.succeed_with(k, "w1", vec![MIB]);
    }
    assert!(d.waiting().contains(&key(1, 2, 1)));
    d.succeed(&key(1, 2, 1), "w1");
    // The final Stage is told of the merge's output, never of a piece's.
    let published: Vec<u32> = d.published.iter().filter(|(_, o)| o.is_some()).map(|((_, t), _)| *t).collect();
    assert_eq!(published, vec![2]);
}

/// Stage 0: two scan slices of 64 MiB (cuttable at dispatch), shuffled into 2 parts when
/// `shuffle`, else gathered by the final Stage; stage 1 (with `shuffle`): 2 Tasks reading them.
fn sliced_scan(shuffle: bool) -> QueryRun {
    sliced_scan_of(2, shuffle)
}

fn sliced_scan_of(slices: u32, shuffle: bool) -> QueryRun {
    sliced_scan_sized(slices, 64 << 20, shuffle)
}

fn sliced_scan_sized(slices: u32, bytes: u64, shuffle: bool) -> QueryRun {
    let slice = |task| NewTask { stage: 0, task, partition: 0, summary: format!("slice {task}"), plan: vec![0], slice_bytes: Some(bytes) };
    let reader = |task| NewTask { stage: 1, task, partition: task, summary: String::new(), plan: vec![1], slice_bytes: None };
    let mut stages = vec![NewStage { inputs: vec![], shuffle, parts: if shuffle { 2 } else { 1 }, tasks: (0..slices).map(slice).collect(), adaptive: None, ..Default::default() }];
    if shuffle {
        stages.push(NewStage { inputs: vec![0], shuffle: false, parts: 1, tasks: (0..2).map(reader).collect(), adaptive: None, ..Default::default() });
    }
    QueryRun::new("q", stages).with_granularity(Some(granularity::Granularity { piece_min_bytes: 8 << 20 }))
}

impl Driver {
    fn cut(&mut self, key: &TaskKey, slots: usize) -> bool {
        let mut out = Vec::new();
        let cut = self.run.cut_slice(key, slots, self.now, &mut out);
        self.take(out);
        cut
    }
}

#[test]
fn a_slice_too_large_for_the_idle_slots_is_cut_into_pieces_that_stand_for_it() {
    let mut d = Driver::new(sliced_scan(false));
    // 128 MiB queued over 5 slots: a 64 MiB slice is over two shares.
    assert!(d.cut(&key(0, 0, 0), 5));
    assert_eq!(d.waiting(), vec![key(0, 1, 0), key(0, 2, 0), key(0, 3, 0)]);
    let pieces: Vec<_> = d.queued.iter().filter_map(|q| q.slice.map(|p| (q.key.task, p.index, p.of))).collect();
    assert_eq!(pieces, vec![(2, 0, 2), (3, 1, 2)]);
    assert!(matches!(&d.published[..], [((0, 0), Some(TaskOutcome::Pieces(ids)))] if ids == &vec![(0, 2), (0, 3)]));
    // Pieces are never cut again; the other slice is now alone, a fair share of one slot.
    assert!(!d.cut(&key(0, 2, 0), 5));
    assert!(!d.cut(&key(0, 1, 0), 1));
    assert_eq!(d.run.task_total(), 3);
    assert_eq!(d.run.slices_cut(), 1);
}

#[test]
fn a_slice_is_cut_only_for_slots_about_to_go_idle() {
    // Regression (q16): the last slice of a Stage was cut for 2 slots while the other slot had
    // just started an equal slice; the same slot then read both pieces one after the other.
    // An odd size: the share of one queued slice over 2 slots, doubled, fell a byte short.
    let mut d = Driver::new(sliced_scan_sized(2, (64 << 20) + 1, false));
    d.assign(&key(0, 0, 0), "w1");
    assert!(!d.cut(&key(0, 1, 0), 2), "the other slot is busy for a whole slice");
    // With 2 slots idle beside it, the slice is cut for them.
    assert!(d.cut(&key(0, 1, 0), 4));
    // Half way through at the pace of a finished slice, a running slice counts for half.
    let mut d = Driver::new(sliced_scan_sized(4, 64 << 20, false));
    let start = d.now;
    for (t, w) in [(0, "w1"), (1, "w2")] {
        d.assign(&key(0, t, 0), w);
    }
    d.at_ms(start, 100);
    d.report(&key(0, 0, 0), "w1", TaskState::Succeeded, None);
    d.assign(&key(0, 2, 0), "w1");
    d.at_ms(start, 150);
    // Slice 0 took 100 ms. Left to read: slice 3 (64 MiB), slice 1 (running 150 ms: about
    // done) and slice 2 (running 50 ms: 32 MiB left), 96 MiB. Over 3 slots the share is 32
    // MiB, and slice 3 not over two of them (counting queued slices only, it would be cut).
    assert!(!d.cut(&key(0, 3, 0), 3));
    // Over 4 slots, 24 MiB: cut (counting running slices whole, it would not be).
    assert!(d.cut(&key(0, 3, 0), 4));
    // 3 slices: once one has finished in 100 ms, another that has run 100 ms is about done.
    let mut d = Driver::new(sliced_scan_of(3, false));
    let start = d.now;
    d.assign(&key(0, 0, 0), "w1");
    d.assign(&key(0, 1, 0), "w2");
    d.at_ms(start, 100);
    d.report(&key(0, 0, 0), "w1", TaskState::Succeeded, None);
    assert!(d.cut(&key(0, 2, 0), 4), "w2 is about to go idle too");
}

#[test]
fn only_a_first_attempt_still_queued_is_cut() {
    let mut d = Driver::new(sliced_scan(false));
    d.assign(&key(0, 0, 0), "w1");
    assert!(!d.cut(&key(0, 0, 0), 4), "running");
    d.report(&key(0, 0, 0), "w1", TaskState::Failed, Some(io_error()));
    d.now += Duration::from_secs(5);
    assert!(d.waiting().contains(&key(0, 0, 1)));
    assert!(!d.cut(&key(0, 0, 1), 4), "a retry reads what its Task was given");
}

#[test]
fn consumers_of_a_cut_slice_read_its_pieces_with_the_other_producers() {
    let mut d = Driver::new(sliced_scan(true));
    assert!(d.cut(&key(0, 1, 0), 5));
    for (task, worker) in [(0, "w1"), (2, "w2"), (3, "w1")] {
        d.succeed(&key(0, task, 0), worker);
    }
    assert_eq!(d.waiting(), vec![key(1, 0, 0), key(1, 1, 0)]);
    let inputs = &d.queued.last().unwrap().inputs;
    let read: Vec<_> = inputs.iter().map(|l| (l.key.clone().unwrap().task, l.empty, l.pieces.clone())).collect();
    assert_eq!(read, vec![(0, false, vec![]), (1, true, vec![2, 3]), (2, false, vec![]), (3, false, vec![])]);
}

#[test]
fn a_piece_of_a_cut_slice_paces_its_worker_by_its_share_of_a_whole_tasks_work() {
    let mut d = Driver::new(sliced_scan_of(4, false));
    let start = d.now;
    for (t, w) in [(0, "w1"), (1, "w2"), (2, "w3")] {
        d.assign(&key(0, t, 0), w);
    }
    d.at_ms(start, 200);
    for (t, w) in [(0, "w1"), (1, "w2"), (2, "w3")] {
        d.report(&key(0, t, 0), w, TaskState::Succeeded, None);
    }
    assert!(d.cut(&key(0, 3, 0), 4));
    let (piece, of) = d.queued.iter().find_map(|q| q.slice.map(|p| (q.key.task, p.of))).unwrap();
    assert!(of >= 2, "{of}");
    d.assign(&key(0, piece, 0), "w4");
    // Whole Tasks took 200 ms; the piece does 1/of of one, and took 1.5 times its share.
    d.at_ms(start, 200 + 300 / of as u64);
    d.paces.clear();
    d.report(&key(0, piece, 0), "w4", TaskState::Succeeded, None);
    let ratio = d.paces.iter().find(|(w, _)| w == "w4").map(|(_, r)| *r).unwrap();
    assert!((ratio - 1.5).abs() < 0.05, "a piece measured as a whole Task would look fast: {ratio}");
}

/// Stage 0: 2 producers shuffling into 4 parts, read by the 4 Tasks of stage 1 (whose reads
/// the planner found adaptable), which the final Stage gathers; speculation on. The producers
/// write `part_mib` MiB into each part.
fn weighed_stages(part_mib: [u64; 4]) -> (Driver, Instant) {
    let reads = StageReads { inputs: vec![0], splittable: vec![0], ordered: false, merge: None };
    let task = |stage, task| NewTask { stage, task, partition: task, summary: format!("s{stage}t{task}"), plan: vec![stage as u8], slice_bytes: None };
    let run = QueryRun::new(
        "q",
        vec![
            NewStage { inputs: vec![], shuffle: true, parts: 4, tasks: (0..2).map(|t| task(0, t)).collect(), adaptive: None, ..Default::default() },
            NewStage { inputs: vec![0], shuffle: false, parts: 1, tasks: (0..4).map(|t| task(1, t)).collect(), adaptive: Some(reads), ..Default::default() },
        ],
    );
    let policy = policy::Speculation { quantile: 0.75, multiplier: 1.5, min_runtime: Duration::from_millis(100), max_fraction: 0.25, lone_runtime: None };
    let mut d = Driver::new(run.with_speculation(Some(policy)));
    for (t, w) in [(0, "w1"), (1, "w2")] {
        d.succeed_with(&key(0, t, 0), w, part_mib.iter().map(|m| m * 1024 * 1024).collect());
    }
    let start = d.now;
    for (t, w) in [(0, "w1"), (1, "w2"), (2, "w3"), (3, "w4")] {
        d.assign(&key(1, t, 0), w);
    }
    d.at_ms(start, 200);
    for (t, w) in [(0, "w1"), (1, "w2"), (3, "w4")] {
        d.report(&key(1, t, 0), w, TaskState::Succeeded, None);
    }
    (d, start)
}

#[test]
fn a_task_reading_six_times_the_median_gets_six_times_as_long_before_it_is_speculated() {
    // Regression: the Task of an unsplit skewed partition was speculated after 1.5 times the
    // others' time, only for its copy to do the same work again on another worker.
    let (mut d, start) = weighed_stages([1, 1, 6, 1]);
    d.at_ms(start, 400);
    d.speculate();
    assert!(d.waiting().is_empty(), "400 ms for six times the bytes of a 200 ms Task is no straggler");
    d.at_ms(start, 1900);
    d.speculate();
    assert_eq!(d.waiting(), vec![key(1, 2, 1)], "past 1.5 × 200 ms × 6 it is one");
    // The same Stage with even partitions speculates at once.
    let (mut even, start) = weighed_stages([1, 1, 1, 1]);
    even.at_ms(start, 400);
    even.speculate();
    assert_eq!(even.waiting(), vec![key(1, 2, 1)]);
}

#[test]
fn a_worker_that_ran_a_heavy_task_is_paced_by_its_work_not_its_time() {
    let (mut d, start) = weighed_stages([1, 1, 6, 1]);
    d.at_ms(start, 1200);
    d.paces.clear();
    d.report(&key(1, 2, 0), "w3", TaskState::Succeeded, None);
    let ratio = d.paces.iter().find(|(w, _)| w == "w3").map(|(_, r)| *r).unwrap();
    assert!((ratio - 1.0).abs() < 0.05, "1.2 s for six times a 200 ms Task's bytes is a typical pace: {ratio}");
}

/// Stage 0 (2 Tasks) is a join's build side, stage 1 (2 Tasks) its probe side, stage 2 the join.
fn joined_by_key_filter() -> QueryRun {
    let task = |stage, task| NewTask { stage, task, partition: task, summary: String::new(), plan: vec![stage as u8], slice_bytes: None };
    QueryRun::new(
        "q",
        vec![
            NewStage { shuffle: true, parts: 2, tasks: (0..2).map(|t| task(0, t)).collect(), key_summary: vec![0], ..Default::default() },
            NewStage { shuffle: true, parts: 2, tasks: (0..2).map(|t| task(1, t)).collect(), key_filter: Some((0, vec![1])), ..Default::default() },
            NewStage { inputs: vec![0, 1], parts: 1, tasks: (0..2).map(|t| task(2, t)).collect(), ..Default::default() },
        ],
    )
}

impl Driver {
    fn succeed_with_keys(&mut self, key: &TaskKey, worker: &str, summary: Option<SummaryForm>) {
        self.assign(key, worker);
        let mut out = Vec::new();
        let report = Report {
            key: key.clone(),
            worker_id: worker.into(),
            state: TaskState::Succeeded,
            rows: 10,
            bytes: 100,
            elapsed_ms: 1,
            error: None,
            part_rows: vec![5, 5],
            part_bytes: vec![50, 50],
            key_summary: summary,
            filter_rows: (0, 0),
        };
        self.run.reported(report, self.now, &mut out);
        self.take(out);
    }
}

#[test]
fn an_ended_query_keeps_its_records_but_not_its_plans_summaries_and_filters() {
    // Regression: the history (up to QUERY_HISTORY_MAX Queries) kept every Task's plan and
    // every build Task's key summary, up to a MiB each, long after its Query ended.
    let mut d = Driver::new(joined_by_key_filter());
    d.succeed_with_keys(&key(0, 0, 0), "a", Some(SummaryForm::Hashes(vec![1, 2, 3])));
    d.succeed_with_keys(&key(0, 1, 0), "b", Some(SummaryForm::Hashes(vec![7])));
    assert!(d.run.stages[1].filter.is_some());
    let records = d.run.records().count();
    let mut out = Vec::new();
    d.run.end(d.now, &mut out);
    assert_eq!(d.run.records().count(), records, "what the history shows stays");
    assert!(d.run.tasks.values().all(|t| t.plan.is_empty() && t.key_summary.is_none()));
    assert!(d.run.tasks.values().flat_map(|t| &t.attempts).all(|a| a.inputs.is_empty()));
    assert!(d.run.stages.iter().all(|s| s.filter.as_ref().is_none_or(Option::is_none)));
}

#[test]
fn the_probe_stage_waits_for_the_build_stages_keys_and_gets_their_filter() {
    let mut d = Driver::new(joined_by_key_filter());
    assert_eq!(d.waiting(), vec![key(0, 0, 0), key(0, 1, 0)], "the probe Stage waits for the build Stage");
    d.succeed_with_keys(&key(0, 0, 0), "a", Some(SummaryForm::Hashes(vec![1, 2, 3])));
    assert_eq!(d.waiting(), vec![key(0, 1, 0)]);
    d.succeed_with_keys(&key(0, 1, 0), "b", Some(SummaryForm::Hashes(vec![7])));
    assert_eq!(d.waiting(), vec![key(1, 0, 0), key(1, 1, 0)]);
    assert!(d.run.key_work(1).1.is_some(), "every probe Attempt gets the filter");
}

/// A build Stage held for scalar subquery values may wait as long as they take: its probe
/// Stage runs beside them instead, and filters late.
#[test]
fn the_probe_stage_does_not_wait_for_a_build_stage_held_for_subqueries() {
    let mut run = joined_by_key_filter();
    run.stages[0].held = true;
    let mut d = Driver::new(run);
    assert_eq!(d.waiting(), vec![key(1, 0, 0), key(1, 1, 0)]);
    assert_eq!(d.run.late_filter_keys(1), vec![1], "it filters once the filter is decided");
    d.assign(&key(1, 0, 0), "c");
    let mut out = Vec::new();
    d.run.release(0, vec![vec![0], vec![0]], d.now, &mut out).unwrap();
    d.take(out);
    assert_eq!(d.waiting(), vec![key(1, 1, 0), key(0, 0, 0), key(0, 1, 0)]);
    d.succeed_with_keys(&key(0, 0, 0), "a", Some(SummaryForm::Hashes(vec![1])));
    d.succeed_with_keys(&key(0, 1, 0), "b", Some(SummaryForm::Hashes(vec![2])));
    assert_eq!(d.filters_sent, vec![(1, vec![url("c")])], "the running probe Attempt gets the filter");
    assert!(d.run.key_work(1).1.is_some(), "the queued one gets it with its assignment");
}

/// Also when the build Stage waits only because a Stage it reads is held.
#[test]
fn the_probe_stage_does_not_wait_for_a_build_stage_whose_input_is_held() {
    let task = |stage, task| NewTask { stage, task, partition: task, summary: String::new(), plan: vec![], slice_bytes: None };
    let stages = vec![
        NewStage { shuffle: true, parts: 1, tasks: vec![task(0, 0)], held: true, ..Default::default() },
        NewStage { inputs: vec![0], shuffle: true, parts: 1, tasks: vec![task(1, 0)], key_summary: vec![0], ..Default::default() },
        NewStage { shuffle: true, parts: 1, tasks: vec![task(2, 0)], key_filter: Some((1, vec![0])), ..Default::default() },
        NewStage { shuffle: true, parts: 1, tasks: vec![task(3, 0)], key_filter: Some((1, vec![0])), ..Default::default() },
        NewStage { inputs: vec![1, 2], parts: 1, tasks: vec![task(4, 0)], ..Default::default() },
    ];
    let mut d = Driver::new(QueryRun::new("q", stages));
    assert_eq!(d.waiting(), vec![key(2, 0, 0), key(3, 0, 0)]);
    let mut out = Vec::new();
    d.run.release(0, vec![vec![0]], d.now, &mut out).unwrap();
    d.take(out);
    assert_eq!(d.waiting(), vec![key(2, 0, 0), key(3, 0, 0), key(0, 0, 0)]);
}

#[test]
fn probe_attempts_assigned_once_the_build_stage_has_finished_get_its_filter() {
    let mut d = Driver::new(joined_by_key_filter().with_key_filter_wait(false));
    // The probe Stage does not wait (a slot with nothing else to do takes its Tasks unfiltered),
    // but the build Stage is on the longer path, so it goes first.
    assert_eq!(d.waiting(), vec![key(0, 0, 0), key(0, 1, 0), key(1, 0, 0), key(1, 1, 0)]);
    assert!(d.run.stage_height(0) > d.run.stage_height(1), "the build Stage is on the longer path");
    assert_eq!(d.run.key_work(0), (vec![0], None), "build Tasks summarize column 0");
    d.succeed_with_keys(&key(0, 0, 0), "a", Some(SummaryForm::Hashes(vec![1, 2, 3])));
    assert_eq!(d.run.key_work(1), (vec![], None), "no filter before every build Task has its keys in");
    d.succeed_with_keys(&key(0, 1, 0), "b", Some(SummaryForm::Hashes(vec![7])));
    let (summarize, filter) = d.run.key_work(1);
    let filter = filter.expect("the probe Stage gets a filter");
    assert!(summarize.is_empty());
    assert_eq!(filter.keys, vec![1]);
    let expected = KeyFilter::combine([&SummaryForm::Hashes(vec![1, 2, 3]), &SummaryForm::Hashes(vec![7])]).unwrap();
    assert_eq!(KeyFilter::from_bytes(&filter.bits).unwrap(), expected);
    // A build output lost now keeps its keys: the probe Stage's retries get the same filter.
    d.lose("a");
    assert_eq!(d.run.key_work(1).1.map(|f| f.bits), Some(expected.to_bytes()));
}

#[test]
fn probe_attempts_running_when_the_filter_is_decided_get_it_where_they_run() {
    let mut d = Driver::new(joined_by_key_filter().with_key_filter_wait(false));
    assert_eq!(d.run.late_filter_keys(0), Vec::<u32>::new(), "the build Stage filters nothing");
    assert_eq!(d.run.late_filter_keys(1), vec![1], "a probe Attempt assigned now filters column 1 once the filter arrives");
    d.assign(&key(1, 0, 0), "c");
    d.succeed_with_keys(&key(0, 0, 0), "a", Some(SummaryForm::Hashes(vec![1, 2, 3])));
    assert!(d.filters_sent.is_empty(), "no filter before every build Task has its keys in");
    d.assign(&key(1, 1, 0), "d");
    d.succeed_with_keys(&key(0, 1, 0), "b", Some(SummaryForm::Hashes(vec![7])));
    assert_eq!(d.filters_sent, vec![(1, vec![url("c"), url("d")])], "sent once, to the workers running probe Attempts");
    assert_eq!(d.run.late_filter_keys(1), Vec::<u32>::new(), "decided: Attempts assigned now get it with their Task");
}

#[test]
fn a_filter_is_sent_only_to_probe_attempts_still_running() {
    let mut d = Driver::new(joined_by_key_filter().with_key_filter_wait(false));
    // Probe Task 0 ran and ended before the filter was decided; Task 1 is queued, unassigned.
    d.succeed_with_keys(&key(1, 0, 0), "c", None);
    d.succeed_with_keys(&key(0, 0, 0), "a", Some(SummaryForm::Hashes(vec![1])));
    d.succeed_with_keys(&key(0, 1, 0), "b", Some(SummaryForm::Hashes(vec![2])));
    assert!(d.filters_sent.is_empty(), "sent to {:?}", d.filters_sent);
    assert!(d.run.key_work(1).1.is_some(), "the queued probe Task gets it with its assignment");
}

#[test]
fn a_build_task_that_reports_no_keys_leaves_the_probe_stage_unfiltered() {
    let mut d = Driver::new(joined_by_key_filter());
    d.succeed_with_keys(&key(0, 0, 0), "a", Some(SummaryForm::Hashes(vec![1])));
    d.succeed_with_keys(&key(0, 1, 0), "a", None);
    assert_eq!(d.waiting(), vec![key(1, 0, 0), key(1, 1, 0)], "the probe Stage runs all the same");
    assert_eq!(d.run.key_work(1).1, None, "unfiltered");
}
