//! Cutting a Stage's file scan into Task slices: whole files, and byte ranges of large Parquet
//! files (DataFusion's Parquet reader assigns each row group to exactly one range).

use std::sync::Arc;

use datafusion::common::{exec_err, Result};
use datafusion::datasource::listing::{FileRange, PartitionedFile};
use datafusion::datasource::physical_plan::FileGroup;
use datafusion::physical_plan::ExecutionPlan;

use super::rules::file_scan;
use crate::config::PlannerConfig;

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
) -> Result<Vec<TaskSlice>> {
    let Some(scan) = find_scan(plan) else {
        return exec_err!("stage without a file scan");
    };
    let files: Vec<PartitionedFile> = scan.file_groups.iter().flat_map(|g| g.iter().cloned()).collect();
    let total: u64 = files.iter().map(file_bytes).sum();
    let target_tasks = (total_slots.max(1) * config.tasks_per_slot.max(1)).min(config.tasks_per_stage_max.max(1));
    // Rounded up: a rounded-down chunk leaves a remainder piece, one more Task than slots can
    // take in even waves, and a Stage waits for its slowest wave.
    let chunk = total.div_ceil(target_tasks as u64).max(config.task_min_bytes).max(1);
    let splittable = scan.file_source().file_type() == "parquet";
    // Files whose order matters (sorted scans) keep one file or range per Task.
    let pack = scan.output_ordering.is_empty();
    let mut pieces = Vec::new();
    for file in files {
        pieces.extend(split_file(file, chunk, splittable));
    }
    Ok(pack_pieces(pieces, chunk, pack, config.tasks_per_stage_max))
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

fn split_file(file: PartitionedFile, chunk: u64, splittable: bool) -> Vec<PartitionedFile> {
    let size = file.object_meta.size;
    if !splittable || file.range.is_some() || size <= chunk {
        return vec![file];
    }
    let parts = size.div_ceil(chunk);
    let step = size.div_ceil(parts);
    (0..parts)
        .map(|i| {
            let start = (i * step) as i64;
            let end = ((i + 1) * step).min(size) as i64;
            let mut piece = file.clone();
            piece.range = Some(FileRange { start, end });
            piece
        })
        .collect()
}

fn pack_pieces(pieces: Vec<PartitionedFile>, chunk: u64, pack: bool, max_tasks: usize) -> Vec<TaskSlice> {
    let mut slices: Vec<TaskSlice> = Vec::new();
    let mut current = TaskSlice { group: FileGroup::new(vec![]), bytes: 0 };
    for piece in pieces {
        let bytes = file_bytes(&piece);
        let full = !current.group.is_empty() && (!pack || current.bytes + bytes > chunk);
        if full {
            slices.push(std::mem::replace(&mut current, TaskSlice { group: FileGroup::new(vec![]), bytes: 0 }));
        }
        current.group.push(piece);
        current.bytes += bytes;
    }
    if !current.group.is_empty() || slices.is_empty() {
        slices.push(current);
    }
    merge_excess(slices, max_tasks)
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
        let pieces = split_file(file("a.parquet", 1000), 300, true);
        let ranges: Vec<_> = pieces.iter().map(|p| p.range.clone().unwrap()).map(|r| (r.start, r.end)).collect();
        assert_eq!(ranges, vec![(0, 250), (250, 500), (500, 750), (750, 1000)]);
    }

    #[test]
    fn unsplittable_files_stay_whole() {
        assert_eq!(split_file(file("a.csv", 1000), 300, false).len(), 1);
    }

    #[test]
    fn small_files_are_packed_up_to_the_chunk_size() {
        let pieces = (0..10).map(|i| file(&format!("{i}.parquet"), 100)).collect();
        let slices = pack_pieces(pieces, 250, true, 100);
        assert_eq!(slices.iter().map(|s| s.group.len()).collect::<Vec<_>>(), vec![2, 2, 2, 2, 2]);
    }

    #[test]
    fn the_task_bound_keeps_every_file() {
        let pieces = (0..10).map(|i| file(&format!("{i}.parquet"), 100)).collect();
        let slices = pack_pieces(pieces, 1, true, 3);
        assert_eq!(slices.len(), 3);
        assert_eq!(slices.iter().map(|s| s.group.len()).sum::<usize>(), 10);
    }

    #[test]
    fn an_empty_scan_still_has_one_task() {
        assert_eq!(pack_pieces(vec![], 10, true, 3).len(), 1);
    }
}
