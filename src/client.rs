//! The SQL client: sends statements to a coordinator over Flight and receives Arrow batches.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::Result;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::sql::parser::DFParser;
use futures::TryStreamExt;
use prost::Message;

use crate::protocol::QueryRequest;
use crate::transport::{connect, fetch_batches, Peer};

#[derive(Clone, Debug)]
pub struct Client {
    peer: Peer,
}

impl Client {
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(Self { peer: connect(url).await? })
    }

    /// Runs one statement and streams its result.
    pub async fn query(&self, sql: &str) -> Result<SendableRecordBatchStream> {
        let ticket = QueryRequest { sql: sql.to_string() }.encode_to_vec();
        fetch_batches(&self.peer, ticket, None).await
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
    let statements = DFParser::parse_sql(sql)?;
    Ok(statements.into_iter().map(|s| s.to_string()).collect())
}
