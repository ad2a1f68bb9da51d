//! Errors with a kind that survives every hop: [`QuiverError`] is what Quiver's own failures are
//! and what any error becomes when it crosses a process boundary ([`RemoteError`] on the wire).
//!
//! The kind decides what happens next: whether running a Task again can fix its failure (a lost
//! worker, an unreadable input, an I/O error, memory) or not (bad SQL, a division by zero). So it
//! must survive DataFusion's wrapping (`Context`, `Shared`, Arrow's `ExternalError`) inside a
//! process and the network between them: [`classify`] finds a `QuiverError` anywhere in an
//! error's chain, and only falls back to the root's DataFusion variant when there is none.
//!
//! The message is written once, with one prefix: DataFusion's own for its errors ("Arrow error:
//! Divide by zero error", as single-node DataFusion prints it), none for Quiver's. [`error_text`]
//! is what users read, in every client and in `quiver.queries`.

use std::fmt;

use datafusion::common::DataFusionError;
use datafusion::object_store;

use super::{RemoteError, TaskKey};

/// What kind of failure an error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The statement is wrong: SQL, names, types.
    Plan,
    NotImplemented,
    /// Memory (or another budget) ran out.
    ResourcesExhausted,
    Configuration,
    /// A bug: an invariant did not hold.
    Internal,
    /// Reading or writing a file or an object store failed.
    Io,
    /// Evaluating the plan failed (a division by zero, a bad cast): the same input fails again.
    Execution,
    /// The client ended the Query.
    Cancelled,
    /// A Task output could not be read: its worker is gone or no longer holds it.
    FetchFailed,
    /// The worker running an Attempt was lost.
    WorkerLost,
    /// Another process could not be reached.
    Unreachable,
    /// The caller is not authenticated, or its role does not allow what it asked.
    Denied,
}

impl ErrorKind {
    const ALL: [ErrorKind; 12] = [
        ErrorKind::Plan,
        ErrorKind::NotImplemented,
        ErrorKind::ResourcesExhausted,
        ErrorKind::Configuration,
        ErrorKind::Internal,
        ErrorKind::Io,
        ErrorKind::Execution,
        ErrorKind::Cancelled,
        ErrorKind::FetchFailed,
        ErrorKind::WorkerLost,
        ErrorKind::Unreachable,
        ErrorKind::Denied,
    ];

    /// The name on the wire, in `quiver.tasks` and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Plan => "plan",
            ErrorKind::NotImplemented => "not_implemented",
            ErrorKind::ResourcesExhausted => "resources_exhausted",
            ErrorKind::Configuration => "configuration",
            ErrorKind::Internal => "internal",
            ErrorKind::Io => "io",
            ErrorKind::Execution => "execution",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::FetchFailed => "fetch_failed",
            ErrorKind::WorkerLost => "worker_lost",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Denied => "denied",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether running the same Task again, on another worker, can succeed where this failed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Io | ErrorKind::ResourcesExhausted | ErrorKind::FetchFailed | ErrorKind::WorkerLost | ErrorKind::Unreachable
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal for who asked: its kind is [`ErrorKind::Denied`], which no retry changes.
impl From<crate::auth::Refused> for DataFusionError {
    fn from(refused: crate::auth::Refused) -> Self {
        quiver_error(ErrorKind::Denied, refused.0)
    }
}

/// A failure with its kind and the words a user reads.
#[derive(Clone, Debug, PartialEq)]
pub struct QuiverError {
    pub kind: ErrorKind,
    pub message: String,
    /// For [`ErrorKind::FetchFailed`]: the Attempt whose output could not be read.
    pub output: Option<TaskKey>,
}

impl QuiverError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), output: None }
    }

    /// The output of Attempt `output`, held by the worker at `url`, could not be read.
    pub fn fetch_failed(output: TaskKey, url: &str, cause: &DataFusionError) -> Self {
        let message = format!("cannot read the output of task {output} from {url}: {}", error_text(cause));
        Self { kind: ErrorKind::FetchFailed, message, output: Some(output) }
    }

    pub fn into_datafusion(self) -> DataFusionError {
        DataFusionError::External(Box::new(self))
    }
}

impl fmt::Display for QuiverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for QuiverError {}

/// A Quiver error of `kind` as a DataFusionError.
pub fn quiver_error(kind: ErrorKind, message: impl Into<String>) -> DataFusionError {
    QuiverError::new(kind, message).into_datafusion()
}

/// The error a cancelled Query's reader gets.
pub fn cancelled_error(message: impl Into<String>) -> DataFusionError {
    quiver_error(ErrorKind::Cancelled, message)
}

/// Whether `error` says the Query was cancelled.
pub fn is_cancelled(error: &DataFusionError) -> bool {
    find(error).is_some_and(|e| e.kind == ErrorKind::Cancelled)
}

/// The outermost [`QuiverError`] in `error`'s chain, however DataFusion wrapped it.
pub fn find(error: &DataFusionError) -> Option<&QuiverError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<QuiverError>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The typed view of any error: the Quiver error in its chain, or its root's kind and text.
pub fn classify(error: &DataFusionError) -> QuiverError {
    if let Some(found) = find(error) {
        return found.clone();
    }
    let root = error.find_root();
    let kind = match root {
        DataFusionError::Plan(_) | DataFusionError::SQL(..) | DataFusionError::SchemaError(..) => ErrorKind::Plan,
        DataFusionError::NotImplemented(_) => ErrorKind::NotImplemented,
        DataFusionError::ResourcesExhausted(_) => ErrorKind::ResourcesExhausted,
        DataFusionError::Configuration(_) => ErrorKind::Configuration,
        DataFusionError::Internal(_) => ErrorKind::Internal,
        DataFusionError::IoError(_) => ErrorKind::Io,
        DataFusionError::ObjectStore(store) => object_store_kind(store),
        _ => io_cause_kind(root).unwrap_or(ErrorKind::Execution),
    };
    let message = match root {
        // The parser's own words ("sql parser error: Expected ..."), not its Debug form.
        DataFusionError::SQL(parser, _) => parser.to_string(),
        other => other.to_string(),
    };
    QuiverError::new(kind, message)
}

/// The kind of an I/O or object store error anywhere below `error` (e.g. inside a Parquet or
/// Arrow error), if there is one.
fn io_cause_kind(error: &DataFusionError) -> Option<ErrorKind> {
    let mut current = std::error::Error::source(error);
    while let Some(e) = current {
        if let Some(store) = e.downcast_ref::<object_store::Error>() {
            return Some(object_store_kind(store));
        }
        if e.is::<std::io::Error>() {
            return Some(ErrorKind::Io);
        }
        current = e.source();
    }
    None
}

/// An object store's error is worth another Attempt (a timeout or a reset the store's own
/// retries did not overcome), unless it names an object or path that is not there, an
/// operation the store lacks, or credentials it refuses: every worker reads the same store
/// with the same options, and would fail alike, up to the retry limit. (A local file that is
/// not there may be missing on one worker's disk only: that stays an I/O error.)
fn object_store_kind(error: &object_store::Error) -> ErrorKind {
    use object_store::Error::*;
    match error {
        NotFound { .. } | InvalidPath { .. } | NotSupported { .. } | NotImplemented { .. } => ErrorKind::Execution,
        PermissionDenied { .. } | Unauthenticated { .. } | UnknownConfigurationKey { .. } => ErrorKind::Configuration,
        _ => ErrorKind::Io,
    }
}

/// What a user reads of an error: one prefix, the engine's own words.
pub fn error_text(error: &DataFusionError) -> String {
    classify(error).message
}

pub fn error_to_remote(error: &DataFusionError) -> RemoteError {
    quiver_to_remote(&classify(error))
}

pub fn quiver_to_remote(error: &QuiverError) -> RemoteError {
    RemoteError { kind: error.kind.as_str().to_string(), message: error.message.clone(), output: error.output.clone() }
}

/// The error a [`RemoteError`] stands for; an unknown kind is an execution error.
pub fn remote_to_quiver(error: RemoteError) -> QuiverError {
    let kind = ErrorKind::from_name(&error.kind).unwrap_or(ErrorKind::Execution);
    QuiverError { kind, message: error.message, output: error.output }
}

pub fn error_from_remote(error: RemoteError) -> DataFusionError {
    remote_to_quiver(error).into_datafusion()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::error::ArrowError;

    use super::*;

    #[test]
    fn kind_survives_the_round_trip() {
        let original = DataFusionError::ResourcesExhausted("out of memory".into());
        let back = error_from_remote(error_to_remote(&original));
        assert_eq!(classify(&back).kind, ErrorKind::ResourcesExhausted);
        assert_eq!(error_text(&back), "Resources exhausted: out of memory");
    }

    #[test]
    fn a_fetch_failure_keeps_its_kind_and_output_under_datafusion_wrapping() {
        let key = TaskKey { query_id: "q".into(), stage: 1, task: 2, attempt: 0 };
        let cause = DataFusionError::Execution("connection reset".into());
        let failed = QuiverError::fetch_failed(key.clone(), "http://w", &cause).into_datafusion();
        let wrapped = DataFusionError::Shared(Arc::new(DataFusionError::ArrowError(
            Box::new(ArrowError::ExternalError(Box::new(failed.context("while joining")))),
            None,
        )));
        let found = classify(&wrapped);
        assert_eq!((found.kind, found.output), (ErrorKind::FetchFailed, Some(key.clone())));
        let remote = error_from_remote(error_to_remote(&wrapped));
        assert_eq!(find(&remote).and_then(|e| e.output.clone()), Some(key));
    }

    #[test]
    fn text_has_one_prefix_across_hops() {
        let original = DataFusionError::ArrowError(Box::new(ArrowError::DivideByZero), None);
        let mut error = original;
        for _ in 0..3 {
            error = error_from_remote(error_to_remote(&error));
        }
        assert_eq!(error_text(&error), "Arrow error: Divide by zero error");
        assert!(!classify(&error).kind.is_retryable());
    }

    #[test]
    fn a_store_error_no_retry_can_fix_is_not_retried() {
        // Regression: every object store error was I/O, retried up to the limit on each worker:
        // a file deleted after listing, or a key the store refuses, failed 4 Attempts per Task.
        let missing = || object_store::Error::NotFound { path: "t/part-0.parquet".into(), source: "404".into() };
        let refused = object_store::Error::PermissionDenied { path: "t/part-0.parquet".into(), source: "403".into() };
        let timeout = object_store::Error::Generic { store: "S3", source: "request timed out".into() };
        assert_eq!(classify(&DataFusionError::ObjectStore(Box::new(missing()))).kind, ErrorKind::Execution);
        assert_eq!(classify(&DataFusionError::ObjectStore(Box::new(refused))).kind, ErrorKind::Configuration);
        assert_eq!(classify(&DataFusionError::ObjectStore(Box::new(timeout))).kind, ErrorKind::Io);
        let below = DataFusionError::ArrowError(Box::new(ArrowError::ExternalError(Box::new(missing()))), None);
        assert!(!classify(&below).kind.is_retryable(), "{:?}", classify(&below));
    }

    #[test]
    fn io_below_a_parquet_error_is_io() {
        let io = std::io::Error::new(std::io::ErrorKind::Other, "disk gone");
        let parquet = DataFusionError::ArrowError(Box::new(ArrowError::IoError("read".into(), io)), None);
        assert_eq!(classify(&parquet).kind, ErrorKind::Io);
    }
}
