//! Where the upstream files come from: the `datafusion-sqllogictest` crate of the DataFusion
//! release Quiver builds on, as published on crates.io (it ships `test_files/` and `data/`). It
//! is downloaded once into the target directory, checked against the checksum crates.io's index
//! lists for it, and unpacked with `tar`; `QUIVER_UPSTREAM_SLT_DIR` names an unpacked copy
//! instead. Each shard then runs in a copy of its own laid out as in DataFusion's repository
//! (`<root>/datafusion/sqllogictest`), so that the relative paths in the files and the
//! `WORKSPACE_ROOT` in their expected output mean what they mean upstream, and so that files
//! writing into `test_files/scratch` never touch the cache or another shard.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The release of DataFusion Quiver is built on (Cargo.lock) and of the files it runs.
pub const CRATE_VERSION: &str = "55.2.0";
const CRATE_NAME: &str = "datafusion-sqllogictest";
/// SHA-256 of the `.crate` file; the same as `cksum` in crates.io's index entry for 55.2.0.
const CRATE_SHA256: &str = "b270cea4d8c2b2c42773e60164204386fb97d7936736e5f126ac751b86d7dabe";
/// An already unpacked copy of the crate (a directory holding `test_files/`).
pub const DIR_ENV: &str = "QUIVER_UPSTREAM_SLT_DIR";
/// Longest wait for crates.io's answer.
const DOWNLOAD_TIMEOUT_S: u64 = 120;

/// Downloads `url` into `dest` only if its SHA-256 is the expected one; exits non-zero otherwise.
const DOWNLOAD_SCRIPT: &str = r#"
import hashlib, sys, urllib.request
url, dest, want, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
data = urllib.request.urlopen(url, timeout=timeout).read()
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"SHA-256 of {url} is {got}, expected {want}")
with open(dest, "wb") as f:
    f.write(data)
"#;

/// The unpacked crate: the one `QUIVER_UPSTREAM_SLT_DIR` names, or the cached download.
/// Panics (fails the test) when it cannot be had: a missing suite must never pass.
pub fn crate_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(DIR_ENV) {
        let dir = PathBuf::from(dir);
        assert!(dir.join("test_files").is_dir(), "{DIR_ENV}={} holds no test_files/", dir.display());
        return dir;
    }
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("upstream-slt");
    let dir = cache.join(format!("{CRATE_NAME}-{CRATE_VERSION}"));
    if !dir.join("test_files").is_dir() {
        download_into(&cache, &dir);
    }
    dir
}

/// Downloads and unpacks the crate into a staging directory of this process, then moves it to
/// `dir` in one rename: shards that start together never see half a copy.
fn download_into(cache: &Path, dir: &Path) {
    let staging = cache.join(format!("staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).unwrap_or_else(|e| panic!("cannot create {}: {e}", staging.display()));
    let file = staging.join(format!("{CRATE_NAME}-{CRATE_VERSION}.crate"));
    let url = format!("https://static.crates.io/crates/{CRATE_NAME}/{CRATE_VERSION}/download");
    run(
        Command::new("python3").args(["-c", DOWNLOAD_SCRIPT, &url]).arg(&file).args([CRATE_SHA256, &DOWNLOAD_TIMEOUT_S.to_string()]),
        &format!("downloading {url} (set {DIR_ENV} to an unpacked copy of the crate to run offline)"),
    );
    run(Command::new("tar").arg("-xzf").arg(&file).arg("-C").arg(&staging), "unpacking the crate with tar");
    let unpacked = staging.join(format!("{CRATE_NAME}-{CRATE_VERSION}"));
    // Another shard may have won the race; its copy is as good as ours.
    if std::fs::rename(&unpacked, dir).is_err() && !dir.join("test_files").is_dir() {
        panic!("cannot move {} to {}", unpacked.display(), dir.display());
    }
    let _ = std::fs::remove_dir_all(&staging);
}

fn run(command: &mut Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
}

/// A shard's own copy of the crate, laid out as in DataFusion's repository.
pub struct Workspace {
    /// What upstream calls `WORKSPACE_ROOT` (the repository root); holds the temporary copy.
    pub root: tempfile::TempDir,
}

impl Workspace {
    pub fn new(source: &Path) -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let ws = Self { root };
        for sub in ["test_files", "data"] {
            if source.join(sub).is_dir() {
                copy_dir(&source.join(sub), &ws.crate_dir().join(sub));
            }
        }
        ws
    }

    /// Where DataFusion's runner runs: relative paths in the files start here.
    pub fn crate_dir(&self) -> PathBuf {
        self.root.path().join("datafusion/sqllogictest")
    }

    pub fn test_files(&self) -> PathBuf {
        self.crate_dir().join("test_files")
    }

    /// Empties `test_files/scratch/<file stem>`, as DataFusion's runner does before each file.
    pub fn reset_scratch(&self, relative: &Path) {
        let stem = relative.file_stem().expect("file has a name");
        let dir = self.test_files().join("scratch").join(stem);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("cannot create {}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("cannot read {}: {e}", from.display())) {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap_or_else(|e| panic!("cannot copy to {}: {e}", target.display()));
        }
    }
}
