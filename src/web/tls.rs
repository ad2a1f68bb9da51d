//! HTTPS for the web server: a listener that completes each TLS handshake in a task of its own
//! (bounded by [`TLS_HANDSHAKE_TIMEOUT_MS`]), so that a client that opens a connection and
//! stays silent delays nobody else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use datafusion::common::{DataFusionError, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::auth::TlsIdentity;
use crate::transport::install_crypto_provider;

/// How long a client has to complete its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Connections whose handshake is done but that the server has not taken yet.
const ACCEPTED_QUEUE_MAX: usize = 64;
/// TLS handshakes in progress at once; beyond it new connections wait to be accepted.
const HANDSHAKES_MAX: usize = 256;
/// Pause after a failed accept (out of file descriptors, say) before trying again.
const ACCEPT_RETRY_MS: u64 = 50;

/// Accepts TLS connections for `axum::serve`.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

impl TlsListener {
    pub fn new(listener: TcpListener, identity: &TlsIdentity) -> Result<Self> {
        let addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(server_config(identity)?));
        let (send, accepted) = mpsc::channel(ACCEPTED_QUEUE_MAX);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
        let acceptor_task = tokio::spawn(async move {
            loop {
                let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else { return };
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::debug!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                        continue;
                    }
                };
                let (acceptor, send) = (acceptor.clone(), send.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let handshake = tokio::time::timeout(Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS), acceptor.accept(tcp));
                    match handshake.await {
                        Ok(Ok(tls)) => {
                            let _ = send.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { accepted, addr, acceptor_task })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The acceptor task ended: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

fn server_config(identity: &TlsIdentity) -> Result<ServerConfig> {
    install_crypto_provider();
    let bad = |what: String| DataFusionError::Configuration(format!("TLS: {what}"));
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut identity.cert_pem.as_slice())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(format!("cannot read the certificate: {e}")))?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut identity.key_pem.as_slice())
        .map_err(|e| bad(format!("cannot read the private key: {e}")))?
        .ok_or_else(|| bad("the key file holds no private key".into()))?;
    ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).map_err(|e| bad(e.to_string()))
}
