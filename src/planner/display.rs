//! The Stage DAG as text, for EXPLAIN: what each Stage runs, how many Tasks it has, which
//! Stages it reads and how its consumer reads it.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::sync::Arc;

use datafusion::physical_plan::display::DisplayableExecutionPlan;
use datafusion::physical_plan::{displayable, ExecutionPlan};

use super::{DistributedPlan, Exchange, StageId, StageReaderExec};

/// The Stages a plan fragment reads, in id order.
pub(super) fn stage_inputs(plan: &Arc<dyn ExecutionPlan>) -> Vec<StageId> {
    let mut found = BTreeSet::new();
    collect_inputs(plan, &mut found);
    found.into_iter().collect()
}

fn collect_inputs(plan: &Arc<dyn ExecutionPlan>, found: &mut BTreeSet<StageId>) {
    if let Some(reader) = plan.downcast_ref::<StageReaderExec>() {
        found.insert(reader.stage());
    }
    for child in plan.children() {
        collect_inputs(child, found);
    }
}

pub(super) fn render(plan: &DistributedPlan, annotate: Option<&dyn Fn(StageId) -> String>) -> String {
    let mut out = String::new();
    if let Some(bytes) = plan.small_input_bytes {
        let _ = writeln!(out, "Runs on the coordinator alone: its scans read {bytes} bytes, too few to gain from workers");
    }
    for stage in &plan.stages {
        let output = match stage.exchange {
            Exchange::Gather => "gather".to_string(),
            Exchange::Shuffle { partitions } => format!("shuffle into {partitions} partitions"),
        };
        let inputs = if stage.inputs.is_empty() {
            "files".to_string()
        } else {
            stage.inputs.iter().map(|s| format!("stage {s}")).collect::<Vec<_>>().join(", ")
        };
        let sliced = if stage.sliced && stage.tasks.len() > 1 {
            " (task 0 shown; the others read other slices of the files)"
        } else {
            ""
        };
        let _ = write!(out, "Stage {} [workers]: {} task(s){sliced}, reads {inputs}, output {output}", stage.id, stage.tasks.len());
        if stage.key_summary.is_some() {
            out.push_str(", summarizes its join keys");
        }
        if let Some(link) = &stage.key_filter {
            let _ = write!(out, ", keeps only rows whose join keys stage {} holds", link.build);
        }
        match annotate {
            Some(annotate) => {
                let _ = writeln!(out, "; {}", annotate(stage.id));
            }
            None => out.push('\n'),
        }
        indent(&mut out, &stage.fragment, false);
    }
    let kept = plan.small_input_bytes.is_none().then(|| super::rules::why_scans_stay(&plan.root)).flatten();
    match kept {
        Some(why) => {
            let _ = writeln!(out, "Final stage [coordinator], which keeps file scans because {why}:");
        }
        None => {
            let _ = writeln!(out, "Final stage [coordinator]:");
        }
    }
    indent(&mut out, &plan.root, annotate.is_some());
    out
}

fn indent(out: &mut String, plan: &Arc<dyn ExecutionPlan>, metrics: bool) {
    let shown = match metrics {
        true => DisplayableExecutionPlan::with_metrics(plan.as_ref()).indent(true).to_string(),
        false => displayable(plan.as_ref()).indent(true).to_string(),
    };
    for line in shown.lines() {
        let _ = writeln!(out, "  {line}");
    }
}
