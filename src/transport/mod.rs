//! The only module that speaks gRPC: Arrow Flight servers and clients, message limits, and the
//! mapping of errors to gRPC statuses and back.
//!
//! Workers serve Flight through [`FlightHandler`], which reduces the Flight service to the two
//! calls they use: `do_get` (a stream of record batches) and `do_action` (one protobuf request,
//! one protobuf reply). The coordinator serves Arrow Flight SQL through [`SqlHandler`]: clients
//! (the ADBC driver, `quiver sql`) speak Flight SQL to it, and workers' control-plane actions pass
//! through the same service.

mod client;
mod server;
mod sql_client;
mod sql_server;

pub use client::{call, connect, connect_lazy, fetch_batches, fetch_output, worker_peer, Peer};
pub use server::{serve, serve_sql, FlightHandler, ServerHandle};
pub use sql_client::{SqlClient, Statement};
pub use sql_server::{Cancelled, Prepared, SqlHandler, Started, TableEntry, CANCEL_FLIGHT_INFO};

use arrow_flight::error::FlightError;
use datafusion::common::DataFusionError;
use tonic::{Code, Status};

/// How a DataFusionError travels as a gRPC status: the code keeps its kind.
pub fn status_from_error(error: &DataFusionError) -> Status {
    let root = error.find_root();
    if crate::protocol::is_cancelled(error) {
        return Status::cancelled(root.message().into_owned());
    }
    let code = match root {
        DataFusionError::Plan(_) | DataFusionError::SQL(..) | DataFusionError::SchemaError(..) => Code::InvalidArgument,
        DataFusionError::NotImplemented(_) => Code::Unimplemented,
        DataFusionError::ResourcesExhausted(_) => Code::ResourceExhausted,
        DataFusionError::Configuration(_) => Code::FailedPrecondition,
        DataFusionError::Internal(_) => Code::Internal,
        _ => Code::Aborted,
    };
    let message = match root {
        // The parser's own words ("sql parser error: Expected ..."), not its Debug form.
        DataFusionError::SQL(parser, _) => parser.to_string(),
        other => other.message().into_owned(),
    };
    Status::new(code, message)
}

/// The reverse of [`status_from_error`].
pub fn error_from_status(status: &Status) -> DataFusionError {
    let message = status.message().to_string();
    match status.code() {
        Code::InvalidArgument => DataFusionError::Plan(message),
        Code::Unimplemented => DataFusionError::NotImplemented(message),
        Code::ResourceExhausted => DataFusionError::ResourcesExhausted(message),
        Code::FailedPrecondition => DataFusionError::Configuration(message),
        Code::Internal => DataFusionError::Internal(message),
        Code::Aborted => DataFusionError::Execution(message),
        Code::Cancelled => crate::protocol::cancelled_error(message),
        code => DataFusionError::Execution(format!("{message} ({code:?})")),
    }
}

pub fn error_from_flight(error: FlightError) -> DataFusionError {
    match error {
        FlightError::Tonic(status) => error_from_status(&status),
        FlightError::Arrow(e) => DataFusionError::ArrowError(Box::new(e), None),
        other => DataFusionError::Execution(other.to_string()),
    }
}
