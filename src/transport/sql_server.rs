//! The coordinator's front door: an Arrow Flight SQL server over a [`SqlHandler`].
//!
//! Flight SQL's protobuf commands stop here; the handler sees SQL text, handles, schemas and
//! record batches. A statement runs as soon as a client asks for its `FlightInfo`, so the schema
//! in the reply is the result's real schema and errors (bad SQL, unknown tables) reach the client
//! at once; the ticket in the reply names the running Query, and `DoGet` streams its result.
//! Actions that are not Flight SQL's (the workers' control plane, Quiver's own) pass through to
//! [`SqlHandler::do_action`].

use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionCancelQueryRequest, ActionCancelQueryResult, ActionClosePreparedStatementRequest,
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any, CommandGetCatalogs,
    CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys, CommandGetPrimaryKeys,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandPreparedStatementUpdate, CommandStatementQuery, CommandStatementUpdate, DoPutPreparedStatementResult,
    ProstMessageExt, SqlInfo, SqlSupportedTransaction, TicketStatementQuery,
};
use arrow_flight::{
    Action, ActionType, CancelFlightInfoRequest, CancelFlightInfoResult, CancelStatus, FlightDescriptor,
    FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage, SchemaAsIpc, Ticket,
};
use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::guard::{caller_of, Issued};
use super::server::{encode_batches, wire_schema};
use crate::auth::Caller;
use super::status_from_error;

/// The Flight action that cancels the Query behind a `FlightInfo` (Flight RPC, not Flight SQL).
pub const CANCEL_FLIGHT_INFO: &str = "CancelFlightInfo";

/// A statement that has started: its handle names the running Query.
pub struct Started {
    pub handle: String,
    pub schema: SchemaRef,
}

/// A prepared statement: the schema of its result and of the parameters it takes.
pub struct Prepared {
    pub handle: String,
    pub dataset_schema: SchemaRef,
    pub parameter_schema: SchemaRef,
}

/// One table, as the metadata calls list it.
pub struct TableEntry {
    pub catalog: String,
    pub db_schema: String,
    pub name: String,
    /// `TABLE`, `VIEW` or `LOCAL TEMPORARY`.
    pub table_type: &'static str,
    pub schema: SchemaRef,
}

/// What ending a Query through its handle did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// The Query was running (or its result waited to be fetched) and is now cancelled.
    Yes,
    /// The Query had already ended.
    AlreadyEnded,
    /// No Query has this handle.
    Unknown,
}

/// What the coordinator provides behind the Flight SQL front door.
#[async_trait::async_trait]
pub trait SqlHandler: Send + Sync + 'static {
    /// Starts a statement; its result waits for [`SqlHandler::take_result`].
    async fn start(&self, caller: &Caller, sql: &str) -> Result<Started>;
    /// Starts a prepared statement with the parameters bound to it.
    async fn start_prepared(&self, caller: &Caller, handle: &str) -> Result<Started>;
    /// The result of a started statement; each handle's result can be taken once, by the
    /// caller that started it. None when no result waits for the handle (fetched, cancelled,
    /// expired, never started, or started by another caller).
    fn take_result(&self, caller: &Caller, handle: &str) -> Option<SendableRecordBatchStream>;
    /// Cancels the Query behind a handle.
    fn cancel(&self, caller: &Caller, handle: &str) -> Cancelled;
    async fn prepare(&self, caller: &Caller, sql: &str) -> Result<Prepared>;
    /// Binds one row of parameters to a prepared statement.
    fn bind(&self, caller: &Caller, handle: &str, parameters: RecordBatch) -> Result<()>;
    fn close_prepared(&self, caller: &Caller, handle: &str);
    /// Every table the caller may see.
    async fn tables(&self, caller: &Caller) -> Result<Vec<TableEntry>>;
    /// Any other action; the reply is an encoded protobuf message.
    async fn do_action(&self, caller: &Caller, name: &str, body: Bytes) -> Result<Bytes>;
}

/// Serves a [`SqlHandler`] as a Flight SQL service.
pub struct FlightSqlAdapter<H> {
    handler: Arc<H>,
}

impl<H: SqlHandler> FlightSqlAdapter<H> {
    pub fn new(handler: Arc<H>) -> Self {
        Self { handler }
    }
}

type FlightStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn status(error: DataFusionError) -> Status {
    status_from_error(&error)
}

/// The server's self-description, read by clients on connect.
static SQL_INFO: std::sync::LazyLock<SqlInfoData> = std::sync::LazyLock::new(|| {
    let mut info = SqlInfoDataBuilder::new();
    info.append(SqlInfo::FlightSqlServerName, "Quiver");
    info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    info.append(SqlInfo::FlightSqlServerArrowVersion, "59");
    info.append(SqlInfo::FlightSqlServerReadOnly, false);
    info.append(SqlInfo::FlightSqlServerSql, true);
    info.append(SqlInfo::FlightSqlServerSubstrait, false);
    info.append(SqlInfo::FlightSqlServerTransaction, SqlSupportedTransaction::None as i32);
    info.append(SqlInfo::FlightSqlServerCancel, true);
    info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    info.append(SqlInfo::SqlDdlCatalog, false);
    info.append(SqlInfo::SqlDdlSchema, false);
    info.append(SqlInfo::SqlDdlTable, true);
    info.build().expect("static SqlInfo is valid")
});

/// Quiver tables have no primary or foreign keys: the key metadata calls answer with no rows,
/// in the schemas the Flight SQL spec gives them (clients such as DBeaver ask when browsing).
static PRIMARY_KEYS_SCHEMA: std::sync::LazyLock<Schema> = std::sync::LazyLock::new(|| {
    Schema::new(vec![
        Field::new("catalog_name", DataType::Utf8, true),
        Field::new("db_schema_name", DataType::Utf8, true),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("column_name", DataType::Utf8, false),
        Field::new("key_name", DataType::Utf8, true),
        Field::new("key_sequence", DataType::Int32, false),
    ])
});

static FOREIGN_KEYS_SCHEMA: std::sync::LazyLock<Schema> = std::sync::LazyLock::new(|| {
    let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    Schema::new(vec![
        text("pk_catalog_name", true),
        text("pk_db_schema_name", true),
        text("pk_table_name", false),
        text("pk_column_name", false),
        text("fk_catalog_name", true),
        text("fk_db_schema_name", true),
        text("fk_table_name", false),
        text("fk_column_name", false),
        Field::new("key_sequence", DataType::Int32, false),
        text("fk_key_name", true),
        text("pk_key_name", true),
        Field::new("update_rule", DataType::UInt8, false),
        Field::new("delete_rule", DataType::UInt8, false),
    ])
});

fn no_rows(schema: &Schema) -> Result<Response<FlightStream<arrow_flight::FlightData>>, Status> {
    one_batch(Ok(RecordBatch::new_empty(Arc::new(schema.clone()))))
}

/// A `FlightInfo` whose one endpoint is a ticket for `command` on this same server.
fn info_for(schema: &Schema, ticket: Vec<u8>, descriptor: FlightDescriptor) -> Result<Response<FlightInfo>, Status> {
    let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(ticket));
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(format!("cannot encode schema: {e}")))?
        .with_endpoint(endpoint)
        .with_descriptor(descriptor)
        .with_ordered(true);
    Ok(Response::new(info))
}

fn started_info(started: Started, descriptor: FlightDescriptor) -> Result<Response<FlightInfo>, Status> {
    let ticket = TicketStatementQuery { statement_handle: started.handle.into_bytes().into() };
    info_for(&wire_schema(&started.schema), ticket.as_any().encode_to_vec(), descriptor)
}

fn one_batch(batch: Result<RecordBatch, FlightError>) -> Result<Response<FlightStream<arrow_flight::FlightData>>, Status> {
    let batch = batch.map_err(|e| Status::internal(format!("cannot build metadata: {e}")))?;
    let stream = RecordBatchStreamAdapter::new(batch.schema(), futures::stream::iter([Ok(batch)]));
    Ok(Response::new(encode_batches(Box::pin(stream))))
}

fn schema_bytes(schema: &Schema) -> Result<Bytes, Status> {
    let message: Result<IpcMessage, _> = SchemaAsIpc::new(schema, &IpcWriteOptions::default()).try_into();
    message.map(|IpcMessage(bytes)| bytes).map_err(|e| Status::internal(format!("cannot encode schema: {e}")))
}

fn handle_text(handle: &[u8]) -> Result<&str, Status> {
    std::str::from_utf8(handle).map_err(|_| Status::invalid_argument("malformed handle: not UTF-8"))
}

/// The Query handles a `FlightInfo` names in its statement tickets; an error says what is
/// malformed. The server reads them to cancel, the client to follow its statement.
pub(super) fn statement_handles(info: &FlightInfo) -> Result<Vec<String>, String> {
    let mut handles = vec![];
    for ticket in info.endpoint.iter().filter_map(|e| e.ticket.as_ref()) {
        let any = Any::decode(ticket.ticket.clone()).map_err(|e| format!("malformed ticket: {e}"))?;
        if let Ok(Some(t)) = any.unpack::<TicketStatementQuery>() {
            let handle = String::from_utf8(t.statement_handle.to_vec()).map_err(|_| "malformed handle: not UTF-8")?;
            handles.push(handle);
        }
    }
    Ok(handles)
}

impl<H: SqlHandler> FlightSqlAdapter<H> {
    fn take_result(&self, caller: &Caller, handle: &str) -> Result<SendableRecordBatchStream, Status> {
        self.handler.take_result(caller, handle).ok_or_else(|| {
            Status::not_found(format!("no result waits for handle '{handle}': it was fetched, cancelled or expired"))
        })
    }

    /// Cancels the Queries a `FlightInfo` names; a `FlightInfo` naming none of this server's
    /// Queries is NOT_FOUND, as the Flight spec asks (rather than CANCEL_STATUS_UNSPECIFIED).
    fn cancel_info(&self, caller: &Caller, info: &FlightInfo) -> Result<CancelStatus, Status> {
        let handles = statement_handles(info).map_err(Status::invalid_argument)?;
        let outcomes: Vec<Cancelled> = handles.iter().map(|h| self.handler.cancel(caller, h)).collect();
        if outcomes.contains(&Cancelled::Yes) {
            Ok(CancelStatus::Cancelled)
        } else if outcomes.contains(&Cancelled::AlreadyEnded) {
            Ok(CancelStatus::NotCancellable)
        } else {
            Err(Status::not_found(format!("no query of this server has handle {handles:?}")))
        }
    }

    /// Runs a statement to its end and returns the rows it changed (or returned).
    async fn drain(&self, caller: &Caller, started: Started) -> Result<i64, Status> {
        let mut stream = self.take_result(caller, &started.handle)?;
        let mut count = 0i64;
        while let Some(batch) = stream.try_next().await.map_err(status)? {
            count += changed_rows(&batch);
        }
        Ok(count)
    }
}

/// A write answers with one `count` row; anything else counts its rows.
fn changed_rows(batch: &RecordBatch) -> i64 {
    use datafusion::arrow::array::{Array, UInt64Array};
    // A batch may have no column at all (`SELECT FROM t`): it counts its rows too.
    let counts = match batch.columns() {
        [only] if batch.schema().field(0).name() == "count" => only.as_any().downcast_ref::<UInt64Array>(),
        _ => None,
    };
    match counts {
        Some(counts) => counts.iter().flatten().map(|c| c as i64).sum(),
        None => batch.num_rows() as i64,
    }
}

/// The parameter rows a client put for a prepared statement, as one batch.
async fn read_parameters(request: Request<PeekableFlightDataStream>) -> Result<Option<RecordBatch>, Status> {
    // A message carrying only the command (no IPC header) opens an update without parameters.
    let data = request
        .into_inner()
        .try_filter(|d| futures::future::ready(!d.data_header.is_empty()))
        .map_err(FlightError::from);
    let batches: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(data).try_collect().await?;
    let Some(first) = batches.first() else { return Ok(None) };
    concat_batches(&first.schema(), &batches)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("malformed parameters: {e}")))
}

fn one_reply(body: Vec<u8>) -> Response<FlightStream<arrow_flight::Result>> {
    Response::new(Box::pin(futures::stream::iter([Ok(arrow_flight::Result { body: body.into() })])))
}

#[async_trait::async_trait]
impl<H: SqlHandler> FlightSqlService for FlightSqlAdapter<H> {
    type FlightService = Self;

    /// Logs a client in: the transport's guard checked the credentials the handshake carried
    /// (HTTP Basic, or a bearer token), and the reply carries the token later calls present, as
    /// `authorization: Bearer …`. On an open server there is nothing to check or return.
    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<FlightStream<HandshakeResponse>>, Status> {
        let issued = request.extensions().get::<Issued>().cloned();
        let mut requests = request.into_inner();
        let payload = match requests.next().await {
            Some(request) => request?.payload,
            None => Bytes::new(),
        };
        let reply = HandshakeResponse { protocol_version: 0, payload };
        let mut response = Response::new(Box::pin(futures::stream::iter([Ok(reply)])) as FlightStream<HandshakeResponse>);
        if let Some(Issued(token)) = issued.filter(|t| !t.0.is_empty()) {
            let value = format!("Bearer {token}").parse().map_err(|_| Status::internal("token is not a header value"))?;
            response.metadata_mut().insert("authorization", value);
        }
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = caller_of(&request)?;
        let started = self.handler.start(&caller, &query.query).await.map_err(status)?;
        started_info(started, request.into_inner())
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = caller_of(&request)?;
        let handle = handle_text(&query.prepared_statement_handle)?;
        let started = self.handler.start_prepared(&caller, handle).await.map_err(status)?;
        started_info(started, request.into_inner())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        info_for(&query.clone().into_builder().schema(), query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        info_for(&query.clone().into_builder().schema(), query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        info_for(&query.clone().into_builder().schema(), query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        info_for(&query.clone().into_builder().schema(), query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&SQL_INFO).schema();
        info_for(&schema, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn get_flight_info_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        info_for(&PRIMARY_KEYS_SCHEMA, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        info_for(&FOREIGN_KEYS_SCHEMA, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        info_for(&FOREIGN_KEYS_SCHEMA, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        info_for(&FOREIGN_KEYS_SCHEMA, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_primary_keys(
        &self,
        _query: CommandGetPrimaryKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        no_rows(&PRIMARY_KEYS_SCHEMA)
    }

    async fn do_get_exported_keys(
        &self,
        _query: CommandGetExportedKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        no_rows(&FOREIGN_KEYS_SCHEMA)
    }

    async fn do_get_imported_keys(
        &self,
        _query: CommandGetImportedKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        no_rows(&FOREIGN_KEYS_SCHEMA)
    }

    async fn do_get_cross_reference(
        &self,
        _query: CommandGetCrossReference,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        no_rows(&FOREIGN_KEYS_SCHEMA)
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let caller = caller_of(&request)?;
        let handle = handle_text(&ticket.statement_handle)?;
        Ok(Response::new(encode_batches(self.take_result(&caller, handle)?)))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let tables = self.handler.tables(&caller_of(&request)?).await.map_err(status)?;
        let mut catalogs: Vec<&str> = tables.iter().map(|t| t.catalog.as_str()).collect();
        catalogs.sort();
        catalogs.dedup();
        let mut builder = query.into_builder();
        catalogs.into_iter().for_each(|c| builder.append(c));
        one_batch(builder.build())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let tables = self.handler.tables(&caller_of(&request)?).await.map_err(status)?;
        let mut schemas: Vec<(&str, &str)> = tables.iter().map(|t| (t.catalog.as_str(), t.db_schema.as_str())).collect();
        schemas.sort();
        schemas.dedup();
        let mut builder = query.into_builder();
        schemas.into_iter().for_each(|(c, s)| builder.append(c, s));
        one_batch(builder.build())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let tables = self.handler.tables(&caller_of(&request)?).await.map_err(status)?;
        let mut builder = query.into_builder();
        for t in &tables {
            builder
                .append(&t.catalog, &t.db_schema, &t.name, t.table_type, &t.schema)
                .map_err(|e| Status::internal(format!("cannot list table {}: {e}", t.name)))?;
        }
        one_batch(builder.build())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut builder = query.into_builder();
        ["LOCAL TEMPORARY", "TABLE", "VIEW"].into_iter().for_each(|t| builder.append(t));
        one_batch(builder.build())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        one_batch(query.into_builder(&SQL_INFO).build())
    }

    async fn do_put_statement_update(
        &self,
        command: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let caller = caller_of(&request)?;
        let started = self.handler.start(&caller, &command.query).await.map_err(status)?;
        self.drain(&caller, started).await
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let caller = caller_of(&request)?;
        let handle = handle_text(&query.prepared_statement_handle)?.to_string();
        if let Some(parameters) = read_parameters(request).await? {
            self.handler.bind(&caller, &handle, parameters).map_err(status)?;
        }
        Ok(DoPutPreparedStatementResult { prepared_statement_handle: Some(handle.into_bytes().into()) })
    }

    async fn do_put_prepared_statement_update(
        &self,
        query: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let caller = caller_of(&request)?;
        let handle = handle_text(&query.prepared_statement_handle)?.to_string();
        if let Some(parameters) = read_parameters(request).await? {
            self.handler.bind(&caller, &handle, parameters).map_err(status)?;
        }
        let started = self.handler.start_prepared(&caller, &handle).await.map_err(status)?;
        self.drain(&caller, started).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let prepared = self.handler.prepare(&caller_of(&request)?, &query.query).await.map_err(status)?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: prepared.handle.into_bytes().into(),
            dataset_schema: schema_bytes(&wire_schema(&prepared.dataset_schema))?,
            parameter_schema: schema_bytes(&prepared.parameter_schema)?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        self.handler.close_prepared(&caller_of(&request)?, handle_text(&query.prepared_statement_handle)?);
        Ok(())
    }

    /// The Flight SQL 12 way to cancel; newer clients send `CancelFlightInfo`.
    async fn do_action_cancel_query(
        &self,
        query: ActionCancelQueryRequest,
        request: Request<Action>,
    ) -> Result<ActionCancelQueryResult, Status> {
        let caller = caller_of(&request)?;
        let info = FlightInfo::decode(query.info).map_err(|e| Status::invalid_argument(format!("malformed FlightInfo: {e}")))?;
        let result = match self.cancel_info(&caller, &info)? {
            CancelStatus::Cancelled => 1,
            CancelStatus::NotCancellable => 3,
            _ => 0,
        };
        Ok(ActionCancelQueryResult { result })
    }

    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        let caller = caller_of(&request)?;
        let action = request.into_inner();
        if action.r#type == CANCEL_FLIGHT_INFO {
            let cancel = CancelFlightInfoRequest::decode(action.body)
                .map_err(|e| Status::invalid_argument(format!("malformed CancelFlightInfoRequest: {e}")))?;
            let info = cancel.info.ok_or_else(|| Status::invalid_argument("CancelFlightInfoRequest without info"))?;
            let status = self.cancel_info(&caller, &info)?;
            return Ok(one_reply(CancelFlightInfoResult { status: status as i32 }.encode_to_vec()));
        }
        let body = self.handler.do_action(&caller, &action.r#type, action.body).await.map_err(status)?;
        Ok(one_reply(body.to_vec()))
    }

    async fn list_custom_actions(&self) -> Option<Vec<Result<ActionType, Status>>> {
        Some(vec![Ok(ActionType {
            r#type: CANCEL_FLIGHT_INFO.into(),
            description: "Cancels the Query a FlightInfo names and frees what its Tasks hold".into(),
        })])
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
