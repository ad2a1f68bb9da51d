//! Users and client tokens, kept in the coordinator's data directory (`auth/users.json`,
//! `auth/tokens.json`, readable by the owner only). Passwords are stored as argon2 hashes and
//! tokens as SHA-256 digests: a token is shown once, when it is created. The coordinator reads
//! the files again whenever they change, so `quiver user add` and `quiver token create` take
//! effect on a running coordinator.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Caller, Refused, ANONYMOUS};

/// Where, under the data directory, users and tokens are kept.
pub const AUTH_DIR: &str = "auth";
const USERS_FILE: &str = "users.json";
const TOKENS_FILE: &str = "tokens.json";
/// Random bytes in a token or a session id.
const SECRET_BYTES: usize = 32;
/// Longest user name; names are letters, digits, `_`, `-` and `.`.
const USER_NAME_BYTES_MAX: usize = 64;
/// Shortest password accepted.
const PASSWORD_CHARS_MIN: usize = 8;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// SELECT, EXPLAIN, SHOW.
    Reader,
    /// Everything a reader may, and CREATE, INSERT, DROP, COPY, SET.
    Admin,
    /// A cluster member (a Worker or the Coordinator), never a client.
    #[value(skip)]
    Node,
    /// Anyone, on a server with no authentication.
    #[value(skip)]
    Open,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct User {
    name: String,
    role: Role,
    /// argon2id in PHC form.
    password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Token {
    id: String,
    user: String,
    /// SHA-256 of the token, hex.
    digest: String,
    created_ms: u64,
    expires_ms: Option<u64>,
    revoked: bool,
}

/// A token as `quiver token list` shows it: never the token itself.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub id: String,
    pub user: String,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub revoked: bool,
}

#[derive(Default)]
struct Loaded {
    users: Vec<User>,
    tokens: Vec<Token>,
    /// Modification times of the two files when they were read.
    stamp: (Option<SystemTime>, Option<SystemTime>),
}

/// The users and tokens of one data directory.
pub struct UserStore {
    dir: PathBuf,
    loaded: Mutex<Loaded>,
}

impl UserStore {
    /// The store under `data_dir`; it may hold no users yet.
    pub fn open(data_dir: &Path) -> Result<Self, Refused> {
        let store = Self { dir: data_dir.join(AUTH_DIR), loaded: Mutex::default() };
        store.reload()?;
        Ok(store)
    }

    /// True when the data directory holds at least one user: the coordinator then requires
    /// authentication on every port.
    pub fn has_users(&self) -> bool {
        let _ = self.reload();
        !self.loaded.lock().expect("users").users.is_empty()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads the files again if they changed since they were read.
    fn reload(&self) -> Result<(), Refused> {
        let stamp = (modified(&self.file(USERS_FILE)), modified(&self.file(TOKENS_FILE)));
        let mut loaded = self.loaded.lock().expect("users");
        if loaded.stamp == stamp && stamp != (None, None) {
            return Ok(());
        }
        loaded.users = read_json(&self.file(USERS_FILE))?;
        loaded.tokens = read_json(&self.file(TOKENS_FILE))?;
        loaded.stamp = stamp;
        Ok(())
    }

    /// The caller a user name stands for, if the user exists.
    pub fn caller(&self, name: &str) -> Option<Caller> {
        let _ = self.reload();
        let loaded = self.loaded.lock().expect("users");
        loaded.users.iter().find(|u| u.name == name).map(|u| Caller { name: u.name.clone(), role: u.role })
    }

    /// Checks a password; slow on purpose (argon2).
    pub fn verify_password(&self, name: &str, password: &str) -> Result<Caller, Refused> {
        self.reload()?;
        let user = self.loaded.lock().expect("users").users.iter().find(|u| u.name == name).cloned();
        let refused = || Refused("wrong user name or password".into());
        let Some(user) = user else {
            // Hash anyway, so that timing does not tell which users exist.
            let _ = hash_password("not a user's password");
            return Err(refused());
        };
        let hash = PasswordHash::new(&user.password).map_err(|_| refused())?;
        Argon2::default().verify_password(password.as_bytes(), &hash).map_err(|_| refused())?;
        Ok(Caller { name: user.name, role: user.role })
    }

    /// The caller a client token belongs to: it must exist, not be revoked or expired, and its
    /// user must still exist.
    pub fn verify_token(&self, token: &str) -> Result<Caller, Refused> {
        self.reload()?;
        let digest = hex(&digest(token));
        let loaded = self.loaded.lock().expect("users");
        let refused = || Refused("invalid, expired or revoked token".into());
        let found = loaded.tokens.iter().find(|t| bool::from(t.digest.as_bytes().ct_eq(digest.as_bytes())));
        let token = found.ok_or_else(refused)?;
        if token.revoked || token.expires_ms.is_some_and(|at| at <= now_ms()) {
            return Err(refused());
        }
        let user = loaded.users.iter().find(|u| u.name == token.user).ok_or_else(refused)?;
        Ok(Caller { name: user.name.clone(), role: user.role })
    }

    /// Adds a user, or sets the password and role of an existing one.
    pub fn add_user(&self, name: &str, role: Role, password: &str) -> Result<(), Refused> {
        check_user_name(name)?;
        if !matches!(role, Role::Admin | Role::Reader) {
            return Err(Refused("a user's role is admin or reader".into()));
        }
        if password.chars().count() < PASSWORD_CHARS_MIN {
            return Err(Refused(format!("a password has at least {PASSWORD_CHARS_MIN} characters")));
        }
        let password = hash_password(password)?;
        self.change(|loaded| {
            loaded.users.retain(|u| u.name != name);
            loaded.users.push(User { name: name.to_string(), role, password });
            Ok(())
        })
    }

    /// Removes a user and every token of theirs.
    pub fn remove_user(&self, name: &str) -> Result<(), Refused> {
        self.change(|loaded| {
            let before = loaded.users.len();
            loaded.users.retain(|u| u.name != name);
            if loaded.users.len() == before {
                return Err(Refused(format!("no user '{name}'")));
            }
            loaded.tokens.retain(|t| t.user != name);
            Ok(())
        })
    }

    /// User names and roles.
    pub fn users(&self) -> Result<Vec<(String, Role)>, Refused> {
        self.reload()?;
        Ok(self.loaded.lock().expect("users").users.iter().map(|u| (u.name.clone(), u.role)).collect())
    }

    /// Creates a token for a user; the token is returned once and only its digest is kept.
    pub fn create_token(&self, user: &str, expires_in_ms: Option<u64>) -> Result<(String, TokenInfo), Refused> {
        let token = new_secret("qvt");
        let id = hex(&digest(&token))[..12].to_string();
        let entry = Token {
            id: id.clone(),
            user: user.to_string(),
            digest: hex(&digest(&token)),
            created_ms: now_ms(),
            expires_ms: expires_in_ms.map(|ms| now_ms().saturating_add(ms)),
            revoked: false,
        };
        let info = info(&entry);
        self.change(|loaded| {
            if !loaded.users.iter().any(|u| u.name == user) {
                return Err(Refused(format!("no user '{user}': add it first with `quiver user add`")));
            }
            loaded.tokens.push(entry);
            Ok(())
        })?;
        Ok((token, info))
    }

    /// Revokes a token by its id (as `quiver token list` shows it).
    pub fn revoke_token(&self, id: &str) -> Result<(), Refused> {
        self.change(|loaded| {
            let token = loaded.tokens.iter_mut().find(|t| t.id == id).ok_or_else(|| Refused(format!("no token '{id}'")))?;
            token.revoked = true;
            Ok(())
        })
    }

    pub fn tokens(&self) -> Result<Vec<TokenInfo>, Refused> {
        self.reload()?;
        Ok(self.loaded.lock().expect("users").tokens.iter().map(info).collect())
    }

    /// Applies a change and writes both files, each replaced whole (write, then rename).
    fn change(&self, edit: impl FnOnce(&mut Loaded) -> Result<(), Refused>) -> Result<(), Refused> {
        self.reload()?;
        let mut loaded = self.loaded.lock().expect("users");
        edit(&mut loaded)?;
        create_private_dir(&self.dir)?;
        write_json(&self.file(USERS_FILE), &loaded.users)?;
        write_json(&self.file(TOKENS_FILE), &loaded.tokens)?;
        loaded.stamp = (modified(&self.file(USERS_FILE)), modified(&self.file(TOKENS_FILE)));
        Ok(())
    }
}

fn info(t: &Token) -> TokenInfo {
    TokenInfo { id: t.id.clone(), user: t.user.clone(), created_ms: t.created_ms, expires_ms: t.expires_ms, revoked: t.revoked }
}

fn check_user_name(name: &str) -> Result<(), Refused> {
    if name == ANONYMOUS {
        // The name of every caller of a server without users: a user of that name would own
        // their Queries after a restart with users, and they his.
        return Err(Refused(format!("'{ANONYMOUS}' is the name of unauthenticated callers; choose another")));
    }
    let valid = !name.is_empty()
        && name.len() <= USER_NAME_BYTES_MAX
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(())
    } else {
        Err(Refused(format!("a user name is 1 to {USER_NAME_BYTES_MAX} letters, digits, '_', '-' or '.'")))
    }
}

fn hash_password(password: &str) -> Result<String, Refused> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| Refused(format!("no randomness: {e}")))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| Refused(format!("salt: {e}")))?;
    let hash = Argon2::default().hash_password(password.as_bytes(), &salt).map_err(|e| Refused(format!("hash: {e}")))?;
    Ok(hash.to_string())
}

/// A new random secret, `prefix_` then 32 random bytes in URL-safe base64.
pub(super) fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes).expect("the operating system's randomness");
    format!("{prefix}_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

pub(super) fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, Refused> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Refused(format!("{} is malformed: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Refused(format!("cannot read {}: {e}", path.display()))),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), Refused> {
    let io = |e: std::io::Error| Refused(format!("cannot write {}: {e}", path.display()));
    let text = serde_json::to_vec_pretty(value).map_err(|e| Refused(e.to_string()))?;
    let partial = path.with_extension("json.partial");
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&partial).map_err(io)?;
        file.write_all(&text).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&partial, path).map_err(io)
}

fn create_private_dir(dir: &Path) -> Result<(), Refused> {
    std::fs::create_dir_all(dir).map_err(|e| Refused(format!("cannot create {}: {e}", dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

/// A duration such as `30d`, `12h`, `90m`, `45s`, in milliseconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("'{text}' is not a duration such as 30d, 12h, 90m or 45s"))?;
    let unit_ms = match unit {
        "d" => 86_400_000,
        "h" => 3_600_000,
        "m" => 60_000,
        "s" | "" => 1_000,
        _ => return Err(format!("unknown unit '{unit}' in '{text}': use d, h, m or s")),
    };
    n.checked_mul(unit_ms).filter(|&ms| ms > 0).ok_or_else(|| format!("'{text}' is not a positive duration"))
}
