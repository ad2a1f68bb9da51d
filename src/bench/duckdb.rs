//! DuckDB beside the cluster in `quiver bench tpch`, when its Python package is installed
//! (never required): users ask how the cluster compares with the single-machine engine they
//! know, on the same files and cores. One `python3` process serves the whole run, so its
//! start-up and DuckDB's file metadata caches are paid once, as they are for the cluster.
//!
//! The protocol is one JSON line each way: the SQL of a query in, `{"ms": …, "rows": …}` or
//! `{"error": …}` out. The time includes fetching every row, as the cluster's does.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use datafusion::common::{DataFusionError, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Longest a query may take in DuckDB before the benchmark gives up on it.
const DUCKDB_QUERY_TIMEOUT_MS: u64 = 600_000;

const SERVER: &str = r#"
import duckdb, json, sys, time
root = sys.argv[1]
con = duckdb.connect()
for t in ["nation", "region", "part", "supplier", "partsupp", "customer", "orders", "lineitem"]:
    con.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{root}/{t}/*.parquet')")
print(json.dumps({"version": duckdb.__version__, "threads": con.execute("SELECT current_setting('threads')").fetchone()[0]}), flush=True)
for line in sys.stdin:
    sql = json.loads(line)
    try:
        started = time.perf_counter()
        rows = con.execute(sql).fetchall()
        print(json.dumps({"ms": (time.perf_counter() - started) * 1e3, "rows": len(rows)}), flush=True)
    except Exception as e:
        print(json.dumps({"error": str(e)}), flush=True)
"#;

/// A DuckDB session over the TPC-H files of one directory.
pub struct DuckDb {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// DuckDB's version and thread count, for the benchmark's header.
    pub description: String,
}

impl DuckDb {
    /// Starts DuckDB over `dir`, or `None` (with the reason) when Python or its `duckdb`
    /// package is not there.
    pub async fn start(dir: &Path) -> std::result::Result<Self, String> {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(SERVER)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run python3: {e}"))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let hello = match lines.next_line().await {
            Ok(Some(line)) => line,
            _ => return Err("the duckdb Python package is not installed (pip install duckdb)".into()),
        };
        let hello: serde_json::Value = serde_json::from_str(&hello).map_err(|e| format!("DuckDB said {hello:?}: {e}"))?;
        let description = format!("DuckDB {} with {} threads", hello["version"].as_str().unwrap_or("?"), hello["threads"]);
        Ok(Self { child, stdin, lines, description })
    }

    /// Runs `sql` and returns its time in ms and its row count.
    pub async fn run(&mut self, sql: &str) -> Result<(f64, usize)> {
        let failed = |what: String| DataFusionError::Execution(format!("DuckDB: {what}"));
        let mut line = serde_json::to_string(sql).map_err(|e| failed(e.to_string()))?;
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        let answer = tokio::time::timeout(Duration::from_millis(DUCKDB_QUERY_TIMEOUT_MS), self.lines.next_line())
            .await
            .map_err(|_| failed(format!("no answer within {DUCKDB_QUERY_TIMEOUT_MS} ms")))??
            .ok_or_else(|| failed("the process ended".into()))?;
        let answer: serde_json::Value = serde_json::from_str(&answer).map_err(|e| failed(format!("{answer:?}: {e}")))?;
        if let Some(error) = answer["error"].as_str() {
            return Err(failed(error.to_string()));
        }
        match (answer["ms"].as_f64(), answer["rows"].as_u64()) {
            (Some(ms), Some(rows)) => Ok((ms, rows as usize)),
            _ => Err(failed(format!("unexpected answer {answer}"))),
        }
    }
}

impl Drop for DuckDb {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
