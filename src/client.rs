//! The SQL client: speaks Flight SQL to a coordinator, like any other Flight SQL client, and
//! receives Arrow batches.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::sql::parser::DFParser;
use futures::TryStreamExt;

pub use crate::protocol::QueryProgress;
pub use crate::transport::Statement;
use crate::transport::SqlClient;

#[derive(Clone, Debug)]
pub struct Client {
    sql: SqlClient,
}

impl Client {
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(Self { sql: SqlClient::connect(url).await? })
    }

    /// Starts one statement; its Query runs until fetched, cancelled or expired.
    pub async fn start(&self, sql: &str) -> Result<Statement> {
        self.sql.start(sql).await
    }

    /// Streams the result of a started statement.
    pub async fn fetch(&self, statement: &Statement) -> Result<SendableRecordBatchStream> {
        self.sql.fetch(statement).await
    }

    /// Cancels a started statement; true when its Query was still running.
    pub async fn cancel(&self, statement: &Statement) -> Result<bool> {
        self.sql.cancel(statement).await
    }

    pub async fn progress(&self, statement: &Statement) -> Result<QueryProgress> {
        self.sql.progress(statement).await
    }

    /// Runs one statement and streams its result.
    pub async fn query(&self, sql: &str) -> Result<SendableRecordBatchStream> {
        self.sql.query(sql).await
    }

    /// Runs one statement and collects its result.
    pub async fn collect(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let stream = self.query(sql).await?;
        let schema = stream.schema();
        Ok((schema, stream.try_collect().await?))
    }
}

/// Splits a script into statements, as DataFusion's parser sees them.
pub fn split_statements(sql: &str) -> Result<Vec<String>> {
    // The parser's own words, as the coordinator reports them, not its Debug form.
    let statements = DFParser::parse_sql(sql).map_err(|e| match e {
        DataFusionError::SQL(parser, _) => DataFusionError::Plan(parser.to_string()),
        other => other,
    })?;
    Ok(statements.into_iter().map(|s| s.to_string()).collect())
}
