//! A Task's part in join key filters across Stages (`planner::key_filter`): a probe Task drops
//! the rows its filter rules out, as low in its plan as they can go, a build Task summarizes the join
//! keys of what it stores, and both say what they did in their report. A probe Task that
//! started before its filter was decided takes it from [`LateFilters`] once it arrives.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use datafusion::common::Result;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::ExecutionPlan;

use crate::config::LATE_FILTER_BYTES_MAX;

use crate::planner::{apply_key_filter, summarize_stream, FilterCounts, FilterSource, KeyFilter, KeySummary, SummaryForm};
use crate::protocol::{KeyFilterSpec, StageKeyFilter};

type Slot = Arc<OnceLock<KeyFilter>>;

/// Key filters that arrive while Attempts of their Stage run here, by Query and Stage.
#[derive(Default)]
pub(super) struct LateFilters(Mutex<HashMap<(String, u32), Slot>>);

impl LateFilters {
    /// The slot a running Attempt of `stage` takes its filter from.
    pub(super) fn slot(&self, query_id: &str, stage: u32) -> Slot {
        let mut slots = self.0.lock().expect("late filters lock");
        Arc::clone(slots.entry((query_id.to_string(), stage)).or_default())
    }

    /// A Stage's filter arrived: its Attempts here apply it from their next batch. One for a
    /// Stage no Attempt here waits on yet is kept for one about to start, within a byte budget.
    pub(super) fn arrived(&self, message: StageKeyFilter) -> Result<()> {
        let Some(spec) = message.filter else { return Ok(()) };
        let filter = KeyFilter::from_bytes(&spec.bits)?;
        let mut slots = self.0.lock().expect("late filters lock");
        let key = (message.query_id, message.stage);
        let held: usize = slots.values().filter_map(|s| s.get()).map(KeyFilter::size_bytes).sum();
        if !slots.contains_key(&key) && held + spec.bits.len() > LATE_FILTER_BYTES_MAX {
            return Ok(());
        }
        let _ = slots.entry(key).or_default().set(filter);
        Ok(())
    }

    pub(super) fn release_query(&self, query_id: &str) {
        self.0.lock().expect("late filters lock").retain(|(query, _), _| query != query_id);
    }

    pub(super) fn clear(&self) {
        self.0.lock().expect("late filters lock").clear();
    }
}

/// What a Task is doing with join keys while its output is stored.
pub(super) struct Keys {
    summary: Option<Arc<Mutex<KeySummary>>>,
    counts: Option<Arc<FilterCounts>>,
}

/// What it did, once its output is stored.
pub(super) struct KeysDone {
    pub summary: Option<SummaryForm>,
    /// Rows the filter saw and kept.
    pub filter_rows: (u64, u64),
}

/// `plan` with its key filter applied (`planner::apply_key_filter`), when it has one: from its
/// assignment, or a late one from `late`'s slot.
pub(super) fn filter_plan(
    plan: Arc<dyn ExecutionPlan>,
    filter: Option<KeyFilterSpec>,
    late: Option<(Vec<u32>, Slot)>,
) -> Result<(Arc<dyn ExecutionPlan>, Option<Arc<FilterCounts>>)> {
    let (source, keys) = match (filter, late) {
        (Some(spec), _) => (FilterSource::Given(Arc::new(KeyFilter::from_bytes(&spec.bits)?)), spec.keys),
        (None, Some((keys, slot))) => (FilterSource::Late(slot), keys),
        (None, None) => return Ok((plan, None)),
    };
    let counts = Arc::new(FilterCounts::default());
    Ok((apply_key_filter(plan, columns(&keys), source, Arc::clone(&counts))?, Some(counts)))
}

/// `stream` summarized over the key columns `summarize`, if any. It is the Task's output,
/// filtered already: a Stage that is both a probe side and a build side summarizes what it
/// keeps.
pub(super) fn summarize(stream: SendableRecordBatchStream, counts: Option<Arc<FilterCounts>>, summarize: Vec<u32>) -> (SendableRecordBatchStream, Keys) {
    let mut keys = Keys { summary: None, counts };
    if summarize.is_empty() {
        return (stream, keys);
    }
    let summary = Arc::new(Mutex::new(KeySummary::new(columns(&summarize))));
    keys.summary = Some(Arc::clone(&summary));
    (summarize_stream(stream, summary), keys)
}

fn columns(keys: &[u32]) -> Vec<usize> {
    keys.iter().map(|&k| k as usize).collect()
}

impl Keys {
    pub(super) fn finish(self) -> KeysDone {
        let summary = self.summary.map(|s| s.lock().expect("key summary lock").finish());
        let filter_rows = self.counts.map_or((0, 0), |c| (c.rows_in.load(Ordering::Relaxed), c.rows_kept.load(Ordering::Relaxed)));
        KeysDone { summary, filter_rows }
    }
}
