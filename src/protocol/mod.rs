//! The messages Quiver's processes exchange, and how plans and errors become bytes.
//!
//! Control messages are protobuf (prost) structs carried in Arrow Flight actions and tickets;
//! Task plans are DataFusion physical plans encoded with datafusion-proto plus [`QuiverCodec`]
//! for Quiver's own plan nodes. Workers decode plans; they never see SQL and never re-plan.

mod codec;
mod error;
mod messages;

pub use codec::{decode_plan, encode_plan, encode_plan_when_resolved, QuiverCodec};
pub use error::{
    cancelled_error, classify, error_from_remote, error_text, error_to_remote, find as find_quiver_error, is_cancelled,
    quiver_error, quiver_to_remote, remote_to_quiver, ErrorKind, QuiverError,
};
pub use messages::*;
