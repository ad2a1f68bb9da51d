//! A Flight server over a [`FlightHandler`], with Quiver's message limits and clean shutdown.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::encode::FlightDataEncoderBuilder;
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest,
    HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use bytes::Bytes;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::SendableRecordBatchStream;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status, Streaming};

use super::guard::{caller_of, GuardLayer};
use super::in_process::Registration;
use super::sql_server::{FlightSqlAdapter, SqlHandler};
use super::install_crypto_provider;
use crate::auth::{Authenticator, Caller, TlsIdentity};
use datafusion::common::{DataFusionError, Result as DfResult};
use super::status_from_error;
use crate::config::MAX_MESSAGE_BYTES;

/// What a Quiver process serves over Flight.
#[async_trait::async_trait]
pub trait FlightHandler: Send + Sync + 'static {
    /// Streams the batches a ticket names.
    async fn do_get(&self, caller: &Caller, ticket: Bytes) -> datafusion::common::Result<SendableRecordBatchStream>;
    /// Answers one action; the reply is an encoded protobuf message.
    async fn do_action(&self, caller: &Caller, name: &str, body: Bytes) -> datafusion::common::Result<Bytes>;
    /// How `do_get` streams are written (their buffers' compression).
    fn ipc_options(&self) -> IpcWriteOptions {
        IpcWriteOptions::default()
    }
}

/// A running server; dropping the handle leaves it running (reachable only over the network),
/// [`ServerHandle::shutdown`] stops it.
pub struct ServerHandle {
    pub addr: SocketAddr,
    scheme: &'static str,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    in_process: Option<Registration>,
}

impl ServerHandle {
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Lets callers in this process reach the handler at `url` (the address others are told)
    /// without the network, until the server stops ([`super::in_process`]).
    pub fn serve_in_process(&mut self, url: &str, handler: Arc<dyn FlightHandler>) {
        self.in_process = Some(Registration::new(url, handler));
    }

    pub async fn shutdown(mut self) {
        self.in_process = None;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }

    /// Stops accepting and drops every connection at once, as a crash would.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// How a server admits its callers: who they are ([`Authenticator`]), and TLS when it has a
/// certificate.
#[derive(Clone)]
pub struct ServerSecurity {
    pub auth: Arc<Authenticator>,
    pub tls: Option<TlsIdentity>,
}

impl ServerSecurity {
    /// No authentication and no TLS: what a loopback cluster in one process may use.
    pub fn open() -> Self {
        Self { auth: Arc::new(Authenticator::open()), tls: None }
    }

    /// The scheme of the URLs this server is reached at.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// Serves `handler` on `listener` until shut down.
pub fn serve<H: FlightHandler>(handler: Arc<H>, listener: TcpListener, security: &ServerSecurity) -> DfResult<ServerHandle> {
    serve_service(FlightAdapter { handler }, listener, security)
}

/// Serves `handler` as a Flight SQL service on `listener` until shut down.
pub fn serve_sql<H: SqlHandler>(handler: Arc<H>, listener: TcpListener, security: &ServerSecurity) -> DfResult<ServerHandle> {
    serve_service(FlightSqlAdapter::new(handler), listener, security)
}

fn serve_service<S: FlightService>(service: S, listener: TcpListener, security: &ServerSecurity) -> DfResult<ServerHandle> {
    let addr = listener.local_addr()?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &security.tls {
        install_crypto_provider();
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| DataFusionError::Configuration(format!("TLS: {e}")))?;
    }
    let mut router = builder.layer(GuardLayer { auth: Arc::clone(&security.auth) });
    let scheme = security.scheme();
    let (stop, stopped) = oneshot::channel::<()>();
    let service = FlightServiceServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Small control messages must not wait for Nagle's algorithm (40 ms per round trip).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(async move {
        let result = router
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(%addr, "flight server stopped: {e}");
        }
    });
    Ok(ServerHandle { addr, scheme, stop: Some(stop), task, in_process: None })
}

struct FlightAdapter<H> {
    handler: Arc<H>,
}

type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

fn unsupported<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!("Flight call {what} is not served by Quiver")))
}

#[async_trait::async_trait]
impl<H: FlightHandler> FlightService for FlightAdapter<H> {
    type HandshakeStream = Stream<HandshakeResponse>;
    type ListFlightsStream = Stream<FlightInfo>;
    type DoGetStream = Stream<FlightData>;
    type DoPutStream = Stream<PutResult>;
    type DoActionStream = Stream<arrow_flight::Result>;
    type ListActionsStream = Stream<ActionType>;
    type DoExchangeStream = Stream<FlightData>;

    async fn handshake(&self, _r: Request<Streaming<HandshakeRequest>>) -> Result<Response<Self::HandshakeStream>, Status> {
        unsupported("handshake")
    }

    async fn list_flights(&self, _r: Request<Criteria>) -> Result<Response<Self::ListFlightsStream>, Status> {
        unsupported("list_flights")
    }

    async fn get_flight_info(&self, _r: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        unsupported("get_flight_info")
    }

    async fn poll_flight_info(&self, _r: Request<FlightDescriptor>) -> Result<Response<PollInfo>, Status> {
        unsupported("poll_flight_info")
    }

    async fn get_schema(&self, _r: Request<FlightDescriptor>) -> Result<Response<SchemaResult>, Status> {
        unsupported("get_schema")
    }

    async fn do_get(&self, request: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let caller = caller_of(&request)?;
        let stream = self.handler.do_get(&caller, request.into_inner().ticket).await.map_err(|e| status_from_error(&e))?;
        Ok(Response::new(encode_batches_with(stream, self.handler.ipc_options())))
    }

    async fn do_put(&self, _r: Request<Streaming<FlightData>>) -> Result<Response<Self::DoPutStream>, Status> {
        unsupported("do_put")
    }

    async fn do_action(&self, request: Request<Action>) -> Result<Response<Self::DoActionStream>, Status> {
        let caller = caller_of(&request)?;
        let action = request.into_inner();
        let body = self.handler.do_action(&caller, &action.r#type, action.body).await.map_err(|e| status_from_error(&e))?;
        let reply = futures::stream::once(async move { Ok(arrow_flight::Result { body }) });
        Ok(Response::new(Box::pin(reply)))
    }

    async fn list_actions(&self, _r: Request<Empty>) -> Result<Response<Self::ListActionsStream>, Status> {
        unsupported("list_actions")
    }

    async fn do_exchange(&self, _r: Request<Streaming<FlightData>>) -> Result<Response<Self::DoExchangeStream>, Status> {
        unsupported("do_exchange")
    }
}

/// The schema a batch stream of `schema` has on the wire: the encoder sends dictionary columns
/// as their values, and a `FlightInfo` must announce what `DoGet` will really carry.
pub(super) fn wire_schema(schema: &SchemaRef) -> SchemaRef {
    let encoder = FlightDataEncoderBuilder::new().with_schema(Arc::clone(schema)).build(futures::stream::empty());
    encoder.known_schema().unwrap_or_else(|| Arc::clone(schema))
}

/// Encodes a batch stream as Flight data; the schema goes first even when no batch follows.
/// Dictionary columns go as their values (see [`wire_schema`]); a Task output's reader casts
/// its columns back to the types its plan expects (`client::fetch_output`).
pub(super) fn encode_batches(stream: SendableRecordBatchStream) -> Stream<FlightData> {
    encode_batches_with(stream, IpcWriteOptions::default())
}

fn encode_batches_with(stream: SendableRecordBatchStream, options: IpcWriteOptions) -> Stream<FlightData> {
    let schema = stream.schema();
    let batches: BoxStream<'static, Result<_, FlightError>> =
        stream.map_err(|e| FlightError::Tonic(Box::new(status_from_error(&e)))).boxed();
    let encoded = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .with_max_flight_data_size(MAX_MESSAGE_BYTES / 4)
        .with_options(options)
        .build(batches)
        .map_err(Status::from);
    Box::pin(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::ipc::CompressionType;
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, false)]));
        let values = StringArray::from_iter_values((0..10_000).map(|i| format!("a repetitive value {}", i % 10)));
        RecordBatch::try_new(schema, vec![Arc::new(values)]).unwrap()
    }

    async fn body_bytes(options: IpcWriteOptions) -> (usize, Vec<RecordBatch>) {
        let b = batch();
        let stream = Box::pin(RecordBatchStreamAdapter::new(b.schema(), futures::stream::iter([Ok(b)])));
        let encoded: Vec<FlightData> = encode_batches_with(stream, options).try_collect().await.unwrap();
        let size = encoded.iter().map(|d| d.data_body.len()).sum();
        let decoded = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(
            futures::stream::iter(encoded.into_iter().map(Ok)),
        );
        (size, decoded.try_collect().await.unwrap())
    }

    #[tokio::test]
    async fn compressed_outputs_are_smaller_and_decode_to_the_same_batches() {
        let (plain, plain_batches) = body_bytes(IpcWriteOptions::default()).await;
        assert_eq!(plain_batches, vec![batch()]);
        for codec in [CompressionType::LZ4_FRAME, CompressionType::ZSTD] {
            let options = IpcWriteOptions::default().try_with_compression(Some(codec)).unwrap();
            let (size, batches) = body_bytes(options).await;
            assert!(size * 4 < plain, "{codec:?}: {size} bytes against {plain}");
            assert_eq!(batches, vec![batch()], "{codec:?}");
        }
    }
}
