//! `quiver.workers`, `quiver.queries`, `quiver.tasks`: the cluster's state as SQL tables, read
//! from the coordinator's memory at scan time.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use datafusion::arrow::array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray, UInt32Array, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{MemorySchemaProvider, Session, TableProvider};
use datafusion::common::Result;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;

use super::cluster::Cluster;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Workers,
    Queries,
    Tasks,
}

#[derive(Debug)]
struct SystemTable {
    kind: Kind,
    schema: SchemaRef,
    cluster: Arc<Cluster>,
}

pub fn register(ctx: &SessionContext, cluster: &Arc<Cluster>) -> Result<()> {
    let catalog = ctx.catalog("datafusion").expect("default catalog exists");
    catalog.register_schema("quiver", Arc::new(MemorySchemaProvider::new()))?;
    for (name, kind) in [("workers", Kind::Workers), ("queries", Kind::Queries), ("tasks", Kind::Tasks)] {
        let table = SystemTable { kind, schema: schema(kind), cluster: Arc::clone(cluster) };
        ctx.register_table(format!("quiver.{name}").as_str(), Arc::new(table))?;
    }
    Ok(())
}

fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn schema(kind: Kind) -> SchemaRef {
    let s = |n: &str| Field::new(n, DataType::Utf8, false);
    let sn = |n: &str| Field::new(n, DataType::Utf8, true);
    let u32f = |n: &str| Field::new(n, DataType::UInt32, false);
    let u64f = |n: &str| Field::new(n, DataType::UInt64, false);
    let u64n = |n: &str| Field::new(n, DataType::UInt64, true);
    let fields = match kind {
        Kind::Workers => vec![
            s("worker_id"), s("address"), u32f("slots"), s("state"), Field::new("alive", DataType::Boolean, false),
            Field::new("last_heartbeat", timestamp(), false), u32f("running_tasks"),
            u64f("memory_limit_bytes"), u64f("memory_used_bytes"), Field::new("pace", DataType::Float64, false),
            Field::new("stalled_pct", DataType::Float64, false), u32f("express_slots"), u32f("express_running"), sn("unreachable_peers"),
        ],
        Kind::Queries => vec![
            s("query_id"), s("sql"), s("state"), s("mode"), u32f("stages"), u32f("tasks"), u32f("workers_used"),
            u64f("rows"), u64f("bytes_shuffled"), u64f("bytes_gathered"), Field::new("started", timestamp(), false), u64f("duration_ms"), sn("error"),
            u32f("attempts_retried"), u32f("tasks_recomputed"), u32f("attempts_speculated"), u32f("speculation_wins"),
            u32f("partitions_coalesced"), u32f("partitions_split"), u32f("slices_cut"), s("user"),
        ],
        Kind::Tasks => vec![
            s("query_id"), u32f("stage"), u32f("task"), u32f("attempt"), sn("worker_id"), s("plan"), s("output"), s("state"),
            u64f("rows"), u64f("bytes"), u64f("elapsed_ms"), sn("error"), s("started_as"), sn("cause"), sn("reads"),
            sn("lane"), u64n("key_filter_rows_seen"), u64n("key_filter_rows_kept"),
            Field::new("started", timestamp(), true), Field::new("ended", timestamp(), true), Field::new("work", DataType::Float64, false),
        ],
    };
    Arc::new(Schema::new(fields))
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn strings<'a>(v: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(v))
}

fn opt_strings<'a>(v: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(StringArray::from_iter(v))
}

fn u32s(v: impl Iterator<Item = u32>) -> ArrayRef {
    Arc::new(UInt32Array::from_iter_values(v))
}

fn u64s(v: impl Iterator<Item = u64>) -> ArrayRef {
    Arc::new(UInt64Array::from_iter_values(v))
}

fn opt_u64s(v: impl Iterator<Item = Option<u64>>) -> ArrayRef {
    Arc::new(UInt64Array::from_iter(v))
}

fn stamps(v: impl Iterator<Item = SystemTime>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from_iter_values(v.map(millis)).with_timezone("UTC"))
}

fn opt_stamps(v: impl Iterator<Item = Option<SystemTime>>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from_iter(v.map(|t| t.map(millis))).with_timezone("UTC"))
}

impl SystemTable {
    fn batch(&self) -> Result<RecordBatch> {
        let columns = match self.kind {
            Kind::Workers => {
                let w = self.cluster.workers();
                let peer_lists: Vec<Option<String>> =
                    w.iter().map(|w| (!w.unreachable_peers.is_empty()).then(|| w.unreachable_peers.join(", "))).collect();
                vec![
                    strings(w.iter().map(|w| w.id.as_str())),
                    strings(w.iter().map(|w| w.url.as_str())),
                    u32s(w.iter().map(|w| w.slots)),
                    strings(w.iter().map(|w| if w.alive { "alive" } else { "lost" })),
                    Arc::new(BooleanArray::from_iter(w.iter().map(|w| Some(w.alive)))) as ArrayRef,
                    stamps(w.iter().map(|w| w.last_heartbeat)),
                    u32s(w.iter().map(|w| w.running_tasks)),
                    u64s(w.iter().map(|w| w.memory_limit_bytes)),
                    u64s(w.iter().map(|w| w.memory_used_bytes)),
                    Arc::new(Float64Array::from_iter_values(w.iter().map(|w| w.pace_now()))) as ArrayRef,
                    Arc::new(Float64Array::from_iter_values(w.iter().map(|w| w.stalled_pct()))) as ArrayRef,
                    u32s(w.iter().map(|w| w.express_slots)),
                    u32s(w.iter().map(|w| w.express_assigned)),
                    opt_strings(peer_lists.iter().map(|p| p.as_deref())),
                ]
            }
            Kind::Queries => {
                let mut q = self.cluster.queries();
                q.retain(|q| super::access::may_see(&q.user));
                vec![
                    strings(q.iter().map(|q| q.id.as_str())),
                    strings(q.iter().map(|q| q.sql.as_str())),
                    strings(q.iter().map(|q| q.state)),
                    strings(q.iter().map(|q| q.mode)),
                    u32s(q.iter().map(|q| q.stages)),
                    u32s(q.iter().map(|q| q.tasks)),
                    u32s(q.iter().map(|q| q.workers_used)),
                    u64s(q.iter().map(|q| q.rows)),
                    u64s(q.iter().map(|q| q.bytes_shuffled)),
                    u64s(q.iter().map(|q| q.bytes_gathered)),
                    stamps(q.iter().map(|q| q.started)),
                    u64s(q.iter().map(|q| q.duration_ms)),
                    opt_strings(q.iter().map(|q| q.error.as_deref())),
                    u32s(q.iter().map(|q| q.attempts_retried)),
                    u32s(q.iter().map(|q| q.tasks_recomputed)),
                    u32s(q.iter().map(|q| q.attempts_speculated)),
                    u32s(q.iter().map(|q| q.speculation_wins)),
                    u32s(q.iter().map(|q| q.partitions_coalesced)),
                    u32s(q.iter().map(|q| q.partitions_split)),
                    u32s(q.iter().map(|q| q.slices_cut)),
                    strings(q.iter().map(|q| q.user.as_str())),
                ]
            }
            Kind::Tasks => {
                let mut t = self.cluster.tasks();
                let visible: std::collections::HashSet<String> =
                    self.cluster.queries().into_iter().filter(|q| super::access::may_see(&q.user)).map(|q| q.id).collect();
                t.retain(|t| visible.contains(&t.key.query_id));
                vec![
                    strings(t.iter().map(|t| t.key.query_id.as_str())),
                    u32s(t.iter().map(|t| t.key.stage)),
                    u32s(t.iter().map(|t| t.key.task)),
                    u32s(t.iter().map(|t| t.key.attempt)),
                    opt_strings(t.iter().map(|t| t.worker_id.as_deref())),
                    strings(t.iter().map(|t| t.plan.as_str())),
                    strings(t.iter().map(|t| t.output)),
                    strings(t.iter().map(|t| t.state.as_str())),
                    u64s(t.iter().map(|t| t.rows)),
                    u64s(t.iter().map(|t| t.bytes)),
                    u64s(t.iter().map(|t| t.elapsed_ms)),
                    opt_strings(t.iter().map(|t| t.error.as_deref())),
                    strings(t.iter().map(|t| t.started_as.as_str())),
                    opt_strings(t.iter().map(|t| t.cause.map(|c| c.as_str()))),
                    opt_strings(t.iter().map(|t| t.reads.as_deref())),
                    opt_strings(t.iter().map(|t| t.lane)),
                    opt_u64s(t.iter().map(|t| t.key_filter_rows.map(|(seen, _)| seen))),
                    opt_u64s(t.iter().map(|t| t.key_filter_rows.map(|(_, kept)| kept))),
                    opt_stamps(t.iter().map(|t| t.started)),
                    opt_stamps(t.iter().map(|t| t.ended)),
                    Arc::new(Float64Array::from_iter_values(t.iter().map(|t| t.work))),
                ]
            }
        };
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }
}

#[async_trait::async_trait]
impl TableProvider for SystemTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batch = self.batch()?;
        Ok(MemorySourceConfig::try_new_exec(&[vec![batch]], self.schema(), projection.cloned())?)
    }
}
