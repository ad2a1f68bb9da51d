//! Who may read the HTTP port: the same users and tokens as the Flight SQL port. A request
//! carries `Authorization: Bearer <token>` (a token from `quiver token create`) or HTTP Basic,
//! which browsers send after asking for a user and password (the 401 answer names the
//! realm); a verified pair is remembered for a minute, so that every request of the UI does not
//! pay for a slow hash. `/metrics` is open only with `--metrics-unauthenticated`; the probes
//! `/healthz` and `/readyz` are open, and say nothing but "ok".

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::api::ApiError;
use crate::auth::{presented, Authenticator, Caller, Presented, Refused};

/// What the HTTP guard checks requests against.
#[derive(Clone)]
pub struct Gate {
    pub auth: Arc<Authenticator>,
    /// Prometheus may scrape `/metrics` without credentials.
    pub metrics_open: bool,
}

/// Lets a request through when its caller may read the cluster's state.
/// The handlers find the caller in the request's extensions.
pub async fn require_caller(State(gate): State<Gate>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let probe = path == super::HEALTH_PATH || path == super::READY_PATH;
    if gate.auth.is_open() || probe || (gate.metrics_open && path == "/metrics") {
        request.extensions_mut().insert(Caller::open());
        return next.run(request).await;
    }
    let header = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
    match caller(&gate.auth, header).await {
        Ok(caller) if caller.may_query() => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Ok(caller) => ApiError::new(StatusCode::FORBIDDEN, format!("'{}' may not read this", caller.name)).into_response(),
        Err(Refused(why)) => {
            let mut response = ApiError::new(StatusCode::UNAUTHORIZED, why).into_response();
            let challenge = HeaderValue::from_static("Basic realm=\"quiver\", charset=\"UTF-8\"");
            response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
            response
        }
    }
}

async fn caller(auth: &Arc<Authenticator>, header: Option<Vec<u8>>) -> Result<Caller, Refused> {
    if let Ok(caller) = auth.authenticate(header.as_deref()) {
        return Ok(caller);
    }
    match presented(header.as_deref())? {
        // Not verified recently: check the password, off the async threads.
        Presented::Basic { user, password } => auth.login_async(user, password).await.map(|(caller, _)| caller),
        _ => auth.authenticate(header.as_deref()),
    }
}
