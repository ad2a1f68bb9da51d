//! The guard in front of every gRPC service: it reads each request's `authorization` header,
//! asks the [`Authenticator`] who the caller is, and either refuses the request
//! (`UNAUTHENTICATED`) before any service code runs, or passes it on with the [`Caller`] in its
//! extensions, where the services read it ([`caller_of`]). Every method is covered, including
//! the ones a service does not implement. A `Handshake` is where a client logs in with a user
//! and password: the guard checks them (slowly, off the async threads) and hands the service
//! the session token to return ([`Issued`]).

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::{Request, Status};

use crate::auth::{presented, Authenticator, Caller, Presented, Refused};

/// The token a handshake issued, for the service to return to the client.
#[derive(Clone)]
pub struct Issued(pub String);

/// The caller the guard let in.
pub fn caller_of<T>(request: &Request<T>) -> Result<Caller, Status> {
    request.extensions().get::<Caller>().cloned().ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

/// Wraps a service in a [`Guard`].
#[derive(Clone)]
pub struct GuardLayer {
    pub auth: Arc<Authenticator>,
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard { inner, auth: Arc::clone(&self.auth) }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, B> tower::Service<http::Request<B>> for Guard<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The service that was polled ready serves this request; its clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = Arc::clone(&self.auth);
        let header = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
        let handshake = request.uri().path().ends_with("/Handshake");
        Box::pin(async move {
            let admitted = match handshake {
                true => login(auth, header).await,
                false => auth.authenticate(header.as_deref()).map(|caller| (caller, None)),
            };
            match admitted {
                Ok((caller, issued)) => {
                    request.extensions_mut().insert(caller);
                    if let Some(token) = issued {
                        request.extensions_mut().insert(Issued(token));
                    }
                    inner.call(request).await
                }
                Err(Refused(why)) => Ok(Status::unauthenticated(why).into_http()),
            }
        })
    }
}

/// A handshake: a user and password open a session (argon2 runs on a blocking thread, a few at
/// a time, so that a burst of logins cannot stall the server); a valid bearer token is returned
/// as it came.
async fn login(auth: Arc<Authenticator>, header: Option<Vec<u8>>) -> Result<(Caller, Option<String>), Refused> {
    match presented(header.as_deref())? {
        Presented::Basic { user, password } => {
            let (caller, token) = auth.login_async(user, password).await?;
            Ok((caller, Some(token)))
        }
        Presented::Bearer(token) => {
            let caller = auth.authenticate(header.as_deref())?;
            Ok((caller, Some(token)))
        }
        Presented::Nothing => auth.authenticate(None).map(|caller| (caller, None)),
    }
}
