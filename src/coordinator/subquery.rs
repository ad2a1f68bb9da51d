//! Uncorrelated scalar subqueries (`WHERE x > (SELECT avg(..) ..)`), each run as a distributed
//! Query of its own. Their values are then part of the plan: the Tasks that read them receive
//! them as literals, so the rest of the Query runs on workers like any other (DataFusion would
//! otherwise evaluate them inside the coordinator's process, keeping every operator that reads
//! one, and everything above it, on the coordinator).
//!
//! By default they run *beside* the Query that reads them ([`detach`]): its Stages are planned
//! as they will run once the values are known, those whose Tasks read no value start at once,
//! and the others are held until the values are in (`quiver.overlap_subqueries`). Off, they run
//! before it ([`resolve`]).

use std::sync::Arc;

use datafusion::common::{exec_err, DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::physical_planning_context::ScalarSubqueryResults;
use datafusion::physical_plan::scalar_subquery::{ScalarSubqueryExec, ScalarSubqueryLink};
use datafusion::physical_plan::{replace_children_if_necessary, ExecutionPlan};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

use super::session::start_physical;
use super::snapshot::Snapshot;
use super::Core;

/// Runs the scalar subqueries of `plan` (outermost first) and returns the plan without their
/// `ScalarSubqueryExec`s: the expressions that read them now read the computed values.
pub(super) fn resolve<'a>(
    core: &'a Arc<Core>,
    id: &'a str,
    plan: Arc<dyn ExecutionPlan>,
    settings: &'a Snapshot,
) -> BoxFuture<'a, Result<Arc<dyn ExecutionPlan>>> {
    async move {
        if let Some(exec) = plan.downcast_ref::<ScalarSubqueryExec>() {
            // Independent of each other, they run at once: one that fails drops (cancels) the
            // others.
            let ids: Vec<String> = (0..exec.subqueries().len()).map(|n| format!("{id}.sq{n}")).collect();
            let runs = exec.subqueries().iter().zip(&ids).map(|(link, sub)| run(core, id, sub, Arc::clone(&link.plan), settings));
            let values = futures::future::try_join_all(runs).await?;
            for (link, value) in exec.subqueries().iter().zip(values) {
                exec.results().set(link.index, value)?;
            }
            return resolve(core, id, Arc::clone(exec.input()), settings).await;
        }
        let mut children = Vec::with_capacity(plan.children().len());
        for child in plan.children() {
            children.push(resolve(core, id, Arc::clone(child), settings).await?);
        }
        replace_children_if_necessary(plan, children)
    }
    .boxed()
}

/// Splits `plan` into its scalar subqueries and the plan that reads them, for EXPLAIN. The
/// values are not computed: the plan reads NULLs of the right types in their place, so that it
/// is distributed as it will be once the values are known.
pub(super) fn split(plan: Arc<dyn ExecutionPlan>, subqueries: &mut Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
    if let Some(exec) = plan.downcast_ref::<ScalarSubqueryExec>() {
        for link in exec.subqueries() {
            let subquery = split(Arc::clone(&link.plan), subqueries)?;
            let placeholder = ScalarValue::try_from(subquery.schema().field(0).data_type())?;
            exec.results().set(link.index, placeholder)?;
            subqueries.push(subquery);
        }
        return split(Arc::clone(exec.input()), subqueries);
    }
    let children = plan.children().into_iter().map(|c| split(Arc::clone(c), subqueries)).collect::<Result<Vec<_>>>()?;
    replace_children_if_necessary(plan, children)
}

/// The scalar subqueries taken out of a plan by [`detach`], to be run beside it.
#[derive(Default)]
pub(super) struct Detached {
    links: Vec<(ScalarSubqueryResults, ScalarSubqueryLink)>,
}

/// Takes the scalar subqueries out of `plan` (those of its own operators, not the ones nested
/// in a subquery: each subquery's Query detaches its own). The plan reads typed NULLs in their
/// place until [`Detached::unset`], so that it is distributed as it will run.
pub(super) fn detach(plan: Arc<dyn ExecutionPlan>, detached: &mut Detached) -> Result<Arc<dyn ExecutionPlan>> {
    if let Some(exec) = plan.downcast_ref::<ScalarSubqueryExec>() {
        for link in exec.subqueries() {
            let placeholder = ScalarValue::try_from(link.plan.schema().field(0).data_type())?;
            exec.results().set(link.index, placeholder)?;
            detached.links.push((exec.results().clone(), link.clone()));
        }
        return detach(Arc::clone(exec.input()), detached);
    }
    let children = plan.children().into_iter().map(|c| detach(Arc::clone(c), detached)).collect::<Result<Vec<_>>>()?;
    replace_children_if_necessary(plan, children)
}

impl Detached {
    pub(super) fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The subqueries' plans, in the order [`Self::run`] numbers them.
    pub(super) fn plans(&self) -> impl Iterator<Item = Arc<dyn ExecutionPlan>> + '_ {
        self.links.iter().map(|(_, link)| Arc::clone(&link.plan))
    }

    /// Forgets the placeholders: from now on, encoding a plan that reads a value waits for it
    /// (`encode_plan_when_resolved`), and evaluating one is an error.
    pub(super) fn unset(&self) {
        for (results, _) in &self.links {
            results.clear();
        }
    }

    /// Runs the subqueries at once, as Queries `{id}.sq{n}`, and returns their values; one that
    /// fails drops (cancels) the others.
    pub(super) async fn run(&self, core: &Arc<Core>, id: &str, settings: &Snapshot) -> Result<Vec<ScalarValue>> {
        let ids: Vec<String> = (0..self.links.len()).map(|n| format!("{id}.sq{n}")).collect();
        let runs = self.links.iter().zip(&ids).map(|((_, link), sub)| run(core, id, sub, Arc::clone(&link.plan), settings));
        futures::future::try_join_all(runs).await
    }

    /// Sets the values [`Self::run`] returned, after [`Self::unset`].
    pub(super) fn set(&self, values: Vec<ScalarValue>) -> Result<()> {
        for ((results, link), value) in self.links.iter().zip(values) {
            results.set(link.index, value)?;
        }
        Ok(())
    }
}

/// Runs one subquery as a Query of its own (so its Stages and Tasks are recorded) and returns
/// its value: NULL for no row, an error for more than one, as DataFusion does. It runs under
/// the settings of the Query that reads it, `parent`, and belongs to the same user.
async fn run(core: &Arc<Core>, parent: &str, id: &str, plan: Arc<dyn ExecutionPlan>, settings: &Snapshot) -> Result<ScalarValue> {
    if plan.schema().fields().len() != 1 {
        return exec_err!("a scalar subquery returns {} columns", plan.schema().fields().len());
    }
    let data_type = plan.schema().field(0).data_type().clone();
    core.cluster.begin_subquery(id, parent, &format!("scalar subquery {id}"));
    let mut ended = EndGuard { core: Arc::clone(core), id: id.to_string(), rows: 0, done: false };
    let result = async {
        let (_, mut stream) = start_physical(core, id, plan, None, settings).await?;
        let mut value = None;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            ended.rows += batch.num_rows() as u64;
            if batch.num_rows() == 0 {
                continue;
            }
            if value.is_some() || batch.num_rows() > 1 {
                return exec_err!("Scalar subquery returned more than one row");
            }
            value = Some(ScalarValue::try_from_array(batch.column(0), 0)?);
        }
        match value {
            Some(v) => Ok(v),
            None => ScalarValue::try_from(&data_type),
        }
    }
    .await;
    ended.end(result.as_ref().err());
    result
}

/// Records the subquery's end however it ends, including when the outer Query is dropped.
struct EndGuard {
    core: Arc<Core>,
    id: String,
    rows: u64,
    done: bool,
}

impl EndGuard {
    fn end(&mut self, error: Option<&DataFusionError>) {
        if !std::mem::replace(&mut self.done, true) {
            self.core.finish(&self.id, self.rows, error, false);
        }
    }
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if !std::mem::replace(&mut self.done, true) {
            self.core.finish(&self.id, self.rows, None, true);
        }
    }
}
