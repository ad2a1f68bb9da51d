//! `quiver local`: a coordinator and N workers in one process, talking over real loopback gRPC.
//! Tests and benchmarks use it too, so that what they measure is the network path users run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use datafusion::common::{DataFusionError, Result};
use tokio::net::TcpListener;

use std::sync::Arc;

use crate::auth::{AllowedPaths, Authenticator, ClusterKey, Credentials, UserStore};
use crate::config::{CoordinatorConfig, WorkerConfig};
use crate::transport::{ClientSecurity, NodeSecurity, ServerSecurity};
use crate::coordinator::Coordinator;
use crate::web::{WebOptions, WebServer};
use crate::worker::Worker;

/// How long `start` waits for every worker to register.
const REGISTRATION_WAIT_MS: u64 = 10_000;

#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub workers: usize,
    pub worker: WorkerConfig,
    pub coordinator: CoordinatorConfig,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Where the web UI, JSON API and metrics listen; none without it.
    pub http: Option<SocketAddr>,
}

pub struct LocalCluster {
    pub coordinator: Coordinator,
    /// Workers by index; `None` once killed or stopped.
    pub workers: Vec<Option<Worker>>,
    worker_config: WorkerConfig,
    web: Option<WebServer>,
    /// The cluster secret of this process's cluster: made up at start, never written down,
    /// so that nothing outside the process can join it or read its Task outputs.
    key: ClusterKey,
}

impl LocalCluster {
    pub async fn start(opts: LocalOptions) -> Result<Self> {
        let listener = TcpListener::bind(opts.listen).await.map_err(|e| {
            DataFusionError::Execution(format!("cannot listen on {}: {e}", opts.listen))
        })?;
        let key = ClusterKey::random();
        std::fs::create_dir_all(&opts.data_dir)?;
        let users = UserStore::open(&opts.data_dir)?;
        let users = users.has_users().then(|| Arc::new(users));
        let mut config = opts.coordinator;
        // With users the cluster is closed, and tables keep to the data directory unless told
        // otherwise (as `quiver coordinator` does).
        if users.is_some() && !config.allowed_paths.restricts() {
            config.allowed_paths = AllowedPaths::under(&[opts.data_dir.clone()]);
        }
        let coordinator = Coordinator::start(config, &opts.data_dir, listener, node_security(&key, users)).await?;
        let web = match opts.http {
            Some(addr) => Some(WebServer::bind(Arc::clone(&coordinator.core.cluster), Arc::clone(&coordinator.core.auth), addr, WebOptions::default()).await?),
            None => None,
        };
        let mut cluster = Self { coordinator, workers: vec![], worker_config: opts.worker, web, key };
        for _ in 0..opts.workers {
            cluster.add_worker().await?;
        }
        cluster.wait_for_workers(opts.workers).await?;
        Ok(cluster)
    }

    pub fn url(&self) -> String {
        self.coordinator.url()
    }

    /// What a process must present to act as a member of this cluster (a worker of its own).
    pub fn member_security(&self, name: &str) -> ClientSecurity {
        ClientSecurity { credentials: Credentials::Node { key: self.key.clone(), name: name.to_string() }, tls_ca: None }
    }

    /// The address the web server listens on, when it was started.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.web.as_ref().map(WebServer::addr)
    }

    /// Starts one more worker on an ephemeral loopback port.
    pub async fn add_worker(&mut self) -> Result<usize> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let worker = Worker::start(self.worker_config.clone(), &self.url(), listener, node_security(&self.key, None)).await?;
        self.workers.push(Some(worker));
        Ok(self.workers.len() - 1)
    }

    /// Waits until `n` workers are registered and alive.
    pub async fn wait_for_workers(&self, n: usize) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_millis(REGISTRATION_WAIT_MS);
        loop {
            let alive = self.coordinator.core.cluster.workers().iter().filter(|w| w.alive).count();
            if alive >= n {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(DataFusionError::Execution(format!("only {alive} of {n} workers registered")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills worker `i` as a crash would.
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(worker) = self.workers.get_mut(i).and_then(Option::take) {
            worker.kill();
        }
    }

    pub async fn shutdown(self) {
        if let Some(web) = self.web {
            web.shutdown().await;
        }
        for worker in self.workers.into_iter().flatten() {
            worker.shutdown().await;
        }
        self.coordinator.shutdown().await;
    }
}

/// A member of a cluster in one process: node tokens signed with `key`, no TLS (loopback).
fn node_security(key: &ClusterKey, users: Option<Arc<UserStore>>) -> NodeSecurity {
    NodeSecurity {
        server: ServerSecurity { auth: Arc::new(Authenticator::new(users, Some(key.clone()))), tls: None },
        client: ClientSecurity { credentials: Credentials::Node { key: key.clone(), name: String::new() }, tls_ca: None },
    }
}
