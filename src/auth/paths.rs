//! Where table files may be read and written: under the allowed roots only (the data directory
//! and each `--allow-path`), so that `CREATE EXTERNAL TABLE … LOCATION '/etc'` or
//! `COPY … TO '/root/.ssh/…'` is refused. A path is judged after `..` and symbolic links are
//! resolved, as far as it exists.

use std::path::{Component, Path, PathBuf};

use super::Refused;

/// The roots under which table files may live; `None` allows every path (an open server).
#[derive(Debug, Clone, Default)]
pub struct AllowedPaths {
    roots: Option<Vec<PathBuf>>,
}

impl AllowedPaths {
    /// Every path.
    pub fn any() -> Self {
        Self { roots: None }
    }

    /// Only under `roots`.
    pub fn under(roots: &[PathBuf]) -> Self {
        Self { roots: Some(roots.iter().map(|r| resolve(r)).collect()) }
    }

    pub fn restricts(&self) -> bool {
        self.roots.is_some()
    }

    /// Checks a table location: a local path, or a `file:` URL. The location is read the way
    /// DataFusion reads it (`ListingTableUrl::parse`: an absolute path as it is, else a URL,
    /// else a relative path), so that what is checked is what will be opened: `FILE:///…`,
    /// percent-encoded `..` and the like resolve here as they do there. Other schemes (object
    /// stores) are refused while paths are restricted.
    pub fn check(&self, location: &str) -> Result<(), Refused> {
        let Some(roots) = &self.roots else { return Ok(()) };
        let path = local_path(location)?;
        let resolved = resolve(&path);
        if roots.iter().any(|root| resolved.starts_with(root)) {
            return Ok(());
        }
        let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        Err(Refused(format!(
            "'{location}' is outside the directories tables may use ({}); an admin can allow more with --allow-path",
            roots.join(", ")
        )))
    }
}

fn local_path(location: &str) -> Result<PathBuf, Refused> {
    if Path::new(location).is_absolute() {
        return Ok(PathBuf::from(location));
    }
    match url::Url::parse(location) {
        Ok(url) if url.scheme() == "file" => {
            url.to_file_path().map_err(|()| Refused(format!("'{location}' is not a local file path")))
        }
        Ok(url) => Err(Refused(format!(
            "'{location}': tables may use local files only on a coordinator that restricts paths (not {}://)",
            url.scheme()
        ))),
        Err(url::ParseError::RelativeUrlWithoutBase) => Ok(PathBuf::from(location)),
        Err(e) => Err(Refused(format!("'{location}' is not a path or URL: {e}"))),
    }
}

/// `path` made absolute, with `..` and `.` removed and symbolic links of its longest existing
/// prefix followed.
fn resolve(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")).join(path)
    };
    let mut normal = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    // Follow links in the part that exists; keep the rest (a file not written yet) as it is.
    let mut existing = normal.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match existing.file_name() {
            Some(name) => rest.push(name.to_os_string()),
            None => break,
        }
        existing.pop();
    }
    let mut resolved = std::fs::canonicalize(&existing).unwrap_or(existing);
    resolved.extend(rest.iter().rev());
    resolved
}
