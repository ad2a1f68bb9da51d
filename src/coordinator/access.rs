//! What a caller may run: readers may query (SELECT, EXPLAIN, SHOW), admins may also change the
//! catalog, the session and files (CREATE, INSERT, DROP, COPY, SET). On a coordinator that
//! restricts paths, every table file a statement reads or writes must lie under the allowed
//! roots, whether it comes from a table's definition, a `SELECT … FROM 'path'` or a COPY target.

use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::Result;
use datafusion::datasource::listing::ListingTable;
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::{DdlStatement, LogicalPlan};

use crate::auth::{AllowedPaths, Caller};
use crate::storage::{confined_table_option, is_store_option};
use crate::protocol::{quiver_error, ErrorKind};

tokio::task_local! {
    /// The caller of the statement being planned and run in this task: the system tables show
    /// a reader only their own Queries.
    static VIEWER: Caller;
}

/// Runs a statement's work with its caller as the viewer of the system tables.
pub(super) async fn as_viewer<T>(caller: &Caller, work: impl std::future::Future<Output = T>) -> T {
    VIEWER.scope(caller.clone(), work).await
}

/// Whether the statement being run may see a Query started by `owner` (outside a statement,
/// the coordinator itself sees everything).
pub(super) fn may_see(owner: &str) -> bool {
    VIEWER.try_with(|caller| caller.sees_all_queries() || caller.owns(owner)).unwrap_or(true)
}

/// Refuses a statement the caller's role does not allow, or that touches files outside the
/// allowed roots.
pub(super) fn check(caller: &Caller, plan: &LogicalPlan, paths: &AllowedPaths) -> Result<()> {
    may_run_statements(caller)?;
    if writes(plan) && !caller.may_write() {
        return Err(denied(format!(
            "'{}' is a reader: readers may run SELECT, EXPLAIN and SHOW; {} needs an admin",
            caller.name,
            statement_name(plan)
        )));
    }
    if paths.restricts() {
        for location in locations(plan)? {
            paths.check(&location)?;
        }
        confined_options(plan)?;
    }
    Ok(())
}

/// Where paths are restricted, an external table's `OPTIONS` may give its store's credentials
/// and client settings, never where the store is: an allowed location would lead elsewhere.
fn confined_options(plan: &LogicalPlan) -> Result<()> {
    let LogicalPlan::Ddl(DdlStatement::CreateExternalTable(create)) = plan else { return Ok(()) };
    let mut keys: Vec<&String> = create.options.keys().filter(|k| is_store_option(k) && !confined_table_option(k)).collect();
    keys.sort();
    match keys.first() {
        None => Ok(()),
        Some(key) => Err(denied(format!(
            "option '{key}' decides where the table's store is or where the coordinator looks for credentials; \
             where table paths are restricted only the coordinator's configuration sets it (--store-option)"
        ))),
    }
}

/// Refuses a caller that may run no statement at all: a cluster member.
pub(super) fn may_run_statements(caller: &Caller) -> Result<()> {
    match caller.may_query() {
        true => Ok(()),
        false => Err(denied(format!("'{}' is a cluster member, not a client: it may not run statements", caller.name))),
    }
}

/// True when the statement changes the catalog, the session or files.
fn writes(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Ddl(_) | LogicalPlan::Dml(_) | LogicalPlan::Copy(_) | LogicalPlan::Statement(_) => true,
        // EXPLAIN ANALYZE runs its statement.
        LogicalPlan::Analyze(analyze) => writes(&analyze.input),
        _ => false,
    }
}

fn statement_name(plan: &LogicalPlan) -> String {
    match plan {
        LogicalPlan::Ddl(ddl) => ddl.name().to_string(),
        LogicalPlan::Dml(dml) => dml.op.to_string(),
        LogicalPlan::Copy(_) => "COPY".into(),
        LogicalPlan::Statement(s) => s.name().to_string(),
        LogicalPlan::Analyze(a) => statement_name(&a.input),
        other => other.display().to_string(),
    }
}

/// Every file location the statement reads or writes: the scans of listing tables (its own
/// and its subqueries'), an external table's location, a COPY target.
fn locations(plan: &LogicalPlan) -> Result<Vec<String>> {
    let mut found = Vec::new();
    plan.apply_with_subqueries(|node| {
        match node {
            LogicalPlan::TableScan(scan) => {
                if let Ok(provider) = source_as_provider(&scan.source) {
                    found.extend(listing_paths(provider.as_ref()));
                }
            }
            LogicalPlan::Ddl(DdlStatement::CreateExternalTable(c)) => found.extend(c.locations.iter().cloned()),
            LogicalPlan::Copy(copy) => found.push(copy.output_url.clone()),
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(found)
}

fn listing_paths(provider: &dyn TableProvider) -> Vec<String> {
    match provider.downcast_ref::<ListingTable>() {
        Some(listing) => listing.table_paths().iter().map(|url| url.as_str().to_string()).collect(),
        None => Vec::new(),
    }
}

fn denied(message: String) -> datafusion::common::DataFusionError {
    quiver_error(ErrorKind::Denied, message)
}
