//! A cluster of real `quiver coordinator` and `quiver worker` processes for fault tests: workers
//! listen on known ports so that a test can find the process behind a worker id and kill it
//! (`SIGKILL`), freeze it (`SIGSTOP`) or cut its network (see [`Netns`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quiver::client::Client;

use super::{free_port, quiver_binary, rows, KillOnDrop};

/// How long a cluster waits for its workers to register.
const REGISTER_DEADLINE: Duration = Duration::from_secs(30);

pub struct Worker {
    /// The address the worker listens on and advertises.
    pub addr: String,
    /// The network namespace it runs in, if any.
    pub netns: Option<String>,
    pub process: Option<KillOnDrop>,
}

impl Worker {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.0.id())
    }
}

pub struct ProcCluster {
    pub port: u16,
    pub dir: tempfile::TempDir,
    coordinator: Option<KillOnDrop>,
    coordinator_args: Vec<String>,
    pub workers: Vec<Worker>,
    worker_args: Vec<String>,
    /// Where workers reach the coordinator.
    coordinator_url: String,
    /// Where the test reaches it.
    client_url: String,
    /// The network namespace it runs in, if any.
    coordinator_netns: Option<String>,
}

impl ProcCluster {
    /// A coordinator on a free loopback port (with `coordinator_args`) and `workers` workers.
    pub fn start(workers: usize, coordinator_args: &[&str], worker_args: &[&str]) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        Self::start_listening(&listen, &format!("http://{listen}"), workers, coordinator_args, worker_args)
    }

    /// A coordinator listening on `listen`, which workers reach at `coordinator_url`.
    pub fn start_listening(listen: &str, coordinator_url: &str, workers: usize, coordinator_args: &[&str], worker_args: &[&str]) -> Self {
        Self::start_listening_in(None, listen, coordinator_url, workers, coordinator_args, worker_args)
    }

    fn start_listening_in(
        netns: Option<String>,
        listen: &str,
        coordinator_url: &str,
        workers: usize,
        coordinator_args: &[&str],
        worker_args: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("listen address with a port");
        // Tests distribute their small tables: nothing runs on the coordinator for being small.
        let mut args: Vec<String> = vec!["coordinator".into(), "--listen".into(), listen.into(), "--small-query-max-bytes".into(), "0".into()];
        args.extend(["--data-dir".into(), dir.path().join("data").display().to_string()]);
        // The cluster is closed, as on a real network: workers prove they hold its secret. Its
        // clients (the tests) are not authenticated, which a coordinator listening beyond
        // loopback accepts only with --insecure.
        let secret = dir.path().join("cluster-secret");
        std::fs::write(&secret, "a test cluster's secret, 32 bytes").expect("secret file");
        let secret_args = ["--cluster-secret-file".to_string(), secret.display().to_string()];
        args.extend(secret_args.iter().cloned());
        if !listen.starts_with("127.") {
            args.push("--insecure".into());
        }
        args.extend(coordinator_args.iter().map(|a| a.to_string()));
        let worker_args: Vec<String> = secret_args.into_iter().chain(worker_args.iter().map(|a| a.to_string())).collect();
        let mut cluster = Self {
            port,
            dir,
            coordinator: None,
            coordinator_args: args,
            workers: Vec::new(),
            worker_args,
            coordinator_url: coordinator_url.to_string(),
            client_url: format!("http://127.0.0.1:{port}"),
            coordinator_netns: netns,
        };
        cluster.start_coordinator();
        for _ in 0..workers {
            cluster.add_worker();
        }
        cluster
    }

    /// A coordinator on host `host` of `net`, a namespace of its own, listening on the host's
    /// address, where the workers and the test reach it. Workers join with `add_worker_at` on
    /// hosts of their own.
    pub fn start_on_host(net: &Netns, host: usize, coordinator_args: &[&str], worker_args: &[&str]) -> Self {
        let listen = format!("{}:{}", net.host(host), free_port());
        let url = format!("http://{listen}");
        let mut cluster = Self::start_listening_in(Some(net.name(host)), &listen, &url, 0, coordinator_args, worker_args);
        cluster.client_url = url;
        cluster
    }

    pub fn url(&self) -> String {
        self.client_url.clone()
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    pub fn start_coordinator(&mut self) {
        let child = spawn(self.coordinator_netns.as_deref(), &self.coordinator_args, &self.log("coordinator"));
        self.coordinator = Some(child);
    }

    /// `kill -9` of the coordinator.
    pub fn kill_coordinator(&mut self) {
        drop(self.coordinator.take());
    }

    /// Starts one more worker on a free loopback port; returns its index.
    pub fn add_worker(&mut self) -> usize {
        self.add_worker_at(format!("127.0.0.1:{}", free_port()), None)
    }

    /// Starts one more worker on a free loopback port with `extra` arguments besides the
    /// cluster's worker arguments; returns its index.
    pub fn add_worker_with(&mut self, extra: &[&str]) -> usize {
        self.spawn_worker(format!("127.0.0.1:{}", free_port()), None, extra)
    }

    /// Starts one more worker listening on `addr`, in network namespace `netns` if given.
    pub fn add_worker_at(&mut self, addr: String, netns: Option<String>) -> usize {
        self.spawn_worker(addr, netns, &[])
    }

    fn spawn_worker(&mut self, addr: String, netns: Option<String>, extra: &[&str]) -> usize {
        let index = self.workers.len();
        let mut args: Vec<String> = vec!["worker".into(), "--coordinator".into(), self.coordinator_url.clone()];
        args.extend(["--listen".into(), addr.clone()]);
        args.extend(self.worker_args.iter().cloned());
        args.extend(extra.iter().map(|a| a.to_string()));
        let child = spawn(netns.as_deref(), &args, &self.log(&format!("worker-{index}")));
        self.workers.push(Worker { addr, netns, process: Some(child) });
        index
    }

    /// `kill -9` of worker `index`: no goodbye.
    pub fn kill_worker(&mut self, index: usize) {
        drop(self.workers[index].process.take());
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to worker `index`.
    pub fn signal_worker(&self, index: usize, signal: &str) {
        let pid = self.workers[index].pid().expect("the worker runs").to_string();
        let status = Command::new("kill").args([&format!("-{signal}"), &pid]).status().expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// The index of the worker registered as `worker_id`, from `quiver.workers`.
    pub async fn worker_index(&self, client: &Client, worker_id: &str) -> Option<usize> {
        let sql = format!("SELECT address FROM quiver.workers WHERE worker_id = '{worker_id}'");
        let found = rows(&client.collect(&sql).await.ok()?.1);
        let address = found.first()?.first()?.clone();
        self.workers.iter().position(|w| w.url() == address)
    }

    /// Connects a client, retrying while the coordinator starts.
    pub async fn client(&self) -> Client {
        let deadline = Instant::now() + REGISTER_DEADLINE;
        loop {
            match Client::connect(&self.url()).await {
                Ok(client) if client.collect("SELECT 1").await.is_ok() => return client,
                _ if Instant::now() > deadline => panic!("the coordinator at {} did not answer", self.url()),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Waits until exactly `n` workers are alive.
    pub async fn wait_alive(&self, client: &Client, n: usize) {
        let deadline = Instant::now() + REGISTER_DEADLINE;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok((_, batches)) = client.collect("SELECT count(*) FROM quiver.workers WHERE alive").await {
                last = rows(&batches)[0][0].clone();
                if last == n.to_string() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{last} workers alive, not {n}; logs in {}", self.dir.path().display());
    }
}

fn spawn(netns: Option<&str>, args: &[String], log: &Path) -> KillOnDrop {
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(quiver_binary());
            c
        }
        None => Command::new(quiver_binary()),
    };
    let child = command
        .args(args)
        .env("RUST_LOG", std::env::var("QUIVER_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start quiver {args:?}: {e}"));
    KillOnDrop(child)
}

/// Network namespaces, one per simulated host, each joined to this namespace by a veth pair
/// with its own /24: host `i` is `10.<net>.<i>.2`, its link's end here `10.<net>.<i>.1`, and
/// this namespace routes between hosts. Removed when dropped. Needs root (tests and CI run as
/// root).
pub struct Netns {
    prefix: String,
    net: u8,
    hosts: usize,
}

impl Netns {
    pub fn create(hosts: usize) -> Self {
        assert!(is_root(), "network namespace tests need root (tests and CI run as root)");
        // Unique per test process, so that concurrent tests never share names or addresses.
        let id = std::process::id();
        let prefix = format!("qv{}", id % 100_000);
        let net = 100 + (id % 100) as u8;
        let mut netns = Self { prefix, net, hosts: 0 };
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding");
        let _ = Command::new("ip").args(["addr", "del", &format!("{}/32", netns.coordinator_address()), "dev", "lo"]).output();
        ip(&["addr", "add", &format!("{}/32", netns.coordinator_address()), "dev", "lo"]);
        for i in 0..hosts {
            netns.add_host(i);
        }
        netns
    }

    fn add_host(&mut self, i: usize) {
        let (ns, outside, inside) = (self.name(i), self.link(i), format!("{}i{i}", self.prefix));
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let _ = Command::new("ip").args(["link", "del", &outside]).status();
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &outside, "type", "veth", "peer", "name", &inside]);
        ip(&["link", "set", &inside, "netns", &ns]);
        ip(&["addr", "add", &format!("{}/24", self.gateway(i)), "dev", &outside]);
        ip(&["link", "set", &outside, "up"]);
        ip(&["netns", "exec", &ns, "ip", "addr", "add", &format!("{}/24", self.host(i)), "dev", &inside]);
        ip(&["netns", "exec", &ns, "ip", "link", "set", &inside, "up"]);
        ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        ip(&["netns", "exec", &ns, "ip", "route", "add", "default", "via", &self.gateway(i)]);
        self.hosts = self.hosts.max(i + 1);
    }

    pub fn name(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    fn link(&self, i: usize) -> String {
        format!("{}o{i}", self.prefix)
    }

    /// An address of this namespace that every host reaches whichever links are up: where the
    /// coordinator is.
    pub fn coordinator_address(&self) -> String {
        format!("10.{}.0.1", self.net)
    }

    /// The address of host `i`.
    pub fn host(&self, i: usize) -> String {
        format!("10.{}.{}.2", self.net, i + 1)
    }

    /// The address of this namespace on host `i`'s link: its route to every other host.
    fn gateway(&self, i: usize) -> String {
        format!("10.{}.{}.1", self.net, i + 1)
    }

    /// Host `from` can no longer open connections to host `to` (a `prohibit` route: refused at
    /// once), or can again; every other path stays as it was.
    pub fn block(&self, from: usize, to: usize, blocked: bool) {
        let verb = if blocked { "add" } else { "del" };
        ip(&["netns", "exec", &self.name(from), "ip", "route", verb, "prohibit", &format!("{}/32", self.host(to))]);
    }

    /// Cuts host `i` off the network (its link goes down), or joins it again.
    pub fn set_link(&self, i: usize, up: bool) {
        ip(&["link", "set", &self.link(i), if up { "up" } else { "down" }]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["addr", "del", &format!("{}/32", self.coordinator_address()), "dev", "lo"]).output();
        for i in 0..self.hosts {
            let _ = Command::new("ip").args(["link", "del", &self.link(i)]).status();
            let _ = Command::new("ip").args(["netns", "del", &self.name(i)]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs (Debian package iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}
