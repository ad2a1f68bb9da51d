//! Who may do what: users and their passwords, client tokens, the cluster secret that lets
//! Coordinator and Workers recognise each other, and the [`Caller`] every request is made by.
//!
//! This module knows nothing of gRPC or HTTP: the transport and the web server hand it the
//! value of an `authorization` header and get a [`Caller`] or a refusal; the coordinator asks a
//! [`Caller`] what its role allows. Secrets are never stored in the clear: passwords as argon2
//! hashes, tokens as SHA-256 digests (they are random and long, so a fast hash suffices), and
//! the cluster secret only signs short-lived node tokens (HMAC-SHA-256). It depends on no other
//! module: `protocol` turns a [`Refused`] into a `DataFusionError` of kind `Denied`.

mod node;
mod paths;
mod users;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;

pub use node::{ClusterKey, NODE_TOKEN_TTL_MS};
pub use paths::AllowedPaths;
pub use users::{parse_duration, Role, TokenInfo, UserStore, AUTH_DIR};


/// How long a token that a handshake (a user's password) issued stays valid.
pub const SESSION_TOKEN_TTL_MS: u64 = 12 * 3_600_000;
/// Sessions (handshake tokens) the coordinator keeps at once; the oldest go first beyond it.
pub const SESSIONS_MAX: usize = 10_000;
/// How long a verified user/password pair is remembered, so that HTTP Basic on every request
/// does not cost a slow hash each time.
pub const BASIC_CACHE_TTL_MS: u64 = 60_000;
/// Longest `authorization` header looked at; anything longer is refused unread.
pub const AUTH_HEADER_BYTES_MAX: usize = 4 * 1024;
/// Password checks that may run at once. Each costs a slow hash on purpose, so a stranger
/// guessing passwords as fast as the network allows would otherwise take every core.
pub const LOGINS_CONCURRENT_MAX: usize = 2;
/// How long a login waits for its turn before it is refused.
pub const LOGIN_WAIT_MS: u64 = 5_000;
/// The name of a caller who presents nothing to a server without users; no user may take it.
pub const ANONYMOUS: &str = "anonymous";

/// Who makes a request, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// The caller of a server with no authentication: it may do anything.
    pub fn open() -> Self {
        Self { name: ANONYMOUS.into(), role: Role::Open }
    }

    /// May run SELECT, EXPLAIN and SHOW.
    pub fn may_query(&self) -> bool {
        matches!(self.role, Role::Reader | Role::Admin | Role::Open)
    }

    /// May change the catalog or the session, and write (CREATE, INSERT, DROP, COPY, SET).
    pub fn may_write(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Open)
    }

    /// May take part in the cluster: register, poll, report, fetch and release Task outputs.
    pub fn is_node(&self) -> bool {
        matches!(self.role, Role::Node | Role::Open)
    }

    /// May see and cancel Queries of other callers.
    pub fn sees_all_queries(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Open)
    }

    /// True when `owner` (the name a Query was started by) is this caller's, or it sees all.
    pub fn owns(&self, owner: &str) -> bool {
        self.role == Role::Open || self.name == owner
    }
}

/// A refused request: the text is safe to show to the caller (it never says which part of a
/// credential was wrong).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a request presented in its `authorization` header.
#[derive(PartialEq, Eq)]
pub enum Presented {
    Nothing,
    Basic { user: String, password: String },
    Bearer(String),
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a password or a token, not even in a debug log.
        match self {
            Presented::Nothing => f.write_str("Nothing"),
            Presented::Basic { user, .. } => write!(f, "Basic({user}, …)"),
            Presented::Bearer(_) => f.write_str("Bearer(…)"),
        }
    }
}

/// Reads an `authorization` header. Basic credentials may come with or without base64 padding
/// (the ADBC driver sends them unpadded).
pub fn presented(header: Option<&[u8]>) -> Result<Presented, Refused> {
    let Some(header) = header else { return Ok(Presented::Nothing) };
    if header.len() > AUTH_HEADER_BYTES_MAX {
        return Err(Refused("the authorization header is too long".into()));
    }
    let text = std::str::from_utf8(header).map_err(|_| Refused("the authorization header is not text".into()))?;
    let (scheme, value) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !value.is_empty() {
        return Ok(Presented::Bearer(value.to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(value.trim_end_matches('='))
            .map_err(|_| Refused("the Basic credentials are not base64".into()))?;
        let decoded = String::from_utf8(decoded).map_err(|_| Refused("the Basic credentials are not text".into()))?;
        let (user, password) = decoded.split_once(':').ok_or_else(|| Refused("Basic credentials need user:password".into()))?;
        return Ok(Presented::Basic { user: user.to_string(), password: password.to_string() });
    }
    Err(Refused("the authorization header must be Basic or Bearer".into()))
}

/// What a server checks every request against. A server with neither users nor a cluster key
/// is open: every request is made by [`Caller::open`].
pub struct Authenticator {
    users: Option<Arc<UserStore>>,
    cluster: Option<ClusterKey>,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    basic_cache: Mutex<HashMap<[u8; 32], (Caller, Instant)>>,
    logins: tokio::sync::Semaphore,
}

struct Session {
    user: String,
    expires: Instant,
}

impl Authenticator {
    pub fn new(users: Option<Arc<UserStore>>, cluster: Option<ClusterKey>) -> Self {
        Self { users, cluster, sessions: Mutex::default(), basic_cache: Mutex::default(), logins: tokio::sync::Semaphore::new(LOGINS_CONCURRENT_MAX) }
    }

    /// A server that checks nothing.
    pub fn open() -> Self {
        Self::new(None, None)
    }

    /// True when clients must authenticate (users are configured).
    pub fn requires_users(&self) -> bool {
        self.users.is_some()
    }

    /// True when nothing is checked at all.
    pub fn is_open(&self) -> bool {
        self.users.is_none() && self.cluster.is_none()
    }

    /// The caller behind a request's header, without slow hashing: bearer tokens (a user's, a
    /// session's or a node's). Basic credentials are checked here only if they were verified
    /// recently ([`Authenticator::login`] does the slow check).
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<Caller, Refused> {
        match presented(header)? {
            Presented::Bearer(token) => self.bearer(&token),
            Presented::Basic { user, password } => self
                .cached_basic(&user, &password)
                .ok_or_else(|| Refused("Basic credentials need a handshake first; use the token it returns".into())),
            Presented::Nothing => self.anonymous(),
        }
    }

    /// The caller of a request that presents nothing.
    fn anonymous(&self) -> Result<Caller, Refused> {
        match (&self.users, &self.cluster) {
            (None, None) => Ok(Caller::open()),
            // Clients are not authenticated, but only nodes hold the cluster key.
            (None, Some(_)) => Ok(Caller { name: ANONYMOUS.into(), role: Role::Admin }),
            (Some(_), _) => Err(Refused("authentication required: log in with a user and password, or a token".into())),
        }
    }

    fn bearer(&self, token: &str) -> Result<Caller, Refused> {
        if let Some(key) = &self.cluster {
            if let Some(name) = key.verify(token)? {
                return Ok(Caller { name, role: Role::Node });
            }
        }
        if ClusterKey::looks_like_node_token(token) {
            return Err(Refused("this node token was not signed with the cluster secret".into()));
        }
        // A server with no users has nothing to check a client token against: it counts for
        // nothing, and the caller is anonymous (never a node: node tokens were checked above).
        let Some(users) = &self.users else {
            return self.anonymous();
        };
        if let Some(caller) = self.session(users, token) {
            return Ok(caller);
        }
        users.verify_token(token)
    }

    /// Checks a user's password (slow, on purpose) and opens a session; returns the caller and
    /// a token for the session, valid for [`SESSION_TOKEN_TTL_MS`].
    pub fn login(&self, user: &str, password: &str) -> Result<(Caller, String), Refused> {
        let Some(users) = &self.users else {
            return Ok((self.anonymous()?, String::new()));
        };
        let caller = users.verify_password(user, password)?;
        self.basic_cache.lock().expect("basic cache").insert(basic_key(user, password), (caller.clone(), Instant::now()));
        let token = users::new_secret("qvs");
        let mut sessions = self.sessions.lock().expect("sessions");
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= SESSIONS_MAX {
            // The sessions closest to expiry go first; everyone else stays logged in.
            let mut by_expiry: Vec<_> = sessions.iter().map(|(k, s)| (s.expires, *k)).collect();
            by_expiry.sort();
            for (_, key) in by_expiry.into_iter().take(SESSIONS_MAX / 10 + 1) {
                sessions.remove(&key);
            }
        }
        let expires = now + Duration::from_millis(SESSION_TOKEN_TTL_MS);
        sessions.insert(users::digest(&token), Session { user: user.to_string(), expires });
        Ok((caller, token))
    }

    /// [`Authenticator::login`] for servers: at most [`LOGINS_CONCURRENT_MAX`] password checks
    /// run at once, each on a blocking thread; a login that waited [`LOGIN_WAIT_MS`] for its
    /// turn is refused. A pair verified recently is accepted without waiting.
    pub async fn login_async(self: &Arc<Self>, user: String, password: String) -> Result<(Caller, String), Refused> {
        let wait = Duration::from_millis(LOGIN_WAIT_MS);
        let permit = match tokio::time::timeout(wait, self.logins.acquire()).await {
            Ok(Ok(permit)) => permit,
            _ => return Err(Refused("too many logins at once; try again in a moment".into())),
        };
        let auth = Arc::clone(self);
        let checked = tokio::task::spawn_blocking(move || auth.login(&user, &password)).await;
        drop(permit);
        checked.map_err(|_| Refused("login failed".into()))?
    }

    fn session(&self, users: &UserStore, token: &str) -> Option<Caller> {
        let user = {
            let sessions = self.sessions.lock().expect("sessions");
            let session = sessions.get(&users::digest(token))?;
            if session.expires <= Instant::now() {
                return None;
            }
            session.user.clone()
        };
        // A user removed (or whose role changed) since the handshake is seen at once.
        users.caller(&user)
    }

    fn cached_basic(&self, user: &str, password: &str) -> Option<Caller> {
        let fresh = {
            let cache = self.basic_cache.lock().expect("basic cache");
            let (_, at) = cache.get(&basic_key(user, password))?;
            at.elapsed() < Duration::from_millis(BASIC_CACHE_TTL_MS)
        };
        // The user as they are now: removed or given another role since, it shows at once.
        fresh.then(|| self.users.as_ref().and_then(|users| users.caller(user))).flatten()
    }
}

fn basic_key(user: &str, password: &str) -> [u8; 32] {
    users::digest(&format!("{}\0{password}", user))
}

/// What a process presents when it calls another.
#[derive(Clone, Default)]
pub enum Credentials {
    /// Nothing: the server is open.
    #[default]
    None,
    /// A client's token (a user token, or a session token from a handshake).
    Bearer(String),
    /// A cluster member: a fresh node token, signed with the cluster key, on every call.
    Node { key: ClusterKey, name: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret, not even in a debug log.
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Bearer(_) => f.write_str("Bearer(…)"),
            Credentials::Node { name, .. } => write!(f, "Node({name})"),
        }
    }
}

impl Credentials {
    /// The value of the `authorization` header for one call.
    pub fn header(&self) -> Option<String> {
        match self {
            Credentials::None => None,
            Credentials::Bearer(token) => Some(format!("Bearer {token}")),
            Credentials::Node { key, name } => Some(format!("Bearer {}", key.sign(name))),
        }
    }
}

/// A server's TLS certificate chain and private key, in PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TlsIdentity {
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, Refused> {
        let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| Refused(format!("cannot read {}: {e}", p.display())));
        Ok(Self { cert_pem: read(cert)?, key_pem: read(key)? })
    }
}

/// `user:password` as an HTTP Basic header value.
pub fn basic_header(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

#[cfg(test)]
mod tests;
