//! Join key filters across Stages. In one process DataFusion hands a hash join's build keys to
//! the probe side's scan (its dynamic filter), so probe rows with no partner are dropped before
//! anything else touches them. When the two inputs of a join are Stages of their own, that
//! handoff would cross processes, and the probe Stage would shuffle every row only for the join
//! to drop most of them. So the planner links such a pair ([`link_stages`]): the build Stage's
//! Tasks summarize the join keys of their output ([`KeySummary`]), the coordinator combines the
//! summaries into one Bloom filter ([`KeyFilter::combine`]), and the probe Stage, which now
//! starts after the build Stage, drops every row whose keys the filter rules out
//! ([`filter_stream`], placed in its Tasks' plans by `probe_filter`).
//!
//! A Bloom filter has false positives, never false negatives: a dropped row matches no build
//! row, and only join types whose output never depends on an unmatched probe row are linked. A
//! filter that would let nearly everything through is not sent, and a probe Task stops
//! applying one that turns out to keep nearly every row.
//!
//! Between the probe Stage and the join there may be an aggregate grouped by the keys. A group
//! whose key the filter rules out may then be aggregated from some of its rows only (one Attempt
//! filtered, another had not got its filter yet or stopped applying it): its key has no partner,
//! so the join drops it whatever its values. Arithmetic on such a group's values between the
//! aggregate and the join could, in principle, fail where single-node DataFusion's would not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use datafusion::arrow::array::{BooleanArray, RecordBatch};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::filter_record_batch;
use datafusion::common::hash_utils::{create_hashes, RandomState};
use datafusion::common::{exec_err, NullEquality, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::Aggregate;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::limit::{GlobalLimitExec, LocalLimitExec};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties, Partitioning, PhysicalExpr};
use futures::StreamExt;

use super::rules::{is_gather, shuffle_partitioning};
use super::{Stage, StageId, StageReaderExec};
use crate::config::{
    KEY_FILTER_BITS_MIN, KEY_FILTER_BITS_PER_KEY, KEY_FILTER_DENSITY_MAX, KEY_FILTER_KEEP_FRACTION_MAX, KEY_FILTER_SAMPLE_ROWS,
    KEY_SUMMARY_BITS, KEY_SUMMARY_HASHES_MAX,
};

/// The hash both sides compute over the key columns. Fixed, so that every process agrees; apart
/// from the shuffle's, so that a filter's bits do not follow the partitions.
const KEY_HASH: RandomState = RandomState::with_seed(0x5155_4956_4552_4b46);

/// Where a Stage's rows are filtered by another Stage's join keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFilterLink {
    /// The Stage whose output is the join's build side: it runs first.
    pub build: StageId,
    /// The join key columns of this (the probe) Stage's output, in the order of the build's.
    pub probe_keys: Vec<usize>,
}

/// Links the probe Stage of every hash join whose build input is a Stage reader, and whose probe
/// input reads Stages through operators that keep its keys ([`probe_stages`]), to its build Stage:
/// the build Stage summarizes its join key columns (`Stage::key_summary`) and the probe Stage
/// filters by them (`Stage::key_filter`). Only joins whose result no unmatched probe row can
/// change, and whose build side may hold fewer keys than its tables, are linked; a probe Stage
/// takes part in one link, a build Stage summarizes one set of keys.
pub(super) fn link_stages(stages: &mut [Stage], root: &Arc<dyn ExecutionPlan>) {
    let mut links = Vec::new();
    for plan in stages.iter().map(|s| &s.fragment).chain([root]) {
        collect_links(plan, &mut links);
    }
    for (build, build_keys, probe, probe_keys) in links {
        let (Some(b), Some(p)) = (stages.get(build), stages.get(probe)) else { continue };
        // One build Stage may filter several probe Stages by the same keys (both inputs of an
        // inner join below the linked join).
        let summarizes_other_keys = b.key_summary.as_ref().is_some_and(|k| *k != build_keys);
        if summarizes_other_keys || p.key_filter.is_some() || !narrows(&b.fragment, stages) {
            continue;
        }
        stages[build].key_summary = Some(build_keys);
        stages[probe].key_filter = Some(KeyFilterLink { build, probe_keys });
    }
}

type Link = (StageId, Vec<usize>, StageId, Vec<usize>);

/// Whether a build side may hold fewer keys than its tables: something below it drops rows (a
/// filter, a HAVING, a limit), in its Stage or the Stages it reads. A build side that is a whole
/// table (the primary key side of a foreign key join) holds every key the probe side has: its
/// filter would cost a wait and a hash per row, and drop nothing.
fn narrows(plan: &Arc<dyn ExecutionPlan>, stages: &[Stage]) -> bool {
    if plan.downcast_ref::<FilterExec>().is_some() || plan.downcast_ref::<GlobalLimitExec>().is_some() || plan.downcast_ref::<LocalLimitExec>().is_some() {
        return true;
    }
    if let Some(reader) = plan.downcast_ref::<StageReaderExec>() {
        return stages.get(reader.stage()).is_some_and(|s| narrows(&s.fragment, stages));
    }
    plan.children().into_iter().any(|child| narrows(child, stages))
}

fn collect_links(plan: &Arc<dyn ExecutionPlan>, links: &mut Vec<Link>) {
    if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        links.extend(join_links(join));
    }
    for child in plan.children() {
        collect_links(child, links);
    }
}

/// The (build Stage, build keys, probe Stage, probe keys) of a join whose build input is a Stage
/// reader, whose probe input reads Stages with its keys intact, and whose probe side may lose
/// its unmatched rows: one for each such Stage.
fn join_links(join: &HashJoinExec) -> Vec<Link> {
    join_probes(join).map_or_else(Vec::new, |(build, build_keys, probes)| {
        probes.into_iter().map(|(probe, probe_keys)| (build, build_keys.clone(), probe, probe_keys)).collect()
    })
}

type Probes = Vec<(StageId, Vec<usize>)>;

/// Whether a key filter may drop the probe rows of `join` its build side has no partner for.
fn linkable(join: &HashJoinExec) -> bool {
    // A probe row without a partner must leave no trace in the result: not as a row of its own
    // (right, full, right anti/mark joins), not as a NULL that empties a NOT IN (null-aware anti
    // joins), and NULL keys must match nothing.
    let (_, probe_may_shrink) = join.join_type().on_lr_is_preserved();
    probe_may_shrink && !join.null_aware && join.null_equality() == NullEquality::NullEqualsNothing
}

/// The partitioning to cut a partitioned join's build side into a Stage of its own by, when
/// it drops rows in the join's Stage (a HAVING over an aggregate): only a Stage's output can
/// be summarized into a key filter, and the probe side's Stages would otherwise shuffle all
/// their rows for the join to drop most (q18 keeps 57 of 1.5 million orders). The Stage
/// shuffles its rows as they already are, so the join reads the partitions it read.
pub(super) fn build_side_to_cut(join: &HashJoinExec) -> Option<Partitioning> {
    let build = join.left();
    if *join.partition_mode() != PartitionMode::Partitioned || !linkable(join) || shuffle_partitioning(build).is_some() || !narrows_here(build) {
        return None;
    }
    // Keys a filter can be made of (as `join_probes` requires), and a partitioning a shuffle
    // made: a scan may declare one of its files' own, which hashing again would not reproduce.
    let (left, right) = (join.left().schema(), join.right().schema());
    let columns = join.on().iter().all(|(l, r)| column(l).zip(column(r)).is_some_and(|(l, r)| left.field(l).data_type() == right.field(r).data_type()));
    if !columns || !hashed_by_shuffle(build) {
        return None;
    }
    match build.output_partitioning() {
        Partitioning::Hash(exprs, n) if exprs.iter().all(|e| column(e).is_some()) => Some(Partitioning::Hash(exprs.clone(), *n)),
        _ => None,
    }
}

/// Whether `plan`'s partitioning comes from a hash shuffle below it, through operators of one input.
fn hashed_by_shuffle(plan: &Arc<dyn ExecutionPlan>) -> bool {
    if shuffle_partitioning(plan).is_some() {
        return true;
    }
    match plan.children()[..] {
        [child] => hashed_by_shuffle(child),
        _ => false,
    }
}

/// Whether `plan` drops rows before its first Exchange.
fn narrows_here(plan: &Arc<dyn ExecutionPlan>) -> bool {
    if plan.downcast_ref::<FilterExec>().is_some() || plan.downcast_ref::<GlobalLimitExec>().is_some() || plan.downcast_ref::<LocalLimitExec>().is_some() {
        return true;
    }
    if shuffle_partitioning(plan).is_some() || is_gather(plan.as_ref()) {
        return false;
    }
    plan.children().into_iter().any(narrows_here)
}

fn join_probes(join: &HashJoinExec) -> Option<(StageId, Vec<usize>, Probes)> {
    if !linkable(join) {
        return None;
    }
    let build = reader_stage(join.left())?;
    let (left, right) = (join.left().schema(), join.right().schema());
    let mut build_keys = Vec::new();
    let mut probe_keys = Vec::new();
    for (l, r) in join.on() {
        let (l, r) = (column(l)?, column(r)?);
        // Equal types hash alike; anything else is left to the join.
        if left.field(l).data_type() != right.field(r).data_type() {
            return None;
        }
        build_keys.push(l);
        probe_keys.push(r);
    }
    let probes = probe_stages(join.right(), probe_keys);
    (!build_keys.is_empty()).then_some((build, build_keys, probes))
}

/// The Stages whose output reaches `plan` (a join's probe input) with the key columns `keys`
/// unchanged, and where those columns are in their output. Dropping that output's rows by key
/// then drops exactly the rows, or whole groups, the join finds no partner for; so the probe
/// side may pass the operators [`keys_below`] sees through, aggregates grouped by the keys
/// among them (q17 and q20 join an aggregate of lineitem to a few keys), and joins below it
/// ([`join_inputs_keys`]).
fn probe_stages(plan: &Arc<dyn ExecutionPlan>, keys: Vec<usize>) -> Probes {
    if let Some(reader) = plan.downcast_ref::<StageReaderExec>() {
        let width = reader.schema().fields().len();
        return match keys.iter().all(|&k| k < width) {
            true => vec![(reader.stage(), keys)],
            false => Vec::new(),
        };
    }
    if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        // A join can carry a limit of its own: which rows it keeps depends on all of them.
        if join.fetch().is_some() {
            return Vec::new();
        }
        let [left, right] = join_inputs_keys(join, &keys);
        let mut probes = left.map_or_else(Vec::new, |k| probe_stages(join.left(), k));
        probes.extend(right.map_or_else(Vec::new, |k| probe_stages(join.right(), k)));
        return probes;
    }
    match keys_below(plan, &keys) {
        Some(below) => probe_stages(plan.children()[0], below),
        None => Vec::new(),
    }
}

/// Where the columns `keys` of a join's output are in its left and its right input, for each
/// input whose rows can be dropped by those keys with exactly the output rows that carry them:
/// an output row carries one row of each input it pairs, so a side whose rows reach the output
/// only through such pairs or as themselves (inner, semi, anti and outer joins on their
/// preserved side) may be filtered by keys it holds. An inner or semi join's output rows have
/// equal values on both sides of each `on` pair, so a key that is a join key may be looked up
/// on the other side too (q18 filters both lineitem and orders by the keys of its HAVING).
fn join_inputs_keys(join: &HashJoinExec, keys: &[usize]) -> [Option<Vec<usize>>; 2] {
    use datafusion::common::JoinType::*;
    if join.null_equality() != NullEquality::NullEqualsNothing || join.null_aware {
        return [None, None];
    }
    let (left_width, right_width) = (join.left().schema().fields().len(), join.right().schema().fields().len());
    let joined: Option<Vec<(usize, usize)>> = keys
        .iter()
        .map(|&k| {
            let k = match &join.projection {
                Some(p) => *p.get(k)?,
                None => k,
            };
            // Semi and anti joins output one side; mark joins add their mark after it.
            match join.join_type() {
                RightSemi | RightAnti => Some((1, k)),
                RightMark => (k < right_width).then_some((1, k)),
                LeftSemi | LeftAnti | LeftMark => (k < left_width).then_some((0, k)),
                _ if k < left_width => Some((0, k)),
                _ => Some((1, k - left_width)),
            }
        })
        .collect();
    let Some(joined) = joined else { return [None, None] };
    let on: Vec<(usize, usize)> = join.on().iter().filter_map(|(l, r)| Some((column(l)?, column(r)?))).collect();
    let (left, right) = (join.left().schema(), join.right().schema());
    let same_type = |l: usize, r: usize| left.field(l).data_type() == right.field(r).data_type();
    let equal_sides = matches!(join.join_type(), Inner | LeftSemi | RightSemi);
    let side = |want: usize| -> Option<Vec<usize>> {
        let direct = matches!((want, join.join_type()), (0, Inner | Left | LeftSemi | LeftAnti | LeftMark) | (1, Inner | Right | RightSemi | RightAnti | RightMark));
        joined
            .iter()
            .map(|&(s, c)| match s == want {
                true => direct.then_some(c),
                false if equal_sides => on.iter().find_map(|&(l, r)| match want {
                    0 => (r == c && same_type(l, r)).then_some(l),
                    _ => (l == c && same_type(l, r)).then_some(r),
                }),
                false => None,
            })
            .collect()
    };
    [side(0), side(1)]
}

/// Where the columns `keys` of `plan`'s output are in its only input's output, when every
/// output row keeps its input row's key values and a row (or group) of the input with given
/// keys is in the output only through rows with those keys: a merge, a repartition, a sort, a
/// filter, a projection of the key columns as they are, an aggregate grouped by them. Nothing
/// with a limit: which rows a limit keeps depends on the rows before it.
pub(super) fn keys_below(plan: &Arc<dyn ExecutionPlan>, keys: &[usize]) -> Option<Vec<usize>> {
    let [_] = plan.children()[..] else { return None };
    if plan.fetch().is_some() {
        return None;
    }
    if plan.downcast_ref::<CoalescePartitionsExec>().is_some() || plan.downcast_ref::<RepartitionExec>().is_some() || plan.downcast_ref::<SortExec>().is_some() {
        return Some(keys.to_vec());
    }
    if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
        return keys.iter().map(|&k| column(&projection.expr().get(k)?.expr)).collect();
    }
    if let Some(filter) = plan.downcast_ref::<FilterExec>() {
        return match filter.projection() {
            Some(columns) => keys.iter().map(|&k| columns.get(k).copied()).collect(),
            None => Some(keys.to_vec()),
        };
    }
    if let Some(aggregate) = plan.downcast_ref::<AggregateExec>() {
        // Grouping sets: a Final aggregate of them looks single, with a grouping id column.
        let groups = aggregate.group_expr();
        let grouping_sets = !groups.is_single() || groups.expr().iter().any(|(_, name)| name == Aggregate::INTERNAL_GROUPING_ID);
        if grouping_sets || aggregate.limit_options().is_some() {
            return None;
        }
        return keys.iter().map(|&k| column(&groups.expr().get(k)?.0)).collect();
    }
    None
}

/// The Stage a join input reads, when the input is a Stage reader (or the merge of one).
fn reader_stage(plan: &Arc<dyn ExecutionPlan>) -> Option<StageId> {
    let plan = match plan.downcast_ref::<CoalescePartitionsExec>() {
        Some(merge) => merge.input(),
        None => plan,
    };
    plan.downcast_ref::<StageReaderExec>().map(StageReaderExec::stage)
}

fn column(expr: &Arc<dyn PhysicalExpr>) -> Option<usize> {
    expr.downcast_ref::<Column>().map(Column::index)
}

/// The key hashes of `batch`'s rows, and which rows have a NULL key (they match nothing).
fn key_hashes(batch: &RecordBatch, keys: &[usize], hashes: &mut Vec<u64>) -> Result<Option<NullBuffer>> {
    let mut columns = Vec::with_capacity(keys.len());
    for &k in keys {
        let Some(column) = batch.columns().get(k) else {
            return exec_err!("join key column {k} is not in a batch of {} columns", batch.num_columns());
        };
        columns.push(Arc::clone(column));
    }
    hashes.clear();
    hashes.resize(batch.num_rows(), 0);
    create_hashes(&columns, &KEY_HASH, hashes)?;
    let nulls = columns.iter().fold(None, |acc: Option<NullBuffer>, c| NullBuffer::union(acc.as_ref(), c.logical_nulls().as_ref()));
    Ok(nulls)
}

/// The three bit positions of a key hash (double hashing), before reduction to a filter's size:
/// reduced modulo any power of two, so that a filter can be folded to a smaller one.
fn positions(hash: u64) -> [u64; 3] {
    let step = hash.rotate_left(32) | 1;
    [hash, hash.wrapping_add(step), hash.wrapping_add(step.wrapping_mul(2))]
}

/// A bit set whose size is a power of two.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn zeros(bits: usize) -> Self {
        Self(vec![0; bits.max(64) / 64])
    }

    fn mask(&self) -> u64 {
        (self.0.len() as u64 * 64) - 1
    }

    fn insert(&mut self, hash: u64) {
        let mask = self.mask();
        for p in positions(hash) {
            let p = p & mask;
            self.0[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    fn contains(&self, hash: u64) -> bool {
        let mask = self.mask();
        positions(hash).iter().all(|p| {
            let p = p & mask;
            self.0[(p / 64) as usize] & (1 << (p % 64)) != 0
        })
    }

    /// ORs `other`, of a size at least this one's, into this one: bit `p` of `other` is bit
    /// `p mod size` here, exactly where a key of `other` lands in this size.
    fn fold_in(&mut self, other: &[u64]) {
        let words = self.0.len();
        for (i, word) in other.iter().enumerate() {
            self.0[i % words] |= word;
        }
    }

    fn density(&self) -> f64 {
        let ones: u64 = self.0.iter().map(|w| w.count_ones() as u64).sum();
        ones as f64 / (self.0.len() as f64 * 64.0)
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn from_bytes(bytes: &[u8], max_bits: usize) -> Result<Self> {
        let words = bytes.len() / 8;
        if bytes.len() % 8 != 0 || !words.is_power_of_two() || words * 64 > max_bits {
            return exec_err!("a join key filter of {} bytes: expected a power of two of 8-byte words, at most {} bits", bytes.len(), max_bits);
        }
        Ok(Self(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()))
    }
}

/// The join keys of one build Task's output, as its worker reports them: the distinct key
/// hashes while they are few, else a Bloom filter of `KEY_SUMMARY_BITS` bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SummaryForm {
    Hashes(Vec<u64>),
    Bits(Vec<u8>),
}

/// Summarizes the join keys of a build Task's output as it is written.
#[derive(Debug)]
pub struct KeySummary {
    keys: Vec<usize>,
    bits: Bits,
    /// Every key hash while there are at most `KEY_SUMMARY_HASHES_MAX`; None beyond.
    hashes: Option<Vec<u64>>,
    scratch: Vec<u64>,
}

impl KeySummary {
    pub fn new(keys: Vec<usize>) -> Self {
        Self { keys, bits: Bits::zeros(KEY_SUMMARY_BITS), hashes: Some(Vec::new()), scratch: Vec::new() }
    }

    pub fn add(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut hashes = std::mem::take(&mut self.scratch);
        let nulls = key_hashes(batch, &self.keys, &mut hashes)?;
        for (row, &hash) in hashes.iter().enumerate() {
            if nulls.as_ref().is_some_and(|n| n.is_null(row)) {
                continue;
            }
            self.bits.insert(hash);
            if let Some(list) = &mut self.hashes {
                list.push(hash);
            }
        }
        if let Some(list) = &mut self.hashes {
            if list.len() > KEY_SUMMARY_HASHES_MAX {
                list.sort_unstable();
                list.dedup();
                if list.len() > KEY_SUMMARY_HASHES_MAX / 2 {
                    self.hashes = None;
                }
            }
        }
        self.scratch = hashes;
        Ok(())
    }

    /// The summary of every batch added so far; it leaves the summary empty.
    pub fn finish(&mut self) -> SummaryForm {
        let bits = std::mem::replace(&mut self.bits, Bits(Vec::new()));
        match self.hashes.take() {
            Some(mut list) => {
                list.sort_unstable();
                list.dedup();
                SummaryForm::Hashes(list)
            }
            None => SummaryForm::Bits(bits.to_bytes()),
        }
    }
}

/// A Bloom filter over the join keys of a whole build Stage, as the probe Stage's Tasks get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFilter(Bits);

impl KeyFilter {
    /// Combines the summaries of every Task of a build Stage into one filter, sized for the
    /// keys they hold; None when it would keep nearly every row anyway.
    pub fn combine<'a>(summaries: impl IntoIterator<Item = &'a SummaryForm>) -> Option<Self> {
        let summaries: Vec<&SummaryForm> = summaries.into_iter().collect();
        let any_bits = summaries.iter().any(|s| matches!(s, SummaryForm::Bits(_)));
        let keys: usize = summaries.iter().map(|s| if let SummaryForm::Hashes(h) = s { h.len() } else { 0 }).sum();
        let size = match any_bits {
            true => KEY_SUMMARY_BITS,
            false => (keys * KEY_FILTER_BITS_PER_KEY).next_power_of_two().clamp(KEY_FILTER_BITS_MIN, KEY_SUMMARY_BITS),
        };
        let mut bits = Bits::zeros(size);
        for summary in summaries {
            match summary {
                SummaryForm::Hashes(hashes) => hashes.iter().for_each(|&h| bits.insert(h)),
                SummaryForm::Bits(bytes) => bits.fold_in(&Bits::from_bytes(bytes, KEY_SUMMARY_BITS).ok()?.0),
            }
        }
        (bits.density() <= KEY_FILTER_DENSITY_MAX).then_some(Self(bits))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    /// The memory its bits take.
    pub fn size_bytes(&self) -> usize {
        self.0 .0.len() * 8
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Bits::from_bytes(bytes, KEY_SUMMARY_BITS).map(Self)
    }

    /// Which rows of `batch` may have a partner: the filter holds their keys, none NULL.
    fn keep(&self, batch: &RecordBatch, keys: &[usize], hashes: &mut Vec<u64>) -> Result<BooleanArray> {
        let nulls = key_hashes(batch, keys, hashes)?;
        Ok(hashes
            .iter()
            .enumerate()
            .map(|(row, &h)| Some(nulls.as_ref().is_none_or(|n| n.is_valid(row)) && self.0.contains(h)))
            .collect())
    }
}

/// Rows a probe Task's key filter saw and kept.
#[derive(Debug, Default)]
pub struct FilterCounts {
    pub rows_in: AtomicU64,
    pub rows_kept: AtomicU64,
}

/// Where a probe Task's key filter comes from: its assignment, or the coordinator while it
/// runs (its Stage did not wait for the filter). Until a late one arrives, rows pass as they are:
/// they are correct either way, the filter only saves moving them.
#[derive(Clone)]
pub enum FilterSource {
    Given(Arc<KeyFilter>),
    Late(Arc<OnceLock<KeyFilter>>),
}

/// `stream` without the rows `filter` rules out. After `KEY_FILTER_SAMPLE_ROWS` rows, a filter
/// that kept more than `KEY_FILTER_KEEP_FRACTION_MAX` of them is no longer applied: it costs
/// more than it saves.
pub(super) fn filter_stream(stream: SendableRecordBatchStream, source: FilterSource, keys: Vec<usize>, counts: Arc<FilterCounts>) -> SendableRecordBatchStream {
    let schema = stream.schema();
    let mut hashes = Vec::new();
    let mut applying = true;
    let filtered = stream.map(move |batch| {
        let batch = batch?;
        let filter = match &source {
            FilterSource::Given(filter) => filter,
            FilterSource::Late(slot) => match slot.get() {
                Some(filter) => filter,
                None => return Ok(batch),
            },
        };
        if !applying {
            return Ok(batch);
        }
        let keep = filter.keep(&batch, &keys, &mut hashes)?;
        let kept = filter_record_batch(&batch, &keep)?;
        let seen = counts.rows_in.fetch_add(batch.num_rows() as u64, Ordering::Relaxed) + batch.num_rows() as u64;
        let passed = counts.rows_kept.fetch_add(kept.num_rows() as u64, Ordering::Relaxed) + kept.num_rows() as u64;
        if seen >= KEY_FILTER_SAMPLE_ROWS && passed as f64 > seen as f64 * KEY_FILTER_KEEP_FRACTION_MAX {
            applying = false;
        }
        Ok(kept)
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, filtered))
}

/// `stream` as it is, adding the join keys of every batch to `summary` on the way.
pub fn summarize_stream(stream: SendableRecordBatchStream, summary: Arc<Mutex<KeySummary>>) -> SendableRecordBatchStream {
    let schema = stream.schema();
    let summarized = stream.map(move |batch| {
        let batch = batch?;
        summary.lock().expect("key summary lock").add(&batch)?;
        Ok(batch)
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, summarized))
}

#[cfg(test)]
mod keys_below_tests {
    use super::*;
    use datafusion::physical_plan::aggregates::AggregateMode;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// The physical plan of `sql` over `t(id, g, v)`, in two partitions.
    async fn plan(sql: &str) -> Arc<dyn ExecutionPlan> {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
        ctx.sql("CREATE TABLE t AS SELECT value % 100 AS id, value % 3 AS g, value AS v FROM generate_series(0, 999)").await.unwrap();
        ctx.sql(sql).await.unwrap().create_physical_plan().await.unwrap()
    }

    pub(super) fn find(plan: &Arc<dyn ExecutionPlan>, hit: &dyn Fn(&Arc<dyn ExecutionPlan>) -> bool) -> Option<Arc<dyn ExecutionPlan>> {
        if hit(plan) {
            return Some(Arc::clone(plan));
        }
        plan.children().into_iter().find_map(|c| find(c, hit))
    }

    fn aggregate(plan: &Arc<dyn ExecutionPlan>, mode: AggregateMode) -> Arc<dyn ExecutionPlan> {
        find(plan, &|p| p.downcast_ref::<AggregateExec>().is_some_and(|a| *a.mode() == mode)).unwrap_or_else(|| panic!("no {mode:?} aggregate"))
    }

    #[tokio::test]
    async fn aggregates_pass_their_group_columns_to_their_input() {
        let plan = plan("SELECT g, id, count(*) FROM t WHERE v > 10 GROUP BY g, id").await;
        let fin = aggregate(&plan, AggregateMode::FinalPartitioned);
        assert_eq!(keys_below(&fin, &[1, 0]), Some(vec![1, 0]));
        assert_eq!(keys_below(&fin, &[2]), None, "count(*) is no input column");
        let partial = aggregate(&plan, AggregateMode::Partial);
        let input = partial.children()[0].schema();
        let below = keys_below(&partial, &[1]).unwrap();
        assert_eq!(input.field(below[0]).name(), "id");
    }

    #[tokio::test]
    async fn grouping_sets_and_limits_stop_the_keys() {
        let sets = plan("SELECT id, g, count(*) FROM t GROUP BY GROUPING SETS ((id, g), (id))").await;
        for mode in [AggregateMode::Partial, AggregateMode::FinalPartitioned] {
            assert_eq!(keys_below(&aggregate(&sets, mode.clone()), &[0]), None, "{mode:?} of grouping sets");
        }
        let limited = plan("SELECT id FROM t GROUP BY id LIMIT 5").await;
        let agg = find(&limited, &|p| p.downcast_ref::<AggregateExec>().is_some_and(|a| a.limit_options().is_some())).expect("a limited aggregate");
        assert_eq!(keys_below(&agg, &[0]), None);
        let sorted = plan("SELECT id, v FROM t ORDER BY v LIMIT 5").await;
        let top = find(&sorted, &|p| p.downcast_ref::<SortExec>().is_some()).unwrap();
        assert!(top.fetch().is_some());
        assert_eq!(keys_below(&top, &[0]), None);
        // Merges and filters with and without a fetch.
        let filtered = plan("SELECT id, v FROM t WHERE v > 10").await;
        let filter = find(&filtered, &|p| p.downcast_ref::<FilterExec>().is_some()).unwrap();
        let merge: Arc<dyn ExecutionPlan> = Arc::new(CoalescePartitionsExec::new(Arc::clone(&filter)));
        for node in [filter, merge] {
            assert!(keys_below(&node, &[0]).is_some(), "{}", node.name());
            let limited = node.with_fetch(Some(5)).unwrap_or_else(|| panic!("{} takes no fetch", node.name()));
            assert_eq!(keys_below(&limited, &[0]), None, "{} with a fetch", node.name());
        }
    }
}

#[cfg(test)]
mod join_inputs_tests {
    use super::*;
    use datafusion::common::JoinType;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// The first hash join of `sql` over `l(lk, lx)` and `r(rk, ry)`, with the column named
    /// `key` of its output, and where each input holds that column (by name) if it does.
    async fn case(sql: &str, key: &str) -> (JoinType, [Option<Vec<usize>>; 2], [Option<usize>; 2]) {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
        ctx.sql("CREATE TABLE l AS SELECT value % 50 AS lk, value AS lx FROM generate_series(1, 500)").await.unwrap();
        ctx.sql("CREATE TABLE r AS SELECT value % 70 AS rk, value AS ry FROM generate_series(1, 900)").await.unwrap();
        let plan = ctx.sql(sql).await.unwrap().create_physical_plan().await.unwrap();
        let join = keys_below_tests::find(&plan, &|p| p.downcast_ref::<HashJoinExec>().is_some()).expect("a hash join");
        let join = join.downcast_ref::<HashJoinExec>().unwrap();
        let at = join.schema().index_of(key).unwrap();
        let held = [join.left(), join.right()].map(|input| input.schema().index_of(key).ok());
        (*join.join_type(), join_inputs_keys(join, &[at]), held)
    }

    #[tokio::test]
    async fn inner_and_semi_joins_filter_both_inputs_by_a_join_key() {
        let (kind, found, held) = case("SELECT lk, lx, rk, ry FROM l JOIN r ON lk = rk", "lk").await;
        assert_eq!(kind, JoinType::Inner);
        // Its own input by itself, the other by the join key it equals.
        let own = held.iter().position(Option::is_some).unwrap();
        assert_eq!(found[own], Some(vec![held[own].unwrap()]));
        let (_, _, other_held) = case("SELECT lk, lx, rk, ry FROM l JOIN r ON lk = rk", "rk").await;
        assert_eq!(found[1 - own], Some(vec![other_held[1 - own].unwrap()]));
        // A column that is no join key goes only to its own side.
        let (_, found, held) = case("SELECT lk, lx, rk, ry FROM l JOIN r ON lk = rk", "lx").await;
        assert_eq!(found.clone().map(|f| f.is_some()), held.map(|h| h.is_some()), "{found:?}");
        let (kind, found, _) = case("SELECT lk, lx FROM l WHERE EXISTS (SELECT 1 FROM r WHERE rk = lk)", "lk").await;
        assert!(matches!(kind, JoinType::LeftSemi | JoinType::RightSemi), "{kind:?}");
        assert!(found.iter().all(Option::is_some), "{kind:?}: {found:?}");
    }

    #[tokio::test]
    async fn outer_and_anti_joins_filter_only_their_preserved_input() {
        // A row of the other input may leave an unmatched row behind, with a NULL key.
        let (kind, found, held) = case("SELECT lk, lx, rk, ry FROM l LEFT JOIN r ON lk = rk", "lk").await;
        let preserved = match kind {
            JoinType::Left => 0,
            JoinType::Right => 1,
            other => panic!("{other:?}"),
        };
        assert_eq!(found[preserved], Some(vec![held[preserved].unwrap()]));
        assert_eq!(found[1 - preserved], None);
        let (_, found, _) = case("SELECT lk, lx, rk, ry FROM l LEFT JOIN r ON lk = rk", "rk").await;
        assert_eq!(found, [None, None], "the NULL-padded side's key");
        let (kind, found, _) = case("SELECT lk, lx, rk, ry FROM l FULL JOIN r ON lk = rk", "lk").await;
        assert_eq!((kind, found), (JoinType::Full, [None, None]));
        let (kind, found, held) = case("SELECT lk, lx FROM l WHERE NOT EXISTS (SELECT 1 FROM r WHERE rk = lk)", "lk").await;
        let kept = match kind {
            JoinType::LeftAnti => 0,
            JoinType::RightAnti => 1,
            other => panic!("{other:?}"),
        };
        assert_eq!(found[kept], Some(vec![held[kept].unwrap()]));
        assert_eq!(found[1 - kept], None, "removing the other input's rows would add output rows");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn batch(ids: Vec<Option<i64>>) -> RecordBatch {
        let names: Vec<String> = ids.iter().map(|i| format!("n{i:?}")).collect();
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true), Field::new("name", DataType::Utf8, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(ids)), Arc::new(StringArray::from(names))]).unwrap()
    }

    fn kept(filter: &KeyFilter, probe: &RecordBatch) -> Vec<bool> {
        let keep = filter.keep(probe, &[0], &mut Vec::new()).unwrap();
        keep.iter().map(|b| b.unwrap()).collect()
    }

    #[test]
    fn every_build_key_passes_and_null_keys_never_do() {
        let mut summary = KeySummary::new(vec![0]);
        summary.add(&batch((0..1000).map(|i| Some(i * 7)).chain([None]).collect())).unwrap();
        let filter = KeyFilter::combine([&summary.finish()]).unwrap();
        let probe = batch((0..7000).map(Some).chain([None]).collect());
        let keep = kept(&filter, &probe);
        assert!((0..1000).all(|i| keep[i * 7]), "a build key was ruled out");
        assert!(!keep[7000], "a NULL key has no partner");
        let false_positives = (0..7000).filter(|i| i % 7 != 0 && keep[*i]).count();
        assert!(false_positives < 600, "{false_positives} of 6000 absent keys passed");
    }

    #[test]
    fn summaries_too_large_for_hashes_fold_into_the_same_filter() {
        // One Task with more keys than a hash list holds reports bits; another reports hashes.
        let mut large = KeySummary::new(vec![0]);
        let many = KEY_SUMMARY_HASHES_MAX as i64 + 10;
        large.add(&batch((0..many).map(Some).collect())).unwrap();
        let large = large.finish();
        assert!(matches!(large, SummaryForm::Bits(_)));
        let mut small = KeySummary::new(vec![0]);
        small.add(&batch(vec![Some(-5), Some(-5), Some(-9)])).unwrap();
        let small = small.finish();
        assert_eq!(small, SummaryForm::Hashes({
            let mut h = Vec::new();
            key_hashes(&batch(vec![Some(-9), Some(-5)]), &[0], &mut h).unwrap();
            h.sort_unstable();
            h
        }));
        let filter = KeyFilter::combine([&large, &small]).unwrap();
        let probe = batch((-10..many).map(Some).collect());
        let keep = kept(&filter, &probe);
        assert!(keep[5] && keep[1] && (10..keep.len()).all(|i| keep[i]));
        let bytes = filter.to_bytes();
        assert_eq!(KeyFilter::from_bytes(&bytes).unwrap(), filter);
    }

    #[test]
    fn an_empty_build_side_rules_out_every_row_and_a_full_one_is_not_sent() {
        let empty = KeySummary::new(vec![0]).finish();
        let filter = KeyFilter::combine([&empty]).unwrap();
        assert!(kept(&filter, &batch((0..100).map(Some).collect())).iter().all(|k| !k));
        let dense = SummaryForm::Bits(vec![0xff; KEY_SUMMARY_BITS / 8]);
        assert!(KeyFilter::combine([&dense]).is_none());
        assert!(KeyFilter::from_bytes(&[0; 24]).is_err(), "not a power of two");
    }

    #[tokio::test]
    async fn a_filter_that_keeps_nearly_everything_stops_being_applied() {
        let mut summary = KeySummary::new(vec![0]);
        summary.add(&batch((0..100).map(Some).collect())).unwrap();
        let filter = KeyFilter::combine([&summary.finish()]).unwrap();
        let rows = KEY_FILTER_SAMPLE_ROWS as i64;
        // Every key of the first batches is in the build side; the last batch's are not.
        let batches = vec![Ok(batch((0..rows).map(|i| Some(i % 100)).collect())), Ok(batch((1000..1100).map(Some).collect()))];
        let schema = batch(vec![]).schema();
        let stream = Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::iter(batches)));
        let counts = Arc::new(FilterCounts::default());
        let out: Vec<RecordBatch> = filter_stream(stream, FilterSource::Given(Arc::new(filter)), vec![0], Arc::clone(&counts)).map(|b| b.unwrap()).collect().await;
        assert_eq!(out.iter().map(RecordBatch::num_rows).sum::<usize>(), rows as usize + 100);
        assert_eq!(counts.rows_in.load(Ordering::Relaxed), rows as u64);
    }

    #[tokio::test]
    async fn a_filter_that_arrives_while_the_stream_runs_applies_from_the_next_batch() {
        let mut summary = KeySummary::new(vec![0]);
        summary.add(&batch((0..10).map(Some).collect())).unwrap();
        let filter = KeyFilter::combine([&summary.finish()]).unwrap();
        let slot = Arc::new(OnceLock::new());
        let (sender, receiver) = futures::channel::mpsc::unbounded();
        let schema = batch(vec![]).schema();
        let stream = Box::pin(RecordBatchStreamAdapter::new(schema, receiver));
        let counts = Arc::new(FilterCounts::default());
        let mut out = filter_stream(stream, FilterSource::Late(Arc::clone(&slot)), vec![0], Arc::clone(&counts));
        // Before the filter arrives every row passes and none is counted as seen by it.
        sender.unbounded_send(Ok(batch((0..1000).map(Some).collect()))).unwrap();
        assert_eq!(out.next().await.unwrap().unwrap().num_rows(), 1000);
        assert_eq!(counts.rows_in.load(Ordering::Relaxed), 0);
        slot.set(filter).unwrap();
        sender.unbounded_send(Ok(batch((0..1000).map(Some).collect()))).unwrap();
        let kept = out.next().await.unwrap().unwrap();
        let ids = kept.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        assert!((0..10).all(|k| ids.values().contains(&k)), "a build key was dropped");
        assert!(kept.num_rows() < 100, "the late filter was not applied: {} rows kept", kept.num_rows());
        assert_eq!(counts.rows_in.load(Ordering::Relaxed), 1000);
    }
}
