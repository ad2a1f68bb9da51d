//! Plan encoding: datafusion-proto for DataFusion's operators, [`QuiverCodec`] for Quiver's
//! (Stage readers and Task writers).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::config::ConfigOptions;
use datafusion::common::{plan_err, DataFusionError, Result, ScalarValue};
use datafusion::physical_expr::{AcrossPartitions, ConstExpr, EquivalenceProperties};
use datafusion::physical_plan::Partitioning;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::arrow::array::RecordBatch;
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::expressions::Literal;
use datafusion::physical_expr::scalar_subquery::ScalarSubqueryExpr;
use datafusion::physical_expr::{PhysicalExpr, ScalarFunctionExpr};
use datafusion_proto::bytes::{physical_plan_from_bytes_with_proto_converter, physical_plan_to_bytes_with_proto_converter};
use datafusion_proto::physical_plan::from_proto::{parse_physical_exprs, parse_physical_sort_exprs, parse_protobuf_partitioning};
use datafusion_proto::physical_plan::to_proto::{
    serialize_partitioning, serialize_physical_expr_with_converter, serialize_physical_exprs, serialize_physical_sort_exprs,
};
use datafusion_proto::physical_plan::{
    PhysicalExtensionCodec, PhysicalPlanDecodeContext, PhysicalPlanNodeExt, PhysicalProtoConverterExtension,
};
use datafusion_proto::protobuf;
use prost::Message;

use crate::planner::{CopyTaskExec, Exchange, StageReaderExec, StageSource, TaskWriterExec};

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
    #[prost(uint32, repeated, tag = "4")]
    not_null: Vec<u32>,
}

/// A Task of a `COPY … TO` a directory; its input is the statement's sink, which
/// datafusion-proto encodes.
#[derive(Clone, PartialEq, prost::Message)]
struct CopyNode {
    #[prost(string, tag = "1")]
    dir: String,
    #[prost(uint32, tag = "2")]
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
    /// The properties of the subtree the reader replaced, so that the worker rebuilds the plan
    /// around it as the coordinator planned it.
    #[prost(message, optional, tag = "5")]
    partitioning: Option<protobuf::Partitioning>,
    #[prost(message, repeated, tag = "6")]
    orderings: Vec<SortExprList>,
    /// Equivalence classes: expressions known to be equal.
    #[prost(message, repeated, tag = "7")]
    classes: Vec<ExprList>,
    #[prost(message, repeated, tag = "8")]
    constants: Vec<ConstantNode>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SortExprList {
    #[prost(message, repeated, tag = "1")]
    exprs: Vec<protobuf::PhysicalSortExprNode>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ExprList {
    #[prost(message, repeated, tag = "1")]
    exprs: Vec<protobuf::PhysicalExprNode>,
}

/// An expression with one value in every row: in every partition alike (`uniform`, with the
/// value when known) or per partition.
#[derive(Clone, PartialEq, prost::Message)]
struct ConstantNode {
    #[prost(message, optional, tag = "1")]
    expr: Option<protobuf::PhysicalExprNode>,
    #[prost(bool, tag = "2")]
    uniform: bool,
    #[prost(message, optional, tag = "3")]
    value: Option<protobuf::ScalarValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct QuiverNode {
    #[prost(oneof = "quiver_node::Node", tags = "1, 2, 3")]
    node: Option<quiver_node::Node>,
}

mod quiver_node {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Node {
        #[prost(message, tag = "1")]
        Writer(super::WriterNode),
        #[prost(message, tag = "2")]
        Reader(super::ReaderNode),
        #[prost(message, tag = "3")]
        Copy(super::CopyNode),
    }
}

impl QuiverCodec {
    fn decode_reader(&self, r: ReaderNode, ctx: &TaskContext, converter: &dyn PhysicalProtoConverterExtension) -> Result<Arc<dyn ExecutionPlan>> {
        let Some(source) = &self.source else {
            return plan_err!("a Stage reader arrived where no Stage outputs can be read");
        };
        let schema = r.schema.as_ref().ok_or_else(|| DataFusionError::Plan("Stage reader without a schema".into()))?;
        let schema = Arc::new(Schema::try_from(schema)?);
        let exchange = match r.shuffle_partitions {
            0 => Exchange::Gather,
            partitions => Exchange::Shuffle { partitions: partitions as usize },
        };
        let tasks = r.tasks as usize;
        let decode = PhysicalPlanDecodeContext::new(ctx, self);
        let partitioning = parse_protobuf_partitioning(r.partitioning.as_ref(), &decode, &schema, converter)?
            .unwrap_or(Partitioning::UnknownPartitioning(StageReaderExec::partitions(exchange, tasks)));
        if partitioning.partition_count() != StageReaderExec::partitions(exchange, tasks) {
            return plan_err!("Stage reader of {tasks} Task(s) with {} partitions", partitioning.partition_count());
        }
        let orderings = r
            .orderings
            .iter()
            .map(|o| parse_physical_sort_exprs(&o.exprs, &decode, &schema, converter))
            .collect::<Result<Vec<_>>>()?;
        let mut equivalence = EquivalenceProperties::new_with_orderings(Arc::clone(&schema), orderings);
        for class in &r.classes {
            let exprs = parse_physical_exprs(&class.exprs, &decode, &schema, converter)?;
            for other in exprs.iter().skip(1) {
                equivalence.add_equal_conditions(Arc::clone(&exprs[0]), Arc::clone(other))?;
            }
        }
        let constants = r.constants.iter().map(|c| decode_constant(c, &decode, &schema, converter)).collect::<Result<Vec<_>>>()?;
        equivalence.add_constants(constants)?;
        Ok(Arc::new(StageReaderExec::with_properties(r.stage as usize, tasks, exchange, equivalence, partitioning, Arc::clone(source))))
    }

    fn encode_reader(&self, reader: &StageReaderExec, converter: &dyn PhysicalProtoConverterExtension) -> Result<ReaderNode> {
        let shuffle_partitions = match reader.exchange() {
            Exchange::Gather => 0,
            Exchange::Shuffle { partitions } => partitions as u32,
        };
        let equivalence = &reader.properties().eq_properties;
        let orderings = equivalence
            .oeq_class()
            .iter()
            .map(|o| Ok(SortExprList { exprs: serialize_physical_sort_exprs(o.iter().cloned(), self, converter)? }))
            .collect::<Result<Vec<_>>>()?;
        let classes = equivalence
            .eq_group()
            .iter()
            .filter(|class| class.len() > 1)
            .map(|class| Ok(ExprList { exprs: serialize_physical_exprs(class.iter(), self, converter)? }))
            .collect::<Result<Vec<_>>>()?;
        let constants = equivalence.constants().iter().map(|c| encode_constant(c, self, converter)).collect::<Result<Vec<_>>>()?;
        Ok(ReaderNode {
            stage: reader.stage() as u32,
            tasks: reader.tasks() as u32,
            shuffle_partitions,
            schema: Some(reader.schema().as_ref().try_into()?),
            partitioning: Some(serialize_partitioning(reader.properties().output_partitioning(), self, converter)?),
            orderings,
            classes,
            constants,
        })
    }
}

fn encode_constant(c: &ConstExpr, codec: &QuiverCodec, converter: &dyn PhysicalProtoConverterExtension) -> Result<ConstantNode> {
    let (uniform, value) = match &c.across_partitions {
        AcrossPartitions::Heterogeneous => (false, None),
        AcrossPartitions::Uniform(value) => (true, value.as_ref().map(protobuf::ScalarValue::try_from).transpose()?),
    };
    Ok(ConstantNode { expr: Some(converter.physical_expr_to_proto(&c.expr, codec)?), uniform, value })
}

fn decode_constant(
    c: &ConstantNode,
    decode: &PhysicalPlanDecodeContext<'_>,
    schema: &Schema,
    converter: &dyn PhysicalProtoConverterExtension,
) -> Result<ConstExpr> {
    let expr = c.expr.as_ref().ok_or_else(|| DataFusionError::Plan("constant without an expression".into()))?;
    let expr = converter.proto_to_physical_expr(expr, schema, decode)?;
    let across = match (c.uniform, &c.value) {
        (false, _) => AcrossPartitions::Heterogeneous,
        (true, None) => AcrossPartitions::Uniform(None),
        (true, Some(value)) => AcrossPartitions::Uniform(Some(ScalarValue::try_from(value)?)),
    };
    Ok(ConstExpr::new(expr, across))
}

impl PhysicalExtensionCodec for QuiverCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let node = QuiverNode::decode(buf).map_err(|e| DataFusionError::Plan(format!("malformed Quiver plan node: {e}")))?;
        match (node.node, inputs) {
            (Some(quiver_node::Node::Writer(w)), [input]) => Ok(Arc::new(TaskWriterExec::new(
                Arc::clone(input),
                w.input_partition as usize,
                w.path.into(),
                w.row_group_rows as usize,
            )
            .with_not_null(w.not_null.iter().map(|&c| c as usize).collect()))),
            (Some(quiver_node::Node::Copy(c)), [sink]) => {
                Ok(Arc::new(CopyTaskExec::new(Arc::clone(sink), c.input_partition as usize, c.dir.into())))
            }
            (Some(quiver_node::Node::Reader(r)), []) => self.decode_reader(r, ctx, proto_converter),
            (other, _) => plan_err!("cannot decode Quiver plan node {other:?} with {} inputs", inputs.len()),
        }
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        let encoded = if let Some(writer) = node.downcast_ref::<TaskWriterExec>() {
            quiver_node::Node::Writer(WriterNode {
                path: writer.path().to_string_lossy().into_owned(),
                row_group_rows: writer.row_group_rows() as u64,
                input_partition: writer.input_partition() as u32,
                not_null: writer.not_null().iter().map(|&c| c as u32).collect(),
            })
        } else if let Some(copy) = node.downcast_ref::<CopyTaskExec>() {
            quiver_node::Node::Copy(CopyNode {
                dir: copy.dir().to_string_lossy().into_owned(),
                input_partition: copy.input_partition() as u32,
            })
        } else if let Some(reader) = node.downcast_ref::<StageReaderExec>() {
            quiver_node::Node::Reader(self.encode_reader(reader, proto_converter)?)
        } else {
            return plan_err!("{} cannot be sent to a worker", node.name());
        };
        QuiverNode { node: Some(encoded) }.encode(buf).map_err(|e| DataFusionError::Execution(format!("cannot encode a Quiver plan node: {e}")))
    }
}

/// Encodes a Task plan. Scalar subquery results the coordinator has computed travel as
/// literals: a worker has no subquery to read them from.
pub fn encode_plan(plan: Arc<dyn ExecutionPlan>) -> Result<Vec<u8>> {
    Ok(physical_plan_to_bytes_with_proto_converter(plan, &QuiverCodec::default(), &QuiverConversion::default())?.to_vec())
}

/// Encodes a Task plan, or answers None when it reads a scalar subquery value that is not
/// computed yet: such a plan is encoded once the value is known.
pub fn encode_plan_when_resolved(plan: Arc<dyn ExecutionPlan>) -> Result<Option<Vec<u8>>> {
    let converter = QuiverConversion::default();
    match physical_plan_to_bytes_with_proto_converter(plan, &QuiverCodec::default(), &converter) {
        _ if converter.unresolved.load(Ordering::Relaxed) => Ok(None),
        encoded => Ok(Some(encoded?.to_vec())),
    }
}

/// DataFusion's conversion, with two changes. Encoding: a resolved `ScalarSubqueryExpr` becomes
/// its value. Decoding: a function that takes a setting when it is built is rebuilt as the plan
/// declares it ([`as_planned`]).
#[derive(Default)]
struct QuiverConversion {
    /// It met a `ScalarSubqueryExpr` without a value (encoding then fails).
    unresolved: AtomicBool,
}

impl PhysicalProtoConverterExtension for QuiverConversion {
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
        let expr = self.default_proto_to_physical_expr(proto, input_schema, ctx)?;
        as_planned(expr, input_schema, ctx.task_ctx().session_config().options())
    }

    fn physical_expr_to_proto(
        &self,
        expr: &Arc<dyn PhysicalExpr>,
        codec: &dyn PhysicalExtensionCodec,
    ) -> Result<protobuf::PhysicalExprNode> {
        if expr.is::<ScalarSubqueryExpr>() {
            let empty = RecordBatch::new_empty(Arc::new(Schema::empty()));
            let value = expr.evaluate(&empty).inspect_err(|_| self.unresolved.store(true, Ordering::Relaxed));
            if let ColumnarValue::Scalar(value) = value? {
                let literal: Arc<dyn PhysicalExpr> = Arc::new(Literal::new(value));
                return serialize_physical_expr_with_converter(&literal, codec, self);
            }
        }
        serialize_physical_expr_with_converter(expr, codec, self)
    }
}

/// `expr`, with its function rebuilt under the time zone its declared return type names when
/// that function takes settings when built. `to_timestamp` and `now` take the time zone: the
/// coordinator's plan holds the instances its logical plan was made with (under the session's
/// zone, or the zone a view was defined under), and a worker's own instance would return another
/// type than the plan declares. All of DataFusion 55's such functions return
/// `Timestamp(_, zone)`, so the declared return type names the zone to rebuild with.
fn as_planned(expr: Arc<dyn PhysicalExpr>, input_schema: &Schema, options: &Arc<ConfigOptions>) -> Result<Arc<dyn PhysicalExpr>> {
    let Some(function) = expr.downcast_ref::<ScalarFunctionExpr>() else { return Ok(expr) };
    let declared = function.return_type();
    let DataType::Timestamp(_, zone) = declared else { return Ok(expr) };
    let arg_types = function.args().iter().map(|arg| arg.data_type(input_schema)).collect::<Result<Vec<_>>>()?;
    // Most functions that return timestamps (date_trunc, from_unixtime, …) already return
    // what the plan declares: nothing to rebuild.
    if function.fun().return_type(&arg_types).ok().as_ref() == Some(declared) {
        return Ok(expr);
    }
    let mut config = function.config_options().clone();
    config.execution.time_zone = zone.as_ref().map(|z| z.to_string());
    let Some(rebuilt) = function.fun().inner().with_updated_config(&config) else { return Ok(expr) };
    // A function whose zone is not the one it was built with: left as it is, to fail loudly
    // (DataFusion checks a function's result against its declared type).
    if rebuilt.return_type(&arg_types).ok().as_ref() != Some(declared) {
        return Ok(expr);
    }
    let (name, args) = (function.name().to_string(), function.args().to_vec());
    let field = function.return_field(input_schema)?;
    Ok(Arc::new(ScalarFunctionExpr::new(&name, Arc::new(rebuilt), args, field, Arc::clone(options))))
}

/// Decodes a Task plan; its Stage readers read through `source`.
///
/// DataFusion's plan decoding panics on some malformed input (an index out of range, a plan
/// kind this build leaves out); the bytes come from the network, so a panic becomes an error
/// here instead of taking a Task's thread down.
pub fn decode_plan(bytes: &[u8], ctx: &TaskContext, source: Option<Arc<dyn StageSource>>) -> Result<Arc<dyn ExecutionPlan>> {
    let decode =
        std::panic::AssertUnwindSafe(|| physical_plan_from_bytes_with_proto_converter(bytes, ctx, &QuiverCodec { source }, &QuiverConversion::default()));
    std::panic::catch_unwind(decode).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Err(crate::protocol::quiver_error(crate::protocol::ErrorKind::Plan, format!("malformed plan: decoding it failed: {why}")))
    })
}
