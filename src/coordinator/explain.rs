//! EXPLAIN and EXPLAIN ANALYZE: DataFusion's plans plus the Stage DAG Quiver runs. ANALYZE runs
//! the Query and adds what each Stage did (Tasks, rows, bytes out, time) and the final Stage's
//! operator metrics.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::displayable;
use futures::StreamExt;

use super::session::{encode_tasks, start_physical};
use super::snapshot::Snapshot;
use super::subquery::{detach, Detached};
use super::{Core, StageMetrics};
use crate::planner::{self, DistributeOptions, StageId, StageSource};

/// EXPLAIN: the optimized logical plan, DataFusion's physical plan and the Stage DAG.
pub(super) async fn explain(core: &Arc<Core>, _id: &str, plan: &LogicalPlan) -> Result<SendableRecordBatchStream> {
    let state = core.ctx.state();
    let logical = state.optimize(plan)?;
    let physical = state.create_physical_plan(plan).await?;
    let settings = Snapshot::of(&state);
    let mut opts = DistributeOptions {
        config: &core.config.planner,
        total_slots: core.cluster.total_slots().max(1),
        source: Arc::new(NotRun),
        write_dir: None,
        join_key_filters: settings.quiver.join_key_filters,
        pruned_input_bytes: None,
        row_group_starts: crate::storage::pruning::row_group_starts(&physical, core.ctx.runtime_env().as_ref()).await,
    };
    let shown = displayable(physical.as_ref()).indent(true).to_string();
    let overlap = settings.quiver.overlap_subqueries;
    let mut detached = Detached::default();
    let main = detach(physical, &mut detached)?;
    // A subquery's value is unknown here, and would prune as no row groups at all.
    if detached.is_empty() {
        opts.pruned_input_bytes = super::session::pruned_input_bytes(core, &main).await;
    }
    // Each subquery after those nested in it, which it reads as NULLs here.
    let mut subqueries = Vec::new();
    for subquery in detached.plans() {
        let outer = super::subquery::split(subquery, &mut subqueries)?;
        subqueries.push(outer);
    }
    let when = match overlap {
        true => "runs beside the query that reads it, as a Query of its own",
        false => "runs first as a Query of its own",
    };
    let mut text = String::new();
    for (n, subquery) in subqueries.into_iter().enumerate() {
        let _ = writeln!(text, "Scalar subquery {n}: {when}; its value reaches the Tasks as a literal");
        text.push_str(&planner::distribute(subquery, &opts)?.display(None));
    }
    if !text.is_empty() {
        text.push_str("Main query:\n");
    }
    let distributed = planner::distribute(main, &opts);
    detached.unset();
    let distributed = distributed?;
    text.push_str(&distributed.display(None));
    let held: Vec<String> = distributed.stages.iter().filter(|s| encode_tasks(&s.tasks).is_ok_and(|p| p.is_none())).map(|s| s.id.to_string()).collect();
    if overlap && !held.is_empty() {
        let _ = writeln!(text, "Held until the scalar subquery values are in: stage {}", held.join(", stage "));
    }
    plan_rows(vec![
        ("logical_plan", logical.display_indent().to_string()),
        ("physical_plan", shown),
        ("distributed_plan", text),
    ])
}

/// EXPLAIN ANALYZE: runs the Query to its end, then shows the Stage DAG with what each Stage did.
pub(super) async fn analyze(core: &Arc<Core>, id: &str, input: &LogicalPlan) -> Result<SendableRecordBatchStream> {
    let state = core.ctx.state();
    let physical = state.create_physical_plan(input).await?;
    let started = Instant::now();
    let (plan, mut stream) = start_physical(core, id, physical, None, &Snapshot::of(&state)).await?;
    let mut rows = 0;
    while let Some(batch) = stream.next().await {
        rows += batch?.num_rows();
    }
    let elapsed_ms = started.elapsed().as_millis();
    let metrics = core.cluster.stage_metrics(id);
    let annotate = |stage: StageId| match metrics.get(stage) {
        Some(m) => format!("rows={}, bytes_out={}, elapsed_ms={}{}{}{}", m.rows, m.bytes, m.elapsed_ms, partitions(m), adapted(m), key_filtered(m)),
        None => String::new(),
    };
    let summary = format!("rows={rows}, elapsed_ms={elapsed_ms}, stages={}, tasks={}", plan.stages.len(), plan.task_count());
    plan_rows(vec![("distributed_plan", plan.display(Some(&annotate))), ("summary", summary)])
}

/// What adaptive scheduling did in the Stage: `, tasks_run=5 (coalesced=2, split=1,
/// speculated=1, slices_cut=1)`; empty when it did nothing.
fn adapted(m: &StageMetrics) -> String {
    if m.coalesced == 0 && m.split == 0 && m.speculated == 0 && m.slices_cut == 0 {
        return String::new();
    }
    format!(
        ", tasks_run={} (coalesced={}, split={}, speculated={}, slices_cut={})",
        m.tasks, m.coalesced, m.split, m.speculated, m.slices_cut
    )
}

/// What the Stage's join key filter did: `, key_filter_rows=kept/seen`.
fn key_filtered(m: &StageMetrics) -> String {
    match m.key_filter_rows {
        Some((seen, kept)) => format!(", key_filter_rows={kept}/{seen} (kept/seen)"),
        None => String::new(),
    }
}

/// A shuffle's spread over its partitions: `, partitions=8, partition_bytes=min/median/max`.
fn partitions(m: &StageMetrics) -> String {
    let mut bytes = m.partition_bytes.clone();
    if bytes.is_empty() {
        return String::new();
    }
    bytes.sort_unstable();
    let (min, median, max) = (bytes[0], bytes[bytes.len() / 2], bytes[bytes.len() - 1]);
    format!(", partitions={}, partition_bytes={min}/{median}/{max} (min/median/max)", bytes.len())
}

fn plan_rows(rows: Vec<(&str, String)>) -> Result<SendableRecordBatchStream> {
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("plan_type", DataType::Utf8, false),
        Field::new("plan", DataType::Utf8, false),
    ]));
    let types = StringArray::from_iter_values(rows.iter().map(|r| r.0));
    let plans = StringArray::from_iter_values(rows.iter().map(|r| r.1.as_str()));
    let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(types), Arc::new(plans)])?;
    Ok(Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::iter([Ok(batch)]))))
}

/// The source of a plan that is only shown, never run.
#[derive(Debug)]
struct NotRun;

impl StageSource for NotRun {
    fn open(&self, _stage: StageId, _task: usize, _partition: usize, _schema: SchemaRef) -> Result<SendableRecordBatchStream> {
        Err(DataFusionError::Execution("an EXPLAIN plan is not run".into()))
    }
}
