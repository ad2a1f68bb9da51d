//! The checked-in list of what the suite does not run or compare (`tests/upstream_slt/skip.txt`),
//! every entry with its reason: whole files that cannot work through Quiver by design, records
//! whose cluster answer differs by design, and records that fail because of a tracked Quiver bug.

use std::collections::HashMap;
use std::path::Path;

/// Marks a known bug that does not show on every run (it depends on where Tasks run): its
/// record passing does not fail the suite.
pub const INTERMITTENT: &str = "(intermittent)";

/// Why a record's cluster answer is not held against Quiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listed {
    /// The answer differs by design (documented in the reason).
    Difference,
    /// A Quiver bug, tracked; the reason holds a minimal reproduction.
    KnownBug,
}

impl Listed {
    pub fn as_str(self) -> &'static str {
        match self {
            Listed::Difference => "difference",
            Listed::KnownBug => "known-bug",
        }
    }
}

pub struct SkipList {
    /// Files (or directories, ending in `/`) under `test_files/` that are not run, with why.
    files: Vec<(String, String)>,
    /// Records by id (`file.slt:line`, `file.slt>part.slt.part:line` in an included file).
    records: HashMap<String, (Listed, String)>,
}

/// `file.slt:12,40` names records 12 and 40 of `file.slt`.
fn record_ids(target: &str) -> Vec<String> {
    let (file, lines) = target.rsplit_once(':').unwrap_or_else(|| panic!("skip.txt: {target} names no line"));
    lines.split(',').map(|line| format!("{file}:{line}")).collect()
}

impl SkipList {
    pub fn load() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/upstream_slt/skip.txt");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self::parse(&text)
    }

    fn parse(text: &str) -> Self {
        let mut list = SkipList { files: vec![], records: HashMap::new() };
        for (n, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.splitn(3, char::is_whitespace);
            let (kind, target, reason) = (words.next().unwrap(), words.next().unwrap_or(""), words.next().unwrap_or("").trim());
            assert!(!target.is_empty() && !reason.is_empty(), "skip.txt:{n}: every entry needs a target and a reason: {line}");
            let (target, reason) = (target.to_string(), reason.to_string());
            let listed = match kind {
                "file" => {
                    list.files.push((target, reason));
                    continue;
                }
                "difference" => Listed::Difference,
                "known-bug" => Listed::KnownBug,
                other => panic!("skip.txt:{n}: unknown kind '{other}' (file, difference, known-bug)"),
            };
            for id in record_ids(&target) {
                let previous = list.records.insert(id.clone(), (listed, reason.clone()));
                assert!(previous.is_none(), "skip.txt:{n}: {id} is listed twice");
            }
        }
        list
    }

    /// Why file `relative` (a path under `test_files/`) is not run, if it is not.
    pub fn file_reason(&self, relative: &str) -> Option<&str> {
        self.files.iter().find(|(t, _)| t == relative || (t.ends_with('/') && relative.starts_with(t.as_str()))).map(|(_, r)| r.as_str())
    }

    pub fn record(&self, id: &str) -> Option<(Listed, &str)> {
        self.records.get(id).map(|(l, r)| (*l, r.as_str()))
    }

    /// Ids of listed records in `file`, to tell which entries no longer match a record.
    pub fn records_in<'a>(&'a self, file: &'a str) -> impl Iterator<Item = (&'a str, Listed)> + 'a {
        let prefix = move |id: &str| id.split_once([':', '>']).map(|(f, _)| f == file).unwrap_or(false);
        self.records.iter().filter(move |(id, _)| prefix(id)).map(|(id, (l, _))| (id.as_str(), *l))
    }
}
