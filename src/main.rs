//! The `quiver` binary: command-line glue over the library. No logic lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use datafusion::common::{DataFusionError, Result};
use quiver::bench::{
    run_latency, run_memory, run_mixed, run_recovery, run_skew, run_straggler, run_tpch, Comparison, LatencyBench, MemoryBench, MixedBench, RecoveryBench, SkewBench,
    StragglerBench, TpchBench,
};
use quiver::cli::Shell;
use quiver::client::Client;
use quiver::cluster::{LocalCluster, LocalOptions};
use quiver::config::{parse_bytes, CoordinatorConfig, WorkerConfig};
use quiver::coordinator::Coordinator;
use quiver::format::Format;
use quiver::tpch;
use quiver::web::{WebOptions, WebServer};
use quiver::auth::{parse_duration, AllowedPaths, Authenticator, ClusterKey, Credentials, Role, TlsIdentity, UserStore};
use quiver::transport::{ClientSecurity, NodeSecurity, ServerSecurity};
use std::sync::Arc;
use quiver::worker::Worker;

#[derive(Parser)]
#[command(name = "quiver", version, about = "Quiver: distributed SQL on DataFusion and Arrow Flight")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines to stderr as text, or as one JSON object per line for log pipelines. The level
    /// comes from RUST_LOG.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Read flags the command line leaves out from this TOML file (a section per command:
    /// [coordinator], [worker], [local], [sql]); else from ./quiver.toml if it exists.
    /// QUIVER_<FLAG> environment variables (QUIVER_DATA_DIR for --data-dir) come before it.
    #[arg(long, global = true, env = "QUIVER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Clone)]
struct Input {
    /// Run these SQL statements and exit.
    #[arg(short = 'c', long = "command")]
    command: Option<String>,
    /// Run the SQL statements in this file and exit.
    #[arg(short = 'f', long = "file", conflicts_with = "command")]
    file: Option<PathBuf>,
    /// Run TPC-H query N (1 to 22, built in) and exit.
    #[arg(long, value_name = "N", conflicts_with_all = ["command", "file"])]
    tpch_query: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

/// How the coordinator cuts scans into Tasks.
#[derive(clap::Args, Clone)]
struct PlannerArgs {
    /// A Task reads at least this much of a scan's input (unless a file is smaller), e.g. 16MiB.
    #[arg(long, value_parser = parse_bytes)]
    task_min_bytes: Option<u64>,
    /// Tasks per worker slot a scan Stage aims for.
    #[arg(long)]
    tasks_per_slot: Option<usize>,
    /// A query whose scans read at most this much, after row-group pruning, runs on the
    /// coordinator alone, e.g. 4MiB (the default); 0: every query that reads files is distributed.
    #[arg(long, value_parser = parse_bytes)]
    small_query_max_bytes: Option<u64>,
    /// Hand queued Tasks out first queued first, instead of by fair shares between Queries
    /// (the Query with the fewest running Tasks first).
    #[arg(long)]
    fifo: bool,
    /// Most Tasks one worker poll takes when many are queued (one per free slot of the
    /// worker); 1 turns batched dispatch off.
    #[arg(long)]
    poll_tasks_max: Option<usize>,
    /// An option every object store takes unless a table's OPTIONS say otherwise, e.g.
    /// aws.region=eu-west-1 or aws.endpoint=http://minio:9000; repeatable. Workers receive
    /// what they need from the coordinator.
    #[arg(long, value_name = "KEY=VALUE")]
    store_option: Vec<String>,
    /// Keep the files of tables Quiver writes (CREATE TABLE, INSERT) under this object store
    /// prefix, e.g. s3://bucket/warehouse, opened with the --store-option options, instead of
    /// in the data directory: workers on other hosts write there directly.
    #[arg(long, value_name = "URL")]
    warehouse: Option<String>,
}

impl PlannerArgs {
    fn config(&self) -> Result<CoordinatorConfig> {
        let mut config = CoordinatorConfig::default();
        if let Some(bytes) = self.task_min_bytes {
            config.planner.task_min_bytes = bytes;
        }
        if let Some(n) = self.tasks_per_slot {
            config.planner.tasks_per_slot = n;
        }
        if let Some(bytes) = self.small_query_max_bytes {
            config.planner.small_query_max_bytes = bytes;
        }
        config.fair_share = !self.fifo;
        if let Some(n) = self.poll_tasks_max {
            config.poll_tasks_max = n.max(1);
        }
        config.store_defaults = quiver::storage::StoreDefaults::parse(&self.store_option)?;
        config.warehouse = self.warehouse.clone();
        Ok(config)
    }
}

/// How a server admits callers and how it calls the others.
#[derive(clap::Args, Clone)]
struct SecurityArgs {
    /// A file holding the cluster secret (at least 16 bytes), the same on the coordinator and
    /// every worker: only processes that hold it may register, take Tasks, or read and free
    /// Task outputs.
    #[arg(long)]
    cluster_secret_file: Option<PathBuf>,
    /// Serve TLS with this certificate (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Trust the certificate authorities in this file (PEM) for https:// peers; by default
    /// --tls-cert itself (a certificate shared by the cluster, or one that carries its CA).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Listen on a non-loopback address without authentication: anyone who can reach the port
    /// could run SQL, join as a worker or read Task outputs.
    #[arg(long)]
    insecure: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator. With users in its data directory (`quiver user add`) every port
    /// requires authentication.
    Coordinator {
        #[arg(long, default_value = quiver::config::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Where the catalog and the tables Quiver writes live.
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
        /// Serve the web UI, JSON API and Prometheus metrics on this address, e.g. 127.0.0.1:8080.
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Let Prometheus read /metrics without credentials.
        #[arg(long)]
        metrics_unauthenticated: bool,
        /// Tables may also read and write files under this directory or object-store prefix
        /// (s3://bucket/prefix), besides the data directory; repeatable. Enforced whenever
        /// users are configured.
        #[arg(long)]
        allow_path: Vec<PathBuf>,
        #[command(flatten)]
        security: SecurityArgs,
        #[command(flatten)]
        planner: PlannerArgs,
    },
    /// Run a worker that pulls Tasks from a coordinator.
    Worker {
        #[arg(long, default_value = quiver::config::DEFAULT_COORDINATOR_URL)]
        coordinator: String,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[command(flatten)]
        security: SecurityArgs,
        /// Tasks run at once (default: the number of cores).
        #[arg(long)]
        slots: Option<usize>,
        /// Memory for executing Tasks and holding their outputs, e.g. 2GiB.
        #[arg(long, default_value = "2GiB", value_parser = parse_bytes)]
        memory_limit: u64,
        /// Extra slots that run only small Queries' Tasks, so that they never wait behind a
        /// large Query's (0: none).
        #[arg(long, default_value_t = 1)]
        express_slots: usize,
        /// The HOST:PORT the coordinator and the other workers reach this worker at, when it
        /// is not --listen (a worker listening on 0.0.0.0, behind NAT, in a container). The
        /// coordinator checks it at registration.
        #[arg(long, value_name = "HOST:PORT")]
        advertise: Option<String>,
        /// Compress the Task outputs this worker sends to others: worth it between hosts on a
        /// slow network, not on one host (see README).
        #[arg(long, value_enum, default_value = "none")]
        shuffle_compression: quiver::config::ShuffleCompression,
        /// Make this worker slow on purpose: each Task Attempt waits this long before it
        /// starts (tests and benchmarks of stragglers; 0: no wait).
        #[arg(long, default_value_t = 0)]
        task_delay_ms: u64,
    },
    /// Run a coordinator and N workers in this process, over loopback gRPC.
    Local {
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Compress the Task outputs workers send each other (as `quiver worker`); only with
        /// --over-network, since the workers of one process otherwise read each other's
        /// outputs directly.
        #[arg(long, value_enum, default_value = "none")]
        shuffle_compression: quiver::config::ShuffleCompression,
        /// Send Task outputs over Flight on loopback, as between hosts, instead of reading them
        /// in-process: to measure the network path.
        #[arg(long)]
        over_network: bool,
        /// Generate TPC-H data at this scale factor (cached) and register its 8 tables.
        #[arg(long)]
        tpch: Option<f64>,
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
        #[arg(long, default_value = quiver::config::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Keep serving outside clients until interrupted.
        #[arg(long)]
        serve: bool,
        /// Log in as this user (when the data directory has users); the password comes from
        /// QUIVER_PASSWORD, or is asked for.
        #[arg(long)]
        user: Option<String>,
        /// Listen beyond loopback with no users in the data directory: anyone who can reach
        /// the port could use the cluster.
        #[arg(long)]
        insecure: bool,
        /// Serve the web UI, JSON API and Prometheus metrics on this address, e.g. 127.0.0.1:8080.
        #[arg(long)]
        http: Option<SocketAddr>,
        #[command(flatten)]
        input: Input,
    },
    /// Send SQL to a coordinator.
    Sql {
        #[arg(long, default_value = quiver::config::DEFAULT_COORDINATOR_URL)]
        coordinator: String,
        /// Log in as this user; the password comes from QUIVER_PASSWORD, or is asked for.
        #[arg(long, conflicts_with = "token")]
        user: Option<String>,
        /// Present this token (from `quiver token create`); also read from QUIVER_TOKEN.
        #[arg(long, env = "QUIVER_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Trust the certificate authorities in this file (PEM) for an https:// coordinator.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        #[command(flatten)]
        input: Input,
    },
    /// Manage the users of a coordinator's data directory.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage client tokens: each is shown once, when created, and stored as a digest.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        bench: BenchCommand,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user (or set an existing one's password and role); the password is read from
    /// standard input.
    Add {
        name: String,
        #[arg(long, value_enum)]
        role: Role,
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
    },
    /// Remove a user and their tokens.
    Remove {
        name: String,
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
    },
    List {
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token for a user and print it.
    Create {
        user: String,
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
        /// How long it stays valid, e.g. 30d, 12h; without it, until revoked.
        #[arg(long, value_parser = parse_duration)]
        expires: Option<u64>,
    },
    /// List tokens (never the tokens themselves).
    List {
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
    },
    /// Revoke a token by the id `quiver token list` shows.
    Revoke {
        id: String,
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// TPC-H on a local cluster against single-node DataFusion, side by side.
    Tpch {
        #[arg(long, default_value_t = 1.0)]
        sf: f64,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Comma-separated query numbers (default: all 22).
        #[arg(long, value_delimiter = ',')]
        queries: Option<Vec<usize>>,
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        iterations: usize,
        /// Read Task outputs over Flight on loopback even within the process, as before
        /// in-process reads: to measure what they save.
        #[arg(long)]
        over_network: bool,
        /// Time the cluster with a setting at two values, side by side in the same run:
        /// `quiver.join_key_filters=true,false` (the first value is `cluster_ms`).
        #[arg(long, value_name = "NAME=A,B")]
        compare: Option<String>,
    },
    /// TPC-H on worker processes with a memory limit well below the data: every query must
    /// finish, spilling; peak memory per process and single-node DataFusion under the same limit.
    Memory {
        #[arg(long, default_value_t = 10.0)]
        sf: f64,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Comma-separated query numbers (default: all 22).
        #[arg(long, value_delimiter = ',')]
        queries: Option<Vec<usize>>,
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
        /// Files per table.
        #[arg(long, default_value_t = 4)]
        files: usize,
        /// Each worker's memory limit, and single-node DataFusion's (e.g. 4GiB).
        #[arg(long, default_value = "4GiB", value_parser = parse_bytes)]
        memory_limit: u64,
        /// Run the cluster's queries with this session setting, e.g. `quiver.speculation=false`
        /// (repeatable): to measure a mechanism's cost at scale.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        settings: Vec<String>,
    },
    /// TPC-H on a healthy local cluster, then with one worker killed part-way through each
    /// query and replaced: how long recovery takes, and that the answer stays the same.
    Recovery {
        #[arg(long, default_value_t = 1.0)]
        sf: f64,
        #[arg(long, default_value_t = 3)]
        workers: usize,
        /// Comma-separated query numbers (default: all 22).
        #[arg(long, value_delimiter = ',')]
        queries: Option<Vec<usize>>,
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
        /// When to kill, as a fraction of the query's healthy time.
        #[arg(long, default_value_t = 0.5)]
        kill_at: f64,
    },
    /// TPC-H on 2 worker processes, then with a third throttled by cpulimit, speculation on
    /// and off: a slow worker must never make the cluster slower than not having it.
    Straggler {
        #[arg(long, default_value_t = 1.0)]
        sf: f64,
        /// Comma-separated query numbers (default: all 22).
        #[arg(long, value_delimiter = ',')]
        queries: Option<Vec<usize>>,
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
        /// The slow worker's share of one core, in percent.
        #[arg(long, default_value_t = 25)]
        throttle_percent: u32,
        /// Slow the third worker by this wait before each Task Attempt instead of cpulimit:
        /// the same on any machine, whatever else runs on it.
        #[arg(long)]
        delay_ms: Option<u64>,
        /// Rounds, each running every query once in every configuration; the fastest counts.
        #[arg(long, default_value_t = 1)]
        iterations: usize,
    },
    /// Small queries on an idle cluster and while a large TPC-H query runs over and over, with
    /// fair shares between Queries and first queued first.
    Mixed {
        #[arg(long, default_value_t = 1.0)]
        sf: f64,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// The TPC-H query that loads the cluster.
        #[arg(long, default_value_t = 1)]
        large: usize,
        /// Runs of each small query per measurement.
        #[arg(long, default_value_t = 40)]
        samples: usize,
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
    },
    /// A small query's p50 and p99 over one Flight SQL connection, run on the coordinator alone
    /// and distributed to the workers.
    Latency {
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Timed runs of each query per placement.
        #[arg(long, default_value_t = 200)]
        samples: usize,
    },
    /// A shuffle join on Zipf-distributed keys against the same join on uniform keys, with
    /// skew splitting on and off.
    Skew {
        /// Fact rows (each of the skewed and the uniform table).
        #[arg(long, default_value_t = 16_000_000)]
        rows: u64,
        /// Distinct join keys (rows of the dimension table).
        #[arg(long, default_value_t = 1_000_000)]
        keys: u64,
        /// Exponent of the Zipf law of the skewed keys; 2 gives the hottest key about half the rows.
        #[arg(long, default_value_t = 2.0)]
        zipf: f64,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Shuffle partitions.
        #[arg(long, default_value_t = 8)]
        partitions: usize,
        #[arg(long, default_value = "quiver-data")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        iterations: usize,
    },
}

fn main() -> ExitCode {
    let argv = match quiver::settings::complete(&Cli::command(), std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(argv);
    // Servers log what they do; a shell or a benchmark keeps its terminal for results.
    let quiet = matches!(
        cli.command,
        Command::Sql { .. } | Command::Bench { .. } | Command::Local { serve: false, .. } | Command::User { .. } | Command::Token { .. }
    );
    init_logging(if quiet { "warn" } else { "info" }, cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", quiver::protocol::error_text(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Coordinator { listen, data_dir, http, metrics_unauthenticated, allow_path, security, planner } => {
            std::fs::create_dir_all(&data_dir)?;
            let users = UserStore::open(&data_dir)?;
            let users = users.has_users().then(|| Arc::new(users));
            let node = node_security(&security, true, users.clone(), [Some(listen), http])?;
            let mut config = planner.config()?;
            if users.is_some() || !allow_path.is_empty() {
                let mut roots = vec![data_dir.clone()];
                roots.extend(allow_path);
                config.allowed_paths = AllowedPaths::under(&roots);
            }
            let tls = node.server.tls.clone();
            let coordinator = Coordinator::start(config, &data_dir, bind(listen).await?, node).await?;
            eprintln!("coordinator listening on {}", coordinator.url());
            let web = match http {
                Some(addr) => {
                    let options = WebOptions { metrics_open: metrics_unauthenticated, tls };
                    Some(WebServer::bind(coordinator.core.cluster.clone(), coordinator.core.auth.clone(), addr, options).await?)
                }
                None => None,
            };
            web.iter().for_each(|web| eprintln!("web UI at {}", web.url()));
            wait_for_ctrl_c().await;
            if let Some(web) = web {
                web.shutdown().await;
            }
            coordinator.shutdown().await;
        }
        Command::Worker { coordinator, listen, security, slots, memory_limit, express_slots, advertise, shuffle_compression, task_delay_ms } => {
            let slots = slots.unwrap_or_else(quiver::config::default_parallelism);
            let config = WorkerConfig { slots, express_slots, memory_limit_bytes: memory_limit, advertise, shuffle_compression, task_delay_ms, ..WorkerConfig::default() };
            let node = node_security(&security, false, None, [Some(listen), None])?;
            let worker = Worker::start(config, &coordinator, bind(listen).await?, node).await?;
            eprintln!("worker serving on {}", worker.url());
            wait_for_ctrl_c().await;
            worker.shutdown().await;
        }
        Command::Local { workers, shuffle_compression, over_network, tpch: sf, data_dir, listen, serve, user, insecure, http, input } => {
            std::fs::create_dir_all(&data_dir)?;
            let exposed = [Some(listen), http].into_iter().flatten().find(|a| !a.ip().is_loopback());
            if let (Some(addr), false, false) = (exposed, UserStore::open(&data_dir)?.has_users(), insecure) {
                return Err(DataFusionError::Configuration(format!(
                    "refusing to listen on {addr} with no users: add some with `quiver user add`, or pass --insecure"
                )));
            }
            let opts = LocalOptions {
                workers,
                worker: WorkerConfig {
                    slots: quiver::config::default_parallelism().div_ceil(workers.max(1)).max(1),
                    shuffle_compression,
                    in_process_reads: !over_network,
                    ..WorkerConfig::default()
                },
                coordinator: CoordinatorConfig::default(),
                data_dir: data_dir.clone(),
                listen,
                http,
            };
            let cluster = LocalCluster::start(opts).await?;
            cluster.http_addr().iter().for_each(|addr| eprintln!("web UI at http://{addr}/"));
            let client = match user {
                Some(user) => Client::login(&cluster.url(), &user, &password(&user)?, None).await?,
                None => Client::connect(&cluster.url()).await?,
            };
            if let Some(sf) = sf {
                let dir = tpch::generate(&data_dir, sf, tpch::Layout::for_scale(sf))?;
                for sql in tpch::create_tables_sql(&dir) {
                    client.collect(&sql).await?;
                }
            }
            let result = if serve {
                eprintln!("quiver local: {workers} workers, coordinator at {}; Ctrl-C to stop", cluster.url());
                wait_for_ctrl_c().await;
                Ok(())
            } else {
                run_input(&client, &input).await
            };
            cluster.shutdown().await;
            result?;
        }
        Command::Sql { coordinator, user, token, tls_ca, input } => {
            let tls_ca = match tls_ca {
                Some(path) => Some(Arc::new(read_file(&path)?)),
                None => None,
            };
            let client = match (user, token) {
                (Some(user), _) => Client::login(&coordinator, &user, &password(&user)?, tls_ca).await?,
                (None, token) => {
                    let credentials = token.map_or(Credentials::None, Credentials::Bearer);
                    Client::connect_with(&coordinator, &ClientSecurity { credentials, tls_ca }).await?
                }
            };
            run_input(&client, &input).await?;
        }
        Command::User { command } => manage_users(command)?,
        Command::Token { command } => manage_tokens(command)?,
        Command::Bench { bench: BenchCommand::Tpch { sf, workers, queries, data_dir, iterations, over_network, compare } } => {
            let queries = queries.unwrap_or_else(|| (1..=22).collect());
            let compare = compare.as_deref().map(Comparison::parse).transpose()?;
            run_tpch(&TpchBench { sf, workers, queries, data_dir, iterations, over_network, compare }).await?;
        }
        Command::Bench { bench: BenchCommand::Memory { sf, workers, queries, data_dir, files, memory_limit, settings } } => {
            let queries = queries.unwrap_or_else(|| (1..=22).collect());
            run_memory(&MemoryBench { sf, workers, queries, data_dir, files, memory_limit_bytes: memory_limit, settings }).await?;
        }
        Command::Bench { bench: BenchCommand::Recovery { sf, workers, queries, data_dir, kill_at } } => {
            let queries = queries.unwrap_or_else(|| (1..=22).collect());
            run_recovery(&RecoveryBench { sf, workers, queries, data_dir, kill_at }).await?;
        }
        Command::Bench { bench: BenchCommand::Latency { workers, samples } } => {
            run_latency(&LatencyBench { workers, samples }).await?;
        }
        Command::Bench { bench: BenchCommand::Mixed { sf, workers, large, samples, data_dir } } => {
            run_mixed(&MixedBench { sf, workers, large, samples, data_dir }).await?;
        }
        Command::Bench { bench: BenchCommand::Skew { rows, keys, zipf, workers, partitions, data_dir, iterations } } => {
            run_skew(&SkewBench { rows, keys, zipf, workers, partitions, data_dir, iterations }).await?;
        }
        Command::Bench { bench: BenchCommand::Straggler { sf, queries, data_dir, throttle_percent, delay_ms, iterations } } => {
            let queries = queries.unwrap_or_else(|| (1..=22).collect());
            run_straggler(&StragglerBench { sf, queries, data_dir, throttle_percent, delay_ms, iterations }).await?;
        }
    }
    Ok(())
}

/// What a coordinator or worker started with these flags admits and presents. Refuses to
/// start a server that would listen beyond loopback with nobody authenticated, unless
/// `--insecure` says so.
fn node_security(args: &SecurityArgs, coordinator: bool, users: Option<Arc<UserStore>>, listens: [Option<SocketAddr>; 2]) -> Result<NodeSecurity> {
    let key = match &args.cluster_secret_file {
        Some(path) => Some(ClusterKey::from_file(path)?),
        None => None,
    };
    if users.is_some() && key.is_none() {
        return Err(DataFusionError::Configuration(
            "this data directory has users, so the cluster is closed: give the coordinator and every worker the same \
             --cluster-secret-file"
                .into(),
        ));
    }
    let closed = key.is_some() && (users.is_some() || !coordinator);
    let exposed = listens.iter().flatten().find(|a| !a.ip().is_loopback());
    if let (Some(addr), false, false) = (exposed, closed, args.insecure) {
        let how = if key.is_none() {
            "give it --cluster-secret-file (and, on the coordinator, add users with `quiver user add`)"
        } else {
            "add users with `quiver user add`"
        };
        return Err(DataFusionError::Configuration(format!(
            "refusing to listen on {addr} without authentication: anyone who can reach it could use the cluster; {how}, \
             or pass --insecure"
        )));
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsIdentity::from_files(cert, key)?),
        _ => None,
    };
    if exposed.is_some() && closed && tls.is_none() {
        tracing::warn!("credentials will cross the network in the clear: give --tls-cert and --tls-key");
    }
    let tls_ca = match args.tls_ca.as_ref().or(args.tls_cert.as_ref()) {
        Some(path) => Some(Arc::new(read_file(path)?)),
        None => None,
    };
    let credentials = key.clone().map_or(Credentials::None, |key| Credentials::Node { key, name: String::new() });
    Ok(NodeSecurity {
        server: ServerSecurity { auth: Arc::new(Authenticator::new(users, key)), tls },
        client: ClientSecurity { credentials, tls_ca },
    })
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| DataFusionError::Configuration(format!("cannot read {}: {e}", path.display())))
}

/// A user's password: from QUIVER_PASSWORD, or asked for on the terminal without echo.
fn password(user: &str) -> Result<String> {
    if let Ok(password) = std::env::var("QUIVER_PASSWORD") {
        return Ok(password);
    }
    rpassword::prompt_password(format!("Password for {user}: "))
        .map_err(|e| DataFusionError::Configuration(format!("no password: set QUIVER_PASSWORD or run in a terminal ({e})")))
}

fn manage_users(command: UserCommand) -> Result<()> {
    let refused = DataFusionError::from;
    match command {
        UserCommand::Add { name, role, data_dir } => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let password = line.trim_end_matches(['\n', '\r']);
            UserStore::open(&data_dir).map_err(refused)?.add_user(&name, role, password).map_err(refused)?;
            eprintln!("user {name} ({role:?}) saved in {}", data_dir.display());
        }
        UserCommand::Remove { name, data_dir } => UserStore::open(&data_dir).map_err(refused)?.remove_user(&name).map_err(refused)?,
        UserCommand::List { data_dir } => {
            for (name, role) in UserStore::open(&data_dir).map_err(refused)?.users().map_err(refused)? {
                println!("{name}\t{}", format!("{role:?}").to_lowercase());
            }
        }
    }
    Ok(())
}

fn manage_tokens(command: TokenCommand) -> Result<()> {
    let refused = DataFusionError::from;
    match command {
        TokenCommand::Create { user, data_dir, expires } => {
            let (token, info) = UserStore::open(&data_dir).map_err(refused)?.create_token(&user, expires).map_err(refused)?;
            eprintln!("token {} for {user}; it is shown only now:", info.id);
            println!("{token}");
        }
        TokenCommand::List { data_dir } => {
            for t in UserStore::open(&data_dir).map_err(refused)?.tokens().map_err(refused)? {
                let state = if t.revoked { "revoked".to_string() } else { t.expires_ms.map_or("valid".into(), |ms| format!("expires_ms={ms}")) };
                println!("{}\t{}\t{state}", t.id, t.user);
            }
        }
        TokenCommand::Revoke { id, data_dir } => UserStore::open(&data_dir).map_err(refused)?.revoke_token(&id).map_err(refused)?,
    }
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| DataFusionError::Execution(format!("cannot listen on {addr}: {e}")))
}

async fn wait_for_ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

async fn run_input(client: &Client, input: &Input) -> Result<()> {
    let mut shell = Shell::new(client.clone(), input.format);
    if let Some(n) = input.tpch_query {
        return shell.run_script(&quiver::tpch::query_sql(n)?).await;
    }
    match (&input.command, &input.file) {
        (Some(sql), _) => shell.run_script(sql).await,
        (None, Some(path)) => {
            let script = std::fs::read_to_string(path)
                .map_err(|e| DataFusionError::Execution(format!("cannot read {}: {e}", path.display())))?;
            shell.run_script(&script).await
        }
        (None, None) => shell.repl().await,
    }
}
