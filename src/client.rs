//! The SQL client: speaks Flight SQL to a coordinator, like any other Flight SQL client, and
//! receives Arrow batches.

use datafusion::common::{DataFusionError, Result};
use datafusion::sql::parser::DFParser;

pub use crate::protocol::QueryProgress;
/// The SQL client is the transport's Flight SQL client: start, fetch, follow, cancel, collect.
pub use crate::transport::{SqlClient as Client, Statement};

/// Splits a script into statements, as DataFusion's parser sees them.
pub fn split_statements(sql: &str) -> Result<Vec<String>> {
    // The parser's own words, as the coordinator reports them, not its Debug form.
    let statements = DFParser::parse_sql(sql).map_err(|e| match e {
        DataFusionError::SQL(parser, _) => DataFusionError::Plan(parser.to_string()),
        other => other,
    })?;
    Ok(statements.into_iter().map(|s| s.to_string()).collect())
}
