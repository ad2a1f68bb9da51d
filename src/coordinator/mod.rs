//! The Coordinator: owns the catalog, plans every Query once with DataFusion, cuts it into
//! Stages and Tasks, hands Tasks to Workers as they poll with free slots, runs the final Stage
//! and streams the result to the client.

mod access;
mod attempts;
mod catalog;
mod cluster;
mod copy;
mod explain;
mod granularity;
mod layout;
mod metrics;
mod policy;
mod registry;
mod retired;
mod session;
mod snapshot;
mod source;
mod statements;
mod stores;
mod store_writes;
mod subquery;
mod system_tables;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::SessionContext;
use prost::Message;
use tokio::net::TcpListener;

pub use attempts::{Cause, StartedAs};
pub use cluster::{Beat, Cluster, QueryRecord, StageMetrics, TaskRecord, WorkerRecord};
pub use cluster::QueryDetail;
pub use metrics::METRICS_CONTENT_TYPE;

use crate::config::{session_config, CoordinatorConfig, HEARTBEAT_INTERVAL_MS, HELD_QUERIES_REPORTED_MAX, LIST_FILES_CACHE_TTL_MS, SPECULATION_CHECK_INTERVAL_MS, STOP_ATTEMPTS_WAIT_MS};
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use crate::protocol::{
    build_version, error_text, quiver_error, ErrorKind, action, Empty, Heartbeat, HeartbeatResponse, PollTask, PollTaskResponse, QueryProgressRequest, RegisterWorker,
    RegisterWorkerResponse, ReleaseQuery, TaskReport,
};
use crate::auth::{Authenticator, Caller};
use crate::transport::{
    refuses_connections, call, serve_sql, worker_peer, Cancelled, ClientSecurity, NodeSecurity, Prepared, ServerHandle, SqlHandler, Started,
    TableEntry,
};

/// Everything a running coordinator holds.
pub struct Core {
    pub config: CoordinatorConfig,
    pub ctx: SessionContext,
    pub cluster: Arc<Cluster>,
    catalog: catalog::Catalog,
    /// Serialises catalog changes (DDL and writes) so that each one commits whole.
    catalog_lock: tokio::sync::Mutex<()>,
    /// Statements Flight SQL clients have started or prepared.
    statements: Arc<statements::Statements>,
    /// Who may call: the same checks on the Flight SQL port and the HTTP port.
    pub auth: Arc<Authenticator>,
    /// The object stores tables live in.
    stores: stores::Stores,
    /// Files out of the catalog that running Queries may still read.
    retired: retired::Retired,
}

impl Core {
    /// Records a Query's end and frees its outputs on the workers that hold them.
    fn finish(&self, id: &str, rows: u64, error: Option<&DataFusionError>, cancelled: bool) {
        for release in self.end_query(id, rows, error, cancelled) {
            tokio::spawn(release);
        }
    }

    /// As [`Core::finish`] for a failed Query, returning once every worker it ran on has
    /// stopped its Attempts (or did not answer within the control call timeout): what those
    /// Attempts were writing can be removed without an Attempt writing on behind it.
    async fn fail_and_stop(&self, id: &str, error: &DataFusionError) {
        futures::future::join_all(self.end_query(id, 0, Some(error), false)).await;
    }

    /// Runs `remove`, which removes files statement `id` (a DROP or REPLACE) took out of the
    /// catalog, once every other Query running now has ended: any of them may have planned
    /// over those files.
    fn retire(&self, id: &str, remove: impl FnOnce() + Send + 'static) {
        let others = || {
            let mut running = self.cluster.running_query_ids();
            running.remove(id);
            running
        };
        self.retired.remove_after(others, remove);
    }

    /// Records a Query's end; returns the calls that release it on its workers.
    fn end_query(
        &self,
        id: &str,
        rows: u64,
        error: Option<&DataFusionError>,
        cancelled: bool,
    ) -> Vec<impl std::future::Future<Output = ()> + Send + 'static> {
        let Some(workers) = self.cluster.finish_query(id, rows, error, cancelled) else { return vec![] };
        self.retired.query_ended(id);
        if let Some(q) = self.cluster.query(id) {
            let (duration_ms, tasks, state) = (q.duration_ms, q.tasks, q.state);
            match error {
                Some(e) => tracing::warn!(query = %id, state, duration_ms, rows, tasks, "query ended: {e}"),
                None => tracing::info!(query = %id, state, duration_ms, rows, tasks, "query ended"),
            }
        }
        self.release_calls(id, workers)
    }

    /// Stops every Attempt of a Query that is still running, returning once each worker that ran
    /// one has stopped them (or after `STOP_ATTEMPTS_WAIT_MS`: a worker that does not answer
    /// must not hold a commit, and the catalog lock with it, for long). A write that succeeded
    /// calls this before it commits: an Attempt that lost its Task to another (a speculative
    /// race) may still be writing into the staging directory.
    async fn stop_attempts(&self, id: &str) {
        let calls = futures::future::join_all(self.release_calls(id, self.cluster.query_worker_urls(id)));
        if tokio::time::timeout(Duration::from_millis(STOP_ATTEMPTS_WAIT_MS), calls).await.is_err() {
            tracing::warn!(query = %id, "a worker did not confirm within {STOP_ATTEMPTS_WAIT_MS} ms that the query's attempts stopped");
        }
    }

    /// The calls that release a Query on `workers`: stop its Attempts and free its outputs.
    fn release_calls(&self, id: &str, workers: Vec<String>) -> Vec<impl std::future::Future<Output = ()> + Send + 'static> {
        let release = ReleaseQuery { query_id: id.to_string() };
        let release_on = |url: String| {
            let release = release.clone();
            let security = self.cluster.security().clone();
            async move {
                if let Ok(peer) = worker_peer(&url, &security).await {
                    if let Err(e) = call::<_, Empty>(&peer, action::RELEASE_QUERY, &release).await {
                        tracing::debug!(%url, "release of {} failed: {e}", release.query_id);
                    }
                }
            }
        };
        workers.into_iter().map(release_on).collect()
    }
}

/// A coordinator serving on a socket.
pub struct Coordinator {
    pub core: Arc<Core>,
    server: ServerHandle,
    monitor: tokio::task::JoinHandle<()>,
}

impl Coordinator {
    /// Opens the catalog under `data_dir`, restores its tables and serves on `listener`,
    /// admitting callers as `security` says.
    pub async fn start(config: CoordinatorConfig, data_dir: &Path, listener: TcpListener, security: NodeSecurity) -> Result<Self> {
        let security = security.named("coordinator");
        std::fs::create_dir_all(data_dir)?;
        let data_dir: PathBuf = std::fs::canonicalize(data_dir)?;
        let mut session = session_config(config.target_partitions);
        // Quiver cuts files into Task slices itself; whole files keep that cut exact.
        session.options_mut().optimizer.repartition_file_scans = false;
        // `SELECT … FROM 'path/to/file.parquet'` reads files directly, as in datafusion-cli;
        // not where paths are restricted: planning opens the file (its header, its schema)
        // before any check could see the plan.
        // A table's file listing is cached (object stores list slowly) for at most
        // LIST_FILES_CACHE_TTL_MS; `REFRESH TABLE t` drops it at once.
        let caches = CacheManagerConfig::default().with_list_files_cache_ttl(Some(Duration::from_millis(LIST_FILES_CACHE_TTL_MS)));
        let runtime = RuntimeEnvBuilder::new().with_cache_manager(caches).build_arc()?;
        let ctx = SessionContext::new_with_config_rt(session, runtime);
        let ctx = if config.allowed_paths.restricts() { ctx } else { ctx.enable_url_table() };
        let cluster = Arc::new(
            Cluster::new(config.fair_share).with_poll_tasks_max(config.poll_tasks_max).with_security(security.client.clone()),
        );
        system_tables::register(&ctx, &cluster)?;
        let catalog = catalog::Catalog::new(&data_dir);
        let stores = stores::Stores::new(config.store_defaults.clone());
        open_warehouse(&ctx, &stores, config.warehouse.as_deref())?;
        restore_catalog(&ctx, &catalog, &stores).await?;
        let core = Arc::new(Core {
            config,
            ctx,
            cluster: Arc::clone(&cluster),
            catalog,
            catalog_lock: tokio::sync::Mutex::new(()),
            statements: Arc::default(),
            auth: Arc::clone(&security.server.auth),
            stores,
            retired: retired::Retired::default(),
        });
        let server = serve_sql(Arc::new(Service(Arc::clone(&core))), listener, &security.server)?;
        let statements = Arc::clone(&core.statements);
        let monitor = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(SPECULATION_CHECK_INTERVAL_MS));
            let checks_per_heartbeat = (HEARTBEAT_INTERVAL_MS / SPECULATION_CHECK_INTERVAL_MS).max(1);
            for n in 0u64.. {
                tick.tick().await;
                cluster.speculate();
                if n % checks_per_heartbeat == 0 {
                    cluster.detect_lost_workers();
                    probe_suspects(&cluster);
                    statements.expire();
                }
            }
        });
        tracing::info!(addr = %server.addr, data_dir = %data_dir.display(), "coordinator listening");
        Ok(Self { core, server, monitor })
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub async fn shutdown(self) {
        self.monitor.abort();
        self.server.shutdown().await;
    }
}

/// Workers whose heartbeat is overdue, or whose connection dropped a poll half-way, may have
/// died: one whose port refuses connections has, and is declared lost at once instead of after
/// `WORKER_TIMEOUT_MS` without heartbeats (a worker cut off the network, whose port cannot be
/// reached at all, still waits for the timeout).
fn probe_suspects(cluster: &Arc<Cluster>) {
    for (id, url) in cluster.take_suspects() {
        let cluster = Arc::clone(cluster);
        tokio::spawn(async move {
            if refuses_connections(&url).await {
                cluster.worker_gone(&id, "its port refuses connections");
            }
        });
    }
}

/// Opens the store tables are written to; a warehouse that is not in a store is refused (the
/// data directory is where local tables live).
fn open_warehouse(ctx: &SessionContext, stores: &stores::Stores, warehouse: Option<&str>) -> Result<()> {
    let Some(warehouse) = warehouse else { return Ok(()) };
    if crate::storage::object_location(warehouse).is_none() {
        return Err(DataFusionError::Configuration(format!(
            "--warehouse '{warehouse}' is not an object store URL (s3://, gs://, az://); tables Quiver writes locally go under --data-dir"
        )));
    }
    stores.open_location(ctx, warehouse).map_err(|e| DataFusionError::Configuration(format!("--warehouse '{warehouse}': {e}")))?;
    // Said at start, not at the first write: a warehouse this coordinator cannot read (a wrong
    // key, a missing bucket). The store may only be down for now, so the coordinator starts.
    let (ctx, warehouse) = (ctx.clone(), warehouse.to_string());
    tokio::spawn(async move {
        if let Err(e) = store_writes::probe(&ctx, &warehouse).await {
            let hint = crate::storage::credentials_hint(&e.to_string());
            tracing::error!("the warehouse '{warehouse}' cannot be read, so writes to its tables will fail: {e}{hint}");
        }
    });
    Ok(())
}

async fn restore_catalog(ctx: &SessionContext, catalog: &catalog::Catalog, stores: &stores::Stores) -> Result<()> {
    // Tables first; then the views, each after the views it reads.
    for def in catalog.load()?.into_iter().filter(|d| !matches!(d, catalog::TableDef::View { .. })) {
        if let Err(e) = catalog.register(ctx, stores, &def).await {
            tracing::error!(table = def.name(), "cannot restore table: {e}");
        }
    }
    catalog.replan_views(ctx).await;
    Ok(())
}

/// A worker must be reachable at the address it advertises: by the coordinator (to probe it and
/// free its outputs) and by the other workers (to read them). The coordinator dials it before
/// accepting it, so that a wrong address is said at registration instead of failing Queries.
async fn check_advertised(url: &str, security: &ClientSecurity) -> Result<()> {
    match worker_peer(url, security).await {
        Ok(_) => Ok(()),
        Err(e) => Err(quiver_error(
            ErrorKind::Configuration,
            format!(
                "the coordinator cannot reach this worker at {url}, the address it advertises ({}); start it with \
                 --advertise HOST:PORT, an address the coordinator and the other workers can reach",
                error_text(&e)
            ),
        )),
    }
}

/// Refuses a worker of another build: it would decode this coordinator's Task plans wrongly
/// or not at all, and fail (or worse, misread) every Task it took.
fn check_build(r: &RegisterWorker) -> Result<()> {
    let ours = build_version();
    if r.version == ours {
        return Ok(());
    }
    let theirs = if r.version.is_empty() { "a build that does not say its version" } else { r.version.as_str() };
    Err(quiver_error(
        ErrorKind::Configuration,
        format!("the worker at {} runs {theirs}, this coordinator {ours}: run the same build on every node", r.address),
    ))
}

fn decode<M: Message + Default>(body: &Bytes) -> Result<M> {
    M::decode(body.clone()).map_err(|e| quiver_error(ErrorKind::Plan, format!("malformed message: {e}")))
}

/// The coordinator's Flight SQL service: client statements and the worker control plane.
struct Service(Arc<Core>);

#[async_trait::async_trait]
impl SqlHandler for Service {
    async fn start(&self, caller: &Caller, sql: &str) -> Result<Started> {
        self.0.statements.start(&self.0, caller, sql, None).await
    }

    async fn start_prepared(&self, caller: &Caller, handle: &str) -> Result<Started> {
        self.0.statements.start_prepared(&self.0, caller, handle).await
    }

    fn take_result(&self, caller: &Caller, handle: &str) -> Option<SendableRecordBatchStream> {
        self.0.statements.take_result(caller, handle)
    }

    fn cancel(&self, caller: &Caller, handle: &str) -> Cancelled {
        self.0.statements.cancel(&self.0, caller, handle)
    }

    async fn prepare(&self, caller: &Caller, sql: &str) -> Result<Prepared> {
        self.0.statements.prepare(&self.0, caller, sql).await
    }

    fn bind(&self, caller: &Caller, handle: &str, parameters: RecordBatch) -> Result<()> {
        self.0.statements.bind(caller, handle, parameters)
    }

    fn close_prepared(&self, caller: &Caller, handle: &str) {
        self.0.statements.close_prepared(caller, handle)
    }

    async fn tables(&self, caller: &Caller) -> Result<Vec<TableEntry>> {
        if !caller.may_query() {
            return Err(quiver_error(ErrorKind::Denied, format!("'{}' may not list tables", caller.name)));
        }
        statements::tables(&self.0).await
    }

    async fn do_action(&self, caller: &Caller, name: &str, body: Bytes) -> Result<Bytes> {
        let core = &self.0;
        if name != action::QUERY_PROGRESS && !caller.is_node() {
            return Err(quiver_error(
                ErrorKind::Denied,
                format!("'{}' is not a member of this cluster: action '{name}' is for workers", caller.name),
            ));
        }
        let reply = match name {
            action::REGISTER_WORKER => {
                let r: RegisterWorker = decode(&body)?;
                check_build(&r)?;
                check_advertised(&r.address, self.0.cluster.security()).await?;
                let (worker_id, session) = core.cluster.register_worker(r.address, r.slots, r.express_slots, r.memory_limit_bytes);
                RegisterWorkerResponse { worker_id, session }.encode_to_vec()
            }
            action::HEARTBEAT => {
                let h: Heartbeat = decode(&body)?;
                let beat = Beat {
                    running_tasks: h.running_tasks,
                    memory_used_bytes: h.memory_used_bytes,
                    unreachable_peers: h.unreachable_peers,
                    busy_ms: h.busy_ms,
                    stalled_ms: h.stalled_ms,
                };
                let held_queries = &h.held_queries[..h.held_queries.len().min(HELD_QUERIES_REPORTED_MAX)];
                match core.cluster.heartbeat(&h.worker_id, h.session, beat, &h.tasks, held_queries) {
                    Some(reply) => HeartbeatResponse { known: true, peers: reply.peers, ended_queries: reply.ended_queries },
                    None => HeartbeatResponse { known: false, ..Default::default() },
                }
                .encode_to_vec()
            }
            action::POLL_TASK => {
                let p: PollTask = decode(&body)?;
                match core.cluster.poll(&p.worker_id, p.session, p.max_tasks, p.express_tasks).await {
                    Ok(tasks) => {
                        let mut tasks = tasks.into_iter();
                        PollTaskResponse { task: tasks.next(), known: true, more: tasks.collect() }
                    }
                    Err(()) => PollTaskResponse { task: None, known: false, more: Vec::new() },
                }
                .encode_to_vec()
            }
            action::REPORT_TASK => {
                core.cluster.report(decode::<TaskReport>(&body)?);
                Empty {}.encode_to_vec()
            }
            action::QUERY_PROGRESS => {
                let r: QueryProgressRequest = decode(&body)?;
                let may = core.cluster.query(&r.query_id).is_some_and(|q| caller.owns(&q.user) || caller.sees_all_queries());
                let progress = core.cluster.progress(&r.query_id).filter(|_| may);
                progress.ok_or_else(|| quiver_error(ErrorKind::Plan, format!("unknown query '{}'", r.query_id)))?.encode_to_vec()
            }
            other => return Err(quiver_error(ErrorKind::Plan, format!("unknown action '{other}'"))),
        };
        Ok(reply.into())
    }
}
