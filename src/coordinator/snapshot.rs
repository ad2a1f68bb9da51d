//! The session settings one statement runs under, taken once, when its physical plan is made.
//! A query's plan is made when the client asks for it and its Tasks are queued when the client
//! first fetches; a `SET` in between (another admin's: settings are coordinator-wide) must not
//! make a plan made under the old settings run under the new ones. With the time zone, a
//! worker would otherwise compute timestamps the plan does not declare.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::execution::session_state::SessionState;
use datafusion::execution::TaskContext;

use super::policy::Adaptive;
use crate::config::{execution_options, QuiverOptions};

#[derive(Clone)]
pub(super) struct Snapshot {
    /// The `quiver.*` settings: how the Query is distributed and scheduled.
    pub quiver: QuiverOptions,
    /// `config::execution_options`: what the workers apply to the Query's Tasks.
    pub execution: BTreeMap<String, String>,
    /// The context the coordinator runs the final Stage in.
    pub task_ctx: Arc<TaskContext>,
}

impl Snapshot {
    /// The settings of `state`, the state a physical plan was (or is about to be) made with.
    pub(super) fn of(state: &SessionState) -> Self {
        let options = state.config().options();
        Self {
            quiver: options.extensions.get::<QuiverOptions>().cloned().unwrap_or_default(),
            execution: execution_options(options),
            task_ctx: Arc::new(TaskContext::from(state)),
        }
    }

    /// The adaptive scheduling the `quiver.*` settings ask for.
    pub(super) fn adaptive(&self) -> Adaptive {
        Adaptive::from_options(&self.quiver)
    }
}
