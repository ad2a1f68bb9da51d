//! How long this worker's process was held off the CPU while it ran Attempts: stopped
//! (`cpulimit`, a debugger), throttled by its cgroup's CPU quota, or starved by its host. Such a
//! worker runs short Attempts at full speed between stalls, so its Attempts' durations hide
//! it; but every Task reading its outputs waits out its stalls. A thread of its own sleeps in
//! short ticks and counts a tick that woke far too late as stalled; heartbeats carry the sums
//! to the coordinator, which slows the worker's pace by them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::config::{STALL_LATE_MS, STALL_TICK_MS};

/// How long the watching thread of an idle worker parks before it looks again whether its
/// clock still exists (an Attempt's start wakes it at once).
const STALL_IDLE_PARK_MS: u64 = 1000;

/// Time watched while Attempts ran, and the part of it the process was held off the CPU.
#[derive(Default)]
pub(super) struct StallClock {
    busy: AtomicUsize,
    /// Watched and stalled µs, taken together: a heartbeat must never get a tick's stall
    /// without the time it stalled in.
    sums: Mutex<(u64, u64)>,
    /// The watching thread, woken when an Attempt starts on an idle worker.
    watcher: OnceLock<Thread>,
}

/// Marks the worker busy while it lives: an Attempt runs.
pub(super) struct Busy(Arc<StallClock>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StallClock {
    /// A clock whose thread watches until the clock is dropped.
    pub(super) fn start() -> std::io::Result<Arc<Self>> {
        let clock = Arc::new(Self::default());
        let weak = Arc::downgrade(&clock);
        let watcher = std::thread::Builder::new().name("quiver-stalls".into()).spawn(move || watch(weak))?;
        let _ = clock.watcher.set(watcher.thread().clone());
        Ok(clock)
    }

    pub(super) fn busy(self: &Arc<Self>) -> Busy {
        if self.busy.fetch_add(1, Ordering::Relaxed) == 0 {
            if let Some(watcher) = self.watcher.get() {
                watcher.unpark();
            }
        }
        Busy(Arc::clone(self))
    }

    /// Milliseconds watched busy and stalled since the last call.
    pub(super) fn take(&self) -> (u64, u64) {
        let (watched, stalled) = std::mem::take(&mut *self.sums.lock().expect("stall sums lock"));
        (watched / 1000, stalled / 1000)
    }

    /// One tick that took `elapsed` where [`STALL_TICK_MS`] was asked for.
    fn tick(&self, elapsed: Duration) {
        if self.busy.load(Ordering::Relaxed) == 0 {
            return;
        }
        let us = elapsed.as_micros() as u64;
        let mut sums = self.sums.lock().expect("stall sums lock");
        sums.0 += us;
        sums.1 += stalled_us(us);
    }
}

/// The stalled part of a tick that lasted `us`: all of its lateness once it is late by more than
/// [`STALL_LATE_MS`]. Scheduling jitter on a loaded host wakes a thread a few ms late; a process
/// that was stopped wakes hundreds of ms late.
fn stalled_us(us: u64) -> u64 {
    let late = us.saturating_sub(STALL_TICK_MS * 1000);
    if late > STALL_LATE_MS * 1000 {
        late
    } else {
        0
    }
}

/// Ticks while Attempts run; parks while none does, so that an idle worker's thread does not
/// wake a hundred times a second (an unpark, or the clock's end within a second, wakes it).
fn watch(clock: Weak<StallClock>) {
    let tick = Duration::from_millis(STALL_TICK_MS);
    loop {
        let idle = clock.upgrade().map(|clock| clock.busy.load(Ordering::Relaxed) == 0);
        match idle {
            None => return,
            Some(true) => {
                std::thread::park_timeout(Duration::from_millis(STALL_IDLE_PARK_MS));
                continue;
            }
            Some(false) => {}
        }
        let started = Instant::now();
        std::thread::sleep(tick);
        let Some(clock) = clock.upgrade() else { return };
        clock.tick(started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_tick_that_woke_far_too_late_counts_as_stalled() {
        let tick_us = STALL_TICK_MS * 1000;
        assert_eq!(stalled_us(tick_us + 100), 0, "timer slack");
        assert_eq!(stalled_us(tick_us + STALL_LATE_MS * 1000), 0, "scheduling jitter");
        assert_eq!(stalled_us(tick_us + 300_000), 300_000, "a stopped process");
    }

    #[test]
    fn an_attempt_starting_wakes_the_parked_watcher() {
        // The watcher parks at once (it is idle) until unparked, or until its park ends, which
        // is no sooner than `STALL_IDLE_PARK_MS` after the clock starts.
        let parked = Instant::now();
        let clock = StallClock::start().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let _busy = clock.busy();
        // Unwoken, it would tick again only once its park ends.
        let before_park_ends = Duration::from_millis(STALL_IDLE_PARK_MS * 4 / 5);
        let mut watched = 0;
        while watched == 0 && parked.elapsed() < before_park_ends {
            std::thread::sleep(Duration::from_millis(STALL_TICK_MS));
            watched += clock.take().0;
        }
        assert!(watched > 0, "an Attempt started, yet no tick within {before_park_ends:?} of the clock's start");
    }

    #[test]
    fn an_idle_worker_is_not_watched() {
        let clock = Arc::new(StallClock::default());
        clock.tick(Duration::from_millis(500));
        assert_eq!(clock.take(), (0, 0));
        let busy = clock.busy();
        clock.tick(Duration::from_millis(STALL_TICK_MS + 400));
        clock.tick(Duration::from_millis(STALL_TICK_MS));
        assert_eq!(clock.take(), (2 * STALL_TICK_MS + 400, 400));
        assert_eq!(clock.take(), (0, 0), "taken once");
        drop(busy);
        clock.tick(Duration::from_millis(500));
        assert_eq!(clock.take(), (0, 0));
    }
}
