//! The coordinator's HTTP face, for people and monitoring: a JSON API over the cluster's state
//! (workers, queries, each query's Stage DAG and Task Attempts), a single-page web UI that draws
//! it, and Prometheus `/metrics`. It only reads `Cluster`; nothing in the engine depends on it, so
//! a coordinator runs the same with or without it.
//!
//! Routes: `/` (the UI; `#/queries/<id>` in the URL fragment shows one query), `/assets/<file>`,
//! `/api/workers`, `/api/queries[?limit=N]`, `/api/queries/<id>`, `/metrics`. Every error is a
//! JSON object `{"error": "..."}` with its HTTP status.

mod api;
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

use crate::config::WEB_SHUTDOWN_WAIT_MS;
use crate::coordinator::Cluster;

/// The HTTP server, running until `shutdown` (or until dropped, which stops it the same way but
/// without waiting).
pub struct WebServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl WebServer {
    /// Listens on `addr` and serves there.
    pub async fn bind(cluster: Arc<Cluster>, addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| DataFusionError::Execution(format!("cannot listen for HTTP on {addr}: {e}")))?;
        Self::start(cluster, listener)
    }

    /// Serves the API, the UI and the metrics of `cluster` on `listener`.
    pub fn start(cluster: Arc<Cluster>, listener: TcpListener) -> Result<Self> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = axum::serve(listener, router(cluster)).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(%addr, "web server stopped: {e}");
            }
        });
        tracing::info!(%addr, "web UI and API listening");
        Ok(Self { addr, stop, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The UI's address, e.g. `http://127.0.0.1:8080/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
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

fn router(cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route("/", get(ui::index))
        .route("/assets/{file}", get(ui::asset))
        .route("/api/workers", get(api::workers))
        .route("/api/queries", get(api::queries))
        .route("/api/queries/{id}", get(api::query))
        .route("/metrics", get(api::metrics))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(cluster)
}
