//! The Workers the coordinator knows: registration, heartbeats and which ones are lost. It knows
//! nothing of Queries: [`super::cluster`] turns a lost worker into events for the Queries that
//! used it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use super::policy;
use crate::config::{LOST_WORKERS_MAX, STALL_SAMPLE_BUSY_MIN_MS};

#[derive(Debug, Clone)]
pub struct WorkerRecord {
    pub id: String,
    pub url: String,
    pub slots: u32,
    pub memory_limit_bytes: u64,
    pub memory_used_bytes: u64,
    pub alive: bool,
    pub last_heartbeat: SystemTime,
    /// Attempts running on it, as its last heartbeat said.
    pub running_tasks: u32,
    /// Attempts the coordinator has assigned to it that have not ended.
    pub assigned: u32,
    /// Slots only small Queries' Tasks run on, and those of them in use.
    pub express_slots: u32,
    pub express_assigned: u32,
    /// How long its Attempts take against their Stages' medians (1 is typical; see
    /// `policy::pace_after`).
    task_pace: Pace,
    /// How much longer its work takes for the stalls of its process (see `policy::stall_ratio`).
    stall_pace: Pace,
    /// Other workers it could not connect to, as its last heartbeat said.
    pub unreachable_peers: Vec<String>,
    last_seen: Instant,
    /// Names this registration (see `RegisterWorkerResponse::session`).
    session: u64,
    /// Its connection to the coordinator dropped a poll half-way: it may have died. A probe
    /// of its port tells before its heartbeats are missed for good.
    suspected: bool,
}

impl WorkerRecord {
    /// Its pace as of now: the slower of what its Attempts' durations and its stalls say (a
    /// worker that never stalls may still be faster than typical).
    pub fn pace_now(&self) -> f64 {
        self.pace_counting(true)
    }

    /// Its pace as of now, counting its stalls or not (`quiver.slow_worker_stalls`).
    pub fn pace_counting(&self, stalls: bool) -> f64 {
        let (task, stall) = (self.task_pace.now(), self.stall_pace.now());
        if stalls && stall > 1.0 {
            task.max(stall)
        } else {
            task
        }
    }

    /// The share of its busy time its process was held off the CPU lately, in percent (what its
    /// stall pace amounts to: a pace of 4 is 75%).
    pub fn stalled_pct(&self) -> f64 {
        100.0 * (1.0 - 1.0 / self.stall_pace.now().max(1.0))
    }
}

/// A pace (1 is typical, 4 four times slower) and when it last had a sample: it returns towards
/// 1 from then (`policy::pace_now`).
#[derive(Debug, Clone, Copy)]
struct Pace {
    value: f64,
    at: Instant,
}

impl Pace {
    fn new(now: Instant) -> Self {
        Self { value: 1.0, at: now }
    }

    fn now(&self) -> f64 {
        policy::pace_now(self.value, self.at.elapsed())
    }

    fn sample(&mut self, ratio: f64, at_least: bool) {
        self.value = policy::pace_after(self.now(), ratio, at_least);
        self.at = Instant::now();
    }
}

/// What a heartbeat says of its worker.
pub struct Beat {
    pub running_tasks: u32,
    pub memory_used_bytes: u64,
    pub unreachable_peers: Vec<String>,
    /// Since the last heartbeat: wall time while at least one Attempt ran (in whole stall-clock
    /// ticks), and how much of it the worker's process was held off the CPU.
    pub busy_ms: u64,
    pub stalled_ms: u64,
}

#[derive(Default)]
pub struct Registry {
    workers: BTreeMap<String, WorkerRecord>,
    next: u64,
}

impl Registry {
    /// Registers a worker; returns its id and session.
    pub fn register(&mut self, url: String, slots: u32, express_slots: u32, memory_limit_bytes: u64, now: Instant) -> (String, u64) {
        self.next += 1;
        let id = format!("w{}", self.next);
        let session = uuid::Uuid::new_v4().as_u64_pair().0;
        let record = WorkerRecord {
            id: id.clone(),
            url,
            slots: slots.max(1),
            memory_limit_bytes,
            memory_used_bytes: 0,
            alive: true,
            last_heartbeat: SystemTime::now(),
            running_tasks: 0,
            assigned: 0,
            express_slots,
            express_assigned: 0,
            task_pace: Pace::new(now),
            stall_pace: Pace::new(now),
            unreachable_peers: Vec::new(),
            last_seen: now,
            session,
            suspected: false,
        };
        tracing::info!(worker = %id, url = %record.url, slots, "worker registered");
        self.workers.insert(id.clone(), record);
        (id, session)
    }

    /// True when `id` is a live worker of this registration.
    pub fn is_live(&self, id: &str, session: u64) -> bool {
        self.workers.get(id).is_some_and(|w| w.alive && w.session == session)
    }

    /// Records a heartbeat; false when the worker is unknown, lost, or of another registration.
    pub fn heartbeat(&mut self, id: &str, session: u64, beat: Beat, now: Instant) -> bool {
        match self.workers.get_mut(id) {
            Some(w) if w.alive && w.session == session => {
                w.last_seen = now;
                w.last_heartbeat = SystemTime::now();
                w.running_tasks = beat.running_tasks;
                w.memory_used_bytes = beat.memory_used_bytes;
                if w.unreachable_peers != beat.unreachable_peers && !beat.unreachable_peers.is_empty() {
                    tracing::warn!(worker = %id, url = %w.url, peers = ?beat.unreachable_peers, "a worker cannot reach other workers: Tasks there that read their outputs will fail");
                }
                w.unreachable_peers = beat.unreachable_peers;
                if beat.busy_ms >= STALL_SAMPLE_BUSY_MIN_MS {
                    w.stall_pace.sample(policy::stall_ratio(beat.busy_ms, beat.stalled_ms), false);
                }
                true
            }
            _ => false,
        }
    }

    /// The addresses of the live workers other than `id`.
    pub fn peers_of(&self, id: &str) -> Vec<String> {
        self.workers.values().filter(|w| w.alive && w.id != id).map(|w| w.url.clone()).collect()
    }

    /// The worker's poll was dropped before its answer: its process or its connection may be gone.
    pub fn suspect(&mut self, id: &str, session: u64) {
        if let Some(w) = self.workers.get_mut(id).filter(|w| w.alive && w.session == session) {
            w.suspected = true;
        }
    }

    /// The live workers under suspicion — a poll dropped half-way, or a heartbeat overdue by
    /// more than `overdue` — with their URLs; a dropped poll's suspicion is cleared.
    pub fn take_suspects(&mut self, overdue: Duration, now: Instant) -> Vec<(String, String)> {
        let late = |w: &WorkerRecord| now.saturating_duration_since(w.last_seen) > overdue;
        let suspects = self.workers.values_mut().filter(|w| w.alive && (w.suspected || late(w)));
        suspects.map(|w| {
            w.suspected = false;
            (w.id.clone(), w.url.clone())
        })
        .collect()
    }

    /// Declares a live worker lost now; returns it, or None if it was not live.
    pub fn declare_lost(&mut self, id: &str, reason: &str) -> Option<WorkerRecord> {
        let worker = self.workers.get_mut(id).filter(|w| w.alive)?;
        worker.alive = false;
        worker.running_tasks = 0;
        tracing::warn!(worker = %worker.id, url = %worker.url, "worker lost: {reason}");
        let lost = worker.clone();
        self.forget_oldest_lost();
        Some(lost)
    }

    /// Declares the live workers silent for longer than `timeout` lost and returns them.
    pub fn take_lost(&mut self, timeout: Duration, now: Instant) -> Vec<WorkerRecord> {
        let mut lost = Vec::new();
        for worker in self.workers.values_mut().filter(|w| w.alive && now.saturating_duration_since(w.last_seen) > timeout) {
            worker.alive = false;
            worker.running_tasks = 0;
            tracing::warn!(worker = %worker.id, url = %worker.url, "worker lost: no heartbeat for {} ms", timeout.as_millis());
            lost.push(worker.clone());
        }
        self.forget_oldest_lost();
        lost
    }

    /// Lost workers are listed (in `quiver.workers`) until there are too many of them; then
    /// those heard from longest ago go first (ids sort as text: "w10" before "w9").
    fn forget_oldest_lost(&mut self) {
        let mut lost: Vec<(Instant, String)> = self.workers.values().filter(|w| !w.alive).map(|w| (w.last_seen, w.id.clone())).collect();
        lost.sort();
        for (_, id) in lost.iter().take(lost.len().saturating_sub(LOST_WORKERS_MAX)) {
            self.workers.remove(id);
        }
    }

    /// An Attempt was assigned to worker `id`, on an express slot or a regular one.
    pub fn attempt_assigned(&mut self, id: &str, express: bool) {
        if let Some(w) = self.workers.get_mut(id) {
            match express {
                true => w.express_assigned += 1,
                false => w.assigned += 1,
            }
        }
    }

    pub fn attempt_ended(&mut self, id: &str, express: bool) {
        if let Some(w) = self.workers.get_mut(id) {
            match express {
                true => w.express_assigned = w.express_assigned.saturating_sub(1),
                false => w.assigned = w.assigned.saturating_sub(1),
            }
        }
    }

    /// An Attempt on worker `id` took `ratio` times its Stage's median (`at_least`: it was
    /// stopped after that long), reading outputs of the workers at `read_from`. A slow Attempt
    /// that read from a live worker whose stalls make it clearly slower than its own
    /// (`policy::SLOWER_SOURCE_FACTOR`) may have spent its time waiting on that one (a worker
    /// held off the CPU serves its outputs only between stalls): it says nothing against its
    /// own worker, which would otherwise look as slow as the one it waited on. Only a source's
    /// stalls count: an Attempt starts once its inputs exist, so however slowly a source
    /// computed them, it never waited for that.
    pub fn paced(&mut self, id: &str, ratio: f64, at_least: bool, read_from: &[String]) {
        let Some(own) = self.workers.get(id).map(WorkerRecord::pace_now) else { return };
        let slower = own.max(1.0) * policy::SLOWER_SOURCE_FACTOR;
        let slower_source = || self.live().any(|w| read_from.contains(&w.url) && w.stall_pace.now() > slower);
        if ratio > 1.0 && slower_source() {
            return;
        }
        if let Some(w) = self.workers.get_mut(id) {
            w.task_pace.sample(ratio, at_least);
        }
    }

    /// The pace of live worker `id` now; 1 when unknown.
    #[cfg(test)]
    pub fn pace(&self, id: &str) -> f64 {
        self.pace_counting(id, true)
    }

    /// The pace of live worker `id` now, counting its stalls or not; 1 when unknown.
    pub fn pace_counting(&self, id: &str, stalls: bool) -> f64 {
        self.workers.get(id).map_or(1.0, |w| w.pace_counting(stalls))
    }

    /// Slots of the live workers no slower than `pace` (counting their stalls or not).
    pub fn slots_at_pace(&self, pace: f64, stalls: bool) -> usize {
        self.live().filter(|w| w.pace_counting(stalls) <= pace).map(|w| w.slots as usize).sum()
    }

    /// Free slots of the live workers other than `id`.
    pub fn free_slots_elsewhere(&self, id: &str) -> usize {
        self.live().filter(|w| w.id != id).map(|w| w.slots.saturating_sub(w.assigned) as usize).sum()
    }

    /// True when worker `id` is nearly out of memory and another live worker has a free slot
    /// and memory to spare: that one should take the next Task.
    pub fn full_while_others_have_room(&self, id: &str) -> bool {
        let full = |w: &WorkerRecord| policy::memory_nearly_full(w.memory_used_bytes, w.memory_limit_bytes);
        let Some(worker) = self.workers.get(id) else { return false };
        full(worker) && self.live().any(|w| w.id != id && !full(w) && w.assigned < w.slots)
    }

    pub fn url(&self, id: &str) -> Option<&str> {
        self.workers.get(id).map(|w| w.url.as_str())
    }

    pub fn live(&self) -> impl Iterator<Item = &WorkerRecord> + '_ {
        self.workers.values().filter(|w| w.alive)
    }

    pub fn total_slots(&self) -> usize {
        self.live().map(|w| w.slots as usize).sum()
    }

    pub fn records(&self) -> Vec<WorkerRecord> {
        self.workers.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workers_lost_longest_ago_are_forgotten_first() {
        // Regression: they were forgotten in the text order of their ids (w1, w10, w100, …),
        // so w2…w9 stayed listed for ever and the workers lost last were hidden.
        let mut registry = Registry::default();
        let start = Instant::now();
        let total = LOST_WORKERS_MAX + 44;
        for n in 0..total {
            let (id, _) = registry.register(format!("http://w{n}"), 1, 0, 1 << 30, start);
            registry.workers.get_mut(&id).unwrap().last_seen = start + Duration::from_millis(n as u64);
        }
        registry.take_lost(Duration::from_secs(1), start + Duration::from_secs(10));
        let mut kept: Vec<u64> = registry.workers.keys().map(|id| id[1..].parse().unwrap()).collect();
        kept.sort_unstable();
        assert_eq!(kept, (45..=total as u64).collect::<Vec<_>>(), "the {LOST_WORKERS_MAX} lost last stay");
    }

    #[test]
    fn a_worker_held_off_the_cpu_while_busy_is_slow_whatever_its_attempts_took() {
        let mut registry = Registry::default();
        let now = Instant::now();
        let (id, session) = registry.register("http://w".into(), 1, 0, 1 << 30, now);
        let beat = |busy_ms, stalled_ms| Beat { running_tasks: 1, memory_used_bytes: 0, unreachable_peers: Vec::new(), busy_ms, stalled_ms };
        // Stalls while idle say nothing of how it runs Tasks.
        assert!(registry.heartbeat(&id, session, beat(STALL_SAMPLE_BUSY_MIN_MS - 1, STALL_SAMPLE_BUSY_MIN_MS - 1), now));
        assert_eq!(registry.pace(&id), 1.0);
        // Its short Attempts look typical, but it is stopped three quarters of the time.
        for _ in 0..8 {
            registry.paced(&id, 1.0, false, &[]);
            assert!(registry.heartbeat(&id, session, beat(500, 375), now));
        }
        assert!(registry.pace(&id) > 3.5, "pace {}", registry.pace(&id));
        assert!(registry.slots_at_pace(2.0, true) == 0 && registry.slots_at_pace(2.0, false) == 1, "placement may count stalls or not");
        assert!(registry.pace_counting(&id, false) <= 1.0, "its Attempts alone look typical");
        // Its Attempts' own samples neither hide nor add to it.
        let before = registry.pace(&id);
        registry.paced(&id, 1.0, false, &[]);
        assert!((registry.pace(&id) - before).abs() < 0.01, "{before} became {}", registry.pace(&id));
    }

    #[test]
    fn a_slow_attempt_that_read_from_a_slower_worker_does_not_slow_its_own() {
        let mut registry = Registry::default();
        let now = Instant::now();
        let (fast, _) = registry.register("http://fast".into(), 1, 0, 1 << 30, now);
        let (slow, _) = registry.register("http://slow".into(), 1, 0, 1 << 30, now);
        registry.workers.get_mut(&slow).unwrap().stall_pace.value = 1.2;
        registry.paced(&fast, 6.0, false, &["http://slow".into()]);
        assert!(registry.pace(&fast) > 1.5, "a source about as fast as its own excuses nothing");
        registry.workers.get_mut(&fast).unwrap().task_pace.value = 1.0;
        registry.workers.get_mut(&slow).unwrap().stall_pace.value = 1.0;
        registry.workers.get_mut(&slow).unwrap().task_pace.value = 4.0;
        registry.paced(&fast, 6.0, false, &["http://slow".into()]);
        assert!(registry.pace(&fast) > 1.5, "a source that only computed slowly excuses nothing");
        registry.workers.get_mut(&fast).unwrap().task_pace.value = 1.0;
        registry.workers.get_mut(&slow).unwrap().stall_pace.value = 4.0;
        registry.paced(&fast, 6.0, false, &["http://slow".into()]);
        assert_eq!(registry.pace(&fast), 1.0, "it waited on the slow worker");
        registry.paced(&fast, 0.5, false, &["http://slow".into()]);
        assert!(registry.pace(&fast) < 1.0, "a fast Attempt counts whatever it read");
        registry.paced(&slow, 6.0, false, &["http://fast".into()]);
        assert!(registry.pace(&slow) > 4.0, "reading from a faster worker excuses nothing");
    }
}
