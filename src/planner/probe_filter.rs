//! Where in a probe Task's plan its join key filter drops rows. The filter names key columns of
//! the Task's output; applied there, it saves only the shuffle. Moved down through operators
//! that keep each row's keys (`key_filter::keys_below`), it also spares them the rows: below
//! a partial aggregate grouped by the keys, the aggregate never builds the groups the join
//! would drop (q17's and q20's lineitem aggregates keep about 1% of their groups). The rows it
//! drops have keys the join finds no partner for, wherever it applies: every row of a group has
//! the group's keys (see `key_filter` for groups only some of whose rows were dropped).

use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{exec_err, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::{replace_children_if_necessary, DisplayAs, DisplayFormatType, ExecutionPlan, PhysicalExpr, PlanProperties};

use super::key_filter::{filter_stream, keys_below, FilterCounts, FilterSource};

/// `plan` with rows whose `keys` (columns of its output) `source`'s filter rules out dropped as
/// far down as they can be. It stops above a filter: a predicate drops rows for less than a
/// key hash costs, so the key filter sees only the rows it keeps.
pub fn apply_key_filter(plan: Arc<dyn ExecutionPlan>, keys: Vec<usize>, source: FilterSource, counts: Arc<FilterCounts>) -> Result<Arc<dyn ExecutionPlan>> {
    if plan.downcast_ref::<FilterExec>().is_none() {
        if let Some(below) = keys_below(&plan, &keys) {
            let child = apply_key_filter(Arc::clone(plan.children()[0]), below, source, counts)?;
            return replace_children_if_necessary(plan, vec![child]);
        }
    }
    Ok(Arc::new(KeyFilterExec { properties: Arc::clone(plan.properties()), input: plan, keys, source, counts }))
}

/// Drops the rows of its input whose key columns a join key filter rules out. Made by a worker
/// for the Task it runs; never encoded.
pub struct KeyFilterExec {
    input: Arc<dyn ExecutionPlan>,
    keys: Vec<usize>,
    source: FilterSource,
    counts: Arc<FilterCounts>,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for KeyFilterExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFilterExec").field("keys", &self.keys).finish_non_exhaustive()
    }
}

impl DisplayAs for KeyFilterExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "KeyFilterExec: keys={:?}", self.keys)
    }
}

impl ExecutionPlan for KeyFilterExec {
    fn name(&self) -> &str {
        "KeyFilterExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn apply_expressions(&self, _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        let [input] = <[_; 1]>::try_from(children).or_else(|_| exec_err!("KeyFilterExec has one child"))?;
        let (keys, source, counts) = (self.keys.clone(), self.source.clone(), Arc::clone(&self.counts));
        Ok(Arc::new(Self { properties: Arc::clone(input.properties()), input, keys, source, counts }))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let stream = self.input.execute(partition, context)?;
        Ok(filter_stream(stream, self.source.clone(), self.keys.clone(), Arc::clone(&self.counts)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_plan::{collect, displayable};
    use datafusion::prelude::{SessionConfig, SessionContext};

    use super::*;
    use crate::planner::key_filter::{KeyFilter, KeySummary};

    fn ids(from: i64, to: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from((from..to).collect::<Vec<_>>()))]).unwrap()
    }

    /// `SELECT g, id, count(*) FROM t WHERE v > 0 GROUP BY g, id` over 1000 rows, 500 of them with `v > 0`.
    async fn grouped_plan() -> (SessionContext, Arc<dyn ExecutionPlan>) {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
        ctx.sql("CREATE TABLE t AS SELECT value % 100 AS id, value % 3 AS g, value % 2 AS v FROM generate_series(0, 999)").await.unwrap();
        let plan = ctx.sql("SELECT g, id, count(*) AS n FROM t WHERE v > 0 GROUP BY g, id").await.unwrap().create_physical_plan().await.unwrap();
        (ctx, plan)
    }

    #[tokio::test]
    async fn the_filter_goes_under_an_aggregate_by_its_keys_and_stops_above_a_predicate() {
        let (ctx, plan) = grouped_plan().await;
        let mut summary = KeySummary::new(vec![0]);
        summary.add(&ids(10, 20)).unwrap();
        let filter = Arc::new(KeyFilter::combine([&summary.finish()]).unwrap());
        let counts = Arc::new(FilterCounts::default());
        // Key column 1 of the output (`id`).
        let filtered = apply_key_filter(Arc::clone(&plan), vec![1], FilterSource::Given(filter), Arc::clone(&counts)).unwrap();
        let shown = displayable(filtered.as_ref()).indent(false).to_string();
        let names: Vec<&str> = shown.lines().map(|l| l.trim_start().split(':').next().unwrap()).collect();
        let at = names.iter().position(|n| *n == "KeyFilterExec").unwrap_or_else(|| panic!("{shown}"));
        assert_eq!((names[at - 1], names[at + 1]), ("AggregateExec", "FilterExec"), "{shown}");
        let rows = |batches: Vec<RecordBatch>| {
            let mut rows: Vec<(i64, i64, i64)> = Vec::new();
            for b in batches {
                let col = |i: usize| b.column(i).as_any().downcast_ref::<Int64Array>().unwrap().clone();
                let (g, id, n) = (col(0), col(1), col(2));
                rows.extend((0..b.num_rows()).map(|r| (g.value(r), id.value(r), n.value(r))));
            }
            rows.sort_unstable();
            rows
        };
        let all = rows(collect(plan, ctx.task_ctx()).await.unwrap());
        let kept = rows(collect(filtered, ctx.task_ctx()).await.unwrap());
        // Exactly the groups of the build keys, with their whole counts, and a few false positives.
        let wanted: Vec<_> = all.iter().filter(|(_, id, _)| (10..20).contains(id)).copied().collect();
        assert!(!wanted.is_empty() && wanted.iter().all(|r| kept.contains(r)), "{kept:?}");
        assert!(kept.iter().all(|r| all.contains(r)) && kept.len() < all.len() / 2, "{kept:?}");
        // It saw the rows the predicate kept, under the aggregate.
        assert_eq!(counts.rows_in.load(Ordering::Relaxed), 500);
    }

    #[tokio::test]
    async fn a_key_the_aggregate_computes_is_filtered_above_it() {
        let (_, plan) = grouped_plan().await;
        let filter = Arc::new(KeyFilter::combine([&KeySummary::new(vec![0]).finish()]).unwrap());
        // Column 2 is `count(*)` (renamed `n` by a projection): no input row holds it.
        let filtered = apply_key_filter(Arc::clone(&plan), vec![2], FilterSource::Given(filter), Arc::new(FilterCounts::default())).unwrap();
        let shown = displayable(filtered.as_ref()).indent(false).to_string();
        let names: Vec<&str> = shown.lines().map(|l| l.trim_start().split(':').next().unwrap()).collect();
        assert_eq!(names[..3], ["ProjectionExec", "KeyFilterExec", "AggregateExec"], "{shown}");
    }
}
