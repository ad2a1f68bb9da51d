//! A Task's part in join key filters across Stages (`planner::key_filter`): a probe Task drops
//! the rows its filter rules out before storing its output, a build Task summarizes the join
//! keys of what it stores, and both say what they did in their report.

use std::sync::{Arc, Mutex};
use std::sync::atomic::Ordering;

use datafusion::common::Result;
use datafusion::execution::SendableRecordBatchStream;

use crate::planner::{filter_stream, summarize_stream, FilterCounts, KeyFilter, KeySummary, SummaryForm};
use crate::protocol::KeyFilterSpec;

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

/// `stream` filtered by `filter` and summarized over `summarize` (in that order: a Stage that
/// is both a probe side and a build side summarizes what it keeps).
pub(super) fn wrap(
    stream: SendableRecordBatchStream,
    filter: Option<KeyFilterSpec>,
    summarize: Vec<u32>,
) -> Result<(SendableRecordBatchStream, Keys)> {
    let mut keys = Keys { summary: None, counts: None };
    let mut stream = stream;
    if let Some(spec) = filter {
        let filter = KeyFilter::from_bytes(&spec.bits)?;
        let counts = Arc::new(FilterCounts::default());
        stream = filter_stream(stream, filter, columns(&spec.keys), Arc::clone(&counts));
        keys.counts = Some(counts);
    }
    if !summarize.is_empty() {
        let summary = Arc::new(Mutex::new(KeySummary::new(columns(&summarize))));
        stream = summarize_stream(stream, Arc::clone(&summary));
        keys.summary = Some(summary);
    }
    Ok((stream, keys))
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
