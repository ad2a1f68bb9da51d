//! Security as users meet it on the command line, with real `quiver` processes: `quiver user
//! add` and `quiver token create`, `quiver sql --user/--token`, servers that refuse to listen
//! beyond loopback with nobody authenticated, and TLS on every port.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, quiver_binary, KillOnDrop};

/// Runs `quiver args…` with `stdin` and extra environment variables.
fn quiver(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(quiver_binary())
        .args(args)
        .env_remove("QUIVER_TOKEN")
        .env_remove("QUIVER_PASSWORD")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("quiver runs");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn server(args: &[&str], log: &Path) -> KillOnDrop {
    let child = Command::new(quiver_binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("quiver starts");
    KillOnDrop(child)
}

/// Runs `sql` through `quiver sql` with `auth` arguments until it succeeds (the servers may
/// still be starting); returns its CSV output.
fn sql_when_up(url: &str, auth: &[&str], env: &[(&str, &str)], sql: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut args = vec!["sql", "--coordinator", url, "--format", "csv", "-c", sql];
        args.extend_from_slice(auth);
        let out = quiver(&args, "", env);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).to_string();
        }
        assert!(Instant::now() < deadline, "{sql} never succeeded: {}", text(&out));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `quiver user add NAME --role ROLE --data-dir DATA`, the password on standard input.
fn add_user(data: &str, name: &str, role: &str, password: &str) {
    let added = quiver(&["user", "add", name, "--role", role, "--data-dir", data], &format!("{password}\n"), &[]);
    assert!(added.status.success(), "{}", text(&added));
}

fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("cluster-secret");
    std::fs::write(&path, "this cluster's secret: 0123456789\n").unwrap();
    path
}

#[test]
fn users_and_tokens_from_the_command_line_log_in_and_strangers_stay_out() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    add_user(data_arg, "ada", "admin", "admin password");
    add_user(data_arg, "rex", "reader", "reader password");
    let created = quiver(&["token", "create", "rex", "--data-dir", data_arg, "--expires", "30d"], "", &[]);
    assert!(created.status.success(), "{}", text(&created));
    let token = String::from_utf8_lossy(&created.stdout).trim().to_string();
    assert!(token.starts_with("qvt_"), "{token}");

    let secret = secret_file(dir.path());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let secret_arg = secret.to_str().unwrap();
    let common = ["--cluster-secret-file", secret_arg];
    let coordinator_args = ["coordinator", "--listen", &listen, "--data-dir", data_arg, "--small-query-max-bytes", "0"];
    let _coordinator = server(&[&coordinator_args[..], &common[..]].concat(), &dir.path().join("coordinator.log"));
    let _worker = server(&["worker", "--coordinator", &url, "--cluster-secret-file", secret_arg], &dir.path().join("worker.log"));
    // A worker without the secret never joins.
    let _stranger = server(&["worker", "--coordinator", &url], &dir.path().join("stranger.log"));

    let admin = [("QUIVER_PASSWORD", "admin password")];
    sql_when_up(&url, &["--user", "ada"], &admin, "CREATE TABLE t AS SELECT value AS v FROM generate_series(1, 1000)");
    let sum = sql_when_up(&url, &["--token", &token], &[], "SELECT sum(v) AS s FROM t");
    assert!(sum.contains("500500"), "{sum}");

    let anonymous = quiver(&["sql", "--coordinator", &url, "-c", "SELECT 1"], "", &[]);
    assert!(!anonymous.status.success() && text(&anonymous).contains("authentication required"), "{}", text(&anonymous));
    let wrong = quiver(&["sql", "--coordinator", &url, "--user", "ada", "-c", "SELECT 1"], "", &[("QUIVER_PASSWORD", "guess")]);
    assert!(!wrong.status.success() && text(&wrong).contains("wrong user name or password"), "{}", text(&wrong));
    let reader_drop = quiver(&["sql", "--coordinator", &url, "--token", &token, "-c", "DROP TABLE t"], "", &[]);
    assert!(!reader_drop.status.success() && text(&reader_drop).contains("is a reader"), "{}", text(&reader_drop));

    let workers = sql_when_up(&url, &["--user", "ada"], &admin, "SELECT count(*) AS n FROM quiver.workers");
    assert!(workers.lines().nth(1) == Some("1"), "only the worker with the secret joined: {workers}");
    let stranger_log = std::fs::read_to_string(dir.path().join("stranger.log")).unwrap();
    assert!(stranger_log.contains("authentication required"), "the stranger is told why: {stranger_log}");

    let listed = quiver(&["token", "list", "--data-dir", data_arg], "", &[]);
    let id = String::from_utf8_lossy(&listed.stdout).split_whitespace().next().unwrap().to_string();
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&token), "tokens are never shown again");
    assert!(quiver(&["token", "revoke", &id, "--data-dir", data_arg], "", &[]).status.success());
    let revoked = quiver(&["sql", "--coordinator", &url, "--token", &token, "-c", "SELECT 1"], "", &[]);
    assert!(!revoked.status.success() && text(&revoked).contains("revoked"), "{}", text(&revoked));
}

/// Waits for a process to exit; None if it is still running after `limit`.
fn exited(child: &mut KillOnDrop, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.0.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_server_beyond_loopback_with_nobody_authenticated_refuses_to_start_without_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let public = format!("0.0.0.0:{}", free_port());
    let log = dir.path().join("refused.log");
    for args in [
        vec!["coordinator", "--listen", &public, "--data-dir", data.to_str().unwrap()],
        vec!["worker", "--listen", &public],
    ] {
        let mut child = server(&args, &log);
        let status = exited(&mut child, Duration::from_secs(20)).expect("it refuses at once");
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(!status.success() && said.contains("refusing to listen") && said.contains("--insecure"), "{args:?}: {said}");
    }
    let mut insecure = server(&["coordinator", "--listen", &public, "--data-dir", data.to_str().unwrap(), "--insecure"], &log);
    assert!(exited(&mut insecure, Duration::from_secs(2)).is_none(), "--insecure starts anyway");
    drop(insecure);

    // With users and the cluster secret, it starts as it is.
    add_user(data.to_str().unwrap(), "ada", "admin", "admin password");
    let secret = secret_file(dir.path());
    let args = ["coordinator", "--listen", &public, "--data-dir", data.to_str().unwrap(), "--cluster-secret-file", secret.to_str().unwrap()];
    let mut closed = server(&args, &log);
    assert!(exited(&mut closed, Duration::from_secs(2)).is_none(), "{}", std::fs::read_to_string(&log).unwrap());
}

/// A certificate authority and a certificate it signed for 127.0.0.1 and localhost, as PEM
/// files: (CA, certificate, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL takes a certificate whose issuer is its own subject for self-signed.
    ca_params.distinguished_name.push(DnType::CommonName, "Quiver test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[test]
fn tls_protects_every_port_and_clients_name_the_authority_they_trust() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (ca, cert, key) = certificates(dir.path());
    let secret = secret_file(dir.path());
    let (port, http_port) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{port}");
    let http = format!("127.0.0.1:{http_port}");
    let url = format!("https://{listen}");
    let tls = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap(), "--tls-ca", ca.to_str().unwrap()];
    let secret_args = ["--cluster-secret-file", secret.to_str().unwrap()];
    let coordinator = ["coordinator", "--listen", &listen, "--http", &http, "--data-dir", data.to_str().unwrap(), "--small-query-max-bytes", "0"];
    let _coordinator = server(&[&coordinator[..], &tls[..], &secret_args[..]].concat(), &dir.path().join("coordinator.log"));
    let _workers: Vec<KillOnDrop> = (0..2)
        .map(|i| {
            let worker = ["worker", "--coordinator", &url];
            server(&[&worker[..], &tls[..], &secret_args[..]].concat(), &dir.path().join(format!("worker-{i}.log")))
        })
        .collect();
    let ca_arg = ["--tls-ca", ca.to_str().unwrap()];
    let deadline = Instant::now() + Duration::from_secs(60);
    while sql_when_up(&url, &ca_arg, &[], "SELECT count(*) AS n FROM quiver.workers WHERE alive").lines().nth(1) != Some("2") {
        assert!(Instant::now() < deadline, "both workers join over TLS");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Workers serve each other's outputs over TLS too: a shuffle join makes them read one another.
    sql_when_up(&url, &ca_arg, &[], "SET datafusion.optimizer.hash_join_single_partition_threshold = 0");
    sql_when_up(&url, &ca_arg, &[], "CREATE TABLE a AS SELECT value AS k FROM generate_series(1, 3000)");
    let joined = sql_when_up(&url, &ca_arg, &[], "SELECT count(*) AS n FROM a x JOIN a y ON x.k = y.k");
    assert!(joined.contains("3000"), "{joined}");

    let untrusted = quiver(&["sql", "--coordinator", &url, "-c", "SELECT 1"], "", &[]);
    assert!(!untrusted.status.success() && text(&untrusted).contains("--tls-ca"), "{}", text(&untrusted));
    let plain = quiver(&["sql", "--coordinator", &format!("http://{listen}"), "-c", "SELECT 1"], "", &[]);
    assert!(!plain.status.success(), "plain HTTP/2 to a TLS port fails: {}", text(&plain));
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (other_ca, _, _) = certificates(&other);
    let wrong_ca = quiver(&["sql", "--coordinator", &url, "--tls-ca", other_ca.to_str().unwrap(), "-c", "SELECT 1"], "", &[]);
    assert!(!wrong_ca.status.success(), "a certificate from another authority is refused: {}", text(&wrong_ca));

    // The HTTP port speaks HTTPS: a plain request gets no HTTP answer.
    let curl = |args: &[&str]| {
        let out = Command::new("curl").args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"]).args(args).output();
        let out = out.expect("curl runs (.ci/run installs it)");
        (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    assert_ne!(curl(&[&format!("http://{http}/metrics")]).0, "200", "plain HTTP is not served");
    let (status, said) = curl(&["--cacert", ca.to_str().unwrap(), &format!("https://{http}/metrics")]);
    assert_eq!(status, "200", "HTTPS with the CA serves /metrics (the coordinator has no users): {said}");
}

#[test]
fn adbc_and_pyarrow_log_in_over_tls_with_a_password_or_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    add_user(data_arg, "ada", "admin", "admin password");
    let created = quiver(&["token", "create", "ada", "--data-dir", data_arg], "", &[]);
    let token = String::from_utf8_lossy(&created.stdout).trim().to_string();
    let (ca, cert, key) = certificates(dir.path());
    let secret = secret_file(dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let url = format!("https://{listen}");
    let tls = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap(), "--tls-ca", ca.to_str().unwrap()];
    let secret_args = ["--cluster-secret-file", secret.to_str().unwrap()];
    let coordinator = ["coordinator", "--listen", &listen, "--data-dir", data_arg, "--small-query-max-bytes", "0"];
    let _coordinator = server(&[&coordinator[..], &tls[..], &secret_args[..]].concat(), &dir.path().join("coordinator.log"));
    let _worker = server(&[&["worker", "--coordinator", &url][..], &tls[..], &secret_args[..]].concat(), &dir.path().join("worker.log"));
    let auth = ["--tls-ca", ca.to_str().unwrap(), "--token", &token];
    sql_when_up(&url, &auth, &[], "CREATE TABLE t AS SELECT value AS v FROM generate_series(1, 1000)");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/adbc_auth.py");
    let out = Command::new("python3")
        .args([script, &format!("grpc+tls://{listen}"), ca.to_str().unwrap(), "ada", "admin password", &token])
        .output()
        .expect("python3 runs (CI installs pyarrow and adbc-driver-flightsql)");
    let said = text(&out);
    assert!(out.status.success() && said.contains("all passed"), "the Python login test failed:\n{said}");
    eprintln!("{said}");
}
