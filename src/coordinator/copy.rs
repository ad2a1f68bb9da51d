//! `COPY … TO`: writes a query's result to files the user names, committed whole.
//!
//! To a directory (a path without a file extension, one ending in `/`, or any `PARTITIONED BY`
//! copy), each Task of the last Stage writes its own files with DataFusion's file sink into a
//! directory of its Attempt under a staging directory inside the target; the commit moves the
//! files of the one Attempt per Task whose count was returned into the target. To one file, the
//! coordinator writes the merged result to a hidden file beside the target and renames it.
//! Either way a failed or cancelled copy leaves nothing behind, and a reader of the target
//! never sees half a file. Only Arrow IPC, whose sink DataFusion keeps private, is written by
//! DataFusion's sink on the coordinator straight into the target.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::UInt64Type;
use datafusion::common::{exec_err, DataFusionError, Result};
use datafusion::datasource::physical_plan::FileOutputMode;
use datafusion::datasource::sink::DataSinkExec;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use futures::TryStreamExt;

use super::session::{start_physical, RemoveOnDrop};
use super::snapshot::Snapshot;
use super::Core;
use crate::planner::{copy_attempt_dir, copy_task_dir, file_sink_config, retarget, WriteKind, WriteTarget, COORDINATOR_DIR};

/// Runs a `COPY` statement; returns the number of rows written.
pub(super) async fn copy(core: &Arc<Core>, id: &str, plan: &LogicalPlan) -> Result<u64> {
    let state = core.ctx.state();
    let physical = state.create_physical_plan(plan).await?;
    let settings = Snapshot::of(&state);
    let Some(exec) = physical.downcast_ref::<DataSinkExec>() else {
        return exec_err!("COPY was planned as {}, not as a file sink", physical.name());
    };
    let Some(config) = file_sink_config(exec.sink()) else {
        // A format whose sink Quiver cannot point elsewhere (Arrow IPC: DataFusion keeps its sink
        // private) is written as DataFusion writes it, by the coordinator, straight to the target.
        let (_, stream) = start_physical(core, id, physical, None, &settings).await?;
        return count(stream).await;
    };
    let url = &config.table_paths[0];
    let (true, Ok(target)) = (url.scheme() == "file", url.get_url().to_file_path()) else {
        return exec_err!("COPY to {url} is not supported: Quiver writes COPY output to local paths only");
    };
    let single_file = config.table_partition_cols.is_empty() && config.file_output_mode.single_file_output(url);
    if single_file {
        to_file(core, id, exec, &target, &settings).await
    } else {
        to_directory(core, id, exec, &target, &settings).await
    }
}

/// The coordinator merges the result and writes it to a hidden file beside `target`, which
/// becomes `target` only once it is whole.
async fn to_file(core: &Arc<Core>, id: &str, exec: &DataSinkExec, target: &Path, settings: &Snapshot) -> Result<u64> {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = target.with_file_name(format!(".{name}.{id}.partial"));
    let mut cleanup = RemoveOnDrop(Some(partial.clone()));
    let sink = retarget(exec.sink(), &partial, FileOutputMode::SingleFile)?;
    let plan = Arc::new(DataSinkExec::new(Arc::clone(exec.input()), sink, exec.sort_order().clone()));
    let (_, stream) = start_physical(core, id, plan, None, settings).await?;
    let rows = count(stream).await?;
    std::fs::rename(&partial, target).map_err(|e| io_error(e, "cannot move the copy into", target))?;
    cleanup.0 = None;
    Ok(rows)
}

/// Each Task writes its partition's files; the commit moves those of the counted Attempts.
async fn to_directory(core: &Arc<Core>, id: &str, exec: &DataSinkExec, target: &Path, settings: &Snapshot) -> Result<u64> {
    let staging = target.join(format!(".quiver-staging-{id}"));
    // A target this copy creates goes again if the copy fails (dropped last: emptied first).
    let mut created = RemoveEmptyDir((!target.exists()).then(|| target.to_path_buf()));
    std::fs::create_dir_all(&staging).map_err(|e| io_error(e, "cannot create", &staging))?;
    let mut staging_guard = RemoveOnDrop(Some(staging.clone()));
    let sink = retarget(exec.sink(), target, FileOutputMode::Directory)?;
    let write = WriteTarget { dir: staging.clone(), kind: WriteKind::Copy { sink } };
    let (plan, stream) = start_physical(core, id, per_partition(exec.input()), Some(write), settings).await?;
    // The Query's other Attempts stop before the staging directory goes: DataFusion's sink
    // creates missing directories, so one still writing would bring it back.
    let rows = match count(stream).await {
        Ok(rows) => rows,
        Err(e) => {
            core.fail_and_stop(id, &e).await;
            remove_settled(&staging).await;
            return Err(e);
        }
    };
    // Attempts that lost their Task write on into the staging directory until stopped.
    core.stop_attempts(id).await;
    let written: Vec<PathBuf> = match plan.write_stage {
        Some(stage) => core
            .cluster
            .counted_attempts(id, stage as u32)
            .iter()
            .map(|k| copy_attempt_dir(&copy_task_dir(&staging, stage, k.task as usize), k.attempt))
            .collect(),
        None => vec![staging.join(COORDINATOR_DIR)],
    };
    let mut moved = Moved::default();
    if let Err(e) = written.iter().filter(|d| d.exists()).try_for_each(|dir| move_tree(dir, target, &mut moved)) {
        // Half a copy is no copy: what was moved in goes again.
        moved.undo();
        remove_settled(&staging).await;
        return Err(e);
    }
    remove_settled(&staging).await;
    staging_guard.0 = None;
    created.0 = None;
    Ok(rows)
}

/// How often, and how far apart, a copy's staging directory is removed again: an Attempt
/// stopped a moment ago may still be finishing a step that creates a directory in it.
const STAGING_REMOVE_TRIES: usize = 20;
const STAGING_SETTLE_MS: u64 = 25;

/// Removes `dir` until it stays removed for one settle interval (or the tries run out).
async fn remove_settled(dir: &Path) {
    for _ in 0..STAGING_REMOVE_TRIES {
        let _ = std::fs::remove_dir_all(dir);
        tokio::time::sleep(std::time::Duration::from_millis(STAGING_SETTLE_MS)).await;
        if !dir.exists() {
            return;
        }
    }
    tracing::warn!("could not remove the copy's staging directory {}", dir.display());
}

/// The sink's input without the merge DataFusion put under the sink, which wants one input
/// partition: in a directory every partition may become files of its own. A merge that
/// applies a limit stays.
fn per_partition(input: &Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    if let Some(merge) = input.downcast_ref::<CoalescePartitionsExec>() {
        if merge.fetch().is_none() {
            return Arc::clone(merge.input());
        }
    }
    if let Some(merge) = input.downcast_ref::<SortPreservingMergeExec>() {
        if merge.fetch().is_none() {
            return Arc::clone(merge.input());
        }
    }
    Arc::clone(input)
}

/// Moves every file under `from` to the same relative path under `to` (hive partition
/// directories included), noting in `moved` what it added there. File names carry a random
/// write id, so they never collide.
fn move_tree(from: &Path, to: &Path, moved: &mut Moved) -> Result<()> {
    for entry in std::fs::read_dir(from).map_err(|e| io_error(e, "cannot list", from))? {
        let path = entry?.path();
        let dest = to.join(path.file_name().expect("a directory entry has a name"));
        if path.is_dir() {
            match std::fs::create_dir(&dest) {
                Ok(()) => moved.dirs.push(dest.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dest.is_dir() => {}
                Err(e) => return Err(io_error(e, "cannot create", &dest)),
            }
            move_tree(&path, &dest, moved)?;
        } else {
            std::fs::rename(&path, &dest).map_err(|e| io_error(e, "cannot move the copy into", &dest))?;
            moved.files.push(dest);
        }
    }
    Ok(())
}

/// What a copy's commit moved into its target so far: the files, and the directories it made.
#[derive(Default)]
struct Moved {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Moved {
    /// Takes a commit that failed half-way back out of the target.
    fn undo(self) {
        for file in self.files.iter().rev() {
            let _ = std::fs::remove_file(file);
        }
        for dir in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

async fn count(stream: SendableRecordBatchStream) -> Result<u64> {
    let batches: Vec<_> = stream.try_collect().await?;
    Ok(batches.iter().flat_map(|b| b.column(0).as_primitive::<UInt64Type>().iter().flatten()).sum())
}

fn io_error(e: std::io::Error, what: &str, path: &Path) -> DataFusionError {
    DataFusionError::IoError(std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display())))
}

/// Removes a directory when dropped if it is empty, unless disarmed.
struct RemoveEmptyDir(Option<PathBuf>);

impl Drop for RemoveEmptyDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}
