//! The deployment files, checked as far as this machine can without Docker or Kubernetes: the
//! manifests against Kubernetes' schemas, the compose file against the compose specification
//! (`kubernetes-validate` and `check-jsonschema` from PyPI, which `.ci/run` installs), and
//! `deploy/quiver.toml` by starting a coordinator and a worker from it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(file)
}

fn python_module(module: &str, args: &[&str]) {
    let out = Command::new("python3")
        .args(["-m", module])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("python3 -m {module}: {e} (pip install it; .ci/run does)"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python3 -m {module} {args:?}:\n{text}");
}

#[test]
fn the_kubernetes_manifests_match_the_kubernetes_schemas() {
    let manifest = deploy("kubernetes/quiver.yaml");
    python_module("kubernetes_validate", &["--strict", manifest.to_str().unwrap()]);
}

#[test]
fn the_compose_file_matches_the_compose_specification() {
    let compose = deploy("compose.yaml");
    python_module("check_jsonschema", &["--builtin-schema", "vendor.compose-spec", compose.to_str().unwrap()]);
}

/// Every key of the deployment's config file is a flag its command knows: a coordinator and a
/// worker start from it (with this machine's addresses and paths on the command line, which
/// win over the file) and the worker joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployment_config_file_starts_a_coordinator_and_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a test cluster's secret, 32 bytes").unwrap();
    let config = deploy("quiver.toml");
    let (port, http) = (free_port(), free_port());
    let start = |args: Vec<String>| {
        let mut command = Command::new(quiver_binary());
        command.arg("--config").arg(&config).args(args).arg("--cluster-secret-file").arg(&secret);
        KillOnDrop(command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap())
    };
    let data = dir.path().join("data").display().to_string();
    let coordinator = start(vec!["coordinator".into(), format!("--listen=127.0.0.1:{port}"), format!("--http=127.0.0.1:{http}"), format!("--data-dir={data}")]);
    let worker = start(vec!["worker".into(), format!("--coordinator=http://127.0.0.1:{port}"), format!("--listen=127.0.0.1:{}", free_port())]);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let joined = wait_for("a worker in /api/workers", Duration::from_secs(30), || async move {
        let up = tokio::net::TcpStream::connect(addr).await.is_ok();
        let (status, json) = if up { get_json(addr, "/api/workers").await } else { (0, serde_json::Value::Null) };
        (status == 200 && json["workers"].as_array().is_some_and(|w| !w.is_empty())).then_some(json)
    })
    .await;
    assert_eq!(joined["workers"][0]["memory_limit_bytes"], 3u64 << 30, "the worker's memory limit comes from the file: {joined}");
    assert_eq!(http_request(addr, "GET", "/readyz").await.status, 200);
    drop((coordinator, worker));
}
