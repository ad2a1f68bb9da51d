//! Retry policy: which failures an Attempt is retried after, how long it waits first, and when a
//! Task or a Query has retried enough; and when a running Attempt is a straggler worth a
//! speculative second Attempt. The Attempt state machine ([`super::attempts`]) asks; the rules
//! live here, not inside it.

use std::time::Duration;

use super::attempts::TaskId;
use super::granularity::Granularity;
use super::layout::ReadPolicy;
use crate::config::{QuiverOptions, MEMORY_NEARLY_FULL_FRACTION, QUERY_RETRIES_MAX, RETRY_BACKOFF_MAX_MS, RETRY_BACKOFF_MS, TASK_ATTEMPTS_MAX};
use crate::protocol::QuiverError;

/// Whether an Attempt that failed with `error` is run again: its kind decides (a lost or
/// unreachable worker, an unreadable input, I/O, memory), never its text.
pub fn is_retryable(error: &QuiverError) -> bool {
    error.kind.is_retryable()
}

/// The pause before the next Attempt of a Task that failed `failures` times.
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    Duration::from_millis((RETRY_BACKOFF_MS << shift).min(RETRY_BACKOFF_MAX_MS))
}

/// The Query's error when Task `id` has failed `failures` times: its last failure, in its own
/// words and kind, with how often it failed.
pub fn task_exhausted(failures: u32, last: Option<&QuiverError>, id: TaskId) -> Option<QuiverError> {
    (failures >= TASK_ATTEMPTS_MAX).then(|| {
        let mut error = last.cloned().unwrap_or_else(|| QuiverError::new(crate::protocol::ErrorKind::Execution, "task failed"));
        error.message = format!("{} (stage {} task {} failed {failures} attempts)", error.message, id.0, id.1);
        error.output = None;
        error
    })
}

/// The Query's error when it has started `extra` Attempts beyond its Tasks' first ones.
pub fn query_exhausted(extra: u32, last: Option<&QuiverError>) -> Option<QuiverError> {
    (extra > QUERY_RETRIES_MAX).then(|| {
        let last = last.map(|e| e.message.as_str()).unwrap_or("none");
        QuiverError::new(
            crate::protocol::ErrorKind::Execution,
            format!("the query retried more than {QUERY_RETRIES_MAX} attempts; last failure: {last}"),
        )
    })
}

/// The adaptive scheduling a Query runs under, from its session's `quiver.*` settings.
#[derive(Clone, Debug, Default)]
pub struct Adaptive {
    pub speculation: Option<Speculation>,
    /// Workers slower than this leave Tasks to faster ones; None: off.
    pub slow_pace: Option<SlowPace>,
    /// How shuffle reads adapt (its slots are the cluster's when the Query is submitted).
    pub reads: ReadPolicy,
    /// When queued scan slices are cut into pieces; None: never.
    pub granularity: Option<Granularity>,
    /// A key filter's probe Stage waits for its build Stage.
    pub key_filter_wait: bool,
}

impl Adaptive {
    pub fn from_options(options: &QuiverOptions) -> Self {
        let slow_pace = options
            .slow_worker_placement
            .then_some(SlowPace { limit: options.slow_worker_pace.max(1.0), stalls: options.slow_worker_stalls });
        Self {
            speculation: Speculation::from_options(options),
            slow_pace,
            reads: ReadPolicy::from_options(options, 1),
            granularity: Granularity::from_options(options),
            key_filter_wait: options.join_key_filter_wait,
        }
    }
}

/// When a worker counts as slow for placement: its pace is over `limit`, counting its stalls
/// (how long its process was held off the CPU) when `stalls` is set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowPace {
    pub limit: f64,
    pub stalls: bool,
}

/// Batched dispatch: a poll that already took an Attempt takes another only while `ready`
/// Attempts wait and the other workers' `free_elsewhere` slots could not take them all, so a
/// batch never leaves an idle worker without work.
pub fn batch_more(ready: usize, free_elsewhere: usize) -> bool {
    ready > free_elsewhere
}

/// Finished Tasks a Stage needs before its median time says anything about a worker's pace.
const PACE_SAMPLES_MIN: usize = 3;
/// Weight of the newest sample in a worker's pace (an exponential moving average).
const PACE_WEIGHT: f64 = 0.3;
/// A single sample counts at most this far from 1 either way: one odd Task cannot condemn a
/// worker for long.
const PACE_RATIO_MAX: f64 = 20.0;
/// A pace's excess over 1 halves every this long without a new sample (see [`pace_now`]).
pub const PACE_HALF_LIFE_MS: u64 = 10_000;
/// A Task's reads count as at least this many bytes when it is weighed against its Stage's
/// median (see [`task_weights`]): below it, a Task's time is mostly fixed cost.
pub const TASK_WEIGHT_BYTES_MIN: u64 = 1024 * 1024;
/// No Task counts more than this many typical Tasks' work: a Task's time grows slower than
/// its bytes (fixed costs, the other side of a join read whole), and a heavy Task on a slow
/// worker must still be speculated in bounded time, its fast pace sample bounded too.
pub const TASK_WEIGHT_MAX: f64 = 8.0;

/// Each Task's work against its Stage's median Task, from the bytes each reads: a Task reading
/// `k` times the median does `k` times the work. Never below 1: fixed costs dominate a small
/// Task, and measured by its bytes it would make its worker look slow. Reads under
/// [`TASK_WEIGHT_BYTES_MIN`] count as that much, so that a Stage of mostly empty partitions
/// does not weigh its one real Task without bound; and never over [`TASK_WEIGHT_MAX`]. The
/// lower median: of two Tasks (one per slot on a small cluster), the upper would be the heavy
/// one itself.
pub fn task_weights(bytes: &[u64]) -> Vec<f64> {
    let mut sorted = bytes.to_vec();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len().saturating_sub(1) / 2).copied().unwrap_or(0).max(TASK_WEIGHT_BYTES_MIN);
    bytes.iter().map(|&b| (b.max(TASK_WEIGHT_BYTES_MIN) as f64 / median as f64).clamp(1.0, TASK_WEIGHT_MAX)).collect()
}

/// The median of `durations`, when there are enough of them to judge a pace by.
pub fn median_if_enough(durations: &mut [Duration]) -> Option<Duration> {
    if durations.len() < PACE_SAMPLES_MIN {
        return None;
    }
    durations.sort();
    Some(durations[durations.len() / 2])
}

/// A worker's pace after an Attempt on it took `ratio` times its Stage's median: 1 is typical,
/// 4 means four times slower. An Attempt beaten by a speculative copy and stopped
/// (`at_least`) would have taken longer than `ratio`: it can only raise the pace. Its `ratio`
/// is where speculation cut it off (about 2.5 with the defaults), whatever the worker's real
/// pace; taken as an ordinary sample, it would pull a worker known to be 8 times slower back
/// towards 2.5 each time it is beaten.
pub fn pace_after(pace: f64, ratio: f64, at_least: bool) -> f64 {
    let ratio = ratio.clamp(1.0 / PACE_RATIO_MAX, PACE_RATIO_MAX);
    let moved = pace * (1.0 - PACE_WEIGHT) + ratio * PACE_WEIGHT;
    if at_least {
        moved.max(pace)
    } else {
        moved
    }
}

/// A worker's pace `since` its last sample: the excess over 1 halves every
/// [`PACE_HALF_LIFE_MS`]. A worker left without Tasks for being slow gets no new samples; this
/// way it is tried again, and a worker that was slow only for a while is not shunned for good.
pub fn pace_now(pace: f64, since: Duration) -> f64 {
    1.0 + (pace - 1.0) * 0.5f64.powf(since.as_secs_f64() * 1e3 / PACE_HALF_LIFE_MS as f64)
}

/// How many times longer work takes on a worker whose process was held off the CPU for
/// `stalled_ms` of the `busy_ms` it ran Attempts: stopped three quarters of the time, it does a
/// quarter of the work, 4 times slower. Its Attempts' durations hide this when they are short
/// enough to fit between stalls, but whatever reads its outputs waits out every stall.
pub fn stall_ratio(busy_ms: u64, stalled_ms: u64) -> f64 {
    let running = busy_ms.saturating_sub(stalled_ms).max(1) as f64;
    (busy_ms.max(1) as f64 / running).min(PACE_RATIO_MAX)
}

/// A slow Attempt's sample is dropped when it read outputs of a worker this many times slower
/// than its own (see `Registry::paced`): a little slower proves nothing, and would drop half
/// the samples of workers about as fast as each other.
pub const SLOWER_SOURCE_FACTOR: f64 = 1.5;

/// Whether a worker whose pace is over the limit leaves the ready Attempts to the faster
/// workers (after LATE, OSDI 2008). While it runs one Attempt, `pace` times a typical one, each
/// faster slot runs about `pace` of them: when the faster slots can clear every ready Attempt
/// in that time, the slow worker's taking one would only make it the Stage's last. With more
/// ready than that, it helps.
pub fn leave_to_faster_workers(ready: usize, pace: f64, faster_slots: usize) -> bool {
    ready as f64 <= faster_slots as f64 * pace.min(PACE_RATIO_MAX)
}

/// Whether a worker using `used` of its `limit` bytes is too full to take a new Task while
/// another worker has room (outputs it holds and Tasks it runs count; a new Task would spill).
pub fn memory_nearly_full(used: u64, limit: u64) -> bool {
    limit > 0 && used as f64 > limit as f64 * MEMORY_NEARLY_FULL_FRACTION
}

/// When a running Attempt gets a speculative copy (after Spark's `spark.speculation.*`): once
/// `quantile` of its Stage's Tasks have finished, an Attempt that has run longer than
/// `multiplier` times their median, and at least `min_runtime`, is a straggler. Before that,
/// while every unfinished Task of the Stage runs (none waits for a slot), so that no more will
/// finish to measure by, one that has run `lone_runtime` and that long against what did finish
/// is: a Stage of one Task, or of a few that landed on one stalled worker, would otherwise wait
/// for that worker however long it takes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Speculation {
    pub quantile: f64,
    pub multiplier: f64,
    pub min_runtime: Duration,
    pub max_fraction: f64,
    pub lone_runtime: Option<Duration>,
}

/// How long an Attempt may run before it is a straggler: `per_task` for a typical Task's work,
/// scaled to the work of the Attempt's Task, and never less than `floor`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Threshold {
    per_task: Duration,
    floor: Duration,
}

impl Threshold {
    /// The threshold of a Task doing `work` typical Tasks' work (a fraction for a piece of a
    /// cut slice, more for a Task that reads more than its Stage's median).
    pub fn for_work(&self, work: f64) -> Duration {
        self.per_task.mul_f64(work).max(self.floor)
    }
}

impl Speculation {
    /// The policy the options ask for; None when speculation is off.
    pub fn from_options(options: &QuiverOptions) -> Option<Self> {
        options.speculation.then(|| Self {
            quantile: options.speculation_quantile.clamp(0.0, 1.0),
            multiplier: options.speculation_multiplier.max(1.0),
            min_runtime: Duration::from_millis(options.speculation_min_runtime_ms),
            max_fraction: options.speculation_max_fraction.clamp(0.0, 1.0),
            lone_runtime: (options.speculation_lone_task_ms > 0).then(|| Duration::from_millis(options.speculation_lone_task_ms)),
        })
    }

    /// How long an Attempt of a Stage of `tasks` Tasks may run before it is a straggler, given
    /// how long its finished Tasks took (each scaled to a whole Task's work) and whether all its
    /// unfinished Tasks run; None while nothing can tell.
    pub fn threshold(&self, finished: &mut [Duration], tasks: usize, all_running: bool) -> Option<Threshold> {
        let needed = ((self.quantile * tasks as f64).floor() as usize).max(1);
        if finished.len() >= tasks {
            return None;
        }
        finished.sort();
        let per_task = finished.get(finished.len() / 2).map_or(Duration::ZERO, |median| median.mul_f64(self.multiplier));
        if finished.len() < needed {
            return self.lone_runtime.filter(|_| all_running).map(|lone| Threshold { per_task, floor: lone.max(self.min_runtime) });
        }
        Some(Threshold { per_task, floor: self.min_runtime })
    }

    /// Speculative Attempts a Stage of `tasks` Tasks may start in all.
    pub fn budget(&self, tasks: usize) -> usize {
        ((self.max_fraction * tasks as f64).ceil() as usize).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn whole(threshold: Option<Threshold>) -> Option<Duration> {
        threshold.map(|t| t.for_work(1.0))
    }

    #[test]
    fn a_worker_stopped_most_of_the_time_is_as_slow_as_its_share_of_the_cpu() {
        assert_eq!(stall_ratio(500, 0), 1.0);
        assert_eq!(stall_ratio(500, 375), 4.0);
        assert_eq!(stall_ratio(500, 500), PACE_RATIO_MAX, "a sample is bounded");
        assert_eq!(stall_ratio(0, 0), 1.0);
    }

    #[test]
    fn a_straggler_is_measured_against_the_finished_median_and_the_minimum() {
        let s = Speculation { quantile: 0.75, multiplier: 1.5, min_runtime: ms(100), max_fraction: 0.25, lone_runtime: None };
        // 2 of 4 finished: below the quantile.
        assert_eq!(whole(s.threshold(&mut [ms(400), ms(200)], 4, true)), None);
        assert_eq!(whole(s.threshold(&mut [ms(400), ms(200), ms(300)], 4, true)), Some(ms(450)));
        assert_eq!(whole(s.threshold(&mut [ms(10), ms(20), ms(30)], 4, true)), Some(ms(100)), "the minimum runtime holds");
        assert_eq!(whole(s.threshold(&mut [ms(10); 4], 4, true)), None, "nothing left to speculate on");
        assert_eq!((s.budget(1), s.budget(8), s.budget(9)), (1, 2, 3));
    }

    #[test]
    fn a_piece_of_a_task_is_a_straggler_after_its_share_of_the_threshold() {
        let s = Speculation { quantile: 0.75, multiplier: 1.5, min_runtime: ms(100), max_fraction: 0.25, lone_runtime: None };
        let threshold = s.threshold(&mut [ms(400), ms(200), ms(300)], 4, true).unwrap();
        assert_eq!(threshold.for_work(0.5), ms(225));
        assert_eq!(threshold.for_work(0.1), ms(100), "the minimum runtime holds for a piece too");
    }

    #[test]
    fn a_task_with_nothing_to_compare_with_is_a_straggler_after_the_lone_runtime() {
        let s = Speculation { quantile: 0.75, multiplier: 1.5, min_runtime: ms(100), max_fraction: 0.25, lone_runtime: Some(ms(5_000)) };
        // A Stage of one Task, and one whose four Tasks all run.
        assert_eq!(whole(s.threshold(&mut [], 1, true)), Some(ms(5_000)));
        assert_eq!(whole(s.threshold(&mut [ms(10)], 4, true)), Some(ms(5_000)));
        // The few that finished still count: a Task is never slow for running as long as they.
        assert_eq!(whole(s.threshold(&mut [ms(8_000)], 4, true)), Some(ms(12_000)));
        // While some Task waits for a slot, the Stage's own Tasks will tell soon enough.
        assert_eq!(whole(s.threshold(&mut [ms(10)], 4, false)), None);
        // Once enough have finished, their median decides.
        assert_eq!(whole(s.threshold(&mut [ms(400), ms(200), ms(300)], 4, true)), Some(ms(450)));
        assert_eq!(whole(s.threshold(&mut [ms(10)], 1, true)), None, "nothing left to speculate on");
        let tiny = Speculation { min_runtime: ms(200), lone_runtime: Some(ms(1)), ..s };
        assert_eq!(whole(tiny.threshold(&mut [], 1, true)), Some(ms(200)), "the minimum runtime holds");
    }

    #[test]
    fn a_pace_moves_towards_each_sample_and_one_sample_cannot_run_away() {
        let slow = (0..10).fold(1.0, |pace, _| pace_after(pace, 4.0, false));
        assert!(slow > 3.8 && slow < 4.0, "{slow}");
        assert!(pace_after(1.0, 1e9, false) <= 1.0 * 0.7 + PACE_RATIO_MAX * 0.3);
    }

    #[test]
    fn a_beaten_attempt_can_only_raise_a_pace() {
        // Beaten after 2.5 medians: a typical worker looks slower…
        assert!((pace_after(1.0, 2.5, true) - 1.45).abs() < 1e-9);
        // …but one known to be 8 times slower is not taken for faster.
        assert_eq!(pace_after(8.0, 2.5, true), 8.0);
        // A finished Attempt is a whole sample either way.
        assert!((pace_after(8.0, 2.5, false) - 6.35).abs() < 1e-9);
        assert_eq!(median_if_enough(&mut [ms(1), ms(2)]), None);
        assert_eq!(median_if_enough(&mut [ms(9), ms(1), ms(5)]), Some(ms(5)));
    }

    #[test]
    fn a_slow_worker_leaves_what_the_faster_slots_clear_while_it_runs_one_attempt() {
        // Pace 4, 2 faster slots: they run 8 Attempts while it runs one.
        assert!(leave_to_faster_workers(8, 4.0, 2));
        assert!(!leave_to_faster_workers(9, 4.0, 2));
        // With no faster worker, a slow one takes everything.
        assert!(!leave_to_faster_workers(1, 4.0, 0));
        // A single odd pace cannot bench a worker beyond PACE_RATIO_MAX.
        assert!(!leave_to_faster_workers(2 * PACE_RATIO_MAX as usize + 1, 1e9, 2));
    }

    #[test]
    fn a_pace_without_news_returns_to_one() {
        assert_eq!(pace_now(5.0, Duration::ZERO), 5.0);
        assert!((pace_now(5.0, Duration::from_millis(PACE_HALF_LIFE_MS)) - 3.0).abs() < 1e-9);
        assert!((pace_now(0.5, Duration::from_millis(PACE_HALF_LIFE_MS)) - 0.75).abs() < 1e-9);
        assert!(pace_now(20.0, Duration::from_secs(600)) < 1.01);
    }

    #[test]
    fn speculation_follows_its_switch() {
        let mut options = QuiverOptions::default();
        assert!(Speculation::from_options(&options).is_some());
        options.speculation = false;
        assert!(Speculation::from_options(&options).is_none());
    }
    use crate::protocol::ErrorKind;

    #[test]
    fn a_task_weighs_its_bytes_against_the_lower_median_and_never_under_one() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(task_weights(&[10 * MIB, 10 * MIB, 50 * MIB, 5 * MIB]), vec![1.0, 1.0, 5.0, 1.0]);
        assert_eq!(task_weights(&[8 * MIB, 40 * MIB]), vec![1.0, 5.0], "of two, the heavy one is not its own median");
        // Tiny reads count as the minimum: a mostly empty Stage does not weigh without bound.
        assert_eq!(task_weights(&[0, 0, 0, 3 * MIB]), vec![1.0, 1.0, 1.0, 3.0]);
        assert_eq!(task_weights(&[0, 10]), vec![1.0, 1.0]);
        assert_eq!(task_weights(&[MIB, MIB, 200 * MIB]), vec![1.0, 1.0, TASK_WEIGHT_MAX], "bounded");
        assert!(task_weights(&[]).is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        assert_eq!(backoff(1), Duration::from_millis(RETRY_BACKOFF_MS));
        assert_eq!(backoff(2), Duration::from_millis(2 * RETRY_BACKOFF_MS));
        assert_eq!(backoff(40), Duration::from_millis(RETRY_BACKOFF_MAX_MS));
    }

    #[test]
    fn an_exhausted_task_fails_with_its_own_error_and_kind() {
        let last = QuiverError::new(ErrorKind::ResourcesExhausted, "Resources exhausted: out of memory");
        assert!(task_exhausted(TASK_ATTEMPTS_MAX - 1, Some(&last), (1, 2)).is_none());
        let error = task_exhausted(TASK_ATTEMPTS_MAX, Some(&last), (1, 2)).unwrap();
        assert_eq!(error.kind, ErrorKind::ResourcesExhausted);
        assert!(error.message.starts_with("Resources exhausted: out of memory (stage 1 task 2 failed"), "{}", error.message);
    }
}
