//! Plan encoding: datafusion-proto for DataFusion's operators, [`QuiverCodec`] for Quiver's
//! (Stage readers and Task writers).

use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::common::{internal_err, DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::bytes::{
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use prost::Message;

use crate::planner::{Exchange, StageReaderExec, StageSource, TaskWriterExec};

/// Encodes the plan nodes Quiver adds to DataFusion's. Decoding a Stage reader needs the
/// [`StageSource`] it will read from: the worker's view of where the Query's outputs are.
#[derive(Debug, Default)]
pub struct QuiverCodec {
    pub source: Option<Arc<dyn StageSource>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WriterNode {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(uint64, tag = "2")]
    row_group_rows: u64,
    #[prost(uint32, tag = "3")]
    input_partition: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ReaderNode {
    #[prost(uint32, tag = "1")]
    stage: u32,
    #[prost(uint32, tag = "2")]
    tasks: u32,
    /// 0 for a gather, the number of hash partitions for a shuffle.
    #[prost(uint32, tag = "3")]
    shuffle_partitions: u32,
    #[prost(message, optional, tag = "4")]
    schema: Option<datafusion_proto::protobuf::Schema>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct QuiverNode {
    #[prost(oneof = "quiver_node::Node", tags = "1, 2")]
    node: Option<quiver_node::Node>,
}

mod quiver_node {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Node {
        #[prost(message, tag = "1")]
        Writer(super::WriterNode),
        #[prost(message, tag = "2")]
        Reader(super::ReaderNode),
    }
}

impl QuiverCodec {
    fn decode_reader(&self, r: ReaderNode) -> Result<Arc<dyn ExecutionPlan>> {
        let Some(source) = &self.source else {
            return internal_err!("a Stage reader arrived where no Stage outputs can be read");
        };
        let schema = r.schema.as_ref().ok_or_else(|| DataFusionError::Internal("reader without a schema".into()))?;
        let schema = Arc::new(Schema::try_from(schema)?);
        let exchange = match r.shuffle_partitions {
            0 => Exchange::Gather,
            partitions => Exchange::Shuffle { partitions: partitions as usize },
        };
        Ok(Arc::new(StageReaderExec::from_schema(r.stage as usize, r.tasks as usize, exchange, schema, Arc::clone(source))))
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
            (Some(quiver_node::Node::Writer(w)), [input]) => Ok(Arc::new(TaskWriterExec::new(
                Arc::clone(input),
                w.input_partition as usize,
                w.path.into(),
                w.row_group_rows as usize,
            ))),
            (Some(quiver_node::Node::Reader(r)), []) => self.decode_reader(r),
            (other, _) => internal_err!("cannot decode Quiver plan node {other:?} with {} inputs", inputs.len()),
        }
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        _proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        let encoded = if let Some(writer) = node.downcast_ref::<TaskWriterExec>() {
            quiver_node::Node::Writer(WriterNode {
                path: writer.path().to_string_lossy().into_owned(),
                row_group_rows: writer.row_group_rows() as u64,
                input_partition: writer.input_partition() as u32,
            })
        } else if let Some(reader) = node.downcast_ref::<StageReaderExec>() {
            let shuffle_partitions = match reader.exchange() {
                Exchange::Gather => 0,
                Exchange::Shuffle { partitions } => partitions as u32,
            };
            quiver_node::Node::Reader(ReaderNode {
                stage: reader.stage() as u32,
                tasks: reader.tasks() as u32,
                shuffle_partitions,
                schema: Some(reader.schema().as_ref().try_into()?),
            })
        } else {
            return internal_err!("{} cannot be sent to a worker", node.name());
        };
        QuiverNode { node: Some(encoded) }.encode(buf).map_err(|e| DataFusionError::Internal(e.to_string()))
    }
}

pub fn encode_plan(plan: Arc<dyn ExecutionPlan>) -> Result<Vec<u8>> {
    Ok(physical_plan_to_bytes_with_extension_codec(plan, &QuiverCodec::default())?.to_vec())
}

/// Decodes a Task plan; its Stage readers read through `source`.
pub fn decode_plan(bytes: &[u8], ctx: &TaskContext, source: Option<Arc<dyn StageSource>>) -> Result<Arc<dyn ExecutionPlan>> {
    physical_plan_from_bytes_with_extension_codec(bytes, ctx, &QuiverCodec { source })
}
