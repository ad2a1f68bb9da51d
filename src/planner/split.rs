//! Cutting a Stage's file scan into Task slices: whole files, and byte ranges of large Parquet
//! files (DataFusion's Parquet reader assigns each row group to exactly one range: the one that
//! holds its first page). Where the coordinator read the files' row-group offsets, the slices
//! are cut at row groups ([`RowGroupStarts`]); otherwise at equal byte shares. A slice can
//! be cut again at dispatch ([`narrow_task_plan`]): piece `i` of `n` reads the `i`-th of `n`
//! contiguous, equal byte ranges of the slice, so the pieces together read it exactly once and,
//! read one after the other, in its order.

use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{exec_err, Result};
use datafusion::datasource::listing::{FileRange, PartitionedFile};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_plan::ExecutionPlan;
use object_store::path::Path;

use super::rules::file_scan;
use crate::config::PlannerConfig;

/// Where each row group of a Parquet file begins, by file (as the coordinator read it from the
/// footers, `storage::pruning::row_group_starts`): DataFusion's reader gives a row group to the
/// byte range that holds this offset. Files missing from it are cut by bytes alone.
pub type RowGroupStarts = HashMap<Path, Vec<u64>>;

/// The input of one Task: a group of files or file ranges, read in order.
#[derive(Debug, Clone)]
pub struct TaskSlice {
    pub group: FileGroup,
    pub bytes: u64,
}

impl TaskSlice {
    pub fn describe(&self) -> String {
        let files = self.group.files();
        let ranged = files.iter().filter(|f| f.range.is_some()).count();
        let first = files.first().map(|f| f.object_meta.location.filename().unwrap_or("?").to_string());
        format!(
            "{} file(s){} from {} ({} bytes)",
            files.len(),
            if ranged > 0 { format!(", {ranged} byte range(s)") } else { String::new() },
            first.unwrap_or_default(),
            self.bytes
        )
    }
}

/// Splits the single file scan under `plan` into slices of roughly equal size.
pub(super) fn slice_scan(
    plan: &Arc<dyn ExecutionPlan>,
    config: &PlannerConfig,
    total_slots: usize,
    starts: &RowGroupStarts,
) -> Result<Vec<TaskSlice>> {
    let Some(scan) = find_scan(plan) else {
        return exec_err!("stage without a file scan");
    };
    let files: Vec<PartitionedFile> = scan.file_groups.iter().flat_map(|g| g.iter().cloned()).collect();
    let total: u64 = files.iter().map(file_bytes).sum();
    let tasks = task_count(total, config, total_slots);
    let splittable = scan.file_source().file_type() == "parquet";
    // Files whose order matters (sorted scans) keep one file or range per Task.
    if !scan.output_ordering.is_empty() {
        let parts = ordered_parts(&files, tasks, splittable);
        let pieces = files.into_iter().zip(parts).flat_map(|(file, parts)| split_file(file, parts));
        let slices = pieces.map(|piece| TaskSlice { bytes: file_bytes(&piece), group: FileGroup::new(vec![piece]) });
        return Ok(merge_excess(slices.collect(), config.tasks_per_stage_max));
    }
    if splittable {
        if let Some(units) = row_group_units(&files, starts) {
            return Ok(share_units(files, units, tasks, config.tasks_per_stage_max));
        }
    }
    Ok(share_out(files, tasks, splittable, config.tasks_per_stage_max))
}

/// How many Tasks a scan of `total` bytes is cut into, so that they fill the slots in even
/// waves: a Stage waits for its slowest wave, and a last wave of fewer Tasks than slots leaves
/// slots idle (3 Tasks on 2 slots take as long as 4). Aims at `tasks_per_slot` Tasks per slot,
/// as many as `task_min_bytes` allows up to one wave, and between the two at the largest whole
/// number of waves. Never 0: an empty scan still has one Task.
fn task_count(total: u64, config: &PlannerConfig, total_slots: usize) -> u64 {
    let slots = total_slots.max(1) as u64;
    let target = slots.saturating_mul(config.tasks_per_slot.max(1) as u64).min(config.tasks_per_stage_max.max(1) as u64);
    let allowed = total.div_ceil(config.task_min_bytes.max(1)).max(1);
    match allowed {
        n if n >= target => target,
        n if n <= slots => n,
        n => n - n % slots,
    }
}

/// Whether a slice of this scan can be cut into byte ranges (Parquet) or only into whole files.
pub(super) fn ranges_splittable(plan: &Arc<dyn ExecutionPlan>) -> bool {
    find_scan(plan).is_some_and(|scan| scan.file_source().file_type() == "parquet")
}

/// A Task plan over one slice, narrowed to piece `index` of `of` of that slice. The plan must
/// hold exactly one file scan (the probe chain of a sliced Stage).
pub fn narrow_task_plan(plan: Arc<dyn ExecutionPlan>, index: u32, of: u32) -> Result<Arc<dyn ExecutionPlan>> {
    // `of` comes off the network: it sizes what is allocated here.
    if of == 0 || index >= of || of > crate::config::SLICE_PIECES_MAX {
        return exec_err!("slice piece {index} of {of}");
    }
    let mut scans = 0;
    let narrowed = plan.transform_up(|node| {
        let Some(scan) = file_scan(node.as_ref()) else { return Ok(Transformed::no(node)) };
        scans += 1;
        let splittable = scan.file_source().file_type() == "parquet";
        let files: Vec<PartitionedFile> = scan.file_groups.iter().flat_map(|g| g.iter().cloned()).collect();
        let group = FileGroup::new(piece_of(files, index, of, splittable));
        let config = FileScanConfigBuilder::from(scan.clone()).with_file_groups(vec![group]).build();
        Ok(Transformed::yes(DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>))
    })?;
    if scans != 1 {
        return exec_err!("a Task plan cut into pieces must scan exactly one set of files, not {scans}");
    }
    Ok(narrowed.data)
}

/// Piece `index` of `of` of `files` ([`pieces_of`]).
fn piece_of(files: Vec<PartitionedFile>, index: u32, of: u32, splittable: bool) -> Vec<PartitionedFile> {
    pieces_of(files, of, splittable).swap_remove(index as usize)
}

/// `files` cut into `of` pieces: the equal, contiguous byte ranges over the files laid end to
/// end. A file that cannot be cut belongs whole to the piece that holds its middle byte. One
/// pass: each file is visited with the pieces it overlaps only.
fn pieces_of(files: Vec<PartitionedFile>, of: u32, splittable: bool) -> Vec<Vec<PartitionedFile>> {
    let of = of.max(1);
    let total: u64 = files.iter().map(file_bytes).sum();
    let boundary = |i: u32| (total as u128 * i as u128 / of as u128) as u64;
    let mut pieces = vec![Vec::new(); of as usize];
    let (mut offset, mut first) = (0u64, 0u32);
    for file in files {
        let len = file_bytes(&file);
        let end = offset + len;
        if !splittable {
            let middle = offset + len / 2;
            let owner = if total == 0 { 0 } else { ((middle as u128 * of as u128) / total as u128).min(of as u128 - 1) as usize };
            pieces[owner].push(file);
            offset = end;
            continue;
        }
        // The first piece that ends after this file begins; the pieces after it up to the one
        // that holds the file's end.
        while first + 1 < of && boundary(first + 1) <= offset {
            first += 1;
        }
        let start_in_file = file.range.as_ref().map_or(0, |r| r.start.max(0) as u64);
        for index in first..of {
            let (lo, hi) = (boundary(index), boundary(index + 1));
            if lo >= end {
                break;
            }
            let (a, b) = (lo.max(offset), hi.min(end));
            if a == offset && b == end && len > 0 {
                pieces[index as usize].push(file.clone());
            } else if a < b {
                let mut part = file.clone();
                part.range = Some(FileRange { start: (start_in_file + a - offset) as i64, end: (start_in_file + b - offset) as i64 });
                pieces[index as usize].push(part);
            }
        }
        offset = end;
    }
    pieces
}

/// The bytes of the table files `plan` reads, when there are some and at most `max_bytes` (0:
/// never): such a plan is too small to gain from being distributed.
pub(super) fn small_input(plan: &Arc<dyn ExecutionPlan>, max_bytes: u64) -> Option<u64> {
    if max_bytes == 0 {
        return None;
    }
    let mut scans = 0;
    let mut bytes = 0u64;
    plan.apply(|node| {
        if let Some(scan) = file_scan(node.as_ref()) {
            scans += 1;
            bytes += scan.file_groups.iter().flat_map(|g| g.iter()).map(file_bytes).sum::<u64>();
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .ok()?;
    (scans > 0 && bytes <= max_bytes).then_some(bytes)
}

fn find_scan(plan: &Arc<dyn ExecutionPlan>) -> Option<&datafusion::datasource::physical_plan::FileScanConfig> {
    if let Some(scan) = file_scan(plan.as_ref()) {
        return Some(scan);
    }
    super::rules::chain_child(plan).and_then(find_scan)
}

fn file_bytes(file: &PartitionedFile) -> u64 {
    match &file.range {
        Some(range) => (range.end - range.start).max(0) as u64,
        None => file.object_meta.size,
    }
}

/// A range of a sorted scan may run this far over the even share (total bytes over Tasks) once
/// the scan has its Tasks: a file a few bytes over the share stays whole, while one several
/// shares large beside many small files is still cut, at the cost of a few more Tasks.
const ORDERED_RANGE_SLACK_PCT: u64 = 150;

/// How many ranges each file of a sorted scan is cut into, one Task each. Every file gets one;
/// each further one goes to the file whose ranges are then the largest, until the scan has
/// `tasks` Tasks and no range is over [`ORDERED_RANGE_SLACK_PCT`] of the even share. So the
/// count is what was asked for unless a large file needs more, and the largest Task (the one a
/// Stage waits for) is as small as that count allows. Cutting each file at a fixed chunk
/// instead made a Task too many whenever a file was a byte over the chunk: 4 equal files for 4
/// Tasks became 5 Tasks, a third wave on 2 slots.
fn ordered_parts(files: &[PartitionedFile], tasks: u64, splittable: bool) -> Vec<u64> {
    let total: u64 = files.iter().map(file_bytes).sum();
    let limit = total.div_ceil(tasks.max(1)).saturating_mul(ORDERED_RANGE_SLACK_PCT) / 100;
    let cuttable = |file: &PartitionedFile| splittable && file.range.is_none() && file.object_meta.size > 1;
    let mut parts = vec![1u64; files.len()];
    // Largest range first: (bytes over ranges, file).
    let mut heap: BinaryHeap<(Ratio, usize)> =
        files.iter().enumerate().filter(|(_, f)| cuttable(f)).map(|(i, f)| (Ratio(file_bytes(f), 1), i)).collect();
    let mut count = files.len() as u64;
    while let Some(&(Ratio(bytes, n), i)) = heap.peek() {
        let over_limit = bytes as u128 > limit as u128 * n as u128;
        // Stop with the Tasks asked for and no range over the limit, or ranges of a byte.
        if (count >= tasks && !over_limit) || bytes <= n {
            break;
        }
        heap.pop();
        parts[i] = n + 1;
        count += 1;
        heap.push((Ratio(bytes, n + 1), i));
    }
    parts
}

/// `bytes / parts`, compared exactly (without rounding) by cross-multiplication.
#[derive(Clone, Copy)]
struct Ratio(u64, u64);

impl Ord for Ratio {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0 as u128 * other.1 as u128).cmp(&(other.0 as u128 * self.1 as u128))
    }
}

impl PartialOrd for Ratio {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ratio {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Ratio {}

/// `file` cut into `parts` contiguous byte ranges of equal size, at most one per byte.
fn split_file(file: PartitionedFile, parts: u64) -> Vec<PartitionedFile> {
    let size = file.object_meta.size;
    let parts = parts.min(size);
    if parts <= 1 || file.range.is_some() {
        return vec![file];
    }
    let boundary = |i: u64| (size as u128 * i as u128 / parts as u128) as i64;
    (0..parts)
        .map(|i| {
            let mut piece = file.clone();
            piece.range = Some(FileRange { start: boundary(i), end: boundary(i + 1) });
            piece
        })
        .collect()
}

/// Cuts the files, laid end to end, into `tasks` equal contiguous byte shares ([`pieces_of`]),
/// so the Tasks of a Stage read equal bytes however the sizes of its files fall. Filling
/// slices greedily up to a chunk instead makes slices too many or uneven whenever files
/// straddle the chunk boundaries (two files just over half a chunk each end up in three).
/// Unsplittable files go whole to the share that holds their middle byte; a share left empty
/// that way makes no Task.
fn share_out(files: Vec<PartitionedFile>, tasks: u64, splittable: bool, max_tasks: usize) -> Vec<TaskSlice> {
    let tasks = tasks.clamp(1, u32::MAX as u64) as u32;
    let mut slices: Vec<TaskSlice> = pieces_of(files, tasks, splittable)
        .into_iter()
        .filter(|group| !group.is_empty())
        .map(|group| TaskSlice { bytes: group.iter().map(file_bytes).sum(), group: FileGroup::new(group) })
        .collect();
    if slices.is_empty() {
        slices.push(TaskSlice { group: FileGroup::new(vec![]), bytes: 0 });
    }
    merge_excess(slices, max_tasks)
}

/// A byte range of one file of a scan that holds the start of at most one row group, weighted
/// by that row group's bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Unit {
    file: usize,
    start: u64,
    end: u64,
    weight: u64,
}

/// The scan's files, in order, cut into one [`Unit`] per row group they read (ranges that hold
/// no row group's start become a unit of weight 0, which reads nothing); None when the row
/// groups of some file are not known.
fn row_group_units(files: &[PartitionedFile], starts: &RowGroupStarts) -> Option<Vec<Unit>> {
    let mut units = Vec::new();
    for (index, file) in files.iter().enumerate() {
        let size = file.object_meta.size;
        // In file order, each once, inside the file: a layout that is not (another store's
        // file at the same path, say) still gives units that cover the file exactly once.
        let mut file_starts: Vec<u64> = starts.get(&file.object_meta.location)?.iter().copied().filter(|&s| s < size).collect();
        file_starts.sort_unstable();
        file_starts.dedup();
        let (from, to) = file.range.as_ref().map_or((0, size), |r| (r.start.max(0) as u64, r.end.max(0) as u64));
        // Each row group's bytes run to the next one's start; the last one's to the footer.
        let groups: Vec<(u64, u64)> = file_starts
            .iter()
            .enumerate()
            .map(|(i, &start)| (start, file_starts.get(i + 1).copied().unwrap_or(size).saturating_sub(start)))
            .filter(|&(start, _)| from <= start && start < to)
            .collect();
        if groups.is_empty() {
            units.push(Unit { file: index, start: from, end: to, weight: 0 });
            continue;
        }
        let last = groups.len() - 1;
        for (i, &(start, weight)) in groups.iter().enumerate() {
            let start = if i == 0 { from } else { start };
            let end = if i == last { to } else { groups[i + 1].0 };
            units.push(Unit { file: index, start, end, weight });
        }
    }
    Some(units)
}

/// Like [`share_out`], over whole row groups: each unit goes to the share of the total weight
/// that holds its middle, so the Tasks read about equal bytes and each row group is read by the
/// Task whose range DataFusion's reader gives it to. Cutting by bytes alone does not: the reader
/// gives a row group to the range holding its start, so a cut just past a start moves a whole
/// row group (7 row groups of partsupp on 2 Tasks were read as 4 and 3, 28 MB and 15 MB).
fn share_units(files: Vec<PartitionedFile>, units: Vec<Unit>, tasks: u64, max_tasks: usize) -> Vec<TaskSlice> {
    let total: u128 = units.iter().map(|u| u.weight as u128).sum();
    let tasks = tasks.max(1) as u128;
    let mut shares: Vec<Vec<Unit>> = vec![Vec::new(); tasks as usize];
    let mut offset = 0u128;
    for unit in units {
        let middle = offset + unit.weight as u128 / 2;
        let owner = if total == 0 { 0 } else { (middle * tasks / total).min(tasks - 1) };
        offset += unit.weight as u128;
        shares[owner as usize].push(unit);
    }
    // A share of weightless units only (ranges that hold no row group's start) makes no Task of
    // its own, but its units are still read, by the share before it (or after, for the first):
    // every byte of every file stays in exactly one Task, whatever the layout said.
    let mut kept: Vec<Vec<Unit>> = Vec::new();
    let mut leading: Vec<Unit> = Vec::new();
    for share in shares.into_iter().filter(|share| !share.is_empty()) {
        match kept.last_mut() {
            Some(last) if !share.iter().any(|u| u.weight > 0) => last.extend(share),
            None if !share.iter().any(|u| u.weight > 0) => leading.extend(share),
            _ => kept.push(std::mem::take(&mut leading).into_iter().chain(share).collect()),
        }
    }
    if kept.is_empty() {
        kept.push(leading);
    }
    let mut slices: Vec<TaskSlice> = kept.iter().filter(|share| !share.is_empty()).map(|share| units_slice(&files, share)).collect();
    // No unit at all (no file): one Task still runs the scan (and finds no rows).
    if slices.is_empty() {
        slices.push(TaskSlice { group: FileGroup::new(files), bytes: 0 });
    }
    merge_excess(slices, max_tasks)
}

/// The files and ranges of a share's units, neighbouring units of one file merged into one
/// range; a file read whole stays unranged.
fn units_slice(files: &[PartitionedFile], share: &[Unit]) -> TaskSlice {
    let mut merged: Vec<Unit> = Vec::new();
    for unit in share {
        match merged.last_mut() {
            Some(last) if last.file == unit.file && last.end == unit.start => {
                last.end = unit.end;
                last.weight += unit.weight;
            }
            _ => merged.push(*unit),
        }
    }
    let mut group = Vec::with_capacity(merged.len());
    for unit in &merged {
        let file = &files[unit.file];
        let (from, to) = file.range.as_ref().map_or((0, file.object_meta.size), |r| (r.start.max(0) as u64, r.end.max(0) as u64));
        let mut part = file.clone();
        if (unit.start, unit.end) != (from, to) {
            part.range = Some(FileRange { start: unit.start as i64, end: unit.end as i64 });
        }
        group.push(part);
    }
    TaskSlice { bytes: merged.iter().map(|u| u.weight).sum(), group: FileGroup::new(group) }
}

/// Respects the per-Stage Task bound by appending the surplus slices to the earlier ones.
fn merge_excess(mut slices: Vec<TaskSlice>, max_tasks: usize) -> Vec<TaskSlice> {
    let max_tasks = max_tasks.max(1);
    while slices.len() > max_tasks {
        let extra = slices.pop().expect("more slices than the bound");
        let index = slices.len() % max_tasks;
        let target = &mut slices[index];
        for file in extra.group.into_inner() {
            target.group.push(file);
        }
        target.bytes += extra.bytes;
    }
    slices
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: u64) -> PartitionedFile {
        PartitionedFile::new(name.to_string(), size)
    }

    #[test]
    fn large_parquet_file_is_cut_into_contiguous_ranges() {
        let pieces = split_file(file("a.parquet", 1000), 4);
        let ranges: Vec<_> = pieces.iter().map(|p| p.range.clone().unwrap()).map(|r| (r.start, r.end)).collect();
        assert_eq!(ranges, vec![(0, 250), (250, 500), (500, 750), (750, 1000)]);
    }

    #[test]
    fn unsplittable_files_stay_whole() {
        let files = [file("a.csv", 1000), file("b.csv", 10)];
        assert_eq!(ordered_parts(&files, 8, false), vec![1, 1]);
    }

    #[test]
    fn a_sorted_scan_makes_the_tasks_asked_for_with_the_largest_as_small_as_can_be() {
        // Regression: 4 files, the first a few bytes over a quarter of the total, made 5 Tasks
        // for 4 (a third wave on 2 slots) when files were cut at a fixed chunk.
        let files = [file("0.parquet", 16_852_332), file("1.parquet", 16_823_783), file("2.parquet", 16_829_858), file("3.parquet", 16_817_292)];
        assert_eq!(ordered_parts(&files, 4, true), vec![1, 1, 1, 1]);
        assert_eq!(ordered_parts(&files, 8, true), vec![2, 2, 2, 2]);
        // One large file and a small one: the large one takes the extra Tasks.
        assert_eq!(ordered_parts(&[file("a.parquet", 1000), file("b.parquet", 100)], 4, true), vec![3, 1]);
        assert_eq!(ordered_parts(&[file("a.parquet", 1000)], 4, true), vec![4]);
        // More files than Tasks: one each (the Task bound merges them later).
        assert_eq!(ordered_parts(&[file("a.parquet", 10), file("b.parquet", 10), file("c.parquet", 10)], 2, true), vec![1, 1, 1]);
        // A large file beside many small ones is still cut, to within the slack of the share.
        let mib = 1024 * 1024;
        let files = [file("a.parquet", mib), file("b.parquet", mib), file("c.parquet", mib), file("d.parquet", 1024 * mib)];
        assert_eq!(ordered_parts(&files, 4, true), vec![1, 1, 1, 3]);
        // Never into empty ranges.
        assert_eq!(ordered_parts(&[file("a.parquet", 2)], 8, true), vec![2]);
        let ranges = |size: u64, parts: u64| -> Vec<(i64, i64)> {
            split_file(file("a.parquet", size), parts).iter().map(|p| p.range.clone().unwrap()).map(|r| (r.start, r.end)).collect()
        };
        assert_eq!(ranges(10, 4), vec![(0, 2), (2, 5), (5, 7), (7, 10)]);
        assert_eq!(ranges(5, 4).len(), 4, "as many ranges as asked, each at least a byte");
        assert_eq!(ranges(10, 6).len(), 6);
        assert_eq!(ranges(3, 8), vec![(0, 1), (1, 2), (2, 3)]);
    }

    #[test]
    fn small_files_are_shared_out_evenly() {
        let pieces = (0..10).map(|i| file(&format!("{i}.parquet"), 100)).collect();
        let slices = share_out(pieces, 5, false, 100);
        assert_eq!(slices.iter().map(|s| s.group.len()).collect::<Vec<_>>(), vec![2, 2, 2, 2, 2]);
    }

    #[test]
    fn the_task_bound_keeps_every_file() {
        let pieces = (0..10).map(|i| file(&format!("{i}.parquet"), 100)).collect();
        let slices = share_out(pieces, 10, false, 3);
        assert_eq!(slices.len(), 3);
        assert_eq!(slices.iter().map(|s| s.group.len()).sum::<usize>(), 10);
    }

    fn ranges(files: &[PartitionedFile]) -> Vec<(String, i64, i64)> {
        files
            .iter()
            .map(|f| {
                let r = f.range.clone().unwrap();
                (f.object_meta.location.to_string(), r.start, r.end)
            })
            .collect()
    }

    #[test]
    fn pieces_of_a_slice_cover_its_bytes_once_and_in_order() {
        let mut ranged = file("b.parquet", 1000);
        ranged.range = Some(FileRange { start: 500, end: 1000 });
        let slice = vec![file("a.parquet", 300), ranged];
        let pieces: Vec<_> = (0..4).flat_map(|i| ranges(&piece_of(slice.clone(), i, 4, true))).collect();
        assert_eq!(
            pieces,
            vec![
                ("a.parquet".into(), 0, 200),
                ("a.parquet".into(), 200, 300),
                ("b.parquet".into(), 500, 600),
                ("b.parquet".into(), 600, 800),
                ("b.parquet".into(), 800, 1000),
            ]
        );
    }

    #[test]
    fn whole_files_go_to_the_piece_holding_their_middle() {
        let slice: Vec<_> = (0..5).map(|i| file(&format!("{i}.csv"), 100)).collect();
        let counts: Vec<usize> = (0..2).map(|i| piece_of(slice.clone(), i, 2, false).len()).collect();
        assert_eq!(counts, vec![2, 3]);
        assert_eq!(piece_of(vec![], 0, 3, false).len(), 0);
    }

    #[test]
    fn tasks_fill_the_slots_in_even_waves() {
        let config = PlannerConfig { tasks_per_slot: 2, task_min_bytes: 16, tasks_per_stage_max: 4096, small_query_max_bytes: 0 };
        let tasks = |total: u64, slots: usize| if total == 0 { 0 } else { task_count(total, &config, slots) };
        // Regression: 43 bytes in chunks of about 16 made 3 Tasks on 2 slots.
        assert_eq!(tasks(43, 2), 2);
        assert_eq!(tasks(43, 3), 3, "one wave on 3 slots");
        assert_eq!(tasks(100, 2), 4, "enough bytes: tasks_per_slot Tasks per slot");
        assert_eq!(tasks(1000, 2), 4);
        assert_eq!(tasks(70, 2), 4);
        assert_eq!(tasks(70, 3), 3, "5 allowed: one wave of 3");
        assert_eq!(tasks(20, 2), 2);
        assert_eq!(tasks(0, 2), 0);
        for total in [1, 15, 16, 47, 64, 65, 333, 4000] {
            for slots in 1..6 {
                let n = tasks(total, slots);
                assert!(n <= (slots * 2) as u64 && n <= total.div_ceil(16), "{total} bytes, {slots} slots: {n} Tasks");
                assert!(n <= slots as u64 || n % slots as u64 == 0, "{total} bytes, {slots} slots: {n} Tasks");
            }
        }
    }

    #[test]
    fn uneven_files_make_exactly_the_tasks_asked_for() {
        // Regression: files of 70, 70 and 40 bytes in chunks of 90 were packed greedily into 3
        // slices for 2 Tasks.
        let files = vec![file("a.csv", 70), file("b.csv", 70), file("c.csv", 40)];
        let slices = share_out(files, 2, false, 100);
        assert_eq!(slices.iter().map(|s| s.group.len()).collect::<Vec<_>>(), vec![1, 2]);
        let files: Vec<_> = (0..4).map(|i| file(&format!("{i}.parquet"), 1100)).collect();
        for tasks in 1..=7u64 {
            let slices = share_out(files.clone(), tasks, true, 100);
            let bytes: Vec<u64> = slices.iter().map(|s| s.bytes).collect();
            assert_eq!(slices.len() as u64, tasks, "{tasks} Tasks over 4 equal files");
            assert_eq!(bytes.iter().sum::<u64>(), 4400);
            assert!(bytes.iter().max().unwrap() - bytes.iter().min().unwrap() <= 1, "{tasks} Tasks: {bytes:?}");
        }
    }

    fn layout(files: &[(&str, &[u64])]) -> RowGroupStarts {
        files.iter().map(|(name, starts)| (Path::from(*name), starts.to_vec())).collect()
    }

    fn slice_ranges(slice: &TaskSlice) -> Vec<(String, Option<(i64, i64)>)> {
        slice.group.iter().map(|f| (f.object_meta.location.to_string(), f.range.as_ref().map(|r| (r.start, r.end)))).collect()
    }

    #[test]
    fn row_groups_are_shared_out_at_their_starts() {
        // Regression: partsupp's 7 row groups (the last one small) cut at the byte middle gave
        // one Task 4 row groups and the other 3, as DataFusion's reader gives a row group to the
        // range holding its start.
        let starts: &[u64] = &[4, 7085681, 14173004, 21260496, 28347335, 35436830, 42534484];
        let files = vec![file("partsupp.parquet", 43376117)];
        let units = row_group_units(&files, &layout(&[("partsupp.parquet", starts)])).unwrap();
        assert_eq!(units.len(), 7);
        let slices = share_units(files, units, 2, 100);
        assert_eq!(
            slices.iter().map(slice_ranges).collect::<Vec<_>>(),
            vec![
                vec![("partsupp.parquet".to_string(), Some((0, 21260496)))],
                vec![("partsupp.parquet".to_string(), Some((21260496, 43376117)))],
            ]
        );
    }

    #[test]
    fn row_group_shares_read_every_row_group_once() {
        let starts = layout(&[("a.parquet", &[4, 100, 200]), ("b.parquet", &[4, 50]), ("c.parquet", &[4, 300, 600, 900])]);
        let mut ranged = file("c.parquet", 1000);
        ranged.range = Some(FileRange { start: 250, end: 1000 });
        let files = vec![file("a.parquet", 300), file("b.parquet", 90), ranged];
        // The row groups the reader gives each range: those whose start the range holds.
        let read = |slices: &[TaskSlice]| {
            let mut groups = Vec::new();
            for slice in slices {
                for f in slice.group.iter() {
                    let (lo, hi) = f.range.as_ref().map_or((0, f.object_meta.size as i64), |r| (r.start, r.end));
                    let all = &starts[&f.object_meta.location];
                    groups.extend(all.iter().filter(|&&s| lo <= s as i64 && (s as i64) < hi).map(|s| (f.object_meta.location.to_string(), *s)));
                }
            }
            groups
        };
        let expected = read(&[TaskSlice { group: FileGroup::new(files.clone()), bytes: 0 }]);
        assert_eq!(expected.len(), 8, "c.parquet's range holds 3 of its 4 row groups");
        for tasks in 1..=9 {
            let units = row_group_units(&files, &starts).unwrap();
            let slices = share_units(files.clone(), units, tasks, 100);
            assert!(slices.len() as u64 <= tasks.min(8));
            assert_eq!(read(&slices), expected, "{tasks} Tasks");
        }
        assert!(row_group_units(&files, &layout(&[("a.parquet", &[4])])).is_none(), "b's row groups are unknown");
        // A layout that is wrong (out of order, repeated, past the end, or empty) loses no
        // byte: the units still cover every file exactly once.
        for bad in [&[200u64, 4, 100, 100, 5000][..], &[], &[150]] {
            let starts = layout(&[("a.parquet", bad), ("b.parquet", bad), ("c.parquet", bad)]);
            for tasks in 1..=5 {
                let units = row_group_units(&files, &starts).unwrap();
                let slices = share_units(files.clone(), units, tasks, 100);
                let mut covered: Vec<(String, i64, i64)> = slices
                    .iter()
                    .flat_map(|s| s.group.iter())
                    .map(|f| {
                        let (lo, hi) = f.range.as_ref().map_or((0, f.object_meta.size as i64), |r| (r.start, r.end));
                        (f.object_meta.location.to_string(), lo, hi)
                    })
                    .collect();
                covered.sort();
                let mut merged: Vec<(String, i64, i64)> = Vec::new();
                for (name, lo, hi) in covered {
                    match merged.last_mut() {
                        Some(last) if last.0 == name && last.2 == lo => last.2 = hi,
                        _ => merged.push((name, lo, hi)),
                    }
                }
                let whole = vec![("a.parquet".into(), 0, 300), ("b.parquet".into(), 0, 90), ("c.parquet".into(), 250, 1000)];
                assert_eq!(merged, whole, "layout {bad:?}, {tasks} Tasks");
            }
        }
    }

    #[test]
    fn an_empty_scan_still_has_one_task() {
        assert_eq!(share_out(vec![], 10, true, 3).len(), 1);
        assert_eq!(share_out(vec![file("a.parquet", 0)], 2, true, 3).len(), 1);
    }
}
