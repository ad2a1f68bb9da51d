//! DataFusionError ↔ [`RemoteError`]: errors keep their kind across process boundaries.

use datafusion::common::DataFusionError;

use super::RemoteError;

/// A Query its client ended (a cancel, a closed stream): an answer to the client, not a failure
/// of the engine. The transport carries it as gRPC `CANCELLED`.
#[derive(Debug)]
pub struct QueryCancelled(pub String);

impl std::fmt::Display for QueryCancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QueryCancelled {}

/// The error a cancelled Query's reader gets.
pub fn cancelled_error(message: impl Into<String>) -> DataFusionError {
    DataFusionError::External(Box::new(QueryCancelled(message.into())))
}

/// Whether `error` (or its root) says the Query was cancelled.
pub fn is_cancelled(error: &DataFusionError) -> bool {
    matches!(error.find_root(), DataFusionError::External(e) if e.is::<QueryCancelled>())
}

pub fn error_to_remote(error: &DataFusionError) -> RemoteError {
    let kind = match error.find_root() {
        DataFusionError::Plan(_) => "plan",
        DataFusionError::SQL(..) => "sql",
        DataFusionError::SchemaError(..) => "schema",
        DataFusionError::NotImplemented(_) => "not_implemented",
        DataFusionError::ResourcesExhausted(_) => "resources_exhausted",
        DataFusionError::Configuration(_) => "configuration",
        DataFusionError::Internal(_) => "internal",
        DataFusionError::IoError(_) | DataFusionError::ObjectStore(_) => "io",
        _ => "execution",
    };
    RemoteError { kind: kind.to_string(), message: error.find_root().message().into_owned() }
}

pub fn error_from_remote(error: RemoteError) -> DataFusionError {
    let message = error.message;
    match error.kind.as_str() {
        "plan" | "sql" | "schema" => DataFusionError::Plan(message),
        "not_implemented" => DataFusionError::NotImplemented(message),
        "resources_exhausted" => DataFusionError::ResourcesExhausted(message),
        "configuration" => DataFusionError::Configuration(message),
        "internal" => DataFusionError::Internal(message),
        _ => DataFusionError::Execution(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kind_survives_the_round_trip() {
        let original = DataFusionError::ResourcesExhausted("out of memory".into());
        let back = error_from_remote(error_to_remote(&original));
        assert!(matches!(back, DataFusionError::ResourcesExhausted(m) if m == "out of memory"));
    }
}
