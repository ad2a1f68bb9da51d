//! What the suite concludes about each record, and the counts it prints per file and per shard:
//! supported records passed (or the same by a stated rule), listed as a difference or a known
//! bug, or mismatched; records not compared, by reason. Also the rules by which a differing
//! cluster answer still counts as the same, each checked on the two answers, not assumed, and
//! the reasons single-node DataFusion can fail a record, read from what it said.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use sqllogictest::TestErrorKind;

use super::skips::{Listed, SkipList};

/// Prints why each record was unsupported or listed, to look into them.
const VERBOSE_ENV: &str = "QUIVER_UPSTREAM_SLT_VERBOSE";
/// How much of a mismatch's SQL and diff a report quotes.
const QUOTE_CHARS_MAX: usize = 1_500;

#[derive(Debug, Clone)]
pub enum Verdict {
    /// Both engines answered as the file expects.
    Passed,
    /// The cluster's answer is the same by a rule of `tolerated`.
    PassedAs(&'static str),
    /// An `onlyif`/`skipif` condition keeps DataFusion from it.
    NotForDataFusion,
    /// Not compared, by a rule of the suite.
    Rule(&'static str),
    /// Single-node DataFusion with Quiver's build and settings does not answer as the file expects.
    Unsupported(&'static str, String),
    /// The cluster differs, as `skip.txt` lists.
    Listed(Listed, String),
    /// The cluster fails because an earlier listed failure left a table or file out (`cascade`).
    Consequence(Listed, String),
    /// `skip.txt` lists the record, but the cluster did not differ (or it was not compared);
    /// true when the entry says the failure is intermittent.
    ListedButPassed(Listed, bool),
    /// The cluster differs from single-node DataFusion on a supported record.
    Mismatch(String),
}

impl Verdict {
    /// The listing a failure on the cluster is counted under.
    pub fn listing(&self) -> Option<Listed> {
        match self {
            Verdict::Listed(listed, _) | Verdict::Consequence(listed, _) => Some(*listed),
            _ => None,
        }
    }

    /// Whether the cluster ran the record as the file expects.
    pub fn ran_as_expected(&self) -> bool {
        matches!(self, Verdict::Passed | Verdict::PassedAs(_))
    }
}

/// The rule `retyped_for_decoded_dictionaries` applies (in upstream_slt.rs).
pub const DECODED_DICTIONARIES: &str =
    "the file's rows, with dictionary-encoded columns decoded (Quiver's Flight SQL wire schema)";

/// Differences that are not differences, each verified on the two answers: rows in another
/// order where the query asks for none, the same error where DataFusion adds context around its
/// cause (a Quiver client reads the cause), and the row count Quiver's CREATE TABLE answers with
/// where DataFusion answers with nothing.
pub fn tolerated(single_error: Option<&str>, cluster: Option<&TestErrorKind>) -> Option<&'static str> {
    match cluster? {
        TestErrorKind::QueryResultMismatch { sql, expected, actual } => {
            let unordered = !sql.to_ascii_lowercase().contains("order by");
            (unordered && same_lines(expected, actual)).then_some("rows in another order, and the query has no ORDER BY")
        }
        TestErrorKind::ErrorMismatch { err, .. } => same_error(single_error?, &err.to_string()),
        TestErrorKind::StatementResultMismatch { sql, expected: 0, actual } => {
            let create_table = sql.trim_start().to_ascii_lowercase().starts_with("create") && actual == "returned 1 rows";
            create_table.then_some("Quiver answers CREATE TABLE with the number of rows it wrote")
        }
        _ => None,
    }
}

/// The cluster's error is the single-node one when it is its cause (DataFusion adds context
/// lines around it), or the same parser error in the parser's words (DataFusion prints its
/// Debug form, `SQL error: ParserError("…")`).
fn same_error(single: &str, cluster: &str) -> Option<&'static str> {
    let cause = cluster.strip_prefix("DataFusion error: ").unwrap_or(cluster).trim();
    if !cause.is_empty() && single.contains(cause) {
        return Some("the same error, as its cause without DataFusion's context lines");
    }
    // Quiver cuts a long message (STATUS_MESSAGE_BYTES_MAX) and says how much it left out.
    if let Some((kept, _)) = cause.rsplit_once("… (").filter(|(_, rest)| rest.ends_with(" more bytes)")) {
        if !kept.is_empty() && single.contains(kept) {
            return Some("the same error, as its cause cut to Quiver's longest status message");
        }
    }
    let parser = cause.strip_prefix("sql parser error: ")?;
    let debug = format!("ParserError({:?})", parser);
    single.contains(&debug).then_some("the same parser error, without DataFusion's Debug form")
}

fn same_lines(expected: &str, actual: &str) -> bool {
    sorted_lines(expected) == sorted_lines(actual)
}

fn sorted_lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    lines.sort_unstable();
    lines
}

/// Why single-node DataFusion did not answer a record as its file expects, from what it said.
pub fn unsupported_reason(failure: &str, reads_missing_data: bool) -> &'static str {
    let has = |words: &[&str]| words.iter().any(|w| failure.contains(w));
    if reads_missing_data || has(&["../../testing/", "../../parquet-testing/", "../core/tests/", "../datasource-arrow/", "tpch/data", "No such file or directory"]) {
        "test data the crate does not ship"
    } else if has(&["Invalid function", "Unknown function", "There is no built-in function", "not found in registry"])
        || has(&["feature is not enabled", "Unsupported SQL type"])
    {
        "a function, type or feature not in Quiver's DataFusion build (or registered by DataFusion's runner)"
    } else if has(&["not found", "doesn't exist", "does not exist"]) && has(&["able '", "iew '"]) {
        "a table made by an unsupported record, or registered by DataFusion's runner"
    } else if has(&["query result mismatch", "query columns mismatch", "expected to fail", "expected to affect"]) {
        "answered otherwise with Quiver's build and settings"
    } else if failure.starts_with("timed out") {
        "timed out"
    } else if failure.starts_with("panicked") {
        "panicked"
    } else {
        "failed otherwise with Quiver's build and settings"
    }
}

/// One file's records by verdict.
#[derive(Default)]
pub struct FileReport {
    pub file: String,
    /// Why the whole file was not run (skip.txt), or could not be parsed.
    pub skipped: Option<String>,
    pub unparsable: bool,
    pub counts: BTreeMap<String, usize>,
    pub supported: usize,
    pub mismatches: Vec<String>,
    /// skip.txt entries that name no record, and known bugs that did not show.
    pub stale: Vec<String>,
    seen: HashSet<String>,
    pub single_elapsed: Duration,
    pub cluster_elapsed: Duration,
}

impl FileReport {
    pub fn new(file: &str) -> Self {
        Self { file: file.to_string(), ..Self::default() }
    }

    pub fn skipped(file: &str, reason: &str) -> Self {
        Self { skipped: Some(reason.to_string()), ..Self::new(file) }
    }

    pub fn unparsable(file: &str, error: &str) -> Self {
        Self { skipped: Some(format!("cannot be parsed: {error}")), unparsable: true, ..Self::new(file) }
    }

    pub fn add(&mut self, id: String, sql: String, verdict: Verdict) {
        let key = match &verdict {
            Verdict::Passed => "passed".to_string(),
            Verdict::PassedAs(why) => format!("passed: {why}"),
            Verdict::NotForDataFusion => "not compared: onlyif/skipif keeps DataFusion from it".to_string(),
            Verdict::Rule(why) => format!("not compared: {why}"),
            Verdict::Unsupported(why, _) => format!("unsupported: {why}"),
            Verdict::Listed(listed, _) => format!("listed as {}", listed.as_str()),
            Verdict::Consequence(listed, _) => format!("listed as {} (consequence of a listed record)", listed.as_str()),
            Verdict::ListedButPassed(listed, _) => format!("listed as {} but did not differ", listed.as_str()),
            Verdict::Mismatch(_) => "MISMATCH".to_string(),
        };
        *self.counts.entry(key.clone()).or_default() += 1;
        self.supported += usize::from(matches!(
            verdict,
            Verdict::Passed
                | Verdict::PassedAs(_)
                | Verdict::Listed(..)
                | Verdict::Consequence(..)
                | Verdict::Mismatch(_)
                | Verdict::ListedButPassed(..)
        ));
        if std::env::var_os(VERBOSE_ENV).is_some() {
            match &verdict {
                Verdict::Unsupported(_, text) | Verdict::Listed(_, text) | Verdict::Consequence(_, text) => {
                    println!("  {id}: {key}\n    [SQL] {}\n    {}", quote(&sql), quote(text).replace('\n', "\n    "))
                }
                Verdict::ListedButPassed(..) => println!("  {id}: {key}"),
                _ => {}
            }
        }
        match verdict {
            Verdict::Mismatch(text) => self.mismatches.push(format!("{id}\n[SQL] {}\n{}", quote(&sql), quote(&text))),
            // A fixed bug must leave the list; a difference (row order) or an intermittent bug
            // (where a Task runs) may come and go.
            Verdict::ListedButPassed(Listed::KnownBug, false) => {
                self.stale.push(format!("{id} is listed as known-bug but did not differ (fixed? remove it from skip.txt)"))
            }
            _ => {}
        }
        self.seen.insert(id);
    }

    /// Entries of `skips` for this file that name no record of it.
    pub fn check_listed(&mut self, skips: &SkipList) {
        for (id, listed) in skips.records_in(&self.file) {
            if !self.seen.contains(id) {
                self.stale.push(format!("{id} is listed as {} but is no record of the file", listed.as_str()));
            }
        }
    }

    pub fn line(&self) -> String {
        if let Some(reason) = &self.skipped {
            return format!("upstream_slt {}: not run: {reason}", self.file);
        }
        let counts: Vec<String> = self.counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let (single, cluster) = (self.single_elapsed.as_secs_f64(), self.cluster_elapsed.as_secs_f64());
        format!("upstream_slt {}: {} (single-node {single:.1} s, cluster {cluster:.1} s)", self.file, counts.join(", "))
    }
}

fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_CHARS_MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// A shard's files and records.
#[derive(Default)]
pub struct ShardReport {
    files_run: usize,
    files_skipped: BTreeMap<String, Vec<String>>,
    unparsable: Vec<String>,
    counts: BTreeMap<String, usize>,
    supported: usize,
    mismatches: Vec<String>,
    stale: Vec<String>,
    elapsed: Duration,
}

impl ShardReport {
    pub fn add(&mut self, file: FileReport) {
        self.elapsed += file.single_elapsed + file.cluster_elapsed;
        if file.unparsable {
            self.unparsable.push(format!("{}: {}", file.file, file.skipped.unwrap_or_default()));
            return;
        }
        if let Some(reason) = file.skipped {
            self.files_skipped.entry(reason).or_default().push(file.file);
            return;
        }
        self.files_run += 1;
        for (k, n) in file.counts {
            *self.counts.entry(k).or_default() += n;
        }
        self.supported += file.supported;
        self.mismatches.extend(file.mismatches);
        self.stale.extend(file.stale);
    }

    pub fn totals(&self, index: usize, shards: usize) -> String {
        let skipped: usize = self.files_skipped.values().map(Vec::len).sum();
        let mut out = format!(
            "upstream_slt shard {index} of {shards}: {} files run, {skipped} files not run (skip.txt), {} supported records, {} mismatches, {:.0} s\n",
            self.files_run,
            self.supported,
            self.mismatches.len(),
            self.elapsed.as_secs_f64()
        );
        for (k, n) in &self.counts {
            out.push_str(&format!("  records {k}: {n}\n"));
        }
        for (reason, files) in &self.files_skipped {
            out.push_str(&format!("  files not run ({reason}): {}\n", files.join(" ")));
        }
        out
    }

    /// Everything that fails the shard.
    pub fn problems(&self, files_min: usize, supported_min: usize) -> Vec<String> {
        let mut problems: Vec<String> = self.mismatches.iter().map(|m| format!("MISMATCH {m}")).collect();
        problems.extend(self.stale.iter().map(|s| format!("STALE skip.txt entry: {s}")));
        problems.extend(self.unparsable.iter().map(|u| format!("UNPARSABLE {u}")));
        if self.files_run < files_min {
            problems.push(format!("only {} files ran (at least {files_min} expected): the suite checked too little", self.files_run));
        }
        if self.supported < supported_min {
            problems.push(format!("only {} supported records (at least {supported_min} expected): the suite checked too little", self.supported));
        }
        problems
    }
}
