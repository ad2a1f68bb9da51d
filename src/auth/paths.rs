//! Where table files may be read and written: under the allowed roots only (the data directory
//! and each `--allow-path`), so that `CREATE EXTERNAL TABLE … LOCATION '/etc'` or
//! `COPY … TO '/root/.ssh/…'` is refused. A path is judged after `..` and symbolic links are
//! resolved, as far as it exists. An object-store location is allowed under an allowed store
//! prefix (`--allow-path s3://bucket/prefix`), segment by segment, and never with a `.` or `..`
//! segment.

use std::path::{Component, Path, PathBuf};

use super::Refused;

/// The roots under which table files may live; `None` allows every path (an open server).
#[derive(Debug, Clone, Default)]
pub struct AllowedPaths {
    roots: Option<Vec<PathBuf>>,
    /// Object-store prefixes (`s3://bucket/prefix`), as scheme, authority and path segments.
    stores: Vec<Vec<String>>,
}

impl AllowedPaths {
    /// Every path.
    pub fn any() -> Self {
        Self { roots: None, stores: Vec::new() }
    }

    /// Only under `roots`: directories, or object-store URLs such as `s3://bucket/prefix`.
    pub fn under(roots: &[PathBuf]) -> Self {
        let (mut dirs, mut stores) = (Vec::new(), Vec::new());
        for root in roots {
            match root.to_str().and_then(|r| store_segments(r).ok().flatten()) {
                Some(segments) => stores.push(segments),
                None => dirs.push(resolve(root)),
            }
        }
        Self { roots: Some(dirs), stores }
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
        if let Some(segments) = store_segments(location)? {
            if self.stores.iter().any(|root| segments.starts_with(root)) {
                return Ok(());
            }
            return Err(Refused(format!(
                "'{location}' is outside the object-store prefixes tables may use; an admin can allow one with --allow-path s3://bucket/prefix"
            )));
        }
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

/// An object-store location as [scheme, authority, path segments…]; None for a local path or
/// a `file:` URL. Segments are compared decoded; `.` and `..` are refused, since stores and
/// DataFusion would read them differently from this check.
fn store_segments(location: &str) -> Result<Option<Vec<String>>, Refused> {
    if Path::new(location).is_absolute() {
        return Ok(None);
    }
    let url = match url::Url::parse(location) {
        Ok(url) if url.scheme() != "file" => url,
        _ => return Ok(None),
    };
    let mut segments = vec![url.scheme().to_string(), url[url::Position::BeforeUsername..url::Position::AfterPort].to_string()];
    for segment in url.path().split('/').filter(|s| !s.is_empty()) {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        if decoded == "." || decoded == ".." || decoded.contains('/') {
            return Err(Refused(format!("'{location}' has a '{segment}' segment, which tables may not use")));
        }
        segments.push(decoded.into_owned());
    }
    Ok(Some(segments))
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
