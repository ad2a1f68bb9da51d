//! The coordinator's HTTP face, for people and monitoring: a JSON API over the cluster's state
//! (workers, queries, each query's Stage DAG and Task Attempts), a single-page web UI that draws
//! it, and Prometheus `/metrics`. It only reads `Cluster`; nothing in the engine depends on it, so
//! a coordinator runs the same with or without it.
//!
//! Routes: `/` (the UI; `#/queries/<id>` in the URL fragment shows one query), `/assets/<file>`,
//! `/api/workers`, `/api/queries[?limit=N]`, `/api/queries/<id>`, `/metrics`. Every error is a
//! JSON object `{"error": "..."}` with its HTTP status. A coordinator with users asks for the
//! same credentials here as on its Flight SQL port (`access`); with a certificate it speaks
//! HTTPS (`tls`).

mod access;
mod api;
mod tls;
mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use datafusion::common::{DataFusionError, Result};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::auth::{Authenticator, TlsIdentity};
use crate::config::WEB_SHUTDOWN_WAIT_MS;
use crate::coordinator::Cluster;

/// The HTTP server, running until `shutdown` (or until dropped, which stops it the same way but
/// without waiting).
pub struct WebServer {
    addr: SocketAddr,
    scheme: &'static str,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl WebServer {
    /// Listens on `addr` and serves there.
    pub async fn bind(cluster: Arc<Cluster>, auth: Arc<Authenticator>, addr: SocketAddr, options: WebOptions) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| DataFusionError::Execution(format!("cannot listen for HTTP on {addr}: {e}")))?;
        Self::start(cluster, auth, listener, options)
    }

    /// Serves the API, the UI and the metrics of `cluster` on `listener`, to the callers
    /// `auth` admits.
    pub fn start(cluster: Arc<Cluster>, auth: Arc<Authenticator>, listener: TcpListener, options: WebOptions) -> Result<Self> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = async {
            let _ = stopped.await;
        };
        let app = router(cluster, access::Gate { auth, metrics_open: options.metrics_open });
        let (scheme, task) = match &options.tls {
            Some(identity) => {
                let serve = axum::serve(tls::TlsListener::new(listener, identity)?, app).with_graceful_shutdown(stopped);
                ("https", tokio::spawn(async move { report(addr, serve.await) }))
            }
            None => {
                let serve = axum::serve(listener, app).with_graceful_shutdown(stopped);
                ("http", tokio::spawn(async move { report(addr, serve.await) }))
            }
        };
        tracing::info!(%addr, scheme, "web UI and API listening");
        Ok(Self { addr, scheme, stop, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The UI's address, e.g. `http://127.0.0.1:8080/`.
    pub fn url(&self) -> String {
        format!("{}://{}/", self.scheme, self.addr)
    }

    /// Stops accepting, lets requests in flight finish for up to [`WEB_SHUTDOWN_WAIT_MS`], then
    /// drops whatever is left (a browser may hold an idle connection open).
    pub async fn shutdown(self) {
        let Self { stop, mut task, .. } = self;
        let _ = stop.send(());
        if tokio::time::timeout(Duration::from_millis(WEB_SHUTDOWN_WAIT_MS), &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// How the web server admits requests.
#[derive(Clone, Default)]
pub struct WebOptions {
    /// Serve `/metrics` without credentials (for a Prometheus that has none).
    pub metrics_open: bool,
    /// Speak HTTPS with this certificate.
    pub tls: Option<TlsIdentity>,
}

fn report(addr: SocketAddr, served: std::io::Result<()>) {
    if let Err(e) = served {
        tracing::error!(%addr, "web server stopped: {e}");
    }
}

/// Liveness and readiness probes (Kubernetes, load balancers): open to anyone, and they say
/// nothing but "ok". The web server starts once the coordinator serves (catalog restored,
/// Flight SQL port bound), so both answer 200 as soon as it answers at all.
pub const HEALTH_PATH: &str = "/healthz";
pub const READY_PATH: &str = "/readyz";

fn router(cluster: Arc<Cluster>, gate: access::Gate) -> Router {
    Router::new()
        .route("/", get(ui::index))
        .route("/assets/{file}", get(ui::asset))
        .route("/api/workers", get(api::workers))
        .route("/api/queries", get(api::queries))
        .route("/api/queries/{id}", get(api::query))
        .route("/metrics", get(api::metrics))
        .route(HEALTH_PATH, get(api::healthz))
        .route(READY_PATH, get(api::readyz))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(cluster)
        .layer(axum::middleware::from_fn_with_state(gate, access::require_caller))
}
