//! Flight clients: connecting with limits, one-shot actions, and fetching batch streams.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use arrow_flight::{Action, FlightClient, FlightDescriptor, FlightInfo, Ticket};
use datafusion::arrow::array::{RecordBatch, RecordBatchOptions};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{error_from_flight, error_from_status, install_crypto_provider};
use crate::auth::Credentials;
use crate::protocol::{quiver_error, ErrorKind, OutputTicket, ReleaseAttempt, StageKeyFilter, TaskKey};
use crate::config::{
    CONNECT_TIMEOUT_MS, CONTROL_CALL_TIMEOUT_MS, HTTP2_CONNECTION_WINDOW_BYTES, HTTP2_DATA_CONNECTION_WINDOW_BYTES, HTTP2_KEEPALIVE_INTERVAL_MS,
    HTTP2_KEEPALIVE_TIMEOUT_MS, HTTP2_STREAM_WINDOW_BYTES,
    MAX_MESSAGE_BYTES, WORKER_CONNECTIONS_MAX,
};

/// A connection to another Quiver process. Cheap to clone: clones share the HTTP/2 channel.
#[derive(Clone, Debug)]
pub struct Peer {
    pub url: String,
    channel: Channel,
    credentials: Credentials,
}

impl Peer {
    fn client(&self) -> FlightClient {
        let inner = arrow_flight::flight_service_client::FlightServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut client = FlightClient::new_from_inner(inner);
        // A node token is made afresh for every call: it is valid for a minute only.
        if let Some(header) = self.credentials.header() {
            if client.add_header("authorization", &header).is_err() {
                tracing::warn!(url = %self.url, "credentials are not a valid header value");
            }
        }
        client
    }

    /// The same connection, presenting other credentials.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// The raw Flight client, for calls the helpers here do not cover (the handshake).
    pub(super) fn flight_client(&self) -> FlightClient {
        self.client()
    }
}

/// How a process calls others: the credentials it presents, and the certificate authority it
/// trusts for `https://` addresses.
#[derive(Clone, Debug, Default)]
pub struct ClientSecurity {
    pub credentials: Credentials,
    /// PEM of the CA certificates that sign the cluster's TLS certificates.
    pub tls_ca: Option<Arc<Vec<u8>>>,
}

/// Connects to `url` (`http://host:port`, or `https://` with TLS), failing after
/// [`CONNECT_TIMEOUT_MS`].
pub async fn connect(url: &str, security: &ClientSecurity) -> Result<Peer> {
    let endpoint = endpoint(url, security)?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| quiver_error(ErrorKind::Unreachable, format!("cannot reach {url}: {}", source_chain(&e))))?;
    Ok(Peer { url: url.to_string(), channel, credentials: security.credentials.clone() })
}

/// A connection that is made on first use and remade after failures: what a worker keeps to a
/// coordinator that may not be up yet or may restart.
pub fn connect_lazy(url: &str, security: &ClientSecurity) -> Result<Peer> {
    let endpoint = endpoint(url, security)?.timeout(Duration::from_millis(CONTROL_CALL_TIMEOUT_MS));
    Ok(Peer { url: url.to_string(), channel: endpoint.connect_lazy(), credentials: security.credentials.clone() })
}

fn endpoint(url: &str, security: &ClientSecurity) -> Result<Endpoint> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| DataFusionError::Configuration(format!("invalid address '{url}': {e}")))?;
    if url.starts_with("https://") {
        let Some(ca) = &security.tls_ca else {
            return Err(DataFusionError::Configuration(format!(
                "{url} uses TLS: give the certificate authority that signed its certificate (--tls-ca FILE)"
            )));
        };
        install_crypto_provider();
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.as_slice()));
        endpoint = endpoint.tls_config(tls).map_err(|e| DataFusionError::Configuration(format!("TLS for {url}: {e}")))?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .initial_stream_window_size(Some(HTTP2_STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(HTTP2_CONNECTION_WINDOW_BYTES))
        .http2_keep_alive_interval(Duration::from_millis(HTTP2_KEEPALIVE_INTERVAL_MS))
        .keep_alive_timeout(Duration::from_millis(HTTP2_KEEPALIVE_TIMEOUT_MS))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true))
}

/// Sends one action and decodes its reply.
pub async fn call<Req: Message, Resp: Message + Default>(peer: &Peer, action: &str, request: &Req) -> Result<Resp> {
    let action = Action::new(action, request.encode_to_vec());
    let mut replies = peer.client().do_action(action).await.map_err(|e| unreachable_or(peer, e))?;
    let body = match replies.next().await {
        Some(reply) => reply.map_err(|e| unreachable_or(peer, e))?,
        None => return Err(DataFusionError::Execution(format!("{} sent no reply", peer.url))),
    };
    // Read the stream to its end: dropping it early resets the HTTP/2 stream, and servers
    // treat many resets as abuse and close the connection.
    while replies.next().await.is_some() {}
    Resp::decode(body).map_err(|e| DataFusionError::Execution(format!("malformed reply from {}: {e}", peer.url)))
}

/// Asks for the `FlightInfo` of a descriptor.
pub async fn get_flight_info(peer: &Peer, descriptor: FlightDescriptor) -> Result<FlightInfo> {
    peer.client().get_flight_info(descriptor).await.map_err(|e| unreachable_or(peer, e))
}

/// Fetches the batch stream a ticket names. Errors in the stream keep their kind.
pub async fn fetch_batches(peer: &Peer, ticket: Vec<u8>, schema: Option<SchemaRef>) -> Result<SendableRecordBatchStream> {
    let stream = peer.client().do_get(Ticket::new(ticket)).await.map_err(|e| unreachable_or(peer, e))?;
    let mut decoder = stream.into_inner();
    let schema = match schema {
        Some(schema) => schema,
        None => first_schema(&mut decoder).await?,
    };
    let stream = arrow_flight::decode::FlightRecordBatchStream::new(decoder);
    let batches = stream.map_err(error_from_flight);
    Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
}

/// Streams part `partition` of the output of Attempt `key` from the worker at `url`. A worker
/// of this same process is asked directly, without encoding (`in_process`).
///
/// All fetches from one worker share one HTTP/2 connection. Its connection-level window is
/// as large as HTTP/2 allows, so that an output nobody reads yet (a join's probe side while it
/// builds) fills only its own stream's window and never stalls the outputs being read.
///
/// Flight sends some types as others (dictionaries as their values; a LargeList as a List):
/// each batch is cast back to `schema`, the types the consumer's plan was built for.
pub async fn fetch_output(
    security: &ClientSecurity,
    url: &str,
    key: TaskKey,
    partition: u32,
    schema: SchemaRef,
) -> Result<SendableRecordBatchStream> {
    let ticket = OutputTicket { key: Some(key), partition }.encode_to_vec();
    let stream = match super::in_process::do_get(url, ticket.clone().into()).await {
        Some(stream) => stream?,
        None => fetch_batches(&worker_peer(url, security).await?, ticket, Some(Arc::clone(&schema))).await?,
    };
    let expected = Arc::clone(&schema);
    let conformed = stream.map(move |batch| batch.and_then(|b| conform(b, &expected)));
    Ok(Box::pin(RecordBatchStreamAdapter::new(schema, conformed)))
}

/// `batch` with the types of `schema`, cast column by column where they differ.
fn conform(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch);
    }
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| match column.data_type() == field.data_type() {
            true => Ok(Arc::clone(column)),
            false => Ok(cast(column, field.data_type())?),
        })
        .collect::<Result<Vec<_>>>()?;
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(Arc::clone(schema), columns, &options)?)
}

/// Connections to workers (output fetches, Query releases), one per worker, shared by the whole
/// process.
static WORKER_CONNECTIONS: LazyLock<Mutex<HashMap<String, Peer>>> = LazyLock::new(Mutex::default);

/// The process's shared connection to the worker at `url`, made on first use, presenting the
/// caller's credentials.
pub async fn worker_peer(url: &str, security: &ClientSecurity) -> Result<Peer> {
    if let Some(peer) = WORKER_CONNECTIONS.lock().expect("pool lock").get(url) {
        return Ok(peer.clone().with_credentials(security.credentials.clone()));
    }
    let channel = endpoint(url, security)?
        .initial_connection_window_size(Some(HTTP2_DATA_CONNECTION_WINDOW_BYTES))
        .timeout(Duration::from_millis(CONTROL_CALL_TIMEOUT_MS))
        .connect()
        .await
        .map_err(|e| quiver_error(ErrorKind::Unreachable, format!("cannot reach {url}: {}", source_chain(&e))))?;
    let peer = Peer { url: url.to_string(), channel, credentials: security.credentials.clone() };
    let mut pool = WORKER_CONNECTIONS.lock().expect("pool lock");
    if pool.len() >= WORKER_CONNECTIONS_MAX {
        pool.clear();
    }
    Ok(pool.entry(url.to_string()).or_insert(peer).clone().with_credentials(security.credentials.clone()))
}

/// Waits for the schema message that opens every Quiver stream.
async fn first_schema(inner: &mut arrow_flight::decode::FlightDataDecoder) -> Result<SchemaRef> {
    use arrow_flight::decode::DecodedPayload;
    loop {
        match inner.next().await {
            Some(Ok(data)) => {
                if let DecodedPayload::Schema(schema) = data.payload {
                    return Ok(schema);
                }
            }
            Some(Err(e)) => return Err(error_from_flight(e)),
            None => return Err(DataFusionError::Execution("stream ended before its schema".into())),
        }
    }
}

/// True when nothing listens at `url` any more (the connection is refused): the process that
/// served there is gone. Unreachable or slow is not refused.
pub async fn refuses_connections(url: &str) -> bool {
    let Some(address) = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) else { return false };
    let connect = tokio::net::TcpStream::connect(address.trim_end_matches('/'));
    match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connect).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

/// Tells the worker at `url` to stop Attempt `key` if it runs and to free its outputs.
pub async fn release_attempt(security: &ClientSecurity, url: &str, key: TaskKey) -> Result<()> {
    let peer = worker_peer(url, security).await?;
    call::<_, crate::protocol::Empty>(&peer, crate::protocol::action::RELEASE_ATTEMPT, &ReleaseAttempt { key: Some(key) }).await?;
    Ok(())
}

/// Hands the worker at `url` a Stage's key filter for its Attempts of that Stage that run.
pub async fn send_key_filter(security: &ClientSecurity, url: &str, filter: StageKeyFilter) -> Result<()> {
    let peer = worker_peer(url, security).await?;
    call::<_, crate::protocol::Empty>(&peer, crate::protocol::action::STAGE_KEY_FILTER, &filter).await?;
    Ok(())
}

fn unreachable_or(peer: &Peer, error: arrow_flight::error::FlightError) -> DataFusionError {
    match &error {
        // The transport's own Unavailable (no Quiver error in its details): the peer is gone.
        arrow_flight::error::FlightError::Tonic(status) if status.code() == tonic::Code::Unavailable && status.details().is_empty() => {
            quiver_error(ErrorKind::Unreachable, format!("{} is unreachable: {}", peer.url, status.message()))
        }
        arrow_flight::error::FlightError::Tonic(status) => error_from_status(status),
        _ => error_from_flight(error),
    }
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
