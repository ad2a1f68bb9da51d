//! The cluster secret: every member of a closed cluster (the Coordinator and each Worker)
//! holds it, and proves it on every call with a short-lived node token,
//! `qvn.<name>.<issued ms>.<HMAC-SHA-256 of name and time, hex>`. The secret itself never
//! crosses the network, and a token seen on the wire is worthless after [`NODE_TOKEN_TTL_MS`].

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::Refused;

/// How long a node token is accepted after (and, for clocks that differ, before) it was made.
pub const NODE_TOKEN_TTL_MS: u64 = 60_000;
/// Shortest cluster secret accepted.
const SECRET_BYTES_MIN: usize = 16;
const PREFIX: &str = "qvn.";

/// The cluster secret, ready to sign and check node tokens. Cheap to clone.
#[derive(Clone)]
pub struct ClusterKey(Arc<Vec<u8>>);

impl ClusterKey {
    pub fn new(secret: &[u8]) -> Result<Self, Refused> {
        if secret.len() < SECRET_BYTES_MIN {
            return Err(Refused(format!("the cluster secret must be at least {SECRET_BYTES_MIN} bytes")));
        }
        Ok(Self(Arc::new(secret.to_vec())))
    }

    /// Reads the secret from a file (surrounding whitespace is not part of it).
    pub fn from_file(path: &Path) -> Result<Self, Refused> {
        let bytes = std::fs::read(path).map_err(|e| Refused(format!("cannot read the cluster secret {}: {e}", path.display())))?;
        // The bytes as they are (a binary secret keeps all its entropy), less surrounding ASCII
        // whitespace such as the newline an editor adds.
        Self::new(bytes.trim_ascii())
    }

    /// A random secret, for a cluster that lives in one process (`quiver local`).
    pub fn random() -> Self {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the operating system's randomness");
        Self(Arc::new(bytes.to_vec()))
    }

    fn mac(&self, name: &str, issued_ms: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(name.as_bytes());
        mac.update(b"\0");
        mac.update(&issued_ms.to_be_bytes());
        mac
    }

    /// A node token for `name`, valid from now for [`NODE_TOKEN_TTL_MS`].
    pub fn sign(&self, name: &str) -> String {
        let issued = now_ms();
        let tag: String = self.mac(name, issued).finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        format!("{PREFIX}{name}.{issued}.{tag}")
    }

    /// True when a bearer token has the form of a node token.
    pub fn looks_like_node_token(token: &str) -> bool {
        token.starts_with(PREFIX)
    }

    /// The node a token names, when it is a node token; an error when it is one but is forged,
    /// malformed or out of date; None when it is not a node token at all.
    pub fn verify(&self, token: &str) -> Result<Option<String>, Refused> {
        let Some(rest) = token.strip_prefix(PREFIX) else { return Ok(None) };
        let refused = || Refused("invalid node token".into());
        let (signed, tag) = rest.rsplit_once('.').ok_or_else(refused)?;
        let (name, issued) = signed.rsplit_once('.').ok_or_else(refused)?;
        let issued: u64 = issued.parse().map_err(|_| refused())?;
        let tag = unhex(tag).ok_or_else(refused)?;
        self.mac(name, issued).verify_slice(&tag).map_err(|_| refused())?;
        if now_ms().abs_diff(issued) > NODE_TOKEN_TTL_MS {
            return Err(Refused("expired node token: are the cluster's clocks in step?".into()));
        }
        Ok(Some(name.to_string()))
    }
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
