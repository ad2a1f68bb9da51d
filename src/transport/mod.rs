//! The only module that speaks gRPC: Arrow Flight servers and clients, message limits, and the
//! mapping of errors to gRPC statuses and back.
//!
//! Workers serve Flight through [`FlightHandler`], which reduces the Flight service to the two
//! calls they use: `do_get` (a stream of record batches) and `do_action` (one protobuf request,
//! one protobuf reply). The coordinator serves Arrow Flight SQL through [`SqlHandler`]: clients
//! (the ADBC driver, `quiver sql`) speak Flight SQL to it, and workers' control-plane actions pass
//! through the same service. Every server admits callers through one guard (`guard`), which
//! authenticates each request before any service code sees it; every client presents its
//! process's credentials ([`ClientSecurity`]).

mod client;
mod guard;
mod in_process;
mod server;
mod sql_client;
mod sql_server;

pub use client::{
    call, connect, connect_lazy, fetch_batches, fetch_output, refuses_connections, release_attempt, send_key_filter, worker_peer, ClientSecurity, Peer,
};
pub use guard::caller_of;
pub use in_process::in_process_reads_total;
pub use server::{serve, serve_sql, FlightHandler, ServerHandle, ServerSecurity};
pub use sql_client::{SqlClient, Statement};
pub use sql_server::{Cancelled, Prepared, SqlHandler, Started, TableEntry, CANCEL_FLIGHT_INFO};

use arrow_flight::error::FlightError;
use datafusion::common::DataFusionError;
use prost::Message;
use tonic::{Code, Status};

use crate::config::STATUS_MESSAGE_BYTES_MAX;
use crate::protocol::{classify, error_from_remote, quiver_error, quiver_to_remote, ErrorKind, RemoteError};

/// What a cluster member (the Coordinator or a Worker) needs to admit callers and to call
/// others.
#[derive(Clone)]
pub struct NodeSecurity {
    pub server: ServerSecurity,
    pub client: ClientSecurity,
}

impl NodeSecurity {
    /// No authentication, no TLS.
    pub fn open() -> Self {
        Self { server: ServerSecurity::open(), client: ClientSecurity::default() }
    }

    /// The same, with node credentials naming `name` (a node's name is known once it listens).
    pub fn named(mut self, name: &str) -> Self {
        if let crate::auth::Credentials::Node { name: n, .. } = &mut self.client.credentials {
            *n = name.to_string();
        }
        self
    }
}

/// Makes ring rustls's process-wide crypto provider. rustls refuses to choose when more than one
/// provider is compiled in (it panics at the first TLS connection), so Quiver names its own.
pub fn install_crypto_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // Another part of the process may have installed one already; either is fine.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    });
}

/// How an error travels as a gRPC status: the code for clients that only read codes, the text
/// users read as the message, and the typed error in the status details for Quiver's own
/// processes, so that its kind survives the hop.
pub fn status_from_error(error: &DataFusionError) -> Status {
    let typed = classify(error);
    let code = match typed.kind {
        ErrorKind::Plan => Code::InvalidArgument,
        ErrorKind::NotImplemented => Code::Unimplemented,
        ErrorKind::ResourcesExhausted => Code::ResourceExhausted,
        ErrorKind::Configuration => Code::FailedPrecondition,
        ErrorKind::Internal => Code::Internal,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Unreachable | ErrorKind::WorkerLost | ErrorKind::FetchFailed => Code::Unavailable,
        ErrorKind::Io | ErrorKind::Execution => Code::Aborted,
        ErrorKind::Denied => Code::PermissionDenied,
    };
    let mut typed = typed;
    // The message travels twice in HTTP/2 headers (as text and in the details), which peers
    // cap: a longer one (an internal error that prints a plan) would break the response.
    typed.message = truncated(typed.message, STATUS_MESSAGE_BYTES_MAX);
    let details = quiver_to_remote(&typed).encode_to_vec();
    Status::with_details(code, typed.message, details.into())
}

/// `text` cut to at most about `max` bytes, on a character boundary, saying how much was cut.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("… ({cut} more bytes)"));
    text
}

/// The reverse of [`status_from_error`]; a status from elsewhere (the transport itself, another
/// server) gets a kind from its code.
pub fn error_from_status(status: &Status) -> DataFusionError {
    if let Ok(remote) = RemoteError::decode(status.details()) {
        if ErrorKind::from_name(&remote.kind).is_some() {
            return error_from_remote(remote);
        }
    }
    let kind = match status.code() {
        Code::InvalidArgument => ErrorKind::Plan,
        Code::Unimplemented => ErrorKind::NotImplemented,
        Code::ResourceExhausted => ErrorKind::ResourcesExhausted,
        Code::FailedPrecondition => ErrorKind::Configuration,
        Code::Internal => ErrorKind::Internal,
        Code::Cancelled => ErrorKind::Cancelled,
        Code::Unavailable => ErrorKind::Unreachable,
        Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Denied,
        _ => ErrorKind::Execution,
    };
    let message = match status.code() {
        Code::Aborted | Code::Unknown => status.message().to_string(),
        code => format!("{} ({code:?})", status.message()),
    };
    quiver_error(kind, message)
}

pub fn error_from_flight(error: FlightError) -> DataFusionError {
    match error {
        FlightError::Tonic(status) => error_from_status(&status),
        FlightError::Arrow(e) => DataFusionError::ArrowError(Box::new(e), None),
        other => quiver_error(ErrorKind::Execution, other.to_string()),
    }
}
