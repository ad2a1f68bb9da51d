//! Plan encoding: datafusion-proto for DataFusion's operators, [`QuiverCodec`] for Quiver's
//! (Stage readers and Task writers).

use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::common::{internal_err, DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::arrow::array::RecordBatch;
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::expressions::Literal;
use datafusion::physical_expr::scalar_subquery::ScalarSubqueryExpr;
use datafusion::physical_expr::PhysicalExpr;
use datafusion_proto::bytes::{
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_proto_converter,
};
use datafusion_proto::physical_plan::to_proto::serialize_physical_expr_with_converter;
use datafusion_proto::physical_plan::{
    PhysicalExtensionCodec, PhysicalPlanDecodeContext, PhysicalPlanNodeExt, PhysicalProtoConverterExtension,
};
use datafusion_proto::protobuf;
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

/// Encodes a Task plan. Scalar subquery results the coordinator has computed travel as
/// literals: a worker has no subquery to read them from.
pub fn encode_plan(plan: Arc<dyn ExecutionPlan>) -> Result<Vec<u8>> {
    Ok(physical_plan_to_bytes_with_proto_converter(plan, &QuiverCodec::default(), &SubqueryResultsAsLiterals)?.to_vec())
}

/// The default conversion, except that a resolved `ScalarSubqueryExpr` becomes its value.
struct SubqueryResultsAsLiterals;

impl PhysicalProtoConverterExtension for SubqueryResultsAsLiterals {
    fn proto_to_execution_plan(
        &self,
        proto: &protobuf::PhysicalPlanNode,
        ctx: &PhysicalPlanDecodeContext<'_>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.default_proto_to_execution_plan(proto, ctx)
    }

    fn execution_plan_to_proto(
        &self,
        plan: &Arc<dyn ExecutionPlan>,
        codec: &dyn PhysicalExtensionCodec,
    ) -> Result<protobuf::PhysicalPlanNode> {
        protobuf::PhysicalPlanNode::try_from_physical_plan_with_converter(Arc::clone(plan), codec, self)
    }

    fn proto_to_physical_expr(
        &self,
        proto: &protobuf::PhysicalExprNode,
        input_schema: &Schema,
        ctx: &PhysicalPlanDecodeContext<'_>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        self.default_proto_to_physical_expr(proto, input_schema, ctx)
    }

    fn physical_expr_to_proto(
        &self,
        expr: &Arc<dyn PhysicalExpr>,
        codec: &dyn PhysicalExtensionCodec,
    ) -> Result<protobuf::PhysicalExprNode> {
        if expr.is::<ScalarSubqueryExpr>() {
            let empty = RecordBatch::new_empty(Arc::new(Schema::empty()));
            if let ColumnarValue::Scalar(value) = expr.evaluate(&empty)? {
                let literal: Arc<dyn PhysicalExpr> = Arc::new(Literal::new(value));
                return serialize_physical_expr_with_converter(&literal, codec, self);
            }
        }
        serialize_physical_expr_with_converter(expr, codec, self)
    }
}

/// Decodes a Task plan; its Stage readers read through `source`.
pub fn decode_plan(bytes: &[u8], ctx: &TaskContext, source: Option<Arc<dyn StageSource>>) -> Result<Arc<dyn ExecutionPlan>> {
    physical_plan_from_bytes_with_extension_codec(bytes, ctx, &QuiverCodec { source })
}
