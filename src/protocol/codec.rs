//! Plan encoding: datafusion-proto for DataFusion's operators, [`QuiverCodec`] for Quiver's.

use std::sync::Arc;

use datafusion::common::{internal_err, DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::bytes::{
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use prost::Message;

use crate::planner::TaskWriterExec;

/// Encodes the plan nodes Quiver adds to DataFusion's.
#[derive(Debug, Default)]
pub struct QuiverCodec;

#[derive(Clone, PartialEq, prost::Message)]
struct WriterNode {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(uint64, tag = "2")]
    row_group_rows: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct QuiverNode {
    #[prost(oneof = "quiver_node::Node", tags = "1")]
    node: Option<quiver_node::Node>,
}

mod quiver_node {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Node {
        #[prost(message, tag = "1")]
        Writer(super::WriterNode),
    }
}

impl PhysicalExtensionCodec for QuiverCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        _ctx: &TaskContext,
        _proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let node = QuiverNode::decode(buf).map_err(|e| DataFusionError::Internal(format!("bad plan node: {e}")))?;
        match (node.node, inputs) {
            (Some(quiver_node::Node::Writer(w)), [input]) => {
                Ok(Arc::new(TaskWriterExec::new(Arc::clone(input), w.path.into(), w.row_group_rows as usize)))
            }
            (other, _) => internal_err!("cannot decode Quiver plan node {other:?} with {} inputs", inputs.len()),
        }
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        _proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        let Some(writer) = node.downcast_ref::<TaskWriterExec>() else {
            return internal_err!("{} cannot be sent to a worker", node.name());
        };
        let writer = WriterNode {
            path: writer.path().to_string_lossy().into_owned(),
            row_group_rows: writer.row_group_rows() as u64,
        };
        QuiverNode { node: Some(quiver_node::Node::Writer(writer)) }.encode(buf).map_err(|e| DataFusionError::Internal(e.to_string()))
    }
}

pub fn encode_plan(plan: Arc<dyn ExecutionPlan>) -> Result<Vec<u8>> {
    Ok(physical_plan_to_bytes_with_extension_codec(plan, &QuiverCodec)?.to_vec())
}

pub fn decode_plan(bytes: &[u8], ctx: &TaskContext) -> Result<Arc<dyn ExecutionPlan>> {
    physical_plan_from_bytes_with_extension_codec(bytes, ctx, &QuiverCodec)
}
