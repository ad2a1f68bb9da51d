//! The `quiver sql` shell: runs scripts and statements, or an interactive REPL with history,
//! multi-line statements, `\timing`, a progress bar driven by Task completion, and Ctrl-C that
//! cancels the running Query (its Tasks stop on every worker) instead of killing the shell.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{DataFusionError, Result};

use crate::protocol::{error_text, quiver_error, ErrorKind};
use futures::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rustyline::error::ReadlineError;

use crate::client::{split_statements, Client, Statement};
use crate::format::{self, Format};

/// Lines of REPL history kept in `~/.quiver_history`.
const HISTORY_ENTRIES_MAX: usize = 1_000;
/// A Query shows a progress bar once it has run this long: quick ones never flicker.
const PROGRESS_DELAY_MS: u64 = 300;
/// How often the progress bar asks the coordinator how far the Query has got.
const PROGRESS_POLL_MS: u64 = 100;

pub struct Shell {
    client: Client,
    format: Format,
    timing: bool,
    /// Progress bars only where a person watches: stderr is a terminal.
    progress: bool,
}

impl Shell {
    pub fn new(client: Client, format: Format) -> Self {
        Self { client, format, timing: false, progress: std::io::stderr().is_terminal() }
    }

    /// Runs every statement of a script; the first error stops it.
    pub async fn run_script(&mut self, script: &str) -> Result<()> {
        for statement in split_statements(script)? {
            self.run_statement(&statement).await?;
        }
        Ok(())
    }

    /// Runs one statement and prints its result. Ctrl-C cancels its Query.
    pub async fn run_statement(&mut self, sql: &str) -> Result<()> {
        let started = Instant::now();
        let (schema, batches) = self.execute(sql).await?;
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        format::write(&mut out, self.format, &schema, &batches)?;
        out.flush().map_err(io_error)?;
        if self.timing {
            eprintln!("Time: {:.3} s", started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Starts a statement and collects its result while a progress bar follows its Tasks. One
    /// Ctrl-C listener covers the whole statement: before the coordinator has answered, dropping
    /// the call ends the Query there; after, `CancelFlightInfo` is sent while the stream is still
    /// open, so the Query ends as cancelled and the shell says so.
    async fn execute(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let statement = tokio::select! {
            statement = self.client.start(sql) => statement?,
            _ = &mut ctrl_c => return Err(quiver_error(ErrorKind::Cancelled, "cancelled before the query started")),
        };
        let fetch = self.client.fetch(&statement);
        tokio::pin!(fetch);
        let stream = tokio::select! {
            stream = &mut fetch => stream?,
            _ = &mut ctrl_c => return Err(self.cancel(&statement).await),
        };
        let schema = stream.schema();
        let collect = stream.try_collect::<Vec<_>>();
        tokio::pin!(collect);
        let batches = tokio::select! {
            batches = &mut collect => batches?,
            _ = self.follow(&statement) => unreachable!("progress runs until dropped"),
            _ = &mut ctrl_c => return Err(self.cancel(&statement).await),
        };
        Ok((schema, batches))
    }

    /// Cancels a statement's Query; the error says whether it was still running.
    async fn cancel(&self, statement: &Statement) -> DataFusionError {
        let what = match self.client.cancel(statement).await {
            Ok(true) => "cancelled".to_string(),
            Ok(false) => "had already ended".to_string(),
            Err(e) => format!("could not be cancelled: {e}"),
        };
        quiver_error(ErrorKind::Cancelled, format!("query {} {what}", statement.handle))
    }

    /// Draws a progress bar of the statement's Tasks until dropped.
    async fn follow(&self, statement: &Statement) {
        if !self.progress {
            return std::future::pending().await;
        }
        tokio::time::sleep(Duration::from_millis(PROGRESS_DELAY_MS)).await;
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} tasks, {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(PROGRESS_POLL_MS));
        let _clear = ClearOnDrop(bar.clone());
        loop {
            if let Ok(p) = self.client.progress(statement).await {
                bar.set_length(u64::from(p.tasks_total));
                bar.set_position(u64::from(p.tasks_done));
                bar.set_message(format!("{} running", p.tasks_running));
            }
            bar.tick();
            tokio::time::sleep(Duration::from_millis(PROGRESS_POLL_MS)).await;
        }
    }

    /// Handles a backslash command; false when it is not one.
    fn command(&mut self, line: &str) -> bool {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("\\timing"), arg) => {
                self.timing = match arg {
                    Some("on") => true,
                    Some("off") => false,
                    _ => !self.timing,
                };
                eprintln!("Timing is {}.", if self.timing { "on" } else { "off" });
            }
            (Some("\\format"), Some(name)) => match <Format as clap::ValueEnum>::from_str(name, true) {
                Ok(format) => self.format = format,
                Err(_) => eprintln!("unknown format '{name}': use table, csv or json"),
            },
            (Some("\\?"), _) => eprintln!("{HELP}"),
            _ => return false,
        }
        true
    }

    /// The REPL. With a terminal: line editing and history; otherwise lines from stdin, and any
    /// failed statement makes the exit status non-zero.
    pub async fn repl(&mut self) -> Result<()> {
        if std::io::stdin().is_terminal() {
            return self.interactive().await;
        }
        let mut lines = Lines::default();
        let mut failed = false;
        for line in std::io::stdin().lock().lines() {
            match lines.push(&line.map_err(io_error)?) {
                Input::Quit => break,
                Input::Command(c) => {
                    if !self.command(&c) {
                        eprintln!("unknown command {c}; \\? lists them");
                        failed = true;
                    }
                }
                Input::Statement(sql) => failed |= report(self.run_script(&sql).await),
                Input::More => {}
            }
        }
        if failed {
            return Err(quiver_error(ErrorKind::Execution, "some statements failed"));
        }
        Ok(())
    }

    async fn interactive(&mut self) -> Result<()> {
        let config = rustyline::Config::builder().max_history_size(HISTORY_ENTRIES_MAX).map_err(readline_error)?.build();
        let mut editor = rustyline::DefaultEditor::with_config(config).map_err(readline_error)?;
        let history = history_file();
        if let Some(path) = &history {
            let _ = editor.load_history(path);
        }
        eprintln!("Connected to Quiver. End statements with ';'. \\? for help, \\q to quit.");
        let mut lines = Lines::default();
        loop {
            let prompt = if lines.buffer.is_empty() { "quiver> " } else { "   ...> " };
            let line = match tokio::task::block_in_place(|| editor.readline(prompt)) {
                Ok(line) => line,
                Err(ReadlineError::Interrupted) => {
                    lines.buffer.clear();
                    continue;
                }
                Err(ReadlineError::Eof) => break,
                Err(e) => return Err(readline_error(e)),
            };
            match lines.push(&line) {
                Input::Quit => break,
                Input::Command(c) => {
                    let _ = editor.add_history_entry(c.as_str());
                    if !self.command(&c) {
                        eprintln!("unknown command {c}; \\? lists them");
                    }
                }
                Input::Statement(sql) => {
                    let _ = editor.add_history_entry(sql.trim());
                    report(self.run_script(&sql).await);
                }
                Input::More => {}
            }
        }
        if let Some(path) = &history {
            let _ = editor.save_history(path);
        }
        Ok(())
    }

}

const HELP: &str = "\\timing [on|off]   print how long each statement took
\\format table|csv|json   how results are printed
\\q                 quit
Statements end with ';' and may span lines. Ctrl-C cancels the running query.";

/// What one more line of input completes.
enum Input {
    Statement(String),
    Command(String),
    Quit,
    More,
}

/// Gathers lines into statements: a statement ends with a line ending in `;`; a backslash
/// command is a line of its own.
#[derive(Default)]
struct Lines {
    buffer: String,
}

impl Lines {
    fn push(&mut self, line: &str) -> Input {
        let trimmed = line.trim();
        if self.buffer.is_empty() {
            if matches!(trimmed, "\\q" | "quit" | "exit") {
                return Input::Quit;
            }
            if trimmed.starts_with('\\') {
                return Input::Command(trimmed.to_string());
            }
            if trimmed.is_empty() {
                return Input::More;
            }
        }
        self.buffer.push_str(line);
        self.buffer.push('\n');
        if trimmed.ends_with(';') {
            Input::Statement(std::mem::take(&mut self.buffer))
        } else {
            Input::More
        }
    }
}

/// Prints an error; true when there was one.
fn report(result: Result<()>) -> bool {
    match result {
        Ok(()) => false,
        Err(e) => {
            eprintln!("Error: {}", error_text(&e));
            true
        }
    }
}

struct ClearOnDrop(ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn history_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".quiver_history"))
}

fn io_error(e: std::io::Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

fn readline_error(e: ReadlineError) -> DataFusionError {
    quiver_error(ErrorKind::Io, format!("terminal: {e}"))
}
