//! The Flight SQL client `quiver sql` and the tests speak: start a statement, fetch its result,
//! follow its progress, cancel it, or collect it whole. Errors keep their kind across the wire.
//! The library exports it as `client::Client`.

use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
use arrow_flight::{CancelFlightInfoRequest, CancelFlightInfoResult, CancelStatus, FlightDescriptor, FlightInfo};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use futures::TryStreamExt;
use prost::Message;
use std::sync::Arc;

use super::client::{call, connect, fetch_batches, get_flight_info, ClientSecurity, Peer};
use super::error_from_status;
use crate::auth::{basic_header, Credentials};
use arrow_flight::HandshakeRequest;
use super::sql_server::{statement_handles, CANCEL_FLIGHT_INFO};
use crate::protocol::{action, QueryProgress, QueryProgressRequest};

/// A connection to a coordinator's Flight SQL service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SqlClient {
    peer: Peer,
}

/// A statement the coordinator has started: its Query runs while the client fetches.
#[derive(Clone, Debug)]
pub struct Statement {
    /// The Query's id.
    pub handle: String,
    pub schema: SchemaRef,
    info: FlightInfo,
}

impl SqlClient {
    /// Connects to an open coordinator.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, &ClientSecurity::default()).await
    }

    /// Connects presenting `security`'s credentials (a token) and trusting its CA.
    pub async fn connect_with(url: &str, security: &ClientSecurity) -> Result<Self> {
        Ok(Self { peer: connect(url, security).await? })
    }

    /// Connects and logs in with a user and password: the handshake sends them once (HTTP
    /// Basic) and every later call presents the session token it returns.
    pub async fn login(url: &str, user: &str, password: &str, tls_ca: Option<Arc<Vec<u8>>>) -> Result<Self> {
        let security = ClientSecurity { credentials: Credentials::None, tls_ca };
        let peer = connect(url, &security).await?;
        let mut client = peer.flight_client();
        let mut request = tonic::Request::new(futures::stream::iter([HandshakeRequest::default()]));
        let header = basic_header(user, password)
            .parse()
            .map_err(|_| DataFusionError::Configuration("the user name or password cannot be sent in a header".into()))?;
        request.metadata_mut().insert("authorization", header);
        let response = client.inner_mut().handshake(request).await.map_err(|s| error_from_status(&s))?;
        let token = response
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let credentials = token.map_or(Credentials::None, Credentials::Bearer);
        Ok(Self { peer: peer.with_credentials(credentials) })
    }

    /// Starts `sql`; errors in the statement (syntax, unknown tables) are returned here.
    pub async fn start(&self, sql: &str) -> Result<Statement> {
        let command = CommandStatementQuery { query: sql.to_string(), transaction_id: None };
        let info = get_flight_info(&self.peer, FlightDescriptor::new_cmd(command.as_any().encode_to_vec())).await?;
        let schema = Arc::new(
            info.clone()
                .try_decode_schema()
                .map_err(|e| DataFusionError::Execution(format!("malformed schema from {}: {e}", self.peer.url)))?,
        );
        let handle = statement_handle(&info)?;
        Ok(Statement { handle, schema, info })
    }

    /// Streams the result of a started statement; it can be fetched once.
    pub async fn fetch(&self, statement: &Statement) -> Result<SendableRecordBatchStream> {
        let ticket = statement.info.endpoint.first().and_then(|e| e.ticket.as_ref());
        let Some(ticket) = ticket else {
            return Err(DataFusionError::Execution("the coordinator sent a FlightInfo without a ticket".into()));
        };
        fetch_batches(&self.peer, ticket.ticket.to_vec(), Some(Arc::clone(&statement.schema))).await
    }

    /// Runs `sql` and streams its result.
    pub async fn query(&self, sql: &str) -> Result<SendableRecordBatchStream> {
        let statement = self.start(sql).await?;
        self.fetch(&statement).await
    }

    /// Runs `sql` and collects its result.
    pub async fn collect(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let stream = self.query(sql).await?;
        let schema = stream.schema();
        Ok((schema, stream.try_collect().await?))
    }

    /// Cancels a statement's Query; true when it was still running.
    pub async fn cancel(&self, statement: &Statement) -> Result<bool> {
        let request = CancelFlightInfoRequest::new(statement.info.clone());
        let result: CancelFlightInfoResult = call(&self.peer, CANCEL_FLIGHT_INFO, &request).await?;
        Ok(result.status == CancelStatus::Cancelled as i32)
    }

    /// How far a statement's Query has got.
    pub async fn progress(&self, statement: &Statement) -> Result<QueryProgress> {
        let request = QueryProgressRequest { query_id: statement.handle.clone() };
        call(&self.peer, action::QUERY_PROGRESS, &request).await
    }
}

/// The Query id in the ticket of a statement's `FlightInfo`.
fn statement_handle(info: &FlightInfo) -> Result<String> {
    let malformed = |what: String| DataFusionError::Execution(format!("malformed FlightInfo from the coordinator: {what}"));
    statement_handles(info).map_err(malformed)?.into_iter().next().ok_or_else(|| malformed("no statement ticket".into()))
}
